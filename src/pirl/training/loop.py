"""The training loop: plain PyTorch, one process per device, ``torchrun`` for several.

One step (:mod:`pirl.training.step`): views -> encoder (trunk + heads) -> scores against the memory bank -> loss
(fp32) -> backward -> SGD step -> bank update from the image embeddings. A checkpoint at the end of every epoch
(and every ``train.checkpoint_every_steps`` steps) holds everything needed to continue exactly
(:mod:`pirl.training.checkpoints`).
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pirl.config import Config
from pirl.data.sources import ImageSource, open_source
from pirl.device import choose_device
from pirl.distributed import DistInfo, barrier, setup_distributed
from pirl.errors import PirlError
from pirl.run_dir import RunLock
from pirl.safe_io import printable
from pirl.training.bad_images import check_bad_fraction, write_bad_images
from pirl.training.checkpoints import Checkpointer, Progress, resume_progress
from pirl.training.monitor import KnnMonitor, plan_monitor, start_monitor
from pirl.training.runlog import RunLog, mean_over_ranks
from pirl.training.setup import (
    TrainingParts,
    adapt_to_dataset,
    build_parts,
    claim_run_dir,
    init_bank_from_features,
    subset_indices,
    wrap_encoder,
    write_run_config,
)
from pirl.training.signals import StopRequest
from pirl.training.step import TrainStep, learning_rate


def train(
    cfg: Config,
    data: str | ImageSource,
    out: str | Path,
    *,
    resume: bool = False,
    data_root: str | None = None,
    download: bool = False,
    progress: bool = True,
    val_data: str | ImageSource | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain on ``data`` (a folder, an archive, a torchvision dataset name or an
    :class:`~pirl.data.sources.ImageSource`) into the run directory ``out``.

    ``val_data``: labelled images for the online kNN monitor (see :mod:`pirl.training.monitor`).

    Returns a summary: epochs done, last loss, checkpoint path. With ``resume``, continues from the latest
    checkpoint in ``out`` (the checkpoint's state replaces the freshly initialised one); a config that differs
    from the checkpoint's in a key that changes the model or the data is refused (:mod:`pirl.run_dir`).
    Without ``resume``, a directory that holds another run is refused unless ``overwrite`` moves its files into
    ``out/previous-<timestamp>/``. The main process holds ``out/.lock`` while it runs.

    ``summary["complete"]`` is False when a signal stopped the run before its last epoch ended.
    """
    locks: list[RunLock] = []
    try:
        return _train(
            cfg,
            data,
            out,
            resume=resume,
            data_root=data_root,
            download=download,
            progress=progress,
            val_data=val_data,
            overwrite=overwrite,
            locks=locks,
        )
    finally:
        for lock in locks:
            lock.release()


def _train(
    cfg: Config,
    data: str | ImageSource,
    out: str | Path,
    *,
    resume: bool,
    data_root: str | None,
    download: bool,
    progress: bool,
    val_data: str | ImageSource | None,
    overwrite: bool,
    locks: list[RunLock],
) -> dict[str, Any]:
    dinfo = setup_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    device = choose_device(cfg.train.device, dinfo.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(out)

    # Open the data first: a bad --data leaves no empty run directory behind.
    source = data if isinstance(data, ImageSource) else open_source(data, root=data_root, download=download)
    knn_plan = plan_monitor(
        cfg, source, data if isinstance(data, str) else None, val_data, root=data_root, download=download
    )
    claim_run_dir(run_dir, dinfo, resume=resume, overwrite=overwrite, locks=locks)
    barrier(dinfo, device)  # the other processes look for checkpoints in the run directory
    indices = subset_indices(len(source), cfg.data.subset, cfg.train.seed)
    num_samples = len(indices) if indices is not None else len(source)
    adapt_to_dataset(cfg, num_samples, dinfo.world)
    monitor = start_monitor(knn_plan, cfg, indices, device, dinfo.rank, dinfo.world)

    parts = build_parts(cfg, source, indices, num_samples, dinfo, device)
    method = parts.method
    done = resume_progress(run_dir, cfg, method, parts.optimizer, num_samples, dinfo.is_main) if resume else Progress()
    if dinfo.is_main:
        write_run_config(run_dir, cfg, data, source, num_samples, val_data)
    step = TrainStep(
        method,
        parts.optimizer,
        device,
        encoder=wrap_encoder(method.encoder, cfg, dinfo, device),
        amp=cfg.train.amp,
        channels_last=cfg.train.channels_last,
        world=dinfo.world,
        batched_views=parts.batched_views,
        seed=cfg.train.seed,
    )

    # resumed without a checkpoint (killed before its first): the steps it logged are redone, so they go too
    log = RunLog(run_dir, dinfo.is_main, done.global_step if done.checkpoint else (0 if resume else None))
    if done.checkpoint is not None:  # allowed changes (epochs, logging, workers, ...) are kept in the record
        log.record("resume", done.global_step, {"checkpoint": str(done.checkpoint), "changes": done.resumed_changes})
    if cfg.bank.init == "features" and done.checkpoint is None and getattr(method, "bank", None) is not None:
        init_bank_from_features(method, source, indices, num_samples, cfg, parts.sampler.local_batch, dinfo, device)
    if monitor is not None and done.checkpoint is None:
        # epoch 0: the random-init trunk, the baseline every later figure is read against
        monitor.run(method.encoder.trunk, 0, 0, log)

    loop = _EpochLoop(cfg, dinfo, device, run_dir, parts, step, log, monitor, done, progress)
    loop.run()
    return {
        "epochs": cfg.optim.epochs,
        "loss": loop.last_loss,
        "checkpoint": str(done.checkpoint) if done.checkpoint else None,
        "run_dir": str(run_dir),
        "num_samples": num_samples,
        "bad_images": len(done.bad_seen),
        "stopped": loop.stopped,
        "complete": loop.epochs_done >= cfg.optim.epochs,
    }


class _EpochLoop:
    """The epochs of one run, from ``done`` on: steps, logging, checkpoints, the monitor, stop requests."""

    def __init__(
        self,
        cfg: Config,
        dinfo: DistInfo,
        device: torch.device,
        run_dir: Path,
        parts: TrainingParts,
        step: TrainStep,
        log: RunLog,
        monitor: KnnMonitor | None,
        done: Progress,
        progress: bool,
    ) -> None:
        self.cfg, self.dinfo, self.device, self.run_dir, self.parts = cfg, dinfo, device, run_dir, parts
        self.step, self.log, self.monitor, self.done, self.progress = step, log, monitor, done, progress
        self.ckpt = Checkpointer(run_dir, cfg, parts.method, parts.optimizer, len(parts.dataset), dinfo.is_main)
        self.steps_per_epoch = parts.sampler.steps_per_epoch
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.stop, self.stopped, self.bar = StopRequest(), None, None
        self.last_loss, self.epochs_done = log.resumed_loss, done.epoch

    def run(self) -> None:
        bad_names: list[str] = []
        try:
            self.stop.install()  # only now: before the first step there is nothing to save, so a signal may end it
            for epoch in range(self.done.epoch, self.cfg.optim.epochs):
                if self._epoch(epoch):
                    break
        finally:
            self.stop.restore()
            if self.bar is not None:
                self.bar.close()  # before an error message, so that it starts on a line of its own
            self.log.close()
            if self.dinfo.is_main:  # also when the run stops on too many of them
                bad_names = write_bad_images(self.run_dir, self.done.bad_seen, self.parts.dataset)
        if bad_names:
            print(
                f"skipped {len(bad_names)} undecodable image(s), e.g. {printable(bad_names[0])}; all listed in "
                f"{self.run_dir / 'bad_images.txt'}",
                flush=True,
            )

    def _epoch(self, epoch: int) -> bool:
        """One epoch (the rest of it when resumed mid-epoch); True when the run stops after it."""
        cfg, done, sampler, method = self.cfg, self.done, self.parts.sampler, self.parts.method
        sampler.set_epoch(epoch, done.step if epoch == done.epoch else 0)
        method.train()
        self.bar = None
        if self.dinfo.is_main and self.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.steps_per_epoch,
                initial=sampler.start_step,
                desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        self.tick, self.loss_sum, self.logged_steps = time.perf_counter(), torch.zeros((), device=self.device), 0
        epoch_loss, epoch_steps = torch.zeros((), device=self.device), 0
        step_in_epoch = sampler.start_step - 1
        for step_in_epoch, batch in enumerate(self.parts.loader, start=sampler.start_step):
            bad = batch.pop("bad")
            batch = self.step.prepare(batch, done.global_step)
            lr = learning_rate(cfg, done.global_step, self.total_steps, self.steps_per_epoch)
            result = self.step.run(batch, done.global_step, lr, self.stop, bad)
            done.bad_seen.update(result.bad)
            if result.finite:
                self.loss_sum += result.out.loss.detach()
                epoch_loss += result.out.loss.detach()
                self.logged_steps += 1
                epoch_steps += 1
            else:
                self._nonfinite(result.out.loss, epoch, step_in_epoch)
            done.global_step += 1

            check_bad_fraction(cfg, done.bad_seen, len(self.parts.dataset), self.run_dir)
            if self.logged_steps and (
                done.global_step % cfg.train.log_every == 0 or step_in_epoch + 1 == self.steps_per_epoch
            ):
                self._log_train(result.out, epoch, step_in_epoch, lr)
            if self.bar is not None:
                self.bar.update(1)
            # One process alone reads its own flag at once; several act on the value they agreed on.
            if result.signum or (self.dinfo.world == 1 and self.stop.signum):
                self.stopped = signal.Signals(result.signum or self.stop.signum).name
                break
            if self.ckpt.due(done.global_step, step_in_epoch, self.steps_per_epoch):
                self.ckpt.save(done, epoch, step_in_epoch + 1)
        if self.bar is not None:
            self.bar.close()
        if self.stopped and step_in_epoch + 1 < self.steps_per_epoch:
            self.ckpt.save(done, epoch, step_in_epoch + 1)
            return True
        done.step = 0
        self.ckpt.save(done, epoch + 1, 0)
        self.epochs_done = epoch + 1
        epoch_mean = mean_over_ranks(self.dinfo.world, {"loss": epoch_loss / max(epoch_steps, 1)}, self.device)["loss"]
        self.log.record(
            "epoch", done.global_step, {"epoch": epoch + 1, "loss": epoch_mean, "bad_images": len(done.bad_seen)}
        )
        if self.monitor is not None and not self.stopped and self.monitor.due(epoch + 1, cfg.optim.epochs):
            # after the checkpoint, so that a crash in the evaluation loses no training
            self.monitor.run(method.encoder.trunk, epoch + 1, done.global_step, self.log)
        return self.stopped is not None

    def _nonfinite(self, loss: torch.Tensor, epoch: int, step_in_epoch: int) -> None:
        """``train.nonfinite``: stop the run, or warn (the step already skipped the batch)."""
        value = loss.item()
        message = (
            f"loss is {value if not math.isfinite(value) else 'not finite in another process'} "
            f"at epoch {epoch + 1}, step {step_in_epoch + 1} (global step {self.done.global_step + 1})"
        )
        if self.cfg.train.nonfinite == "stop":
            ckpt_path = self.done.checkpoint
            kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path else "no checkpoint yet"
            raise PirlError(f"{message}; stopped (train.nonfinite=stop), {kept}")
        warnings.warn(f"{message}; batch skipped (train.nonfinite=skip)", stacklevel=1)

    def _log_train(self, out: Any, epoch: int, step_in_epoch: int, lr: float) -> None:
        """A ``train`` record: the step's values and the mean loss since the last record, averaged over ranks."""
        now = time.perf_counter()
        means = mean_over_ranks(
            self.dinfo.world,
            {**out.logs, "loss": out.loss.detach(), "loss_mean": self.loss_sum / self.logged_steps},
            self.device,
        )
        self.last_loss = means["loss"]
        values = {
            "epoch": epoch + 1,
            "step": step_in_epoch + 1,
            "loss": self.last_loss,
            "loss_mean": means["loss_mean"],
            "lr": lr,
            "images_per_s": self.logged_steps * self.cfg.optim.batch_size / max(now - self.tick, 1e-9),
        }
        values.update({k: means[k] for k in out.logs})
        self.log.record("train", self.done.global_step, values)
        self.tick, self.loss_sum, self.logged_steps = now, torch.zeros((), device=self.device), 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", img_s=f"{values['images_per_s']:.0f}")
