"""Views against torchvision and against the dataset's bookkeeping.

* The batched RandomResizedCrop (pirl.data.batched) draws boxes with torchvision's distribution of area fraction,
  aspect ratio and position (a few thousand seeded draws, means and quantiles compared), and cuts and resizes a
  box as torchvision's resized_crop does.
* A sample that stands in for an undecodable image is the replacement image's own sample: its index (the bank
  row it writes), label and augmentation are the replacement's; the undecodable position is only reported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

from helpers import tiny_config
from pirl.data.batched import _crop_resize, _Draws, _resized_crop_boxes
from pirl.data.dataset import ViewDataset
from pirl.data.images import BadImageError
from pirl.data.sources import ArraySource
from pirl.data.views import PirlViews

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default, which ImageView and JigsawView use
SIZES = ((48, 64), (64, 40))  # a landscape and a portrait image, in one batch
QUANTILES = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batched_boxes(scale: tuple[float, float], per_size: int, seed: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """Boxes (top, left, h, w) from one batched draw over images of both SIZES, interleaved."""
    n = per_size * len(SIZES)
    height = torch.tensor([SIZES[i % len(SIZES)][0] for i in range(n)])
    width = torch.tensor([SIZES[i % len(SIZES)][1] for i in range(n)])
    draws = _Draws(torch.Generator().manual_seed(seed), n, n, 0, torch.device("cpu"))
    boxes = _resized_crop_boxes(draws, height, width, scale)
    return {size: boxes[i :: len(SIZES)] for i, size in enumerate(SIZES)}


def _torchvision_boxes(size: tuple[int, int], scale: tuple[float, float], n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    img = torch.empty(1, *size)
    get = torchvision.transforms.RandomResizedCrop.get_params
    return torch.tensor([get(img, list(scale), list(RATIO)) for _ in range(n)], dtype=torch.float32)


def _statistics(boxes: torch.Tensor, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.unbind(1)
    return {
        "area": h * w / (size[0] * size[1]),
        "log_ratio": torch.log(w / h),
        "centre_y": (top + h / 2) / size[0],
        "centre_x": (left + w / 2) / size[1],
    }


# (mean, quantile) tolerances: a few standard errors of 3,000 draws, and about one step of the integer boxes
TOLERANCE = {"area": (0.012, 0.025), "log_ratio": (0.012, 0.04), "centre_y": (0.012, 0.03), "centre_x": (0.012, 0.03)}


@pytest.mark.parametrize("scale", [(0.25, 0.5), (0.6, 1.0)])
def test_batched_crop_boxes_have_torchvisions_area_ratio_and_position_statistics(scale):
    ours = _batched_boxes(scale, 3000)
    for size in SIZES:
        boxes = ours[size]
        top, left, h, w = boxes.unbind(1)
        assert (boxes == boxes.round()).all() and (h >= 1).all() and (w >= 1).all()
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= size[0]).all() and (left + w <= size[1]).all()
        mine, theirs = _statistics(boxes, size), _statistics(_torchvision_boxes(size, scale, 3000), size)
        for key, (mean_tol, quantile_tol) in TOLERANCE.items():
            a, b = mine[key], theirs[key]
            assert abs(a.mean() - b.mean()) < mean_tol, (size, key, float(a.mean()), float(b.mean()))
            assert abs(a.std() - b.std()) < mean_tol, (size, key, float(a.std()), float(b.std()))
            diff = (a.quantile(QUANTILES) - b.quantile(QUANTILES)).abs().max()
            assert diff < quantile_tol, (size, key, a.quantile(QUANTILES).tolist(), b.quantile(QUANTILES).tolist())
        # the ranges themselves: an area in the scale range (up to rounding of h and w), a ratio in RATIO
        area, ratio = mine["area"], torch.exp(mine["log_ratio"])
        slack = 2 * max(size) / (size[0] * size[1]) + 2 / (size[0] * size[1])
        assert area.min() >= scale[0] - slack and area.max() <= min(1.0, scale[1] + slack)
        assert ratio.min() >= RATIO[0] * 0.9 and ratio.max() <= RATIO[1] / 0.9


def test_batched_crop_falls_back_to_torchvisions_central_crop():
    """No attempt fits a 10 x 80 strip at scale 0.99-1: the whole height, the width cut to the largest ratio."""
    for height, width in ((10, 80), (80, 10), (30, 30)):
        draws = _Draws(torch.Generator().manual_seed(0), 1, 1, 0, torch.device("cpu"))
        (box,) = _resized_crop_boxes(draws, torch.tensor([height]), torch.tensor([width]), (0.99, 1.0)).tolist()
        torch.manual_seed(0)
        want = torchvision.transforms.RandomResizedCrop.get_params(
            torch.empty(1, height, width), [0.99, 1.0], list(RATIO)
        )
        if height == width:  # a square fits at the first attempt: the whole image
            want = (0, 0, height, width)
        assert tuple(box) == tuple(want), (height, width)


def _smooth(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    return torch.stack([xs / width, ys / height, (torch.sin(xs / 5) * torch.cos(ys / 7) + 1) / 2])


def _inside(length: int, size: int) -> torch.Tensor:
    """Output pixels whose sampling point (pixel centres aligned) lies within a box side of ``length``."""
    src = (torch.arange(size) + 0.5) * length / size - 0.5
    return (src >= 0) & (src <= length - 1)


def test_crop_resize_of_non_square_boxes_is_torchvisions_resized_crop():
    gen = torch.Generator().manual_seed(3)
    noise = torch.rand(3, 3, 48, 64, generator=gen)
    # enlarging (box smaller than the output): bilinear at the same pixel centres, so equal wherever the
    # sampling point lies inside the box; on the rim outside that, torchvision clamps to the box's edge pixels
    # and roi_align reads the pixels just outside the box
    boxes = [(3, 10, 9, 14), (10, 2, 20, 36), (30, 41, 12, 7)]
    out = _crop_resize(noise, torch.tensor(boxes, dtype=torch.float32), 40)
    assert out.shape == (3, 3, 40, 40)
    for b, (top, left, h, w) in enumerate(boxes):
        want = TF.resized_crop(noise[b], top, left, h, w, [40, 40], antialias=True)
        rows, cols = _inside(h, 40), _inside(w, 40)
        assert rows.sum() > 30 and cols.sum() > 30
        got = out[b][:, rows][:, :, cols]
        torch.testing.assert_close(got, want[:, rows][:, :, cols], rtol=0, atol=1e-5, msg=str(b))
    # shrinking: roi_align averages ceil(box / size) samples per pixel where torchvision filters; on a smooth
    # image the two agree closely, and a box off by a few pixels, or with h and w swapped, does not
    smooth = _smooth(48, 64).expand(2, 3, 48, 64).contiguous()
    boxes = [(5, 7, 30, 45), (2, 20, 44, 26)]
    out = _crop_resize(smooth, torch.tensor(boxes, dtype=torch.float32), 16)
    for b, (top, left, h, w) in enumerate(boxes):
        want = TF.resized_crop(smooth[b], top, left, h, w, [16, 16], antialias=True)
        diff = (out[b] - want).abs()
        assert diff.mean() < 0.005 and diff[:, 1:-1, 1:-1].max() < 0.02, (b, float(diff.mean()))
        for wrong in ((top, left, w, h), (top + 3, left, h, w), (top, left + 3, h, w)):
            other = TF.resized_crop(smooth[b], *wrong, [16, 16], antialias=True)
            assert (out[b] - other).abs().mean() > 3 * diff.mean(), (b, wrong)


# --------------------------------------------------------------------------- undecodable images


class _Broken(ArraySource):
    """An in-memory source whose images at ``bad`` (source indices) cannot be decoded."""

    def __init__(self, n: int, bad: set[int]) -> None:
        rng = np.random.default_rng(0)
        super().__init__(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), (np.arange(n) * 7) % 5)
        self.bad = bad

    def load(self, index: int):
        if index in self.bad:
            raise BadImageError(f"image {index}: not an image")
        return super().load(index)


def _views():
    return PirlViews(tiny_config().data, "jigsaw")


def _same_sample(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key != "bad":
            assert torch.equal(a[key], b[key]), key


def test_the_replacement_of_an_undecodable_image_carries_its_own_index_label_and_views():
    source = _Broken(12, {2, 3, 11})
    dataset = ViewDataset(source, _views(), seed=4)
    sample = dataset[(1, 2)]  # 2 and 3 cannot be decoded: 4 stands in
    assert int(sample["index"]) == 4 and int(sample["label"]) == source.labels[4]
    assert sample["bad"].tolist() == [2, 3] + [-1] * (ViewDataset.max_skip - 2)
    _same_sample(sample, dataset[(1, 4)])  # exactly the sample of image 4, augmentation included
    assert dataset[(1, 4)]["bad"].tolist() == [-1] * ViewDataset.max_skip
    wrapped = dataset[(0, 11)]  # the last image is bad: the next one is the first
    assert int(wrapped["index"]) == 0 and wrapped["bad"].tolist()[:2] == [11, -1]
    _same_sample(wrapped, dataset[(0, 0)])


def test_with_a_subset_the_replacement_carries_its_position_in_the_subset():
    source = _Broken(20, {9})
    indices = [1, 4, 9, 13, 17]  # bank rows 0..4; source image 9 is row 2
    dataset = ViewDataset(source, _views(), seed=0, indices=indices)
    sample = dataset[(0, 2)]
    assert int(sample["index"]) == 3 and int(sample["label"]) == source.labels[13]
    assert sample["bad"].tolist()[:2] == [2, -1]  # the position, which write_bad_images maps to the file
    _same_sample(sample, dataset[(0, 3)])


def test_replacements_in_a_batch_keep_every_index_in_range_and_every_good_index_its_own():
    source = _Broken(16, {0, 5, 6, 15})
    dataset = ViewDataset(source, _views(), seed=1)
    for position in range(16):
        sample = dataset[(0, position)]
        index = int(sample["index"])
        assert 0 <= index < 16 and index not in source.bad
        if position not in source.bad:
            assert index == position and (sample["bad"] == -1).all()
        else:
            assert index == next(i % 16 for i in range(position, position + 16) if i % 16 not in source.bad)
            assert position in sample["bad"].tolist()


def test_batched_crop_positions_are_drawn_independently_per_axis():
    """torchvision draws a crop's top and left independently: where the box lies down the image says nothing
    about where it lies across (a shared draw would make them move together)."""
    for size, boxes in _batched_boxes((0.25, 0.5), 3000).items():
        top, left, h, w = boxes.unbind(1)
        down, across = top / (size[0] - h + 1), left / (size[1] - w + 1)  # each U[0, 1) given the box's size
        assert abs(float(torch.corrcoef(torch.stack([down, across]))[0, 1])) < 0.1, size


def test_batched_crop_boxes_on_a_tiny_image_are_never_empty_and_take_torchvisions_sizes():
    """On a 3 x 3 image at scale 2.5-3% an attempt rounds to a 1 x 1 box or to an empty one: torchvision keeps
    only non-empty attempts (w > 0 and h > 0) and otherwise falls back to the whole image, about half the time."""
    n, scale = 2000, (0.025, 0.03)
    draws = _Draws(torch.Generator().manual_seed(0), n, n, 0, torch.device("cpu"))
    boxes = _resized_crop_boxes(draws, torch.full((n,), 3), torch.full((n,), 3), scale)
    ours = [tuple(b) for b in boxes[:, 2:].long().tolist()]
    theirs = [tuple(b) for b in _torchvision_boxes((3, 3), scale, n)[:, 2:].long().tolist()]
    assert set(ours) == set(theirs) == {(1, 1), (3, 3)}
    assert abs(ours.count((1, 1)) - theirs.count((1, 1))) < 0.05 * n


def test_crop_resize_shrinks_by_averaging_every_pixel_of_a_bin():
    """A box of a whole multiple of the output size: each output pixel is the mean of its bin's pixels
    (ceil(box / size) samples per axis, at the pixel centres), not one sample from the bin's middle."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 8.0, 16.0, 24.0]])  # (top, left, h, w): bins 4 x 4, 2 x 3
    out = _crop_resize(x, boxes, 8)
    torch.testing.assert_close(out[0], F.avg_pool2d(x[0], 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], F.avg_pool2d(x[1, :, 4:20, 8:32], (2, 3)), rtol=0, atol=1e-5)


def test_crop_resize_takes_boxes_of_another_float_dtype_than_the_images():
    """The boxes are cast to the images' dtype for roi_align, which needs the two to match."""
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    boxes = torch.tensor([[1.0, 2.0, 8.0, 6.0], [0.0, 0.0, 12.0, 12.0]])
    want = _crop_resize(x, boxes, 5)
    torch.testing.assert_close(_crop_resize(x, boxes.double(), 5), want, rtol=0, atol=0)
    doubled = _crop_resize(x.double(), boxes, 5)
    assert doubled.dtype == torch.float64
    torch.testing.assert_close(doubled.float(), want, rtol=0, atol=1e-6)
