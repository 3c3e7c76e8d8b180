"""Cost of a full PIRL training step against the trunk alone, measured in the same process.

Full step: image and patch batches through the trunk, heads f and g, scores against the memory bank with
per-sample negatives, loss, backward, SGD step, bank update. Baseline: the same trunk doing forward + backward +
SGD step on the same image and patch batches (no heads, bank or loss). Prints one JSON line per setting.

    python benchmarks/step.py --arch resnet18 --image-size 64 --patch-size 18 --batch 64 --negatives 4096 32000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pirl.config import load_config
from pirl.methods import build_method


def _time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(arch: str, stem: str, image: int, patch: int, batch: int, negatives: int, num_samples: int,
            steps: int, shared: bool) -> dict:
    crop = patch * 3 + 3
    cfg = load_config(None, [f"model.arch={arch}", f"model.stem={stem}", f"data.image_size={image}",
                             f"data.patch_size={patch}", f"data.jigsaw_crop={max(crop, 3 * patch)}",
                             f"loss.negatives={negatives}", f"loss.share_negatives={shared}"])
    torch.manual_seed(0)
    method = build_method(cfg, num_samples)
    images, patches = torch.randn(batch, 3, image, image), torch.randn(batch, 9, 3, patch, patch)
    batch_dict = {"image": images, "patches": patches, "index": torch.randint(0, num_samples, (batch,))}
    trunk = method.encoder.trunk
    trunk_opt = torch.optim.SGD(trunk.parameters(), lr=1e-3, momentum=0.9)
    full_opt = torch.optim.SGD(method.parameter_groups(1e-4), lr=1e-3, momentum=0.9)
    flat_patches = patches.flatten(0, 1)

    def trunk_step() -> None:
        loss = trunk(flat_patches).sum() + trunk(images).sum()
        trunk_opt.zero_grad(set_to_none=True)
        loss.backward()
        trunk_opt.step()

    step = [0]

    def full_step() -> None:
        out = method.training_step(batch_dict, step[0])
        full_opt.zero_grad(set_to_none=True)
        out.loss.backward()
        full_opt.step()
        method.after_step(out)
        step[0] += 1

    # interleave the two so that machine noise hits both alike
    trunk_s, full_s = [], []
    for _ in range(3):
        trunk_s.append(_time(trunk_step, steps))
        full_s.append(_time(full_step, steps))
    t, f = min(trunk_s), min(full_s)
    return {"arch": arch, "stem": stem, "image": image, "patch": patch, "batch": batch, "negatives": negatives,
            "bank_rows": num_samples, "shared_negatives": shared, "trunk_s": round(t, 4), "pirl_step_s": round(f, 4),
            "ratio": round(f / t, 3), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--stem", default="imagenet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=18)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=50000, help="memory bank rows")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shared", action="store_true", help="one negative set per batch")
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 32000])
    args = parser.parse_args()
    for k in args.negatives:
        print(json.dumps(measure(args.arch, args.stem, args.image_size, args.patch_size, args.batch, k,
                                 args.num_samples, args.steps, args.shared)), flush=True)


if __name__ == "__main__":
    main()
