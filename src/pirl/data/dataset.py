"""Training samples: (views, dataset index, label), with repeatable augmentation and bad-image handling.

Each sample's augmentation is seeded from ``(seed, epoch, index)``, so a sample looks the same whatever the
number of workers or processes, and a resumed run sees exactly the images the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from pirl.data import keys
from pirl.data.indexed import PlainImages, SourceImages  # noqa: F401  (PlainImages: for the trainer and monitor)
from pirl.seeding import mix_seed


class ViewDataset(SourceImages):
    """Wrap an :class:`~pirl.data.sources.ImageSource` with a view function (``views``; the images at
    ``indices``, by default all of them).

    Indexed by ``(epoch, index)`` keys from :class:`EpochSampler` (a plain int means epoch 0). An image that
    cannot be decoded is replaced by the next decodable one; the sample reports the skipped indices in ``bad``
    (a tensor padded with -1 to ``max_skip``) so the trainer can count and report them.
    """

    max_skip = 8

    def __init__(self, source: Any, views: Callable, seed: int = 0, indices: list[int] | None = None) -> None:
        # ``indices`` restricts training to a subset; bank rows are then positions in this subset.
        super().__init__(source, views, indices)
        self.views, self.seed = views, seed

    def _load(self, position: int):
        from pirl.data.images import BadImageError

        bad: list[int] = []
        for attempt in range(self.max_skip + 1):
            pos = (position + attempt) % len(self)
            try:
                img = self.source.load(self.source_index(pos))
                return pos, img, bad
            except BadImageError as err:
                bad.append(pos)
                last = err
        raise last  # noqa: F821  (a long run of undecodable files: let the trainer stop with this message)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, position = key if isinstance(key, tuple) else (0, key)
        pos, img, bad = self._load(position)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, pos))
            sample = self.views(img)
        labels = self.source.labels
        label = labels[self.source_index(pos)] if labels is not None else -1
        sample[keys.INDEX] = torch.tensor(pos)
        sample[keys.LABEL] = torch.tensor(label)
        sample[keys.BAD] = torch.tensor(bad + [-1] * (self.max_skip - len(bad)))
        return sample


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` keys for this rank: a seeded permutation per epoch, cut into global batches
    (the incomplete last one dropped), of which each rank takes a contiguous slice of ``global_batch // world``.

    ``start_step`` skips the first batches of the epoch (mid-epoch resume).
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        assert global_batch % world == 0 and global_batch <= num_samples
        self.num_samples, self.global_batch, self.seed, self.rank, self.world = (
            num_samples,
            global_batch,
            seed,
            rank,
            world,
        )
        self.local_batch = global_batch // world
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5A))
        perm = torch.randperm(self.num_samples, generator=gen).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            for index in perm[start : start + self.local_batch]:
                yield self.epoch, index

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.local_batch
