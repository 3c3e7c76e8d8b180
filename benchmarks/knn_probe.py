"""Shared by the benchmark scripts: weighted kNN (NPID protocol) of a trunk on chosen CIFAR-style splits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pirl.data.sources import open_source
from pirl.eval.features import eval_transform, extract_features
from pirl.eval.knn import knn_accuracies
from pirl.eval.models import LabeledImages, LoadedModel

PickIndices = Callable[[int], Sequence[int]]  # dataset length -> the indices to use


class Picked(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def trunk_knn(
    model: LoadedModel, data: str, pick_train: PickIndices, pick_test: PickIndices, ks: tuple[int, ...] = (20, 200)
) -> dict[int, float]:
    """kNN accuracies at each k: features of the picked train-split images against the picked test-split images."""
    transform = eval_transform(model.input_size, model.mean, model.std)
    feats = []
    for split, pick in (("train", pick_train), ("test", pick_test)):
        dataset = LabeledImages(open_source(data, split=split), transform)
        feats.extend(extract_features(model.trunk, Picked(dataset, pick(len(dataset))), num_workers=1, device="cpu"))
    return knn_accuracies(*feats, ks=ks)
