"""Arrow schemas of every dataset clipmaps reads or writes: the single source of truth.

Output datasets (under the job's output URI): ``labels/``, ``heatmaps/``, ``regions/``, ``errors/``,
``vocabulary/`` (every one always exists, with its schema, also without rows). Every result row names the model,
the weights (pretrained tag or URI) and a hash of the method's parameters, so datasets from different runs can be
joined or told apart.
"""

from __future__ import annotations

import pyarrow as pa

#: Columns every result row carries (labels, heatmaps, regions).
PROVENANCE = [
    pa.field("method", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("weights", pa.string(), nullable=False),
    pa.field("params_hash", pa.string(), nullable=False),
]

RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])

#: One region mask in a manifest: COCO RLE (compressed counts string), or a URI of a PNG mask, or a polygon.
MASK = pa.struct(
    [
        pa.field("region_id", pa.string()),
        pa.field("rle", RLE),
        pa.field("uri", pa.string()),
        pa.field("polygon", pa.list_(pa.list_(pa.float64()))),
    ]
)

#: The input manifest: one row per image. ``masks`` (or ``masks_uri``), ``prompts``, ``width`` and ``height`` are
#: optional columns;
#: ``width``/``height`` are the frame the row's annotations are drawn in (COCO's and SA-1B's declared image size, which
#: may be the stored, un-rotated frame of an EXIF-rotated photo); null = unknown. The decode stage reads them and
#: replaces them by the decoded size (``schemas.batches.HEIGHT``/``WIDTH``).
MANIFEST = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("masks", pa.list_(MASK)),
        pa.field("prompts", pa.list_(pa.string())),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # masks by reference instead of inline ``masks``: an SA-1B per-image JSON, a folder of per-instance PNGs, or
        # a side Parquet keyed by image_id (read by the decode stage, ``clipmaps.pipeline.decode``)
        pa.field("masks_uri", pa.string()),
    ]
)
MANIFEST_REQUIRED = ("image_id", "image_uri")

#: The image's URI as the manifest gives it, redacted (``clipmaps.schemas.storage.redact_uri``): every result row
#: carries it, so that a consumer needs no manifest to find the image a row is about.
IMAGE_URI = pa.field("image_uri", pa.string())

LABELS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        IMAGE_URI,
        *PROVENANCE,
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("label_map", pa.binary(), nullable=False),  # PNG, uint8 (≤ 255 labels) or uint16; 0 = background
        pa.field("confidence", pa.binary()),  # output.label_confidence: 8-bit PNG, round(255·p) of the winning class
        pa.field("vocabulary_id", pa.string(), nullable=False),
    ]
)

HEATMAPS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        IMAGE_URI,
        pa.field("prompt", pa.string(), nullable=False),
        *PROVENANCE,
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("encoding", pa.string(), nullable=False),  # "png8" (round(255·v)) or "float16" (raw little-endian)
        pa.field("heatmap", pa.binary(), nullable=False),
    ]
)


def regions_schema(dim: int) -> pa.Schema:
    """The ``regions/`` schema for embeddings of dimension ``dim`` (``fixed_size_list<float32, dim>``)."""
    if dim < 1:
        raise ValueError(f"embedding dimension must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            IMAGE_URI,
            pa.field("region_id", pa.string(), nullable=False),
            *PROVENANCE,
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),  # L2-normalised
            # the region's mask as COCO compressed RLE at the image's decoded size (EXIF orientation applied: the
            # frame of the label maps); null when the decode stage did not provide it
            pa.field("mask", RLE),
            pa.field("area", pa.int64(), nullable=False),  # mask pixels at the image's size
            pa.field("bbox", pa.list_(pa.int32(), 4), nullable=False),  # COCO [x, y, width, height], image pixels
            pa.field("loss", pa.float32(), nullable=False),  # MaskInversion's soft-Dice loss at the end
            pa.field("expl_map", pa.binary()),  # optional final explainability map, PNG 8-bit
        ]
    )


ERRORS = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("method", pa.string()),  # null when the input failed before any method
        pa.field("region_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),  # read | decode | mask | preprocess | model | write
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)

VOCABULARY = pa.schema(
    [
        pa.field("vocabulary_id", pa.string(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),  # label value in label maps (0 = background)
        pa.field("name", pa.string(), nullable=False),
        pa.field("is_background", pa.bool_(), nullable=False),
        pa.field("templates", pa.list_(pa.string()), nullable=False),
        # on the background row (class_index 0) only: every background prompt whose winning pixels get label 0, in
        # the spec's order (``name`` is the first); null on class rows
        pa.field("background_names", pa.list_(pa.string())),
    ]
)

DATASETS = {"labels": LABELS, "heatmaps": HEATMAPS, "errors": ERRORS, "vocabulary": VOCABULARY}
