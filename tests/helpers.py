"""Shared test helpers: tiny configs and in-memory image sources so that training tests run in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pirl.config import load_config
from pirl.data.sources import ArraySource

# The repository's root: scripts, benchmarks and the source tree are found from it.
REPO_ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "data.image_size=16",
    "data.jigsaw_crop=15",
    "data.patch_size=4",
    "data.min_size=0",
    "data.augment=light",
    "data.workers=0",
    "data.subset=0",
    "data.image_scale=[0.5,1.0]",
    "model.arch=resnet18",
    "model.stem=imagenet",
    "model.embed_dim=16",
    "loss.negatives=16",
    "optim.batch_size=8",
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "train.log_every=1",
    "train.seed=0",
    "train.threads=1",
]


def tiny_config(*overrides: str):
    return load_config("cpu-quick", [*TINY, *overrides])


def random_source(n: int = 32, size: int = 16, classes: int = 4, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySource(images, np.arange(n) % classes)
