"""The trunk choices (no torch here: config loading checks ``model.arch`` and ``model.stem`` against them)."""

from __future__ import annotations

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")
STEMS = ("imagenet", "cifar")
STAGES = ("conv1", "res2", "res3", "res4", "res5")
TIMM_PREFIX = "timm:"


def is_timm_arch(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX)
