"""Image bytes → an RGB Pillow image in display orientation, with the guards of the decode stage.

* Formats are limited to :data:`DEFAULT_FORMATS` (no EPS/PDF, which would run external programs).
* Decompression bombs: ``width × height`` from the header is checked against ``max_pixels`` before any pixel is
  decoded (``Image.MAX_IMAGE_PIXELS`` is never changed; Pillow's own check still refuses images above twice its
  limit, ~179 Mpx, reported the same way; between once and twice it only warns).
* EXIF orientation is applied exactly as ``ImageOps.exif_transpose`` does (:data:`EXIF_TRANSPOSE`: tags 2–8; any
  other value, or none, is 1 = as stored); :func:`load_oriented` also returns the tag and the stored size, so that the
  decode stage can map masks annotated on the stored frame through the same transpose (:mod:`.masks`). Embedded ICC
  profiles are ignored (as CLIP's own preprocessing does).
* Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on **white**: a
  transparent background reads as an empty page, the common case for product shots, icons and documents.
* Bit depths: 16-bit grey (``I;16*``) is scaled to 8 bits over the full range (``round(v · 255 / 65535)``); 32-bit
  ``I`` the same when its values fit 0…65535, else min–max; float ``F`` ×255 when in [0, 1], else min–max. 16-bit
  RGB PNGs are reduced by Pillow. CMYK uses Pillow's conversion. Multi-frame files use the first frame.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from clipmaps.schemas.errors import RowError
from clipmaps.schemas.storage import redact_uri

#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (≈ 89.5 Mpx, e.g. 9459 × 9459).
DEFAULT_MAX_PIXELS = 89_478_485
#: Image formats Pillow may open (``Image.open(formats=…)``).
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA")

#: EXIF ``Orientation`` tag → the transpose that shows the stored pixels upright: Pillow's own table in
#: ``ImageOps.exif_transpose`` (pixels and stored-frame masks both go through it, so they cannot disagree).
EXIF_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class OrientedImage(NamedTuple):
    """An image as decoded, with the frame it was stored in.

    Attributes:
        image: RGB, in display orientation; ``image.size`` is the oriented ``(width, height)``.
        orientation: the EXIF ``Orientation`` tag applied, 1–8 (1: none, absent or not one of 2–8).
        stored_size: ``(width, height)`` of the pixels as stored in the file, before orientation (equal to
            ``image.size`` for tags 1–4, swapped for 5–8).
    """

    image: Image.Image
    orientation: int
    stored_size: tuple[int, int]


def load_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = DEFAULT_FORMATS,
    uri: str = "image",
) -> Image.Image:
    """Image bytes → an RGB PIL image in display orientation (EXIF applied): :func:`load_oriented`'s ``image``.

    Raises:
        RowError: as :func:`load_oriented`.
    """
    return load_oriented(data, max_pixels=max_pixels, formats=formats, uri=uri).image


def load_oriented(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = DEFAULT_FORMATS,
    uri: str = "image",
) -> OrientedImage:
    """Image bytes → the RGB image in display orientation, its EXIF orientation tag and its stored size.

    Args:
        data: the file's bytes.
        max_pixels: largest ``width × height`` accepted, checked from the header before decoding.
        formats: Pillow formats that may open it (``None``: any).
        uri: names the image in messages (redacted).

    Raises:
        RowError: stage ``decode``: ``EmptyFile``, ``UnidentifiedImageError``, ``DecompressionBomb``,
            ``TruncatedImage``, ``EmptyImage`` or the exception's class name.
    """
    shown = redact_uri(uri)
    if not data:
        raise RowError("decode", "EmptyFile", f"{shown}: the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=_openable(formats))
    except Image.DecompressionBombError as e:
        raise RowError("decode", "DecompressionBomb", f"{shown}: {e}") from None
    except UnidentifiedImageError:
        allowed = f" (accepted formats: {', '.join(formats)})" if formats else ""
        raise RowError(
            "decode", "UnidentifiedImageError", f"{shown}: not a recognised image ({len(data)} bytes){allowed}"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise RowError("decode", type(e).__name__, f"{shown}: cannot open image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise RowError(
            "decode",
            "DecompressionBomb",
            f"{shown}: {width}x{height} = {width * height} pixels exceeds max_pixels {max_pixels}",
        )
    if width < 1 or height < 1:
        raise RowError("decode", "EmptyImage", f"{shown}: image has size {width}x{height}")
    try:
        img.load()
    except OSError as e:
        if "truncated" in str(e).lower() or "broken data stream" in str(e).lower():
            raise RowError("decode", "TruncatedImage", f"{shown}: image data is truncated or corrupt ({e})") from None
        raise RowError("decode", type(e).__name__, f"{shown}: cannot decode {img.format} image: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise RowError("decode", type(e).__name__, f"{shown}: cannot decode {img.format} image: {e}") from None
    try:
        orientation = exif_orientation(img)
        if orientation != 1:
            img = img.transpose(EXIF_TRANSPOSE[orientation])
        return OrientedImage(to_rgb(img), orientation, (width, height))
    except Exception as e:  # noqa: BLE001
        raise RowError("decode", type(e).__name__, f"{shown}: cannot convert {img.mode} image to RGB: {e}") from None


def exif_orientation(img: Image.Image) -> int:
    """The EXIF ``Orientation`` tag of an opened image as ``ImageOps.exif_transpose`` reads it: 2–8, else 1."""
    tag = img.getexif().get(ExifTags.Base.Orientation, 1)
    return tag if isinstance(tag, int) and tag in EXIF_TRANSPOSE else 1


def _openable(formats: Sequence[str] | None) -> list[str] | None:
    """The formats Pillow has an opener for (plugins registered), in order; ``None`` = all."""
    if not formats:
        return None
    if not Image.OPEN or any(f not in Image.OPEN for f in formats):
        Image.init()  # registers every plugin (idempotent); Image.open alone only pre-loads a few
    return [f for f in formats if f in Image.OPEN]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → ``RGB`` (see the module docstring: transparency on white, 16-bit scaled, not clipped)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        a = arr.astype(np.uint32)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    a = arr.astype(np.float64)
    if mode == "F":
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F" and lo >= 0 and hi <= 1:
        return np.rint(a * 255).astype(np.uint8)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
