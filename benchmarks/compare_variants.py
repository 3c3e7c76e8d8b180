"""Does an option learn as well? Short PIRL runs on real CIFAR-10 that differ only in the given overrides.

Each variant is ``name:key=value,key=value`` on top of the cpu-quick preset (plus ``--common`` overrides), run
for every ``--seeds`` seed; then weighted kNN (k=20 and 200, NPID protocol) of the trunk's pooled features,
fitted on ``--eval-train`` seeded training images and scored on ``--eval-test`` test images, as in
compare_loss_forms.py. Prints one JSON object per run, one for random init, and a summary of means per variant.

    python benchmarks/compare_variants.py --data CIFAR10_JPEG.tar.gz --out runs/negatives \\
        --common data.subset=5000 optim.epochs=6 bank.negatives=1024 --seeds 0 1 \\
        --variants per_sample:bank.share_negatives=false shared:bank.share_negatives=true
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

from compare_loss_forms import knn_of

from pirl.config import load_config
from pirl.training import train


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    return name, [o for o in overrides.split(",") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/variants")
    parser.add_argument("--preset", default="cpu-quick")
    parser.add_argument("--common", nargs="*", default=[], help="overrides shared by every variant")
    parser.add_argument("--variants", nargs="+", required=True, help="name:key=value,key=value ...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-train", type=int, default=10000)
    parser.add_argument("--eval-test", type=int, default=2000)
    args = parser.parse_args()
    runs = []
    for seed in args.seeds:
        for name, overrides in map(parse_variant, args.variants):
            cfg = load_config(args.preset, [*args.common, *overrides, f"train.seed={seed}"])
            run_dir = Path(args.out) / f"{name}-seed{seed}"
            start = time.perf_counter()
            summary = train(cfg, args.data, run_dir, progress=False)
            accs = knn_of(run_dir, args.data, args.eval_train, args.eval_test)
            row = {
                "variant": name,
                "seed": seed,
                "overrides": overrides,
                "final_loss": summary["loss"],
                "knn_k20": accs[20],
                "knn_k200": accs[200],
                "train_s": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(row), flush=True)
            runs.append(row)
    baseline = knn_of(
        Path(args.out) / f"{parse_variant(args.variants[0])[0]}-seed{args.seeds[0]}",
        args.data,
        args.eval_train,
        args.eval_test,
        random_init=True,
    )
    print(json.dumps({"variant": "random_init", "knn_k20": baseline[20], "knn_k200": baseline[200]}), flush=True)
    means = {
        name: {k: round(mean(r[k] for r in runs if r["variant"] == name), 4) for k in ("knn_k20", "knn_k200")}
        for name, _ in map(parse_variant, args.variants)
    }
    print(
        json.dumps(
            {
                "common": args.common,
                "seeds": args.seeds,
                "mean": means,
                "random_init": {"knn_k20": baseline[20], "knn_k200": baseline[200]},
            }
        )
    )


if __name__ == "__main__":
    main()
