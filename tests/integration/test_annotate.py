"""``annotate`` as a step in a user's own Ray pipeline, on real local Ray: ``read_parquet`` of a Parquet with image
bytes → annotate → the user's filter → ``write_parquet``; compared with what ``clipmaps run`` writes for the same
images and spec."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
from ray.data.expressions import col

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline import annotate, write_outputs
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.schemas.datasets import MANIFEST
from tests.helpers.specs import JOB_SPEC

SCENES = 3


@pytest.fixture(scope="module")
def both(ray_local, tmp_path_factory):
    """The same scenes through ``clipmaps run`` (a manifest of files) and through annotate (a Parquet of bytes)."""
    import ray

    folder = tmp_path_factory.mktemp("annotate")
    manifest = write_scenes(folder / "input", SCENES)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    # GEM's label maps and heatmaps, MaskCLIP's label maps, MaskInversion's regions: every output kind, one pool fewer
    overrides = [f"input.manifest={manifest}", f"output.uri={folder / 'run'}", "methods.legrad=null"]
    spec = load_spec(JOB_SPEC, overrides=overrides)
    run(spec, progress=lambda line: None)

    def image_bytes(uri: str) -> bytes:
        return open(uri.removeprefix("file://"), "rb").read()

    table_rows = [
        {"image_id": r["image_id"], "image": image_bytes(r["image_uri"]), "masks": r["masks"], "prompts": r["prompts"]}
        for r in rows
    ]
    table_rows.append(dict(table_rows[0], image_id="skip-me"))  # removed by the user's filter
    table_rows.append(dict(table_rows[0], image_id="corrupt", image=b"\xff\xd8\xff\xe0 not really a jpeg"))
    table_rows.append(dict(table_rows[0], image_id="no-image", image=None))
    schema = pa.schema(
        [
            MANIFEST.field("image_id"),
            pa.field("image", pa.binary()),
            MANIFEST.field("masks"),
            MANIFEST.field("prompts"),
        ]
    )
    source = folder / "images.parquet"
    pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), source)

    raw = yaml.safe_load(JOB_SPEC.read_text())
    del raw["input"], raw["output"]  # annotate needs neither
    del raw["methods"]["legrad"]  # the run's methods
    ds = ray.data.read_parquet(str(source))
    out = annotate(ds, raw).filter(expr=col("image_id") != "skip-me").materialize()  # computed once, for both writers
    out.write_parquet(str(folder / "annotated"))
    write_outputs(out, str(folder / "written"), raw)  # clipmaps' datasets, as `clipmaps run` writes them
    # the README's filter, on the rows written
    kept = ray.data.read_parquet(str(folder / "annotated")).filter(expr=col("error_stage").is_null())
    assert sorted(kept.unique("image_id")) == sorted(r["image_id"] for r in rows)
    annotated = pads.dataset(folder / "annotated", format="parquet").to_table()
    return rows, folder / "run", annotated, folder / "written"


def _read(out, name):
    return pads.dataset(out / name, format="parquet").to_table().to_pylist()


def test_one_row_per_input_row_and_errors_as_rows(both):
    rows, _, annotated, _ = both
    got = annotated.to_pylist()
    ids = sorted(r["image_id"] for r in got)
    assert ids == sorted([r["image_id"] for r in rows] + ["corrupt", "no-image"])
    assert "image" not in annotated.column_names and "masks" not in annotated.column_names
    assert "prompts" in annotated.column_names
    by_id = {r["image_id"]: r for r in got}
    corrupt = by_id["corrupt"]
    assert corrupt["error_stage"] == "decode" and corrupt["height"] is None
    assert corrupt["maskclip__label_map"] is None and corrupt["errors"][0]["stage"] == "decode"
    assert "image bytes of corrupt" in corrupt["error_message"]
    missing = by_id["no-image"]
    assert (missing["error_stage"], missing["error_type"]) == ("manifest", "MissingImage")
    for r in rows:
        good = by_id[r["image_id"]]
        assert good["error_stage"] is None and good["errors"] == []
        assert good["height"] > 0 and good["width"] > 0


def test_outputs_equal_what_clipmaps_run_writes(both):
    rows, run_out, annotated, _ = both
    by_id = {r["image_id"]: r for r in annotated.to_pylist()}
    labels = _read(run_out, "labels")
    assert labels
    for lab in labels:
        assert by_id[lab["image_id"]][f"{lab['method']}__label_map"] == lab["label_map"]  # byte-identical PNG
    heatmaps = _read(run_out, "heatmaps")
    assert heatmaps
    for h in heatmaps:
        mine = {m["prompt"]: m for m in by_id[h["image_id"]][f"{h['method']}__heatmaps"]}
        assert mine[h["prompt"]]["heatmap"] == h["heatmap"]
        assert (mine[h["prompt"]]["height"], mine[h["prompt"]]["width"]) == (h["height"], h["width"])
    regions = _read(run_out, "regions")
    assert len(regions) == sum(len(r["masks"]) for r in rows)
    for reg in regions:
        mine = {m["region_id"]: m for m in by_id[reg["image_id"]]["maskinversion__regions"]}
        m = mine[reg["region_id"]]
        assert m["area"] == reg["area"] and m["bbox"] == reg["bbox"] and m["mask"] == reg["mask"]
        np.testing.assert_allclose(m["embedding"], reg["embedding"], atol=1e-5)


def test_write_outputs_writes_what_clipmaps_run_writes(both):
    """annotate → write_outputs gives `clipmaps run`'s rows for the same images and spec, dataset by dataset; the
    rows that failed before the methods are error rows; run's rows carry file URIs, these images came as bytes."""
    rows, run_out, annotated, written = both

    def rows_of(out, name, skip=("image_uri", "uri")):
        got = [{k: v for k, v in r.items() if k not in skip} for r in _read(out, name)]
        return sorted(got, key=lambda r: json.dumps(r, sort_keys=True, default=repr))

    for name in ("labels", "heatmaps"):
        assert rows_of(written, name) == rows_of(run_out, name) and rows_of(written, name)
    mine, theirs = (
        rows_of(written, "regions", ("image_uri", "embedding")),
        rows_of(run_out, "regions", ("image_uri", "embedding")),
    )
    assert mine == theirs and len(mine) == sum(len(r["masks"]) for r in rows)
    errors = {(e["image_id"], e["stage"], e["error_type"]) for e in _read(written, "errors")}
    by_id = {r["image_id"]: r for r in annotated.to_pylist()}
    decode_type = by_id["corrupt"]["error_type"]
    assert decode_type and errors == {("corrupt", "decode", decode_type), ("no-image", "manifest", "MissingImage")}
    assert not _read(run_out, "errors")
    job = json.loads((written / "_job.json").read_text())
    assert job["writer"] == "write_outputs" and job["counts"] == {"rows": SCENES + 2, "duplicate_ids": 0}


def test_refuses_a_dataset_without_image_columns(ray_local):
    import ray

    raw = yaml.safe_load(JOB_SPEC.read_text())
    del raw["input"], raw["output"]
    with pytest.raises(ValueError, match="'image' \\(encoded bytes\\) or 'image_uri'"):
        annotate(ray.data.from_items([{"image_id": "a", "path": "x.jpg"}]), raw)
    # MaskInversion without masks is the spec's error, as for a manifest
    with pytest.raises(SpecError, match="maskinversion"):
        annotate(ray.data.from_items([{"image_id": "a", "image_uri": "x.jpg", "prompts": ["a"]}]), raw)
