"""Nearest-neighbour retrieval: for a few seeded test queries, the top-k training images by cosine similarity of
frozen features, drawn as a grid (neighbours framed green when they share the query's label, red otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pirl.errors import PirlError
from pirl.safe_io import save_figure

# Cap on the (chunk x train) similarity matrix, in elements, when scoring every test image.
_MAX_SIM_ELEMENTS = 1 << 27


def nearest(train_feats: torch.Tensor, query_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices), each (Q, min(k, N)), of the most cosine-similar training rows, best first."""
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise PirlError(
            f"retrieval needs 2-D features of equal width, got {tuple(train_feats.shape)} "
            f"and {tuple(query_feats.shape)}"
        )
    if k < 1 or train_feats.shape[0] == 0:
        raise PirlError("retrieval needs k >= 1 and at least one training image")
    bank = F.normalize(train_feats.float(), dim=1)
    chunk = max(1, _MAX_SIM_ELEMENTS // bank.shape[0])
    sims, idx = [], []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].float(), dim=1)
        s, i = (q @ bank.T).topk(min(k, bank.shape[0]), dim=1)
        sims.append(s)
        idx.append(i)
    if not sims:
        return torch.empty(0, min(k, bank.shape[0])), torch.empty(0, min(k, bank.shape[0]), dtype=torch.int64)
    return torch.cat(sims), torch.cat(idx)


def label_metrics(neighbours: torch.Tensor, train_labels: torch.Tensor, query_labels: torch.Tensor) -> dict[str, float]:
    """``precision_at_k``: fraction of neighbours sharing the query's label; ``top1``: fraction of queries whose
    nearest neighbour does."""
    if neighbours.shape[0] == 0:
        raise PirlError("retrieval needs at least one query")
    match = train_labels[neighbours] == query_labels[:, None]
    return {"precision_at_k": match.float().mean().item(), "top1": match[:, 0].float().mean().item()}


def choose_queries(n_test: int, n: int, seed: int) -> list[int]:
    """``n`` distinct test indices (all when there are fewer), seeded, in the order drawn."""
    if n < 1:
        raise PirlError(f"--queries must be at least 1, got {n}")
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def _thumb(img: Image.Image, size: int) -> Image.Image:
    return ImageOps.fit(img.convert("RGB"), (size, size))


def plot_grid(
    query_images: Sequence[Image.Image],
    neighbour_images: Sequence[Sequence[Image.Image]],
    matches: Sequence[Sequence[bool]] | None,
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    size: int = 96,
) -> None:
    """One row per query: the query, then its neighbours framed green (same label) / red (other label)."""
    from matplotlib.figure import Figure  # the object API needs no pyplot state or display

    rows, cols = len(query_images), 1 + max((len(n) for n in neighbour_images), default=0)
    fig = Figure(figsize=(1.3 * cols, 1.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        cells = [query_images[r], *neighbour_images[r]]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.set_axis_off()
                continue
            ax.imshow(_thumb(cells[c], size))
            color = "black" if c == 0 or matches is None else ("tab:green" if matches[r][c - 1] else "tab:red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(1.0 if c == 0 else 3.0)
            if c == 0:
                ax.set_title(titles[r] if titles else "query", fontsize=7)
    save_figure(fig, path, dpi=100)


PROTOCOL_TEMPLATE = (
    "nearest-neighbour retrieval: {queries} test images drawn with seed {seed} query the training "
    "set; top-{k} by cosine similarity of frozen {stage} features; precision_at_k = fraction of "
    "neighbours with the query's label, top1 = fraction of queries whose nearest neighbour has "
    "it (the *_all_test keys: the same over every test image)"
)
