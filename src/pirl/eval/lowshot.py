"""Low-shot linear SVMs on frozen features (the VOC07 low-shot protocol of Goyal et al. 2019, single-label).

For each number ``n`` of labelled images per class and each seed, ``n`` training images of every class are
sampled, a one-vs-rest linear SVM (squared hinge, L2 penalty) is fitted on L2-normalised features with its cost
chosen by cross-validation on that sample, and its top-1 accuracy on the whole test set is recorded. VOC07 is
multi-label and reports mAP; on single-label data the natural metric is top-1 of the argmax of the class scores.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pirl.errors import PirlError

DEFAULT_SHOTS = (1, 2, 4, 8, 16, 32, 64, 96)
# The VOC07 SVM cost grid of VISSL / Goyal'19.
DEFAULT_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
CV_FOLDS = 3  # as the Goyal'19 benchmark code
FALLBACK_COST = 1.0  # n = 1: nothing left over to validate on


def cv_description(n: int, folds: int = CV_FOLDS) -> str:
    """How the cost is chosen for ``n`` images per class (also written into the protocol)."""
    if n < 2:
        return f"none (1 image per class leaves nothing to validate on): C={FALLBACK_COST}"
    k = min(folds, n)
    return f"stratified {k}-fold" + (" (leave-one-out per class)" if k == n else "")


def sample_per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` images of every class, drawn without replacement with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        picked.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(picked))


def _svm(cost: float, seed: int):
    from sklearn.svm import LinearSVC

    # dual="auto" solves the dual when there are fewer samples than dimensions: always, for low shots.
    return LinearSVC(C=cost, loss="squared_hinge", penalty="l2", dual="auto", max_iter=2000, random_state=seed)


def choose_cost(x: np.ndarray, y: np.ndarray, costs: Sequence[float], n: int, seed: int) -> tuple[float, dict]:
    """Cost with the best mean cross-validated accuracy (ties: the smaller cost, i.e. the stronger penalty)."""
    if n < 2 or len(costs) == 1:
        return (FALLBACK_COST if n < 2 else float(costs[0])), {}
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=min(CV_FOLDS, n), shuffle=True, random_state=seed)
    scores = {
        float(c): float(cross_val_score(_svm(c, seed), x, y, cv=folds, scoring="accuracy").mean())
        for c in sorted(costs)
    }
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores


def lowshot_svm(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int = 5,
    costs: Sequence[float] = DEFAULT_COSTS,
    base_seed: int = 0,
) -> dict[str, Any]:
    """Mean and std (over ``seeds`` samples) of test top-1 for each ``n`` in ``shots``.

    Shots larger than the smallest class are skipped (listed in ``skipped_shots``). ``top1`` is the mean at
    the largest ``n`` evaluated. Unlabelled rows (label < 0) are ignored.
    """
    t0 = time.perf_counter()
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise PirlError(
            f"low-shot SVM needs 2-D features of equal width, got {tuple(train_feats.shape)} "
            f"and {tuple(test_feats.shape)}"
        )
    if not shots or min(shots) < 1 or seeds < 1 or not costs or min(costs) <= 0:
        raise PirlError("low-shot SVM needs shots >= 1, seeds >= 1 and positive costs")
    keep_tr, keep_te = train_labels >= 0, test_labels >= 0
    x_tr = F.normalize(train_feats[keep_tr].double(), dim=1).numpy()
    x_te = F.normalize(test_feats[keep_te].double(), dim=1).numpy()
    y_tr, y_te = train_labels[keep_tr].numpy(), test_labels[keep_te].numpy()
    classes, counts = np.unique(y_tr, return_counts=True)
    if len(classes) < 2 or len(y_te) == 0:
        raise PirlError("low-shot SVM needs at least two labelled classes and a labelled test set")
    fewest = int(counts.min())
    ns = sorted({int(n) for n in shots})
    skipped = [n for n in ns if n > fewest]
    ns = [n for n in ns if n <= fewest]
    if not ns:
        raise PirlError(f"every shot count exceeds the smallest class ({fewest} training images)")
    by_shot: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        # liblinear's "did not converge" at extreme costs only affects costs that CV then rejects.
        warnings.simplefilter("ignore")
        for n in ns:
            accs, chosen = [], []
            for s in range(seeds):
                seed = (base_seed * 1000 + s) % 2**32  # scikit-learn's random_state range
                idx = sample_per_class(y_tr, n, seed)
                cost, _ = choose_cost(x_tr[idx], y_tr[idx], costs, n, seed)
                clf = _svm(cost, seed).fit(x_tr[idx], y_tr[idx])
                accs.append(float((clf.predict(x_te) == y_te).mean()))
                chosen.append(cost)
            by_shot[str(n)] = {
                "mean": float(np.mean(accs)),
                "std": float(np.std(accs)),
                "top1_per_seed": accs,
                "cost_per_seed": chosen,
                "cost_selection": cv_description(n),
            }
    return {
        "top1": by_shot[str(ns[-1])]["mean"],
        "top1_shots": ns[-1],
        "top1_by_shot": {k: v["mean"] for k, v in by_shot.items()},
        "std_by_shot": {k: v["std"] for k, v in by_shot.items()},
        "skipped_shots": skipped,
        "num_classes": len(classes),
        "seeds": seeds,
        "costs": [float(c) for c in costs],
        "details": {"by_shot": by_shot},
        "seconds": time.perf_counter() - t0,
    }


def protocol(seeds: int, costs: Sequence[float]) -> str:
    return (
        f"low-shot linear SVMs (VOC07 low-shot protocol of Goyal'19, single-label): n training images per "
        f"class sampled with each of {seeds} seeds; one-vs-rest LinearSVC (squared hinge, L2) on L2-normalised "
        f"frozen features; cost from {list(costs)} by stratified min({CV_FOLDS}, n)-fold cross-validation on "
        f"the sample (n=2 is leave-one-out per class; n=1 cannot be validated and uses C={FALLBACK_COST}); "
        "test top-1 of the argmax class score; mean and population std over seeds; top1 = mean at the "
        "largest n"
    )
