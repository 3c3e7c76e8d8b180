"""``pirl eval knn`` and ``pirl eval linear``: frozen-feature evaluations of a trunk, with cached features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pirl.data.archive import default_cache_dir
from pirl.data.sources import open_source
from pirl.errors import PirlError
from pirl.eval.features import eval_transform, extract_features_cached
from pirl.eval.knn import knn_accuracies
from pirl.eval.linear import linear_probe
from pirl.eval.models import LabeledImages, LoadedModel, load_model


def _features(model: LoadedModel, data: str, split: str, *, stage: str, batch_size: int, workers: int,
              data_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    source = open_source(data, root=data_root, split=split)
    if source.labels is None:
        raise PirlError(f"{data} ({split}) has no labels; evaluation needs class subfolders or a labelled dataset")
    dataset = LabeledImages(source, eval_transform(model.input_size, model.mean, model.std))
    key = {"model": model.identity, "data": str(Path(data).resolve()) if Path(data).exists() else data,
           "split": split, "n": len(source), "input_size": model.input_size, "mean": model.mean, "std": model.std}
    return extract_features_cached(model.trunk, dataset, cache_dir=default_cache_dir() / "features", key_parts=key,
                                   stage=stage, batch_size=batch_size, num_workers=workers, progress=True)


def evaluate(kind: str, model_spec: str, data: str, val_data: str | None = None, *, random_init: bool = False,
             stage: str = "pool", batch_size: int = 256, workers: int = 2, data_root: str | None = None,
             ks: tuple[int, ...] = (20, 200), temperature: float = 0.07, seed: int = 0,
             out: str | None = None) -> dict[str, Any]:
    """Train-split features of ``data`` against ``val_data`` (or the test/val split of ``data``)."""
    model = load_model(model_spec, random_init=random_init, seed=seed)
    train_f, train_y = _features(model, data, "train", stage=stage, batch_size=batch_size, workers=workers,
                                 data_root=data_root)
    test_f, test_y = _features(model, val_data or data, "test", stage=stage,
                               batch_size=batch_size, workers=workers, data_root=data_root)
    result: dict[str, Any] = {"eval": kind, "model": str(model_spec), "random_init": random_init, "stage": stage,
                              **model.describe(), "train_images": len(train_y), "test_images": len(test_y)}
    if kind == "knn":
        accs = knn_accuracies(train_f, train_y, test_f, test_y, ks=ks, temperature=temperature)
        result.update({"protocol": f"weighted kNN (NPID), cosine, T={temperature}", "k": max(ks),
                       "top1": accs[max(ks)], **{f"top1_k{k}": a for k, a in accs.items()}})
    elif kind == "linear":
        probe = linear_probe(train_f, train_y, test_f, test_y, seed=seed)
        result.update({"protocol": "L-BFGS multinomial logistic regression on standardised frozen features, "
                                   "weight decay chosen on a 10% held-out split", **probe})
    else:
        raise PirlError(f"unknown evaluation {kind!r}")
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"{kind}{'-random' if random_init else ''}-{stage}.json"
        (out_dir / name).write_text(json.dumps(result, indent=2))
    return result
