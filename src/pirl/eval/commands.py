"""``pirl eval KIND``: knn, linear, lowshot and retrieval on cached frozen features, finetune of the whole trunk,
and invariance to the pretext transform.

Every result holds ``eval`` (the kind), ``protocol`` (what was measured and how) and accuracies as fractions;
bulky per-seed, per-image or per-stage data sit under ``details``, which the printed one-line summary omits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pirl.data.archive import default_cache_dir
from pirl.data.sources import open_source
from pirl.errors import PirlError
from pirl.safe_io import atomic_write_text
from pirl.eval import finetune as ft
from pirl.eval import invariance as inv
from pirl.eval import lowshot as ls
from pirl.eval import retrieval as rt
from pirl.eval.features import FEATURE_STAGES, eval_transform, extract_features_cached
from pirl.eval.knn import knn_accuracies
from pirl.eval.linear import linear_probe
from pirl.eval.models import LabeledImages, LoadedModel, load_model

KINDS = ("knn", "linear", "lowshot", "finetune", "invariance", "retrieval")


def _open(data: str, split: str, data_root: str | None, *, labels: bool = True) -> Any:
    source = open_source(data, root=data_root, split=split)
    if labels and source.labels is None:
        raise PirlError(f"{data} ({split}) has no labels; evaluation needs class subfolders or a labelled dataset")
    return source


def _features(model: LoadedModel, source: Any, data: str, split: str, *, stage: str, batch_size: int,
              workers: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = LabeledImages(source, eval_transform(model.input_size, model.mean, model.std))
    key = {"model": model.identity, "data": str(Path(data).resolve()) if Path(data).exists() else data,
           "split": split, "n": len(source), "input_size": model.input_size, "mean": model.mean, "std": model.std}
    return extract_features_cached(model.trunk, dataset, cache_dir=default_cache_dir() / "features", key_parts=key,
                                   stage=stage, batch_size=batch_size, num_workers=workers, device=device,
                                   progress=True)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its bulky ``details``: what the CLI prints as its last line."""
    return {k: v for k, v in result.items() if k != "details"}


def _check_options(kind: str, specs: list[str], stage: str, **opts: Any) -> None:
    """Reject bad options before any model or data is loaded."""
    if kind not in KINDS:
        raise PirlError(f"unknown evaluation {kind!r}; choose one of {', '.join(KINDS)}")
    if not specs:
        raise PirlError("--model is required")
    if len(specs) > 1 and kind != "invariance":
        raise PirlError(f"only 'pirl eval invariance' compares several models; {kind} takes one --model")
    if stage not in (*FEATURE_STAGES, "all"):
        raise PirlError(f"unknown feature stage {stage!r}; choose one of {', '.join(FEATURE_STAGES)}, all")
    if stage == "all" and kind != "linear":
        raise PirlError("--stage all is for 'pirl eval linear' (per-layer probes)")
    if kind == "finetune":
        ft.check_fraction(opts["fraction"])
    positive = {"batch_size": opts["batch_size"], "seeds": opts["seeds"], "epochs": opts["epochs"],
                "images": opts["images"], "queries": opts["queries"], "k": opts["k"],
                "shots": min(opts["shots"], default=0)}
    for name, value in positive.items():
        if value < 1:
            raise PirlError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if opts["lr"] is not None and not (opts["lr"] > 0 and math.isfinite(opts["lr"])):
        raise PirlError(f"--lr must be a positive number, got {opts['lr']}")
    if not 0 <= opts["seed"] < 2**32:  # the range numpy, scikit-learn and torch all accept
        raise PirlError(f"--seed must be in [0, 2**32), got {opts['seed']}")
    ft.resolve_device(opts["device"])


def evaluate(kind: str, model_spec: str | Sequence[str], data: str, val_data: str | None = None, *,
             random_init: bool = False, stage: str = "pool", batch_size: int = 256, workers: int = 2,
             data_root: str | None = None, ks: tuple[int, ...] = (20, 200), temperature: float = 0.07,
             seed: int = 0, out: str | None = None, shots: Sequence[int] = ls.DEFAULT_SHOTS, seeds: int = 5,
             fraction: float = 0.1, epochs: int = 70, lr: float | None = None, device: str = "auto",
             images: int = 1000, space: str = "auto", queries: int = 8, k: int = 8) -> dict[str, Any]:
    """Run one evaluation; training images are the train split of ``data``, test images ``val_data`` (or the
    test/val split of ``data``). Writes ``<out>/<kind>...json`` (and a PNG for invariance/retrieval)."""
    specs = [str(model_spec)] if isinstance(model_spec, (str, Path)) else [str(s) for s in model_spec]
    _check_options(kind, specs, stage, fraction=fraction, batch_size=batch_size, seeds=seeds, epochs=epochs,
                   images=images, queries=queries, k=k, shots=list(shots), lr=lr, seed=seed, device=device)
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    test_data = val_data or data
    if kind == "invariance":
        return _invariance(specs, test_data, data_root=data_root, random_init=random_init, space=space,
                           images=images, seed=seed, batch_size=batch_size, workers=workers, device=device,
                           out_dir=out_dir)

    dev = ft.resolve_device(device)  # features, kNN and linear probes run on it (auto: the GPU when present)
    model = load_model(specs[0], random_init=random_init, seed=seed)
    result: dict[str, Any] = {"eval": kind, "model": specs[0], "random_init": random_init, **model.describe()}
    suffix = "-random" if random_init else ""
    if kind == "finetune":
        train_src, test_src = _open(data, "train", data_root), _open(test_data, "test", data_root)
        res = ft.finetune(model.trunk, train_src, test_src, input_size=model.input_size, mean=model.mean,
                          std=model.std, fraction=fraction, epochs=epochs, lr=lr, batch_size=batch_size,
                          device=device, seed=seed, workers=workers, progress=True)
        result.update({"protocol": ft.protocol(fraction, epochs, res["milestones"]), **res})
        return _write(result, out_dir, f"finetune{suffix}-f{fraction:g}")

    labelled = kind != "retrieval"  # retrieval also works on unlabelled folders (no precision then)
    train_src = _open(data, "train", data_root, labels=labelled)
    test_src = _open(test_data, "test", data_root, labels=labelled)
    result.update({"stage": stage, "train_images": len(train_src), "test_images": len(test_src)})

    def both(st: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        kw = {"stage": st, "batch_size": batch_size, "workers": workers, "device": dev}
        return (_features(model, train_src, data, "train", **kw), _features(model, test_src, test_data, "test", **kw))

    if kind == "linear" and stage == "all":
        result.update(_linear_all(both, seed, dev))
        return _write(result, out_dir, f"linear{suffix}-all")
    (train_f, train_y), (test_f, test_y) = both(stage)
    if kind == "knn":
        accs = knn_accuracies(train_f.to(dev), train_y, test_f, test_y, ks=ks, temperature=temperature)
        result.update({"protocol": f"weighted kNN (NPID), cosine, T={temperature}", "k": max(ks),
                       "top1": accs[max(ks)], **{f"top1_k{k}": a for k, a in accs.items()}})
    elif kind == "linear":
        probe = linear_probe(train_f, train_y, test_f, test_y, seed=seed, device=dev)
        result.update({"protocol": "L-BFGS multinomial logistic regression on standardised frozen features, "
                                   "weight decay chosen on a 10% held-out split", **probe})
    elif kind == "lowshot":
        res = ls.lowshot_svm(train_f, train_y, test_f, test_y, shots=shots, seeds=seeds, base_seed=seed)
        result.update({"protocol": ls.protocol(seeds, res["costs"]), **res})
    else:
        result.update(_retrieval(train_src, test_src, train_f, train_y, test_f, test_y, stage=stage,
                                 queries=queries, k=k, seed=seed, png=out_dir / f"retrieval{suffix}-{stage}.png"
                                 if out_dir else None))
    return _write(result, out_dir, f"{kind}{suffix}-{stage}")


def _write(result: dict[str, Any], out_dir: Path | None, stem: str) -> dict[str, Any]:
    if out_dir:
        atomic_write_text(out_dir / f"{stem}.json", json.dumps(result, indent=2))  # never through a link
    return result


def _linear_all(stage_features: Callable[[str], Any], seed: int, device: torch.device | None = None) -> dict[str, Any]:
    """One probe per layer; each stage's features are extracted (or read from the cache) and then dropped."""
    per_stage: dict[str, dict[str, Any]] = {}
    for st in FEATURE_STAGES:
        (train_f, train_y), (test_f, test_y) = stage_features(st)
        probe = linear_probe(train_f, train_y, test_f, test_y, seed=seed, device=device)
        per_stage[st] = {"feature_dim": train_f.shape[1], **probe}
        del train_f, test_f
    best = max(FEATURE_STAGES, key=lambda st: per_stage[st]["top1"])
    return {
        "protocol": "per-layer linear probes (Goyal'19 / paper Table 7): conv1 and res2..res5 adaptive-average-"
                    "pooled to about 9,000 values, plus the pooled res5 vector; each an L-BFGS multinomial logistic "
                    "regression on standardised frozen features, weight decay chosen on a 10% held-out part of the "
                    "training split; best_stage = the layer with the best test top-1, as the paper reports",
        "best_stage": best, "top1": per_stage[best]["top1"],
        "top1_by_stage": {st: r["top1"] for st, r in per_stage.items()},
        "val_top1_by_stage": {st: r["val_top1"] for st, r in per_stage.items()},
        "feature_dim_by_stage": {st: r["feature_dim"] for st, r in per_stage.items()},
        "details": {"per_stage": per_stage},
    }


def _retrieval(train_src: Any, test_src: Any, train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
               test_y: torch.Tensor, *, stage: str, queries: int, k: int, seed: int, png: Path | None) -> dict:
    q_idx = rt.choose_queries(len(test_src), queries, seed)
    sims, nbrs = rt.nearest(train_f, test_f[q_idx], k)
    labelled = train_src.labels is not None and test_src.labels is not None
    res: dict[str, Any] = {"protocol": rt.PROTOCOL_TEMPLATE.format(queries=len(q_idx), seed=seed, k=k, stage=stage),
                           "k": nbrs.shape[1], "queries": len(q_idx), "precision_at_k": None, "top1": None}
    matches = None
    if labelled:
        q_y = test_y[q_idx]
        res.update(rt.label_metrics(nbrs, train_y, q_y))
        _, all_nbrs = rt.nearest(train_f, test_f, k)
        all_metrics = rt.label_metrics(all_nbrs, train_y, test_y)
        res.update({f"{m}_all_test": v for m, v in all_metrics.items()})
        matches = (train_y[nbrs] == q_y[:, None]).tolist()
    path = getattr(test_src, "path", None)
    train_path = getattr(train_src, "path", None)
    rows = []
    for r, q in enumerate(q_idx):
        row: dict[str, Any] = {"test_index": q, "neighbours": nbrs[r].tolist(), "similarities": sims[r].tolist()}
        if path:
            row.update({"path": path(q), "neighbour_paths": [train_path(i) for i in nbrs[r].tolist()]})
        if labelled:
            row.update({"label": int(test_y[q]), "neighbour_labels": train_y[nbrs[r]].tolist()})
        rows.append(row)
    res["details"] = {"queries": rows}
    if png:
        classes = test_src.classes
        titles = [classes[int(test_y[q])] if labelled and classes and test_y[q] >= 0 else f"query {q}"
                  for q in q_idx]
        rt.plot_grid([test_src.load(q) for q in q_idx], [[train_src.load(i) for i in row] for row in nbrs.tolist()],
                     matches, png, titles=titles)
        res["png"] = str(png)
    return res


def _invariance(specs: list[str], data: str, *, data_root: str | None, random_init: bool, space: str, images: int,
                seed: int, batch_size: int, workers: int, device: str, out_dir: Path | None) -> dict[str, Any]:
    subjects = [inv.load_subject(s, space, seed=seed) for s in specs]
    if random_init:
        subjects.append(inv.load_subject(specs[0], "trunk", random_init=True, seed=seed))
    source = _open(data, "test", data_root, labels=False)
    dev = ft.resolve_device(device)
    result: dict[str, Any] = {"eval": "invariance", "protocol": inv.PROTOCOL, "models": [s.name for s in subjects],
                              "space": space, "random_init": random_init,
                              **inv.invariance(subjects, source, images=images, seed=seed, batch_size=batch_size,
                                               workers=workers, device=dev)}
    if out_dir:
        inv.plot(result["details"]["per_model"], out_dir / "invariance.png")
        result["png"] = str(out_dir / "invariance.png")
    return _write(result, out_dir, "invariance")
