"""Linear probe (multinomial logistic regression) on frozen, pre-extracted features.

Features are standardised with training statistics; the L2 penalty is picked on a stratified held-out split of
the training features, then the probe is refit on all training features and scored on the test set. The
problem is convex, so full-batch L-BFGS from a zero init needs no learning-rate schedule and is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pirl.errors import PirlError

# Half-decades where standardised features usually have their optimum; the grid grows a decade at a time while
# the best value lies on its edge, so the chosen penalty is an interior point unless the growth limit is reached.
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# How far the grid may grow past its edges: one decade per step, at most this many steps in all.
MAX_GRID_EXTENSIONS = 3


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) holding out ``fraction`` of every class (at least one sample of any class with 2+)."""
    gen = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train_idx: list[torch.Tensor] = []
    val_idx: list[torch.Tensor] = []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = min(max(round(fraction * idx.numel()), 1), idx.numel() - 1) if fraction > 0 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0)
    # Constant (e.g. dead-ReLU) dimensions would otherwise blow up on test points.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean, std


def _fit(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + wd/2 * ||W||^2 (bias unpenalised) with full-batch L-BFGS."""
    if init is None:
        w = torch.zeros(x.shape[1], num_classes, device=x.device)
        b = torch.zeros(num_classes, device=x.device)
    else:
        w, b = init[0].clone(), init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w), y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _top1(x: torch.Tensor, y: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> float:
    if y.numel() == 0:
        return float("nan")
    return (torch.addmm(params[1], x, params[0]).argmax(1) == y).float().mean().item()


def _best(val_scores: dict[float, float]) -> float:
    """The penalty with the best held-out accuracy; ties go to the stronger penalty."""
    return max(sorted(val_scores, reverse=True), key=lambda wd: val_scores[wd])


def _edge_best(val_scores: dict[float, float]) -> float | None:
    """The largest or smallest penalty tried when it alone holds the best held-out accuracy, else None (a tie with
    an inner value means the optimum is already inside the grid)."""
    top = max(val_scores.values())
    winners = [wd for wd, v in val_scores.items() if v == top]
    if len(winners) == 1 and winners[0] in (max(val_scores), min(val_scores)):
        return winners[0]
    return None


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    max_iter: int = 100,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train a linear classifier on frozen features and report test top-1.

    Returns ``top1`` (test accuracy fraction), ``val_top1`` (held-out accuracy of the chosen penalty, NaN when
    there was nothing to select), ``weight_decay`` (chosen), ``val_top1_by_weight_decay``, ``train_top1``,
    ``max_iter``, ``num_classes`` and ``seconds``. ``max_iter`` bounds the L-BFGS iterations per fit. When the
    best held-out penalty is the largest or smallest of ``weight_decays``, the grid is extended a decade at a
    time (at most ``MAX_GRID_EXTENSIONS`` steps in all) until it is not; ``grid_extensions`` counts the extra
    fits and ``weight_decay_at_edge`` says whether the best value is still on an edge.
    """
    t0 = time.perf_counter()
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise PirlError(
            f"linear probe needs 2-D features of equal width, got {tuple(train_feats.shape)} "
            f"and {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],) or test_labels.shape != (test_feats.shape[0],):
        raise PirlError("linear probe: one label per feature row is required")
    if train_feats.shape[0] == 0 or not weight_decays:
        raise PirlError("linear probe needs training features and at least one weight decay")
    if not 0.0 <= val_fraction < 1.0:
        raise PirlError(f"linear probe: val_fraction must be in [0, 1), got {val_fraction}")
    dev = torch.device(device) if device is not None else train_feats.device
    x_train = train_feats.to(dev, torch.float32)
    x_test = test_feats.to(dev, torch.float32)
    y_train = train_labels.to(dev, torch.int64)
    y_test = test_labels.to(dev, torch.int64)
    n_cls = num_classes or int(max(y_train.max(), y_test.max() if y_test.numel() else 0)) + 1

    mean, std = _standardiser(x_train)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    wds = sorted({float(wd) for wd in weight_decays}, reverse=True)
    val_scores: dict[float, float] = {}
    fitted: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    extended = 0
    if len(wds) > 1 and val_fraction > 0:
        tr, va = stratified_split(y_train, val_fraction, seed)
        if va.numel() > 0:
            tr, va = tr.to(dev), va.to(dev)

            def score(grid: list[float], init: tuple[torch.Tensor, torch.Tensor] | None) -> None:
                for wd in grid:  # in the order given: each solution warm-starts the next fit
                    init = _fit(x_train[tr], y_train[tr], n_cls, wd, max_iter, init)
                    fitted[wd] = init
                    val_scores[wd] = _top1(x_train[va], y_train[va], init)

            score(wds, None)  # strongest penalty first
            for _ in range(MAX_GRID_EXTENSIONS):
                edge = _edge_best(val_scores)
                if edge is None:
                    break
                step = 10.0 if edge == max(val_scores) else 0.1
                score([float(f"{edge * step:.6g}")], fitted[edge])
                extended += 1
    if val_scores:
        best = _best(val_scores)
    else:
        best = wds[0] if len(wds) == 1 else wds[len(wds) // 2]
    params = _fit(x_train, y_train, n_cls, best, max_iter, fitted.get(best))
    return {
        "top1": _top1(x_test, y_test, params),
        "val_top1": val_scores.get(best, float("nan")),
        "weight_decay": best,
        "val_top1_by_weight_decay": dict(sorted(val_scores.items())),
        # True when the best penalty is, alone, the largest or smallest tried even after extending the grid.
        "weight_decay_at_edge": bool(val_scores) and _edge_best(val_scores) is not None,
        "grid_extensions": extended,
        "train_top1": _top1(x_train, y_train, params),
        "max_iter": max_iter,
        "num_classes": n_cls,
        "seconds": time.perf_counter() - t0,
    }
