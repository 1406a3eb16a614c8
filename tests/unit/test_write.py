"""write_outputs' pieces without Ray: annotated rows → the datasets' rows, one batch written with its marker, files
without a marker removed, and the progress line without a known total."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from clipmaps.actors.registry import model_info
from clipmaps.pipeline.annotate import annotation_plan, output_kinds, output_schema
from clipmaps.pipeline.progress import ProgressLine
from clipmaps.pipeline.write import (
    WRITTEN,
    WriterConfig,
    dataset_tables,
    file_name,
    remove_unmarked,
    token_of,
    write_batch,
    written_tokens,
)
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS
from tests.helpers.specs import JOB_SPEC

SECRET_URI = "s3://AKIDEXAMPLE:hunter2@bucket/a.png"


def _plan():
    raw = yaml.safe_load(JOB_SPEC.read_text())
    del raw["input"], raw["output"]
    return annotation_plan(raw, has_prompts=True)


def _config(plan, uri: str = "/unused") -> WriterConfig:
    job = plan.spec
    return WriterConfig(
        output_uri=uri,
        storage_options={},
        provenance=plan.provenance(),
        kinds=output_kinds(job),
        embed_dim=model_info(job.model.name).embed_dim,
    )


def _rows(plan) -> pa.Table:
    """Two annotated rows: one where every method wrote (MaskInversion failed), one that failed at decode."""
    dim = model_info(plan.spec.model.name).embed_dim
    schema = output_schema(
        plan.spec, pa.schema([pa.field("image_id", pa.string()), pa.field("image_uri", pa.string())])
    )
    heat = {"prompt": "red circle", "height": 4, "width": 6, "encoding": "png8", "heatmap": b"PNG"}
    region = {
        "region_id": "r1",
        "embedding": [0.0] * dim,
        "mask": {"size": [4, 6], "counts": "abc"},
        "area": 3,
        "bbox": [0, 0, 2, 2],
        "loss": 0.5,
        "expl_map": None,
    }
    good = {
        "image_id": "a",
        "image_uri": SECRET_URI,
        "height": 4,
        "width": 6,
        "errors": [{"method": "legrad", "region_id": None, "stage": "model", "error_type": "X", "message": "m"}],
        "maskclip__label_map": b"L1",
        "gem__label_map": b"L2",
        "gem__heatmaps": [heat],
        "legrad__heatmaps": None,  # failed there: its error is in `errors`
        "maskinversion__regions": [region],
    }
    bad = {
        "image_id": "b",
        "image_uri": "/data/b.png",
        "error_stage": "decode",
        "error_type": "ImageDecodeError",
        "error_message": "cannot decode",
        "errors": [{"method": None, "region_id": None, "stage": "decode", "error_type": "ImageDecodeError",
                    "message": "cannot decode"}],
    }  # fmt: skip
    assert schema.field("maskinversion__regions").type.value_type.field("embedding").type.list_size == dim
    return pa.Table.from_pylist([good, bad], schema=schema)


def test_annotated_rows_become_the_datasets_rows_with_provenance_and_redaction():
    plan = _plan()
    tables = dataset_tables(_rows(plan), _config(plan))
    assert tables["labels"].schema.equals(LABELS) and tables["heatmaps"].schema.equals(HEATMAPS)
    assert tables["errors"].schema.equals(ERRORS)
    labels = {r["method"]: r for r in tables["labels"].to_pylist()}
    assert set(labels) == {"maskclip", "gem"} and labels["gem"]["label_map"] == b"L2"
    assert labels["gem"]["params_hash"] == plan.params_hash["gem"] and labels["gem"]["vocabulary_id"]
    assert (labels["gem"]["height"], labels["gem"]["width"]) == (4, 6)
    assert "hunter2" not in str(tables["labels"].to_pylist()) and "bucket/a.png" in labels["gem"]["image_uri"]
    heatmaps = tables["heatmaps"].to_pylist()
    assert [(h["method"], h["prompt"]) for h in heatmaps] == [("gem", "red circle")]  # legrad failed: none
    regions = tables["regions"].to_pylist()
    assert [(r["image_id"], r["region_id"], r["method"]) for r in regions] == [("a", "r1", "maskinversion")]
    errors = sorted((e["image_id"], e["stage"], e["method"]) for e in tables["errors"].to_pylist())
    assert errors == [("a", "model", "legrad"), ("b", "decode", None)]


def test_a_batch_is_written_with_its_marker_last_and_unmarked_files_go(tmp_path):
    plan = _plan()
    fs, root = LocalFileSystem(), str(tmp_path)
    counts = write_batch(_rows(plan), _config(plan, root)).to_pylist()[0]
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
