"""The decode stage itself: :class:`DecodeConfig`, :class:`DecodeStage` (a Ray Data callable class) and
:func:`decode_batch`, and the handling of batch columns (see the package docstring for the columns it writes).

Per batch, the image and mask bytes of the rows not failed upstream are fetched on a thread pool (object-store
latency dominates), then decoded and preprocessed on the calling thread; every failure becomes the row's (or the
mask's) error, never an exception out of the batch.

The manifest's optional ``width``/``height`` (the frame the row's annotations declare) arrive under the names of the
decoded size: the stage reads them as the row's declared frame (null, NaN or absent = unknown; see :mod:`.masks`) and
writes the decoded, oriented size in their place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipmaps.schemas import batches as B
from clipmaps.schemas.encodings import mask_bbox, rle_encode
from clipmaps.schemas.errors import RowError, short
from clipmaps.schemas.storage import DEFAULT_ALLOWED_SCHEMES, redact_uri, uri_scheme

from .fetch import fetch_bytes, read_error
from .image import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, load_oriented
from .mask_refs import MaskReferences, Resolved, no_rows_error, reference_form
from .masks import ANNOTATION_FRAMES, AnnotationFrame, decode_mask, get_field
from .preprocess import Preprocess

#: Optional input column: the row's encoded image (bytes, or a Hugging Face ``{bytes, path}`` struct). A row whose
#: ``image`` is set is decoded from it and its ``image_uri`` (if any) only names it in messages; the column is dropped
#: from the output like the mask inputs.
IMAGE = "image"

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
    B.MASK_RLE,
    B.MASK_ERRORS,
)


@dataclass(frozen=True)
class DecodeConfig:
    """What the decode stage produces and how it reads.

    Attributes:
        square_size: side of ``pixels_square``/``masks_square`` (GEM, LeGrad, MaskInversion input, bicubic, as the
            registry's square methods); ``None`` when no method needs a square input.
        square_normalize: the square input's mean/std (a ``preprocess.NORMALIZATIONS`` name: ``clip``, OpenAI
            CLIP's; ``inception`` for SigLIP models, from the registry's ``FAMILY_NORMALIZATION``).
        maskclip: MaskCLIP's preprocessing (``JobSpec.preprocess("maskclip")``) or ``None``.
        need_masks: decode the rows' region masks (MaskInversion).
        max_pixels: largest ``width × height`` accepted (checked from the header, before decoding).
        storage_options: fsspec options for ``fsspec.open`` (credentials, endpoint…); never in messages.
        options_schemes: the URI schemes ``storage_options`` apply to (None: every scheme); a URI of another
            scheme is opened without them (:meth:`options_for`): an S3 ``endpoint_url`` breaks an https read.
        allowed_schemes: URI schemes that may be read (bare paths are ``file``).
        retries: extra attempts after a transient read error (connection, timeout, 5xx/throttling); missing
            files and permission errors are final.
        retry_backoff_s: first back-off; doubles per attempt, with jitter.
        io_threads: concurrent fetches per batch (object-store latency dominates); 1 = sequential.
        formats: Pillow formats accepted (``None`` = any Pillow can open).
        annotation_frame: ``auto`` | ``oriented`` | ``stored``: the frame region masks are in, against the image's
            EXIF orientation (``input.annotation_frame``; the rule is in :mod:`.masks`).
    """

    square_size: int | None = 448
    square_normalize: str = "clip"
    maskclip: Preprocess | None = None
    need_masks: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    storage_options: dict = field(default_factory=dict)
    options_schemes: tuple[str, ...] | None = None
    allowed_schemes: tuple[str, ...] = DEFAULT_ALLOWED_SCHEMES
    retries: int = 2
    retry_backoff_s: float = 0.2
    io_threads: int = 8
    formats: tuple[str, ...] | None = DEFAULT_FORMATS
    annotation_frame: AnnotationFrame = "auto"

    def options_for(self, uri: str) -> dict:
        """``storage_options`` for ``uri``: all of them for a scheme of :attr:`options_schemes`, none otherwise."""
        if self.options_schemes is None or uri_scheme(uri) in self.options_schemes:
            return self.storage_options
        return {}

    def __post_init__(self):
        if self.square_size is not None and self.square_size < 1:
            raise ValueError(f"square_size must be ≥ 1 or None, got {self.square_size}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be ≥ 1, got {self.max_pixels}")
        if self.retries < 0 or self.retry_backoff_s < 0 or self.io_threads < 1:
            raise ValueError("retries and retry_backoff_s must be ≥ 0 and io_threads ≥ 1")
        if self.annotation_frame not in ANNOTATION_FRAMES:
            raise ValueError(f"annotation_frame must be one of {ANNOTATION_FRAMES}, got {self.annotation_frame!r}")
        object.__setattr__(self, "allowed_schemes", tuple(s.lower() for s in self.allowed_schemes))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        if self.formats is not None:
            object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class _Fetched:
    data: bytes | None = None
    error: RowError | None = None
    masks: dict[int, bytes | RowError] = field(default_factory=dict)
    ref: Resolved | RowError | None = None  # what the row's masks_uri resolved to


class DecodeStage:
    """Ray Data callable class (``map_batches(DecodeStage, fn_constructor_kwargs={"config": cfg},
    batch_format="numpy")``); also a plain callable. The package docstring lists the columns it writes."""

    def __init__(self, config: DecodeConfig | None = None, **kwargs: Any):
        if config is not None and kwargs:
            raise TypeError("pass either config or DecodeConfig keyword arguments, not both")
        self.config = config if config is not None else DecodeConfig(**kwargs)
        self._square = (
            Preprocess.from_params({"size": self.config.square_size, "normalize": self.config.square_normalize})
            if self.config.square_size
            else None
        )
        self._pool: ThreadPoolExecutor | None = None
        self._refs = MaskReferences(self.config)

    def close(self) -> None:
        """Stop the fetch threads (a plain-callable user's clean-up; Ray ends them with the worker)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # -- one batch
    def __call__(self, batch: Mapping[str, Any] | pa.Table) -> dict[str, np.ndarray]:
        """One batch of manifest rows → the same rows with the decode columns; every row's failure is in its
        ``error_*`` columns (rows failed upstream keep their error).

        Raises:
            KeyError: the batch lacks ``image_id`` or ``image_uri`` (a wiring error, not a row's).
        """
        columns = _columns(batch)
        if B.IMAGE_ID not in columns or (B.IMAGE_URI not in columns and IMAGE not in columns):
            raise KeyError(
                f"the decode stage needs columns {B.IMAGE_ID!r} and {B.IMAGE_URI!r} or {IMAGE!r}; got {list(columns)}"
            )
        ids = columns[B.IMAGE_ID]
        n = len(ids)
        images = columns.get(IMAGE)
        uris = [_shown_uri(columns, images, i) for i in range(n)]
        masks_col = columns.get("masks")
        # the manifest's optional width/height (the annotation's frame) share their names with the decoded size
        # written below: read them before they are replaced
        declared_h, declared_w = columns.get(B.HEIGHT), columns.get(B.WIDTH)
        pre_errors = columns.get(B.ERROR_STAGE)
        has_error = B.failed_rows(columns)
        todo = [i for i in range(n) if not has_error[i]]

        refs = self._references(columns, todo)
        # side-Parquet references: one scan per table for the batch's rows (each image's own lookup would re-scan)
        groups: dict[str, list[int]] = {}
        for i, ref in refs.items():
            if reference_form(ref) == "parquet":
                groups.setdefault(ref, []).append(i)
        row_jobs = [
            (
                self._fetch,
                uris[i],
                self._mask_uris(masks_col[i] if masks_col is not None else None),
                None if refs.get(i) in groups else refs.get(i),
                str(ids[i]),
                _inline_bytes(images[i]) if images is not None else None,
            )
            for i in todo
        ]
        group_jobs = [(self._lookup, ref, [str(ids[i]) for i in rows]) for ref, rows in groups.items()]
        results = self._run_jobs(row_jobs + group_jobs)
        fetched = dict(zip(todo, results[: len(row_jobs)]))
        for (ref, rows), found in zip(groups.items(), results[len(row_jobs) :]):
            for i in rows:
                if fetched[i].error is None:  # an image that could not be read fails as such, not for its masks
                    fetched[i].ref = found if isinstance(found, RowError) else found.get(str(ids[i]), None)
                    fetched[i].ref = fetched[i].ref or no_rows_error(ref, [str(ids[i])])

        names = output_columns(self.config)
        out = {name: _objects(n) for name in names}
        out[B.HEIGHT] = np.zeros(n, np.int64)
        out[B.WIDTH] = np.zeros(n, np.int64)
        prompts = columns.get(B.PROMPTS)
        for i in range(n):
            out[B.PROMPTS][i] = _norm_prompts(prompts[i]) if prompts is not None else None
        if pre_errors is not None:  # rows an earlier step already failed: keep their error
            for name in (B.ERROR_STAGE, B.ERROR_TYPE, B.ERROR_MESSAGE):
                if name in columns:
                    for i in range(n):
                        out[name][i] = columns[name][i] if has_error[i] else None
        for i, f in fetched.items():
            declared = _declared(declared_h, declared_w, i)
            row = self._row(uris[i], masks_col[i] if masks_col is not None else None, f, declared)
            for name, value in row.items():
                out[name][i] = value

        result: dict[str, np.ndarray] = {}
        for name, values in columns.items():
            if name not in ("masks", B.MASKS_URI, IMAGE) and name not in out:
                result[name] = values if isinstance(values, np.ndarray) else _objects(n, values)
        result.update(out)
        return B.conform(result, names)  # a failed row's arrays: the declared empty fill

    def _references(self, columns: dict[str, Any], todo: list[int]) -> dict[int, str]:
        """Row → its ``masks_uri`` (rows to decode, masks needed, a non-empty value)."""
        col = columns.get(B.MASKS_URI)
        if not self.config.need_masks or col is None:
            return {}
        return {i: str(col[i]) for i in todo if B.present(col[i])}

    def _run_jobs(self, jobs: list[tuple]) -> list[Any]:
        """``fn(*args)`` for each ``(fn, *args)``, on the fetch threads when there is more than one, in order."""
        if self.config.io_threads > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="clipmaps-fetch")
            futures = [self._pool.submit(job[0], *job[1:]) for job in jobs]
            return [f.result() for f in futures]
        return [job[0](*job[1:]) for job in jobs]

    def _lookup(self, ref: str, image_ids: list[str]) -> dict[str, Resolved] | RowError:
        try:
            return self._refs.lookup(ref, image_ids)
        except RowError as e:
            return e
        except Exception as e:  # noqa: BLE001 — a table that breaks the reader fails its rows, not the batch
            return RowError("mask", type(e).__name__, f"masks_uri {redact_uri(ref)}: {short(e)}")

    def _mask_uris(self, masks: Any) -> dict[int, str]:
        if not self.config.need_masks or not B.present(masks):  # absent, null, or NaN from Ray's round trip
            return {}
        return {
            k: get_field(m, "uri")
            for k, m in enumerate(masks)
            if get_field(m, "uri") is not None and get_field(m, "rle") is None and get_field(m, "polygon") is None
        }

    def _fetch(
        self,
        uri: str,
        mask_uris: dict[int, str],
        ref: str | None = None,
        image_id: str = "",
        data: bytes | None = None,
    ) -> _Fetched:
        res = _Fetched()
        try:
            # a row that carries its encoded image (an ``image`` column) is not fetched: its masks may still be
            res.data = data if data is not None else fetch_bytes(uri, self.config)
        except RowError as e:
            res.error = e
            return res
        except Exception as e:  # noqa: BLE001 — never let one row kill the batch
            res.error = read_error(e, uri, self.config.storage_options)
            return res
        if ref is not None:  # after the image: an unreadable image fails as such, without reading its masks
            try:
                res.ref = self._refs.resolve(ref, image_id)
            except RowError as e:
                res.ref = e
            except Exception as e:  # noqa: BLE001
                res.ref = RowError("mask", type(e).__name__, f"masks_uri {redact_uri(ref)}: {short(e)}")
        for k, mask_uri in mask_uris.items():
            try:
                res.masks[k] = fetch_bytes(mask_uri, self.config, what="mask")
            except RowError as e:
                res.masks[k] = e
            except Exception as e:  # noqa: BLE001
                res.masks[k] = read_error(e, mask_uri, self.config.storage_options)
        return res

    # -- decoding (the calling thread)
    def _row(self, uri: str, masks: Any, fetched: _Fetched, declared: tuple[int, int] | None) -> dict[str, Any]:
        cfg = self.config
        if not B.present(masks):  # Ray hands a column null on every row of a block over as NaN
            masks = None
        try:
            if fetched.error is not None:
                raise fetched.error
            if isinstance(fetched.ref, RowError):
                raise fetched.ref
            if fetched.ref is not None:
                if masks is not None and len(masks):
                    raise RowError(
                        "mask",
                        "AmbiguousMasks",
                        f"{redact_uri(uri)}: the row has both masks and masks_uri; give one of them",
                    )
                masks, mask_bytes = fetched.ref.masks, fetched.ref.fetched
                declared = declared or fetched.ref.declared
            else:
                mask_bytes = fetched.masks
            img, orientation, _ = load_oriented(fetched.data, max_pixels=cfg.max_pixels, formats=cfg.formats, uri=uri)
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
                    row.update(self._masks(masks, height, width, mask_bytes, orientation, declared))
                except Exception as e:  # noqa: BLE001
                    raise RowError("mask", type(e).__name__, f"{redact_uri(uri)}: decoding masks failed: {e}") from None
            return row
        except RowError as e:
            return {B.ERROR_STAGE: e.stage, B.ERROR_TYPE: e.error_type, B.ERROR_MESSAGE: e.message}

    def _masks(
        self,
        masks: Any,
        height: int,
        width: int,
        fetched: dict[int, bytes | RowError],
        orientation: int = 1,
        declared: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        size = self._square.size if self._square is not None else None
        ids: list[str] = []
        squares: list[np.ndarray] = []
        areas: list[int] = []
        boxes: list[tuple[int, int, int, int]] = []
        rles: list[dict] = []
        errors: list[dict] = []
        masks = list(masks) if masks is not None else []
        named = {str(get_field(m, "region_id")) for m in masks if get_field(m, "region_id") not in (None, "")}
        claimed: set[str] = set()  # ids of earlier masks, decoded or not: a later one never takes a failed one's id
        for k, m in enumerate(masks):
            rid = get_field(m, "region_id")
            if rid is None or rid == "":
                # an unnamed mask is named by its position, unless another mask of the image is named so explicitly
                rid = str(k) if str(k) not in named else f"#{k}"
            rid = str(rid)
            try:
                if m is None:
                    raise RowError("mask", "MalformedMask", "the mask is null", region_id=rid)
                if rid in claimed:
                    raise RowError(
                        "mask", "DuplicateRegionId", f"region_id {rid!r} is used by an earlier mask", region_id=rid
                    )
                claimed.add(rid)
                mask = decode_mask(
                    m,
                    height,
                    width,
                    fetched=fetched.get(k),
                    region_id=rid,
                    orientation=orientation,
                    declared=declared,
                    annotation_frame=self.config.annotation_frame,
                )
                area = int(np.count_nonzero(mask))
                if area == 0:
                    raise RowError("mask", "EmptyMask", "the mask has no pixels inside the image", region_id=rid)
                if self._square is not None:
                    squares.append(self._square.mask(mask, (width, height)))
            except RowError as e:
                errors.append({"region_id": e.region_id, "error_type": e.error_type, "message": e.message})
                continue
            except Exception as e:  # noqa: BLE001 — one bad mask must not fail the image
                errors.append({"region_id": rid, "error_type": type(e).__name__, "message": short(e)})
                continue
            ids.append(rid)
            areas.append(area)
            boxes.append(mask_bbox(mask))
            rles.append(rle_encode(mask))  # the full-size mask in the frame of area and bbox, for regions/
        out = {
            B.MASK_IDS: ids,
            B.MASK_AREA: np.asarray(areas, dtype=np.int64),
            B.MASK_BBOX: np.asarray(boxes, dtype=np.int32).reshape(-1, 4),
            B.MASK_RLE: rles,
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
        skip |= {B.MASK_IDS, B.MASKS_SQUARE, B.MASK_AREA, B.MASK_BBOX, B.MASK_RLE, B.MASK_ERRORS}
    return tuple(c for c in OUTPUT_COLUMNS if c not in skip)


def _inline_bytes(value: Any) -> bytes | None:
    """A row's ``image`` cell as bytes: ``bytes``, a Hugging Face image struct's ``bytes`` (``{bytes, path}``), or
    None when absent (null, NaN from Ray's round trip, an empty value)."""
    if isinstance(value, Mapping):
        value = value.get("bytes")
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        value = value.tobytes()
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    return None


def _shown_uri(columns: dict[str, Any], images: Any, i: int) -> str:
    """What messages name a row's image by: its ``image_uri`` when it has one, else ``image bytes of <image_id>``
    for a row whose image is inline."""
    uris = columns.get(B.IMAGE_URI)
    if uris is not None and B.present(uris[i]):
        return str(uris[i])
    if images is not None and _inline_bytes(images[i]) is not None:
        return f"image bytes of {columns[B.IMAGE_ID][i]}"
    return ""


def _declared(heights: Any, widths: Any, i: int) -> tuple[int, int] | None:
    """Row ``i``'s declared ``(height, width)``, or ``None`` when either is missing: absent column, null, or NaN (Ray
    hands a nullable integer column with nulls to numpy batches as float64 with NaN)."""
    if heights is None or widths is None:
        return None
    h, w = heights[i], widths[i]
    if any(v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) for v in (h, w)):
        return None
    return int(h), int(w)


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
