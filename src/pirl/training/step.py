"""One training step, in one place: the trainer and the step benchmarks (``benchmarks/step.py``,
``benchmarks/memory.py``) all run :meth:`TrainStep.run`.

views (batched on the device, optionally) -> encoder (trunk + heads, under autocast) -> scores against the memory
bank -> loss (fp32) -> backward (loss-scaled for float16) -> agreement of the processes on the loss being finite,
signals and undecodable images -> SGD step -> bank update from the image embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pirl.config import Config
from pirl.data.batched import BatchedViews
from pirl.device import amp_dtype, autocast, grad_scaler
from pirl.methods import BaseMethod, StepOutput
from pirl.seeding import mix_seed


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


class Agreement:
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
        flags = torch.stack(
            [nonfinite, nonfinite.new_full((), float(signum)), nonfinite.new_full((), float((bad >= 0).any()))]
        )
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


@dataclass
class StepResult:
    out: StepOutput
    finite: bool  # False: the optimizer step and the bank update were skipped, the gradients dropped
    signum: int = 0  # a signal some process received (0: none)
    bad: list[int] = field(default_factory=list)  # undecodable dataset positions any process met in this batch


class TrainStep:
    """The step body. ``encoder``: the (possibly DDP-wrapped or compiled) ``method.encoder`` (None: the bare one).

    ``amp``: autocast on CUDA (bfloat16 where supported, else float16 with loss scaling), as ``train.amp``.
    ``batched_views``: the batch holds decoded images, and the views are made here, seeded by the global step.
    """

    def __init__(
        self,
        method: BaseMethod,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        encoder: nn.Module | None = None,
        amp: bool = True,
        channels_last: bool = False,
        world: int = 1,
        batched_views: BatchedViews | None = None,
        seed: int = 0,
    ) -> None:
        self.method, self.optimizer, self.device, self.encoder = method, optimizer, device, encoder
        self.channels_last, self.world, self.batched_views, self.seed = channels_last, world, batched_views, seed
        self.dtype = amp_dtype(device) if amp else None
        self.scaler = grad_scaler(self.dtype)

    def prepare(self, batch: dict[str, torch.Tensor], global_step: int) -> dict[str, torch.Tensor]:
        """A loader batch (without its ``bad`` entry) on the device, with its views, in the encoder's layout."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.batched_views is not None:  # the loader sent decoded images: the views are made here, keyed by step
            gen = torch.Generator(self.device).manual_seed(mix_seed(self.seed, global_step, 0x6B7))
            batch.update(
                self.batched_views(
                    batch.pop("image"),
                    batch.pop("size"),
                    gen,
                    global_batch=self.method.global_batch,
                    offset=self.method.batch_offset,
                )
            )
        if self.channels_last:
            for key in ("image", "rotated"):
                if key in batch:
                    batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
        return batch

    def run(
        self,
        batch: dict[str, torch.Tensor],
        global_step: int,
        lr: float | None = None,
        stop: Any = None,
        bad: torch.Tensor | None = None,
    ) -> StepResult:
        """Forward, backward and (when every process's loss is finite) the optimizer step and the bank update.

        ``lr``: set on every parameter group first (None: as it is). ``stop``: a
        :class:`~pirl.training.signals.StopRequest` whose signal, read after the forward pass, the processes
        agree on. ``bad``: the loader's undecodable positions (padded with -1).
        """
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        with autocast(self.device, self.dtype):
            out = self.method.training_step(batch, global_step, self.encoder)
        bad = torch.empty(0, dtype=torch.long) if bad is None else bad
        agreement = Agreement(self.world, out.loss, stop.signum if stop is not None else 0, bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()  # queued before the flags are read: see Agreement
        finite, signum, new_bad = agreement.result()
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.method.after_step(out)
        else:
            self.optimizer.zero_grad(set_to_none=True)  # drop the gradients of the bad batch
        return StepResult(out, finite, signum, new_bad)
