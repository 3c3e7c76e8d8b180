"""The photometric augmentation recipes (``data.augment``), as data: one table that both pipelines build from.

A recipe is a sequence of steps applied in order to each element (the image view, and each jigsaw patch on
its own). :func:`pirl.data.views.photometric` turns a recipe into torchvision transforms for one element;
:func:`pirl.data.batched.photometric_batch` applies the same steps as tensor ops to a whole batch. Both read
every parameter from :data:`RECIPES`, so a recipe is defined once. The module imports nothing heavy: the config
takes its list of allowed names, :data:`AUGMENTATIONS`, from here.

Steps:

* :class:`Jitter`: ColorJitter(brightness, contrast, saturation, hue), applied with probability ``p``
  (``p = 1``: always, without a RandomApply draw).
* :class:`Photometric`: VISSL's ImgPilRandomPhotometric: with probability ``p``, posterize to ``bits``
  (a uniform integer in the range, inclusive), sharpness with a factor U[``sharpness``], solarize at a uniform
  threshold in 0-256 (256: unchanged), autocontrast, in that order.
* :class:`Grayscale`: RandomGrayscale(``p``).
* :class:`Flip`: RandomHorizontalFlip(``p``).
* :class:`Blur`: with probability ``p``, a Gaussian blur of sigma U[``sigma``]; the kernel is odd and about
  ``1 / divisor`` of the element's side, at least 3 (SimCLR: 10%).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AUGMENTATIONS",
    "Blur",
    "Flip",
    "Grayscale",
    "Jitter",
    "Photometric",
    "RECIPES",
    "Step",
    "blur_kernel",
    "recipe",
]


@dataclass(frozen=True)
class Jitter:
    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float = 1.0

    @property
    def strength(self) -> tuple[float, float, float, float]:
        return (self.brightness, self.contrast, self.saturation, self.hue)


@dataclass(frozen=True)
class Photometric:
    p: float
    bits: tuple[int, int] = (4, 8)
    sharpness: tuple[float, float] = (0.1, 1.9)


@dataclass(frozen=True)
class Grayscale:
    p: float


@dataclass(frozen=True)
class Flip:
    p: float = 0.5


@dataclass(frozen=True)
class Blur:
    p: float
    sigma: tuple[float, float] = (0.1, 2.0)
    divisor: int = 10


Step = Jitter | Photometric | Grayscale | Flip | Blur

RECIPES: dict[str, tuple[Step, ...]] = {
    # VISSL's PIRL recipe: jitter 0.4 (hue 0.2), the photometric group with p 0.66, grayscale, flip
    "vissl": (Jitter(0.4, 0.4, 0.4, 0.2), Photometric(0.66), Grayscale(0.2), Flip(0.5)),
    # flip, SimCLR's colour distortion (jitter 0.8 with p 0.8, grayscale 0.2), Gaussian blur with p 0.5
    "simclr_blur": (Flip(0.5), Jitter(0.8, 0.8, 0.8, 0.2, p=0.8), Grayscale(0.2), Blur(0.5)),
    # jitter 0.4 (hue 0.1) with p 0.8, grayscale, flip
    "light": (Jitter(0.4, 0.4, 0.4, 0.1, p=0.8), Grayscale(0.2), Flip(0.5)),
    "none": (),
}

#: The names ``data.augment`` accepts.
AUGMENTATIONS: tuple[str, ...] = tuple(RECIPES)


def recipe(kind: str) -> tuple[Step, ...]:
    """The steps of a recipe; ValueError for an unknown name."""
    try:
        return RECIPES[kind]
    except KeyError:
        raise ValueError(f"unknown augmentation {kind!r}") from None


def blur_kernel(step: Blur, size: int) -> int:
    """Odd kernel side of about ``size / divisor``, at least 3."""
    return max(3, (size // step.divisor) | 1)
