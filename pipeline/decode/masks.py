"""Region masks: one ``MASK`` struct (inline COCO RLE, polygon, or the bytes of a mask image) → a boolean mask in
the image's oriented frame (as decoded, after EXIF orientation). A mask is the pixels that are non-zero (for images
with alpha: colour non-zero and alpha non-zero); a mask image's own EXIF tag is ignored.

**The annotation's frame.** Every mask has a frame, ``[height, width]``: an RLE its own ``size``, a mask image its
pixel size, a polygon the size the manifest row declares (``width``/``height`` columns; when absent, the frame the
mode assumes: the stored one with ``stored``, else the oriented one). An image with EXIF orientation has two frames,
the stored one (the pixels as in the file, which many annotation tools show) and the oriented one (as displayed,
what the methods see). ``annotation_frame`` (:data:`ANNOTATION_FRAMES`) says which the annotation is in:

* ``auto`` — decided per mask by its size: a frame equal to the oriented one is used as is; else one equal to the
  stored frame is mapped through the image's orientation (the same Pillow transpose as the pixels). When both
  frames have the same size (tags 1–4, or a square image) the size cannot tell them apart, and the oriented frame
  is taken: collections annotated on the stored pixels of such images need ``stored``.
* ``oriented`` — the frame must be the oriented one; used as is.
* ``stored`` — the frame must be the stored one; mapped through the orientation (a no-op for tag 1).

A frame that fits none of what the mode allows is a ``MaskSizeMismatch`` naming the mask's frame, the image's
oriented and stored sizes and the orientation tag. A row's declared size is checked the same way for every mask of
the row (also RLE and mask images), so a row whose declared size no orientation explains fails each of its masks,
never the image.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipmaps.schemas.encodings import polygons_to_mask, rle_decode
from clipmaps.schemas.errors import RowError
from clipmaps.schemas.storage import redact_uri

from .image import EXIF_TRANSPOSE

log = logging.getLogger(__name__)

#: Values of ``input.annotation_frame`` (see the module docstring).
ANNOTATION_FRAMES = ("auto", "oriented", "stored")
AnnotationFrame = Literal["auto", "oriented", "stored"]


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


def stored_hw(height: int, width: int, orientation: int) -> tuple[int, int]:
    """The stored ``(height, width)`` of an image whose oriented size is ``height × width``: tags 5–8 swap them."""
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def orient_mask(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A ``bool [h, w]`` mask in the stored frame → the oriented frame, through Pillow's transpose for the EXIF tag
    (:data:`.image.EXIF_TRANSPOSE`, the one applied to the pixels); tag 1 (or any other value) returns it as is.
    The result is ``bool [w, h]`` for tags 5–8, ``bool [h, w]`` otherwise."""
    method = EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8), "L").transpose(method)) != 0


def resolve_frame(
    frame_hw: tuple[int, int],
    what: str,
    height: int,
    width: int,
    orientation: int,
    mode: AnnotationFrame,
    region_id: str | None,
) -> bool:
    """Which frame a mask of size ``frame_hw`` (``[height, width]``) is in, by ``mode`` (module docstring).

    Args:
        frame_hw: the mask's frame; ``what`` names where it comes from in the message (e.g. ``"RLE size"``).
        height, width: the image's oriented size; ``orientation``: its EXIF tag (1–8).

    Returns:
        ``True`` when the mask is in the stored frame and must go through :func:`orient_mask`, ``False`` when it is
        in the oriented frame.

    Raises:
        RowError: ``MaskSizeMismatch`` (stage ``mask``, with ``region_id``) naming the frame, both image sizes and
            the tag, when the frame is not one ``mode`` allows.
    """
    oriented = (height, width)
    stored = stored_hw(height, width, orientation)
    frame = (int(frame_hw[0]), int(frame_hw[1]))
    if mode in ("auto", "oriented") and frame == oriented:
        return False
    if mode in ("auto", "stored") and frame == stored:
        return orientation != 1
    # [H, W] as in RLE sizes; both of the image's frames and the tag, so the reader can tell which tool's frame
    if mode == "stored":
        detail = f"stored frame {list(stored)} ({list(oriented)} as decoded, EXIF orientation {orientation}; "
        detail += "input.annotation_frame: stored)"
    elif mode == "oriented":
        detail = f"{list(oriented)} as decoded ({list(stored)} as stored, EXIF orientation {orientation}; "
        detail += "input.annotation_frame: oriented)"
    else:
        detail = f"{list(oriented)} as decoded and {list(stored)} as stored (EXIF orientation {orientation})"
    raise _error(region_id, "MaskSizeMismatch", f"{what} [H, W] = {list(frame)} differs from the image's {detail}")


def _mask_from_image_bytes(data: bytes, shown: str, region_id: str | None, place) -> tuple[np.ndarray, bool]:
    """Mask image bytes → ``(bool [h, w] at the file's own size, whether it is in the stored frame)``.

    ``place(frame_hw, what)`` is :func:`resolve_frame` bound to the image: it is called with the size from the header,
    before any pixel is decoded, so a mask of the wrong size costs nothing.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise _error(region_id, "MalformedMaskImage", f"{shown}: not a readable image ({type(e).__name__})") from None
    stored = place((img.size[1], img.size[0]), f"{shown}: mask image")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise _error(region_id, "MalformedMaskImage", f"{shown}: cannot decode mask image ({e})") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr != 0, stored
    if img.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        return arr[..., :-1].any(axis=-1) & (arr[..., -1] != 0), stored
    return arr.any(axis=-1), stored


def decode_mask(
    mask: Any,
    height: int,
    width: int,
    *,
    fetched: bytes | RowError | None = None,
    region_id: str | None = None,
    orientation: int = 1,
    declared: tuple[int, int] | None = None,
    annotation_frame: AnnotationFrame = "auto",
) -> np.ndarray:
    """One ``MASK`` struct (dict, or Ray's numpy form) → ``bool [height, width]`` in the image's oriented frame.

    Args:
        mask: the struct: ``region_id`` and exactly one of ``rle``, ``uri``, ``polygon``.
        height, width: the image's size after EXIF orientation (the frame of the result).
        fetched: the bytes (or the read error) of the mask's ``uri``.
        region_id: carried by the error raised.
        orientation: the image's EXIF orientation tag, 1–8 (:func:`.image.load_oriented`); 1 = stored as shown.
        declared: ``(height, width)`` the manifest row declares for its annotations, or ``None`` (unknown).
        annotation_frame: ``auto`` | ``oriented`` | ``stored``: which frame masks are in (module docstring).

    Polygons follow :func:`clipmaps.schemas.encodings.polygons_to_mask`: degenerate parts are dropped with a
    warning naming the region and the part; parts outside the frame are clipped. An RLE is decoded at its own
    ``size`` (compressed or uncompressed counts). A mask in the stored frame is mapped through
    :func:`orient_mask`.

    Raises:
        RowError: stage ``mask``, with ``region_id``; the type is ``MalformedMask``, ``MalformedRLE``,
            ``MalformedPolygon`` (also when no polygon part is usable; the message names each part and why),
            ``MaskSizeMismatch`` (naming the mask's frame, both sizes of the image and the orientation tag),
            ``MaskNotFound``, ``MalformedMaskImage``, or a read error's.
        ValueError: ``annotation_frame`` is not one of :data:`ANNOTATION_FRAMES` (a caller's bug, not a row's).
    """
    if annotation_frame not in ANNOTATION_FRAMES:
        raise ValueError(f"annotation_frame must be one of {ANNOTATION_FRAMES}, got {annotation_frame!r}")

    def place(frame_hw: tuple[int, int], what: str) -> bool:
        return resolve_frame(frame_hw, what, height, width, orientation, annotation_frame, region_id)

    rle, uri, polygon = get_field(mask, "rle"), get_field(mask, "uri"), get_field(mask, "polygon")
    set_fields = [n for n, v in (("rle", rle), ("uri", uri), ("polygon", polygon)) if v is not None]
    if len(set_fields) != 1:
        raise _error(
            region_id,
            "MalformedMask",
            "a mask needs exactly one of rle, uri, polygon; it has "
            + (", ".join(set_fields) if set_fields else "none"),
        )
    # the row's declared frame first: one that no orientation explains fails every mask of the row (by region), as
    # then even a self-sized RLE may belong to another picture than the one decoded
    declared_stored = place(declared, "the row's declared size") if declared is not None else None
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
        return orient_mask(m, orientation) if place(m.shape, "RLE size") else m
    if polygon is not None:
        if declared is not None:
            stored, frame = declared_stored, declared
        else:  # unknown: the frame the mode assumes (auto: the oriented one, as before sizes were declared)
            stored = annotation_frame == "stored" and orientation != 1
            frame = stored_hw(height, width, orientation) if stored else (height, width)
        dropped: list[tuple[int, str]] = []
        try:
            polys = [[float(v) for v in p] for p in polygon]
            m = polygons_to_mask(polys, int(frame[0]), int(frame[1]), dropped=dropped)
        except (ValueError, TypeError) as e:
            raise _error(region_id, "MalformedPolygon", f"malformed polygon: {e}") from None
        for k, why in dropped:
            # the region is kept from its other parts (as pycocotools/detectron2 do); say what was left out
            log.warning("region %r: dropped degenerate polygon part %d (%s)", region_id, k, why)
        return orient_mask(m, orientation) if stored else m
    shown = redact_uri(str(uri))
    if isinstance(fetched, RowError):
        if fetched.error_type == "FileNotFoundError":
            raise _error(region_id, "MaskNotFound", f"mask {shown} not found")
        raise _error(region_id, fetched.error_type, fetched.message)
    if fetched is None:
        raise _error(region_id, "MaskNotFound", f"mask {shown} was not fetched")
    m, stored = _mask_from_image_bytes(fetched, shown, region_id, place)
    return orient_mask(m, orientation) if stored else m
