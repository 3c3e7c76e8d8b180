"""The images of a source at chosen indices, each through a transform: the dataset that evaluation, fine-tuning,
the invariance measure, the kNN monitor and the bank's initialisation all read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["PlainImages", "SourceImages"]


class SourceImages(Dataset):
    """``(transform(image), label)`` for the images of ``source`` at ``indices`` (default: every image), in that
    order. Item ``i`` is image ``indices[i]`` of the source, label -1 where the source has none; an undecodable
    image raises the source's one-line :class:`~pirl.data.images.BadImageError`.

    Subclasses change what an item is by overriding :meth:`item` (which also gets the source index, e.g. to seed a
    transform by it).
    """

    def __init__(
        self, source: Any, transform: Callable[[Any], Any] | None = None, indices: Sequence[int] | None = None
    ) -> None:
        self.source, self.transform = source, transform
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.source)

    def source_index(self, i: int) -> int:
        """The source index of item ``i``."""
        return self.indices[i] if self.indices is not None else i

    def item(self, img: Any, index: int) -> Any:
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, i: int) -> tuple[Any, int]:
        index = self.source_index(i)
        img, label = self.source[index]
        return self.item(img, index), label


class PlainImages(SourceImages):
    """``(transformed image, decodable?)`` for chosen indices of a source, without augmentation (kNN monitor,
    bank initialisation); an undecodable image gives a blank ``(3, size, size)`` image and ``False``, for the
    caller to drop or keep."""

    def __init__(self, source: Any, indices: Sequence[int], transform: Any, size: int) -> None:
        super().__init__(source, transform, indices)
        self.size = size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        from pirl.data.images import BadImageError

        index = self.source_index(i)
        try:
            return self.item(self.source.load(index), index), True
        except BadImageError:  # training skips these too; a side task must not stop a run over one
            return torch.zeros(3, self.size, self.size), False
