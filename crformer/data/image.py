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

Errors are :class:`~crformer.errors.UserError`: ``image not found: PATH`` or
``cannot read image PATH: reason``.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crformer.errors import UserError

__all__ = ["load_image", "to_rgb"]

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


def load_image(path: Union[str, os.PathLike]) -> Image.Image:
    """Open ``path`` and return it as an 8-bit RGB ``PIL.Image`` (fully loaded, file closed)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UserError(f"image not found: {p}")
    if os.path.isdir(p):
        raise UserError(f"cannot read image {p}: is a directory")
    try:
        with Image.open(p) as im:
            im.load()
            try:
                im2 = ImageOps.exif_transpose(im)
            except Exception:  # broken EXIF must not make the image unusable
                im2 = im
            out = to_rgb(im2)
            if out is im:
                out = im.copy()
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {p}: {type(e).__name__}: {e}") from None
    except Exception as e:  # e.g. struct.error from malformed headers
        raise UserError(f"cannot read image {p}: {type(e).__name__}: {e}") from None
    return out
