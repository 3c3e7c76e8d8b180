"""Frozen-trunk feature extraction (pooled res5 or a pooled intermediate stage), with an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from pirl.cache import used
from pirl.errors import PirlError
from pirl.models.trunk import STAGES, stage_features

FEATURE_STAGES = (*STAGES, "pool")
# Goyal et al. 2019 pool each stage to about 9k dims before the per-layer linear classifiers.
DEFAULT_POOLED_DIM = 9000


def eval_transform(
    input_size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> v2.Compose:
    """Test-time transform on PIL images: Resize(short side) -> CenterCrop -> float tensor -> Normalize.

    The default resize is ``input_size * 256 // 224`` (224 -> 256) for inputs of at least 128 pixels and
    ``input_size`` for small images (CIFAR/STL), where an upscale-then-crop would cut off content.
    """
    if resize is None:
        resize = input_size * 256 // 224 if input_size >= 128 else input_size
    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(input_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def pooled_size(channels: int, pooled_dim: int = DEFAULT_POOLED_DIM) -> int:
    """Side ``s`` of the square pooling grid so that ``channels * s * s`` is closest to ``pooled_dim``."""
    return max(1, round(math.sqrt(pooled_dim / channels)))


def pool_stage_map(fmap: torch.Tensor, pooled_dim: int = DEFAULT_POOLED_DIM) -> torch.Tensor:
    """Adaptive-average-pool an (N, C, H, W) map to about ``pooled_dim`` values per image and flatten it."""
    _, c, h, w = fmap.shape
    s = pooled_size(c, pooled_dim)
    # Pooling to a grid larger than the map only duplicates values.
    return torch.flatten(F.adaptive_avg_pool2d(fmap, (min(s, h), min(s, w))), 1)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def extract_features(
    trunk: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    stage: str = "pool",
    pooled_dim: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``trunk`` frozen over ``dataset`` (``(image, label)`` pairs) in order.

    Returns float32 features (N, D) and int64 labels (N,) on the CPU. ``stage="pool"`` uses the trunk's own
    forward (pooled res5); other stages are pooled to about ``pooled_dim`` (default 9000) values. The trunk is
    moved to ``device`` (default: CUDA if available) and its train/eval mode is restored afterwards.
    """
    if stage not in FEATURE_STAGES:
        raise PirlError(f"unknown feature stage {stage!r}; choose one of {', '.join(FEATURE_STAGES)}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise PirlError("cannot extract features from an empty dataset")
    dev = torch.device(device) if device is not None else _default_device()
    amp_dtype = _autocast_dtype(dev)
    dim = DEFAULT_POOLED_DIM if pooled_dim is None else pooled_dim
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=dev.type == "cuda"
    )
    was_training = trunk.training
    trunk.to(dev).eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc=f"features[{stage}]", disable=not progress, leave=False):
                images = images.to(dev, non_blocking=True)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    if stage == "pool":
                        out = trunk(images)
                    else:
                        out = pool_stage_map(stage_features(trunk, images, (stage,))[stage], dim)
                feats.append(torch.flatten(out, 1).float().cpu())
                labels.append(torch.as_tensor(targets).reshape(-1).to(torch.int64))
    finally:
        trunk.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """Stable sha256 hex digest of a JSON-serialisable mapping (non-JSON values are hashed via ``str``)."""
    blob = json.dumps(dict(key_parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def extract_features_cached(
    trunk: nn.Module,
    dataset: Dataset,
    *,
    cache_dir: str | os.PathLike[str],
    key_parts: Mapping[str, Any],
    stage: str = "pool",
    pooled_dim: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract_features`` with results stored at ``cache_dir/<sha256(key_parts)>/features.pt``.

    ``key_parts`` must identify everything that changes the features (checkpoint digest, dataset, split,
    transform); ``stage`` and the effective ``pooled_dim`` are added to the key here. An unreadable cache
    file is recomputed and overwritten.
    """
    parts = {**key_parts, "stage": stage, "pooled_dim": None if stage == "pool" else pooled_dim or DEFAULT_POOLED_DIM}
    entry = Path(cache_dir) / cache_key(parts)
    path = entry / "features.pt"
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            used(entry)
            return blob["features"], blob["labels"]
        except Exception:  # noqa: BLE001 - a truncated/corrupt cache entry is just recomputed
            pass
    feats, labels = extract_features(trunk, dataset, stage=stage, pooled_dim=pooled_dim, **kwargs)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "key.json").write_text(json.dumps(parts, sort_keys=True, indent=1, default=str) + "\n")
    tmp = entry / f"features.pt.tmp{os.getpid()}"
    torch.save({"features": feats, "labels": labels}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    used(entry)
    return feats, labels
