"""Tests for pirl.data.images: robust decoding to 8-bit RGB."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pirl.data.images import BadImageError, is_image_file, load_rgb, to_rgb
from pirl.errors import PirlError


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def test_rgb_jpeg_roundtrip(tmp_path: Path) -> None:
    out = load_rgb(_save(_noise(12, 7), tmp_path / "a.jpg"))
    assert out.mode == "RGB" and out.size == (12, 7)


def test_grayscale_becomes_equal_channels(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    out = np.asarray(load_rgb(_save(gray, tmp_path / "g.png")))
    assert out.shape == (4, 4, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out[3, 3, 0] == 240


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    out = np.asarray(load_rgb(_save(rgba, tmp_path / "a.png")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (10, 255))
    la.putpixel((1, 0), (0, 0))
    out = np.asarray(load_rgb(_save(la, tmp_path / "la.png")))
    assert out[0, 0].tolist() == [10, 10, 10]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = load_rgb(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert out.mode == "RGB"
    r, g, b = np.asarray(out).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    path = _save(img, tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_rgb(path))
    assert out[0, :, 0].tolist() == [0, 1, 4, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_32bit_int_and_float_modes() -> None:
    i32 = to_rgb(Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32)))
    assert np.asarray(i32)[0, :, 0].tolist() == [0, 128, 255]
    f = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)))
    assert np.asarray(f)[0, :, 0].tolist() == [0, 128, 255]
    wide = to_rgb(Image.fromarray(np.array([[-5.0, 0.0, 5.0]], dtype=np.float32)))
    assert np.asarray(wide)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency(tmp_path: Path, fmt: str) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    path = _save(pal, tmp_path / f"p.{fmt}", transparency=0)
    out = np.asarray(load_rgb(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]


def test_palette_without_transparency(tmp_path: Path) -> None:
    pal = _noise(5, 5).convert("P")
    out = load_rgb(_save(pal, tmp_path / "p.png"))
    assert out.mode == "RGB" and out.size == (5, 5)


def test_one_bit(tmp_path: Path) -> None:
    bw = Image.new("1", (3, 1), 0)
    bw.putpixel((1, 0), 1)
    out = np.asarray(load_rgb(_save(bw, tmp_path / "b.png")))
    assert out[0, :, 0].tolist() == [0, 255, 0]


def test_exif_orientation_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    path = _save(_noise(40, 20), tmp_path / "r.jpg", exif=exif.tobytes())
    assert Image.open(path).size == (40, 20)
    assert load_rgb(path).size == (20, 40)


def test_truncated_jpeg_is_bad(tmp_path: Path) -> None:
    good = _save(_noise(64, 64), tmp_path / "full.jpg", quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadImageError) as info:
        load_rgb(cut)
    assert str(info.value).startswith(f"{cut}: ")
    assert "truncated" in str(info.value)
    assert "\n" not in str(info.value)


def test_zero_byte_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file"):
        load_rgb(empty)


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture\n" * 20)
    with pytest.raises(BadImageError) as info:
        load_rgb(fake)
    assert str(info.value) == f"{fake}: not an image file, or not one of JPEG, PNG, WEBP, BMP, GIF, TIFF"
    assert isinstance(info.value, PirlError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="cannot read file"):
        load_rgb(tmp_path / "nope.png")


def test_bytes_input_and_name() -> None:
    buf = io.BytesIO()
    _noise(3, 4).save(buf, "PNG")
    assert load_rgb(buf.getvalue()).size == (3, 4)
    with pytest.raises(BadImageError, match=r"^member\.jpg: "):
        load_rgb(b"garbage", name="member.jpg")


def test_pixel_limit(tmp_path: Path) -> None:
    png = _save(_noise(64, 64), tmp_path / "big.png")
    with pytest.raises(BadImageError, match="too large"):
        load_rgb(png, max_pixels=1000)
    # JPEGs are decoded at reduced scale (DCT draft) when that fits the limit.
    jpg = _save(_noise(64, 64), tmp_path / "big.jpg")
    assert load_rgb(jpg, max_pixels=1000).size == (16, 16)
    assert load_rgb(jpg, max_pixels=5000).size == (64, 64)


def test_pil_bomb_error_becomes_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_noise(4, 4), tmp_path / "x.png")

    def bomb(*args: object, **kwargs: object) -> Image.Image:
        raise Image.DecompressionBombError("Image size (999 pixels) exceeds limit")

    monkeypatch.setattr(Image, "open", bomb)
    with pytest.raises(BadImageError, match=r"x\.png: image too large"):
        load_rgb(path)


def test_draft_size_keeps_short_side(tmp_path: Path) -> None:
    jpg = _save(_noise(256, 128), tmp_path / "d.jpg")
    assert load_rgb(jpg, draft_size=64).size == (128, 64)
    assert load_rgb(jpg, draft_size=32).size == (64, 32)
    assert load_rgb(jpg, draft_size=200).size == (256, 128)


def test_is_image_file() -> None:
    assert is_image_file("a/B.JPG") and is_image_file("x.tiff") and is_image_file("x.WebP")
    assert not is_image_file("x.PGM")  # PPM/PGM are outside the decoder allowlist
    assert not is_image_file("x.txt") and not is_image_file("jpg")


# --------------------------------------------------------------------------- crafted inputs from a review


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (its pixels never decode)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_default_pixel_limit_refuses_bombs_without_touching_pillow(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(10_000, 9_000))  # 90 M pixels, just above the default
    with pytest.raises(BadImageError, match=r"image too large \(10000x9000 = 90000000 pixels > 89478485"):
        load_rgb(bomb)
    assert Image.MAX_IMAGE_PIXELS == before


def test_decoder_allowlist_keeps_eps_away_from_ghostscript(tmp_path: Path) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    fake = tmp_path / "x.png"
    fake.write_bytes(eps)
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what Pillow alone would pick from the content
    with pytest.raises(BadImageError, match="x.png: not an image file, or not one of JPEG, PNG"):
        load_rgb(fake)


def test_file_size_cap_applies_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pirl.data.images as images_mod

    big = tmp_path / "big.png"
    with open(big, "wb") as fh:  # a sparse 1 GiB file: reading it whole would cost 1 GiB
        fh.truncate(1 << 30)
    monkeypatch.setattr(images_mod, "_max_bytes", 1 << 20)
    with pytest.raises(
        BadImageError,
        match=r"big.png: file too large \(1,073,741,824 bytes > 1,048,576; .*"
        "PIRL_MAX_IMAGE_BYTES",
    ):
        load_rgb(big)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(BadImageError, match="pipe.png: not a regular file"):
        load_rgb(fifo)  # refused at once, does not wait for a writer
