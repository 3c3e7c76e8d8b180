"""Frozen-trunk feature extraction (pooled res5 or a pooled intermediate stage), with an on-disk cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pirl.cache import used
from pirl.data.views import eval_transform  # noqa: F401  (re-exported: the view lives in pirl.data)
from pirl.device import amp_dtype as _autocast_dtype
from pirl.device import default_device as _default_device
from pirl.errors import PirlError
from pirl.models.trunk import STAGES, stage_features
from pirl.safe_io import atomic_write_text, atomic_write_with

FEATURE_STAGES = (*STAGES, "pool")
# Goyal et al. 2019 pool each stage to about 9k dims before the per-layer linear classifiers.
DEFAULT_POOLED_DIM = 9000
T = TypeVar("T")


def pooled_size(channels: int, pooled_dim: int = DEFAULT_POOLED_DIM) -> int:
    """Side ``s`` of the square pooling grid so that ``channels * s * s`` is closest to ``pooled_dim``."""
    return max(1, round(math.sqrt(pooled_dim / channels)))


def pool_stage_map(fmap: torch.Tensor, pooled_dim: int = DEFAULT_POOLED_DIM) -> torch.Tensor:
    """Adaptive-average-pool an (N, C, H, W) map to about ``pooled_dim`` values per image and flatten it."""
    _, c, h, w = fmap.shape
    s = pooled_size(c, pooled_dim)
    # Pooling to a grid larger than the map only duplicates values.
    return torch.flatten(F.adaptive_avg_pool2d(fmap, (min(s, h), min(s, w))), 1)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    return x.to(device, non_blocking=True)


def frozen_batches(
    fn: Callable[..., T],
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    inputs: int = 1,
    amp_dtype: torch.dtype | None = None,
    pin_memory: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "batches",
) -> list[T]:
    """``fn`` over every batch of ``dataset``, in order, without gradients: the one loop of every evaluation
    that runs a frozen network over images (features, fine-tuned accuracy, invariance distances).

    Each batch is what a DataLoader yields (a tuple); its first ``inputs`` items (tensors, or lists of them) are
    moved to ``device`` and ``fn`` gets them followed by the other items as they are, under autocast to
    ``amp_dtype`` (None: off).
    Returns ``fn``'s results, one per batch.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
    )
    out: list[T] = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            moved = [_to(x, device) for x in batch[:inputs]]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out.append(fn(*moved, *batch[inputs:]))
    return out


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

    def features(images: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if stage == "pool":
            out = trunk(images)
        else:
            out = pool_stage_map(stage_features(trunk, images, (stage,))[stage], dim)
        return torch.flatten(out, 1).float().cpu(), torch.as_tensor(targets).reshape(-1).to(torch.int64)

    was_training = trunk.training
    trunk.to(dev).eval()
    try:
        batches = frozen_batches(
            features,
            dataset,
            device=dev,
            batch_size=batch_size,
            num_workers=num_workers,
            amp_dtype=amp_dtype,
            pin_memory=dev.type == "cuda",
            progress=progress,
            desc=f"features[{stage}]",
        )
    finally:
        trunk.train(was_training)
    return torch.cat([f for f, _ in batches]), torch.cat([y for _, y in batches])


def cache_key(key_parts: Mapping[str, Any]) -> str:
    """Stable sha256 hex digest of a JSON-serialisable mapping (non-JSON values are hashed via ``str``)."""
    blob = json.dumps(dict(key_parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def source_fingerprint(source: Any) -> str:
    """Digest of what a dataset's images are: every file's path, size, mtime and inode, with its label.

    Sources without files (in-memory arrays) hash their pixels and labels; torchvision datasets without a
    file list hash the listing of their root folder. Swapping two class folders, replacing or touching a
    file, or copying the data elsewhere all change it.
    """
    digest = hashlib.sha256()
    labels = getattr(source, "labels", None)
    digest.update(json.dumps({"n": len(source), "classes": getattr(source, "classes", None)}, default=str).encode())
    paths: list[str] | None = None
    if hasattr(source, "path"):
        paths = [source.path(i) for i in range(len(source))]
    elif getattr(getattr(source, "dataset", None), "samples", None) is not None:
        paths = [str(p) for p, _ in source.dataset.samples]
    if paths is not None:
        for i, p in enumerate(paths):
            try:
                st = os.stat(p)
                meta = f"{st.st_size}:{st.st_mtime_ns}:{st.st_dev}:{st.st_ino}"
            except OSError:
                meta = "missing"
            label = labels[i] if labels is not None else -1
            digest.update(f"{p}\0{meta}\0{label}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()
    images = getattr(source, "images", None)
    if images is not None:  # ArraySource
        digest.update(memoryview(images.tobytes() if not images.flags.c_contiguous else images).cast("B"))
        digest.update(json.dumps(labels).encode())
        return digest.hexdigest()
    tensors = getattr(source, "tensors", None)
    if tensors is not None:  # TensorDataset
        for t in tensors:
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    root = getattr(getattr(source, "dataset", None), "root", None)
    if root is not None and os.path.isdir(root):
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(folder, name)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode("utf-8", "surrogateescape"))
    digest.update(json.dumps(labels).encode())
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and values): identifies the weights themselves."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(
                t.reshape(-1).view(torch.uint8).numpy().tobytes()
                if t.dtype != torch.bool
                else t.to(torch.uint8).numpy().tobytes()
            )
    return digest.hexdigest()


def _cached_ok(blob: Any, key: str, dataset: Dataset, labels: Any) -> bool:
    """A cache entry is used only when it names the same key and matches the data in size and labels."""
    if not isinstance(blob, dict) or blob.get("key") != key:
        return False
    feats, got = blob.get("features"), blob.get("labels")
    if not isinstance(feats, torch.Tensor) or not isinstance(got, torch.Tensor):
        return False
    n = len(dataset)  # type: ignore[arg-type]
    if feats.dim() != 2 or feats.shape[0] != n or got.shape != (n,):
        return False
    return labels is None or torch.equal(got, torch.as_tensor(list(labels), dtype=torch.int64))


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
    transform); ``stage``, the effective ``pooled_dim`` and a digest of the trunk's weights are added to the
    key here, and so is :func:`source_fingerprint` of ``dataset.source`` (or of ``dataset``) unless
    ``key_parts`` already holds a ``"files"`` entry. On read the entry must repeat the key and match the
    dataset's size and labels; an unreadable or mismatched entry is recomputed and replaced (never written
    through a link).
    """
    source = getattr(dataset, "source", dataset)
    parts = {
        **key_parts,
        "stage": stage,
        "pooled_dim": None if stage == "pool" else pooled_dim or DEFAULT_POOLED_DIM,
        "weights": weights_digest(trunk),
    }
    parts.setdefault("files", source_fingerprint(source))
    key = cache_key(parts)
    entry = Path(cache_dir) / key
    path = entry / "features.pt"
    labels_now = getattr(source, "labels", None)
    if path.is_file() and not path.is_symlink():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if _cached_ok(blob, key, dataset, labels_now):
                used(entry)
                return blob["features"], blob["labels"]
        except Exception:  # noqa: BLE001 - a truncated/corrupt cache entry is just recomputed
            pass
    feats, labels = extract_features(trunk, dataset, stage=stage, pooled_dim=pooled_dim, **kwargs)
    if entry.is_symlink():
        entry.unlink()
    entry.mkdir(parents=True, exist_ok=True)
    atomic_write_text(entry / "key.json", json.dumps(parts, sort_keys=True, indent=1, default=str) + "\n")
    # atomic: a concurrent reader never sees a half-written file, and a planted link is replaced
    atomic_write_with(path, lambda fh: torch.save({"key": key, "features": feats, "labels": labels}, fh))
    used(entry)
    return feats, labels
