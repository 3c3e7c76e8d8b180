import numpy as np
import torch
from PIL import Image

from pirl.config import load_config
from pirl.data.views import ImageView, JigsawView, PirlViews, jigsaw_geometry


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
