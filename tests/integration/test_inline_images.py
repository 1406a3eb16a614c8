"""``clipmaps run`` on a Parquet manifest with the images inside (the Hugging Face ``datasets`` image struct, written
by ``datasets.Dataset.to_parquet``), on real local Ray: the same label maps as the same images read by URI, a
corrupt image as an error row, resume keeping the finished shards, and a changed image refused as a changed shard."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from PIL import Image

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.errors import OutputConflict
from tests.helpers.specs import JOB_SPEC

datasets = pytest.importorskip("datasets")

SCENES = 2


def _read(out, name):
    return pads.dataset(out / name, format="parquet").to_table().to_pylist()


def _hf_parquet(rows, path, corrupt: bytes | None = None):
    """The manifest rows as a ``datasets`` dataset with an ``Image`` feature holding the files' bytes."""
    images = [{"bytes": Path(r["image_uri"].removeprefix("file://")).read_bytes(), "path": None} for r in rows]
    ids = [r["image_id"] for r in rows]
    if corrupt is not None:
        images.append({"bytes": corrupt, "path": None})
        ids.append("corrupt")
        rows = [*rows, rows[0]]
    ds = datasets.Dataset.from_dict(
        {
            "image_id": ids,
            "image": images,
            "masks": [r["masks"] for r in rows],
            "prompts": [r["prompts"] for r in rows],
        }
    ).cast_column("image", datasets.Image())
    ds.to_parquet(str(path))
    return path


#: MaskCLIP's label maps and MaskInversion's regions: the input format is what is tested, two pools fewer keep it short
METHODS = ("methods.gem=null", "methods.legrad=null")


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inline")
    manifest = write_scenes(folder / "input", SCENES)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    by_uri = run(
        load_spec(JOB_SPEC, overrides=[f"input.manifest={manifest}", f"output.uri={folder / 'by-uri'}", *METHODS]),
        progress=lambda line: None,
    )
    parquet = _hf_parquet(rows, folder / "hf" / "images.parquet", corrupt=b"\xff\xd8\xff\xe0 not really a jpeg")
    overrides = [
        f"input.manifest={parquet}",
        f"output.uri={folder / 'inline'}",
        "output.overwrite=false",
        "run.max_error_fraction=0.5",
        *METHODS,
    ]
    inline = run(load_spec(JOB_SPEC, overrides=overrides), progress=lambda line: None)
    return rows, folder, by_uri, inline, overrides


def test_inline_images_give_the_same_results_as_files(runs):
    rows, folder, by_uri, inline, _ = runs
    assert inline.total == SCENES + 1 and inline.processed == SCENES + 1
    want = {(r["image_id"], r["method"]): r["label_map"] for r in _read(folder / "by-uri", "labels")}
    got = {(r["image_id"], r["method"]): r for r in _read(folder / "inline", "labels")}
    assert want and set(got) == set(want)
    for key, label_map in want.items():
        assert got[key]["label_map"] == label_map and got[key]["image_uri"] is None
    assert len(_read(folder / "inline", "regions")) == len(_read(folder / "by-uri", "regions"))
    errors = [e for e in _read(folder / "inline", "errors") if e["image_id"] == "corrupt"]
    assert errors and errors[0]["stage"] == "decode" and "image bytes of corrupt" in errors[0]["message"]


def test_resume_keeps_finished_shards_and_refuses_a_changed_image(runs):
    rows, folder, _, inline, overrides = runs
    again = run(load_spec(JOB_SPEC, overrides=overrides), progress=lambda line: None)
    assert again.kept_images == inline.total and again.attempt_images == 0
    # the same ids and masks with one image's bytes changed: the shard's digest covers the image, so resume refuses
    scene = folder / "input" / "changed.jpg"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(scene)
    changed = [dict(rows[0], image_uri=str(scene)), *rows[1:]]
    _hf_parquet(changed, folder / "hf" / "images.parquet", corrupt=b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(OutputConflict, match=r"complete shard\(s\) 0 "):
        run(load_spec(JOB_SPEC, overrides=overrides), progress=lambda line: None)
