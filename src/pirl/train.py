"""The training loop: plain PyTorch, one process per device, ``torchrun`` for several.

One step: views -> encoder (trunk + heads) -> scores against the memory bank -> loss (fp32) -> backward ->
SGD step -> bank update from the image embeddings. A checkpoint at the end of every epoch (and every
``train.checkpoint_every_steps`` steps) holds everything needed to continue exactly.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pirl.checkpoint import atomic_write, load_latest, save_checkpoint
from pirl.config import Config, config_to_dict
from pirl.bank import mix_seed
from pirl.data.batched import BatchedViews, DecodeResize
from pirl.data.dataset import EpochSampler, PlainImages, ViewDataset
from pirl.data.sources import ImageSource, open_source
from pirl.errors import PirlError
from pirl.eval.features import eval_transform
from pirl.eval.monitor import plan_monitor, start_monitor
from pirl.methods import build_method
from pirl.safe_io import atomic_write_text, open_append, printable
from pirl.run_dir import RunLock, check_reuse, resume_changes
from pirl.sync_bn import convert_sync_batchnorm


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL on CUDA).

    A collective that waits longer than ``timeout_s`` for a lost peer fails instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PirlError("train.device=cuda but no CUDA device is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")


def subset_indices(num_images: int, size: int, seed: int) -> list[int] | None:
    """A seeded random subset (sorted), or None for all images."""
    if not size or size >= num_images:
        return None
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_images, generator=gen)[:size].tolist())


def adapt_to_dataset(cfg: Config, num_samples: int, world: int) -> None:
    """Shrink settings that cannot apply to a small dataset, with a warning each."""
    o, lo = cfg.optim, cfg.loss
    if num_samples < 2 * world:
        raise PirlError(f"the dataset has {num_samples} images; at least {2 * world} are needed")
    if o.batch_size > num_samples:
        new = max(world, num_samples // 2 // world * world)
        warnings.warn(f"optim.batch_size={o.batch_size} exceeds the {num_samples} images; using {new}", stacklevel=2)
        o.batch_size = new
    if o.batch_size % world:
        raise PirlError(f"optim.batch_size={o.batch_size} is not divisible by the {world} processes")
    limit = num_samples - 1 if lo.exclude_positive else num_samples
    if lo.negatives > limit:
        warnings.warn(f"loss.negatives={lo.negatives} exceeds the {num_samples} images; using {limit}", stacklevel=2)
        lo.negatives = limit


def learning_rate(cfg: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear scaling from ``base_lr`` per 256 images, linear warm-up, then cosine to ``final_lr_ratio * lr``."""
    o = cfg.optim
    peak = o.base_lr * o.batch_size / 256
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    final = peak * o.final_lr_ratio
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers augment one sample at a time; threads would fight the trainer
    # Ctrl-C reaches the whole process group; the main process decides when to stop. SIGTERM keeps its default
    # (the inherited handler would ignore it): the DataLoader terminates workers that do not exit in time.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class StopRequest:
    """SIGTERM / SIGINT handlers that only note the signal; the trainer stops at the next step boundary.

    A second SIGINT raises :class:`KeyboardInterrupt` at once. Forked DataLoader workers inherit the handler
    before their own setup runs, so it ignores signals outside the process that installed it.
    """

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread; the caller keeps its own handling
        for sig in self.signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT in a background job stays ignored
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum


def _batched_views(cfg: Config, views: Any) -> BatchedViews | None:
    """``data.batched_views``: the batched twin of the method's views, made on the training device (None: the
    DataLoader makes the views per sample, the default)."""
    if not cfg.data.batched_views:
        return None
    batched = BatchedViews.like(views)
    if batched is None:
        warnings.warn(f"data.batched_views: no batched form of {type(views).__name__}; the DataLoader makes the "
                      "views", stacklevel=2)
    return batched


def _init_bank_from_features(method: Any, source: ImageSource, indices: list[int] | None, num_samples: int,
                             cfg: Config, local_batch: int, dinfo: "DistInfo", device: torch.device) -> None:
    """Each process embeds its slice of every global batch (the last one wraps around), the bank gathers them."""
    per_step = local_batch * dinfo.world
    steps = -(-num_samples // per_step)
    rows = [(step * per_step + dinfo.rank * local_batch + j) % num_samples
            for step in range(steps) for j in range(local_batch)]
    images = PlainImages(source, [indices[r] for r in rows] if indices else rows,
                         eval_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std), cfg.data.image_size)
    loader = DataLoader(images, batch_size=local_batch, num_workers=cfg.data.workers, worker_init_fn=_worker_init)
    row_batches = torch.tensor(rows).split(local_batch)  # the loader keeps the order of ``rows``
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the loader draws a seed: keep training's random stream as it was
        method.init_bank_from_features((x.to(device), r.to(device)) for (x, _), r in zip(loader, row_batches))
    if dinfo.is_main:
        print(f"bank initialised from the untrained network's features ({time.perf_counter() - start:.0f} s)",
              flush=True)


class _Agreement:
    """(loss finite everywhere, signal any process received, undecodable indices found by any process).

    Every process must skip the same batches and stop at the same step, or the others would wait in a
    collective forever: one all_reduce of three numbers per step, plus an all_gather in the rare step with
    undecodable images. Started right after the forward pass, without a host read: on CUDA the flags are copied
    to pinned memory behind a CUDA event, and :meth:`result` is called once the backward pass is queued, so the
    host waits for this step's forward pass only and the GPU never runs dry (reading the flags before queuing the
    backward, as before, idled the GPU for that time every step).
    """

    def __init__(self, world: int, loss: torch.Tensor, signum: int, bad: torch.Tensor) -> None:
        self.world, self.loss, self.bad = world, loss, bad
        nonfinite = (~torch.isfinite(loss.detach())).float()
        # new_full is a fill on the device, not a host-to-device copy (which would wait for the GPU)
        flags = torch.stack([nonfinite, nonfinite.new_full((), float(signum)),
                             nonfinite.new_full((), float((bad >= 0).any()))])
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # NCCL: queued on the GPU, the host goes on
        self.event = None
        if flags.is_cuda:
            self.flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.flags.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flags = flags

    def result(self) -> tuple[bool, int, list[int]]:
        if self.event is not None:
            self.event.synchronize()
        nonfinite, signum_any, any_bad = self.flags.tolist()
        bad = self.bad
        if any_bad and self.world > 1:
            local = bad.to(self.loss.device)
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            bad = torch.cat(parts).cpu()
        return not nonfinite, int(signum_any), bad[bad >= 0].tolist()


def _mean_over_ranks(world: int, values: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Each scalar averaged over the processes: with equal local batches, the value one process would log for
    the global batch. A collective (one all_reduce) when ``world > 1``."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                           for v in values.values()])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(values, stacked.tolist()))


class RunLog:
    """metrics.jsonl and TensorBoard in the run directory (main process only).

    ``resumed_step``: the global step of the checkpoint a run continues from. A run that crashed logged steps
    past it that will now be redone; their records are dropped so that every step appears once.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled:
            path = run_dir / "metrics.jsonl"
            if resumed_step is not None and path.is_file():
                _drop_records_after(path, resumed_step)
            self.jsonl = open_append(path)  # never through a link planted in the run folder
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resumed_step is None else resumed_step + 1
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
            except ImportError:  # TensorBoard is optional at run time
                self.writer = None

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "global_step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def _drop_records_after(path: Path, global_step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["global_step"] <= global_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
    atomic_write(path, lambda fh: fh.write("".join(kept).encode()))


def train(cfg: Config, data: str | ImageSource, out: str | Path, *, resume: bool = False, data_root: str | None = None,
          download: bool = False, progress: bool = True, val_data: str | ImageSource | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Pretrain on ``data`` (a folder, an archive, a torchvision dataset name or an
    :class:`~pirl.data.sources.ImageSource`) into the run directory ``out``.

    ``val_data``: labelled images for the online kNN monitor (see :mod:`pirl.eval.monitor`).

    Returns a summary: epochs done, last loss, checkpoint path. With ``resume``, continues from the latest
    checkpoint in ``out`` (the checkpoint's state replaces the freshly initialised one); a config that differs
    from the checkpoint's in a key that changes the model or the data is refused (:mod:`pirl.run_dir`).
    Without ``resume``, a directory that holds another run is refused unless ``overwrite`` moves its files into
    ``out/previous-<timestamp>/``. The main process holds ``out/.lock`` while it runs.

    ``summary["complete"]`` is False when a signal stopped the run before its last epoch ended.
    """
    locks: list[RunLock] = []
    try:
        return _train(cfg, data, out, resume=resume, data_root=data_root, download=download, progress=progress,
                      val_data=val_data, overwrite=overwrite, locks=locks)
    finally:
        for lock in locks:
            lock.release()


def _train(cfg: Config, data: str | ImageSource, out: str | Path, *, resume: bool, data_root: str | None,
           download: bool, progress: bool, val_data: str | ImageSource | None, overwrite: bool,
           locks: list[RunLock]) -> dict[str, Any]:
    dinfo = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    device = resolve_device(cfg.train.device, dinfo.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(out)

    # Open the data first: a bad --data leaves no empty run directory behind.
    source = data if isinstance(data, ImageSource) else open_source(data, root=data_root, download=download)
    knn_plan = plan_monitor(cfg, source, data if isinstance(data, str) else None, val_data, root=data_root,
                            download=download)
    if dinfo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        locks.append(RunLock(run_dir).acquire())  # a second process on this folder stops here
        aside = check_reuse(run_dir, resume=resume, overwrite=overwrite)
        if aside is not None:
            print(f"--overwrite: the earlier run's files moved to {aside}", flush=True)
    if dinfo.world > 1 and device.type == "cuda":  # the other processes look for checkpoints in the run directory
        dist.barrier(device_ids=[device.index])
    elif dinfo.world > 1:
        dist.barrier()
    indices = subset_indices(len(source), cfg.data.subset, cfg.train.seed)
    num_samples = len(indices) if indices is not None else len(source)
    adapt_to_dataset(cfg, num_samples, dinfo.world)
    monitor = start_monitor(knn_plan, cfg, indices, device, dinfo.rank, dinfo.world)

    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, num_samples, source).to(device)  # the source: Supervised reads its labels
    if cfg.train.sync_bn and dinfo.world > 1:  # the same parameters in new modules: before the optimizer is built
        method.encoder = convert_sync_batchnorm(method.encoder, device.type)
    views = method.views()
    batched_views = _batched_views(cfg, views)
    dataset = ViewDataset(source, DecodeResize(cfg.data) if batched_views else views, cfg.train.seed, indices)
    sampler = EpochSampler(num_samples, cfg.optim.batch_size, cfg.train.seed, dinfo.rank, dinfo.world)
    method.global_batch, method.batch_offset = cfg.optim.batch_size, dinfo.rank * sampler.local_batch
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=cfg.data.workers,
                        pin_memory=device.type == "cuda", drop_last=True, worker_init_fn=_worker_init)
    optimizer = torch.optim.SGD(method.parameter_groups(cfg.optim.weight_decay), lr=0.0,
                                momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)

    start_epoch, start_step, global_step, bad_seen = 0, 0, 0, set()
    ckpt_path: Path | None = None
    resumed_changes: dict[str, list[Any]] = {}
    if resume:
        # Into CPU memory: load_state_dict copies to the device, and a sharded bank keeps only its rows of the full one.
        found = load_latest(run_dir, map_location="cpu")
        if found is None:
            warnings.warn(f"--resume: no checkpoint in {run_dir}; starting from scratch", stacklevel=2)
        else:
            path, state = found
            missing = [k for k in ("config", "method", "optimizer", "epoch", "step", "global_step", "rng")
                       if k not in state]
            if missing or not isinstance(state["rng"], dict) or "torch" not in state["rng"]:
                raise PirlError(f"{path}: cannot resume from it, it lacks {', '.join(missing) or 'rng.torch'}")
            resumed_changes = resume_changes(state["config"], config_to_dict(cfg), state.get("num_samples"),
                                             num_samples)
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
            bad_seen = set(state.get("bad_images", []))
            ckpt_path = path
            torch.set_rng_state(state["rng"]["torch"].cpu())  # the CPU generator's state, whatever map_location
            if dinfo.is_main:
                print(f"resumed from {path} (epoch {start_epoch}, step {start_step})", flush=True)
    if dinfo.is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(
            {"data": data if isinstance(data, str) else source.name, "num_samples": num_samples,
             "config": config_to_dict(cfg),
             "val_data": val_data if val_data is None or isinstance(val_data, str) else val_data.name}, indent=2))

    encoder: torch.nn.Module = method.encoder
    use_cuda = device.type == "cuda"
    if cfg.train.channels_last:
        encoder.to(memory_format=torch.channels_last)
    if dinfo.world > 1:
        encoder = torch.nn.parallel.DistributedDataParallel(
            encoder, device_ids=[device.index] if use_cuda else None)
    if cfg.train.compile:
        encoder = torch.compile(encoder)
    amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and cfg.train.amp and amp_dtype == torch.float16)

    # resumed without a checkpoint (killed before its first): the steps it logged are redone, so they go too
    log = RunLog(run_dir, dinfo.is_main, global_step if ckpt_path else (0 if resume else None))
    if ckpt_path is not None:  # allowed changes (epochs, logging, workers, ...) are kept in the record
        log.record("resume", global_step, {"checkpoint": str(ckpt_path), "changes": resumed_changes})
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.optim.epochs * steps_per_epoch
    last_loss = float("nan")

    def checkpoint(epoch: int, step: int) -> Path | None:
        # The full bank, whatever its kind: a run resumes with either kind and any number of processes.
        bank = getattr(method, "bank", None)
        full_bank = bank.full_memory() if bank is not None else None  # a collective when sharded: every rank joins
        if not dinfo.is_main:
            return None
        method_state = method.state_dict()
        if full_bank is not None:
            method_state["bank.memory"] = full_bank
        state = {"config": config_to_dict(cfg), "epoch": epoch, "step": step, "global_step": global_step,
                 "num_samples": num_samples, "method": method_state, "optimizer": optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state()}, "bad_images": sorted(bad_seen)}
        return save_checkpoint(run_dir, state, epoch, step, cfg.train.keep_checkpoints)

    stop, stopped, bad_names, bar = StopRequest(), None, [], None
    epochs_done = start_epoch
    if cfg.loss.bank_init == "features" and ckpt_path is None and getattr(method, "bank", None) is not None:
        _init_bank_from_features(method, source, indices, num_samples, cfg, sampler.local_batch, dinfo, device)
    if monitor is not None and ckpt_path is None:
        # epoch 0: the random-init trunk, the baseline every later figure is read against
        monitor.run(method.encoder.trunk, 0, 0, log)
    try:
        stop.install()  # only now: before the first step there is nothing to save, so a signal may end the process
        for epoch in range(start_epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
            method.train()
            bar = None
            if dinfo.is_main and progress:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=sampler.start_step, desc=f"epoch {epoch + 1}/"
                           f"{cfg.optim.epochs}", unit="step", dynamic_ncols=True, mininterval=1.0)
            tick, loss_sum, logged_steps = time.perf_counter(), torch.zeros((), device=device), 0
            epoch_loss, epoch_steps = torch.zeros((), device=device), 0
            step_in_epoch = sampler.start_step - 1
            for step_in_epoch, batch in enumerate(loader, start=sampler.start_step):
                bad = batch.pop("bad")
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if batched_views is not None:  # the loader sent decoded images: the views are made here, keyed by step
                    gen = torch.Generator(device).manual_seed(mix_seed(cfg.train.seed, global_step, 0x6B7))
                    batch.update(batched_views(batch.pop("image"), batch.pop("size"), gen,
                                           global_batch=cfg.optim.batch_size, offset=method.batch_offset))
                if cfg.train.channels_last:
                    for key in ("image", "rotated"):
                        if key in batch:
                            batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
                lr = learning_rate(cfg, global_step, total_steps, steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_cuda and cfg.train.amp):
                    out = method.training_step(batch, global_step, encoder)
                agreement = _Agreement(dinfo.world, out.loss, stop.signum, bad)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.loss).backward()  # queued before the flags are read: see _Agreement
                finite, signum, new_bad = agreement.result()
                bad_seen.update(new_bad)
                if finite:
                    scaler.step(optimizer)
                    scaler.update()
                    method.after_step(out)
                    loss_sum += out.loss.detach()
                    epoch_loss += out.loss.detach()
                    logged_steps += 1
                    epoch_steps += 1
                else:
                    value = out.loss.item()
                    message = (f"loss is {value if not math.isfinite(value) else 'not finite in another process'} "
                               f"at epoch {epoch + 1}, step {step_in_epoch + 1} (global step {global_step + 1})")
                    if cfg.train.nonfinite == "stop":
                        kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path else "no checkpoint yet"
                        raise PirlError(f"{message}; stopped (train.nonfinite=stop), {kept}")
                    warnings.warn(f"{message}; batch skipped (train.nonfinite=skip)", stacklevel=1)
                    optimizer.zero_grad(set_to_none=True)  # drop the gradients of the bad batch
                global_step += 1

                _check_bad_fraction(cfg, bad_seen, num_samples, run_dir)
                if logged_steps and (global_step % cfg.train.log_every == 0 or step_in_epoch + 1 == steps_per_epoch):
                    now = time.perf_counter()
                    means = _mean_over_ranks(dinfo.world, {**out.logs, "loss": out.loss.detach(),
                                                           "loss_mean": loss_sum / logged_steps}, device)
                    last_loss = means["loss"]
                    values = {"epoch": epoch + 1, "step": step_in_epoch + 1, "loss": last_loss,
                              "loss_mean": means["loss_mean"], "lr": lr,
                              "images_per_s": logged_steps * cfg.optim.batch_size / max(now - tick, 1e-9)}
                    values.update({k: means[k] for k in out.logs})
                    log.record("train", global_step, values)
                    tick, loss_sum, logged_steps = now, torch.zeros((), device=device), 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{values['images_per_s']:.0f}")
                if bar is not None:
                    bar.update(1)
                # One process alone reads its own flag at once; several act on the value they agreed on.
                if signum or (dinfo.world == 1 and stop.signum):
                    stopped = signal.Signals(signum or stop.signum).name
                    break
                every = cfg.train.checkpoint_every_steps
                if every and global_step % every == 0 and step_in_epoch + 1 < steps_per_epoch:
                    ckpt_path = checkpoint(epoch, step_in_epoch + 1) or ckpt_path
            if bar is not None:
                bar.close()
            if stopped and step_in_epoch + 1 < steps_per_epoch:
                ckpt_path = checkpoint(epoch, step_in_epoch + 1) or ckpt_path
                break
            start_step = 0
            ckpt_path = checkpoint(epoch + 1, 0) or ckpt_path
            epochs_done = epoch + 1
            epoch_mean = _mean_over_ranks(dinfo.world, {"loss": epoch_loss / max(epoch_steps, 1)}, device)["loss"]
            log.record("epoch", global_step, {"epoch": epoch + 1, "loss": epoch_mean,
                                              "bad_images": len(bad_seen)})
            if monitor is not None and not stopped and monitor.due(epoch + 1, cfg.optim.epochs):
                # after the checkpoint, so that a crash in the evaluation loses no training
                monitor.run(method.encoder.trunk, epoch + 1, global_step, log)
            if stopped:
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()  # before an error message, so that it starts on a line of its own
        log.close()
        if dinfo.is_main:  # also when the run stops on too many of them
            bad_names = _write_bad_images(run_dir, bad_seen, dataset)
    if bad_names:
        print(f"skipped {len(bad_names)} undecodable image(s), e.g. {printable(bad_names[0])}; all listed in "
              f"{run_dir / 'bad_images.txt'}", flush=True)
    return {"epochs": cfg.optim.epochs, "loss": last_loss, "checkpoint": str(ckpt_path) if ckpt_path else None,
            "run_dir": str(run_dir), "num_samples": num_samples, "bad_images": len(bad_seen), "stopped": stopped,
            "complete": epochs_done >= cfg.optim.epochs}


def _check_bad_fraction(cfg: Config, bad: set[int], num_samples: int, run_dir: Path) -> None:
    """Stop as soon as more than ``data.max_bad_fraction`` of the whole dataset is known to be undecodable."""
    if len(bad) > cfg.data.max_bad_fraction * num_samples:
        raise PirlError(f"{len(bad)} of {num_samples} images could not be decoded, more than "
                        f"data.max_bad_fraction={cfg.data.max_bad_fraction}; fix or remove them (listed in "
                        f"{run_dir / 'bad_images.txt'}), or raise the limit")


def _write_bad_images(run_dir: Path, bad: set[int], dataset: ViewDataset) -> list[str]:
    """List undecodable files (paths, or indices for in-memory sources) in ``bad_images.txt``; returns them."""
    if not bad:
        return []
    source = dataset.source
    names = []
    for pos in sorted(bad):
        index = dataset.indices[pos] if dataset.indices is not None else pos
        names.append(str(source.path(index)) if hasattr(source, "path") else f"index {index}")
    atomic_write_text(run_dir / "bad_images.txt", "\n".join(names) + "\n")  # file names kept byte for byte
    return names
