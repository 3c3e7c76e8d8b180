"""The CIFAR-10 results table: PIRL, NPID++, Jigsaw, Rotation, supervised and random init, same
architecture, same CPU budget, kNN and linear probes (res5 and the best layer), plus the HTML report.

Every method starts from the cpu-quick preset plus the given overrides (the recorded table: ResNet-18 at
32 px, ``data.min_size=0 data.image_size=32 data.jigsaw_crop=30 data.patch_size=9``, the first cpu-quick). A
short calibration run measures each method's images/s; its epochs are then set so that its training takes about
``--budget-s`` seconds, so every method gets the same CPU time rather than the same number of epochs (Jigsaw,
Rotation and PIRL cost more per image than NPID++ and supervised). Then, with the same commands a user would run:

    pirl eval knn    --model RUN --data EVAL/train --val-data EVAL/test --out RUN/eval
    pirl eval linear --model RUN --data EVAL/train --val-data EVAL/test --out RUN/eval --stage all

where EVAL holds every ``--eval-train-every``-th CIFAR-10 training image and all 10,000 test images (symlinks).
Writes ``--json`` (docs/results/cifar10-equal-time.json) and ``--html`` (via ``pirl report``).

    python benchmarks/cifar10_table.py --data CIFAR10_JPEG.tar.gz --out runs/table \\
        --budget-s 300 --json docs/results/cifar10-equal-time.json --html docs/results/cifar10-equal-time.html \\
        data.min_size=0 data.image_size=32 data.jigsaw_crop=30 data.patch_size=9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pirl.data.archive import extract_archive, is_archive_path

METHODS = {
    "pirl": [],
    "npid": ["method.name=npid"],
    "jigsaw": ["method.name=jigsaw"],
    "rotation": ["method.name=rotation"],
    "supervised": ["method.name=supervised"],
}
PIRL = [sys.executable, "-m", "pirl"]


def run(cmd: list[str], log: Path) -> str:
    """Run a pirl command, keep its output in ``log``, return the last line (the JSON summary)."""
    print("+", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def images_per_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r.get("kind") == "train"][1:]  # the first window warms up
    return statistics.median(rates)


def eval_folder(data: str, out: Path, every: int) -> Path:
    """EVAL/train (every ``every``-th training image of each class) and EVAL/test (all), as symlinks."""
    root = extract_archive(data) if is_archive_path(data) else Path(data)
    dest = out / "eval-data"
    if dest.exists():
        return dest
    for split, step in (("train", every), ("test", 1)):
        for class_dir in sorted((root / split).iterdir()):
            target = dest / split / class_dir.name
            target.mkdir(parents=True)
            for name in sorted(os.listdir(class_dir))[::step]:
                (target / name).symlink_to((class_dir / name).resolve())
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10 ImageFolder tree (train/, test/) or its archive")
    parser.add_argument("--out", required=True, help="directory for the runs")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training seconds per method")
    parser.add_argument("--eval-train-every", type=int, default=5)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--json", default="docs/results/cifar10-equal-time.json")
    parser.add_argument("--html", default="docs/results/cifar10-equal-time.html")
    parser.add_argument("overrides", nargs="*", help="config overrides for every method")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    evaldata = eval_folder(args.data, out, args.eval_train_every)
    base = [*PIRL, "train", "--data", args.data, "--preset", "cpu-quick", *args.overrides]
    rows, run_dirs = [], []
    for method in args.methods:
        calib = out / f"{method}-calibration"
        subprocess.run(["rm", "-rf", str(calib)], check=True)
        run(
            [
                *base,
                "--out",
                str(calib),
                *METHODS[method],
                "optim.epochs=1",
                "data.subset=1536",
                "train.knn_every=0",
                "bank.init=random",
                "train.log_every=2",
            ],
            out / f"{method}-calibration.log",
        )
        rate = images_per_s(calib)
        subset = 10000
        epochs = max(1, round(args.budget_s * rate / subset))
        run_dir = out / method
        start = time.perf_counter()
        if not (run_dir / "config.json").exists():
            run(
                [
                    *base,
                    "--out",
                    str(run_dir),
                    *METHODS[method],
                    f"data.subset={subset}",
                    f"optim.epochs={epochs}",
                    "train.knn_max_images=1000",
                ],
                out / f"{method}.log",
            )
        seconds = time.perf_counter() - start
        rows.append(
            evaluate(method, str(run_dir), evaldata, random_init=False)
            | {"epochs": epochs, "calibrated_images_per_s": round(rate, 1), "train_s": round(seconds)}
        )
        run_dirs.append(str(run_dir))
        if method == args.methods[0]:
            rows.append(evaluate("random", str(run_dir), evaldata, random_init=True))
    protocol = {
        "data": "CIFAR-10 (a JPEG ImageFolder archive)",
        "trunk": "torchvision resnet18, ImageNet stem: the cpu-quick preset with the overrides below",
        "pretraining": f"a 10,000-image training subset; epochs chosen per method for about {args.budget_s:.0f} s of "
        "training on this machine (calibrated images/s x budget / subset)",
        "eval_train_images": f"every {args.eval_train_every}-th CIFAR-10 training image",
        "eval_test_images": "all 10,000 CIFAR-10 test images",
        "knn": "weighted kNN (NPID): cosine, k=200, T=0.07, on pooled res5 features",
        "linear": "L-BFGS multinomial logistic regression on standardised frozen features, weight decay chosen on "
        "10% of the training images; 'linear' = pooled res5, 'linear_best' = best of conv1, res2-res5 "
        "(pooled to ~9k dims, Goyal et al. 2019) and pooled res5",
        "command": "python benchmarks/cifar10_table.py " + " ".join(sys.argv[1:]),
        "overrides": args.overrides,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"protocol": protocol, "runs": rows}, indent=2) + "\n")
    run(
        [*PIRL, "report", *run_dirs, "--out", args.html, "--title", "pirl: CIFAR-10, same CPU budget per method"],
        out / "report.log",
    )
    for row in rows:
        print(json.dumps(row), flush=True)


def evaluate(method: str, run_dir: str, evaldata: Path, *, random_init: bool) -> dict:
    extra = ["--random-init"] if random_init else []
    common = [
        "--model",
        run_dir,
        "--data",
        str(evaldata / "train"),
        "--val-data",
        str(evaldata / "test"),
        "--out",
        str(Path(run_dir) / "eval"),
        "--workers",
        "1",
        *extra,
    ]
    logs = Path(run_dir) / "eval"
    logs.mkdir(parents=True, exist_ok=True)
    knn = json.loads(run([*PIRL, "eval", "knn", *common], logs / f"knn-{method}.log"))
    linear = json.loads(run([*PIRL, "eval", "linear", *common, "--stage", "all"], logs / f"linear-{method}.log"))
    by_stage = linear["top1_by_stage"]
    return {
        "method": method,
        "knn": knn["top1"],
        "knn_k20": knn["top1_k20"],
        "linear": by_stage["pool"],
        "linear_best": linear["top1"],
        "best_stage": linear["best_stage"],
        "linear_by_stage": by_stage,
    }


if __name__ == "__main__":
    main()
