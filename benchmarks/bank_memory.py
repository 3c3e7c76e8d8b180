"""Memory-bank size per GPU, replicated against sharded (``bank.kind``): plain arithmetic, nothing is allocated.

Replicated: every process holds N x D rows. Sharded: process r holds rows r N / W to (r + 1) N / W, at most
ceil(N / W) of them. Each row is stored as ``bank.dtype`` (float32, or float16 at half the bytes; the
element sizes come from :data:`pirl.bank.BANK_DTYPES`). Also prints what sharding costs instead: the bytes each
process sends per step to fetch its scores from the owners (one int64 request and a float32 score each way per
pair, two loss terms).

    python benchmarks/bank_memory.py
    python benchmarks/bank_memory.py --images 1281167 --dim 128 --worlds 8 64 512 --batch 32 --negatives 32000
"""

from __future__ import annotations

import argparse
import math

import torch

from pirl.bank import BANK_DTYPES

FP32 = 4


def itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=BANK_DTYPES[dtype]).element_size()


def bank_bytes(num_images: int, dim: int, world: int = 1, sharded: bool = False, dtype: str = "float32") -> int:
    """Bytes of bank rows on the most loaded process."""
    rows = math.ceil(num_images / world) if sharded else num_images
    return rows * dim * itemsize(dtype)


def fetch_bytes_per_step(batch_per_gpu: int, negatives: int, terms: int = 2) -> int:
    """Bytes one process sends per step to score against a sharded bank: 8 (request) + 4 (score) + 4 (gradient)
    per (sample, row) pair, for the positive and K negatives of each sample and each loss term. The all-gather
    of embeddings and the update (W B D floats) are the same as with the replicated bank."""
    return terms * batch_per_gpu * (1 + negatives) * (8 + FP32 + FP32)


def human(num_bytes: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), three significant figures."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.3g} {unit}"
    return f"{num_bytes:.0f} B"


def table(images: list[int], dim: int, worlds: list[int], dtypes: list[str]) -> str:
    head = ["images N", "bank_dtype", "replicated (any W)", *[f"sharded W={w}" for w in worlds]]
    rows = [head, ["---"] * len(head)]
    for n in images:
        for dtype in dtypes:
            rows.append(
                [
                    f"{n:,}",
                    dtype,
                    human(bank_bytes(n, dim, dtype=dtype)),
                    *[human(bank_bytes(n, dim, w, True, dtype)) for w in worlds],
                ]
            )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1_281_167, 10_000_000, 100_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch", type=int, default=32, help="images per GPU (the paper: 32 x 32 GPUs)")
    parser.add_argument("--negatives", type=int, default=32000)
    parser.add_argument("--dtypes", nargs="+", default=list(BANK_DTYPES), choices=list(BANK_DTYPES))
    args = parser.parse_args()
    print(f"Bank memory per GPU, {args.dim}-d rows:\n")
    print(table(args.images, args.dim, args.worlds, args.dtypes))
    print(
        f"\nSharding's price: each process sends about {human(fetch_bytes_per_step(args.batch, args.negatives))} "
        f"per step to fetch its scores (B={args.batch} per GPU, K={args.negatives:,}, two loss terms), "
        f"whatever N and W."
    )


if __name__ == "__main__":
    main()
