"""The memory bank: one unit vector per training image, an EMA of its image embedding f.

* :mod:`pirl.bank.kinds`: the choice lists (``BANK_KINDS``, ``BANK_DTYPE_NAMES``) and the check of ``bank.*``, no torch.
* :mod:`pirl.bank.scoring`: dense and gathered scoring of embeddings against bank rows.
* :mod:`pirl.bank.replicated`: :class:`MemoryBank`, every process holds all N rows (``bank.kind=replicated``).
* :mod:`pirl.bank.sharded`: :class:`ShardedMemoryBank`, process r holds a contiguous N / W block
  (``bank.kind=sharded``).
* :mod:`pirl.bank.build`: :func:`build_bank`, one constructor for both.

The names are imported on first use, so that ``from pirl.bank import BANK_KINDS`` loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# re-exported (in __all__): these load no torch
from pirl.bank.kinds import BANK_DTYPE_NAMES, BANK_KINDS  # noqa: F401
from pirl.seeding import mix_seed  # noqa: F401

_EXPORTS = {
    "BANK_DTYPES": "pirl.bank.replicated",
    "INIT_BLOCK": "pirl.bank.replicated",
    "MemoryBank": "pirl.bank.replicated",
    "initial_rows": "pirl.bank.replicated",
    "GATHER_PIECE": "pirl.bank.scoring",
    "dense_scores": "pirl.bank.scoring",
    "gathered_scores": "pirl.bank.scoring",
    "ShardedMemoryBank": "pirl.bank.sharded",
    "build_bank": "pirl.bank.build",
}
__all__ = sorted([*_EXPORTS, "BANK_DTYPE_NAMES", "BANK_KINDS", "mix_seed"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pirl.bank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
