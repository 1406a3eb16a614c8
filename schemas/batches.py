"""The columns in flight between pipeline stages, declared once, and the one step that conforms a batch to them.

decode stage (CPU, ``clipmaps.pipeline.decode``) → method actors (``clipmaps.actors.actor``, chained, one pool per
method) → sink stage (``clipmaps.pipeline.sinks``). Batches are Ray Data's numpy format (one entry per row). Stages
pass every column through except heavy inputs no later stage needs. A row that failed before the methods keeps
``image_id``/``image_uri`` and sets the three ``error_*`` columns; every later stage skips it and the sink writes it
to ``errors/``; a method that fails on a row sets ``{method}__error_type`` and ``{method}__error_message``.

Every column is declared in :data:`COLUMNS` (method outputs by kind, named ``{method}__{kind}``) with its Arrow type
and its **fill**, the value of a row that has none. Ray Data converts each numpy block to Arrow on its own, so two
rules keep blocks of one column unifiable, and :func:`conform` applies both at the end of every stage:

* a tensor column holds an array of the declared rank on *every* row (the fill is an empty array): Ray stores a
  column whose values are all arrays as a tensor column, one with a ``None`` as pickled objects, and cannot
  concatenate the two ("Found columns with both objects and tensors");
* a column that is ``None`` on every row of a block comes back from Ray as float NaN; passed through as is it would
  be a ``double`` column that no ``string``/``binary``/list block unifies with. No declared column is a 1-D float
  column, so such a column is turned back into ``None`` objects (Arrow ``null`` unifies with every type).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# -- from the manifest / decode stage ---------------------------------------------------------------
IMAGE_ID = "image_id"
IMAGE_URI = "image_uri"
SHARD = "shard"
HEIGHT = "height"
WIDTH = "width"
ERROR_STAGE = "error_stage"
ERROR_TYPE = "error_type"
ERROR_MESSAGE = "error_message"
PROMPTS = "prompts"
PIXELS_SQUARE = "pixels_square"
PIXELS_MASKCLIP = "pixels_maskclip"
MASK_IDS = "mask_ids"
MASKS_SQUARE = "masks_square"
MASK_AREA = "mask_area"
MASK_BBOX = "mask_bbox"
MASK_ERRORS = "mask_errors"
MASK_RLE = "mask_rle"
#: The manifest's masks by reference (a URI; ``clipmaps.pipeline.decode.mask_refs``); consumed by the decode stage.
MASKS_URI = "masks_uri"

# -- method output kinds: the column is ``col(method, kind)`` ----------------------------------------------
LABELS = "labels"
CONFIDENCE = "confidence"
HEATMAPS = "heatmaps"
HEATMAP_PROMPTS = "heatmap_prompts"
HEATMAP_HW = "heatmap_hw"
EMBEDDINGS = "embeddings"
LOSS = "loss"
EXPL_MAPS = "expl_maps"
ERROR_TYPE_OF = "error_type"
ERROR_MESSAGE_OF = "error_message"
PROMPT_ERRORS = "prompt_errors"
PROMPTS_COLLAPSED = "prompts_collapsed"
#: The heatmap output kinds, written together.
HEATMAP_KINDS = (HEATMAPS, HEATMAP_PROMPTS, HEATMAP_HW)
#: What a heatmap method writes beside its maps about the row's prompts (the predictor adds them to its columns).
PROMPT_KINDS = (PROMPT_ERRORS, PROMPTS_COLLAPSED)

#: The sink's per-batch count columns; ``prompts_collapsed`` counts manifest prompts dropped as duplicates of an
#: earlier one of their row (per image, the most any heatmap output dropped), for the run's summary.
STATS = ("rows", "errors", "labels", "heatmaps", "regions", "prompts_collapsed")


def col(method: str, kind: str) -> str:
    """Column ``kind`` of ``method``'s outputs, e.g. ``col("gem", "labels")`` → ``"gem__labels"``."""
    return f"{method}__{kind}"


@dataclass(frozen=True)
class Column:
    """One in-flight column.

    Attributes:
        arrow: its Arrow type; for tensor columns the element type (Ray stores them as its tensor extension type).
        ndim: the rank of each row's array for tensor columns; None for the others.
        fill_shape: a tensor column's value on a row without one (an empty array of rank ``ndim``).
        doc: what a row holds.
    """

    arrow: pa.DataType
    doc: str
    ndim: int | None = None
    fill_shape: tuple[int, ...] = ()

    def fill(self):
        """The value of a row without one: an empty (or zero) array for tensor columns, else ``None``."""
        return np.zeros(self.fill_shape, self.arrow.to_pandas_dtype()) if self.ndim is not None else None


_ERROR_STRUCT = pa.struct([("region_id", pa.string()), ("error_type", pa.string()), ("message", pa.string())])
#: COCO RLE as written to ``regions/``: ``size`` = [height, width], ``counts`` = COCO's compressed string.
_RLE_STRUCT = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
_PROMPT_ERROR_STRUCT = pa.struct([("prompt", pa.string()), ("error_type", pa.string()), ("message", pa.string())])

#: Every column between stages: decode columns by name, method outputs by kind.
COLUMNS: dict[str, Column] = {
    IMAGE_ID: Column(pa.string(), "the manifest's image id"),
    IMAGE_URI: Column(pa.string(), "the image's URI (credentials redacted wherever it is written)"),
    SHARD: Column(pa.int64(), "the manifest shard (unit of resume) the row belongs to"),
    HEIGHT: Column(pa.int64(), "image height after EXIF orientation; 0 on a failed row"),
    WIDTH: Column(pa.int64(), "image width after EXIF orientation; 0 on a failed row"),
    ERROR_STAGE: Column(
        pa.string(), "manifest | read | decode | mask | preprocess when the row failed before the methods"
    ),
    ERROR_TYPE: Column(pa.string(), "the row's error type"),
    ERROR_MESSAGE: Column(pa.string(), "the row's error message (secrets redacted)"),
    PROMPTS: Column(pa.list_(pa.string()), "the row's own prompts; None = the job's vocabulary"),
    PIXELS_SQUARE: Column(pa.float32(), "[3, S, S] GEM/LeGrad/MaskInversion input", 3, (3, 0, 0)),
    PIXELS_MASKCLIP: Column(pa.float32(), "[3, h, w] MaskCLIP input (keep-ratio resize)", 3, (3, 0, 0)),
    MASK_IDS: Column(pa.list_(pa.string()), "region ids of the usable masks, in manifest order"),
    MASKS_SQUARE: Column(pa.float32(), "[M, S, S] masks in [0, 1] at the square input size", 3, (0, 0, 0)),
    MASK_AREA: Column(pa.int64(), "[M] mask pixels at the image's size", 1, (0,)),
    MASK_BBOX: Column(pa.int32(), "[M, 4] x, y, width, height at the image's size", 2, (0, 4)),
    MASK_ERRORS: Column(pa.list_(_ERROR_STRUCT), "masks that could not be used"),
    MASK_RLE: Column(
        pa.list_(_RLE_STRUCT),
        "[M] dict(size=[h, w], counts=str): each usable mask's COCO compressed RLE at the image's size after EXIF "
        "orientation (the frame of mask_area/mask_bbox), aligned with mask_ids",
    ),
    MASKS_URI: Column(pa.string(), "the manifest's masks by reference (read and dropped by the decode stage)"),
    LABELS: Column(pa.binary(), "PNG label map at the image's size"),
    CONFIDENCE: Column(pa.binary(), "8-bit PNG of the winning class's probability, round(255·p), label map size"),
    HEATMAPS: Column(pa.list_(pa.binary()), "one encoded heatmap per prompt"),
    HEATMAP_PROMPTS: Column(pa.list_(pa.string()), "the prompts, aligned with the heatmaps"),
    HEATMAP_HW: Column(pa.int64(), "[2] (h, w) of the encoded heatmaps; (0, 0) on rows without", 1, (2,)),
    EMBEDDINGS: Column(pa.float32(), "[M, D] region embeddings, L2-normalised", 2, (0, 0)),
    LOSS: Column(pa.float32(), "[M] MaskInversion's final loss per region", 1, (0,)),
    EXPL_MAPS: Column(pa.list_(pa.binary()), "MaskInversion's final explainability maps (PNG 8-bit)"),
    PROMPT_ERRORS: Column(pa.list_(_PROMPT_ERROR_STRUCT), "the row's prompts the method could not use (too long)"),
    PROMPTS_COLLAPSED: Column(pa.int64(), "the row's prompts dropped as token-identical to an earlier one"),
    ERROR_TYPE_OF: Column(pa.string(), "the method's error type on this row"),
    ERROR_MESSAGE_OF: Column(pa.string(), "the method's error message on this row"),
}


def declared(name: str) -> Column:
    """The declaration of column ``name`` (a decode column, or ``{method}__{kind}``); ``KeyError`` if none."""
    if name in COLUMNS:
        return COLUMNS[name]
    kind = name.partition("__")[2]
    if kind not in COLUMNS:
        raise KeyError(f"undeclared in-flight column {name!r} (declare it in clipmaps.schemas.batches.COLUMNS)")
    return COLUMNS[kind]


def objects(values: Iterable) -> np.ndarray:
    """A 1-D ``object`` array of ``values`` (arrays stay whole elements, never broadcast)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def conform(batch: dict, columns: Iterable[str] = ()) -> dict:
    """The one step at the end of every stage, in place; returns ``batch``.

    Every column in ``columns`` exists (filled where absent), tensor columns hold an array on every row (missing
    values become the declared fill), and columns Ray handed over as all-NaN floats are ``None`` again (see the
    module docstring).

    Raises:
        KeyError: a column in ``columns`` is not declared.
    """
    n = len(batch[IMAGE_ID])
    for name in columns:
        if name not in batch:
            batch[name] = objects([declared(name).fill() for _ in range(n)])
    for name, values in batch.items():
        lost = isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind == "f" and len(values) > 0
        if lost and np.isnan(values).all():
            values = batch[name] = objects([None] * len(values))
        column = COLUMNS.get(name) or COLUMNS.get(name.partition("__")[2])
        tensor = column is not None and column.ndim is not None and values.dtype == object
        if tensor and any(not isinstance(v, np.ndarray) for v in values):
            batch[name] = objects(v if isinstance(v, np.ndarray) else column.fill() for v in values)
    return batch


def present(value) -> bool:
    """Whether a cell holds a value. Ray's Arrow round trip turns an all-``None`` column into float NaN and lists
    into numpy arrays, so ``is None`` is not enough."""
    if value is None:
        return False
    if isinstance(value, (float, np.floating)) and value != value:  # NaN
        return False
    return not (isinstance(value, str) and value == "")


def failed_rows(batch) -> np.ndarray:
    """``bool [N]``: which rows failed before the methods (``error_stage`` a non-empty string). Robust to Ray's round
    trip, where an all-``None`` column comes back as NaN; use this, not ``is None``."""
    stages = batch.get(ERROR_STAGE)
    if stages is None:
        return np.zeros(len(next(iter(batch.values()))) if batch else 0, bool)
    return np.fromiter((isinstance(v, str) and v != "" for v in stages), dtype=bool, count=len(stages))
