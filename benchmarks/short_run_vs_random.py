"""Does a short CPU run beat the random-init trunk? One PIRL run with config overrides on real CIFAR-10.

Trains the cpu-quick recipe with the given ``key=value`` overrides, then prints one JSON line with the training
time, a leave-one-out 20-NN accuracy of the memory bank itself (labels of the training subset), and the weighted
kNN accuracy (NPID protocol, k=20 and 200) of the trunk's pooled features, fitted on every 5th training image and
scored on every 5th test image; ``--random`` adds the same kNN for the trunk at random init.

    python benchmarks/short_run_vs_random.py --data CIFAR10_JPEG.tar.gz --out runs/sweep/a \\
        --random data.subset=2000 optim.epochs=5 loss.temperature=0.1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from knn_probe import trunk_knn

from pirl.checkpoint import latest_checkpoint, load_checkpoint
from pirl.config import load_config
from pirl.data.sources import open_source
from pirl.eval.models import load_model
from pirl.training import subset_indices, train


def bank_leave_one_out(memory: torch.Tensor, labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    sims = memory @ memory.T
    sims.fill_diagonal_(-2)
    top = sims.topk(k, dim=1)
    votes = torch.zeros(len(memory), int(labels.max()) + 1).scatter_add_(
        1, labels[top.indices], (top.values / temperature).exp()
    )
    return (votes.argmax(1) == labels).float().mean().item()


def every_fifth(length: int) -> range:
    return range(0, length, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--random", action="store_true", help="also evaluate the random-init trunk")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config("cpu-quick", args.overrides)
    start = time.perf_counter()
    train(cfg, args.data, args.out, progress=False)
    seconds = time.perf_counter() - start
    source = open_source(args.data)
    positions = subset_indices(len(source), cfg.data.subset, cfg.train.seed) or list(range(len(source)))
    labels = torch.tensor([source.labels[i] for i in positions])
    memory = load_checkpoint(latest_checkpoint(args.out))["method"]["bank.memory"]
    row = {
        "overrides": args.overrides,
        "train_s": round(seconds),
        "bank_loo_knn20": bank_leave_one_out(memory, labels),
        "knn": trunk_knn(load_model(args.out), args.data, every_fifth, every_fifth),
    }
    if args.random:
        row["knn_random_init"] = trunk_knn(load_model(args.out, random_init=True), args.data, every_fifth, every_fifth)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
