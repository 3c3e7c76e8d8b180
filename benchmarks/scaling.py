"""Images/s of ``pirl train`` on 1 process against P processes on CPU (torchrun, gloo), same global batch.

Each run trains on the same synthetic JPEG folder with the same config and global batch; the cores are split
evenly (``train.threads`` and OMP_NUM_THREADS = --cores // P). Throughput comes from the run's own
``metrics.jsonl`` (``images_per_s`` of each logged window), the first window (warm-up) left out; the median
of the rest counts. Prints one JSON line per process count, then one with the ratios to one process.

    python benchmarks/scaling.py --procs 1 2 --images 1024 --batch 64 --epochs 1
    python benchmarks/scaling.py --procs 1 2 --images 64 --batch 16 --set data.image_size=32 data.min_size=32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import synthetic_jpegs  # noqa: E402  (same synthetic images as the data benchmark)


def run(procs: int, data: Path, out: Path, cores: int, args: argparse.Namespace) -> dict:
    threads = max(1, cores // procs)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(procs),
        "-m",
        "pirl",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        args.preset,
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch),
        "data.subset=0",
        f"data.workers={args.workers}",
        f"train.threads={threads}",
        f"train.log_every={args.log_every}",
        *args.set,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(
            f"{procs} process(es) failed (rc {done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r["kind"] == "train"]
    if len(rates) < 2:
        raise SystemExit(f"{procs} process(es): {len(rates)} logged window(s); train longer or log more often")
    return {
        "procs": procs,
        "threads_per_proc": threads,
        "global_batch": args.batch,
        "windows": len(rates) - 1,
        "img_s": round(statistics.median(rates[1:]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="split evenly over the processes")
    parser.add_argument("--images", type=int, default=1024, help="synthetic JPEGs")
    parser.add_argument("--synthetic-size", default="32x32", help="WxH (CIFAR-like by default)")
    parser.add_argument("--preset", default="cpu-quick")
    parser.add_argument("--batch", type=int, default=64, help="global batch, the same for every process count")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="data.workers per process")
    parser.add_argument("--log-every", type=int, default=2, help="steps per measured window")
    parser.add_argument("--set", nargs="*", default=[], help="more section.key=value overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        data.mkdir()
        width, height = (int(v) for v in args.synthetic_size.lower().split("x"))
        synthetic_jpegs(data, args.images, width, height)
        rows = {}
        for procs in args.procs:
            rows[procs] = run(procs, data, Path(tmp) / f"run{procs}", args.cores, args)
            print(json.dumps(rows[procs]), flush=True)
    base = rows.get(1) or rows[min(rows)]
    print(
        json.dumps(
            {
                "ratios_to": base["procs"],
                "img_s_ratio": {p: round(r["img_s"] / base["img_s"], 3) for p, r in rows.items()},
                # the same cores are split among the processes, so perfect scaling keeps the rate
                "ideal": {p: 1.0 for p in rows},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
