"""``pirl eval KIND``: knn, linear, lowshot and retrieval on cached frozen features, finetune of the whole trunk,
and invariance to the pretext transform.

Every result holds ``eval`` (the kind), ``protocol`` (what was measured and how) and accuracies as fractions;
bulky per-seed, per-image or per-stage data sit under ``details``, which the printed one-line summary omits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pirl.data.archive import default_cache_dir
from pirl.data.indexed import SourceImages
from pirl.data.sources import open_source
from pirl.data.views import eval_transform
from pirl.errors import PirlError
from pirl.eval import finetune as ft
from pirl.eval import invariance as inv
from pirl.eval import lowshot as ls
from pirl.eval import retrieval as rt
from pirl.eval.features import FEATURE_STAGES, extract_features_cached
from pirl.eval.kinds import KINDS as KIND_SPECS
from pirl.eval.kinds import Kind
from pirl.eval.knn import knn_accuracies
from pirl.eval.linear import linear_probe
from pirl.eval.models import LoadedModel, load_model
from pirl.safe_io import atomic_write_text

KINDS = tuple(KIND_SPECS)  # knn, linear, lowshot, finetune, invariance, retrieval


def _open(data: str, split: str, data_root: str | None, *, labels: bool = True) -> Any:
    source = open_source(data, root=data_root, split=split)
    if labels and source.labels is None:
        raise PirlError(f"{data} ({split}) has no labels; evaluation needs class subfolders or a labelled dataset")
    return source


def _features(
    model: LoadedModel,
    source: Any,
    data: str,
    split: str,
    *,
    stage: str,
    batch_size: int,
    workers: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = SourceImages(source, eval_transform(model.input_size, model.mean, model.std))
    key = {
        "model": model.identity,
        "data": str(Path(data).resolve()) if Path(data).exists() else data,
        "split": split,
        "n": len(source),
        "input_size": model.input_size,
        "mean": model.mean,
        "std": model.std,
    }
    return extract_features_cached(
        model.trunk,
        dataset,
        cache_dir=default_cache_dir() / "features",
        key_parts=key,
        stage=stage,
        batch_size=batch_size,
        num_workers=workers,
        device=device,
        progress=True,
    )


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its bulky ``details``: what the CLI prints as its last line."""
    return {k: v for k, v in result.items() if k != "details"}


def _check(kind: Kind, specs: list[str], o: dict[str, Any]) -> None:
    """Reject bad options before any model or data is loaded."""
    if not specs:
        raise PirlError("--model is required")
    if len(specs) > 1 and not kind.several_models:
        raise PirlError(f"only 'pirl eval invariance' compares several models; {kind.name} takes one --model")
    if "stage" in o:
        if o["stage"] not in (*FEATURE_STAGES, "all"):
            raise PirlError(f"unknown feature stage {o['stage']!r}; choose one of {', '.join(FEATURE_STAGES)}, all")
        if o["stage"] == "all" and kind.name != "linear":
            raise PirlError("--stage all is for 'pirl eval linear' (per-layer probes)")
    if "fraction" in o:
        ft.check_fraction(o["fraction"])
    positive = {name: o[name] for name in ("batch_size", "seeds", "epochs", "images", "queries", "k") if name in o}
    if "shots" in o:
        positive["shots"] = min(o["shots"], default=0)
    for name, value in positive.items():
        if value < 1:
            raise PirlError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if o.get("lr") is not None and not (o["lr"] > 0 and math.isfinite(o["lr"])):
        raise PirlError(f"--lr must be a positive number, got {o['lr']}")
    if not 0 <= o["seed"] < 2**32:  # the range numpy, scikit-learn and torch all accept
        raise PirlError(f"--seed must be in [0, 2**32), got {o['seed']}")
    ft.resolve_device(o["device"])


@dataclass
class _Run:
    """One evaluation's inputs: the models, the data, this kind's options and where results go."""

    kind: str
    specs: list[str]
    data: str
    test_data: str
    opts: dict[str, Any]
    out_dir: Path | None

    @property
    def suffix(self) -> str:
        return "-random" if self.opts["random_init"] else ""


def evaluate(
    kind: str, model_spec: str | Sequence[str], data: str, val_data: str | None = None, **options: Any
) -> dict[str, Any]:
    """Run one evaluation; training images are the train split of ``data``, test images ``val_data`` (or the
    test/val split of ``data``). ``options`` are those of ``pirl eval KIND`` in Python spelling (see
    :data:`pirl.eval.kinds.KINDS`: ``stage``, ``batch_size``, ``workers``, ``seed``, ``shots``, ...); one that
    the kind does not take is an error. Writes ``<out>/<kind>...json`` (and a PNG for invariance/retrieval)."""
    if kind not in KINDS:
        raise PirlError(f"unknown evaluation {kind!r}; choose one of {', '.join(KINDS)}")
    spec = KIND_SPECS[kind]
    specs = [str(model_spec)] if isinstance(model_spec, (str, Path)) else [str(s) for s in model_spec]
    opts = spec.resolve(options)
    _check(spec, specs, opts)
    out_dir = Path(opts["out"]) if opts["out"] else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(kind, specs, data, val_data or data, opts, out_dir)
    if kind == "invariance":
        return _invariance(run)
    if kind == "finetune":
        return _finetune(run)
    return _on_features(run)


def _load(run: _Run) -> tuple[LoadedModel, dict[str, Any]]:
    o = run.opts
    model = load_model(run.specs[0], random_init=o["random_init"], seed=o["seed"])
    return model, {"eval": run.kind, "model": run.specs[0], "random_init": o["random_init"], **model.describe()}


def _finetune(run: _Run) -> dict[str, Any]:
    o = run.opts
    model, result = _load(run)
    train_src, test_src = _open(run.data, "train", o["data_root"]), _open(run.test_data, "test", o["data_root"])
    res = ft.finetune(
        model.trunk,
        train_src,
        test_src,
        input_size=model.input_size,
        mean=model.mean,
        std=model.std,
        fraction=o["fraction"],
        epochs=o["epochs"],
        lr=o["lr"],
        batch_size=o["batch_size"],
        device=o["device"],
        seed=o["seed"],
        workers=o["workers"],
        progress=True,
    )
    result.update({"protocol": ft.protocol(o["fraction"], o["epochs"], res["milestones"]), **res})
    return _write(result, run.out_dir, f"finetune{run.suffix}-f{o['fraction']:g}")


def _on_features(run: _Run) -> dict[str, Any]:
    """knn, linear, lowshot and retrieval: on (cached) frozen features of the train and test images."""
    o, kind, stage, seed = run.opts, run.kind, run.opts["stage"], run.opts["seed"]
    dev = ft.resolve_device(o["device"])  # features, kNN and linear probes run on it (auto: the GPU when present)
    model, result = _load(run)
    labelled = kind != "retrieval"  # retrieval also works on unlabelled folders (no precision then)
    train_src = _open(run.data, "train", o["data_root"], labels=labelled)
    test_src = _open(run.test_data, "test", o["data_root"], labels=labelled)
    result.update({"stage": stage, "train_images": len(train_src), "test_images": len(test_src)})

    def both(st: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        kw = {"stage": st, "batch_size": o["batch_size"], "workers": o["workers"], "device": dev}
        return (
            _features(model, train_src, run.data, "train", **kw),
            _features(model, test_src, run.test_data, "test", **kw),
        )

    if kind == "linear" and stage == "all":
        result.update(_linear_all(both, seed, dev))
        return _write(result, run.out_dir, f"linear{run.suffix}-all")
    (train_f, train_y), (test_f, test_y) = both(stage)
    if kind == "knn":
        ks, temperature = tuple(o["ks"]), o["temperature"]
        accs = knn_accuracies(train_f.to(dev), train_y, test_f, test_y, ks=ks, temperature=temperature)
        result.update(
            {
                "protocol": f"weighted kNN (NPID), cosine, T={temperature}",
                "k": max(ks),
                "top1": accs[max(ks)],
                **{f"top1_k{k}": a for k, a in accs.items()},
            }
        )
    elif kind == "linear":
        probe = linear_probe(train_f, train_y, test_f, test_y, seed=seed, device=dev)
        result.update(
            {
                "protocol": "L-BFGS multinomial logistic regression on standardised frozen features, "
                "weight decay chosen on a 10% held-out split",
                **probe,
            }
        )
    elif kind == "lowshot":
        res = ls.lowshot_svm(train_f, train_y, test_f, test_y, shots=o["shots"], seeds=o["seeds"], base_seed=seed)
        result.update({"protocol": ls.protocol(o["seeds"], res["costs"]), **res})
    else:
        png = run.out_dir / f"retrieval{run.suffix}-{stage}.png" if run.out_dir else None
        result.update(
            _retrieval(
                train_src,
                test_src,
                train_f,
                train_y,
                test_f,
                test_y,
                stage=stage,
                queries=o["queries"],
                k=o["k"],
                seed=seed,
                png=png,
            )
        )
    return _write(result, run.out_dir, f"{kind}{run.suffix}-{stage}")


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
        "best_stage": best,
        "top1": per_stage[best]["top1"],
        "top1_by_stage": {st: r["top1"] for st, r in per_stage.items()},
        "val_top1_by_stage": {st: r["val_top1"] for st, r in per_stage.items()},
        "feature_dim_by_stage": {st: r["feature_dim"] for st, r in per_stage.items()},
        "details": {"per_stage": per_stage},
    }


def _retrieval(
    train_src: Any,
    test_src: Any,
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    *,
    stage: str,
    queries: int,
    k: int,
    seed: int,
    png: Path | None,
) -> dict:
    q_idx = rt.choose_queries(len(test_src), queries, seed)
    sims, nbrs = rt.nearest(train_f, test_f[q_idx], k)
    labelled = train_src.labels is not None and test_src.labels is not None
    res: dict[str, Any] = {
        "protocol": rt.PROTOCOL_TEMPLATE.format(queries=len(q_idx), seed=seed, k=k, stage=stage),
        "k": nbrs.shape[1],
        "queries": len(q_idx),
        "precision_at_k": None,
        "top1": None,
    }
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
        titles = [classes[int(test_y[q])] if labelled and classes and test_y[q] >= 0 else f"query {q}" for q in q_idx]
        rt.plot_grid(
            [test_src.load(q) for q in q_idx],
            [[train_src.load(i) for i in row] for row in nbrs.tolist()],
            matches,
            png,
            titles=titles,
        )
        res["png"] = str(png)
    return res


def _invariance(run: _Run) -> dict[str, Any]:
    o, specs, seed = run.opts, run.specs, run.opts["seed"]
    subjects = [inv.load_subject(s, o["space"], seed=seed) for s in specs]
    if o["random_init"]:
        subjects.append(inv.load_subject(specs[0], "trunk", random_init=True, seed=seed))
    source = _open(run.test_data, "test", o["data_root"], labels=False)
    dev = ft.resolve_device(o["device"])
    result: dict[str, Any] = {
        "eval": "invariance",
        "protocol": inv.PROTOCOL,
        "models": [s.name for s in subjects],
        "space": o["space"],
        "random_init": o["random_init"],
        **inv.invariance(
            subjects,
            source,
            images=o["images"],
            seed=seed,
            batch_size=o["batch_size"],
            workers=o["workers"],
            device=dev,
            bn_stats=o["bn_stats"],
        ),
    }
    if run.out_dir:
        inv.plot(result["details"]["per_model"], run.out_dir / "invariance.png")
        result["png"] = str(run.out_dir / "invariance.png")
    return _write(result, run.out_dir, "invariance")
