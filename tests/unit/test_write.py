"""write_outputs' pieces without Ray: annotated rows → the datasets' rows, one batch written with its marker, files
without a marker removed, and the progress line without a known total."""

from __future__ import annotations

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from clipmaps.pipeline.progress import ProgressLine
from clipmaps.pipeline.write import (
    WRITTEN,
    dataset_tables,
    file_name,
    remove_unmarked,
    token_of,
    write_batch,
    written_tokens,
)
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS
from tests.helpers.annotated import annotated_rows, plan, writer_config


def test_annotated_rows_become_the_datasets_rows_with_provenance_and_redaction():
    p = plan()
    tables = dataset_tables(annotated_rows(p), writer_config(p))
    assert tables["labels"].schema.equals(LABELS) and tables["heatmaps"].schema.equals(HEATMAPS)
    assert tables["errors"].schema.equals(ERRORS)
    labels = {r["method"]: r for r in tables["labels"].to_pylist()}
    assert set(labels) == {"maskclip", "gem"} and labels["gem"]["label_map"] == b"L2"
    assert labels["gem"]["params_hash"] == p.params_hash["gem"] and labels["gem"]["vocabulary_id"]
    assert (labels["gem"]["height"], labels["gem"]["width"]) == (4, 6)
    assert "hunter2" not in str(tables["labels"].to_pylist()) and "bucket/a.png" in labels["gem"]["image_uri"]
    heatmaps = tables["heatmaps"].to_pylist()
    assert [(h["method"], h["prompt"]) for h in heatmaps] == [("gem", "red circle")]  # legrad failed: none
    regions = tables["regions"].to_pylist()
    assert [(r["image_id"], r["region_id"], r["method"]) for r in regions] == [("a", "r1", "maskinversion")]
    errors = sorted((e["image_id"], e["stage"], e["method"]) for e in tables["errors"].to_pylist())
    assert errors == [("a", "model", "legrad"), ("b", "decode", None)]


def test_a_batch_is_written_with_its_marker_last_and_unmarked_files_go(tmp_path):
    p = plan()
    fs, root = LocalFileSystem(), str(tmp_path)
    counts = write_batch(annotated_rows(p), writer_config(p, root)).to_pylist()[0]
    assert {k: counts[k] for k in ("rows", "failed_rows", "labels", "heatmaps", "regions", "errors")} == {
        "rows": 2, "failed_rows": 1, "labels": 2, "heatmaps": 1, "regions": 1, "errors": 2,
    }  # fmt: skip
    token = counts["token"]
    assert token_of(file_name(token)) == token and token_of("part-empty.parquet") is None
    assert written_tokens(fs, root) == {token}
    assert pq.read_table(tmp_path / WRITTEN / file_name(token))["image_id"].to_pylist() == ["a", "b"]
    for name in ("labels", "heatmaps", "regions", "errors"):
        assert (tmp_path / name / file_name(token)).exists()
    # a batch whose task died before its marker: its files are not results
    stray = tmp_path / "labels" / file_name("0" * 16)
    stray.write_bytes((tmp_path / "labels" / file_name(token)).read_bytes())
    (tmp_path / "labels" / "part-empty.parquet").write_bytes(b"kept")
    assert remove_unmarked(fs, root, written_tokens(fs, root)) == 1
    assert not stray.exists() and (tmp_path / "labels" / file_name(token)).exists()
    assert (tmp_path / "labels" / "part-empty.parquet").exists()


def test_the_progress_line_without_a_known_total():
    said: list[str] = []
    times = iter([0.0, 10.0, 10.0])
    line = ProgressLine(None, said.append, interval_s=30, clock=lambda: next(times))
    line.update(40, 2)
    line.finish()
    assert said == ["progress  40 images  4.00 images/s  2 errors"]


def test_overwrite_clears_write_outputs_markers_and_the_card(tmp_path):
    """`clipmaps run --overwrite` on a folder write_outputs wrote left `_written/` behind, and `unwritten` then took
    the new output for holding those ids (review)."""
    from clipmaps.pipeline.resume import clear_output

    for name in ("_written/part-w0123456789abcdef.parquet", "labels/part-w0123456789abcdef.parquet", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    clear_output(LocalFileSystem(), str(tmp_path))
    assert not any(tmp_path.iterdir()) and written_tokens(LocalFileSystem(), str(tmp_path)) == set()
