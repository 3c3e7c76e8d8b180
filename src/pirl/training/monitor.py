"""Online kNN monitor: the weighted-kNN accuracy of the trunk's pooled features every few epochs of pretraining.

NPID protocol (cosine similarity, the top k neighbours vote with weight ``exp(sim / 0.07)``, k = 20 and 200,
capped at the memory size) on a fixed, seeded sample: a memory of up to ``train.knn_max_images`` labelled
training images against as many queries from ``--val-data``, the test split of ``--data``, or else a held-out
slice of the training images. Images go through the evaluation transform with the trunk in eval mode.

The monitor draws nothing from the global random streams that training uses (``fork_rng``), so a run with it is
bit-identical to one without. Under torch.distributed rank 0 computes while the others wait; rank 0 sends a
heartbeat after every batch, so no single wait comes near ``train.dist_timeout_s`` however long the evaluation.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from pirl.config.schema import Config
from pirl.data.dataset import PlainImages
from pirl.data.sources import FolderSource, ImageSource, TorchvisionSource, open_source
from pirl.device import amp_dtype, autocast
from pirl.errors import PirlError
from pirl.eval.features import eval_transform
from pirl.eval.knn import knn_accuracies
from pirl.training.signals import worker_init

KS = (20, 200)
TEMPERATURE = 0.07
HELD_OUT_FRACTION = 0.2  # of the labelled training images, when there is no other labelled set to query with


@dataclass
class MonitorPlan:
    """Where the monitor's images come from; decided before the run directory exists, so bad input leaves none."""

    memory: ImageSource | None = None  # None: the monitor is off
    memory_is_training: bool = True  # the memory is the training source: data.subset applies to it
    queries: ImageSource | None = None  # None: a held-out slice of the memory's images
    memory_name: str = "training images"
    query_name: str = ""
    off_reason: str = ""  # printed once when the monitor is off for lack of labels
    label_map: list[int] | None = None  # query class index -> memory class index, when the class lists differ


def _labelled(source: ImageSource | None) -> bool:
    return source is not None and source.labels is not None and any(v >= 0 for v in source.labels)


def _same_images(a: ImageSource, b: ImageSource) -> bool:
    """True when two opened sources are the same images (e.g. a folder without train/test splits, opened twice)."""
    if a is b:
        return True
    if type(a) is not type(b) or len(a) != len(b):
        return False
    if isinstance(a, FolderSource):
        return len(a) == 0 or (a.path(0) == b.path(0) and a.path(len(a) - 1) == b.path(len(b) - 1))
    if isinstance(a, TorchvisionSource):
        return a.name == b.name  # the name holds the dataset, split and root
    return getattr(a, "images", None) is not None and getattr(a, "images", None) is getattr(b, "images", None)


def _open_split(spec: str, split: str, root: str | None, download: bool) -> ImageSource | None:
    """``spec``'s ``split`` if it has one; None otherwise. Quiet: the training data's warnings were shown once."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_source(spec, root=root, download=download, split=split)
    except PirlError:
        return None


def _label_map(memory: ImageSource, queries: ImageSource, query_name: str) -> list[int] | None:
    """Map query classes onto memory classes by name when the two class lists differ."""
    if memory.classes is None or queries.classes is None or memory.classes == queries.classes:
        return None
    index = {name: i for i, name in enumerate(memory.classes)}
    missing = [name for name in queries.classes if name not in index]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise PirlError(
            f"{query_name} has classes the training data lacks ({shown}); the kNN monitor needs the same class names"
        )
    return [index[name] for name in queries.classes]


def plan_monitor(
    cfg: Config,
    source: ImageSource,
    data: str | None = None,
    val_data: str | ImageSource | None = None,
    *,
    root: str | None = None,
    download: bool = False,
) -> MonitorPlan:
    """Choose memory and queries (see the module docstring); raises :class:`PirlError` for an unusable --val-data.

    Training data without labels and no ``val_data``: off. Unlabelled training data with a labelled
    ``val_data``: the memory comes from ``val_data``'s train split (or a held-out slice of it).
    """
    if not cfg.train.knn_every:
        return MonitorPlan()
    val = None
    if val_data is not None:
        val = (
            val_data
            if isinstance(val_data, ImageSource)
            else open_source(val_data, root=root, download=download, split="test")
        )
        if not _labelled(val):
            name = val_data if isinstance(val_data, str) else val.name
            raise PirlError(
                f"--val-data {name} has no labels; the kNN monitor needs class subfolders or a labelled dataset"
            )
        if _same_images(val, source):
            val = None  # the training images themselves: every query would find itself in the memory
    if _labelled(source):
        queries, name = val, "--val-data images"
        if queries is None and isinstance(data, str):
            test = _open_split(data, "test", root, download)
            if test is not None and _labelled(test) and not _same_images(test, source):
                queries, name = test, "test-split images of --data"
        if queries is None:
            return MonitorPlan(source, True, None, query_name="held-out training images")
        return MonitorPlan(source, True, queries, query_name=name, label_map=_label_map(source, queries, name))
    if val is None:
        return MonitorPlan(
            off_reason="the training images have no labels; pass --val-data with a labelled set to turn it on"
        )
    train_part = _open_split(val_data, "train", root, download) if isinstance(val_data, str) else None
    if train_part is not None and _labelled(train_part) and not _same_images(train_part, val):
        name = "test-split images of --val-data"
        return MonitorPlan(
            train_part,
            False,
            val,
            "train-split images of --val-data",
            name,
            label_map=_label_map(train_part, val, name),
        )
    return MonitorPlan(val, False, None, "--val-data images", "held-out --val-data images")


def _sample(pool: np.ndarray, size: int, gen: torch.Generator) -> np.ndarray:
    """A seeded random subset of ``pool`` (sorted, for locality on disk)."""
    if len(pool) <= size:
        return pool
    return np.sort(pool[torch.randperm(len(pool), generator=gen)[:size].numpy()])


class KnnMonitor:
    """Every ``train.knn_every`` epochs, kNN accuracy of the trunk on a fixed memory and query set."""

    def __init__(
        self,
        cfg: Config,
        plan: MonitorPlan,
        indices: list[int] | None,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        assert plan.memory is not None
        self.every, self.device, self.rank, self.world = cfg.train.knn_every, device, rank, world
        self.plan = plan
        cap = cfg.train.knn_max_images
        memory_labels = np.asarray(plan.memory.labels, dtype=np.int64)
        pool = np.asarray(
            indices if plan.memory_is_training and indices is not None else range(len(plan.memory)), dtype=np.int64
        )
        pool = pool[memory_labels[pool] >= 0]  # unlabelled images of a partly labelled set cannot vote
        gen = torch.Generator().manual_seed(cfg.train.seed)  # never the global generator: training's stream
        if plan.queries is None:
            held = min(cap, max(1, int(len(pool) * HELD_OUT_FRACTION)))
            perm = pool[torch.randperm(len(pool), generator=gen).numpy()]
            self.query_source, query_idx = plan.memory, np.sort(perm[:held])
            memory_idx = np.sort(perm[held : held + cap])
            query_labels = memory_labels
        else:
            self.query_source = plan.queries
            query_labels = np.asarray(plan.queries.labels, dtype=np.int64)
            query_idx = _sample(np.flatnonzero(query_labels >= 0), cap, gen)
            memory_idx = _sample(pool, cap, gen)
            if plan.label_map is not None:
                query_labels = np.where(query_labels >= 0, np.asarray(plan.label_map)[query_labels], -1)
        self.memory_idx, self.query_idx = memory_idx.tolist(), query_idx.tolist()
        self.memory_labels = torch.from_numpy(memory_labels[memory_idx])
        self.query_labels = torch.from_numpy(query_labels[query_idx])
        self.size = cfg.data.image_size
        self.transform = eval_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std)
        self.batch_size = max(1, cfg.optim.batch_size // world)  # fits: training holds more per image
        self.workers = cfg.data.workers
        use_cuda = device.type == "cuda"
        self.amp_dtype = amp_dtype(device) if cfg.train.amp else None
        self.rng_devices = [torch.cuda.current_device() if device.index is None else device.index] if use_cuda else []
        # NCCL only moves CUDA tensors; gloo takes CPU ones
        self.comm_device = device if world > 1 and dist.get_backend() == "nccl" else torch.device("cpu")

    def describe(self) -> str:
        return (
            f"kNN monitor: every {self.every} epoch(s), weighted kNN (k={KS[0]}, {KS[1]}; T={TEMPERATURE}) of "
            f"{len(self.query_idx)} {self.plan.query_name} against {len(self.memory_idx)} "
            f"{self.plan.memory_name}"
        )

    def due(self, epochs_done: int, total_epochs: int) -> bool:
        """At the end of every ``knn_every``-th epoch, and of the last one."""
        return epochs_done % self.every == 0 or epochs_done == total_epochs

    def run(self, trunk: nn.Module, epochs_done: int, global_step: int, log: Any) -> dict[str, float] | None:
        """Evaluate ``trunk`` (the bare module, not a DDP wrapper); log and return the accuracies (rank 0)."""
        if self.rank != 0:
            self._wait()
            return None
        start = time.perf_counter()
        was_training = trunk.training
        with torch.random.fork_rng(devices=self.rng_devices):  # DataLoader iterators draw a seed from it
            trunk.eval()
            try:
                mem_f, mem_ok = self._features(trunk, self.plan.memory, self.memory_idx)
                query_f, query_ok = self._features(trunk, self.query_source, self.query_idx)
            finally:
                trunk.train(was_training)
        self._beat(False)
        mem_y, query_y = self.memory_labels[mem_ok], self.query_labels[query_ok]
        if not len(mem_y) or not len(query_y):
            print(f"kNN monitor, epoch {epochs_done}: skipped, no decodable images", flush=True)
            return None
        accs = knn_accuracies(
            mem_f[mem_ok.to(mem_f.device)],
            mem_y,
            query_f[query_ok.to(query_f.device)],
            query_y,
            ks=KS,
            temperature=TEMPERATURE,
        )
        seconds = time.perf_counter() - start
        values = {f"knn_top1_k{k}": accs[k] for k in KS}
        log.record(
            "eval",
            global_step,
            {
                "epoch": epochs_done,
                **values,
                "knn_memory_images": len(mem_y),
                "knn_query_images": len(query_y),
                "knn_seconds": seconds,
            },
        )
        print(
            f"kNN monitor, epoch {epochs_done}: top-1 {accs[KS[0]]:.4f} (k={KS[0]}), {accs[KS[1]]:.4f} "
            f"(k={min(KS[1], len(mem_y))}) on {len(query_y)} images against {len(mem_y)} ({seconds:.1f} s)",
            flush=True,
        )
        return values

    def _features(self, trunk: nn.Module, source: ImageSource, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(
            PlainImages(source, indices, self.transform, self.size),
            batch_size=self.batch_size,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init,
        )  # the trainer decides when to stop
        feats, oks = [], []
        with torch.no_grad():
            for images, ok in loader:
                with autocast(self.device, self.amp_dtype):
                    out = trunk(images.to(self.device, non_blocking=True))
                feats.append(torch.flatten(out, 1).float())
                oks.append(ok)
                self._beat(True)
        return torch.cat(feats), torch.cat(oks)

    def _beat(self, working: bool) -> None:
        """Rank 0: tell the waiting ranks it is still working (True) or done (False)."""
        if self.world > 1:
            dist.broadcast(torch.tensor([int(working)], dtype=torch.int32, device=self.comm_device), src=0)

    def _wait(self) -> None:
        """Other ranks: follow rank 0's heartbeats until it is done; each wait lasts one batch of rank 0's work."""
        flag = torch.ones(1, dtype=torch.int32, device=self.comm_device)
        while bool(flag.item()):
            dist.broadcast(flag, src=0)


def start_monitor(
    plan: MonitorPlan, cfg: Config, indices: list[int] | None, device: torch.device, rank: int = 0, world: int = 1
) -> KnnMonitor | None:
    """The monitor for this run, or None when it is off; rank 0 says which in one line."""
    say = print if rank == 0 else (lambda *args, **kwargs: None)
    if plan.memory is None:
        if plan.off_reason:
            say(f"kNN monitor: off ({plan.off_reason})", flush=True)
        return None
    monitor = KnnMonitor(cfg, plan, indices, device, rank, world)
    if len(monitor.memory_idx) < 1 or len(monitor.query_idx) < 1:
        say("kNN monitor: off (too few labelled images)", flush=True)
        return None
    say(monitor.describe(), flush=True)
    return monitor
