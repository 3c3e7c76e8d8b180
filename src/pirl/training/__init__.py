"""Pretraining: :func:`train` runs a run from its config, data and run directory.

* :mod:`pirl.training.loop`: :func:`train` and the epoch loop.
* :mod:`pirl.training.setup`: the run folder, the data, the method (model, heads, bank), optimizer and encoder.
* :mod:`pirl.training.step`: the step body (:class:`TrainStep`), which the step benchmarks run too.
* :mod:`pirl.training.checkpoints`: what a checkpoint holds, when one is written, resuming.
* :mod:`pirl.training.runlog`: ``metrics.jsonl`` and TensorBoard.
* :mod:`pirl.training.signals`: stop requests (SIGTERM, SIGINT) and DataLoader workers.
* :mod:`pirl.training.bad_images`: undecodable images.
* :mod:`pirl.training.monitor`: the online kNN monitor.
"""

from __future__ import annotations

from pirl.device import choose_device as resolve_device
from pirl.distributed import DistInfo, setup_distributed
from pirl.training.loop import train
from pirl.training.runlog import RunLog
from pirl.training.setup import adapt_to_dataset, subset_indices
from pirl.training.signals import StopRequest
from pirl.training.step import TrainStep, learning_rate

__all__ = [
    "DistInfo",
    "RunLog",
    "StopRequest",
    "TrainStep",
    "adapt_to_dataset",
    "learning_rate",
    "resolve_device",
    "setup_distributed",
    "subset_indices",
    "train",
]
