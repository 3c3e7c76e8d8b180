"""pirl: Pretext-Invariant Representation Learning (Misra & van der Maaten, CVPR 2020) in plain PyTorch.

The public API (imported on first use, so ``import pirl`` stays fast)::

    pirl.load_config(preset, overrides)        -> Config (validated)
    pirl.pretrain(config, data, out, overrides=...) -> PretrainResult
    pirl.export(run, out, format="torchvision" | "timm" | "detectron2")
    pirl.import_vissl(checkpoint, out)          VISSL PIRL/NPID checkpoint -> pirl export
    pirl.load_model(export_or_run)              -> LoadedModel (.trunk: a torchvision ResNet)
    pirl.evaluate.knn / linear / lowshot / finetune(model, data, ...)
    building blocks: PirlViews, ImageHead, JigsawHead, MemoryBank, info_nce, npid_nce, build_trunk, stage_features

See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": "pirl.config",
    "Config": "pirl.config",
    "validate": "pirl.config",
    "pretrain": "pirl.api",
    "PretrainResult": "pirl.api",
    "resolve_config": "pirl.api",
    "export": "pirl.api",
    "load_model": "pirl.api",
    "import_vissl": "pirl.api",
    "PirlError": "pirl.errors",
    "PirlViews": "pirl.data.views",
    "ImageHead": "pirl.models.heads",
    "JigsawHead": "pirl.models.heads",
    "MemoryBank": "pirl.bank",
    "info_nce": "pirl.losses",
    "npid_nce": "pirl.losses",
    "paper_nce": "pirl.losses",
    "build_trunk": "pirl.models.trunk",
    "stage_features": "pirl.models.trunk",
    "feature_dim": "pirl.models.trunk",
    "ArraySource": "pirl.data.sources",
    "open_source": "pirl.data.sources",
}
__all__ = sorted([*_EXPORTS, "evaluate", "__version__"])


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        return importlib.import_module("pirl.evaluate")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pirl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
