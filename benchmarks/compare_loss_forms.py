"""Which loss form learns best? Short PIRL runs on real CIFAR-10 that differ only in ``loss.form``.

Each run: the cpu-quick recipe on a seeded subset of the training images; then weighted kNN (k=20 and 200,
NPID protocol) of the trunk's pooled features, fitted on ``--eval-train`` training images and scored on
``--eval-test`` test images. Prints one JSON object per form and a final summary line.

    python benchmarks/compare_loss_forms.py --data CIFAR10_JPEG.tar.gz --out runs/loss-forms
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from knn_probe import trunk_knn

from pirl.config import load_config
from pirl.eval.models import load_model
from pirl.training import subset_indices, train


def knn_of(run_dir: Path, data: str, n_train: int, n_test: int, random_init: bool = False) -> dict[int, float]:
    """kNN on seeded random subsets of n_train training and n_test test images."""

    def seeded(n: int):
        return lambda length: subset_indices(length, n, 123) or range(length)

    return trunk_knn(load_model(run_dir, random_init=random_init), data, seeded(n_train), seeded(n_test))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/loss-forms")
    parser.add_argument("--forms", default="infonce,npid_nce,paper_nce")
    parser.add_argument("--subset", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-train", type=int, default=10000)
    parser.add_argument("--eval-test", type=int, default=2000)
    args = parser.parse_args()
    results = []
    for form in args.forms.split(","):
        cfg = load_config(
            "cpu-quick", [f"loss.form={form}", f"data.subset={args.subset}", f"optim.epochs={args.epochs}"]
        )
        run_dir = Path(args.out) / form
        start = time.perf_counter()
        summary = train(cfg, args.data, run_dir, progress=False)
        accs = knn_of(run_dir, args.data, args.eval_train, args.eval_test)
        row = {
            "form": form,
            "final_loss": summary["loss"],
            "knn_k20": accs[20],
            "knn_k200": accs[200],
            "train_s": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    baseline = knn_of(Path(args.out) / results[0]["form"], args.data, args.eval_train, args.eval_test, random_init=True)
    print(json.dumps({"form": "random_init", "knn_k20": baseline[20], "knn_k200": baseline[200]}), flush=True)
    best = max(results, key=lambda r: r["knn_k200"])
    print(
        json.dumps(
            {
                "best": best["form"],
                "subset": args.subset,
                "epochs": args.epochs,
                "random_init_knn_k200": baseline[200],
                "runs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
