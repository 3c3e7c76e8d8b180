"""What a run records: ``metrics.jsonl`` and TensorBoard in the run directory (main process only), and the
scalars averaged over the processes that go into them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pirl.checkpoint import atomic_write
from pirl.safe_io import open_append


def mean_over_ranks(world: int, values: dict[str, Any], device: torch.device) -> dict[str, float]:
    """Each scalar averaged over the processes: with equal local batches, the value one process would log for
    the global batch. A collective (one all_reduce) when ``world > 1``."""
    stacked = torch.stack(
        [torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(()) for v in values.values()]
    )
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(values, stacked.tolist()))


class RunLog:
    """metrics.jsonl and TensorBoard in the run directory (main process only).

    ``resumed_step``: the global step of the checkpoint a run continues from. A run that crashed logged steps
    past it that will now be redone; their records are dropped so that every step appears once.
    ``resumed_loss``: the last training loss the kept records hold (NaN if none), what a resumed run reports as
    its loss until it logs one of its own, also when it was already complete and takes no step.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_step: int | None = None) -> None:
        self.enabled = enabled
        self.writer = None
        self.resumed_loss = float("nan")
        if enabled:
            path = run_dir / "metrics.jsonl"
            if resumed_step is not None and path.is_file():
                self.resumed_loss = _last_train_loss(_drop_records_after(path, resumed_step))
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


def _last_train_loss(records: list[dict[str, Any]]) -> float:
    losses = [
        float(r["loss"])
        for r in records
        if r.get("kind") == "train" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    return losses[-1] if losses else float("nan")


def _drop_records_after(path: Path, global_step: int) -> list[dict[str, Any]]:
    """Rewrite ``path`` without the records past ``global_step``; returns the records kept."""
    lines, kept = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record["global_step"] <= global_step:
                lines.append(line + "\n")
                kept.append(record)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
    atomic_write(path, lambda fh: fh.write("".join(lines).encode()))
    return kept
