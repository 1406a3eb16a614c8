"""``write_outputs`` on real local Ray: the user's own rows (``read_json`` of a JSONL with ``image_uri``) →
``unwritten`` → ``annotate`` → their filter → ``write_outputs``; resumed after a batch that never got its marker,
refused when the spec would change results, readable by clipmaps' own tools (COCO export)."""

from __future__ import annotations

import io
import json
import posixpath

import pyarrow.dataset as pads
import pytest
import yaml
from ray.data.expressions import col

from clipmaps.jobs.demo import write_scenes
from clipmaps.jobs.export import export_coco
from clipmaps.jobs.outputs import JobOutputs
from clipmaps.pipeline import annotate, unwritten, write_outputs
from clipmaps.pipeline.write import WRITTEN, token_of
from clipmaps.schemas.errors import OutputConflict
from tests.helpers.specs import JOB_SPEC

SCENES = 4


def _spec() -> dict:
    raw = yaml.safe_load(JOB_SPEC.read_text())
    del raw["input"], raw["output"]
    for method in ("gem", "legrad", "maskinversion"):  # one pool: what is tested is the writing
        del raw["methods"][method]
    return raw


@pytest.fixture(scope="module")
def written(ray_local, tmp_path_factory):
    """4 images in 2 batches; one batch's marker then removed (as if its task died between its files and its
    marker); returns the folder, the input and the first call's result."""
    import ray

    folder = tmp_path_factory.mktemp("write")
    manifest = write_scenes(folder / "input", SCENES)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    listing = folder / "images.jsonl"
    listing.write_text(
        "".join(json.dumps({"image_id": r["image_id"], "image_uri": r["image_uri"]}) + "\n" for r in rows)
    )
    out = folder / "out"

    def pipeline(ds):
        return annotate(ds, _spec()).filter(expr=col("image_id") != "never-there")  # the user's own step

    first = write_outputs(pipeline(ray.data.read_json(str(listing))), str(out), _spec(), rows_per_file=2)
    return folder, listing, out, rows, first, pipeline


def _labels(out):
    return pads.dataset(out / "labels", format="parquet").to_table().to_pylist()


def test_first_call_writes_every_row_once_with_markers(written):
    _, _, out, rows, first, _ = written
    assert first.counts["rows"] == SCENES and first.counts["labels"] == SCENES and first.counts["failed_rows"] == 0
    assert first.batches == 2 and first.total_rows == SCENES and first.duplicates == 0
    markers = sorted(p.name for p in (out / WRITTEN).iterdir())
    assert len(markers) == 2 and all(token_of(m) for m in markers)
    labels = _labels(out)
    assert sorted(r["image_id"] for r in labels) == sorted(r["image_id"] for r in rows)
    assert {r["method"] for r in labels} == {"maskclip"} and all(r["vocabulary_id"] for r in labels)
    job = json.loads((out / "_job.json").read_text())
    assert job["writer"] == "write_outputs" and job["status"] == "finished" and "input" not in job["spec"]
    assert (out / "README.md").exists() and list((out / "vocabulary").iterdir())


def test_resume_writes_only_what_is_missing_and_removes_unmarked_files(written, ray_local):
    import ray

    _, listing, out, rows, _, pipeline = written
    marker = sorted((out / WRITTEN).iterdir())[0]
    lost = set(pads.dataset(marker, format="parquet").to_table()["image_id"].to_pylist())
    marker.unlink()  # its result files stay: an unfinished batch's
    assert (out / "labels" / marker.name).exists()
    stray = out / "labels" / "part-w0123456789abcdef.parquet"  # a batch that will not be written again
    stray.write_bytes((out / "labels" / marker.name).read_bytes())
    todo = unwritten(ray.data.read_json(str(listing)), str(out)).materialize()  # the join runs once here
    assert sorted(todo.unique("image_id")) == sorted(lost)
    again = write_outputs(pipeline(todo), str(out), _spec(), rows_per_file=2)
    assert again.counts["rows"] == len(lost) and again.total_rows == SCENES and again.duplicates == 0
    assert not stray.exists()  # no marker: removed
    labels = _labels(out)
    assert sorted(r["image_id"] for r in labels) == sorted(r["image_id"] for r in rows)  # each exactly once
    job = json.loads((out / "_job.json").read_text())
    assert [a["status"] for a in job["attempts"]] == ["finished", "finished"]

    # clipmaps' own readers take the output as a job's: the COCO export of the label maps
    doc = io.StringIO()
    counts = export_coco(JobOutputs(str(out)), "maskclip", doc)
    assert counts["images"] == SCENES
    assert {posixpath.basename(i["file_name"]) for i in json.loads(doc.getvalue())["images"]} == {
        posixpath.basename(r["image_uri"]) for r in rows
    }


def test_the_rows_schema_is_read_from_the_plan_without_running_it(written, ray_local):
    """Dataset.schema() would run annotate's first block (every pool started, a batch computed twice)."""
    import ray

    from clipmaps.pipeline.write import rows_schema

    _, listing, _, _, _, pipeline = written
    ds = pipeline(ray.data.read_json(str(listing)))
    assert ds.schema(fetch_if_missing=False) is None  # Ray does not know it without running
    schema = rows_schema(ds)
    assert schema is not None and "maskclip__label_map" in schema.names and "image_uri" in schema.names
    assert ds.schema(fetch_if_missing=False) is None  # and nothing ran


def test_refuses_a_spec_that_would_change_results(written, ray_local):
    import ray

    _, listing, out, _, _, pipeline = written
    changed = _spec()
    changed["vocabulary"]["names"] = changed["vocabulary"]["names"][:-1]
    with pytest.raises(OutputConflict, match="vocabulary"):
        write_outputs(annotate(ray.data.read_json(str(listing)), changed), str(out), changed)
    with pytest.raises(ValueError, match="maskclip__label_map"):  # not annotate's rows
        write_outputs(ray.data.read_json(str(listing)), str(out), _spec())


def test_refuses_a_spec_other_than_annotates_and_a_clipmaps_run_output(written, ray_local, tmp_path):
    """The rows would be labelled with another job's vocabulary and params (a user's slip, found in review): refused
    before anything runs, naming the output and field."""
    import ray

    _, listing, _, _, _, _ = written
    other = _spec()
    other["vocabulary"]["names"] = other["vocabulary"]["names"][:5]
    rows = annotate(ray.data.read_json(str(listing)), _spec())
    with pytest.raises(ValueError, match="maskclip: .*params_hash .*vocabulary_id"):
        write_outputs(rows, str(tmp_path / "fresh"), other)
    assert not (tmp_path / "fresh" / "labels").exists()
    # unwritten cannot read a `clipmaps run` output's shards as written ids
    run_out = tmp_path / "run"
    (run_out / "_shards").mkdir(parents=True)
    (run_out / "_shards" / "0000000.json").write_text("{}")
    (run_out / "_job.json").write_text(json.dumps({"fingerprint": {}}))
    with pytest.raises(OutputConflict, match="clipmaps run"):
        unwritten(ray.data.read_json(str(listing)), str(run_out))
