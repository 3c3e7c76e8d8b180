"""The bank's choice lists and the check of its config keys (no torch here: config loading runs it)."""

from __future__ import annotations

from typing import Any

from pirl.config.checks import check, choice

BANK_KINDS = ("replicated", "sharded")
# storage of the rows; pirl.bank.replicated.BANK_DTYPES maps them to torch dtypes
BANK_DTYPE_NAMES = ("float32", "float16")
BANK_INITS = ("random", "features")


def validate(cfg: Any) -> None:
    """The bank's keys (``bank.*``); config loading calls this."""
    b = cfg.bank
    choice("bank.kind", b.kind, BANK_KINDS)
    choice("bank.dtype", b.dtype, BANK_DTYPE_NAMES)
    choice("bank.init", b.init, BANK_INITS)
    check(b.negatives >= 1, "bank.negatives", b.negatives, "must be at least 1")
    check(0 <= b.momentum < 1, "bank.momentum", b.momentum, "must be in [0, 1)")
