"""Methods on a shared base: each is one short file. ``build_method`` picks one from ``cfg.method.name``.

:data:`METHODS` is the registry: the names ``method.name`` takes, each with its class, which also checks the
``method.*`` keys (``validate``).

PIRL and NPID++ learn against a memory bank (:class:`Method`); the baselines Jigsaw, Rotation (covariant
pretext tasks) and Supervised are classifiers without one (:class:`BaseMethod`).
"""

from __future__ import annotations

from pirl.config.schema import Config
from pirl.methods.base import BaseMethod, Method, StepOutput
from pirl.methods.jigsaw import Jigsaw, hamming_permutations
from pirl.methods.pirl import NPID, PIRL
from pirl.methods.rotation import Rotation
from pirl.methods.supervised import Supervised

METHODS: dict[str, type[BaseMethod]] = {
    "pirl": PIRL,
    "npid": NPID,
    "jigsaw": Jigsaw,
    "rotation": Rotation,
    "supervised": Supervised,
}


def build_method(cfg: Config, num_samples: int, source=None) -> BaseMethod:
    """The method of ``cfg.method.name``; given the training ``source``, a method may read it (Supervised: labels)."""
    cls = METHODS[cfg.method.name]
    return cls(cfg, num_samples) if source is None else cls.from_source(cfg, num_samples, source)


__all__ = [
    "METHODS",
    "BaseMethod",
    "Jigsaw",
    "Method",
    "NPID",
    "PIRL",
    "Rotation",
    "StepOutput",
    "Supervised",
    "build_method",
    "hamming_permutations",
]
