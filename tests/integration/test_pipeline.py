"""The pipeline end to end on real local Ray: manifest → decode → four actor pools → Parquet datasets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline.fingerprint import params_hash
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS
from clipmaps.schemas.encodings import decode_heatmap, decode_label_map, rle_encode
from clipmaps.schemas.errors import OutputConflict
from tests.helpers.specs import JOB_SPEC

SCENES = 4


def _manifest_with_bad_rows(folder):
    """The demo scenes plus rows that must end as error rows: missing file, corrupt bytes, a mask of the wrong size."""
    manifest = write_scenes(folder, SCENES)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    wrong = dict(
        rows[0], image_id="wrong-mask", masks=[{"region_id": "too-small", "rle": rle_encode(np.ones((5, 5), bool))}]
    )
    rows += [
        {"image_id": "missing", "image_uri": str(folder / "nope.jpg")},
        {"image_id": "corrupt", "image_uri": str(folder / "corrupt.jpg")},
        wrong,
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def finished_job(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    manifest = _manifest_with_bad_rows(folder / "input")
    spec = load_spec(
        JOB_SPEC,
        overrides=[
            f"input.manifest={manifest}",
            f"output.uri={folder / 'out'}",
            "output.overwrite=false",
            "run.max_error_fraction=0.5",
            "run.progress_interval_s=3600",  # only the final line, however slow the machine
        ],
    )
    lines = []
    result = run(spec, progress=lines.append)
    return spec, result, folder / "out", lines


def _read(out, name):
    return pads.dataset(out / name, format="parquet").to_table()


def test_every_input_ends_as_outputs_or_errors(finished_job):
    spec, result, out, lines = finished_job
    good = [f"scene-{i:03d}" for i in range(SCENES)]
    assert result.total == SCENES + 3 and result.processed == SCENES + 3
    labels, heatmaps, regions, errors = (_read(out, n) for n in ("labels", "heatmaps", "regions", "errors"))
    # GEM and MaskCLIP label every good image (and the wrong-mask image, whose picture is fine)
    assert sorted(labels.column("image_id").to_pylist()) == sorted((good + ["wrong-mask"]) * 2)
    assert heatmaps.num_rows == (SCENES + 1) * 3 * 2  # 3 prompts per scene, GEM + LeGrad
    assert regions.num_rows == SCENES * 3
    by_id = {}
    for row in errors.to_pylist():
        by_id.setdefault(row["image_id"], []).append(row)
    assert by_id["missing"][0]["stage"] == "read" and "nope.jpg" in by_id["missing"][0]["message"]
    assert by_id["corrupt"][0]["stage"] == "decode"
    mask_errors = [r for r in by_id["wrong-mask"] if r["stage"] == "mask"]
    assert mask_errors and mask_errors[0]["region_id"] == "too-small"
    assert {r["error_type"] for r in by_id["wrong-mask"]} >= {"MaskSizeMismatch", "NoMasks"}
    assert result.errors == 3 and result.ok  # 3 of 7 images had an error, under the 0.5 threshold
    assert any(line.startswith("progress") for line in lines)


def test_outputs_follow_the_schemas_and_decode(finished_job):
    spec, _, out, _ = finished_job
    labels, heatmaps, regions = (_read(out, n) for n in ("labels", "heatmaps", "regions"))
    for table, schema in ((labels, LABELS), (heatmaps, HEATMAPS), (_read(out, "errors"), ERRORS)):
        assert table.schema.remove_metadata().equals(schema, check_metadata=False)
    row = labels.to_pylist()[0]
    lm = decode_label_map(row["label_map"])
    assert lm.shape == (row["height"], row["width"]) == (240, 320)
    assert lm.max() <= 18
    hm = heatmaps.to_pylist()[0]
    assert decode_heatmap(hm["heatmap"], hm["encoding"], hm["height"], hm["width"]).shape == (240, 320)
    assert regions.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    emb = np.stack(regions.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    expected = params_hash(spec, "maskinversion", manifest_has_prompts=True)
    assert set(regions.column("params_hash").to_pylist()) == {expected}
    assert set(labels.column("weights").to_pylist()) == {"random:seed=0"}
    vocab = _read(out, "vocabulary").to_pylist()
    assert {v["vocabulary_id"] for v in vocab} >= set(labels.column("vocabulary_id").to_pylist())
    job = json.loads((out / "_job.json").read_text())
    assert job["counts"]["images"] == SCENES + 3 and job["spec"]["model"]["name"] == "clipmaps-tiny-vit"


def test_outputs_open_with_pandas_and_duckdb(finished_job):
    _, _, out, _ = finished_job
    import duckdb
    import pandas as pd

    regions = pd.read_parquet(out / "regions")
    assert len(regions) == SCENES * 3 and regions["embedding"].iloc[0].shape == (32,)
    counts = dict(duckdb.sql(f"SELECT method, count(*) FROM '{out}/heatmaps/*.parquet' GROUP BY method").fetchall())
    assert counts == {"gem": (SCENES + 1) * 3, "legrad": (SCENES + 1) * 3}


def test_rerunning_the_finished_job_does_nothing_and_a_changed_job_is_refused(finished_job):
    spec, first, out, _ = finished_job
    files = sorted(p.name for p in (out / "labels").iterdir())
    again = run(spec)
    assert again.counts == first.counts and again.processed == first.processed
    assert sorted(p.name for p in (out / "labels").iterdir()) == files
    job = json.loads((out / "_job.json").read_text())
    assert len(job["attempts"]) == 2 and job["attempts"][1]["todo_images"] == 0
    changed = load_spec(spec.to_dict(redact=False) | {}, overrides=["methods.gem.depth=5"])
    with pytest.raises(OutputConflict, match="methods.gem.depth: 7 → 5"):
        run(changed)


def test_dry_run_resolves_without_running(tmp_path):
    manifest = write_scenes(tmp_path / "input", 2)
    spec = load_spec(JOB_SPEC, overrides=[f"input.manifest={manifest}", f"output.uri={tmp_path / 'out'}"])
    result = run(spec, dry_run=True)
    assert "2 images in 1 shards" in result.plan_text and "maskinversion" in result.plan_text
    assert "output    empty: 1 shards (2 images) to do" in result.plan_text
    assert not (tmp_path / "out").exists()


def test_result_rows_stand_alone_and_each_shard_has_one_file_per_dataset(finished_job):
    """Every result row names its image's URI (redacted) besides its id; a dataset has at most one file per shard
    (the sink's per-batch files are concatenated once the shard is complete, then removed)."""
    _, _, out, _ = finished_job
    manifest = {}
    for line in (out.parent / "input" / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        manifest[row["image_id"]] = row["image_uri"]
    for name in ("labels", "heatmaps", "regions"):
        table = _read(out, name)
        assert table.num_rows
        pairs = set(zip(table.column("image_id").to_pylist(), table.column("image_uri").to_pylist()))
        assert pairs == {(i, manifest[i]) for i, _ in pairs}, name
    errors = _read(out, "errors").to_pylist()
    assert all(r["uri"] == manifest[r["image_id"]] for r in errors)
    markers = list((out / "_shards").glob("*.json"))
    for name in ("labels", "heatmaps", "regions", "errors"):
        parts = [p for p in (out / name).glob("part-0*.parquet")]
        assert 1 <= len(parts) <= len(markers), (name, parts)
    assert not (out / "_staging").exists() or not any((out / "_staging").rglob("*.parquet"))
    regions = _read(out, "regions")
    masks = [m for m in regions.column("mask").to_pylist() if m is not None]
    if masks:  # the decode stage writes each usable mask's RLE (schemas.batches.MASK_RLE)
        from clipmaps.schemas.encodings import rle_decode

        for m, area in zip(regions.column("mask").to_pylist(), regions.column("area").to_pylist()):
            assert int(rle_decode(m).sum()) == area


def test_the_output_loads_by_dataset_name_and_progress_is_a_timer_line(finished_job, tmp_path):
    """The dataset card lets ``datasets.load_dataset(OUTPUT, NAME)`` load each dataset (label maps as images); the run
    printed the plan and one final progress line (the interval is set longer than this run), not one per batch."""
    datasets = pytest.importorskip("datasets")
    spec, result, out, lines = finished_job
    assert (out / "README.md").read_text().startswith("---\nconfigs:")
    labels = datasets.load_dataset(str(out), "labels", split="train", cache_dir=str(tmp_path / "hf"))
    assert labels.num_rows == _read(out, "labels").num_rows
    assert labels.features["label_map"] == datasets.Image()
    assert labels[0]["label_map"].size == (labels[0]["width"], labels[0]["height"])
    progress = [line for line in lines if line.startswith("progress")]
    total = f"{result.processed:,}/{result.total:,} images (100.0%)"
    assert len(progress) == 1 and total in progress[0], lines
