"""Everything a run builds before its first step: the run folder, the data, the method (model, heads, bank),
the optimizer and the encoder as the step runs it (channels_last, DDP, compiled)."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pirl.config import Config, config_to_dict
from pirl.config.legacy import OLD_NAMES
from pirl.data.batched import BatchedViews, DecodeResize
from pirl.data.dataset import EpochSampler, PlainImages, ViewDataset
from pirl.data.sources import ImageSource
from pirl.distributed import DistInfo
from pirl.distributed.sync_bn import convert_sync_batchnorm
from pirl.errors import PirlError
from pirl.eval.features import eval_transform
from pirl.methods import BaseMethod, build_method
from pirl.run_dir import RunLock, check_reuse
from pirl.safe_io import atomic_write_text
from pirl.training.signals import worker_init


def claim_run_dir(run_dir: Path, dinfo: DistInfo, *, resume: bool, overwrite: bool, locks: list[RunLock]) -> None:
    """Main process: create ``run_dir``, lock it (the lock goes into ``locks``) and refuse or move aside an
    earlier run in it (:func:`pirl.run_dir.check_reuse`)."""
    if not dinfo.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    locks.append(RunLock(run_dir).acquire())  # a second process on this folder stops here
    aside = check_reuse(run_dir, resume=resume, overwrite=overwrite)
    if aside is not None:
        print(f"--overwrite: the earlier run's files moved to {aside}", flush=True)


def subset_indices(num_images: int, size: int, seed: int) -> list[int] | None:
    """A seeded random subset (sorted), or None for all images."""
    if not size or size >= num_images:
        return None
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_images, generator=gen)[:size].tolist())


def adapt_to_dataset(cfg: Config, num_samples: int, world: int) -> None:
    """Shrink settings that cannot apply to a small dataset, with a warning each."""
    o, b = cfg.optim, cfg.bank
    if num_samples < 2 * world:
        raise PirlError(f"the dataset has {num_samples} images; at least {2 * world} are needed")
    if o.batch_size > num_samples:
        new = max(world, num_samples // 2 // world * world)
        warnings.warn(f"optim.batch_size={o.batch_size} exceeds the {num_samples} images; using {new}", stacklevel=2)
        o.batch_size = new
    if o.batch_size % world:
        raise PirlError(f"optim.batch_size={o.batch_size} is not divisible by the {world} processes")
    limit = num_samples - 1 if b.exclude_positive else num_samples
    if b.negatives > limit:
        warnings.warn(
            f"bank.negatives={b.negatives} ({OLD_NAMES['bank.negatives']} in older configs) exceeds the "
            f"{num_samples} images; using {limit}",
            stacklevel=2,
        )
        b.negatives = limit


def batched_views(cfg: Config, views: Any) -> BatchedViews | None:
    """``data.batched_views``: the batched twin of the method's views, made on the training device (None: the
    DataLoader makes the views per sample, the default)."""
    if not cfg.data.batched_views:
        return None
    batched = BatchedViews.like(views)
    if batched is None:
        warnings.warn(
            f"data.batched_views: no batched form of {type(views).__name__}; the DataLoader makes the views",
            stacklevel=3,
        )
    return batched


@dataclass
class TrainingParts:
    method: BaseMethod
    batched_views: BatchedViews | None
    dataset: ViewDataset
    sampler: EpochSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer


def build_parts(
    cfg: Config, source: ImageSource, indices: list[int] | None, num_samples: int, dinfo: DistInfo, device: torch.device
) -> TrainingParts:
    """The method on ``device`` (seeded by ``train.seed``), its data pipeline and its SGD optimizer."""
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, num_samples, source).to(device)  # the source: Supervised reads its labels
    if cfg.train.sync_bn and dinfo.world > 1:  # the same parameters in new modules: before the optimizer is built
        method.encoder = convert_sync_batchnorm(method.encoder, device.type)
    views = method.views()
    batched = batched_views(cfg, views)
    dataset = ViewDataset(source, DecodeResize(cfg.data) if batched else views, cfg.train.seed, indices)
    sampler = EpochSampler(num_samples, cfg.optim.batch_size, cfg.train.seed, dinfo.rank, dinfo.world)
    method.global_batch, method.batch_offset = cfg.optim.batch_size, dinfo.rank * sampler.local_batch
    loader = DataLoader(
        dataset,
        batch_size=sampler.local_batch,
        sampler=sampler,
        num_workers=cfg.data.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        worker_init_fn=worker_init,
    )
    optimizer = torch.optim.SGD(
        method.parameter_groups(cfg.optim.weight_decay),
        lr=0.0,
        momentum=cfg.optim.momentum,
        nesterov=cfg.optim.nesterov,
    )
    return TrainingParts(method, batched, dataset, sampler, loader, optimizer)


def write_run_config(
    run_dir: Path,
    cfg: Config,
    data: str | ImageSource,
    source: ImageSource,
    num_samples: int,
    val_data: str | ImageSource | None,
) -> None:
    """``config.json``: the data, the resolved config and the validation data of the run."""
    atomic_write_text(
        run_dir / "config.json",
        json.dumps(
            {
                "data": data if isinstance(data, str) else source.name,
                "num_samples": num_samples,
                "config": config_to_dict(cfg),
                "val_data": val_data if val_data is None or isinstance(val_data, str) else val_data.name,
            },
            indent=2,
        ),
    )


def wrap_encoder(encoder: nn.Module, cfg: Config, dinfo: DistInfo, device: torch.device) -> nn.Module:
    """The encoder as the step runs it: channels_last (in place), DDP-wrapped under torchrun, compiled."""
    if cfg.train.channels_last:
        encoder.to(memory_format=torch.channels_last)
    if dinfo.world > 1:
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        encoder = torch.compile(encoder)
    return encoder


def init_bank_from_features(
    method: Any,
    source: ImageSource,
    indices: list[int] | None,
    num_samples: int,
    cfg: Config,
    local_batch: int,
    dinfo: DistInfo,
    device: torch.device,
) -> None:
    """``bank.init=features``: each process embeds its slice of every global batch (the last one wraps
    around), the bank gathers them."""
    per_step = local_batch * dinfo.world
    steps = -(-num_samples // per_step)
    rows = [
        (step * per_step + dinfo.rank * local_batch + j) % num_samples
        for step in range(steps)
        for j in range(local_batch)
    ]
    images = PlainImages(
        source,
        [indices[r] for r in rows] if indices else rows,
        eval_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std),
        cfg.data.image_size,
    )
    loader = DataLoader(images, batch_size=local_batch, num_workers=cfg.data.workers, worker_init_fn=worker_init)
    row_batches = torch.tensor(rows).split(local_batch)  # the loader keeps the order of ``rows``
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep training's random stream as it was
        method.init_bank_from_features((x.to(device), r.to(device)) for (x, _), r in zip(loader, row_batches))
    if dinfo.is_main:
        print(
            f"bank initialised from the untrained network's features ({time.perf_counter() - start:.0f} s)", flush=True
        )
