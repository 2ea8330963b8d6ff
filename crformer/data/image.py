"""Robust image loading: any PIL-readable file -> 8-bit RGB ``PIL.Image``.

Conversions (never rejections):

* EXIF orientation is applied (``ImageOps.exif_transpose``) so pixels match what viewers show.
* ``1`` / ``L`` / ``P`` -> grey replicated to RGB (palette images via their palette).
* Images with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency, ...) are composited over
  **black**: ``rgb * alpha / 255``.  Fully transparent pixels therefore become black whatever colour
  they secretly store, which keeps the output deterministic.
* ``CMYK`` / ``YCbCr`` / other colour modes -> PIL's RGB conversion.
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) -> scaled ``round(v * 255 / 65535)``
  (0 -> 0, 65535 -> 255, monotonic; not clipped).  32-bit ``I`` images are treated the same way when
  their values lie in 0..65535 (that is how older Pillow opens 16-bit PNGs), otherwise min–max
  stretched.  Float ``F`` images in [0, 1] are scaled by 255, otherwise min–max stretched.

Pixel budgets, decided from the header before any pixel is decoded: an image of more than
:data:`MAX_PIXELS` is refused; with ``max_side`` (inference) a larger image is downscaled on load
and its mask comes at that size. A JPEG decodes at a reduced scale directly; other formats (PNG) are
decoded once at full size and shrunk at once, so a 12000×12000 PNG still peaks at ≈ 0.8 GB while it
loads (measured 2026-12-07), though nothing after the load sees more than ``max_side``².

Errors are :class:`~crformer.errors.UserError`: ``image not found: PATH`` or
``cannot read image PATH: reason``.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from crformer.errors import UserError, first_line
from crformer.files import regular_file

__all__ = ["load_image", "to_rgb", "image_size", "MAX_PIXELS", "INFERENCE_MAX_SIDE"]

#: Larger images are refused by every tool: PIL's own decompression-bomb limit (178,956,970 pixels,
#: about 13377² by default), stated once here so that every message gives it.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
#: Inference downscales images larger than this on a side (phone photos fit; the model sees 64-480 px).
INFERENCE_MAX_SIDE = 4096

_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16BS", "I;16LS", "I;16S"}


def _stretch(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(np.min(a)), float(np.max(a))
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _scale16(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)  # round(v*255/65535), exact integers


def _grey_to_rgb(g: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(g[:, :, None], 3, axis=2))


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info) or (
        im.mode in ("L", "RGB") and "transparency" in im.info)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert an in-memory PIL image to 8-bit RGB following the rules in the module docstring."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _16BIT_MODES:
        a = np.asarray(im)
        if a.dtype.kind not in "iu":  # unexpected decode; fall back to raw interpretation
            a = np.asarray(im.convert("I"))
        if a.dtype.kind == "i" and a.min() < 0:  # signed 16-bit variants
            a = a.astype(np.int64) + 32768
        return _grey_to_rgb(_scale16(a))
    if mode == "I":
        a = np.asarray(im)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _grey_to_rgb(_scale16(a))
        return _grey_to_rgb(_stretch(a))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return _grey_to_rgb(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))
        return _grey_to_rgb(_stretch(a))
    if _has_alpha(im):
        if mode == "RGBa":
            im = im.convert("RGBA")
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255
        return Image.fromarray(rgb.astype(np.uint8))
    return im.convert("RGB")


#: A file path, or the encoded bytes of an image embedded in a data file (a parquet cell).
ImageSource = Union[str, os.PathLike, bytes]


def _source(image: ImageSource, name: str | None) -> tuple[Union[str, io.BytesIO], str]:
    """What PIL opens and what messages call it: a path (a regular file) names itself; embedded bytes
    are named by ``name`` (e.g. ``FILE row N``)."""
    if isinstance(image, (bytes, bytearray)):
        return io.BytesIO(image), name or "(embedded image)"
    p = os.fspath(regular_file(image, "image"))
    return p, p


def _open_checked(src: Union[str, io.BytesIO], p: str) -> Image.Image:
    """Open (header only) and refuse an image over :data:`MAX_PIXELS` before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large is fine; over the limit is not
            im = Image.open(src)
    except Image.DecompressionBombError:
        im = None
    if im is None or im.width * im.height > MAX_PIXELS:
        size = "" if im is None else f" ({im.width}×{im.height})"
        if im is not None:
            im.close()
        raise UserError(f"image {p} has more pixels{size} than the limit of {MAX_PIXELS:,}")
    return im


def image_size(image: ImageSource, name: str | None = None) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_image` would return it (EXIF orientation applied), from the
    header alone: the check of a whole dataset before training reads no pixels. ``image``: a path or
    embedded bytes (named ``name`` in errors)."""
    src, p = _source(image, name)
    try:
        with _open_checked(src, p) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse the header is this file's fault
        raise UserError(f"cannot read image {p}: {first_line(e)}") from None
    return (h, w) if rotated else (w, h)


def load_image(image: ImageSource, max_side: int | None = None, name: str | None = None) -> Image.Image:
    """Open ``image`` (a path, or embedded bytes named ``name`` in errors) and return it as an 8-bit RGB
    ``PIL.Image`` (fully loaded, file closed); with ``max_side``, a larger image comes back downscaled
    to fit ``max_side`` × ``max_side``."""
    src, p = _source(image, name)
    try:
        with _open_checked(src, p) as im:
            if max_side is not None:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            im.load()
            try:
                im2 = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF must not make the image unusable
                im2 = im
            if max_side is not None and max(im2.size) > max_side:
                im2 = im2.copy() if im2 is im else im2
                im2.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            out = to_rgb(im2)
            if out is im:
                out = im.copy()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, struct.error from bad headers...
        raise UserError(f"cannot read image {p}: {first_line(e)}") from None
    return out
