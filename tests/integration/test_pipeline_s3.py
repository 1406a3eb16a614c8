"""End to end against a real S3 server (SeaweedFS on 127.0.0.1): images, masks, weights and manifest read from a
bucket, every dataset written back to it."""

from __future__ import annotations

import json

import pyarrow.dataset as pads

from clipmaps.actors.models import load_model, save_weights
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.encodings import rle_encode
from tests.helpers.specs import JOB_SPEC


def test_s3_in_s3_out(ray_local, s3, tmp_path):
    fs = s3.filesystem()
    root = f"{s3.bucket}/e2e"
    rows = []
    for i in range(3):
        scene = make_scene(i)
        local = tmp_path / f"scene {i}.png"  # a space in the key
        scene.image.save(local)
        fs.put(str(local), f"{root}/images/scene {i}.png")
        masks = [{"region_id": str(r), "rle": rle_encode(m)} for r, m in enumerate(scene.masks)]
        rows.append(
            {
                "image_id": f"s{i}",
                "image_uri": f"s3://{root}/images/scene {i}.png",
                "masks": masks,
                "prompts": scene.names,
            }
        )
    fs.pipe(f"{root}/manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    weights = save_weights(load_model("clipmaps-tiny-vit", seed=0).model, tmp_path / "tiny.safetensors")
    fs.put(str(weights), f"{root}/models/tiny.safetensors")

    opts = json.dumps(s3.storage_options)
    spec = load_spec(
        JOB_SPEC,
        overrides=[
            f"input.manifest=s3://{root}/manifest.jsonl",
            f"input.storage_options={opts}",
            f"output.uri=s3://{root}/out",
            f"output.storage_options={opts}",
            "model.seed=null",
            f"model.weights=s3://{root}/models/tiny.safetensors",
            f"model.storage_options={opts}",
        ],
    )
    result = run(spec)
    assert result.ok and result.processed == 3 and result.errors == 0

    out = f"{root}/out"
    tables = {
        n: pads.dataset(f"{out}/{n}", filesystem=fs, format="parquet").to_table()
        for n in ("labels", "heatmaps", "regions", "errors", "vocabulary")
    }
    assert tables["labels"].num_rows == 3 * 2 and tables["regions"].num_rows == 9
    assert tables["heatmaps"].num_rows == 3 * 3 * 2 and tables["errors"].num_rows == 0
    assert set(tables["regions"].column("weights").to_pylist()) == {f"s3://{root}/models/tiny.safetensors"}
    # the credentials are in the spec but must not be written anywhere
    for path in fs.find(out):
        assert s3.secret.encode() not in fs.cat(path), path
    job = json.loads(fs.cat(f"{out}/_job.json"))
    assert job["spec"]["input"]["storage_options"]["secret"] == "***"


def test_write_outputs_and_unwritten_on_s3(ray_local, s3):
    """write_outputs' batches and markers on a bucket, and unwritten's join reading the markers there (Ray tasks
    with the bucket's fsspec filesystem); annotated rows built by hand, so no model runs."""
    import pyarrow as pa
    import ray

    from clipmaps.pipeline import unwritten, write_outputs
    from tests.helpers.annotated import annotated_rows, plan, raw_spec

    fs = s3.filesystem()
    out = f"s3://{s3.bucket}/written"
    p = plan()
    rows = pa.concat_tables([annotated_rows(p, ("a", "b")), annotated_rows(p, ("c", "d"))])
    result = write_outputs(
        ray.data.from_arrow(rows), out, raw_spec(), storage_options=s3.storage_options, rows_per_file=2
    )
    assert result.counts["rows"] == 4 and result.counts["failed_rows"] == 2 and result.total_rows == 4
    assert result.batches == 2 and result.duplicates == 0
    labels = pads.dataset(f"{s3.bucket}/written/labels", filesystem=fs, format="parquet").to_table()
    assert sorted(set(labels["image_id"].to_pylist())) == ["a", "c"]
    assert len(fs.ls(f"{s3.bucket}/written/_written")) == 2
    inputs = ray.data.from_items([{"image_id": i} for i in ("a", "b", "c", "d", "e")])
    todo = unwritten(inputs, out, storage_options=s3.storage_options)
    assert todo.take_all() == [{"image_id": "e"}]
    # a second call adds to the output; an id given again is written again, and counted as a repeat
    again = write_outputs(
        ray.data.from_arrow(annotated_rows(p, ("a", "e"))), out, raw_spec(), storage_options=s3.storage_options
    )
    assert again.counts["rows"] == 2 and again.total_rows == 6 and again.duplicates == 1
