"""The views PIRL learns from: the image view I, the jigsaw view I^t, the rotation view; and the un-augmented
view that evaluation, the kNN monitor and the bank's initialisation use (:func:`eval_transform`).

Every view works on one PIL image and draws all its randomness from torch's global generator, which
:class:`pirl.data.dataset.ViewDataset` seeds per sample, so augmentations are repeatable. All sizes derive
from :class:`pirl.config.DataConfig`: ImageNet (224 / 255 / 64) and 32-pixel images use the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pirl.config.schema import DataConfig
from pirl.data import augment, keys

Transform = Callable[[torch.Tensor], torch.Tensor]


class VisslPhotometric(torch.nn.Module):
    """With probability p: posterize (``bits``, 4-8 by default), sharpness (factor U[``sharpness``], by default
    [0.1, 1.9]), solarize (threshold 0-256), autocontrast, in sequence (VISSL's ImgPilRandomPhotometric)."""

    def __init__(
        self, p: float = 0.66, bits: tuple[int, int] = (4, 8), sharpness: tuple[float, float] = (0.1, 1.9)
    ) -> None:
        super().__init__()
        self.p, self.bits, self.sharpness = p, bits, sharpness

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        img = TF.posterize(img, int(torch.randint(self.bits[0], self.bits[1] + 1, ())))
        img = TF.adjust_sharpness(img, float(torch.empty(()).uniform_(*self.sharpness)))
        threshold = int(torch.randint(0, 257, ()))
        if threshold < 256:  # 256 leaves the image as it is (and torchvision refuses it for uint8)
            img = TF.solarize(img, float(threshold))
        return TF.autocontrast(img)


def _maybe(transform: torch.nn.Module, p: float) -> torch.nn.Module:
    return transform if p == 1.0 else v2.RandomApply([transform], p=p)


def _step_transform(step: augment.Step, size: int) -> torch.nn.Module:
    if isinstance(step, augment.Jitter):
        return _maybe(v2.ColorJitter(*step.strength), step.p)
    if isinstance(step, augment.Photometric):
        return VisslPhotometric(step.p, step.bits, step.sharpness)
    if isinstance(step, augment.Grayscale):
        return v2.RandomGrayscale(step.p)
    if isinstance(step, augment.Flip):
        return v2.RandomHorizontalFlip(step.p)
    if isinstance(step, augment.Blur):
        return _maybe(v2.GaussianBlur(augment.blur_kernel(step, size), step.sigma), step.p)
    raise TypeError(f"unknown augmentation step {step!r}")


def photometric(kind: str, size: int) -> Transform:
    """The per-element augmentation applied to the image and independently to each patch (uint8 CHW in/out):
    the recipe ``kind`` of :data:`pirl.data.augment.RECIPES` for elements of side ``size``."""
    steps = augment.recipe(kind)
    if not steps:
        return v2.Identity()
    return v2.Compose([_step_transform(step, size) for step in steps])


class _View:
    """Shared by the views: upscale small images, normalise to float."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.mean, self.std = list(cfg.mean), list(cfg.std)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        t = TF.pil_to_tensor(img)
        short = min(t.shape[-2:])
        if self.cfg.min_size and short < self.cfg.min_size:
            t = TF.resize(t, self.cfg.min_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return t

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        return TF.normalize(TF.to_dtype(t, torch.float32, scale=True), self.mean, self.std)


class ImageView(_View):
    """I: RandomResizedCrop(image_size, image_scale), then the photometric augmentation. Returns (3, S, S)."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.crop = v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.image_scale), antialias=True)
        self.augment = photometric(cfg.augment, cfg.image_size)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.augment(self.crop(img)))


def jigsaw_geometry(
    crop: int, grid: int, patch: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patch boxes of a jigsaw: (grid*grid, 2) top-left (y, x) corners, one patch per cell at an integer
    offset in [0, cell - patch] per axis, listed in a uniformly random order (or the given ``order``), and that
    order (cell of each patch)."""
    cell = crop // grid
    if order is None:
        order = torch.randperm(grid * grid)
    cells = torch.stack([order // grid, order % grid], dim=1)
    offsets = torch.randint(0, cell - patch + 1, (grid * grid, 2))
    return cells * cell + offsets, order


class JigsawView(_View):
    """I^t: an independent RandomResizedCrop(jigsaw_crop, jigsaw_scale), a grid x grid lattice, one patch per cell,
    the patches shuffled uniformly over all (grid^2)! orders (or in a given ``order``), each augmented on its own.
    Returns ((9, 3, P, P), order)."""

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.crop = v2.RandomResizedCrop(cfg.jigsaw_crop, scale=tuple(cfg.jigsaw_scale), antialias=True)
        self.augment = photometric(cfg.augment, cfg.patch_size)

    def __call__(self, img: torch.Tensor, order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        puzzle = self.crop(img)
        p = self.cfg.patch_size
        corners, order = jigsaw_geometry(self.cfg.jigsaw_crop, self.cfg.grid, p, order)
        patches = [self.normalize(self.augment(puzzle[:, y : y + p, x : x + p])) for y, x in corners.tolist()]
        return torch.stack(patches), order


class PirlViews:
    """Everything one training sample needs, as a dict of tensors.

    ``image`` (3, S, S) unless ``image=False``; ``pretext`` (always named; None for the image alone): "jigsaw" adds
    ``patches`` (9, 3, P, P) and ``order``; "rotation" adds ``rotated`` (3, S, S), a second image view turned by
    ``rotation`` x 90 degrees; "jigsaw_rotation" turns the image by ``rotation`` x 90 degrees before cutting the jigsaw.

    ``permutations`` (|T|, 9), for the covariant Jigsaw task: the patches are shuffled by one row of it, drawn
    uniformly, instead of by any of the 9! orders, and its row index is added as ``permutation``. ``image=False``
    leaves out the image view (a method that does not use it).
    """

    def __init__(
        self,
        cfg: DataConfig,
        pretext: str | None,
        permutations: torch.Tensor | None = None,
        image: bool = True,
    ) -> None:
        self.pretext, self.permutations, self.image = pretext, permutations, image
        self.image_view = ImageView(cfg)
        self.jigsaw_view = JigsawView(cfg)
        self.to_tensor = self.image_view.to_tensor

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        t = self.to_tensor(img)
        out = {keys.IMAGE: self.image_view(t)} if self.image else {}
        if self.pretext in ("rotation", "jigsaw_rotation"):
            out[keys.ROTATION] = torch.randint(0, 4, ())
            turned = torch.rot90(t, int(out[keys.ROTATION]), dims=(-2, -1))
            if self.pretext == "rotation":
                out[keys.ROTATED] = self.image_view(turned)
                return out
            t = turned
        if self.pretext in ("jigsaw", "jigsaw_rotation"):
            order = None
            if self.permutations is not None:
                out[keys.PERMUTATION] = torch.randint(0, len(self.permutations), ())
                order = self.permutations[out[keys.PERMUTATION]]
            out[keys.PATCHES], out[keys.ORDER] = self.jigsaw_view(t, order)
        return out


def eval_transform(
    input_size: int, mean: Sequence[float], std: Sequence[float], resize: int | None = None
) -> v2.Compose:
    """The un-augmented view, on PIL images: Resize(short side) -> CenterCrop -> float tensor -> Normalize.

    The default resize is ``input_size * 256 // 224`` (224 -> 256) for inputs of at least 128 pixels and
    ``input_size`` for small images (CIFAR/STL), where an upscale-then-crop would cut off content.
    """
    if resize is None:
        resize = input_size * 256 // 224 if input_size >= 128 else input_size
    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(input_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
