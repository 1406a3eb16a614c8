"""The CPU stage: fetch image bytes, decode, orient, convert to RGB, preprocess per method, decode region masks.

Usable as a Ray Data callable class or as a plain function (no Ray, no torch imported here)::

    ds.map_batches(DecodeStage, fn_constructor_kwargs={"config": cfg}, batch_format="numpy", concurrency=…)
    out = decode_batch(batch, cfg)

Input: a batch of manifest rows (``dict`` of numpy arrays or lists, or a ``pa.Table``) with ``image_id``,
``image_uri`` and optionally ``masks``, ``prompts``. Output: a ``dict[str, np.ndarray]`` with the same number of
rows in the same order — every input column except ``masks`` (the raw mask structs, heavy and no longer needed)
passed through unchanged, plus the decode columns of :mod:`clipmaps.schemas.batches`
(:func:`output_columns` lists them for a config). Per row:

==================== ============================================== ===========================================
column               good row                                       failed row
==================== ============================================== ===========================================
``height``/``width`` ``int64`` array: size after EXIF orientation   ``0``
``error_stage``      ``None``                                       ``read`` | ``decode`` | ``mask`` |
                                                                    ``preprocess`` (object array of str/None)
``error_type``       ``None``                                       e.g. ``FileNotFoundError``,
                                                                    ``DecompressionBomb``, ``TruncatedImage``
``error_message``    ``None``                                       short; names the URI (credentials redacted)
``prompts``          ``list[str] | None`` (``None`` = the job's vocabulary), normalised from the input
``pixels_square``    ``float32 [3, S, S]`` (OpenAI mean/std,         ``float32 [3, 0, 0]``
                     bicubic) — only when ``square_size`` is set
``pixels_maskclip``  ``float32 [3, h, w]`` — only with ``maskclip``  ``float32 [3, 0, 0]``
``mask_ids``         ``list[str]``: valid masks, manifest order     ``[]``
``masks_square``     ``float32 [M, S, S]`` in [0, 1]                ``float32 [0, S, S]``
``mask_area``        ``int64 [M]``: pixels at the image's size       ``int64 [0]``
``mask_bbox``        ``int32 [M, 4]``: x, y, w, h at the image size ``int32 [0, 4]``
``mask_errors``      ``list[dict(region_id, error_type, message)]`` ``[]``
==================== ============================================== ===========================================

The mask columns exist only with ``need_masks`` (``masks_square`` also needs ``square_size``); a good row
without masks has ``M = 0``. Array-valued columns are 1-D ``object`` arrays of ``np.ndarray``.

Why failed rows hold empty arrays and ``0`` rather than ``None``: Ray Data turns a numpy column into an Arrow
tensor column when every value is an array, but into pickled Python objects when one is ``None``, and then
refuses to concatenate the two kinds ("Found columns with both objects and tensors"). Arrays of one ``ndim``
(fixed or variable shape) always unify. **Always test ``error_stage`` to tell failed rows**, with
:func:`failed_rows`: after Ray's Arrow round trip a column that is ``None`` on every row of a block comes back as
``float32`` NaN, not ``None`` (this also hits ``error_*`` and ``prompts``).

Decoding choices:

* Formats are limited to :data:`DEFAULT_FORMATS` (no EPS/PDF, which would run external programs).
* Decompression bombs: ``width × height`` from the header is checked against ``max_pixels`` before any pixel is
  decoded (``Image.MAX_IMAGE_PIXELS`` is never changed; Pillow's own check still refuses images above twice its
  limit, ~179 Mpx, reported the same way; between once and twice it only warns).
* EXIF orientation is applied (``ImageOps.exif_transpose``); ``height``/``width`` and masks are in the oriented
  frame. Mask PNGs are not re-oriented. Embedded ICC profiles are ignored (as CLIP's own preprocessing does).
* Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on **white**: a
  transparent background reads as an empty page, the common case for product shots, icons and documents.
* 16-bit grey (``I;16*``) is scaled to 8 bits over the full range (``round(v · 255 / 65535)``); 32-bit ``I`` the
  same when its values fit 0…65535, else min–max; float ``F`` ×255 when in [0, 1], else min–max. 16-bit RGB PNGs
  are reduced by Pillow. CMYK uses Pillow's conversion. Multi-frame files use the first frame.
* A mask is the pixels that are non-zero (for images with alpha: colour non-zero and alpha non-zero).
"""

from __future__ import annotations

import errno
import io
import logging
import random
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from clipmaps.actors.preprocess import Preprocess
from clipmaps.pipeline.sources import DEFAULT_ALLOWED_SCHEMES, uri_scheme
from clipmaps.pipeline.spec import redact_uri as _redact_uri
from clipmaps.schemas import batches as B
from clipmaps.schemas.encodings import mask_bbox, polygons_to_mask, rle_decode

log = logging.getLogger(__name__)

#: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (≈ 89.5 Mpx, e.g. 9459 × 9459).
DEFAULT_MAX_PIXELS = 89_478_485
#: Image formats Pillow may open (``Image.open(formats=…)``).
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA")

#: Every column the stage can add, in order (:func:`output_columns` gives those of one config).
OUTPUT_COLUMNS = (
    B.HEIGHT,
    B.WIDTH,
    B.ERROR_STAGE,
    B.ERROR_TYPE,
    B.ERROR_MESSAGE,
    B.PROMPTS,
    B.PIXELS_SQUARE,
    B.PIXELS_MASKCLIP,
    B.MASK_IDS,
    B.MASKS_SQUARE,
    B.MASK_AREA,
    B.MASK_BBOX,
    B.MASK_ERRORS,
)
_MESSAGE_CHARS = 300


@dataclass(frozen=True)
class DecodeConfig:
    """What the decode stage produces and how it reads.

    Attributes:
        square_size: side of ``pixels_square``/``masks_square`` (GEM, LeGrad, MaskInversion input, OpenAI
            mean/std, bicubic as ``METHOD_PREPROCESS``); ``None`` when no method needs a square input.
        maskclip: MaskCLIP's preprocessing (``METHOD_PREPROCESS["maskclip"]``) or ``None``.
        need_masks: decode the rows' region masks (MaskInversion).
        max_pixels: largest ``width × height`` accepted (checked from the header, before decoding).
        storage_options: fsspec options for ``fsspec.open`` (credentials, endpoint…); never in messages.
        allowed_schemes: URI schemes that may be read (bare paths are ``file``).
        retries: extra attempts after a transient read error (connection, timeout, 5xx/throttling); missing
            files and permission errors are final.
        retry_backoff_s: first back-off; doubles per attempt, with jitter.
        io_threads: concurrent fetches per batch (object-store latency dominates); 1 = sequential.
        formats: Pillow formats accepted (``None`` = any Pillow can open).
    """

    square_size: int | None = 448
    maskclip: Preprocess | None = None
    need_masks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict = field(default_factory=dict)
    allowed_schemes: tuple[str, ...] = DEFAULT_ALLOWED_SCHEMES
    retries: int = 2
    retry_backoff_s: float = 0.2
    io_threads: int = 8
    formats: tuple[str, ...] | None = DEFAULT_FORMATS

    def __post_init__(self):
        if self.square_size is not None and self.square_size < 1:
            raise ValueError(f"square_size must be ≥ 1 or None, got {self.square_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be ≥ 1, got {self.max_pixels}")
        if self.retries < 0 or self.retry_backoff_s < 0 or self.io_threads < 1:
            raise ValueError("retries and retry_backoff_s must be ≥ 0 and io_threads ≥ 1")
        object.__setattr__(self, "allowed_schemes", tuple(s.lower() for s in self.allowed_schemes))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        if self.formats is not None:
            object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))


class RowError(Exception):
    """A failure that becomes the row's (or a mask's) error record."""

    def __init__(self, stage: str, error_type: str, message: str):
        super().__init__(message)
        self.stage, self.error_type, self.message = stage, error_type, _short(message)


# ------------------------------------------------------------------------------------------------ fetching
_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.ENETRESET,
}
_TRANSIENT_NAMES = {  # by name, so that no client library needs importing (aiohttp, botocore, urllib3, gcsfs…)
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ClientPayloadError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "IncompleteReadError",
    "ResponseStreamingError",
    "ProtocolError",
    "HttpError",
    "TransportError",
}
_TRANSIENT_TEXT = re.compile(
    r"\b(500|502|503|504|429)\b|slow ?down|throttl|service unavailable|internal ?(server )?error|timed? ?out|"
    r"temporar|connection (reset|aborted|refused|closed)|too many requests|bad gateway|request ?timeout",
    re.IGNORECASE,
)
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, RowError, ValueError)


def is_transient(exc: BaseException, _depth: int = 0) -> bool:
    """Whether a read error is worth retrying: connection errors, timeouts, 5xx/429/throttling. Missing files,
    permission errors and bad arguments are final."""
    if isinstance(exc, _FINAL):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError) and (exc.errno in _TRANSIENT_ERRNOS or _TRANSIENT_TEXT.search(str(exc))):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and _depth < 3 and is_transient(cause, _depth + 1)


def fetch_bytes(uri: str, config: DecodeConfig, *, what: str = "image") -> bytes:
    """All bytes at ``uri`` via ``fsspec.open``, retrying transient errors ``config.retries`` times with
    exponential back-off. Raises :class:`RowError` (stage ``read``)."""
    shown = redact_uri(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise RowError("read", "MissingImageUri", f"{what} URI is missing or empty")
    scheme = uri_scheme(uri)
    if scheme not in config.allowed_schemes:
        raise RowError(
            "read",
            "UnsupportedScheme",
            f"{shown}: scheme {scheme!r} is not allowed (allowed: {', '.join(config.allowed_schemes)})",
        )
    attempts = config.retries + 1
    for attempt in range(attempts):
        try:
            with fsspec.open(uri, "rb", **config.storage_options) as f:
                return f.read()
        except Exception as e:  # noqa: BLE001 — classified below
            if attempt + 1 < attempts and is_transient(e):
                delay = config.retry_backoff_s * (2**attempt) * (1 + random.random() / 2)
                log.debug("transient error reading %s (%s); retrying in %.2f s", shown, type(e).__name__, delay)
                time.sleep(delay)
                continue
            raise _read_error(e, shown, attempt + 1, config, uri) from None
    raise AssertionError("unreachable")


def _read_error(e: BaseException, shown: str, attempts: int, config: DecodeConfig, uri: str | None = None) -> RowError:
    if isinstance(e, RowError):
        return e
    if isinstance(e, FileNotFoundError):
        return RowError("read", "FileNotFoundError", f"{shown}: not found")
    if isinstance(e, PermissionError):
        return RowError("read", "PermissionError", f"{shown}: permission denied")
    if isinstance(e, IsADirectoryError):
        return RowError("read", "IsADirectoryError", f"{shown}: is a directory, not a file")
    detail = _scrub(str(e) or type(e).__name__, config.storage_options, uri)
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    return RowError("read", type(e).__name__, f"{shown}: {detail}{tries}")


_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|session|auth|sas|signature", re.I)


def _secrets(options: Any, key: str = "") -> list[str]:
    if isinstance(options, Mapping):
        return [s for k, v in options.items() for s in _secrets(v, str(k))]
    if isinstance(options, (list, tuple)):
        return [s for v in options for s in _secrets(v, key)]
    if isinstance(options, str) and len(options) >= 6 and _SECRET_KEY.search(key):
        return [options]
    return []


def redact_uri(uri: Any) -> Any:
    """``uri`` without credentials (``user:secret@`` and secret-looking query values); non-strings unchanged."""
    return _redact_uri(uri) if isinstance(uri, str) else uri


_URI_HEAD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _uri_secrets(uri: Any) -> list[str]:
    """The credentials inside ``uri``: its userinfo (and the password part), secret-looking query values. Client
    errors quote them without the scheme (e.g. botocore: ``Invalid bucket name "user:secret@bucket"``)."""
    if not isinstance(uri, str) or not (m := _URI_HEAD.match(uri)):
        return []
    rest, out = uri[m.end() :], []
    authority = rest.split("/", 1)[0] if "@" in rest.split("/", 1)[0] else rest
    if "@" in authority:
        userinfo = authority[: authority.rindex("@")]
        if ":" in userinfo or "/" not in userinfo:
            out += [userinfo, userinfo.partition(":")[2]]
    for item in rest.partition("?")[2].split("&"):
        k, eq, v = item.partition("=")
        if eq and _SECRET_KEY.search(k):
            out.append(v)
    return [s for s in out if len(s) >= 4]


def _scrub(message: str, storage_options: Mapping, *uris: Any) -> str:
    """``message`` with every secret-looking storage option value, and the credentials of ``uris``, replaced by
    ``***``."""
    secrets = _secrets(storage_options) + [s for u in uris for s in _uri_secrets(u)]
    for s in sorted(set(secrets), key=len, reverse=True):
        message = message.replace(s, "***")
    return message


def _short(s: str, n: int = _MESSAGE_CHARS) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


# ------------------------------------------------------------------------------------------------ decoding
def load_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = DEFAULT_FORMATS,
    uri: str = "image",
) -> Image.Image:
    """Image bytes → an RGB PIL image in display orientation (EXIF applied). Raises :class:`RowError` (stage
    ``decode``): ``EmptyFile``, ``UnidentifiedImageError``, ``DecompressionBomb``, ``TruncatedImage``,
    ``EmptyImage`` or the exception's class name."""
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
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Exception as e:  # noqa: BLE001
        raise RowError("decode", type(e).__name__, f"{shown}: cannot convert {img.mode} image to RGB: {e}") from None


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


# ------------------------------------------------------------------------------------------------ masks
class _MaskError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type, self.message = error_type, _short(message)


def _get(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _as_list(v: Any) -> list | None:
    return None if v is None else list(v)


def _mask_from_image_bytes(data: bytes, height: int, width: int, shown: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise _MaskError("MalformedMaskImage", f"{shown}: not a readable image ({type(e).__name__})") from None
    if img.size != (width, height):
        raise _MaskError(
            "MaskSizeMismatch",
            f"{shown}: mask is {img.size[0]}x{img.size[1]}, the image is {width}x{height} (after EXIF orientation)",
        )
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise _MaskError("MalformedMaskImage", f"{shown}: cannot decode mask image ({e})") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr != 0
    if img.mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        return arr[..., :-1].any(axis=-1) & (arr[..., -1] != 0)
    return arr.any(axis=-1)


def decode_mask(mask: Any, height: int, width: int, *, fetched: bytes | RowError | None = None) -> np.ndarray:
    """One ``MASK`` struct (dict, or Ray's numpy form) → ``bool [height, width]``.

    ``fetched`` is the bytes (or the read error) of the mask's ``uri``. Raises ``_MaskError`` with the reason:
    ``MalformedMask``, ``MalformedRLE``, ``MalformedPolygon``, ``MaskSizeMismatch``, ``MaskNotFound``,
    ``MalformedMaskImage``, or a read error's type.
    """
    rle, uri, polygon = _get(mask, "rle"), _get(mask, "uri"), _get(mask, "polygon")
    set_fields = [n for n, v in (("rle", rle), ("uri", uri), ("polygon", polygon)) if v is not None]
    if len(set_fields) != 1:
        raise _MaskError(
            "MalformedMask",
            "a mask needs exactly one of rle, uri, polygon; it has "
            + (", ".join(set_fields) if set_fields else "none"),
        )
    if rle is not None:
        try:
            size = _as_list(_get(rle, "size"))
            counts = _get(rle, "counts")
            counts = _as_list(counts) if isinstance(counts, np.ndarray) else counts
            m = rle_decode({"size": size, "counts": counts})
        except ValueError as e:
            raise _MaskError("MalformedRLE", str(e)) from None
        except Exception as e:  # noqa: BLE001
            raise _MaskError("MalformedRLE", f"malformed RLE: {type(e).__name__}: {e}") from None
        if m.shape != (height, width):
            raise _MaskError(
                "MaskSizeMismatch",
                f"RLE mask is {m.shape[1]}x{m.shape[0]}, the image is {width}x{height} (after EXIF orientation)",
            )
        return m
    if polygon is not None:
        try:
            polys = [[float(v) for v in p] for p in polygon]
            if not polys:
                raise ValueError("no polygon")
            return polygons_to_mask(polys, height, width)
        except (ValueError, TypeError) as e:
            raise _MaskError("MalformedPolygon", f"malformed polygon: {e}") from None
    shown = redact_uri(str(uri))
    if isinstance(fetched, RowError):
        if fetched.error_type == "FileNotFoundError":
            raise _MaskError("MaskNotFound", f"mask {shown} not found")
        raise _MaskError(fetched.error_type, fetched.message)
    if fetched is None:
        raise _MaskError("MaskNotFound", f"mask {shown} was not fetched")
    return _mask_from_image_bytes(fetched, height, width, shown)


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class _Fetched:
    data: bytes | None = None
    error: RowError | None = None
    masks: dict[int, bytes | RowError] = field(default_factory=dict)


class DecodeStage:
    """Ray Data callable class (``map_batches(DecodeStage, fn_constructor_kwargs={"config": cfg},
    batch_format="numpy")``); also a plain callable. See the module docstring for the columns."""

    def __init__(self, config: DecodeConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either config or DecodeConfig keyword arguments, not both")
        self.config = config if config is not None else DecodeConfig(**kwargs)
        self._square = Preprocess(size=self.config.square_size) if self.config.square_size else None
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- one batch
    def __call__(self, batch: Mapping[str, Any] | pa.Table) -> dict[str, np.ndarray]:
        columns = _columns(batch)
        if B.IMAGE_ID not in columns or B.IMAGE_URI not in columns:
            raise KeyError(f"the decode stage needs columns {B.IMAGE_ID!r} and {B.IMAGE_URI!r}; got {list(columns)}")
        n = len(columns[B.IMAGE_URI])
        uris = columns[B.IMAGE_URI]
        masks_col = columns.get("masks")
        pre_errors = columns.get(B.ERROR_STAGE)
        has_error = failed_rows(columns) if pre_errors is not None else np.zeros(n, bool)
        todo = [i for i in range(n) if not has_error[i]]

        jobs = [(uris[i], self._mask_uris(masks_col[i] if masks_col is not None else None)) for i in todo]
        if self.config.io_threads > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="clipmaps-fetch")
            fetched = list(self._pool.map(lambda job: self._fetch(*job), jobs))
        else:
            fetched = [self._fetch(*job) for job in jobs]

        names = output_columns(self.config)
        out = {name: _objects(n) for name in names}
        out[B.HEIGHT] = np.zeros(n, np.int64)
        out[B.WIDTH] = np.zeros(n, np.int64)
        prompts = columns.get(B.PROMPTS)
        for i in range(n):
            out[B.PROMPTS][i] = _norm_prompts(prompts[i]) if prompts is not None else None
            for name, value in self._failed_values().items():
                out[name][i] = value
        if pre_errors is not None:  # rows an earlier step already failed: keep their error
            for name in (B.ERROR_STAGE, B.ERROR_TYPE, B.ERROR_MESSAGE):
                if name in columns:
                    for i in range(n):
                        out[name][i] = columns[name][i] if has_error[i] else None
        for i, f in zip(todo, fetched):
            row = self._row(columns[B.IMAGE_URI][i], masks_col[i] if masks_col is not None else None, f)
            for name, value in row.items():
                out[name][i] = value

        result: dict[str, np.ndarray] = {}
        for name, values in columns.items():
            if name != "masks" and name not in out:
                result[name] = values if isinstance(values, np.ndarray) else _objects(n, values)
        result.update(out)
        return B.restore_nulls(result)

    def _failed_values(self) -> dict[str, Any]:
        """The values of a failed row's array/list columns: empty, of the same ``ndim`` as a good row's."""
        size = self._square.size if self._square is not None else 0
        values: dict[str, Any] = {}
        if self._square is not None:
            values[B.PIXELS_SQUARE] = np.zeros((3, 0, 0), np.float32)
        if self.config.maskclip is not None:
            values[B.PIXELS_MASKCLIP] = np.zeros((3, 0, 0), np.float32)
        if self.config.need_masks:
            values[B.MASK_IDS] = []
            if self._square is not None:
                values[B.MASKS_SQUARE] = np.zeros((0, size, size), np.float32)
            values[B.MASK_AREA] = np.zeros(0, np.int64)
            values[B.MASK_BBOX] = np.zeros((0, 4), np.int32)
            values[B.MASK_ERRORS] = []
        return values

    # -- fetching (threads)
    def _mask_uris(self, masks: Any) -> dict[int, str]:
        if not self.config.need_masks or masks is None:
            return {}
        return {
            k: _get(m, "uri")
            for k, m in enumerate(masks)
            if _get(m, "uri") is not None and _get(m, "rle") is None and _get(m, "polygon") is None
        }

    def _fetch(self, uri: str, mask_uris: dict[int, str]) -> _Fetched:
        res = _Fetched()
        try:
            res.data = fetch_bytes(uri, self.config)
        except RowError as e:
            res.error = e
            return res
        except Exception as e:  # noqa: BLE001 — never let one row kill the batch
            detail = _scrub(str(e), self.config.storage_options, uri)
            res.error = RowError("read", type(e).__name__, f"{redact_uri(uri)}: {detail}")
            return res
        for k, mask_uri in mask_uris.items():
            try:
                res.masks[k] = fetch_bytes(mask_uri, self.config, what="mask")
            except RowError as e:
                res.masks[k] = e
            except Exception as e:  # noqa: BLE001
                detail = _scrub(str(e), self.config.storage_options, mask_uri)
                res.masks[k] = RowError("read", type(e).__name__, f"{redact_uri(mask_uri)}: {detail}")
        return res

    # -- decoding (the calling thread)
    def _row(self, uri: str, masks: Any, fetched: _Fetched) -> dict[str, Any]:
        cfg = self.config
        try:
            if fetched.error is not None:
                raise fetched.error
            img = load_image(fetched.data, max_pixels=cfg.max_pixels, formats=cfg.formats, uri=uri)
            fetched.data = None  # free the bytes early
            width, height = img.size
            row: dict[str, Any] = {B.HEIGHT: height, B.WIDTH: width}
            try:
                if self._square is not None:
                    row[B.PIXELS_SQUARE] = self._square.image(img)
                if cfg.maskclip is not None:
                    row[B.PIXELS_MASKCLIP] = cfg.maskclip.image(img)
            except Exception as e:  # noqa: BLE001
                raise RowError(
                    "preprocess",
                    type(e).__name__,
                    f"{redact_uri(uri)}: preprocessing the {width}x{height} image failed: {e}",
                ) from None
            if cfg.need_masks:
                try:
                    row.update(self._masks(masks, height, width, fetched.masks))
                except Exception as e:  # noqa: BLE001
                    raise RowError("mask", type(e).__name__, f"{redact_uri(uri)}: decoding masks failed: {e}") from None
            return row
        except RowError as e:
            return {B.ERROR_STAGE: e.stage, B.ERROR_TYPE: e.error_type, B.ERROR_MESSAGE: e.message}

    def _masks(self, masks: Any, height: int, width: int, fetched: dict[int, bytes | RowError]) -> dict[str, Any]:
        size = self._square.size if self._square is not None else None
        ids: list[str] = []
        squares: list[np.ndarray] = []
        areas: list[int] = []
        boxes: list[tuple[int, int, int, int]] = []
        errors: list[dict] = []
        for k, m in enumerate(masks if masks is not None else []):
            rid = _get(m, "region_id")
            rid = str(k) if rid is None or rid == "" else str(rid)
            try:
                if m is None:
                    raise _MaskError("MalformedMask", "the mask is null")
                if rid in ids:
                    raise _MaskError("DuplicateRegionId", f"region_id {rid!r} is used by an earlier mask")
                mask = decode_mask(m, height, width, fetched=fetched.get(k))
                area = int(np.count_nonzero(mask))
                if area == 0:
                    raise _MaskError("EmptyMask", "the mask has no pixels inside the image")
                if self._square is not None:
                    squares.append(self._square.mask(mask, (width, height)))
            except _MaskError as e:
                errors.append({"region_id": rid, "error_type": e.error_type, "message": e.message})
                continue
            except Exception as e:  # noqa: BLE001
                errors.append({"region_id": rid, "error_type": type(e).__name__, "message": _short(str(e))})
                continue
            ids.append(rid)
            areas.append(area)
            boxes.append(mask_bbox(mask))
        out = {
            B.MASK_IDS: ids,
            B.MASK_AREA: np.asarray(areas, dtype=np.int64),
            B.MASK_BBOX: np.asarray(boxes, dtype=np.int32).reshape(-1, 4),
            B.MASK_ERRORS: errors,
        }
        if size:
            out[B.MASKS_SQUARE] = (
                np.stack(squares).astype(np.float32, copy=False) if squares else np.zeros((0, size, size), np.float32)
            )
        return out


def decode_batch(batch: Mapping[str, Any] | pa.Table, config: DecodeConfig) -> dict[str, np.ndarray]:
    """Function form of :class:`DecodeStage` (e.g. ``ds.map_batches(decode_batch, fn_kwargs={"config": cfg})``)."""
    stage = DecodeStage(config)
    try:
        return stage(batch)
    finally:
        stage.close()


# ------------------------------------------------------------------------------------------------ helpers
def output_columns(config: DecodeConfig) -> tuple[str, ...]:
    """The columns the stage adds for ``config`` (besides the input columns it passes through), in order."""
    skip = set()
    if config.square_size is None:
        skip |= {B.PIXELS_SQUARE, B.MASKS_SQUARE}
    if config.maskclip is None:
        skip.add(B.PIXELS_MASKCLIP)
    if not config.need_masks:
        skip |= {B.MASK_IDS, B.MASKS_SQUARE, B.MASK_AREA, B.MASK_BBOX, B.MASK_ERRORS}
    return tuple(c for c in OUTPUT_COLUMNS if c not in skip)


def failed_rows(batch: Mapping[str, Any]) -> np.ndarray:
    """``bool [N]``: which rows of a batch carry an error (``error_stage`` a non-empty string). Robust to Ray's
    round trip, where an all-``None`` column comes back as float NaN; use this, not ``is None``."""
    col = batch.get(B.ERROR_STAGE)
    if col is None:
        n = len(next(iter(batch.values()))) if len(batch) else 0
        return np.zeros(n, bool)
    return np.fromiter((isinstance(v, str) and v != "" for v in col), dtype=bool, count=len(col))


def _columns(batch: Mapping[str, Any] | pa.Table) -> dict[str, Any]:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return {name: _objects(batch.num_rows, batch.column(name).to_pylist()) for name in batch.schema.names}
    return dict(batch)


def _objects(n: int, values: Sequence[Any] | None = None) -> np.ndarray:
    arr = np.empty(n, dtype=object)
    if values is not None:
        for i, v in enumerate(values):
            arr[i] = v
    return arr


def _norm_prompts(v: Any) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    return [str(p) for p in v]


__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "OUTPUT_COLUMNS",
    "DecodeConfig",
    "DecodeStage",
    "RowError",
    "decode_batch",
    "decode_mask",
    "failed_rows",
    "fetch_bytes",
    "is_transient",
    "load_image",
    "output_columns",
    "to_rgb",
]
