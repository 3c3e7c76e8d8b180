"""Weighted k-nearest-neighbour classifier on frozen features (Wu et al. 2018, NPID).

Cosine similarity between L2-normalised features; each of the top-k neighbours votes for its class with
weight ``exp(sim / T)``. Test points are processed in chunks so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from pirl.errors import PirlError

# Cap on the (chunk x train) similarity matrix, in elements (~512 MiB of float32).
_MAX_SIM_ELEMENTS = 1 << 27


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise PirlError(
            f"kNN needs 2-D features of equal width, got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise PirlError(f"kNN: {train_labels.shape[0]} train labels for {train_feats.shape[0]} train features")
    if train_feats.shape[0] == 0:
        raise PirlError("kNN needs at least one training feature")


def knn_predict_multi(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    ks: Iterable[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> dict[int, torch.Tensor]:
    """Predictions for several ``k`` at once from a single top-max(k) search; returns ``{k: LongTensor}``.

    ``exclude_self=True`` is leave-one-out on the training set: ``test_feats`` must be the training features
    and row ``i`` never votes for itself. ``k`` larger than the number of candidates is clamped.
    Computation happens on ``train_feats``' device; results are on the CPU.
    """
    _check(train_feats, train_labels, test_feats)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise PirlError(f"kNN: k must be >= 1, got {ks}")
    n_train = train_feats.shape[0]
    if exclude_self and test_feats.shape[0] != n_train:
        raise PirlError("kNN exclude_self=True needs the test set to be the training set")
    dev = train_feats.device
    train_labels = train_labels.to(dev, torch.int64)
    n_cls = int(num_classes) if num_classes is not None else int(train_labels.max()) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    k_max = min(ks[-1], n_train - int(exclude_self))
    if k_max < 1:
        raise PirlError("kNN exclude_self=True needs at least two training features")
    chunk = max(1, min(chunk_size, _MAX_SIM_ELEMENTS // n_train))
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start : start + chunk].to(dev).float(), dim=1)
        sim = query @ bank.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=dev)
            sim[rows, rows + start] = float("-inf")
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, so the first k columns are the top-k
        weights = (top_sim / temperature).exp()
        top_lab = train_labels[top_idx]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(sim.shape[0], n_cls, device=dev)
            votes.scatter_add_(1, top_lab[:, :kk], weights[:, :kk])
            preds[k].append(votes.argmax(dim=1).cpu())
    return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.int64) for k, v in preds.items()}


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Weighted-kNN class predictions (LongTensor, CPU) for ``test_feats``."""
    return knn_predict_multi(
        train_feats,
        train_labels,
        test_feats,
        ks=(k,),
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        exclude_self=exclude_self,
    )[k]


def _accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    if preds.shape[0] != labels.shape[0]:
        raise PirlError(f"kNN: {labels.shape[0]} test labels for {preds.shape[0]} test features")
    if preds.shape[0] == 0:
        raise PirlError("kNN accuracy needs at least one test feature")
    return (preds == labels.cpu().to(torch.int64)).float().mean().item()


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the weighted kNN classifier."""
    preds = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        exclude_self=exclude_self,
    )
    return _accuracy(preds, test_labels)


def knn_accuracies(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Iterable[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> dict[int, float]:
    """Top-1 accuracy for each ``k`` in ``ks``, sharing one top-max(k) neighbour search."""
    preds = knn_predict_multi(
        train_feats,
        train_labels,
        test_feats,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        exclude_self=exclude_self,
    )
    return {k: _accuracy(p, test_labels) for k, p in preds.items()}
