"""Running under ``torchrun``: the process group, collectives that gradients flow through
(:mod:`pirl.distributed.collectives`) and BatchNorm over the global batch (:mod:`pirl.distributed.sync_bn`).
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pirl.distributed.collectives import distributed


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
        # A process group left to interpreter finalization can abort the process (gloo's worker threads free
        # tensors after Python is gone): a finished run would exit with SIGABRT. Destroy it while Python lives.
        atexit.register(teardown_distributed)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown_distributed() -> None:
    """Leave the process group, if this process joined one (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(dinfo: DistInfo, device: torch.device) -> None:
    """Wait for every process (nothing to wait for in a single process)."""
    if dinfo.world > 1 and device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    elif dinfo.world > 1:
        dist.barrier()


__all__ = ["DistInfo", "barrier", "distributed", "setup_distributed", "teardown_distributed"]
