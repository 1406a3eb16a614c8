"""Column contract of the batches that flow between pipeline stages (numpy batch format, one entry per row).

decode stage (CPU, ``clipmaps.pipeline.decode``) → method actors (``clipmaps.actors.actor``, chained, one pool per
method) → sink stage (``clipmaps.pipeline.sinks``). Stages pass every column through except heavy inputs that no
later stage needs.

A row that failed before the methods keeps ``image_id``/``image_uri`` and sets the three ``error_*`` columns; every
later stage skips it and the sink writes it to ``errors/``.
"""

from __future__ import annotations

import numpy as np

# -- from the manifest / decode stage ---------------------------------------------------------------
IMAGE_ID = "image_id"  # str
IMAGE_URI = "image_uri"  # str
SHARD = "shard"  # int64: the manifest shard (unit of resume) the row belongs to
HEIGHT = "height"  # int, original image height after EXIF orientation
WIDTH = "width"  # int
ERROR_STAGE = "error_stage"  # str | None: read | decode | mask | preprocess
ERROR_TYPE = "error_type"  # str | None
ERROR_MESSAGE = "error_message"  # str | None
PROMPTS = "prompts"  # list[str] | None: the row's own prompts (manifest); None → the job's vocabulary
PIXELS_SQUARE = "pixels_square"  # float32 [3, S, S]: GEM / LeGrad / MaskInversion input (OpenAI mean/std)
PIXELS_MASKCLIP = "pixels_maskclip"  # float32 [3, h, w]: MaskCLIP input (keep-ratio resize)
MASK_IDS = "mask_ids"  # list[str]: region ids of the valid masks, in order
MASKS_SQUARE = "masks_square"  # float32 [M, S, S] in [0, 1]: masks at the square input size
MASK_AREA = "mask_area"  # int64 [M]: pixels of each mask at the original size
MASK_BBOX = "mask_bbox"  # int32 [M, 4]: x, y, width, height at the original size
MASK_ERRORS = "mask_errors"  # list[dict(region_id, error_type, message)]: masks that could not be used

# -- added by each method actor (``{method}`` is gem | maskclip | legrad | maskinversion) ------------------


def col(method: str, name: str) -> str:
    """Column ``name`` of ``method``'s outputs, e.g. ``col("gem", "labels")`` → ``"gem__labels"``."""
    return f"{method}__{name}"


LABELS = "labels"  # bytes | None: PNG label map at the original image size
HEATMAPS = "heatmaps"  # list[bytes]: one encoded heatmap per prompt
HEATMAP_PROMPTS = "heatmap_prompts"  # list[str], aligned with HEATMAPS
HEATMAP_HW = "heatmap_hw"  # int64 [2]: (h, w) of the encoded heatmaps; (0, 0) on rows without heatmaps
EMBEDDINGS = "embeddings"  # float32 [M, D], L2-normalised (MaskInversion)
LOSS = "loss"  # float32 [M]
EXPL_MAPS = "expl_maps"  # list[bytes] | None (MaskInversion's final maps, PNG 8-bit)
ERROR_TYPE_OF = "error_type"  # {method}__error_type: str | None, set when the method failed on this row
ERROR_MESSAGE_OF = "error_message"  # {method}__error_message: str | None

#: The heatmap output kinds, written together.
HEATMAP_KINDS = (HEATMAPS, HEATMAP_PROMPTS, HEATMAP_HW)

STATS = ("rows", "errors", "labels", "heatmaps", "regions")  # the sink's per-batch count columns


def fill(kind: str, *, dim: int = 0):
    """The value of method output ``kind`` on a row the method did not produce (failed upstream or in the method).

    ``None`` in byte and list columns; an empty (or zero) array of the right ``ndim`` in array columns, because Ray
    turns a numpy column into a tensor column when every value is an array and cannot mix it with ``None``
    ("Found columns with both objects and tensors")."""
    if kind == HEATMAP_HW:
        return np.zeros(2, np.int64)
    if kind == EMBEDDINGS:
        return np.zeros((0, dim), np.float32)
    if kind == LOSS:
        return np.zeros((0,), np.float32)
    if kind in (LABELS, HEATMAPS, HEATMAP_PROMPTS, EXPL_MAPS, ERROR_TYPE_OF, ERROR_MESSAGE_OF):
        return None
    raise KeyError(f"undeclared method output kind {kind!r}")


def present(value) -> bool:
    """Whether a cell holds a value. Ray's Arrow round trip turns an all-``None`` column into float NaN and lists
    into numpy arrays, so ``is None`` is not enough."""
    if value is None:
        return False
    if isinstance(value, (float, np.floating)) and value != value:  # NaN
        return False
    return not (isinstance(value, str) and value == "")


def failed_rows(batch) -> list[bool]:
    """Per row: did it fail before the methods (``error_stage`` set)?"""
    stages = batch.get(ERROR_STAGE)
    n = len(batch[IMAGE_ID])
    if stages is None:
        return [False] * n
    return [isinstance(v, str) and v != "" for v in stages]


def restore_nulls(batch: dict) -> dict:
    """Turn columns that Ray handed over as all-NaN floats back into ``None`` objects, in place; returns ``batch``.

    Ray Data reads a column that is ``None`` on every row of a block as Arrow ``null`` and gives it to the next numpy
    stage as float NaN. A stage that passes it through unchanged would emit a ``double`` column, which Ray cannot
    unify with the ``string``/``binary``/list column of a block where some row has a value ("Field … has
    incompatible types: float vs string"), and the job stops. No column of this contract is a 1-D float column, so
    such a column is always a lost ``None`` column. ``None`` objects go back to Arrow as ``null``, which unifies with
    every type.
    """
    for name, values in batch.items():
        lost = isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind == "f" and len(values) > 0
        if lost and np.isnan(values).all():
            batch[name] = np.full(len(values), None, dtype=object)
    return batch
