"""``input.uri`` without Ray: brace expansion, the manifest root of lists and patterns (stable when a range grows),
refusals (missing entries, mixed stores, a DatasetDict without a split), the spec's two names for the input, and
``datasets`` save_to_disk folders (listing, Arrow stream counting with record-batch offsets, reading a shard)."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmaps.pipeline import uris
from clipmaps.pipeline.hfdatasets import count_stream, read_stream_rows
from clipmaps.pipeline.manifests import FileCount, count_file, list_manifest_files, read_rows, sample_count
from clipmaps.pipeline.shards import seek_for
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.schemas.errors import ManifestError
from tests.helpers.specs import JOB_SPEC

datasets = pytest.importorskip("datasets")


def _tar(path, keys=("000000",)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("jpg", b"\xff\xd8" + key.encode()), ("json", b'{"prompts": ["cat"]}')):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ expansion
def test_brace_patterns_expand_as_webdataset_does():
    assert uris.expand("s/shard-{0000..0002}.tar") == ["s/shard-0000.tar", "s/shard-0001.tar", "s/shard-0002.tar"]
    assert uris.expand("s3://b/{train,val}/x.parquet") == ["s3://b/train/x.parquet", "s3://b/val/x.parquet"]
    assert uris.expand("a{1..5..2}") == ["a1", "a3", "a5"]
    assert uris.expand("plain/path.tar") == ["plain/path.tar"]
    assert uris.expand(r"lit\{x,y\}") == ["lit{x,y}"]
    assert not uris.is_pattern("x/{a}.tar") and uris.is_pattern("x/{a,b}.tar")
    with pytest.raises(ValueError, match="not a valid brace pattern"):
        uris.expand("s3://b/{0..3.tar")
    with pytest.raises(ValueError, match="more than 10 entries"):
        uris.expand("{0..99}", limit=10)


def test_the_root_is_the_common_folder_of_what_the_entries_fix():
    assert uris.fixed_prefix("b/shards/shard-{0..9}.tar") == "b/shards/shard-"
    assert uris.entry_folder("b/shards/shard-{0..9}.tar", kind="pattern") == "b/shards"
    assert uris.entry_folder("b/{x,y}/part-*.jsonl", kind="pattern") == "b"
    assert uris.entry_folder("b/x/one.parquet", kind="file") == "b/x"
    assert uris.entry_folder("/data/ds/", kind="folder") == "/data/ds"
    assert uris.common_folder(["b/x/y", "b/x/z", "b/x"]) == "b/x"
    assert uris.common_folder(["/a/b", "/c"]) == "/"
    assert uris.relative("/a/b/c.tar", "/a") == "b/c.tar" and uris.relative("/a/c.tar", "/") == "a/c.tar"


def test_one_input_lives_in_one_store():
    assert uris.mixed_store_problem(["s3://b/x.tar", "s3://b/y/{0..3}.tar", "s3a://b/z.tar"]) is None
    assert uris.mixed_store_problem(["/local/a.parquet", "file:///local/b.parquet"]) is None
    schemes = uris.mixed_store_problem(["s3://k:SECRETX@b/x.tar", "gs://c/y.tar"])
    assert "different schemes" in schemes and "'gs://c/y.tar'" in schemes and "SECRETX" not in schemes
    assert "different buckets" in uris.mixed_store_problem(["s3://b/x.tar", "s3://c/y.tar"])
    assert uris.describe(["s3://k:SECRETX@b/x.tar", "s3://b/y.tar", "s3://b/z.tar"]) == "s3://***@b/x.tar and 2 more"
    assert uris.describe("s3://b/shard-{0..9}.tar") == "s3://b/shard-{0..9}.tar"


# ------------------------------------------------------------------------------------------------ listing
def test_growing_a_brace_range_keeps_every_recorded_path(tmp_path):
    for i in range(3):
        _tar(tmp_path / "shards" / f"shard-{i:04d}.tar")
    root, two = list_manifest_files(str(tmp_path / "shards" / "shard-{0000..0001}.tar"), {})
    _, three = list_manifest_files(str(tmp_path / "shards" / "shard-{0000..0002}.tar"), {})
    assert root == str(tmp_path / "shards")
    assert [f.rel for f in two] == ["shard-0000.tar", "shard-0001.tar"]
    assert [f.rel for f in three] == ["shard-0000.tar", "shard-0001.tar", "shard-0002.tar"]
    assert [f.identity for f in two] == [f.identity for f in three[:2]] and {f.format for f in three} == {"webdataset"}
    # a range that names one file is still a pattern: recorded by its name, so growing it later keeps it
    assert [f.rel for f in list_manifest_files(str(tmp_path / "shards" / "shard-{0000..0000}.tar"), {})[1]] == [
        "shard-0000.tar"
    ]


def test_lists_record_paths_below_their_common_folder(tmp_path):
    for name in ("a/one.tar", "b/two.tar"):
        _tar(tmp_path / name)
    single = str(tmp_path / "a" / "one.tar")
    assert [f.rel for f in list_manifest_files(single, {})[1]] == [""]  # one plain file: movable, as before
    assert [f.rel for f in list_manifest_files([single], {})[1]] == ["one.tar"]  # a list: its parent folder
    root, files = list_manifest_files([str(tmp_path / "b" / "two.tar"), single], {})
    assert root == str(tmp_path) and [f.rel for f in files] == ["a/one.tar", "b/two.tar"]  # path order
    # a folder entry and a file inside it: the file is read once
    _, files = list_manifest_files([str(tmp_path / "a"), single], {})
    assert [f.rel for f in files] == ["one.tar"]


def test_an_entry_outside_the_common_folder_moves_the_root_and_resume_refuses(tmp_path):
    from clipmaps.pipeline.shards import assign_shards

    for name in ("a/one.tar", "a/two.tar", "b/three.tar"):
        _tar(tmp_path / name)
    _, before = list_manifest_files([str(tmp_path / "a" / "one.tar")], {})
    marker = {0: {"file": before[0].rel, "start": 0, "rows": 1, "identity": before[0].identity}}
    _, beside = list_manifest_files([str(tmp_path / "a" / "one.tar"), str(tmp_path / "a" / "two.tar")], {})
    kept = assign_shards(beside, [1, 1], marker, 64)
    assert not kept.conflicts and [s.file for s in kept.todo] == [1]  # a file added beside: one new shard
    _, moved = list_manifest_files([str(tmp_path / "a" / "one.tar"), str(tmp_path / "b" / "three.tar")], {})
    assert [f.rel for f in moved] == ["a/one.tar", "b/three.tar"]
    assert "the input's root folder moved up" in assign_shards(moved, [1, 1], marker, 64).conflicts[0]


def test_many_files_of_one_folder_are_found_by_one_listing(tmp_path):
    names = [f"s-{i:03d}.tar" for i in range(40)]
    for name in names:
        _tar(tmp_path / name)
    _, files = list_manifest_files(str(tmp_path / "s-{000..039}.tar"), {})
    assert [f.rel for f in files] == names
    _, few = list_manifest_files([str(tmp_path / n) for n in names[:3]], {})
    assert [f.identity for f in few] == [f.identity for f in files[:3]]


def test_missing_entries_are_refused_together(tmp_path):
    _tar(tmp_path / "shard-0001.tar")
    with pytest.raises(ManifestError, match=r"^8 of 9 entries of input .*shard-\{0000..0008\}.tar do not exist: ") as e:
        list_manifest_files(str(tmp_path / "shard-{0000..0008}.tar"), {})
    assert "shard-0000.tar" in str(e.value) and "shard-0005.tar" in str(e.value) and "shard-0006" not in str(e.value)
    with pytest.raises(ManifestError, match=r"1 of 2 entries .* do not exist: .*gone\.parquet$"):
        list_manifest_files([str(tmp_path / "shard-0001.tar"), str(tmp_path / "gone.parquet")], {})
    with pytest.raises(ManifestError, match="different schemes"):
        list_manifest_files([str(tmp_path / "shard-0001.tar"), "s3://b/x.tar"], {})
    with pytest.raises(ManifestError, match="file not found"):  # one plain path: the message it always had
        list_manifest_files(str(tmp_path / "gone.parquet"), {})


def test_an_existing_path_with_braces_is_taken_literally(tmp_path):
    _tar(tmp_path / "odd{a,b}.tar")
    _, files = list_manifest_files(str(tmp_path / "odd{a,b}.tar"), {})
    assert [f.uri for f in files] == [str(tmp_path / "odd{a,b}.tar")]


# ------------------------------------------------------------------------------------------------ the spec
def test_the_spec_takes_uri_or_its_older_name_manifest():
    spec = load_spec(JOB_SPEC, overrides=["input.uri=[s3://b/x/a.parquet, s3://b/y/b.parquet]"])
    assert spec.input.uri == ("s3://b/x/a.parquet", "s3://b/y/b.parquet") and spec.input.manifest is None
    assert spec.input.shown == "s3://b/x/a.parquet and 1 more"
    assert "manifest" not in spec.to_dict()["input"] and load_spec(spec.to_dict()).input.uri == spec.input.uri
    old = load_spec(JOB_SPEC, overrides=["input.manifest=s3://b/shards/{0000..0003}.tar"])
    assert old.input.uri == "s3://b/shards/{0000..0003}.tar" and old.input.manifest_format == "webdataset"
    raw = old.to_dict()
    raw["input"]["manifest"] = "other.parquet"
    with pytest.raises(SpecError, match=r"input.uri: give input.uri or input.manifest \(its older name\), not both"):
        load_spec(raw)
    with pytest.raises(SpecError, match="input.uri: the entries name different buckets"):
        load_spec(JOB_SPEC, overrides=["input.uri=[s3://b/a.parquet, s3://c/b.parquet]"])
    with pytest.raises(SpecError, match=r"input.uri\[1\]: must be a non-empty path or URI"):
        load_spec(JOB_SPEC, overrides=["input.uri=[a.parquet, 3]"])
    with pytest.raises(SpecError, match="input.uri: 's3://b/{0..3.tar' is not a valid brace pattern"):
        load_spec(JOB_SPEC, overrides=["input.uri=s3://b/{0..3.tar"])
    with pytest.raises(SpecError, match="input.split: selects a split of a datasets DatasetDict"):
        load_spec(JOB_SPEC, overrides=["input.uri=s3://b/ds", "input.split=train", "input.format=parquet"])
    with pytest.raises(SpecError, match="'out/shard-0000.tar' overlap"):  # every expansion is checked
        load_spec(JOB_SPEC, overrides=["input.uri=[in/a.tar, '{in,out}/shard-{0000..0001}.tar']", "output.uri=out"])
    for fmt in ("manifest", "arrow", "webdataset", "parquet", "jsonl", "csv", "auto"):
        assert load_spec(JOB_SPEC, overrides=[f"input.format={fmt}"]).input.format == fmt


def test_editors_see_one_of_uri_and_manifest():
    import jsonschema

    from clipmaps.pipeline.spec import json_schema

    validator = jsonschema.Draft202012Validator(json_schema())
    raw = load_spec(JOB_SPEC).to_dict()
    assert "uri" in raw["input"] and not list(validator.iter_errors(raw))
    raw["input"]["uri"] = ["s3://b/a.tar", "s3://b/shard-{0..3}.tar"]
    assert not list(validator.iter_errors(raw))
    assert list(validator.iter_errors({**raw, "input": {**raw["input"], "manifest": "x.parquet"}}))  # both
    assert list(validator.iter_errors({**raw, "input": {"format": "auto"}}))  # neither


# ------------------------------------------------------------------------------------------------ save_to_disk
def _image_ds(ids: list[str]):
    images = [{"bytes": b"\x89PNG fake " + i.encode(), "path": None} for i in ids]
    ds = datasets.Dataset.from_dict({"image_id": ids, "image": images, "label": list(range(len(ids)))})
    return ds.cast_column("image", datasets.Image(decode=False))


def test_a_save_to_disk_folder_is_its_data_files(tmp_path):
    _image_ds([f"im{i}" for i in range(5)]).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    root, files = list_manifest_files(str(tmp_path / "ds"), {})
    assert root == str(tmp_path / "ds") and {f.format for f in files} == {"arrow"}
    assert [f.rel for f in files] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    counts = [count_file(f, 2, {}) for f in files]
    assert [c.rows for c in counts] == [3, 2] and not counts[0].flags["masks"]
    assert sample_count(files[0], 2, {}).rows == 3
    got = read_rows(files[0], None, *_seek(counts[0], 2, 2), 2, 1, {})
    assert got.table["image_id"].to_pylist() == ["im2"] and got.images.to_pylist() == [b"\x89PNG fake im2"]
    again = read_rows(files[0], None, None, 2, 2, 1, {})
    assert again.digest == got.digest and again.table.equals(got.table)
    other = _image_ds(["im0", "im1", "imX"])  # the same ids, one image changed: the digest sees it
    other.save_to_disk(str(tmp_path / "other"))
    (changed,) = list_manifest_files(str(tmp_path / "other"), {})[1]
    assert read_rows(changed, None, None, 2, 2, 1, {}).digest != got.digest


def _seek(count: FileCount, start: int, shard_rows: int) -> tuple:
    s = seek_for(count, start, shard_rows)
    return s.offset, s.skip


def test_a_dataset_dict_needs_its_split(tmp_path):
    dd = datasets.DatasetDict({"train": _image_ds(["a", "b"]), "test": _image_ds(["c"])})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ManifestError, match=r"DatasetDict with splits train, test: choose one with input.split"):
        list_manifest_files(str(tmp_path / "dd"), {})
    with pytest.raises(ManifestError, match=r"has no split 'val' \(its splits: train, test\)"):
        list_manifest_files(str(tmp_path / "dd"), {}, split="val")
    root, files = list_manifest_files(str(tmp_path / "dd"), {}, split="test")
    assert root == str(tmp_path / "dd" / "test") and [f.rel for f in files] == ["data-00000-of-00001.arrow"]
    pointed = list_manifest_files(str(tmp_path / "dd" / "test"), {})  # the URI pointing into the split folder
    assert pointed[0] == root and [f.rel for f in pointed[1]] == ["data-00000-of-00001.arrow"]
    with pytest.raises(ManifestError, match=r"is the split 'test' of a DatasetDict, but input.split is 'train'"):
        list_manifest_files(str(tmp_path / "dd" / "test"), {}, split="train")
    _tar(tmp_path / "x.tar")
    with pytest.raises(ManifestError, match="input.split is 'train', but input .* is not a datasets folder"):
        list_manifest_files(str(tmp_path / "x.tar"), {}, split="train")


def test_a_dataset_without_image_id_is_refused_with_the_fix(tmp_path):
    _image_ds(["a"]).rename_column("image_id", "name").save_to_disk(str(tmp_path / "noid"))
    (f,) = list_manifest_files(str(tmp_path / "noid"), {})[1]
    with pytest.raises(ManifestError, match=r"has no image_id column \(it has: name, image, label\).*with_indices"):
        count_file(f, 4, {})


def test_stream_offsets_point_at_record_batches(tmp_path):
    table = pa.table({"image_id": [str(i) for i in range(23)]}, schema=pa.schema([("image_id", pa.string())]))
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
    stream = io.BytesIO(sink.getvalue())
    count = count_stream(stream, 5)
    assert count.rows == 23 and count.offset_rows == [0, 0, 7, 14, 14]
    for start in range(0, 23, 3):
        seek = seek_for(FileCount(rows=23, offsets=count.offsets, offset_rows=count.offset_rows), start, 5)
        got = read_stream_rows(stream, seek.offset, seek.skip, 4, ["image_id"])
        assert got["image_id"].to_pylist() == [str(i) for i in range(start, min(23, start + 4))]
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        count_stream(io.BytesIO(b"PAR1" + json.dumps({"x": 1}).encode()), 5)


def test_outputs_read_back_the_input_of_a_list_or_pattern(tmp_path):
    from clipmaps.jobs.outputs import JobOutputs

    schema = pa.schema([("image_id", pa.string()), ("image_uri", pa.string())])
    for name, rows in (("a", [("a1", "/i/a1.jpg")]), ("b", [("b1", "/i/b1.jpg"), ("a1", "/i/again.jpg")])):
        table = pa.Table.from_pylist([{"image_id": i, "image_uri": u} for i, u in rows], schema=schema)
        pq.write_table(table, tmp_path / f"part-{name}.parquet")
    (tmp_path / "part-c.jsonl").write_text(json.dumps({"image_id": "c1", "image_uri": "/i/c1.jpg"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    entries = [str(tmp_path / "part-{a,b}.parquet"), str(tmp_path / "part-c.jsonl")]
    (out / "_job.json").write_text(json.dumps({"spec": {"input": {"uri": entries}}}))
    outputs = JobOutputs(str(out))
    assert outputs.manifest_uri == entries[0]  # one string for messages and the files beside the input
    assert outputs.image_uri_map() == {"a1": "/i/a1.jpg", "b1": "/i/b1.jpg", "c1": "/i/c1.jpg"}
    (out / "_job.json").write_text(json.dumps({"spec": {"input": {"uri": entries[0]}}}))
    assert JobOutputs(str(out)).manifest(["image_id"], image_ids=["b1"]).to_pylist() == [{"image_id": "b1"}]


def test_a_huge_range_is_refused_before_anything_is_expanded():
    """braceexpand builds a range whole: a typo's extra digits (1e9 strings) filled 24 GB before the cap applied."""
    import time

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="more than 1,000,000 entries"):
        uris.expand("s3://b/shards/{0..999999999}.tar")
    with pytest.raises(ValueError, match="more than 1,000,000 entries"):
        uris.expand("s3://b/{0..9999}/{0..9999}.tar")  # two ranges: the product counts
    assert time.monotonic() - t0 < 1.0
    assert uris.range_bound("s-{0000..0099}-{0..90..10}.tar") == 100 * 10 and uris.range_bound(r"lit\{0..9}.tar") == 1
