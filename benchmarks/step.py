"""Cost of a full PIRL training step against the trunk alone, measured in the same process.

Full step: image and patch batches through the trunk, heads f and g, scores against the memory bank with
per-sample (or shared) negatives, loss, backward, SGD step, bank update. Baseline: the same trunk doing
forward + backward + SGD step on the same image and patch batches (no heads, bank or loss). Both run as the
trainer runs them: channels_last (CPU and CUDA) and, on CUDA, autocast (bf16 where supported, else fp16), unless
turned off.
Prints one JSON line per setting (negatives x shared), with ``ratio`` = full step / trunk alone and
``images_per_s`` (``trunk_images_per_s``): images (each with its 9 patches) per second of the full step (trunk).

    python benchmarks/step.py --arch resnet18 --image-size 64 --patch-size 18 --batch 64 --negatives 4096 32000
    python benchmarks/step.py --num-samples 1281167 --negatives 32000 --dense-ratio 64   # force the dense path
    python benchmarks/step.py --arch resnet50 --image-size 224 --patch-size 64 --batch 256 --device cuda \\
        --num-samples 1281167 --negatives 4096 32000 --shared off on
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pirl.bank import BANK_DTYPES, MemoryBank
from pirl.config import load_config
from pirl.device import autocast
from pirl.methods import build_method
from pirl.training.step import TrainStep


@dataclass
class Setting:
    arch: str = "resnet18"
    stem: str = "imagenet"
    image: int = 64
    patch: int = 18
    batch: int = 64
    negatives: int = 4096
    num_samples: int = 50000
    shared: bool = False
    device: str = "cpu"
    amp: bool = True  # CUDA only, as train.amp
    channels_last: bool = True  # as train.channels_last (CPU and CUDA)
    bank_dtype: str = "float32"  # as bank.dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_steps(s: Setting) -> tuple[Callable[[], None], Callable[[], None], torch.device]:
    """(trunk-alone step, full PIRL step, device): closures over one method, batch and two optimizers."""
    device = torch.device(s.device)
    cfg = load_config(
        None,
        [
            f"model.arch={s.arch}",
            f"model.stem={s.stem}",
            f"data.image_size={s.image}",
            f"data.patch_size={s.patch}",
            f"data.jigsaw_crop={3 * s.patch + 3}",
            f"bank.negatives={s.negatives}",
            f"bank.share_negatives={s.shared}",
            f"bank.dtype={s.bank_dtype}",
        ],
    )
    torch.manual_seed(0)
    method = build_method(cfg, s.num_samples).to(device)
    images = torch.randn(s.batch, 3, s.image, s.image, device=device)
    patches = torch.randn(s.batch, 9, 3, s.patch, s.patch, device=device)
    if s.channels_last:  # as the trainer: the encoder and the image batches
        method.encoder.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {"image": images, "patches": patches, "index": torch.randint(0, s.num_samples, (s.batch,), device=device)}
    trunk = method.encoder.trunk
    trunk_opt = torch.optim.SGD(trunk.parameters(), lr=1e-3, momentum=0.9)
    full_opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=1e-3, momentum=0.9)
    # the trainer's step body (autocast, loss scaling, agreement flags, optimizer step, bank update)
    pirl_step = TrainStep(method, full_opt, device, amp=s.amp, channels_last=s.channels_last)
    scaler = pirl_step.scaler  # the baseline's: the same autocast dtype and loss scaling
    flat_patches = patches.flatten(0, 1)

    def trunk_step() -> None:
        with autocast(device, pirl_step.dtype):
            loss = trunk(flat_patches).float().sum() + trunk(images).float().sum()
        trunk_opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(trunk_opt)
        scaler.update()

    step = [0]

    def full_step() -> None:
        pirl_step.run(batch, step[0])
        step[0] += 1

    return trunk_step, full_step, device


def _time(fn: Callable[[], None], steps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def measure(s: Setting, steps: int, rounds: int = 3) -> dict:
    trunk_step, full_step, device = build_steps(s)
    # interleave the two so that machine noise hits both alike; keep the best of each
    trunk_s, full_s = [], []
    for _ in range(rounds):
        trunk_s.append(_time(trunk_step, steps, device))
        full_s.append(_time(full_step, steps, device))
    t, f = min(trunk_s), min(full_s)
    cuda = device.type == "cuda"
    return {
        "arch": s.arch,
        "stem": s.stem,
        "image": s.image,
        "patch": s.patch,
        "batch": s.batch,
        "negatives": s.negatives,
        "bank_rows": s.num_samples,
        "shared_negatives": s.shared,
        "bank_dtype": s.bank_dtype,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "amp": cuda and s.amp,
        "channels_last": s.channels_last,
        "trunk_s": round(t, 4),
        "pirl_step_s": round(f, 4),
        "ratio": round(f / t, 3),
        "images_per_s": round(s.batch / f, 1),
        "trunk_images_per_s": round(s.batch / t, 1),
        "dense_ratio": MemoryBank.dense_ratio,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", help="resnet18, resnet50, ...")
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--image-size", type=int, default=64, help="paper: 224")
    parser.add_argument("--patch-size", type=int, default=18, help="paper: 64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=50000, help="memory bank rows")
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 32000])
    parser.add_argument(
        "--shared",
        nargs="*",
        choices=["off", "on"],
        default=["off"],
        help="one negative set per batch: off, on, or both (--shared off on); a bare --shared means on",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-amp", action="store_true", help="CUDA: no autocast")
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW")
    parser.add_argument(
        "--dense-ratio",
        type=float,
        help="score densely while bank rows <= this x negatives (default: pirl.bank.MemoryBank.dense_ratio)",
    )
    parser.add_argument("--bank-dtype", default="float32", choices=list(BANK_DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round counts")
    parser.add_argument("--repeats", type=int, dest="rounds", help="alias of --rounds")
    args = parser.parse_args()
    if args.dense_ratio is not None:
        MemoryBank.dense_ratio = args.dense_ratio
    for shared in args.shared or ["on"]:
        for k in args.negatives:
            s = Setting(
                args.arch,
                args.stem,
                args.image_size,
                args.patch_size,
                args.batch,
                k,
                args.num_samples,
                shared == "on",
                args.device,
                not args.no_amp,
                not args.no_channels_last,
                args.bank_dtype,
            )
            print(json.dumps(measure(s, args.steps, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
