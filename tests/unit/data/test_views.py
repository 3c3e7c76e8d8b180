import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pirl.config import load_config
from pirl.data.views import ImageView, JigsawView, PirlViews, eval_transform, jigsaw_geometry


def test_jigsaw_geometry_one_patch_per_cell_inside_it():
    crop, grid, patch = 255, 3, 64
    cell = crop // grid
    for _ in range(50):
        corners, order = jigsaw_geometry(crop, grid, patch)
        assert sorted(order.tolist()) == list(range(9))  # every cell used exactly once
        for (y, x), c in zip(corners.tolist(), order.tolist()):
            row, col = divmod(c, grid)
            assert row * cell <= y and y + patch <= (row + 1) * cell  # inside its own cell
            assert col * cell <= x and x + patch <= (col + 1) * cell


def test_jigsaw_offsets_cover_the_whole_range_and_orders_vary():
    torch.manual_seed(0)
    offsets, orders = set(), set()
    for _ in range(300):
        corners, order = jigsaw_geometry(255, 3, 64)
        cells = torch.stack([order // 3, order % 3], 1) * 85
        offsets.update((corners - cells).flatten().tolist())
        orders.add(tuple(order.tolist()))
    assert offsets == set(range(0, 22))  # integer offsets 0..21 = cell - patch
    assert len(orders) > 290  # uniform over 9! orders: repeats are rare


def _coordinate_image(size: int) -> Image.Image:
    """R = column, G = row: each pixel names its own position."""
    ys, xs = np.mgrid[0:size, 0:size]
    arr = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8)
    return Image.fromarray(arr)


def test_jigsaw_view_patches_come_from_their_cells():
    cfg = load_config(
        None,
        [
            "data.jigsaw_crop=60",
            "data.patch_size=16",
            "data.jigsaw_scale=[1.0,1.0]",
            "data.augment=none",
            "data.mean=[0,0,0]",
            "data.std=[1,1,1]",
        ],
    ).data
    view = JigsawView(cfg)
    torch.manual_seed(1)
    patches, order = view(torch.from_numpy(np.array(_coordinate_image(60))).permute(2, 0, 1).contiguous())
    assert patches.shape == (9, 3, 16, 16)
    for patch, c in zip(patches, order.tolist()):
        x0, y0 = round(float(patch[0, 0, 0]) * 255), round(float(patch[1, 0, 0]) * 255)
        row, col = divmod(c, 3)
        assert row * 20 <= y0 <= row * 20 + 4 and col * 20 <= x0 <= col * 20 + 4
        # the patch is a contiguous 16x16 window of the puzzle
        assert round(float(patch[0, 0, 15]) * 255) == x0 + 15 and round(float(patch[1, 15, 0]) * 255) == y0 + 15


def test_views_shapes_for_each_pretext():
    cfg = load_config(
        "cpu-quick", ["data.min_size=64", "data.image_size=64", "data.jigsaw_crop=63", "data.patch_size=18"]
    ).data
    img = _coordinate_image(32)  # upscaled to min_size first
    out = PirlViews(cfg, "jigsaw")(img)
    assert out["image"].shape == (3, 64, 64) and out["patches"].shape == (9, 3, 18, 18)
    out = PirlViews(cfg, "rotation")(img)
    assert out["rotated"].shape == (3, 64, 64) and 0 <= int(out["rotation"]) < 4
    out = PirlViews(cfg, "jigsaw_rotation")(img)
    assert out["patches"].shape == (9, 3, 18, 18) and "rotation" in out
    out = PirlViews(cfg, None)(img)
    assert set(out) == {"image"}
    quick = PirlViews(load_config("cpu-quick", []).data, "jigsaw")(img)  # the preset itself: 64 px, 20 px patches
    assert quick["image"].shape == (3, 64, 64) and quick["patches"].shape == (9, 3, 20, 20)


def test_patches_are_augmented_independently():
    cfg = load_config(None, ["data.jigsaw_crop=60", "data.patch_size=16", "data.augment=vissl"]).data
    flat = Image.fromarray(np.full((60, 60, 3), 128, np.uint8))  # identical content in every patch
    torch.manual_seed(0)
    patches, _ = JigsawView(cfg)(torch.from_numpy(np.array(flat)).permute(2, 0, 1).contiguous())
    means = {round(float(p.mean()), 3) for p in patches}
    assert len(means) > 3  # colour jitter drawn per patch, not once per puzzle


def test_small_images_are_upscaled_before_cropping():
    cfg = load_config(None, ["data.min_size=64", "data.image_size=64", "data.image_scale=[1.0,1.0]"]).data
    t = ImageView(cfg).to_tensor(_coordinate_image(32))
    assert min(t.shape[-2:]) == 64


def test_vissl_photometric_accepts_every_solarize_threshold(monkeypatch):
    """The threshold is drawn from 0..256; 256 means no solarisation (torchvision rejects it for uint8 images)."""
    from torchvision.transforms.v2 import functional as TF

    from pirl.data.views import VisslPhotometric

    img = torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(()))  # always apply
    monkeypatch.setattr(torch, "randint", lambda low, high, size, **k: torch.tensor(high - 1))  # 8 bits, 256
    torch.manual_seed(0)
    sharp = torch.empty(()).uniform_(0.1, 1.9)
    torch.manual_seed(0)
    out = VisslPhotometric(0.66)(img)
    assert torch.equal(out, TF.autocontrast(TF.adjust_sharpness(TF.posterize(img, 8), float(sharp))))


def _plain_config(*overrides: str):
    """A config whose views are exact: no photometric augmentation, no normalisation, no upscaling."""
    return load_config(
        None, ["data.augment=none", "data.mean=[0,0,0]", "data.std=[1,1,1]", "data.min_size=0", *overrides]
    ).data


def _noise(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_eval_transform_resizes_by_256_over_224_from_128_pixels_up_then_centre_crops():
    """The default resize is input_size * 256 // 224 from 128 pixels up (224 -> 256, 128 -> 146) and input_size
    below; the output is the centre crop of that, scaled to [0, 1]. An image already of the resize side is not
    resampled, so the output is exactly its centre pixels."""
    for input_size, resize in ((224, 256), (128, 146), (127, 127), (32, 32)):
        ys, xs = np.mgrid[0:resize, 0:resize]
        img = Image.fromarray(np.stack([xs, ys, (xs + ys) % 256], -1).astype(np.uint8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning per image (e.g. about antialias on PIL images)
            out = eval_transform(input_size, (0.0,) * 3, (1.0,) * 3)(img)
        top = (resize - input_size) // 2  # an even margin in every case here
        want = torch.from_numpy(np.array(img)).permute(2, 0, 1)[:, top : top + input_size, top : top + input_size]
        assert out.shape == (3, input_size, input_size) and out.dtype == torch.float32
        torch.testing.assert_close(out, want.float() / 255, rtol=0, atol=1e-6, msg=str(input_size))


def test_image_view_at_scale_one_is_the_whole_image_resized_with_antialiasing():
    """image_scale [1, 1] on a square image: RandomResizedCrop keeps all of it (the configured scale, not
    torchvision's default 0.08-1) and shrinks it with antialiasing, as TF.resized_crop(antialias=True)."""
    t = _noise(64)
    torch.manual_seed(0)
    out = ImageView(_plain_config("data.image_size=16", "data.image_scale=[1.0,1.0]"))(t)
    want = TF.resized_crop(t, 0, 0, 64, 64, [16, 16], antialias=True).float() / 255
    aliased = TF.resized_crop(t, 0, 0, 64, 64, [16, 16], antialias=False).float() / 255
    assert (want - aliased).abs().mean() > 0.02  # the check below tells the two apart
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_jigsaw_puzzle_at_scale_one_is_the_whole_image_resized_with_antialiasing():
    """Each patch is a window, inside its own cell, of the whole image shrunk with antialiasing."""
    cfg = _plain_config("data.jigsaw_crop=15", "data.patch_size=4", "data.jigsaw_scale=[1.0,1.0]")
    t = _noise(60)
    torch.manual_seed(0)
    patches, order = JigsawView(cfg)(t)
    puzzle = TF.resized_crop(t, 0, 0, 60, 60, [15, 15], antialias=True).float() / 255
    aliased = TF.resized_crop(t, 0, 0, 60, 60, [15, 15], antialias=False).float() / 255
    assert (puzzle - aliased).abs().mean() > 0.02
    for patch, c in zip(patches, order.tolist()):
        row, col = divmod(c, 3)
        y, x = row * 5, col * 5
        windows = [puzzle[:, y + dy : y + dy + 4, x + dx : x + dx + 4] for dy in (0, 1) for dx in (0, 1)]
        assert any((patch - w).abs().max() < 1e-6 for w in windows), c


def _blur_kernels(transform) -> list[int]:
    """The kernel sides of the Gaussian blurs in a (nested) torchvision transform."""
    if isinstance(transform, v2.GaussianBlur):
        return [transform.kernel_size[0]]
    return [k for t in getattr(transform, "transforms", []) for k in _blur_kernels(t)]


def test_blur_kernel_is_sized_by_each_views_own_element():
    """simclr_blur's kernel is about a tenth of the element it blurs: the 224-pixel image (23), a 64-pixel patch (7)."""
    cfg = load_config(None, ["data.augment=simclr_blur"]).data
    assert (cfg.image_size, cfg.patch_size) == (224, 64)
    assert _blur_kernels(ImageView(cfg).augment) == [23]
    assert _blur_kernels(JigsawView(cfg).augment) == [7]


def test_rotated_view_is_the_image_turned_by_the_drawn_rotation():
    """Over seeds, the rotation label takes each of 0-3, and the rotated view is the image turned by exactly that
    many quarter turns in the image plane (with scale 1 and no augmentation the views are the pixels)."""
    cfg = _plain_config("data.image_size=16", "data.image_scale=[1.0,1.0]")
    t = _noise(16)
    img = Image.fromarray(t.permute(1, 2, 0).numpy())
    views, seen = PirlViews(cfg, "rotation"), set()
    for seed in range(24):
        torch.manual_seed(seed)
        out = views(img)
        k = int(out["rotation"])
        seen.add(k)
        torch.testing.assert_close(out["image"], t.float() / 255, rtol=0, atol=1e-6)
        torch.testing.assert_close(out["rotated"], torch.rot90(t, k, dims=(-2, -1)).float() / 255, rtol=0, atol=1e-6)
    assert seen == {0, 1, 2, 3}


def test_image_false_leaves_out_the_image_view():
    cfg = _plain_config("data.image_size=16", "data.jigsaw_crop=15", "data.patch_size=4")
    img = _coordinate_image(20)
    assert set(PirlViews(cfg, "jigsaw", image=False)(img)) == {"patches", "order"}
    assert set(PirlViews(cfg, "rotation", image=False)(img)) == {"rotation", "rotated"}
    assert set(PirlViews(cfg, "jigsaw", image=True)(img)) == {"image", "patches", "order"}


def _assert_each_patch_from_its_cell(patches: torch.Tensor, order: torch.Tensor) -> None:
    """Patches of a 60-pixel coordinate image (20-pixel cells, 16-pixel patches): patch i starts in cell order[i]."""
    for patch, cell in zip(patches, order.tolist()):
        x0, y0 = round(float(patch[0, 0, 0]) * 255), round(float(patch[1, 0, 0]) * 255)
        row, col = divmod(cell, 3)
        assert row * 20 <= y0 <= row * 20 + 4 and col * 20 <= x0 <= col * 20 + 4


def test_jigsaw_view_applies_exactly_the_permutation_of_its_label():
    from pirl.methods.jigsaw import hamming_permutations

    cfg = _plain_config("data.jigsaw_crop=60", "data.patch_size=16", "data.jigsaw_scale=[1.0,1.0]")
    perms = hamming_permutations(10)
    views = PirlViews(cfg, "jigsaw", permutations=perms, image=False)
    img = _coordinate_image(60)
    labels = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = views(img)
        assert "image" not in out
        label = int(out["permutation"])
        labels.add(label)
        assert torch.equal(out["order"], perms[label])
        _assert_each_patch_from_its_cell(out["patches"], perms[label])
    assert len(labels) >= 6  # drawn over the whole set


def test_permutation_set_orders_the_patches_by_a_uniformly_drawn_row():
    """With a permutation set, ``permutation`` is a drawn row index (every row is drawn), ``order`` is that row,
    and each patch comes from the cell the row names."""
    cfg = _plain_config(
        "data.image_size=16", "data.jigsaw_crop=60", "data.patch_size=16", "data.jigsaw_scale=[1.0,1.0]"
    )
    perms = torch.stack([torch.arange(9), torch.arange(9).flip(0), (torch.arange(9) + 4) % 9])
    views, seen = PirlViews(cfg, "jigsaw", permutations=perms), set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = views(_coordinate_image(60))
        assert out["permutation"].shape == () and not out["permutation"].is_floating_point()
        row = int(out["permutation"])
        seen.add(row)
        assert torch.equal(out["order"], perms[row])
        _assert_each_patch_from_its_cell(out["patches"], perms[row])
    assert seen == {0, 1, 2}
