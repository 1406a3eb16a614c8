"""Region masks: one ``MASK`` struct (inline COCO RLE, polygon, or the bytes of a mask image) → a boolean mask at
the image's size, checked against it. A mask is the pixels that are non-zero (for images with alpha: colour
non-zero and alpha non-zero); mask images are read as they are (not re-oriented by EXIF)."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipmaps.schemas.encodings import polygons_to_mask, rle_decode
from clipmaps.schemas.errors import RowError
from clipmaps.schemas.storage import redact_uri

log = logging.getLogger(__name__)


def get_field(obj: Any, key: str) -> Any:
    """Field ``key`` of a struct as a dict or as Ray's numpy form (an object with attributes); ``None`` if absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_list(v: Any) -> list | None:
    return None if v is None else list(v)


def _error(region_id: str | None, error_type: str, message: str) -> RowError:
    """A mask's error: a row error of stage ``mask`` that names the region."""
    return RowError("mask", error_type, message, region_id=region_id)


def _mask_from_image_bytes(data: bytes, height: int, width: int, shown: str, region_id: str | None) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise _error(region_id, "MalformedMaskImage", f"{shown}: not a readable image ({type(e).__name__})") from None
    if img.size != (width, height):
        raise _error(
            region_id,
            "MaskSizeMismatch",
            f"{shown}: mask is {img.size[0]}x{img.size[1]}, the image is {width}x{height} (after EXIF orientation)",
        )
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise _error(region_id, "MalformedMaskImage", f"{shown}: cannot decode mask image ({e})") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr != 0
    if img.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        return arr[..., :-1].any(axis=-1) & (arr[..., -1] != 0)
    return arr.any(axis=-1)


def decode_mask(
    mask: Any,
    height: int,
    width: int,
    *,
    fetched: bytes | RowError | None = None,
    region_id: str | None = None,
) -> np.ndarray:
    """One ``MASK`` struct (dict, or Ray's numpy form) → ``bool [height, width]``.

    Args:
        mask: the struct: ``region_id`` and exactly one of ``rle``, ``uri``, ``polygon``.
        height, width: the image's size after EXIF orientation, which the mask must match.
        fetched: the bytes (or the read error) of the mask's ``uri``.
        region_id: carried by the error raised.

    Polygons follow :func:`clipmaps.schemas.encodings.polygons_to_mask`: degenerate parts are dropped with a
    warning naming the region and the part; parts outside the image are clipped. An RLE is decoded at its own
    ``size`` (compressed or uncompressed counts), which must equal the image's.

    Raises:
        RowError: stage ``mask``, with ``region_id``; the type is ``MalformedMask``, ``MalformedRLE``,
            ``MalformedPolygon`` (also when no polygon part is usable; the message names each part and why),
            ``MaskSizeMismatch`` (naming both sizes), ``MaskNotFound``, ``MalformedMaskImage``, or a read error's.
    """
    rle, uri, polygon = get_field(mask, "rle"), get_field(mask, "uri"), get_field(mask, "polygon")
    set_fields = [n for n, v in (("rle", rle), ("uri", uri), ("polygon", polygon)) if v is not None]
    if len(set_fields) != 1:
        raise _error(
            region_id,
            "MalformedMask",
            "a mask needs exactly one of rle, uri, polygon; it has "
            + (", ".join(set_fields) if set_fields else "none"),
        )
    if rle is not None:
        try:
            size = _as_list(get_field(rle, "size"))
            counts = get_field(rle, "counts")
            counts = _as_list(counts) if isinstance(counts, np.ndarray) else counts
            m = rle_decode({"size": size, "counts": counts})
        except ValueError as e:
            raise _error(region_id, "MalformedRLE", str(e)) from None
        except Exception as e:  # noqa: BLE001
            raise _error(region_id, "MalformedRLE", f"malformed RLE: {type(e).__name__}: {e}") from None
        if m.shape != (height, width):
            raise _error(
                region_id,
                "MaskSizeMismatch",
                f"RLE size [H, W] = {[m.shape[0], m.shape[1]]} differs from the image's {[height, width]} "
                f"(RLE mask {m.shape[1]}x{m.shape[0]}, image {width}x{height} after EXIF orientation)",
            )
        return m
    if polygon is not None:
        dropped: list[tuple[int, str]] = []
        try:
            polys = [[float(v) for v in p] for p in polygon]
            m = polygons_to_mask(polys, height, width, dropped=dropped)
        except (ValueError, TypeError) as e:
            raise _error(region_id, "MalformedPolygon", f"malformed polygon: {e}") from None
        for k, why in dropped:
            # the region is kept from its other parts (as pycocotools/detectron2 do); say what was left out
            log.warning("region %r: dropped degenerate polygon part %d (%s)", region_id, k, why)
        return m
    shown = redact_uri(str(uri))
    if isinstance(fetched, RowError):
        if fetched.error_type == "FileNotFoundError":
            raise _error(region_id, "MaskNotFound", f"mask {shown} not found")
        raise _error(region_id, fetched.error_type, fetched.message)
    if fetched is None:
        raise _error(region_id, "MaskNotFound", f"mask {shown} was not fetched")
    return _mask_from_image_bytes(fetched, height, width, shown, region_id)
