"""WebDataset tar shards as input (``{key}.jpg`` + ``{key}.json``), on real local Ray with real tar files: one row per
sample named ``<shard>/<key>``, the same label maps as the images read by URI, bad samples as error rows naming shard
and key while the rest of the shard goes on, shards read from their counted offsets, and resume; LeGrad heatmaps
prompted by the samples' captions (``input.webdataset.prompts: caption``), refused on resume with another source."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline.manifests import ManifestFile, count_file, read_rows
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.errors import OutputConflict
from tests.helpers.specs import JOB_SPEC

SCENES = 3


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(rows, folder: Path) -> dict[str, str]:
    """Three tar shards: the scenes (split over the first two), plus a corrupt image, a broken JSON and a sample
    without an image in the second; the third cut inside its second sample's image (a truncated download). Returns
    image_id (``shard/key``) → the scene's image_id."""
    folder.mkdir(parents=True)
    names = {}
    with tarfile.open(folder / "shard-0000.tar", "w") as tar:
        for k, r in enumerate(rows[:2]):
            key = f"{k:06d}"
            _add(tar, f"{key}.jpg", Path(r["image_uri"].removeprefix("file://")).read_bytes())
            _add(tar, f"{key}.json", json.dumps({"prompts": r["prompts"], "masks": r["masks"]}).encode())
            _add(tar, f"{key}.txt", b"a caption")
            names[f"shard-0000/{key}"] = r["image_id"]
    with tarfile.open(folder / "shard-0001.tar", "w") as tar:
        meta = json.dumps({"prompts": rows[0]["prompts"], "masks": rows[0]["masks"]}).encode()
        _add(tar, "000100.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        _add(tar, "000100.json", meta)
        _add(tar, "000101.jpg", Path(rows[2]["image_uri"].removeprefix("file://")).read_bytes())
        _add(tar, "000101.json", b"{not json")
        _add(tar, "000102.txt", b"only a caption")
        r = rows[2]
        _add(tar, "000103.jpg", Path(r["image_uri"].removeprefix("file://")).read_bytes())
        _add(tar, "000103.json", json.dumps({"prompts": r["prompts"], "masks": r["masks"]}).encode())
        names["shard-0001/000103"] = r["image_id"]
    with tarfile.open(folder / "shard-0002.tar", "w") as tar:
        r = rows[1]
        _add(tar, "000200.jpg", Path(r["image_uri"].removeprefix("file://")).read_bytes())
        _add(tar, "000200.json", json.dumps({"prompts": r["prompts"], "masks": r["masks"]}).encode())
        names["shard-0002/000200"] = r["image_id"]
        cut = tar.offset + 512 + 100  # 100 bytes into the next member's data
        _add(tar, "000201.jpg", Path(r["image_uri"].removeprefix("file://")).read_bytes())
    data = (folder / "shard-0002.tar").read_bytes()
    (folder / "shard-0002.tar").write_bytes(data[:cut])
    return names


def _read(out, name):
    return pads.dataset(out / name, format="parquet").to_table().to_pylist()


#: the label-map methods only: the input format is what is tested, and two pools fewer keep the module short
METHODS = ("methods.legrad=null", "methods.maskinversion=null")


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wds")
    manifest = write_scenes(folder / "input", SCENES)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    run(
        load_spec(JOB_SPEC, overrides=[f"input.manifest={manifest}", f"output.uri={folder / 'by-uri'}", *METHODS]),
        progress=lambda line: None,
    )
    names = _write_shards(rows, folder / "shards")
    overrides = [
        f"input.manifest={folder / 'shards'}",
        f"output.uri={folder / 'wds'}",
        "output.overwrite=false",
        "output.shard_rows=2",  # shards inside each tar: reads seek to the counted offsets
        "run.max_error_fraction=0.9",
        *METHODS,
    ]
    result = run(load_spec(JOB_SPEC, overrides=overrides), progress=lambda line: None)
    return folder, names, result, overrides


def test_samples_become_rows_and_bad_samples_error_rows(runs):
    folder, names, result, _ = runs
    # 2 samples in shard-0000, 4 in shard-0001, 1 and the truncation in shard-0002
    assert result.total == 8 and result.processed == 8
    want = {(r["image_id"], r["method"]): r["label_map"] for r in _read(folder / "by-uri", "labels")}
    got = {(r["image_id"], r["method"]): r["label_map"] for r in _read(folder / "wds", "labels")}
    assert set(got) == {(i, m) for i in names for m in ("maskclip", "gem")}
    for (image_id, method), label_map in got.items():
        assert label_map == want[(names[image_id], method)]
    errors = {e["image_id"]: e for e in _read(folder / "wds", "errors")}
    assert errors["shard-0001/000100"]["stage"] == "decode"
    assert "image bytes of shard-0001/000100" in errors["shard-0001/000100"]["message"]
    bad_json = errors["shard-0001/000101"]
    assert (bad_json["stage"], bad_json["error_type"]) == ("manifest", "MalformedRow")
    assert "000101.json" in bad_json["message"] and "shard-0001" in bad_json["message"]
    assert errors["shard-0001/000102"]["error_type"] == "MissingImage"
    cut = errors["shard-0002/000201"]
    assert (cut["stage"], cut["error_type"]) == ("manifest", "TruncatedTar")
    assert "shard-0002.tar" in cut["message"] and "unexpected end of data" in cut["message"]


def test_resume_keeps_every_finished_shard(runs):
    folder, _, result, overrides = runs
    again = run(load_spec(JOB_SPEC, overrides=overrides), progress=lambda line: None)
    assert again.kept_images == result.total and again.attempt_images == 0


def test_a_shard_read_from_its_offset_equals_a_read_from_the_start(runs):
    folder = runs[0]
    path = folder / "shards" / "shard-0001.tar"
    f = ManifestFile(str(path), "shard-0001.tar", "webdataset", False, path.stat().st_size, "x")
    count = count_file(f, 2, {})
    assert count.rows == 4 and len(count.offsets) == 2 and count.flags["masks"]
    seeked = read_rows(f, None, count.offsets[1], 0, 2, 2, {})
    scanned = read_rows(f, None, None, 2, 2, 2, {})
    assert seeked.table.equals(scanned.table) and seeked.digest == scanned.digest
    assert seeked.table["image_id"].to_pylist() == ["shard-0001/000102", "shard-0001/000103"]
    assert seeked.images.to_pylist()[0] is None and seeked.images.to_pylist()[1][:2] == b"\xff\xd8"


def test_legrad_heatmaps_prompted_by_the_captions(ray_local, tmp_path):
    """img2dataset's layout (``{key}.jpg``, ``{key}.txt``, ``{key}.json`` with ``caption``): with ``prompts:
    caption`` each sample's caption (stripped; from the JSON when there is no ``.txt``) is its one prompt, and the
    JSON's own ``prompts`` are not read; a re-run with the default source is refused naming the field."""
    rows = [json.loads(line) for line in write_scenes(tmp_path / "input", SCENES).read_text().splitlines()]
    (tmp_path / "shards").mkdir()
    captions = {}
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for k, r in enumerate(rows):
            key, caption = f"{k:09d}", r["prompts"][0]
            _add(tar, f"{key}.jpg", Path(r["image_uri"].removeprefix("file://")).read_bytes())
            if k < 2:
                _add(tar, f"{key}.txt", f"  {caption}\n".encode())
            meta = {"key": key, "status": "success", "caption": caption if k == 2 else "not read", "prompts": ["no"]}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            captions[f"00000/{key}"] = caption
    sets = [
        f"input.manifest={tmp_path / 'shards'}",
        "input.format=webdataset",
        f"output.uri={tmp_path / 'out'}",
        "output.overwrite=false",
        "methods.legrad.prompts=manifest",
        *[f"methods.{m}=null" for m in ("maskclip", "gem", "maskinversion")],
    ]
    result = run(load_spec(JOB_SPEC, overrides=[*sets, "input.webdataset.prompts=caption"]), progress=lambda line: None)
    assert result.ok and result.processed == SCENES
    heatmaps = {(h["image_id"], h["prompt"]) for h in _read(tmp_path / "out", "heatmaps")}
    assert heatmaps == set(captions.items())
    with pytest.raises(OutputConflict) as info:
        run(load_spec(JOB_SPEC, overrides=sets), progress=lambda line: None)
    assert 'methods.legrad.input.webdataset.prompts: "caption" → "json:prompts"' in str(info.value)
