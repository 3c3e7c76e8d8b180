"""Load a trained trunk for evaluation from a run directory, a checkpoint or an export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pirl.checkpoint import load_export, open_checkpoint, trunk_state_dict
from pirl.data.indexed import SourceImages
from pirl.errors import PirlError
from pirl.models.trunk import build_trunk


@dataclass
class LoadedModel:
    trunk: nn.Module
    arch: str
    stem: str
    input_size: int
    mean: list[float]
    std: list[float]
    identity: str  # changes whenever the weights change: keys the feature cache

    def describe(self) -> dict[str, Any]:
        return {"arch": self.arch, "stem": self.stem, "input_size": self.input_size}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def load_model(spec: str | Path, *, random_init: bool = False, seed: int = 0) -> LoadedModel:
    """The trunk of an export directory, a run directory (latest checkpoint), a checkpoint file or
    ``torchvision:<weights enum>`` (e.g. ``torchvision:ResNet50_Weights.IMAGENET1K_V2``).

    With ``random_init`` the same architecture is returned freshly initialised from ``seed``: the baseline
    that every evaluation compares against.
    """
    path = Path(spec)
    if str(spec).startswith("torchvision:"):  # a reference point: torchvision's supervised ImageNet weights
        from pirl.interop import IMAGENET_MEAN, IMAGENET_STD, torchvision_state_dict, torchvision_weights

        arch, weights = torchvision_state_dict(str(spec))
        trunk = build_trunk(arch, "imagenet")
        trunk.load_state_dict(weights)
        stem, size, mean, std = "imagenet", 224, IMAGENET_MEAN, IMAGENET_STD
        cached = Path(torch.hub.get_dir()) / "checkpoints" / torchvision_weights(str(spec))[1].url.rsplit("/", 1)[-1]
        identity = _file_digest(cached) if cached.is_file() else str(spec)
    elif (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        trunk, meta = load_export(path)
        arch, stem, size, mean, std = meta["arch"], meta["stem"], meta["input_size"], meta["mean"], meta["std"]
        identity = _file_digest(path / "model.safetensors")
    elif path.exists():
        ckpt_path, ckpt = open_checkpoint(path)
        cfg = ckpt["config"]
        arch, stem = cfg["model"]["arch"], cfg["model"]["stem"]
        size, mean, std = cfg["data"]["image_size"], cfg["data"]["mean"], cfg["data"]["std"]
        trunk = build_trunk(arch, stem)
        try:
            trunk.load_state_dict(trunk_state_dict(ckpt))
        except RuntimeError as err:  # missing, unexpected or mis-shaped trunk weights
            reason = str(err).strip().splitlines()[0][:200]
            raise PirlError(f"{ckpt_path}: its trunk weights do not fit {arch} ({reason})") from None
        identity = _file_digest(ckpt_path)
    else:
        raise PirlError(f"model not found: {spec} (expected an export, a run directory or a checkpoint)")
    if random_init:
        torch.manual_seed(seed)
        trunk = build_trunk(arch, stem)
        identity = f"random-{arch}-{stem}-{seed}"
    return LoadedModel(trunk.eval(), arch, stem, int(size), list(mean), list(std), identity)


#: (transformed image, label) pairs of an image source (all of it); undecodable images raise a one-line error.
LabeledImages = SourceImages
