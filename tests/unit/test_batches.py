"""The in-flight column contract: every column declared once, and the conform step every stage ends with."""

from __future__ import annotations

import numpy as np
import pytest

from clipmaps.actors.registry import REGISTRY
from clipmaps.schemas import batches as B


def test_every_column_a_stage_writes_is_declared():
    from clipmaps.pipeline.decode import OUTPUT_COLUMNS

    for name in OUTPUT_COLUMNS:
        assert B.declared(name)
    for entry in REGISTRY.values():
        for column in entry.inputs:
            assert B.declared(column).ndim is not None  # method inputs are tensors
    assert B.declared(B.col("gem_original", B.HEATMAP_HW)) is B.COLUMNS[B.HEATMAP_HW]
    with pytest.raises(KeyError, match="undeclared in-flight column 'gem__nonsense'"):
        B.declared("gem__nonsense")


def test_conform_fills_missing_columns_and_restores_lost_nulls():
    pixels = np.zeros((3, 4, 4), np.float32)
    batch = {
        B.IMAGE_ID: np.array(["a", "b"]),
        B.ERROR_STAGE: np.full(2, np.nan, np.float32),  # Ray's all-None column after its Arrow round trip
        B.PIXELS_SQUARE: B.objects([pixels, None]),  # a failed row without pixels
        B.col("gem", B.LABELS): B.objects([b"png", None]),
    }
    out = B.conform(batch, [B.col("gem", B.HEATMAP_HW), B.col("maskinversion", B.EMBEDDINGS), B.MASK_IDS])
    assert list(out[B.ERROR_STAGE]) == [None, None] and not B.failed_rows(out).any()
    assert out[B.PIXELS_SQUARE][0] is pixels and out[B.PIXELS_SQUARE][1].shape == (3, 0, 0)
    assert [v.tolist() for v in out[B.col("gem", B.HEATMAP_HW)]] == [[0, 0], [0, 0]]
    assert [v.shape for v in out[B.col("maskinversion", B.EMBEDDINGS)]] == [(0, 0), (0, 0)]
    assert list(out[B.MASK_IDS]) == [None, None] and list(out[B.col("gem", B.LABELS)]) == [b"png", None]
    with pytest.raises(KeyError):
        B.conform(batch, ["not_a_column"])


def test_mask_rle_and_masks_uri_are_declared():
    """``mask_rle`` (decode stage → the sink's ``regions/`` mask) converts to its declared Arrow type from what the
    stage writes, rows without masks included; ``masks_uri`` is a string the decode stage consumes."""
    import pyarrow as pa

    rle = B.COLUMNS[B.MASK_RLE].arrow
    assert rle == pa.list_(pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())]))
    assert B.COLUMNS[B.MASKS_URI].arrow == pa.string() and B.COLUMNS[B.MASKS_URI].ndim is None
    out = B.conform({B.IMAGE_ID: np.array(["a", "b", "c"])}, [B.MASK_RLE])
    assert list(out[B.MASK_RLE]) == [None, None, None]  # a failed row's fill
    values = [[{"size": [2, 3], "counts": "06"}], [], None]
    assert pa.array(values, type=rle).to_pylist() == values
