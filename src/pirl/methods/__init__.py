"""Methods on a shared base: each is one short file. ``build_method`` picks one from ``cfg.loss.method``."""

from __future__ import annotations

from pirl.config.schema import Config
from pirl.methods.base import Method, StepOutput
from pirl.methods.pirl import NPID, PIRL

METHODS: dict[str, type[Method]] = {"pirl": PIRL, "npid": NPID}


def build_method(cfg: Config, num_samples: int) -> Method:
    return METHODS[cfg.loss.method](cfg, num_samples)


__all__ = ["METHODS", "Method", "NPID", "PIRL", "StepOutput", "build_method"]
