"""``clipmaps query``: text-to-region and region-to-region search with known answers, and the model checks.

Planted regions: one whose embedding is the tiny seeded model's text embedding of "a red dress" (raw text), one
with the embedding of "a photo of a red dress." and one with the MaskInversion embedding of a region of a sample
scene, computed here the way the pipeline's MaskInversion predictor computes it, among 2,000 random distractors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipmaps.jobs.cli import main
from clipmaps.jobs.index import build_index
from clipmaps.jobs.query import QueryError, query
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.fingerprint import params_hash
from clipmaps.pipeline.spec import load_spec
from tests.helpers.outputs import regions_table, unit, write_job

DEMO_OVERRIDES = ["input.manifest=/nowhere/manifest.jsonl", "output.uri=/nowhere/out"]
DIM = 32  # clipmaps-tiny-vit's embedding dimension


@pytest.fixture(scope="module")
def spec():
    from tests.helpers.specs import JOB_SPEC

    return load_spec(JOB_SPEC, overrides=DEMO_OVERRIDES)  # clipmaps-tiny-vit, seed 0, maskinversion lr 0.5


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    scene = make_scene(7)
    scene.image.save(folder / "scene.png")
    Image.fromarray(scene.masks[1].astype(np.uint8) * 255).save(folder / "mask.png")
    return folder / "scene.png", folder / "mask.png", scene


def pipeline_region_embedding(lm, spec, scene) -> np.ndarray:
    """What the pipeline writes to regions/ for a mask: decode-stage preprocessing, MaskInversion with the job's
    parameters, L2 normalisation (``MaskInversionPredictor``)."""
    from clipmaps.actors.methods.maskinversion import MaskInversion

    pre = spec.preprocess("maskinversion")
    x = torch.from_numpy(pre.image(scene.image))[None]
    m = torch.from_numpy(pre.mask(scene.masks[1], scene.image.size))[None]
    out = MaskInversion(lm.model, spec.method_params("maskinversion")).embed(x, [m])[0]
    return F.normalize(out.embeddings.float(), dim=-1)[0].numpy()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, spec, tiny_vit, scene_files):
    """An output folder: regions/ with the planted rows among distractors, _job.json, and its index."""
    from clipmaps.actors.text import TextEncoder

    out = tmp_path_factory.mktemp("query-out")
    enc = TextEncoder(tiny_vit.model, tiny_vit.tokenizer)
    raw = enc.encode(["a red dress"], ("{}",))[0].numpy()
    photo = enc.encode(["a red dress"], ("a photo of a {}.",))[0].numpy()
    region = pipeline_region_embedding(tiny_vit, spec, scene_files[2])
    rng = np.random.default_rng(0)
    n = 2000
    x = unit(rng.standard_normal((n, DIM)))
    plant = {"text": (1234, raw), "photo": (77, photo), "region": (1500, region)}
    for row, vec in plant.values():
        x[row] = vec
    image_ids = [f"img-{i:05d}" for i in range(n)]
    region_ids = [f"r{i}" for i in range(n)]
    image_ids[1234], region_ids[1234] = "dress-photo", "red-dress"
    image_ids[1500], region_ids[1500] = "scene-7", "mask-1"
    phash = params_hash(spec, "maskinversion")
    (out / "regions").mkdir()
    import pyarrow.parquet as pq

    pq.write_table(
        regions_table(x, image_ids, region_ids, weights=spec.model.weights_id, params_hash=phash),
        out / "regions" / "part-0.parquet",
    )
    write_job(out, spec.to_dict())
    build_index(str(out), image_uris=False)
    return out, plant, x


def test_text_query_returns_the_planted_region_first(planted):
    out, plant, x = planted
    result = query(str(out), "a red dress", k=5)
    top = result["results"][0]
    assert (top["image_id"], top["region_id"], top["row"]) == ("dress-photo", "red-dress", 1234)
    assert top["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["rank"] for h in result["results"]] == [1, 2, 3, 4, 5]
    assert result["index"]["model"] == "clipmaps-tiny-vit" and result["index"]["weights"] == "random:seed=0"
    # with a template the query is another text, and the other planted vector comes first
    top = query(str(out), "a red dress", k=1, template="a photo of a {}.")["results"][0]
    assert top["row"] == 77 and top["score"] == pytest.approx(1.0, abs=1e-5)


def test_region_query_reembeds_the_region_with_the_jobs_parameters(planted, scene_files):
    out, plant, x = planted
    image, mask, _ = scene_files
    result = query(str(out), image=str(image), mask=str(mask), k=3)
    top = result["results"][0]
    assert (top["image_id"], top["region_id"]) == ("scene-7", "mask-1")
    assert top["score"] > 0.9999
    assert result["query"] == {"image": str(image), "mask": str(mask), "k": 3}


def test_cli_table_and_json(planted, capsys):
    out, _, _ = planted
    assert main(["query", str(out), "a red dress", "-k", "3"]) == 0
    text = capsys.readouterr().out
    assert 'query "a red dress"' in text and "dress-photo" in text.splitlines()[2]
    assert main(["query", str(out), "a red dress", "-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["results"]) == 2 and data["results"][0]["region_id"] == "red-dress"
    assert set(data["results"][0]) >= {"score", "image_id", "region_id", "image_uri", "params_hash"}


def test_mismatched_model_is_refused(planted, capsys):
    out, _, _ = planted
    assert main(["query", str(out), "a red dress", "--model", "ViT-B-16"]) == 2
    err = capsys.readouterr().err
    assert "--model ViT-B-16 differs from the model that wrote the indexed embeddings (clipmaps-tiny-vit" in err


def test_rewritten_job_is_refused(tmp_path, planted, spec):
    """A _job.json naming other weights (the output was rewritten) must not be used to embed queries."""
    out, _, _ = planted
    other = tmp_path / "other"
    other.mkdir()
    for name in ("regions", "index"):
        (other / name).symlink_to(out / name)
    job = spec.to_dict()
    job["model"]["seed"] = 1
    write_job(other, job)
    with pytest.raises(
        QueryError,
        match="weights random:seed=1, but the index was built from embeddings of "
        "clipmaps-tiny-vit with weights random:seed=0",
    ):
        query(str(other), "a red dress")
    # other MaskInversion parameters: text queries still work, region queries are refused
    job = spec.to_dict()
    job["methods"]["maskinversion"]["lr"] = 0.1
    write_job(other, job)
    assert query(str(other), "a red dress", k=1)["results"][0]["row"] == 1234


def test_region_query_with_other_params_is_refused(tmp_path, planted, spec, scene_files):
    out, _, _ = planted
    other = tmp_path / "other"
    other.mkdir()
    for name in ("regions", "index"):
        (other / name).symlink_to(out / name)
    job = spec.to_dict()
    job["methods"]["maskinversion"]["lr"] = 0.1
    write_job(other, job)
    with pytest.raises(QueryError, match="MaskInversion parameters hash to .* the index holds embeddings with"):
        query(str(other), image=str(scene_files[0]), mask=str(scene_files[1]))


def test_bad_arguments(planted, tmp_path, capsys):
    out, _, _ = planted
    with pytest.raises(QueryError, match="either a text query or --image with --mask"):
        query(str(out))
    with pytest.raises(QueryError, match="--image and --mask go together"):
        query(str(out), image="x.png")
    with pytest.raises(QueryError, match="placeholder"):
        query(str(out), "a red dress", template="no placeholder")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "small.png")
    assert main(["query", str(out), "--image", str(tmp_path / "small.png"), "--mask", str(tmp_path / "small.png")]) == 2
    assert "is empty (no non-zero pixel)" in capsys.readouterr().err
