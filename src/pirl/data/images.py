"""Decode image files (or bytes) robustly into 8-bit RGB PIL images.

Decoding is restricted to :data:`DECODERS` (Pillow picks a decoder from the content, so without the
list an EPS file named ``x.png`` would reach Ghostscript), files are capped in bytes before they are
read (:func:`get_max_image_bytes`) and images in pixels (:func:`get_max_image_pixels`, default about
89 M, Pillow's own default). Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is left untouched:
Pillow itself refuses images above twice that value, whatever pirl's limit.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pirl.errors import PirlError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "is_image_file",
    "load_rgb",
    "to_rgb",
    "get_max_image_pixels",
    "set_max_image_pixels",
    "get_max_image_bytes",
    "set_max_image_bytes",
    "DECODERS",
]

#: The only Pillow decoders :func:`load_rgb` lets Pillow use.
DECODERS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

#: File name suffixes (lower case, with the dot) treated as images; matching is case-insensitive.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

_DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS: 1024 * 1024 * 1024 // 4 // 3
_DEFAULT_MAX_BYTES = 256 << 20


def _env_limit(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PirlError(f"{name} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise PirlError(f"{name} must be positive, got {raw!r}")
    return value


_max_pixels: int = _env_limit("PIRL_MAX_IMAGE_PIXELS", _DEFAULT_MAX_PIXELS)
_max_bytes: int = _env_limit("PIRL_MAX_IMAGE_BYTES", _DEFAULT_MAX_BYTES)

PathOrBytes = str | os.PathLike | bytes | bytearray | memoryview


class BadImageError(PirlError):
    """An image file that cannot be decoded; the message reads ``"<path>: <short reason>"``."""


def is_image_file(name: str | os.PathLike) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def get_max_image_pixels() -> int:
    """The largest image (width × height) :func:`load_rgb` accepts by default."""
    return _max_pixels


def set_max_image_pixels(pixels: int) -> None:
    """Set the decompression-bomb limit (default 89,478,485 pixels, or ``$PIRL_MAX_IMAGE_PIXELS``)."""
    global _max_pixels
    if pixels <= 0:
        raise PirlError(f"max image pixels must be positive, got {pixels}")
    _max_pixels = int(pixels)


def get_max_image_bytes() -> int:
    """The largest image file (in bytes) :func:`load_rgb` reads."""
    return _max_bytes


def set_max_image_bytes(size: int) -> None:
    """Set the file-size limit (default 256 MiB, or ``$PIRL_MAX_IMAGE_BYTES``)."""
    global _max_bytes
    if size <= 0:
        raise PirlError(f"max image bytes must be positive, got {size}")
    _max_bytes = int(size)


def _read_capped(path: str | os.PathLike, label: str, cap: int) -> bytes:
    """A regular file's bytes, refused before reading when it is larger than ``cap`` (or not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BadImageError(f"{label}: cannot read file ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadImageError(f"{label}: not a regular file")
        if st.st_size > cap:
            raise BadImageError(
                f"{label}: file too large ({st.st_size:,} bytes > {cap:,}; raise the limit with PIRL_MAX_IMAGE_BYTES)"
            )
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(cap + 1)
        if len(data) > cap:
            raise BadImageError(f"{label}: file too large (more than {cap:,} bytes)")
        return data
    except OSError as exc:
        raise BadImageError(f"{label}: cannot read file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.ascontiguousarray(values.astype(np.uint8))
    return Image.fromarray(gray).convert("RGB")


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    # Full 16-bit range onto 0..255 with rounding (65535 -> 255, 257 -> 1), not a clip at 255.
    return (arr.astype(np.uint32) * 255 + 32767) // 65535


def _scale_wide(arr: np.ndarray, *, is_float: bool) -> np.ndarray:
    """Map 32-bit int / float gray values to 0..255 by guessing their nominal range."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if is_float and lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = arr
    elif not is_float and lo >= 0.0 and hi <= 65535.0:
        out = arr * (255.0 / 65535.0)
    else:
        out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(out), 0, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any common mode to 8-bit RGB (transparency composited on white)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        return _gray_array_to_rgb(_scale_16bit(np.asarray(img)))
    if mode in ("I", "F"):
        return _gray_array_to_rgb(_scale_wide(np.asarray(img), is_float=mode == "F"))
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA")
    if has_alpha or (mode in ("P", "L") and "transparency" in img.info):
        return _composite_on_white(img)
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX


def _draft_scale(size: tuple[int, int], max_pixels: int, draft_size: int | None) -> tuple[int, int] | None:
    """Requested size for JPEG draft mode (DCT downscaling by 2, 4 or 8), or None to decode fully."""
    w, h = size
    scales = (1, 2, 4, 8)
    needed = next((s for s in scales if math.ceil(w / s) * math.ceil(h / s) <= max_pixels), 8)
    allowed = 1
    if draft_size is not None:
        allowed = max(s for s in scales if s == 1 or math.ceil(min(w, h) / s) >= draft_size)
    scale = max(needed, allowed)
    return None if scale == 1 else (max(1, w // scale), max(1, h // scale))


def _short_reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image file, or not one of {', '.join(DECODERS)}"
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large ({exc})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (OSError, SyntaxError, EOFError)) and "truncated" in text.lower():
        return f"truncated or corrupt image ({text})"
    return f"corrupt or unreadable image ({text})"


def load_rgb(
    path_or_bytes: PathOrBytes,
    *,
    name: str | None = None,
    max_pixels: int | None = None,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode an image file (or its bytes) into a fully loaded 8-bit RGB image.

    EXIF orientation is applied; alpha/palette transparency is composited on white; 16-bit and
    float gray images are rescaled (not clipped). ``max_pixels`` (default
    :func:`get_max_image_pixels`) refuses decompression bombs, except that JPEGs above it are
    decoded at 1/2, 1/4 or 1/8 scale when that brings them under the limit. ``draft_size`` lets
    JPEG decoding downscale (by a power of two) as long as the short side stays >= draft_size.
    ``name`` labels bytes input in error messages. Raises :class:`BadImageError` on any failure.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        data = bytes(path_or_bytes)
    else:
        label = name or os.fspath(path_or_bytes)
        data = _read_capped(path_or_bytes, label, _max_bytes)
    if not data:
        raise BadImageError(f"{label}: empty file")
    limit = _max_pixels if max_pixels is None else int(max_pixels)
    try:
        with warnings.catch_warnings():
            # EXIF / palette / bomb warnings would flood DataLoader logs; failures raise instead.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=DECODERS)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise BadImageError(f"{label}: image has zero size ({w}x{h})")
            if img.format == "JPEG":
                target = _draft_scale((w, h), limit, draft_size)
                if target is not None:
                    img.draft(img.mode, target)
                    w, h = img.size
            if w * h > limit:
                raise BadImageError(
                    f"{label}: image too large ({w}x{h} = {w * h} pixels > {limit}; "
                    "raise the limit with PIRL_MAX_IMAGE_PIXELS)"
                )
            img.load()
            try:
                img = ImageOps.exif_transpose(img) or img
            except Exception:  # broken EXIF should not cost an otherwise good image
                pass
            rgb = to_rgb(img)
            rgb.load()
            return rgb
    except BadImageError:
        raise
    except Exception as exc:  # Pillow raises many types (OSError, ValueError, SyntaxError, struct.error...)
        raise BadImageError(f"{label}: {_short_reason(exc)}") from exc
