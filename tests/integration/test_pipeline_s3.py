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
