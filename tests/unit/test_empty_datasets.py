"""The schema-only files every result dataset gets when a job starts (``pipeline.sinks.write_empty_datasets``)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from clipmaps.pipeline.resume import remove_incomplete
from clipmaps.pipeline.sinks import EMPTY_FILE, shard_of_file, write_empty_datasets
from clipmaps.schemas.datasets import HEATMAPS, LABELS, regions_schema
from clipmaps.schemas.storage import filesystem


def test_written_once_with_each_schema_and_kept_by_resume(tmp_path):
    fs, root = filesystem(str(tmp_path / "out[1]"))
    written = write_empty_datasets(fs, root, 32)
    assert len(written) == 3 and shard_of_file(EMPTY_FILE) is None
    for name, schema in (("labels", LABELS), ("heatmaps", HEATMAPS), ("regions", regions_schema(32))):
        path = tmp_path / "out[1]" / name / EMPTY_FILE
        assert pq.read_schema(path).equals(schema, check_metadata=False)
        assert pq.read_metadata(path).num_row_groups == 0
    assert write_empty_datasets(fs, root, 32) == []  # a resumed job finds them
    assert remove_incomplete(fs, root, {}) == 0  # not a shard's file: never a stray


def test_a_file_of_another_embedding_width_is_replaced(tmp_path):
    fs, root = filesystem(str(tmp_path))
    write_empty_datasets(fs, root, 32)
    assert write_empty_datasets(fs, root, 64) == [f"{root}/regions/{EMPTY_FILE}"]
    assert pq.read_schema(tmp_path / "regions" / EMPTY_FILE).field("embedding").type.list_size == 64


def test_a_width_that_is_not_positive_is_refused(tmp_path):
    fs, root = filesystem(str(tmp_path))
    with pytest.raises(ValueError):
        write_empty_datasets(fs, root, 0)
