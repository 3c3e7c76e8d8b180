"""Images/s per DataLoader worker of the PIRL data pipeline against decode + resize alone, in one process.

Full pipeline: decode the file, then pirl.data.views.PirlViews (image view, jigsaw view with 9 independently
augmented patches), as a worker runs it (one torch thread). Baseline: decode + resize to a fixed size, which is
all a worker does with ``data.batched_views`` (pirl.data.batched.DecodeResize). Settings: ``32px`` (32 px
image, 30 px puzzle, 9 px patches, light augmentation: the first cpu-quick), ``cpu-quick`` (the preset as it
is: 64 px image, 63 px puzzle, 20 px patches, light augmentation), ``64px`` (64 px image, 63 px puzzle, 18 px
patches, VISSL augmentation: the reference setting of the data benchmarks) and ``paper`` (224 / 255 / 64, VISSL
augmentation).

Images: real ones from --data (a folder, an archive, or a dataset name, opened by pirl.data.sources.open_source;
the first --images of them), else synthetic JPEGs (--synthetic-size, smooth random content, quality 90).

With --batched, also: pirl.data.batched.BatchedViews on --device (a batch of --batch decoded images, the
host-to-device copy included) against the per-sample views of the same decoded images (decode excluded from both).

Prints one JSON line per setting: ``full_img_s``, ``decode_resize_img_s``, ``decode_img_s`` (one thread each) and
``ratio`` = how many times longer the full pipeline takes than decode + resize; with --batched one more line
per setting: ``batched_img_s``, ``per_sample_img_s_one_thread`` and their ratio ``speedup``, and
``pipeline_img_s_one_thread``: decode + resize plus the batched views, i.e. what one CPU thread delivers per
second with ``data.batched_views`` on the CPU (the views made in the training process).

    python benchmarks/data.py --data CIFAR10_JPEG.tar.gz --images 2000 --batched
    python benchmarks/data.py --images 256 --synthetic-size 500x375 --batched --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pirl.config import load_config
from pirl.config.schema import DataConfig
from pirl.data.batched import BatchedViews, DecodeResize
from pirl.data.sources import ImageSource, open_source
from pirl.data.views import PirlViews

SETTINGS = {
    "32px": ("cpu-quick", ["data.min_size=0", "data.image_size=32", "data.jigsaw_crop=30", "data.patch_size=9"]),
    "cpu-quick": ("cpu-quick", []),
    # the reference setting: 64 px images, 9 patches of 18 px, the official (VISSL) per-patch augmentation
    "64px": ("cpu-quick", ["data.image_size=64", "data.jigsaw_crop=63", "data.patch_size=18", "data.augment=vissl"]),
    "paper": (None, ["data.augment=vissl"]),
}


def synthetic_jpegs(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """Smooth random images (upsampled noise plus texture), so that JPEG decoding costs what photos cost."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8))
        img = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (folder / f"img{i:05d}.jpg").write_bytes(buf.getvalue())


def _rate(fn: Callable[[int], object], count: int, repeats: int) -> float:
    """Best images/s over ``repeats`` passes of fn(0..count-1)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return count / best


def pipeline(source: ImageSource, cfg: DataConfig, count: int, repeats: int) -> dict:
    views, decode_resize = PirlViews(cfg, "jigsaw"), DecodeResize(cfg)
    torch.manual_seed(0)
    full = _rate(lambda i: views(source.load(i)), count, repeats)
    base = _rate(lambda i: decode_resize(source.load(i)), count, repeats)
    decode = _rate(lambda i: source.load(i).load(), count, repeats)
    return {
        "full_img_s": round(full, 1),
        "decode_resize_img_s": round(base, 1),
        "decode_img_s": round(decode, 1),
        "ratio": round(base / full, 2),
    }


def batched(source: ImageSource, cfg: DataConfig, count: int, batch: int, device: torch.device, repeats: int) -> dict:
    """BatchedViews on ``device`` against the per-sample views, both from already decoded images."""
    decoded = [source.load(i % count) for i in range(batch)]
    views, batched_views = PirlViews(cfg, "jigsaw"), BatchedViews(cfg, "jigsaw")
    per_sample = _rate(lambda i: views(decoded[i]), batch, repeats)
    resized = [DecodeResize(cfg)(img) for img in decoded]
    images = torch.stack([r["image"] for r in resized])
    sizes = torch.stack([r["size"] for r in resized])
    if device.type == "cuda":
        images, sizes = images.pin_memory(), sizes.pin_memory()
    gen = torch.Generator(device).manual_seed(0)

    def run_batch() -> None:
        batched_views(images.to(device, non_blocking=True), sizes.to(device, non_blocking=True), gen)

    run_batch()  # warm-up: kernels, caches
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run_batch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {
        "batch": batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batched_img_s": round(batch / best, 1),
        "per_sample_img_s_one_thread": round(per_sample, 1),
        "batched_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "speedup": round(batch / best / per_sample, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder, archive or dataset name; synthetic JPEGs when absent")
    parser.add_argument("--images", type=int, default=256, help="images per pass")
    parser.add_argument("--synthetic-size", default="500x375", help="WxH of the synthetic JPEGs")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["32px", "64px", "paper"])
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best counts")
    parser.add_argument("--batched", action="store_true", help="also time pirl.data.batched against per-sample views")
    parser.add_argument("--batch", type=int, default=64, help="--batched: images per batch")
    parser.add_argument("--device", default="cpu", help="--batched: cpu, cuda or cuda:N")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            source, origin = open_source(args.data), args.data
        else:
            width, height = (int(v) for v in args.synthetic_size.lower().split("x"))
            synthetic_jpegs(Path(tmp), args.images, width, height)
            source, origin = open_source(tmp), f"synthetic {width}x{height} JPEG"
        count = min(args.images, len(source))
        for name in args.settings:
            preset, overrides = SETTINGS[name]
            cfg = load_config(preset, overrides).data
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as a DataLoader worker (pirl.training.signals.worker_init)
            row = {
                "setting": name,
                "source": origin,
                "images": count,
                "image_size": cfg.image_size,
                "jigsaw_crop": cfg.jigsaw_crop,
                "patch_size": cfg.patch_size,
                "augment": cfg.augment,
                **pipeline(source, cfg, count, args.repeats),
            }
            torch.set_num_threads(threads)
            print(json.dumps(row), flush=True)
            if args.batched:
                torch.set_num_threads(1)
                result = batched(source, cfg, count, args.batch, torch.device(args.device), args.repeats)
                torch.set_num_threads(threads)
                if args.device == "cpu":  # both halves on one thread, one after the other
                    result["pipeline_img_s_one_thread"] = round(
                        1 / (1 / row["decode_resize_img_s"] + 1 / result["batched_img_s"]), 1
                    )
                print(json.dumps({"setting": name, "source": origin, "mode": "batched", **result}), flush=True)


if __name__ == "__main__":
    main()
