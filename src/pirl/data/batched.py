"""The PIRL views made for a whole batch at once, on tensors on any device (``data.batched_views``).

With ``data.batched_views: true``, DataLoader workers only decode and resize (:class:`DecodeResize`) and
:class:`BatchedViews` makes the image view and the jigsaw on the training device, GPU or CPU (on CPU about
30x the per-sample pipeline per thread, so it costs a few percent of a step). The geometry is that of
:mod:`pirl.data.views`: a RandomResizedCrop per sample for each view, a grid x grid lattice of
``jigsaw_crop // grid`` cells, one ``patch_size`` patch per cell at a random integer offset, a uniformly random
order. The photometric augmentation is the same recipe per element (image or patch), written as tensor ops
vectorised over all elements, with torchvision's formulas: ColorJitter is brightness, contrast, saturation and
hue (H shifted in HSV) as in ``torchvision.transforms.v2.functional``, with each element's own factors and its
own random order of the four, as ColorJitter's ``randperm(4)`` per call.

All randomness comes from the ``torch.Generator`` passed in. Draws are made for the whole global batch and a
process keeps its own rows, so several processes see the views one process would have made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from pirl.config.schema import DataConfig
from pirl.data import augment, keys
from pirl.data.views import PirlViews

__all__ = ["BatchedViews", "DecodeResize", "decode_size", "photometric_batch"]

_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range, as in views.py
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
# _hue's triangles for R, G, B: clamp(sign * |h - centre| + offset, 0, 1), each (1, 3, 1, 1)
_HUE_TRIANGLES = tuple(torch.tensor(v).view(1, 3, 1, 1) for v in ([3.0, 2.0, 4.0], [-1.0, 1.0, 1.0], [2.0, -1.0, -1.0]))
_DEVICE_COPIES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _cached(tensors: tuple[torch.Tensor, ...], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Constants copied to a device once: a host-to-device copy each step would wait for the GPU."""
    key = (tuple(tuple(t.flatten().tolist()) for t in tensors), str(device), dtype)
    if key not in _DEVICE_COPIES:
        _DEVICE_COPIES[key] = tuple(t.to(device, dtype) for t in tensors)
    return _DEVICE_COPIES[key]


def decode_size(cfg: DataConfig) -> int:
    """Longer side of a decoded image: 4/3 of the largest view, so a 4:3 image keeps that size on its short side."""
    return math.ceil(max(cfg.image_size, cfg.jigsaw_crop) * 4 / 3)


class DecodeResize:
    """Per-sample work left to the DataLoader: RGB PIL image -> ``{"image": uint8 (3, R, R), "size": (h, w)}``.

    The image is resized (aspect kept) so that its longer side is R = :func:`decode_size`, then padded at the
    bottom and right by repeating its last row and column, so that a fixed-size batch can be stacked and a crop
    that touches the edge never blends in padding. ``size`` is the part holding the image.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.size = decode_size(cfg)

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        w, h = img.size
        scale = self.size / max(w, h)
        nw, nh = min(self.size, max(1, round(w * scale))), min(self.size, max(1, round(h * scale)))
        t = TF.pil_to_tensor(img.resize((nw, nh), Image.Resampling.BILINEAR))  # PIL antialiases when shrinking
        out = torch.empty(3, self.size, self.size, dtype=torch.uint8)
        out[:, :nh, :nw] = t
        out[:, :nh, nw:] = t[:, :, -1:]
        out[:, nh:, :] = out[:, nh - 1 : nh, :]
        return {keys.IMAGE: out, keys.SIZE: torch.tensor([nh, nw])}


@dataclass
class _Draws:
    """Uniform draws for a global batch of ``total`` samples, of which this process keeps rows offset:offset+batch."""

    gen: torch.Generator
    batch: int
    total: int
    offset: int
    device: torch.device

    def uniform(self, *shape: int) -> torch.Tensor:
        u = torch.rand((self.total, *shape), generator=self.gen, device=self.device)
        return u[self.offset : self.offset + self.batch]

    def between(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * self.uniform(*shape)

    def integers(self, high: torch.Tensor | int, *shape: int) -> torch.Tensor:
        """Integers in [0, high) (``high`` broadcast against the draw)."""
        return (self.uniform(*shape) * high).floor().long().clamp_min(0)

    def bernoulli(self, p: float, *shape: int) -> torch.Tensor:
        return self.uniform(*shape) < p


def _resized_crop_boxes(
    draws: _Draws, height: torch.Tensor, width: torch.Tensor, scale: tuple[float, float]
) -> torch.Tensor:
    """RandomResizedCrop.get_params for every sample at once: (B, 4) float boxes (top, left, h, w).

    Ten attempts per sample, the first that fits wins; otherwise the central crop clamped to the ratio range.
    """
    attempts = 10
    area = (height * width).unsqueeze(1).float()
    target = area * draws.between(scale[0], scale[1], attempts)
    ratio = torch.exp(draws.between(math.log(_RATIO[0]), math.log(_RATIO[1]), attempts))
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (h > 0) & (w <= width.unsqueeze(1)) & (h <= height.unsqueeze(1))
    first = fits.float().argmax(1, keepdim=True)
    w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), fits.any(1)
    # fallback: the whole image, cut to the nearest allowed ratio
    hf, wf = height.float(), width.float()
    in_ratio = wf / hf
    fw = torch.where(in_ratio > _RATIO[1], torch.round(hf * _RATIO[1]), wf)
    fh = torch.where(in_ratio < _RATIO[0], torch.round(wf / _RATIO[0]), hf)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = draws.uniform(2)
    top = torch.where(found, torch.floor(u[:, 0] * (hf - h + 1)), torch.div(hf - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, 1] * (wf - w + 1)), torch.div(wf - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1)


def _unrotate_boxes(boxes: torch.Tensor, height: torch.Tensor, width: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boxes drawn in the frame of ``torch.rot90(image, k)`` mapped back onto the (height x width) image."""
    top, left, h, w = boxes.unbind(1)
    hf, wf = height.float(), width.float()
    by_k = [
        (top, left, h, w),
        (left, wf - top - h, w, h),  # k = 1: out[i, j] = img[j, W - 1 - i]
        (hf - top - h, wf - left - w, h, w),  # k = 2
        (hf - left - w, top, w, h),  # k = 3: out[i, j] = img[H - 1 - j, i]
    ]
    out = torch.stack(by_k[0], 1)
    for r in (1, 2, 3):
        out = torch.where((k == r).unsqueeze(1), torch.stack(by_k[r], 1), out)
    return out


def _rot90_each(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Turn each square image of (B, C, S, S) by its own ``k`` x 90 degrees (as torch.rot90), without a host sync."""
    out = x
    for r in (1, 2, 3):
        out = torch.where((k == r).view(-1, 1, 1, 1), torch.rot90(x, r, dims=(-2, -1)), out)
    return out


def _crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each sample's box resized to size x size: bilinear, averaging ceil(box / size) samples per output pixel
    and axis when shrinking (roi_align; pixel centres aligned as torchvision's resize)."""
    top, left, h, w = boxes.unbind(1)
    index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)
    rois = torch.stack([index, left, top, left + w, top + h], 1).to(x.dtype)
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# --------------------------------------------------------------------------- photometric, per element


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey, computed as torchvision's rgb_to_grayscale."""
    return x[:, 0].mul(_LUMA[0]).add_(x[:, 1], alpha=_LUMA[1]).add_(x[:, 2], alpha=_LUMA[2]).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    return (factor.view(-1, 1, 1, 1) * a + (1 - factor.view(-1, 1, 1, 1)) * b).clamp(0, 1)


def _hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """adjust_hue of each element by its own ``factor`` (N,) in [-0.5, 0.5]: RGB -> HSV, H + factor (mod 1), back.

    The round trip written out in RGB, with the same maths as torchvision's ``_rgb_to_hsv`` / ``_hsv_to_rgb``:
    V = max, C = V - min, H6 = 6 H = (G - B) / C, 2 + (B - R) / C or 4 + (R - G) / C where R, else G, else B is
    the max (0 where C = 0); then with h = H6 + 6 factor (mod 6) each channel is V - C w(h), w the clamped
    triangle that picks torchvision's v, p = V - C, q = V - C f or t = V - C (1 - f) by sector:
    R: clamp(2 - |h - 3|, 0, 1), G: clamp(|h - 2| - 1, 0, 1), B: clamp(|h - 4| - 1, 0, 1).
    Float arithmetic only, in place where it can be (comparisons, where and fresh buffers are slow on CPU).
    """
    r, g, b = x.unbind(1)
    v = x.amax(1)
    span = torch.sub(v, x.amin(1))
    not_r = torch.sub(v, r).sign_()  # 0 where R is the max, else 1
    not_g = torch.sub(v, g).sign_()
    # (G - B), else (B - R) where G is the max, else (R - G): lerp with a 0/1 weight picks one exactly
    h = torch.sub(g, b).lerp_(torch.sub(b, r).lerp_(torch.sub(r, g), not_g), not_r).div_(span.clamp_min(1e-30))
    h.add_(not_g.add_(1).mul_(not_r), alpha=2).add_(6 * factor.view(-1, 1, 1))  # + 0, 2 or 4, + the shift
    h.sub_(torch.mul(h, 1 / 6).floor_(), alpha=6)  # mod 6
    centre, sign, offset = _cached(_HUE_TRIANGLES, x.device, x.dtype)
    w = torch.sub(h.unsqueeze(1), centre).abs_().mul_(sign).add_(offset).clamp_(0, 1)
    return w.mul_(span.unsqueeze(1)).neg_().add_(v.unsqueeze(1))


def _jitter_draws(
    draws: _Draws, n: int, strength: tuple[float, float, float, float], p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ColorJitter's parameters for each of the B * n elements: ``on`` (N,) whether it is jittered at all
    (probability ``p``), ``order`` (N, 4) its own uniformly random order of the ops 0 brightness, 1 contrast,
    2 saturation, 3 hue (ColorJitter's ``randperm(4)``), and ``factors`` (N, 4): U[max(0, 1 - v), 1 + v] for the
    first three and U[-h, h] for hue, for ``strength`` (v_b, v_c, v_s, h)."""
    u = draws.uniform(n, 9).flatten(0, 1)  # per element: applied?, four factors, four keys whose argsort is the order
    ranges = [(max(0.0, 1.0 - v), 1.0 + v) for v in strength[:3]] + [(-strength[3], strength[3])]
    factors = torch.stack([low + (high - low) * u[:, i + 1] for i, (low, high) in enumerate(ranges)], 1)
    return u[:, 0] < p, u[:, 5:].argsort(1), factors


def _blend_step_(x: torch.Tensor, keep: torch.Tensor, to_gray: torch.Tensor, to_mean: torch.Tensor) -> torch.Tensor:
    """In place, x = clamp(keep x + to_gray grey + to_mean mean grey) with a weight of each kind per element (N,):
    brightness, contrast or saturation with factor f is (f, 0, 0), (f, 0, 1 - f) or (f, 1 - f, 0), as torchvision's
    adjust_brightness, adjust_contrast, adjust_saturation; (1, 0, 0) leaves an element (in [0, 1]) as it is."""
    gray = _gray(x)
    mean = gray.mean((1, 2, 3), keepdim=True).mul_(to_mean.view(-1, 1, 1, 1))
    return x.mul_(keep.view(-1, 1, 1, 1)).add_(gray.mul_(to_gray.view(-1, 1, 1, 1)).add_(mean)).clamp_(0, 1)


def _color_jitter(
    x: torch.Tensor, draws: _Draws, n: int, strength: tuple[float, float, float, float], p: float
) -> torch.Tensor:
    """RandomApply(ColorJitter(*strength), p) on each element on its own: its own factors, its own op order.

    Hue, the costly op, runs once, on all elements at once: before it come three blend steps, in which each
    element does the first, second, third of its ops that precede hue, or nothing (factor 1) if it has fewer,
    and after it three more for the ops that follow hue. Fixed shapes throughout, so no host sync. Elements not
    drawn by ``p`` are put back as they were at the end.
    """
    on, order, factors = _jitter_draws(draws, n, strength, p)
    if not any(strength):
        return x
    three = torch.arange(3, device=x.device)
    hue_at = order.argsort(1)[:, 3:]  # (N, 1): where hue comes in each element's order
    before = torch.where(three < hue_at, order[:, :3], 4)  # the ops before hue, padded with 4 ("nothing")
    after = torch.cat([order, torch.full_like(order[:, :3], 4)], 1).gather(1, hue_at + 1 + three)
    ops = torch.cat([before, after], 1)  # (N, 6): the blend steps before and after hue
    if not strength[3]:  # no hue: the three blends in their order, the padding moved to the end
        ops = ops.gather(1, (ops == 4).to(torch.uint8).argsort(dim=1, stable=True))[:, :3]
    # blend factor of each step: 1 (no blend) for hue, "nothing" and an op ColorJitter leaves out (range [1, 1])
    blend = torch.cat([factors, torch.ones_like(factors[:, :1])], 1)
    for op in [3] + [op for op in range(3) if not strength[op]]:
        blend[:, op] = 1.0  # in place: no host-to-device copy
    keep = blend.gather(1, ops)
    to_gray = (1 - keep) * (ops == 2).to(x.dtype)
    to_mean = (1 - keep) * (ops == 1).to(x.dtype)
    steps = list(range(ops.shape[1])) if any(strength[:3]) else []
    y = x.clone()
    for j in steps[:3]:
        y = _blend_step_(y, keep[:, j], to_gray[:, j], to_mean[:, j])
    if strength[3]:
        y = _hue(y, factors[:, 3])
    for j in steps[3:]:
        y = _blend_step_(y, keep[:, j], to_gray[:, j], to_mean[:, j])
    return y.lerp_(x, (~on).to(x.dtype).view(-1, 1, 1, 1))  # weight 0 or 1: y or x exactly


def _grayscale(x: torch.Tensor, draws: _Draws, n: int, p: float) -> torch.Tensor:
    on = draws.bernoulli(p, n).flatten().view(-1, 1, 1, 1)
    return torch.where(on, _gray(x).expand_as(x), x)


def _hflip(x: torch.Tensor, draws: _Draws, n: int, p: float = 0.5) -> torch.Tensor:
    return torch.where(draws.bernoulli(p, n).flatten().view(-1, 1, 1, 1), x.flip(-1), x)


def _vissl_photometric(
    x: torch.Tensor,
    draws: _Draws,
    n: int,
    p: float = 0.66,
    bits: tuple[int, int] = (4, 8),
    sharpness: tuple[float, float] = (0.1, 1.9),
) -> torch.Tensor:
    """Posterize (``bits``, 4-8), sharpness (U[``sharpness``], [0.1, 1.9]), solarize (threshold 0-256),
    autocontrast; with p per element."""
    u = draws.uniform(n, 4).flatten(0, 1)
    on = (u[:, 0] < p).view(-1, 1, 1, 1)
    levels = bits[1] - bits[0]
    step = torch.pow(2.0, 8 - (bits[0] + (u[:, 1] * (levels + 1)).floor().clamp_max(levels))).view(-1, 1, 1, 1)
    y = torch.floor(torch.round(x * 255) / step) * step / 255
    # sharpness: blend with the 3x3 smoothing [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 of the inside (torchvision
    # keeps the one-pixel border); a box sum plus the centre, far cheaper than a depthwise convolution on CPU
    if y.shape[-1] > 2 and y.shape[-2] > 2:
        smooth = y.clone()
        smooth[..., 1:-1, 1:-1] = (9 * F.avg_pool2d(y, 3, 1) + 4 * y[..., 1:-1, 1:-1]) / 13
        y = _blend(y, smooth, sharpness[0] + (sharpness[1] - sharpness[0]) * u[:, 2])
    threshold = (u[:, 3] * 257).floor().clamp_max(256).view(-1, 1, 1, 1) / 255
    y = torch.where(y >= threshold, 1 - y, y)
    low, high = y.amin((-2, -1), keepdim=True), y.amax((-2, -1), keepdim=True)
    flat = high <= low
    y = ((y - torch.where(flat, 0.0, low)) / torch.where(flat, 1.0, high - low)).clamp(0, 1)
    return torch.where(on, y, x)


def _gaussian_blur(
    x: torch.Tensor, draws: _Draws, n: int, kernel: int, p: float = 0.5, sigma_range: tuple[float, float] = (0.1, 2.0)
) -> torch.Tensor:
    """Gaussian blur with sigma U[``sigma_range``] (U[0.1, 2]) per element, reflect padding (torchvision's
    GaussianBlur), with p."""
    u = draws.uniform(n, 2).flatten(0, 1)
    low, high = sigma_range
    on, sigma = (u[:, 0] < p).view(-1, 1, 1, 1), low + (high - low) * u[:, 1]
    half = kernel // 2
    if x.shape[-1] <= half or x.shape[-2] <= half:
        return x
    taps = torch.arange(kernel, device=x.device, dtype=x.dtype) - half
    k1 = torch.exp(-0.5 * (taps / sigma.unsqueeze(1)) ** 2)
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(x.shape[1], 0)  # (N * C, k)
    m, c, h, w = x.shape
    y = F.pad(x.reshape(1, m * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k1.view(-1, 1, kernel, 1), groups=m * c)
    y = F.conv2d(y, k1.view(-1, 1, 1, kernel), groups=m * c).view(m, c, h, w)
    return torch.where(on, y, x)


def _apply_step(x: torch.Tensor, step: augment.Step, draws: _Draws, n: int) -> torch.Tensor:
    if isinstance(step, augment.Jitter):
        return _color_jitter(x, draws, n, step.strength, step.p)
    if isinstance(step, augment.Photometric):
        return _vissl_photometric(x, draws, n, step.p, step.bits, step.sharpness)
    if isinstance(step, augment.Grayscale):
        return _grayscale(x, draws, n, step.p)
    if isinstance(step, augment.Flip):
        return _hflip(x, draws, n, step.p)
    if isinstance(step, augment.Blur):
        return _gaussian_blur(x, draws, n, augment.blur_kernel(step, x.shape[-1]), step.p, step.sigma)
    raise TypeError(f"unknown augmentation step {step!r}")


def photometric_batch(x: torch.Tensor, kind: str, draws: _Draws, per_sample: int = 1) -> torch.Tensor:
    """``data.augment`` applied to each of the (B * per_sample, 3, H, W) elements (floats in [0, 1]) on its own,
    with its own draws: the steps of the recipe in :data:`pirl.data.augment.RECIPES`, as views.photometric
    applies them element by element."""
    for step in augment.recipe(kind):
        x = _apply_step(x, step, draws, per_sample)
    return x


class BatchedViews:
    """The views of :class:`pirl.data.views.PirlViews` for a batch: ``image`` (B, 3, S, S) unless ``image=False``;
    with ``pretext`` "jigsaw" also ``patches`` (B, grid^2, 3, P, P) and ``order`` (B, grid^2), the cell of each
    patch; "rotation" adds ``rotated`` and ``rotation``; "jigsaw_rotation" turns the image by ``rotation`` x 90
    degrees first. With ``permutations`` (|T|, grid^2) the order is a uniformly drawn row of it, whose index is
    added as ``permutation``.

    Call it with a uint8 (0-255) or float (0-1) batch (B, 3, H, W) on any device, ``sizes`` (B, 2) giving the
    (h, w) of each image inside its top-left corner (None: all of it), and a generator on the batch's device.
    ``global_batch`` and ``offset`` place this batch in the global one under torch.distributed.
    """

    def __init__(
        self,
        cfg: DataConfig,
        pretext: str | None = "jigsaw",
        permutations: torch.Tensor | None = None,
        image: bool = True,
    ) -> None:
        if pretext not in (None, "jigsaw", "rotation", "jigsaw_rotation"):
            raise ValueError(f"unknown pretext {pretext!r}")
        self.cfg, self.pretext, self.permutations, self.image = cfg, pretext, permutations, image
        self._device_permutations: torch.Tensor | None = None
        self._mean_std = (torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1))

    @classmethod
    def like(cls, views: object) -> BatchedViews | None:
        """The batched twin of a :class:`~pirl.data.views.PirlViews` (same config, pretext, permutation set and
        image flag); None for any other view function."""
        if type(views) is not PirlViews:
            return None
        cfg = views.image_view.cfg
        return cls(cfg, views.pretext, getattr(views, "permutations", None), getattr(views, "image", True))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = _cached(self._mean_std, x.device, x.dtype)
        return (x - mean) / std

    def _crop(
        self,
        x: torch.Tensor,
        height: torch.Tensor,
        width: torch.Tensor,
        size: int,
        scale: tuple[float, float],
        draws: _Draws,
        turn: torch.Tensor | None,
    ) -> torch.Tensor:
        """A RandomResizedCrop of each image, or of each image turned by ``turn`` x 90 degrees."""
        if turn is None:
            return _crop_resize(x, _resized_crop_boxes(draws, height, width, scale), size)
        odd = (turn % 2) == 1  # drawn in the turned frame, cut from the upright image, then turned
        boxes = _resized_crop_boxes(draws, torch.where(odd, width, height), torch.where(odd, height, width), scale)
        return _rot90_each(_crop_resize(x, _unrotate_boxes(boxes, height, width, turn), size), turn)

    def _image_view(self, x, height, width, draws, turn=None) -> torch.Tensor:
        c = self.cfg
        crop = self._crop(x, height, width, c.image_size, tuple(c.image_scale), draws, turn)
        return self._normalize(photometric_batch(crop, c.augment, draws))

    def _jigsaw(self, x, height, width, draws, turn=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        c = self.cfg
        g, p, batch = c.grid, c.patch_size, x.shape[0]
        puzzle = self._crop(x, height, width, c.jigsaw_crop, tuple(c.jigsaw_scale), draws, turn)
        cell = c.jigsaw_crop // g
        order = draws.uniform(g * g).argsort(1)  # uniform over all (g^2)! orders
        chosen = None
        if self.permutations is not None:
            if self._device_permutations is None:  # once, at the first batch (after a resume has filled it in)
                self._device_permutations = self.permutations.to(x.device).long()
            chosen = draws.integers(len(self.permutations))
            order = self._device_permutations[chosen]
        offsets = draws.integers(cell - p + 1, g * g, 2)
        corners = torch.stack([order // g, order % g], 2) * cell + offsets  # (B, g^2, 2) top-left (y, x)
        steps = torch.arange(p, device=x.device)
        rows = (corners[..., 0, None] + steps)[..., :, None]  # (B, g^2, P, 1)
        cols = (corners[..., 1, None] + steps)[..., None, :]  # (B, g^2, 1, P)
        sample = torch.arange(batch, device=x.device).view(-1, 1, 1, 1)
        patches = puzzle.permute(0, 2, 3, 1)[sample, rows, cols]  # (B, g^2, P, P, 3)
        patches = patches.permute(0, 1, 4, 2, 3).reshape(batch * g * g, 3, p, p)
        patches = self._normalize(photometric_batch(patches, c.augment, draws, g * g))
        return patches.view(batch, g * g, 3, p, p), order, chosen

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        sizes: torch.Tensor | None,
        generator: torch.Generator,
        *,
        global_batch: int | None = None,
        offset: int = 0,
    ) -> dict[str, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(images.shape)}")
        batch, device = images.shape[0], images.device
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if sizes is None:
            height = torch.full((batch,), images.shape[-2], device=device)
            width = torch.full((batch,), images.shape[-1], device=device)
        else:
            height, width = sizes.to(device).unbind(1)
        draws = _Draws(generator, batch, global_batch or batch, offset, device)
        out = {keys.IMAGE: self._image_view(x, height, width, draws)} if self.image else {}
        turn = None
        if self.pretext in ("rotation", "jigsaw_rotation"):
            turn = draws.integers(4)
            out[keys.ROTATION] = turn
            if self.pretext == "rotation":
                out[keys.ROTATED] = self._image_view(x, height, width, draws, turn)
                return out
        if self.pretext in ("jigsaw", "jigsaw_rotation"):
            out[keys.PATCHES], out[keys.ORDER], chosen = self._jigsaw(x, height, width, draws, turn)
            if chosen is not None:
                out[keys.PERMUTATION] = chosen
        return out
