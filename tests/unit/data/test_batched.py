"""Batched views on tensors (pirl.data.batched): geometry, permutations, per-patch augmentation, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from helpers import random_source, tiny_config
from pirl.config import load_config
from pirl.data.batched import (
    BatchedViews,
    DecodeResize,
    _color_jitter,
    _Draws,
    _hue,
    _jitter_draws,
    _unrotate_boxes,
    decode_size,
)
from pirl.data.views import PirlViews
from pirl.errors import PirlError

PLAIN = ["data.augment=none", "data.mean=[0,0,0]", "data.std=[1,1,1]"]


def _coordinates(height: int, width: int, canvas: int | None = None, edge: bool = False) -> torch.Tensor:
    """uint8 (3, C, C): R = column, G = row inside the top-left height x width corner; the padding is 255, or
    the last row and column repeated (``edge``, as DecodeResize pads)."""
    canvas = canvas or max(height, width)
    out = torch.full((3, canvas, canvas), 255, dtype=torch.uint8)
    out[0, :height, :width] = torch.arange(width, dtype=torch.uint8)
    out[1, :height, :width] = torch.arange(height, dtype=torch.uint8).unsqueeze(1)
    out[2, :height, :width] = 0
    if edge:
        out[:, :height, width:] = out[:, :height, width - 1 : width]
        out[:, height:, :] = out[:, height - 1 : height, :]
    return out


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pretext", [None, "jigsaw", "rotation", "jigsaw_rotation"])
@pytest.mark.parametrize("augment", ["none", "light", "vissl", "simclr_blur"])
def test_shapes_and_dtypes_for_every_pretext_and_augmentation(pretext, augment):
    cfg = load_config(
        "cpu-quick", [f"data.augment={augment}", "data.image_size=24", "data.jigsaw_crop=21", "data.patch_size=6"]
    ).data
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    sizes = torch.tensor([[32, 32], [20, 32], [5, 12]])
    out = BatchedViews(cfg, pretext)(images, sizes, _gen())
    assert out["image"].shape == (3, 3, 24, 24) and out["image"].dtype == torch.float32
    if pretext in ("jigsaw", "jigsaw_rotation"):
        assert out["patches"].shape == (3, 9, 3, 6, 6) and out["order"].shape == (3, 9)
    if pretext in ("rotation", "jigsaw_rotation"):
        assert out["rotation"].shape == (3,) and set(out["rotation"].tolist()) <= {0, 1, 2, 3}
    if pretext == "rotation":
        assert out["rotated"].shape == (3, 3, 24, 24)
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    # a float batch in [0, 1] gives the same views as its uint8 original
    again = BatchedViews(cfg, pretext)(images.float() / 255, sizes, _gen())
    for key in out:
        torch.testing.assert_close(again[key], out[key], rtol=0, atol=1e-5)


def test_each_patch_comes_from_its_own_cell_of_the_unpadded_image():
    cfg = load_config(None, ["data.jigsaw_crop=60", "data.patch_size=16", "data.jigsaw_scale=[1.0,1.0]", *PLAIN]).data
    images = _coordinates(60, 60, canvas=80).expand(6, 3, 80, 80)  # padding must never show up
    out = BatchedViews(cfg, "jigsaw")(images, torch.tensor([[60, 60]] * 6), _gen(1))
    seen = set()
    for patches, order in zip(out["patches"], out["order"]):
        assert sorted(order.tolist()) == list(range(9))
        for patch, c in zip(patches, order.tolist()):
            x0, y0 = round(float(patch[0, 0, 0]) * 255), round(float(patch[1, 0, 0]) * 255)
            row, col = divmod(c, 3)
            assert row * 20 <= y0 <= row * 20 + 4 and col * 20 <= x0 <= col * 20 + 4
            seen.add((x0 - col * 20, y0 - row * 20))
            # a contiguous P x P window of the puzzle, upright
            ramp = torch.arange(16) / 255
            torch.testing.assert_close(patch[0], (x0 / 255 + ramp).expand(16, 16), rtol=0, atol=1e-6)
            torch.testing.assert_close(patch[1], (y0 / 255 + ramp).unsqueeze(1).expand(16, 16), rtol=0, atol=1e-6)
    assert len(seen) > 20  # offsets vary per patch (5 x 5 possible)


def test_permutations_are_valid_and_uniform_and_offsets_cover_the_range():
    cfg = load_config(
        None, ["data.jigsaw_crop=15", "data.patch_size=4", "data.image_size=8", "data.jigsaw_scale=[1.0,1.0]", *PLAIN]
    ).data
    n = 1800
    out = BatchedViews(cfg, "jigsaw")(_coordinates(15, 15).expand(n, 3, 15, 15), None, _gen(2))
    order = out["order"]
    assert torch.equal(order.sort(1).values, torch.arange(9).expand(n, 9))
    counts = torch.zeros(9, 9)  # position x cell
    counts.index_put_((torch.arange(9).expand(n, 9).flatten(), order.flatten()), torch.ones(9 * n), accumulate=True)
    assert (counts - n / 9).abs().max() < 60  # expected 200 each, sd about 13
    assert len({tuple(r) for r in order.tolist()}) > n - 20  # 9! orders: repeats are rare
    corner = (out["patches"][:, :, :2, 0, 0] * 255).round().long()  # (x, y) of each patch
    cells = torch.stack([order % 3, order // 3], 2) * 5
    assert set((corner - cells).flatten().tolist()) == {0, 1}  # offsets 0 .. cell - patch


def test_per_patch_augmentation_is_independent_across_patches():
    cfg = load_config(
        None,
        [
            "data.jigsaw_crop=30",
            "data.patch_size=8",
            "data.image_size=16",
            "data.augment=light",
            "data.mean=[0,0,0]",
            "data.std=[1,1,1]",
        ],
    ).data
    flat = torch.full((400, 3, 30, 30), 128, dtype=torch.uint8)  # on grey only brightness changes a patch
    patches = BatchedViews(cfg, "jigsaw")(flat, None, _gen(3))["patches"]
    level = patches.mean((2, 3, 4))  # (B, 9)
    assert level.std() > 0.05
    # the level of one patch says nothing about another's in the same puzzle
    corr = torch.corrcoef(torch.stack([level[:, 0], level[:, 1], level[:, 5]]))
    assert corr[0, 1].abs() < 0.2 and corr[0, 2].abs() < 0.2
    # and the spread inside a puzzle is the spread across puzzles
    assert 0.8 < float(level.std(1).mean() / level[:, 0].std()) < 1.2
    # flips are per patch too: on a coordinate image, some patches are mirrored and some are not
    coords = load_config(
        None,
        [
            "data.jigsaw_crop=30",
            "data.patch_size=8",
            "data.image_size=16",
            "data.augment=light",
            "data.mean=[0,0,0]",
            "data.std=[1,1,1]",
        ],
    ).data
    out = BatchedViews(coords, "jigsaw")(_coordinates(30, 30).expand(4, 3, 30, 30), None, _gen(4))["patches"]
    gray = out.std(2).amax((2, 3)) < 1e-6  # grayscale made R = G = B
    rising = out[:, :, 0, 0, -1] > out[:, :, 0, 0, 0]
    assert rising[~gray].any() and (~rising[~gray]).any()


def test_seeded_generator_is_deterministic_and_the_global_batch_splits_like_one_process():
    cfg = load_config("cpu-quick", ["data.augment=vissl"]).data
    images = torch.randint(0, 256, (4, 3, 70, 70), dtype=torch.uint8)
    views = BatchedViews(cfg, "jigsaw")
    a, b, c = views(images, None, _gen(5)), views(images, None, _gen(5)), views(images, None, _gen(6))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["order"], c["order"])
    # two "processes" with 2 samples each draw exactly what one process drew for all 4
    halves = [views(images[r * 2 : (r + 1) * 2], None, _gen(5), global_batch=4, offset=r * 2) for r in (0, 1)]
    for key in a:
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), a[key], rtol=0, atol=1e-6)


def _draws(seed: int, elements: int, per_sample: int = 1) -> _Draws:
    batch = elements // per_sample
    return _Draws(_gen(seed), batch, batch, 0, torch.device("cpu"))


_TV_JITTER = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]


@pytest.mark.parametrize(
    "strength, p, per_sample",
    [
        ((0.4, 0.4, 0.4, 0.1), 0.8, 1),
        ((0.8, 0.8, 0.8, 0.2), 0.8, 3),
        ((0.4, 0.4, 0.4, 0.2), 1.0, 4),
        ((1.5, 0.0, 0.6, 0.0), 0.9, 1),  # a factor range clipped at 0, and ops ColorJitter skips
        ((0.0, 0.0, 0.0, 0.3), 1.0, 2),  # hue alone
    ],
)
def test_color_jitter_is_torchvision_per_element_with_its_own_order_and_factors(strength, p, per_sample):
    x = torch.rand(12, 3, 8, 8, generator=_gen(10))
    out = _color_jitter(x, _draws(11, 12, per_sample), per_sample, strength, p)
    on, order, factors = _jitter_draws(_draws(11, 12, per_sample), per_sample, strength, p)
    assert on.shape == (12,) and order.shape == (12, 4) and factors.shape == (12, 4)
    for i, v in enumerate(strength[:3]):
        assert (factors[:, i] >= max(0.0, 1 - v)).all() and (factors[:, i] <= 1 + v).all()
    assert (factors[:, 3].abs() <= strength[3]).all()
    for e in range(12):
        want = x[e]
        if on[e]:
            for op in order[e].tolist():
                if strength[op]:  # ColorJitter leaves out an op whose range is [1, 1] ([0, 0] for hue)
                    want = _TV_JITTER[op](want, float(factors[e, op]))
            assert not torch.equal(out[e], x[e])
        else:
            assert torch.equal(out[e], x[e])  # not selected: untouched
        torch.testing.assert_close(out[e], want, rtol=0, atol=1e-5)
    assert len({tuple(o) for o in order[on].tolist()}) > 1  # the elements do not share one order
    if p < 1:
        assert not on.all() and on.any()


def test_color_jitter_orders_are_uniform_over_all_24_per_element():
    n = 4800
    _, order, _ = _jitter_draws(_draws(12, n), 1, (0.4, 0.4, 0.4, 0.1), 0.8)
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))
    counts = {}
    for o in map(tuple, order.tolist()):
        counts[o] = counts.get(o, 0) + 1
    assert len(counts) == 24
    assert max(abs(c - n / 24) for c in counts.values()) < 60  # expected 200 each, sd about 14
    # consecutive elements (e.g. the patches of one image) draw independent orders
    assert (order[1:] != order[:-1]).any(1).float().mean() > 0.9


def test_hue_is_torchvision_adjust_hue_with_a_factor_per_element():
    x = torch.rand(6, 3, 16, 16, generator=_gen(13))
    x[1] = torch.randint(0, 256, (3, 16, 16), generator=_gen(14)) / 255  # quantised: ties between channels
    x[2, 1] = x[2, 0]  # R = G
    x[3, 2] = x[3, 0]  # R = B
    x[4] = x[4, :1]  # grey
    x[5] = 0.0  # rows: red, green, blue, yellow, cyan, magenta, white, then black
    for row, channels in enumerate(([0], [1], [2], [0, 1], [1, 2], [0, 2], [0, 1, 2])):
        x[5, channels, row] = 1.0
    for factor in (-0.5, -0.37, -0.2, -0.05, 0.0, 0.05, 0.1, 0.25, 1 / 3, 0.5):
        torch.testing.assert_close(_hue(x, torch.full((6,), factor)), TF.adjust_hue(x, factor), rtol=0, atol=1e-5)
    factors = torch.tensor([-0.45, -0.2, 0.0, 0.15, 0.3, -0.1])
    want = torch.stack([TF.adjust_hue(x[e], float(factors[e])) for e in range(6)])
    torch.testing.assert_close(_hue(x, factors), want, rtol=0, atol=1e-5)


def test_rotated_view_is_the_view_of_the_turned_image():
    # scale 1 with a ratio out of range: RandomResizedCrop falls back to its (deterministic) central crop
    cfg = load_config(None, ["data.image_size=24", "data.image_scale=[1.0,1.0]", *PLAIN]).data
    images, sizes = _coordinates(40, 60, canvas=64, edge=True).expand(8, 3, 64, 64), torch.tensor([[40, 60]] * 8)
    out = BatchedViews(cfg, "rotation")(images, sizes, _gen(7))
    upright = BatchedViews(cfg, None)(images, sizes, _gen(0))["image"]
    assert set(out["rotation"].tolist()) == {0, 1, 2, 3}
    for i, k in enumerate(out["rotation"].tolist()):
        turned = torch.rot90(images[i, :, :40, :60], k, dims=(-2, -1))
        h, w = turned.shape[-2:]
        want = BatchedViews(cfg, None)(turned.unsqueeze(0), torch.tensor([[h, w]]), _gen(0))["image"][0]
        torch.testing.assert_close(out["rotated"][i], want, rtol=0, atol=1e-4)
        if k == 0:
            torch.testing.assert_close(out["rotated"][i], upright[i], rtol=0, atol=1e-5)


def test_permutation_set_and_no_image_follow_the_per_sample_views():
    cfg = load_config("cpu-quick", ["data.augment=none"]).data
    perms = torch.stack([torch.arange(9), torch.arange(9).flip(0)])
    batched = BatchedViews.like(PirlViews(cfg, "jigsaw", permutations=perms, image=False))
    out = batched(torch.randint(0, 256, (16, 3, 70, 70), dtype=torch.uint8), None, _gen(8))
    assert "image" not in out and set(out["permutation"].tolist()) == {0, 1}
    assert torch.equal(out["order"], perms[out["permutation"]])


def test_decode_resize_keeps_the_aspect_and_pads_with_the_edge():
    cfg = load_config("cpu-quick", []).data
    size = decode_size(cfg)
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, -1] = 200
    arr[-1, :] = 100
    out = DecodeResize(cfg)(Image.fromarray(arr))
    h, w = out["size"].tolist()
    assert out["image"].shape == (3, size, size) and out["image"].dtype == torch.uint8
    assert w == size and h == round(30 * size / 60)
    assert torch.equal(out["image"][:, h:, :], out["image"][:, h - 1 : h, :].expand(3, size - h, size))


def test_batched_views_option_is_validated_and_off_by_default():
    assert load_config(None, []).data.batched_views is False
    assert load_config(None, ["data.batched_views=true"]).data.batched_views is True
    with pytest.raises(PirlError, match="batched_views"):
        load_config(None, ["data.batched_views=maybe"])


def test_training_with_batched_views_on_cpu_is_repeatable_and_uses_them(tmp_path, monkeypatch):
    """data.batched_views on the CPU: the loader only decodes and resizes, runs repeat, the views differ."""
    import pirl.train as train_module

    calls = []
    original = BatchedViews.__call__
    monkeypatch.setattr(BatchedViews, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    runs = [
        train_module.train(
            tiny_config("optim.epochs=1", "data.batched_views=true"),
            random_source(32),
            tmp_path / f"b{i}",
            progress=False,
        )
        for i in range(2)
    ]
    per_sample = train_module.train(
        tiny_config("optim.epochs=1", "data.batched_views=false"), random_source(32), tmp_path / "p", progress=False
    )
    assert calls, "the trainer did not make the batched views"
    assert np.isfinite(runs[0]["loss"]) and runs[0]["checkpoint"]
    assert runs[0]["loss"] == runs[1]["loss"]
    assert runs[0]["loss"] != per_sample["loss"]


def test_unrotated_boxes_cut_the_pixels_the_box_covers_in_the_turned_image():
    """A box drawn on torch.rot90(image, k), mapped back onto the upright image, covers the same pixels: cut
    there and turned by k it is the box's cut of the turned image, for boxes away from every edge."""
    height, width = 5, 7
    img = torch.randint(0, 256, (3, height, width), generator=_gen(15))
    for k in range(4):
        turned = torch.rot90(img, k, dims=(-2, -1))
        th, tw = turned.shape[-2:]
        sides = [(h, w) for h in (1, 2, 3) for w in (1, 2)]
        boxes = [(t, x, h, w) for t in range(th) for x in range(tw) for h, w in sides if t + h <= th and x + w <= tw]
        n = len(boxes)
        full = [torch.full((n,), v) for v in (height, width, k)]
        back = _unrotate_boxes(torch.tensor(boxes, dtype=torch.float32), *full)
        for (t, x, h, w), (bt, bx, bh, bw) in zip(boxes, back.long().tolist()):
            upright = img[:, bt : bt + bh, bx : bx + bw]
            assert torch.equal(torch.rot90(upright, k, dims=(-2, -1)), turned[:, t : t + h, x : x + w]), (k, t, x, h, w)


def test_jigsaw_rotation_cuts_the_patches_from_the_turned_image():
    """With scale 1 and no augmentation the puzzle is the turned image itself: each patch is a window of
    torch.rot90(image, rotation) inside the cell its order names."""
    cfg = load_config(
        None, ["data.jigsaw_crop=15", "data.patch_size=4", "data.image_size=8", "data.jigsaw_scale=[1.0,1.0]", *PLAIN]
    ).data
    images = _coordinates(15, 15).expand(8, 3, 15, 15)
    out = BatchedViews(cfg, "jigsaw_rotation", image=False)(images, None, _gen(16))
    assert set(out["rotation"].tolist()) - {0}  # some puzzles are turned
    for patches, order, k in zip(out["patches"], out["order"], out["rotation"].tolist()):
        puzzle = torch.rot90(images[0], k, dims=(-2, -1)).float() / 255
        for patch, c in zip(patches, order.tolist()):
            row, col = divmod(c, 3)
            y, x = row * 5, col * 5
            windows = [puzzle[:, y + dy : y + dy + 4, x + dx : x + dx + 4] for dy in (0, 1) for dx in (0, 1)]
            assert any((patch - w).abs().max() < 1e-6 for w in windows), (k, c)


def test_bernoulli_fires_strictly_below_p_as_torchvisions_random_apply():
    """An element fires when its uniform draw is below p (RandomApply: ``torch.rand(1) < p``), so it fires with
    probability exactly p, and p = 0 never fires even on a draw of exactly 0: a draw equal to p does not fire."""
    u = _Draws(_gen(17), 4, 4, 0, torch.device("cpu")).uniform(6)
    p = float(u[1, 2])  # a float32 value: exactly representable, so the comparison with it is exact
    fired = _Draws(_gen(17), 4, 4, 0, torch.device("cpu")).bernoulli(p, 6)
    assert torch.equal(fired, u < p) and not fired[1, 2] and fired.any()
