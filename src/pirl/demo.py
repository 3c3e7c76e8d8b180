"""``pirl demo``: PIRL on scikit-learn's handwritten digits, offline, in a few minutes on a laptop CPU.

Trains a ResNet-18 on 1,437 digit images (8x8, upscaled to 32 px) and compares, on the 360 held-out digits, the
trunk at random init and after training with the same probes: weighted kNN and a linear probe on all training
labels, and linear SVMs on a few labels per class. With every label, random features of a ResNet are already near
the ceiling on these digits; with two labels per class they are far from it, and that is where pretraining shows.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pirl.config import load_config
from pirl.data.indexed import SourceImages
from pirl.data.sources import ArraySource
from pirl.data.views import eval_transform
from pirl.eval.features import extract_features
from pirl.eval.knn import knn_accuracies
from pirl.eval.linear import linear_probe
from pirl.eval.lowshot import lowshot_svm
from pirl.models.trunk import build_trunk

DEMO_OVERRIDES = [
    "data.min_size=32",
    "data.image_size=32",
    "data.image_scale=[0.5,1.0]",
    "data.jigsaw_crop=30",
    "data.jigsaw_scale=[0.7,1.0]",
    "data.patch_size=8",
    "data.augment=light",
    "data.workers=1",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.5,0.5,0.5]",
    "data.subset=0",
    "model.arch=resnet18",
    "model.stem=imagenet",
    "bank.negatives=1024",
    "optim.batch_size=64",
    "optim.base_lr=0.12",
    "optim.warmup_epochs=0.5",
    "optim.epochs=12",
    "train.knn_every=2",
]


# The few-label probe: SVMs on this many labelled digits per class, each a mean over this many draws of them (the
# same draws for both trunks).
DEMO_SHOTS = 2
DEMO_DRAWS = 10


def digits_sources(test_fraction: float = 0.2, seed: int = 0) -> tuple[ArraySource, ArraySource]:
    """scikit-learn's 1,797 digits as uint8 images, split into a training and a held-out source."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(len(images) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return (
        ArraySource(images[train], digits.target[train], name="digits-train"),
        ArraySource(images[test], digits.target[test], name="digits-test"),
    )


def _scores(trunk: torch.nn.Module, train_src: ArraySource, test_src: ArraySource, cfg) -> dict[str, float]:
    transform = eval_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)
    train_f, train_y = extract_features(trunk, SourceImages(train_src, transform), device="cpu")
    test_f, test_y = extract_features(trunk, SourceImages(test_src, transform), device="cpu")
    knn = knn_accuracies(train_f, train_y, test_f, test_y, ks=(20,))[20]
    few = lowshot_svm(train_f, train_y, test_f, test_y, shots=(DEMO_SHOTS,), seeds=DEMO_DRAWS)
    return {
        "knn": knn,
        "linear": linear_probe(train_f, train_y, test_f, test_y)["top1"],
        f"svm_{DEMO_SHOTS}_per_class": few["top1"],
    }


def run_demo(out: str | None = None, epochs: int | None = None) -> dict[str, dict[str, float]]:
    """Train, then print and return {"random_init": {...}, "pirl": {...}} accuracies on held-out digits
    (only "random_init" when a signal stopped the training)."""
    from pirl.training import train

    overrides = DEMO_OVERRIDES + ([f"optim.epochs={epochs}"] if epochs else [])
    cfg = load_config("cpu-quick", overrides)
    train_src, test_src = digits_sources()
    run_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="pirl-demo-"))
    print(f"PIRL demo: {len(train_src)} training digits, {len(test_src)} held out; run directory {run_dir}")

    torch.manual_seed(cfg.train.seed)
    before = _scores(build_trunk(cfg.model.arch, cfg.model.stem), train_src, test_src, cfg)
    start = time.perf_counter()
    summary = train(cfg, train_src, run_dir, overwrite=True)  # an earlier demo in --out goes to previous-*/
    if summary["stopped"]:  # Ctrl-C or SIGTERM: the checkpoint is saved, skip the evaluation
        print(f"stopped by {summary['stopped']}; checkpoint in {run_dir}")
        return {"random_init": before}
    from pirl.eval.models import load_model

    trained = load_model(run_dir).trunk
    after = _scores(trained, train_src, test_src, cfg)
    minutes = (time.perf_counter() - start) / 60
    print(f"\ntrained {cfg.optim.epochs} epochs in {minutes:.1f} min")
    print(f"{'held-out accuracy':<22}{'random init':>12}{'PIRL':>8}")
    rows = (
        ("knn", "weighted kNN (k=20)"),
        ("linear", "linear probe"),
        (f"svm_{DEMO_SHOTS}_per_class", f"SVM, {DEMO_SHOTS} labels/class"),
    )
    for key, label in rows:
        print(f"{label:<22}{before[key]:>12.3f}{after[key]:>8.3f}")
    result = {"random_init": before, "pirl": after}
    print(json.dumps(result))
    return result
