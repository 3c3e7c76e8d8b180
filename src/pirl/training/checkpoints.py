"""A run's checkpoints: what one holds, when one is written (end of every epoch, every
``train.checkpoint_every_steps`` steps, on a stop request) and resuming from the latest. Writing and reading
the files is :mod:`pirl.checkpoint`'s."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pirl.checkpoint import load_latest, save_checkpoint
from pirl.config import Config, config_to_dict
from pirl.errors import PirlError
from pirl.run_dir import resume_changes


@dataclass
class Progress:
    """Where a run stands: completed epochs plus steps of the next one, the global step, the undecodable images
    met so far and the latest checkpoint written or resumed from."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    bad_seen: set[int] = field(default_factory=set)
    checkpoint: Path | None = None
    resumed_changes: dict[str, list[Any]] = field(default_factory=dict)  # config keys changed on resume


def resume_progress(
    run_dir: Path,
    cfg: Config,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    num_samples: int,
    is_main: bool,
) -> Progress:
    """Load the latest checkpoint of ``run_dir`` into ``method``, ``optimizer`` and the CPU random generator;
    a fresh :class:`Progress` (with a warning) when there is none."""
    # Into CPU memory: load_state_dict copies to the device, and a sharded bank keeps only its rows of the full one.
    found = load_latest(run_dir, map_location="cpu")
    if found is None:
        warnings.warn(f"--resume: no checkpoint in {run_dir}; starting from scratch", stacklevel=3)
        return Progress()
    path, state = found
    missing = [k for k in ("config", "method", "optimizer", "epoch", "step", "global_step", "rng") if k not in state]
    if missing or not isinstance(state["rng"], dict) or "torch" not in state["rng"]:
        raise PirlError(f"{path}: cannot resume from it, it lacks {', '.join(missing) or 'rng.torch'}")
    changes = resume_changes(state["config"], config_to_dict(cfg), state.get("num_samples"), num_samples)
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    done = Progress(
        state["epoch"], state["step"], state["global_step"], set(state.get("bad_images", [])), path, changes
    )
    torch.set_rng_state(state["rng"]["torch"].cpu())  # the CPU generator's state, whatever map_location
    if is_main:
        print(f"resumed from {path} (epoch {done.epoch}, step {done.step})", flush=True)
    return done


class Checkpointer:
    """Writes the checkpoint of the run's current state (main process; every process joins the bank gather)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        method: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        num_samples: int,
        is_main: bool,
    ) -> None:
        self.run_dir, self.cfg, self.method, self.optimizer = run_dir, cfg, method, optimizer
        self.num_samples, self.is_main = num_samples, is_main

    def save(self, done: Progress, epoch: int, step: int) -> None:
        """Checkpoint ``epoch`` completed epochs plus ``step`` steps; ``done.checkpoint`` becomes its path."""
        # The full bank, whatever its kind: a run resumes with either kind and any number of processes.
        bank = getattr(self.method, "bank", None)
        full_bank = bank.full_memory() if bank is not None else None  # a collective when sharded: every rank joins
        if not self.is_main:
            return
        method_state = self.method.state_dict()
        if full_bank is not None:
            method_state["bank.memory"] = full_bank
        state = {
            "config": config_to_dict(self.cfg),
            "epoch": epoch,
            "step": step,
            "global_step": done.global_step,
            "num_samples": self.num_samples,
            "method": method_state,
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "bad_images": sorted(done.bad_seen),
        }
        done.checkpoint = save_checkpoint(self.run_dir, state, epoch, step, self.cfg.train.keep_checkpoints)

    def due(self, global_step: int, step_in_epoch: int, steps_per_epoch: int) -> bool:
        """Every ``train.checkpoint_every_steps`` steps, except at an epoch's end (which has its own)."""
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and global_step % every == 0 and step_in_epoch + 1 < steps_per_epoch
