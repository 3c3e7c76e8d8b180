"""Where dense scoring beats gathered rows: one loss term against the memory bank, both ways, in one process.

``pirl.bank.MemoryBank.score`` scores B embeddings against K per-sample negatives either densely (one B x N
product, then the K columns of each row are picked) or from the B x K gathered rows (``pirl.bank.gathered_scores``:
copied piece by piece into a reused buffer, backward as one ``embedding_bag``); it picks dense while
N <= ``MemoryBank.dense_ratio`` x K. This times forward + backward (logsumexp of the scores) of one
term each way, forcing the path, and prints one JSON line per K with both times and N / K, the quantity the
threshold is set against.

    python benchmarks/bank_scoring.py --num-samples 1281167 --batch 64 --negatives 4096 32000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from pirl.bank import MemoryBank


def term_seconds(bank: MemoryBank, batch: int, negatives: torch.Tensor, dense: bool, repeats: int) -> float:
    """Best time of one term's scoring, forward and backward, on the forced path."""
    bank.dense_ratio = float("inf") if dense else 0.0
    positives = torch.randint(0, bank.num_samples, (batch,))
    best = float("inf")
    for i in range(repeats + 1):  # the first run warms up
        emb = torch.nn.functional.normalize(torch.randn(batch, bank.dim), dim=1).requires_grad_()
        start = time.perf_counter()
        bank.score(emb, positives, negatives).logsumexp(1).sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1281167, help="bank rows N")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("K", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a single measurement, in a process of its own
        torch.manual_seed(0)
        bank = MemoryBank(args.num_samples)
        negatives = torch.randint(0, args.num_samples, (args.batch, int(args.one[0])))
        print(term_seconds(bank, args.batch, negatives, args.one[1] == "dense", args.repeats))
        return
    for k in args.negatives:
        # each path in a fresh process: the dense path's huge temporaries change the heap a later run sees
        seconds = {
            path: float(
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--num-samples",
                        str(args.num_samples),
                        "--batch",
                        str(args.batch),
                        "--repeats",
                        str(args.repeats),
                        "--one",
                        str(k),
                        path,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.split()[-1]
            )
            for path in ("gathered", "dense")
        }
        print(
            json.dumps(
                {
                    "bank_rows": args.num_samples,
                    "batch": args.batch,
                    "negatives": k,
                    "rows_per_negative": round(args.num_samples / k, 1),
                    "dense_s": round(seconds["dense"], 4),
                    "gathered_s": round(seconds["gathered"], 4),
                    "dense_faster": seconds["dense"] < seconds["gathered"],
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
