"""The bank's choice lists (no torch here: config loading checks ``loss.bank`` and ``loss.bank_dtype`` against
them)."""

from __future__ import annotations

BANK_KINDS = ("replicated", "sharded")
# storage of the rows; pirl.bank.replicated.BANK_DTYPES maps them to torch dtypes
BANK_DTYPE_NAMES = ("float32", "float16")
