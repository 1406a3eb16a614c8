"""``input.uri`` forms on real local Ray with MaskCLIP alone (the input is what is tested): a brace pattern of
WebDataset tars on S3 (SeaweedFS) whose range grows — the re-run keeps the finished shards and processes the new tar
only —, a list of two Parquet files in different folders, a ``datasets`` folder written by ``save_to_disk`` (Arrow
stream files) and the split of a DatasetDict, whose label maps equal the list's for the same images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from clipmaps.jobs.demo import write_scenes
from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from tests.helpers.specs import JOB_SPEC

datasets = pytest.importorskip("datasets")

SCENES = 3
#: MaskCLIP's label maps only: one pool keeps each run short
METHODS = ("methods.gem=null", "methods.legrad=null", "methods.maskinversion=null", "output.overwrite=false")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[dict]:
    manifest = write_scenes(tmp_path_factory.mktemp("scenes") / "input", SCENES)
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _image(row: dict) -> bytes:
    return Path(row["image_uri"].removeprefix("file://")).read_bytes()


def _tar(row: dict) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("000000.jpg", _image(row)), ("000000.json", json.dumps({"prompts": row["prompts"]}))):
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _labels(out) -> dict[str, bytes]:
    table = pads.dataset(Path(out) / "labels", format="parquet").to_table(columns=["image_id", "label_map"])
    return dict(zip(table["image_id"].to_pylist(), table["label_map"].to_pylist()))


def _markers(out) -> set[str]:
    return {json.loads(p.read_text())["file"] for p in (Path(out) / "_shards").glob("*.json")}


def test_a_brace_range_on_s3_grows_and_the_rerun_processes_only_the_new_tar(ray_local, s3, scenes, tmp_path):
    fs = s3.filesystem()
    root = f"{s3.bucket}/uris/shards"
    for i in range(2):
        fs.pipe(f"{root}/shard-{i:04d}.tar", _tar(scenes[i]))
    out = tmp_path / "out"
    opts = json.dumps(s3.storage_options)

    def overrides(last: int) -> list[str]:
        uri = f"s3://{root}/shard-{{0000..{last:04d}}}.tar"
        return [f"input.uri={uri}", f"input.storage_options={opts}", f"output.uri={out}", *METHODS]

    first = run(load_spec(JOB_SPEC, overrides=overrides(1)), progress=lambda line: None)
    assert first.ok and first.total == 2 and first.processed == 2
    fs.pipe(f"{root}/shard-0002.tar", _tar(scenes[2]))
    grown = run(load_spec(JOB_SPEC, overrides=overrides(2)), progress=lambda line: None)
    assert grown.ok and grown.total == 3 and grown.kept_images == 2 and grown.attempt_images == 1
    assert set(_labels(out)) == {f"shard-{i:04d}/000000" for i in range(3)}
    assert _markers(out) == {f"shard-{i:04d}.tar" for i in range(3)}  # relative to the range's folder
    job = json.loads((out / "_job.json").read_text())
    assert job["spec"]["input"]["uri"] == f"s3://{root}/shard-{{0000..0002}}.tar"


@pytest.fixture(scope="module")
def two_parquet_files(ray_local, scenes, tmp_path_factory):
    """A list of two Parquet manifests in different folders: two rows by URI, one with the image inside."""
    folder = tmp_path_factory.mktemp("lists")
    by_uri = pa.schema([("image_id", pa.string()), ("image_uri", pa.string()), ("prompts", pa.list_(pa.string()))])
    inline = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("prompts", pa.list_(pa.string()))])
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    pq.write_table(
        pa.Table.from_pylist([{k: r[k] for k in by_uri.names} for r in scenes[:2]], schema=by_uri),
        folder / "a" / "part.parquet",
    )
    row = scenes[2]
    pq.write_table(
        pa.Table.from_pylist([{"image_id": row["image_id"], "image": _image(row), "prompts": row["prompts"]}], inline),
        folder / "b" / "part.parquet",
    )
    out = folder / "out"
    uri = json.dumps([str(folder / "a" / "part.parquet"), str(folder / "b" / "part.parquet")])
    result = run(
        load_spec(JOB_SPEC, overrides=[f"input.uri={uri}", f"output.uri={out}", *METHODS]), progress=lambda line: None
    )
    return result, out


def test_a_list_of_two_parquet_files(two_parquet_files, scenes):
    result, out = two_parquet_files
    assert result.ok and result.total == SCENES and result.processed == SCENES
    assert set(_labels(out)) == {r["image_id"] for r in scenes}
    assert _markers(out) == {"a/part.parquet", "b/part.parquet"}  # below the entries' common folder


def _dataset(rows: list[dict]):
    """The rows as a ``datasets`` dataset with an ``Image`` feature holding the files' bytes."""
    ds = datasets.Dataset.from_dict(
        {
            "image_id": [r["image_id"] for r in rows],
            "image": [{"bytes": _image(r), "path": None} for r in rows],
            "prompts": [r["prompts"] for r in rows],
            "label": list(range(len(rows))),  # a column clipmaps does not read
        }
    )
    return ds.cast_column("image", datasets.Image())


def test_a_saved_dataset_folder(two_parquet_files, scenes, tmp_path):
    folder = tmp_path / "ds"
    _dataset(scenes[2:]).save_to_disk(str(folder))
    out = tmp_path / "out"
    spec = load_spec(JOB_SPEC, overrides=[f"input.uri={folder}", f"output.uri={out}", *METHODS])
    result = run(spec, progress=lambda line: None)
    assert result.ok and result.total == 1 and result.processed == 1
    image_id = scenes[2]["image_id"]
    assert _labels(out) == {image_id: _labels(two_parquet_files[1])[image_id]}  # Parquet's bytes there


def test_the_split_of_a_saved_dataset_dict(two_parquet_files, scenes, tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": _dataset(scenes[:2]), "test": _dataset(scenes[2:])}).save_to_disk(
        str(folder), num_shards={"train": 2, "test": 1}
    )
    out = tmp_path / "out"
    overrides = [f"input.uri={folder}", "input.split=train", f"output.uri={out}", *METHODS]
    result = run(load_spec(JOB_SPEC, overrides=overrides), progress=lambda line: None)
    assert result.ok and result.total == 2 and result.processed == 2
    assert _markers(out) == {"data-00000-of-00002.arrow", "data-00001-of-00002.arrow"}
    want = _labels(two_parquet_files[1])
    got = _labels(out)
    assert set(got) == {r["image_id"] for r in scenes[:2]}
    assert all(got[i] == want[i] for i in got)  # the same images read from Arrow streams: the same label maps
