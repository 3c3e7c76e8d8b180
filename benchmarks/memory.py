"""Peak memory of one PIRL training step against the trunk alone, and what the bank and negatives take.

Step: each measurement runs in a fresh subprocess (benchmarks/step.py builds the model and batches). On CPU,
tracemalloc does not see torch's allocations, so the process's resident peak is used: the peak is reset after
setup (``/proc/self/clear_refs``, Linux) and ``VmHWM - VmRSS before`` is the step's own peak above what the
model, bank, optimizer and batch already hold (the first step, with the optimizer's momentum buffers, and a
second). Where the reset is refused it falls back to ``ru_maxrss`` deltas, which miss a step peak below the
setup's own. On CUDA: ``torch.cuda.max_memory_allocated`` over the same steps, minus what was allocated before.

Bank and negatives alone (no model): bytes of the N x D bank, of one B x K index draw, of the B x (1 + K)
scores of one loss term (PIRL has two terms, each with its draw and scores, plus their gradients), and of the
dense B x N product the bank uses instead of gathering rows while N <= MemoryBank.dense_ratio x K; measured on
the tensors.

Prints one JSON line per (negatives, what): what = "bank" | "step".

    python benchmarks/memory.py --arch resnet18 --image-size 64 --patch-size 18 --batch 64 --negatives 4096 32000
    python benchmarks/memory.py --arch resnet50 --image-size 224 --patch-size 64 --batch 256 --device cuda \\
        --num-samples 1281167
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import Setting, build_steps  # noqa: E402  (the benchmark next door builds the same steps)

from pirl.bank import MemoryBank  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(setting: Setting, kind: str, steps: int) -> dict:
    """In a fresh process: peak bytes of ``steps`` steps of ``kind`` ("pirl" or "trunk") above the setup."""
    trunk_step, full_step, device = build_steps(setting)
    fn = full_step if kind == "pirl" else trunk_step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            fn()
        torch.cuda.synchronize(device)
        return {
            "peak_step_bytes": torch.cuda.max_memory_allocated(device) - before,
            "setup_bytes": before,
            "how": "torch.cuda.max_memory_allocated",
        }
    rss_before = _status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak()
    for _ in range(steps):
        fn()
    if reset:
        peak_kb, how = _status_kb("VmHWM") - rss_before, "VmHWM after clear_refs"
    else:
        peak_kb, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, "ru_maxrss delta"
    return {"peak_step_bytes": peak_kb * 1024, "setup_bytes": rss_before * 1024, "how": how}


def bank_alone(num_samples: int, dim: int, batch: int, negatives: int, shared: bool) -> dict:
    """Bytes of the bank and of one loss term's negatives, measured on the tensors the bank makes."""
    bank = MemoryBank(num_samples, dim)
    positives = torch.randint(0, num_samples, (batch,))
    draw = bank.sample_negatives(positives, negatives, step=0, term=0, shared=shared)
    emb = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    scores = bank.score(emb, positives, draw)
    dense = not shared and num_samples <= bank.dense_ratio * negatives
    per_term = draw.nbytes + scores.nbytes
    return {
        "bank_bytes": bank.memory.nbytes,
        "index_draw_bytes": draw.nbytes,
        "scores_bytes": scores.nbytes,
        "dense_product_bytes": batch * num_samples * 4 if dense else 0,
        # two terms (image, jigsaw), each with its draw, its scores and their gradient
        "negatives_step_bytes": 2 * (per_term + scores.nbytes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=50000, help="memory bank rows")
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument("--shared", action="store_true", help="one negative set per batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="steps measured per subprocess")
    parser.add_argument("--child", choices=["pirl", "trunk"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    def setting(k: int) -> Setting:
        return Setting(
            args.arch,
            args.stem,
            args.image_size,
            args.patch_size,
            args.batch,
            k,
            args.num_samples,
            args.shared,
            args.device,
        )

    if args.child:
        print(json.dumps(child(setting(args.negatives[0]), args.child, args.steps)), flush=True)
        return
    common = {
        "arch": args.arch,
        "image": args.image_size,
        "patch": args.patch_size,
        "batch": args.batch,
        "bank_rows": args.num_samples,
        "shared_negatives": args.shared,
    }
    for k in args.negatives:
        print(
            json.dumps(
                {
                    "what": "bank",
                    "negatives": k,
                    **common,
                    **bank_alone(args.num_samples, args.embed_dim, args.batch, k, args.shared),
                }
            ),
            flush=True,
        )
        row = {"what": "step", "negatives": k, "device": args.device, **common}
        for kind in ("trunk", "pirl"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", kind, "--negatives", str(k)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
            if done.returncode:
                raise SystemExit(f"{kind} measurement failed:\n{done.stderr[-2000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row[f"{kind}_peak_step_bytes"] = result["peak_step_bytes"]
            row[f"{kind}_setup_bytes"] = result["setup_bytes"]
            row["how"] = result["how"]
        row["ratio"] = round(row["pirl_peak_step_bytes"] / max(row["trunk_peak_step_bytes"], 1), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
