"""One constructor for every bank kind (``bank.kind``)."""

from __future__ import annotations

from pirl.bank.kinds import BANK_KINDS
from pirl.bank.replicated import MemoryBank
from pirl.bank.sharded import ShardedMemoryBank


def build_bank(
    kind: str, num_samples: int, dim: int = 128, momentum: float = 0.5, seed: int = 0, dtype: str = "float32"
) -> MemoryBank:
    """``kind``: "replicated" (every rank holds all N rows) or "sharded" (rank r holds a contiguous N/W block);
    ``dtype``: the rows' storage, "float32" or "float16"."""
    if kind == "sharded":
        return ShardedMemoryBank(num_samples, dim, momentum, seed, dtype=dtype)
    if kind != "replicated":
        raise ValueError(f"unknown bank kind {kind!r}; choose one of {', '.join(BANK_KINDS)}")
    return MemoryBank(num_samples, dim, momentum, seed, dtype)
