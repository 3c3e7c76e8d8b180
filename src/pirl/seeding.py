"""Seeds derived from integers: every random stream of a run (augmentation, negatives, batched views, the initial
bank) is reseeded from a tuple such as ``(seed, epoch, index)``, so it depends neither on the number of workers or
processes nor on where a run was resumed. No torch here: the data pipeline and the bank both use it.
"""

from __future__ import annotations

import hashlib


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers: different tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
