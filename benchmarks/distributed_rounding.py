"""Is a 1-process / 2-process difference rounding? The recipe of tests/integration/test_distributed.py, with the
paper's plain heads and with cpu-quick's ``model.head_bn=true``: 2 processes (torchrun, gloo, sync_bn) against 1,
and, as the yardstick of pure rounding, 1 process with 1 thread against 1 process with 2 threads (another summation
order). Prints one JSON line per (heads, comparison): the relative loss difference per step and the largest
bank difference.

    python benchmarks/distributed_rounding.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]
from test_distributed import OPTS, _losses, _state  # noqa: E402

from helpers import tiny_config  # noqa: E402
from pirl.training import setup_distributed, train  # noqa: E402


def options(head_bn: str, *extra: str) -> list[str]:
    return [*(o for o in OPTS if not o.startswith("model.head_bn")), f"model.head_bn={head_bn}", *extra]


def compare(a: Path, b: Path) -> dict:
    la, lb = np.array(_losses(a)), np.array(_losses(b))
    bank = (_state(a)["bank.memory"] - _state(b)["bank.memory"]).abs().max().item()
    return {
        "loss_rel_diff_per_step": [float(f"{d:.2g}") for d in np.abs(la - lb) / np.abs(la)],
        "bank_max_abs_diff": round(bank, 4),
    }


def main() -> None:
    if "RANK" in os.environ:  # under torchrun: the 2-process runs
        setup_distributed("cpu")
        work = Path(sys.argv[1])
        for head_bn in ("false", "true"):
            train(tiny_config(*options(head_bn)), str(work / "images"), work / f"two-{head_bn}", progress=False)
        return
    work = Path(tempfile.mkdtemp())
    (work / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(work / "images" / f"{i:02d}.png")
    for head_bn in ("false", "true"):
        for threads in (1, 2):
            train(
                tiny_config(*options(head_bn, f"train.threads={threads}")),
                str(work / "images"),
                work / f"one-{head_bn}-t{threads}",
                progress=False,
            )
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(work)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for head_bn in ("false", "true"):
        print(
            json.dumps(
                {
                    "head_bn": head_bn == "true",
                    "compare": "2 processes vs 1",
                    **compare(work / f"one-{head_bn}-t1", work / f"two-{head_bn}"),
                }
            ),
            flush=True,
        )
        print(
            json.dumps(
                {
                    "head_bn": head_bn == "true",
                    "compare": "1 process, 1 thread vs 2",
                    **compare(work / f"one-{head_bn}-t1", work / f"one-{head_bn}-t2"),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
