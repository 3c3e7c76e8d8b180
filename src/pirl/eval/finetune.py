"""Semi-supervised fine-tuning: the whole trunk plus a linear head on a labelled fraction (paper Table 3).

The protocol is VISSL's ``pirl_in1k_per01/per10`` fine-tune: SGD with Nesterov momentum 0.9, no weight decay,
a step schedule (x0.1 once, at 30 of 70 epochs by default), RandomResizedCrop + horizontal flip at the
model's input size; the fraction is drawn per class with a seed; top-1 is measured on the test split with
the evaluation transform (resize, centre crop).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from pirl.data.indexed import SourceImages
from pirl.data.views import eval_transform
from pirl.device import amp_dtype, autocast
from pirl.device import parse_device as resolve_device  # eval.commands checks --device with it
from pirl.errors import PirlError
from pirl.eval.features import frozen_batches
from pirl.models.trunk import feature_dim


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0 and math.isfinite(fraction)):
        raise PirlError(f"--fraction must be in (0, 1], got {fraction}")
    return float(fraction)


def balanced_subset(labels: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """Sorted indices holding ``round(fraction * n_c)`` (at least one) of the images of every class ``c``.

    Each class contributes the same fraction, so the subset keeps the class balance of the full split (as the
    1% / 10% ImageNet subsets do). Unlabelled images (label < 0) are never picked.
    """
    check_fraction(fraction)
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(list(labels), dtype=torch.int64)
    picked: list[torch.Tensor] = []
    for cls in torch.unique(y[y >= 0]):
        idx = torch.nonzero(y == cls).flatten()
        take = max(1, round(fraction * idx.numel()))
        picked.append(idx[torch.randperm(idx.numel(), generator=gen)[:take]])
    return sorted(torch.cat(picked).tolist()) if picked else []


def train_transform(input_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(input_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def default_milestones(epochs: int) -> list[int]:
    """One x0.1 drop at 3/7 of training (VISSL: epoch 30 of 70)."""
    return [m] if 0 < (m := round(epochs * 3 / 7)) < epochs else []


def finetune(
    trunk: nn.Module,
    train_source: Any,
    test_source: Any,
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    fraction: float,
    epochs: int = 70,
    lr: float | None = None,
    batch_size: int = 256,
    milestones: Sequence[int] | None = None,
    device: str | None = "auto",
    seed: int = 0,
    workers: int = 0,
    progress: bool = False,
    out_dim: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``trunk`` (modified in place) + a new linear head; returns test ``top1`` and the recipe used.

    ``lr`` defaults to 0.01 per 256 images (VISSL), i.e. ``0.01 * batch_size / 256``. ``out_dim`` is the width
    of the trunk's output (default: that of a ResNet trunk's pooled res5).
    """
    t0 = time.perf_counter()
    check_fraction(fraction)
    if epochs < 1 or batch_size < 1 or (lr is not None and not lr > 0):
        raise PirlError("fine-tuning needs epochs >= 1, batch size >= 1 and a positive learning rate")
    for name, src in (("training", train_source), ("test", test_source)):
        if src.labels is None:
            raise PirlError(f"fine-tuning needs labelled {name} images (class subfolders or a labelled dataset)")
    subset = balanced_subset(train_source.labels, fraction, seed)
    test_idx = [i for i, y in enumerate(test_source.labels) if y >= 0]
    if len(subset) < 2 or not test_idx:
        raise PirlError("fine-tuning needs at least two labelled training images and one labelled test image")
    num_classes = max(max(train_source.labels), max(test_source.labels)) + 1
    dev = resolve_device(device)
    lr = 0.01 * batch_size / 256 if lr is None else float(lr)
    milestones = default_milestones(epochs) if milestones is None else list(milestones)

    torch.manual_seed(seed)
    head = nn.Linear(out_dim or feature_dim(trunk), num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(trunk, head).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    train_set = SourceImages(train_source, train_transform(input_size, mean, std), subset)
    # A last batch of one image would break BatchNorm's batch statistics.
    drop_last = len(subset) > batch_size and len(subset) % batch_size == 1
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=dev.type == "cuda",
    )
    amp = amp_dtype(dev, fp16_fallback=False)  # bfloat16 or nothing: this loop has no loss scaler
    losses: list[float] = []
    for _ in tqdm(range(epochs), desc="finetune", disable=not progress, leave=False):
        model.train()
        total, count = 0.0, 0
        for images, targets in loader:
            images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
            with autocast(dev, amp):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(targets)
            count += len(targets)
        sched.step()
        losses.append(total / max(count, 1))
    top1 = _accuracy(
        model, SourceImages(test_source, eval_transform(input_size, mean, std), test_idx), dev, amp, batch_size, workers
    )
    return {
        "top1": top1,
        "fraction": fraction,
        "train_images": len(subset),
        "test_images": len(test_idx),
        "num_classes": num_classes,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "milestones": milestones,
        "final_train_loss": losses[-1],
        "device": str(dev),
        "details": {"train_loss_per_epoch": losses},
        "seconds": time.perf_counter() - t0,
    }


def _accuracy(
    model: nn.Module, dataset: Dataset, dev: torch.device, amp: torch.dtype | None, batch_size: int, workers: int
) -> float:
    model.eval()
    hits = frozen_batches(
        lambda images, targets: int((model(images).argmax(1).cpu() == targets).sum()),
        dataset,
        device=dev,
        batch_size=batch_size,
        num_workers=workers,
        amp_dtype=amp,
    )
    return sum(hits) / len(dataset)


def protocol(fraction: float, epochs: int, milestones: Sequence[int]) -> str:
    return (
        f"fine-tune the whole trunk + a linear head on {fraction:g} of the labelled training images (same "
        f"fraction of every class, seeded); SGD nesterov momentum 0.9, no weight decay, {epochs} epochs, "
        f"lr x0.1 at epochs {list(milestones)}; RandomResizedCrop + flip at the input size; test top-1 with "
        "resize + centre crop (paper Table 3, VISSL's semi-supervised recipe)"
    )
