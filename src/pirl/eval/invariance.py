"""Invariance to the pretext transform (paper Fig. 4): l2 distances between unit-norm representations of an
image I and of its transformed version I^t, as histograms, for one or several models.

Two representation spaces:

* ``heads`` (a run directory or checkpoint of a method with a g head): f(v_I) against g(v_{I^t}), as in the paper.
  v_I is the evaluation view (resize, centre crop); I^t is the training pretext made deterministic: the image
  resized and centre-cropped to ``jigsaw_crop``, a grid of cells, the central ``patch_size`` patch of each cell,
  in a seeded random order (rotation pretexts: a seeded turn by 90, 180 or 270 degrees).
* ``trunk`` (trunk-only exports, random init, and methods without a g head: NPID++ and the Jigsaw, Rotation and
  Supervised baselines): the pooled trunk feature of the image against that of the jigsaw-shuffled image (its 3x3
  cells stitched back into a grid in a seeded random order).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pirl.data.indexed import SourceImages
from pirl.data.views import eval_transform
from pirl.device import default_device
from pirl.errors import PirlError
from pirl.eval.features import frozen_batches
from pirl.safe_io import save_figure

SPACES = ("auto", "heads", "trunk")
BINS = 40  # over [0, 2], the range of distances between unit vectors


def unit_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ||a/|a| - b/|b|||_2, in [0, 2]."""
    return (F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).norm(dim=1)


def random_order(grid: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random order of the grid's cells other than the identity (which would not transform)."""
    while True:
        order = torch.randperm(grid * grid, generator=gen)
        if not torch.equal(order, torch.arange(grid * grid)):
            return order


def _centre_square(img: torch.Tensor, side: int) -> torch.Tensor:
    top, left = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
    return img[..., top : top + side, left : left + side]


def crop_to_grid(img: torch.Tensor, grid: int = 3) -> torch.Tensor:
    """The centre square of ``img`` (..., H, W) whose side is a multiple of ``grid``."""
    return _centre_square(img, min(img.shape[-2:]) // grid * grid)


def shuffle_grid(img: torch.Tensor, order: torch.Tensor, grid: int = 3) -> torch.Tensor:
    """``crop_to_grid(img)`` with its cells moved: output cell ``j`` (row-major) is input cell ``order[j]``."""
    x = crop_to_grid(img, grid)
    c = x.shape[-1] // grid
    if c < 1:
        raise PirlError(f"image of {tuple(img.shape[-2:])} pixels is too small for a {grid}x{grid} jigsaw")
    tiles = [x[..., r * c : (r + 1) * c, q * c : (q + 1) * c] for r in range(grid) for q in range(grid)]
    order = order.tolist()
    rows = [torch.cat([tiles[order[r * grid + q]] for q in range(grid)], dim=-1) for r in range(grid)]
    return torch.cat(rows, dim=-2)


def centre_patches(img: torch.Tensor, order: torch.Tensor, grid: int, patch: int) -> torch.Tensor:
    """(grid^2, C, patch, patch): the central patch of every cell of ``img``, patch ``j`` from cell ``order[j]``
    (the layout of :func:`pirl.data.views.jigsaw_geometry`, without its random offsets)."""
    cell = min(img.shape[-2:]) // grid
    if patch > cell:
        raise PirlError(f"patch size {patch} is larger than the jigsaw cell ({cell} pixels)")
    off = (cell - patch) // 2
    out = []
    for j in order.tolist():
        y, x = (j // grid) * cell + off, (j % grid) * cell + off
        out.append(img[..., y : y + patch, x : x + patch])
    return torch.stack(out)


@dataclass
class Subject:
    """One model whose invariance is measured, and how its two inputs are built and embedded."""

    name: str
    space: str  # "heads" or "trunk"
    trunk: nn.Module
    heads: nn.Module | None
    pretext: str  # "jigsaw", "rotation" or "jigsaw_rotation"
    input_size: int
    mean: list[float]
    std: list[float]
    jigsaw_crop: int = 0
    patch_size: int = 0
    grid: int = 3

    def representation(self) -> str:
        if self.space == "heads":
            return f"f(v_I) vs g(v_I^t), pretext {self.pretext}, unit-normalised heads' embeddings"
        return "pooled trunk feature of I vs of I with its 3x3 cells shuffled (trunk only, no heads)"

    def embed(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.space == "trunk":
            return self.trunk(a), self.trunk(b)
        if b.ndim == 5:  # (B, n, 3, P, P) patches, image-major as the jigsaw head expects
            b = b.flatten(0, 1)
        return self.heads["f"](self.trunk(a)), self.heads["g"](self.trunk(b))


class _Pairs(SourceImages):
    """((I, I^t), label): the inputs of a subject for the images at ``indices``; the transform of image i is
    seeded by i."""

    def __init__(self, source: Any, indices: Sequence[int], subject: Subject, seed: int) -> None:
        super().__init__(source, None, indices)
        self.s, self.seed = subject, seed
        self.view = eval_transform(subject.input_size, subject.mean, subject.std)
        if subject.space == "heads" and "jigsaw" in subject.pretext:
            self.jig_view = eval_transform(subject.jigsaw_crop, subject.mean, subject.std, resize=subject.jigsaw_crop)

    def item(self, img: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.s
        if s.space == "trunk":
            t = self.view(img)
            return crop_to_grid(t, s.grid), shuffle_grid(t, random_order(s.grid, gen), s.grid)
        if s.pretext == "rotation":
            t = self.view(img)
            return t, torch.rot90(t, int(torch.randint(1, 4, (), generator=gen)), dims=(-2, -1))
        jig = self.jig_view(img)
        if s.pretext == "jigsaw_rotation":
            jig = torch.rot90(jig, int(torch.randint(1, 4, (), generator=gen)), dims=(-2, -1))
        return self.view(img), centre_patches(jig, random_order(s.grid, gen), s.grid, s.patch_size)


def load_subject(spec: str, space: str = "auto", *, random_init: bool = False, seed: int = 0) -> Subject:
    """The model at ``spec`` in the requested space (``auto``: heads when the checkpoint has a trained g)."""
    from pirl.checkpoint import open_checkpoint
    from pirl.eval.models import load_model

    if space not in SPACES:
        raise PirlError(f"unknown representation space {space!r}; choose one of {', '.join(SPACES)}")
    path = Path(spec)
    is_export = (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    if space != "trunk" and not random_init and path.exists() and not is_export:
        from pirl.config import load_config
        from pirl.methods import build_method

        _, ckpt = open_checkpoint(path)
        cfg = load_config(None, [], base=ckpt["config"])
        if cfg.method.name == "pirl" and cfg.method.lam > 0:
            method = build_method(cfg, 1)  # one bank row: the bank is not needed here
            state = {k[len("encoder.") :]: v for k, v in ckpt["method"].items() if k.startswith("encoder.")}
            try:
                method.encoder.load_state_dict(state)
            except RuntimeError as err:
                raise PirlError(
                    f"{spec}: encoder does not match its config ({str(err).splitlines()[0][:200]})"
                ) from None
            d = cfg.data
            return Subject(
                str(spec),
                "heads",
                method.encoder.trunk.eval(),
                method.encoder.heads.eval(),
                cfg.method.pretext,
                d.image_size,
                list(d.mean),
                list(d.std),
                d.jigsaw_crop,
                d.patch_size,
                d.grid,
            )
        if space == "heads":
            raise PirlError(
                f"{spec}: a {cfg.method.name} run (lam={cfg.method.lam}) has no trained g head; use --space trunk"
            )
    elif space == "heads" and not random_init:
        raise PirlError(f"{spec}: --space heads needs a run directory or checkpoint (exports hold the trunk only)")
    model = load_model(spec, random_init=random_init, seed=seed)
    name = f"random init ({model.arch})" if random_init else str(spec)
    return Subject(name, "trunk", model.trunk.eval(), None, "jigsaw", model.input_size, model.mean, model.std)


BN_STATS = ("running", "batch")


def _with_batch_statistics(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose BatchNorm layers normalise with each batch's own statistics and leave the
    running ones alone (the original is untouched)."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # without running statistics a BatchNorm normalises with the batch's, in eval mode too
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    return module


def distances(
    subject: Subject,
    source: Any,
    indices: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device | None = None,
    bn_stats: str = "running",
) -> torch.Tensor:
    """Distances (CPU float32) between the unit-norm representations of each image and its transformed version.

    ``bn_stats="running"`` measures the model as it is used (eval mode). ``"batch"`` normalises every pass with
    its own batch's statistics, as training does: for PIRL the image pass and the patch pass then each see
    their own statistics, where in eval mode both share one set of running statistics."""
    if bn_stats not in BN_STATS:
        raise PirlError(f"unknown bn_stats {bn_stats!r}; choose one of {', '.join(BN_STATS)}")
    dev = torch.device(device) if device is not None else default_device()
    if bn_stats == "batch":
        if len(indices) % batch_size == 1:  # a last batch of one image has no batch statistics
            batch_size += 1
        subject = dataclasses.replace(
            subject,
            trunk=_with_batch_statistics(subject.trunk),
            heads=_with_batch_statistics(subject.heads) if subject.heads is not None else None,
        )
    modules = [m for m in (subject.trunk, subject.heads) if m is not None]
    for m in modules:
        m.to(dev).eval()

    def pair_distances(pair: list[torch.Tensor], _labels: torch.Tensor) -> torch.Tensor:
        return unit_distances(*subject.embed(*pair)).cpu()

    return torch.cat(
        frozen_batches(
            pair_distances,
            _Pairs(source, indices, subject, seed),
            device=dev,
            batch_size=batch_size,
            num_workers=workers,
        )
    )


def summarise(d: torch.Tensor) -> dict[str, Any]:
    counts, edges = np.histogram(d.numpy(), bins=BINS, range=(0.0, 2.0))
    return {
        "mean": float(d.mean()),
        "std": float(d.std(unbiased=False)),
        "median": float(d.median()),
        "n": int(d.numel()),
        "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
    }


def plot(stats: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Overlaid histograms (fraction of images per bin), one per model, written as a PNG."""
    from matplotlib.figure import Figure  # the object API needs no pyplot state or display

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, s in stats.items():
        edges, counts = np.asarray(s["histogram"]["bin_edges"]), np.asarray(s["histogram"]["counts"])
        label = f"{name} [{s['space']}]: {s['mean']:.3f} ± {s['std']:.3f}"
        ax.stairs(counts / max(counts.sum(), 1), edges, label=label, linewidth=1.6)
    ax.set_xlabel("l2 distance between unit-norm representations of I and I^t")
    ax.set_ylabel("fraction of images")
    ax.set_xlim(0, 2)
    ax.set_title("Invariance to the jigsaw transform (PIRL Fig. 4)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def invariance(
    subjects: Sequence[Subject],
    source: Any,
    *,
    images: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    workers: int = 0,
    device: str | torch.device | None = None,
    bn_stats: str = "running",
) -> dict[str, Any]:
    """Distance statistics of every subject on the same seeded ``images`` images of ``source`` (``bn_stats``: see
    :func:`distances`)."""
    t0 = time.perf_counter()
    if images < 1 or len(source) == 0:
        raise PirlError("invariance needs at least one image")
    gen = torch.Generator().manual_seed(seed)
    indices = sorted(torch.randperm(len(source), generator=gen)[:images].tolist())
    names: dict[str, int] = {}
    stats: dict[str, dict[str, Any]] = {}
    for s in subjects:
        names[s.name] = names.get(s.name, 0) + 1
        name = s.name if names[s.name] == 1 else f"{s.name} #{names[s.name]}"
        d = distances(
            s, source, indices, seed=seed, batch_size=batch_size, workers=workers, device=device, bn_stats=bn_stats
        )
        stats[name] = {"space": s.space, "representation": s.representation(), **summarise(d)}
    return {
        "images": len(indices),
        "bn_stats": bn_stats,
        "mean_distance": {k: v["mean"] for k, v in stats.items()},
        "per_model": {
            k: {f: v[f] for f in ("space", "representation", "mean", "std", "median", "n")} for k, v in stats.items()
        },
        "details": {"per_model": stats},
        "seconds": time.perf_counter() - t0,
    }


PROTOCOL = (
    "paper Fig. 4: l2 distance between unit-normalised representations of an image I and its transformed "
    "version I^t, per model over the same seeded test images. Models with a trained g head (PIRL run "
    "directories / checkpoints): f(v_I) of the centre-cropped image vs g(v_I^t), I^t = the centre patch of "
    "each of the 3x3 cells of the image resized to jigsaw_crop, in a seeded random non-identity order "
    "(rotation pretexts: the image turned by a seeded 90/180/270 degrees). Trunk-only models (exports, "
    "random init, NPID++ and the jigsaw/rotation/supervised baselines): pooled trunk feature of the "
    "centre-cropped image vs of the same image with its 3x3 cells stitched back in a seeded random "
    f"non-identity order. Histograms: {BINS} bins over [0, 2]"
)
