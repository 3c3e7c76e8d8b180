"""Fault benchmark: kill a small training at random points, resume it, and check it ends bit-identical.

    python benchmarks/faults.py --kills 20 [--sigterms 3] [--write-kills 3] [--seed 0]

Three series, each against one uninterrupted run of the same recipe (ResNet-18 at 16 px on 32 synthetic
images, 2 epochs of 4 steps, a checkpoint every 2 steps):

* SIGKILL at a random step (and a random moment within it), then ``pirl train --resume``;
* SIGTERM at a random step: the run must save, exit 143 (0 if it had already finished), and resume;
* SIGKILL while a checkpoint is being written (a ``.checkpoint-*.tmp`` file exists).

A resumed run is identical when every tensor of its final checkpoint (model, bank, optimizer)
and every logged loss equal the uninterrupted run's bit for bit. The last line is one JSON object,
``{"kills": N, "identical": M, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pirl.checkpoint import latest_checkpoint, load_checkpoint

RECIPE = [
    "data.image_size=16",
    "data.jigsaw_crop=15",
    "data.patch_size=4",
    "data.min_size=0",
    "data.augment=light",
    "data.workers=0",
    "data.image_scale=[0.5,1.0]",
    "model.arch=resnet18",
    "model.embed_dim=16",
    "bank.negatives=16",
    "optim.batch_size=8",
    "optim.epochs=2",
    "optim.warmup_epochs=0",
    "train.log_every=1",
    "train.seed=0",
    "train.threads=1",
    "train.checkpoint_every_steps=2",
    "train.knn_every=0",
]
IMAGES, STEPS = 32, 8


def _images(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def _start(data: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen(
        [sys.executable, "-m", "pirl", "train", "--data", str(data), "--out", str(run), *extra, *RECIPE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            steps.append(record["global_step"])
    return max(steps)


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["global_step"], r["loss"]) for r in records if r["kind"] == "train"]


def _flat(state, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    if isinstance(state, dict):
        for key, value in state.items():
            out.update(_flat(value, f"{prefix}{key}/"))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            out.update(_flat(value, f"{prefix}{i}/"))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state
    else:
        out[prefix] = torch.tensor(float(state)) if isinstance(state, (int, float)) else state
    return out


def _identical(run: Path, reference: Path) -> bool:
    got, want = (load_checkpoint(latest_checkpoint(r)) for r in (run, reference))
    # The model, bank, optimizer and step; not the generator state saved with the last checkpoint, which a
    # resumed run reaches by another path (the DataLoader draws a seed per epoch iteration) and nothing reads.
    keys = ("method", "optimizer", "global_step", "epoch", "step")
    a, b = _flat({k: got[k] for k in keys}), _flat({k: want[k] for k in keys})
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype):
                return False
            if x.is_floating_point():  # bit for bit, NaN equal to NaN (log_z stays NaN under InfoNCE)
                if not (torch.equal(x.isnan(), y.isnan()) and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))):
                    return False
            elif not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return _losses(run) == _losses(reference)


def _resume(data: Path, run: Path) -> int:
    return _start(data, run, "--resume").wait()


def _until(proc: subprocess.Popen, ready, poll_s: float = 0.002) -> bool:
    while not ready():
        if proc.poll() is not None:
            return False
        time.sleep(poll_s)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sigterms", type=int, default=3)
    parser.add_argument("--write-kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pirl-faults-"))
    try:
        data = _images(work / "images")
        reference = work / "reference"
        start = time.perf_counter()
        assert _start(data, reference).wait() == 0, "the uninterrupted run failed"
        print(f"uninterrupted run: {time.perf_counter() - start:.1f} s", flush=True)

        identical = 0
        for i in range(args.kills):
            run, at, delay = work / f"kill{i}", rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.3)
            proc = _start(data, run)
            _until(proc, lambda run=run, at=at: _logged_step(run) >= at)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            before = _logged_step(run)
            rc = _resume(data, run)
            same = rc == 0 and _identical(run, reference)
            identical += same
            print(f"SIGKILL {i + 1}: after logged step {before}, resume rc {rc}, identical {same}", flush=True)
            shutil.rmtree(run)

        term = {"runs": args.sigterms, "exit_143": 0, "identical": 0}
        for i in range(args.sigterms):
            run, at = work / f"term{i}", rng.randint(1, STEPS - 1)
            proc = _start(data, run)
            _until(proc, lambda run=run, at=at: _logged_step(run) >= at)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait()
            term["exit_143"] += rc == 143
            rc2 = _resume(data, run)
            same = rc in (0, 143) and rc2 == 0 and _identical(run, reference)
            term["identical"] += same
            print(f"SIGTERM {i + 1}: exit {rc}, resume rc {rc2}, identical {same}", flush=True)
            shutil.rmtree(run)

        writes = {"runs": args.write_kills, "caught_in_write": 0, "identical": 0}
        for i in range(args.write_kills):
            run, after = work / f"write{i}", rng.randint(0, STEPS - 2)
            proc = _start(data, run)
            in_write = lambda run=run, after=after: (  # noqa: E731
                _logged_step(run) >= after and any(run.glob(".checkpoint-*.tmp"))
            )
            caught = _until(proc, in_write, poll_s=0.0005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            writes["caught_in_write"] += caught
            rc = _resume(data, run)
            same = rc == 0 and _identical(run, reference)
            writes["identical"] += same
            print(f"kill in write {i + 1}: caught {caught}, resume rc {rc}, identical {same}", flush=True)
            shutil.rmtree(run)
        print(
            json.dumps(
                {
                    "kills": args.kills,
                    "identical": identical,
                    "sigterm": term,
                    "write_kills": writes,
                    "seconds": round(time.perf_counter() - start),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
