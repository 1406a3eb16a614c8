"""LeGrad and MaskInversion on a SigLIP backbone end to end through real local Ray: the tiny seeded SigLIP-family
model (``clipmaps-tiny-mappool``: timm ``vit_base_patch32_siglip_256`` trunk with its attention-pooling head), the
sample scenes, heatmaps and region embeddings written as Parquet; GEM refused on it at validation."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest
import yaml

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline.fingerprint import params_hash
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.schemas.encodings import decode_heatmap
from tests.helpers.specs import JOB_SPEC

SCENES = 2
MODEL = "clipmaps-tiny-mappool"


def _raw_spec(folder) -> dict:
    raw = yaml.safe_load(JOB_SPEC.read_text())
    raw["input"]["manifest"] = str(write_scenes(folder / "input", SCENES))
    raw["output"]["uri"] = str(folder / "out")
    raw["model"] = {"name": MODEL, "seed": 0}
    # 224 = 7 x 7 patches of 32; one block for each method keeps the ViT-B trunk's CPU cost small
    raw["methods"] = {"legrad": {"size": 224, "layers": 1}, "maskinversion": {"size": 224, "lr": 0.5, "iterations": 3}}
    return raw


@pytest.fixture(scope="module")
def finished_job(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pooled")
    spec = load_spec(_raw_spec(folder))
    result = run(spec)
    return spec, result, folder / "out"


def _read(out, name):
    return pads.dataset(out / name, format="parquet").to_table()


def test_siglip_runs_legrad_and_maskinversion_through_ray(finished_job):
    spec, result, out = finished_job
    assert result.counts.get("errors", 0) == 0, _read(out, "errors").to_pylist()
    heatmaps, regions = _read(out, "heatmaps"), _read(out, "regions")
    assert set(heatmaps.column("method").to_pylist()) == {"legrad"}
    assert set(heatmaps.column("model").to_pylist()) == {MODEL}
    assert set(heatmaps.column("params_hash").to_pylist()) == {params_hash(spec, "legrad", manifest_has_prompts=True)}
    assert heatmaps.num_rows >= SCENES  # every scene's prompts
    maps = []
    for row in heatmaps.to_pylist():
        m = decode_heatmap(row["heatmap"], row["encoding"], row["height"], row["width"])
        assert m.shape == (row["height"], row["width"]) and m.min() >= 0 and m.max() <= 1
        maps.append(m)
    assert any(m.std() > 0 for m in maps)  # maps, not constants
    emb = np.stack(regions.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape[1] == 768  # the SigLIP tower's joint space
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert set(regions.column("method").to_pylist()) == {"maskinversion"}
    assert np.isfinite(np.asarray(regions.column("loss").to_pylist())).all()


def test_gem_and_maskclip_are_refused_on_siglip_before_anything_runs(tmp_path):
    raw = _raw_spec(tmp_path)
    raw["methods"] |= {"gem": {"size": 224}, "maskclip": {}}
    with pytest.raises(SpecError) as err:
        load_spec(raw)
    text = str(err.value)
    assert (
        f"methods.gem: GEM cannot run on {MODEL}" in text
        and f"methods.maskclip: MaskCLIP cannot run on {MODEL}" in text
    )
    assert "methods.legrad" not in text and "methods.maskinversion" not in text
