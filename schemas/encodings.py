"""Encodings of the binary columns: PNG label maps, heatmaps (8-bit PNG or float16), COCO RLE masks, polygons.

Numpy and Pillow only. Each ``encode_*`` has a ``decode_*`` that inverts it (exactly, except the 8-bit heatmap
quantisation, which is within 1/510).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------------------------- label maps
def encode_label_map(labels: np.ndarray) -> bytes:
    """Integer label map ``[H, W]`` (values ≥ 0) → PNG bytes: 8-bit when the largest label is ≤ 255, else 16-bit."""
    if labels.ndim != 2:
        raise ValueError(f"a label map must be 2-D [H, W], got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ValueError("labels must be in [0, 65535]")
    high = int(labels.max()) if labels.size else 0
    arr = labels.astype(np.uint8 if high <= 255 else np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_label_map(data: bytes) -> np.ndarray:
    """PNG bytes → ``uint8`` or ``uint16`` array ``[H, W]``."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return arr.astype(np.uint16) if arr.dtype.itemsize > 1 else arr.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- heatmaps
HEATMAP_ENCODINGS = ("png8", "float16")


def encode_heatmap(heatmap: np.ndarray, encoding: str = "png8") -> bytes:
    """Heatmap ``[H, W]`` → bytes. ``png8``: values in [0, 1] as ``round(255·v)`` grey PNG; ``float16``: raw
    little-endian float16 (any range), row-major."""
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap must be 2-D [H, W], got shape {heatmap.shape}")
    if encoding == "png8":
        q = np.clip(np.rint(np.nan_to_num(heatmap, nan=0.0) * 255.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(q).save(buf, format="PNG")
        return buf.getvalue()
    if encoding == "float16":
        return np.ascontiguousarray(heatmap, dtype="<f2").tobytes()
    raise ValueError(f"heatmap encoding must be one of {HEATMAP_ENCODINGS}, got {encoding!r}")


def decode_heatmap(data: bytes, encoding: str, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`encode_heatmap` → ``float32 [H, W]``."""
    if encoding == "png8":
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im, dtype=np.float32) / 255.0
    if encoding == "float16":
        return np.frombuffer(data, dtype="<f2").reshape(height, width).astype(np.float32)
    raise ValueError(f"heatmap encoding must be one of {HEATMAP_ENCODINGS}, got {encoding!r}")


# ---------------------------------------------------------------------------------------------- COCO RLE
def rle_encode(mask: np.ndarray) -> dict:
    """Binary mask ``[H, W]`` → COCO RLE ``{"size": [H, W], "counts": str}`` (column-major runs starting with 0s,
    compressed with COCO's 6-bit LEB128-like string code)."""
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D [H, W], got shape {mask.shape}")
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).T.ravel()  # column-major order, as COCO counts
    # where a run ends: comparing neighbours as booleans is one pass with no int copy (this runs per region, at the
    # image's full size)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [h, w], "counts": _counts_to_string(runs)}


def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list of counts) → ``bool [H, W]``.

    Raises ``ValueError`` naming what is wrong for malformed input (bad size, counts not summing to H·W…).
    """
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed RLE: needs 'size' [H, W] and 'counts' ({e})") from e
    if h < 0 or w < 0:
        raise ValueError(f"malformed RLE: negative size {[h, w]}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(r < 0 for r in runs):
        raise ValueError("malformed RLE: negative run length")
    if sum(runs) != h * w:
        raise ValueError(f"malformed RLE: runs cover {sum(runs)} pixels, the size {h}x{w} needs {h * w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((w, h)).T.copy()


def _counts_to_string(runs: list[int]) -> str:
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _string_to_counts(s: str) -> list[int]:
    runs: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("malformed RLE: counts string ends inside a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"malformed RLE: character {s[p]!r} is not in the RLE alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


# ---------------------------------------------------------------------------------------------- polygons
def polygon_part_problem(part: list[float] | np.ndarray) -> str | None:
    """Why one COCO polygon part (``[x0, y0, x1, y1, …]``) cannot enclose any pixel, or ``None`` when it can.

    A part is degenerate when it has an odd number of coordinates, fewer than 3 points (6 coordinates), a
    non-finite coordinate, or zero area (all points on one line). pycocotools rasterises such parts to nothing and
    detectron2 drops them (``len(poly) >= 6``), keeping the instance's other parts; this function names the reason
    so callers can drop the part and say which one.
    """
    n = len(part)
    if n % 2:
        return f"an odd number of coordinates ({n})"
    if n < 6:
        return f"{n // 2} point(s), a polygon needs at least 3 (6 coordinates)"
    pts = np.asarray(part, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(pts).all():
        return "a coordinate that is not a finite number"
    # Zero area means every point on one line, not a zero signed (shoelace) area: a self-crossing "bow tie" has
    # signed area 0 yet covers pixels, and pycocotools fills it. The centred points span a line (or a point) exactly
    # when their second singular value vanishes; compare relative to the first to allow for rounding.
    sv = np.linalg.svd(pts - pts.mean(axis=0), compute_uv=False)
    if sv[1] <= 1e-9 * max(float(sv[0]), 1.0):
        return "zero area (its points are on one line)"
    return None


def polygons_to_mask(
    polygons: list[list[float]],
    height: int,
    width: int,
    *,
    dropped: list[tuple[int, str]] | None = None,
) -> np.ndarray:
    """COCO polygons (each ``[x0, y0, x1, y1, …]`` in pixels) → ``bool [height, width]`` (union of all parts).

    A pixel is inside when its centre ``(x + 0.5, y + 0.5)`` is inside the polygon (even-odd rule), so a square
    from (2, 2) to (6, 6) covers 4 × 4 pixels, as COCO's rasteriser does (Pillow's fill would give 5 × 5).
    Parts partly or wholly outside the image are clipped to it (a part wholly outside adds no pixel), as
    pycocotools' ``frPyObjects`` does; the result may be empty, which callers report.

    Degenerate parts (see :func:`polygon_part_problem`) are skipped, as pycocotools and detectron2 do, so an
    annotation mixing a real polygon with a stray 2-point "polygon" keeps its real part.

    Args:
        polygons: the parts; numbers (``float`` or ``int``) in image pixel coordinates.
        height, width: the image's size (≥ 0).
        dropped: when given, ``(part index, reason)`` is appended for each skipped part.

    Raises:
        ValueError: no part is usable (message names every part and why), or ``polygons`` is empty.
    """
    if len(polygons) == 0:
        raise ValueError("no polygon parts")
    mask = np.zeros((height, width), dtype=bool)
    problems: list[tuple[int, str]] = []
    for k, poly in enumerate(polygons):
        problem = polygon_part_problem(poly)
        if problem is not None:
            problems.append((k, problem))
            continue
        _fill_polygon(mask, np.asarray(poly, dtype=np.float64).reshape(-1, 2))
    if len(problems) == len(polygons):
        parts = "; ".join(f"part {k}: {why}" for k, why in problems)
        raise ValueError(f"no usable polygon part ({parts})")
    if dropped is not None:
        dropped.extend(problems)
    return mask


def _fill_polygon(mask: np.ndarray, pts: np.ndarray) -> None:
    """OR the pixels whose centres are inside polygon ``pts`` (``float64 [N, 2]``, x/y) into ``mask`` in place,
    looking only at the part of the polygon's bounding box inside the image (that is the clipping)."""
    height, width = mask.shape
    x0, y0 = max(0, int(np.floor(pts[:, 0].min()))), max(0, int(np.floor(pts[:, 1].min())))
    x1, y1 = min(width, int(np.ceil(pts[:, 0].max())) + 1), min(height, int(np.ceil(pts[:, 1].max())) + 1)
    if x0 >= x1 or y0 >= y1:
        return  # wholly outside the image
    cx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    cy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    inside = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        if ay == by:
            continue
        crosses = (ay > cy) != (by > cy)  # the edge spans this row's centre line
        x_at = ax + (cy - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (cx < x_at)
    mask[y0:y1, x0:x1] |= inside


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``(x, y, width, height)`` of a binary mask; ``(0, 0, 0, 0)`` for an empty one."""
    # the rows and columns that hold a pixel, not every pixel's coordinates (np.nonzero on a full-size mask is ~10×
    # slower and allocates two int64 arrays per pixel inside)
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return 0, 0, 0, 0
    cols = np.flatnonzero(np.any(mask, axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
