"""WebDataset tar reading without Ray: member keys, sample grouping, a file that is not a tar; ``input.webdataset``
(prompts from the caption or a JSON field of choice, masks from a field of choice, wrong types as error rows)."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import pytest

from clipmaps.pipeline.manifests import ManifestFile, count_file, file_format, read_rows
from clipmaps.pipeline.webdataset import SampleFields, shard_name, split_member
from clipmaps.schemas.errors import ManifestError


def test_keys_end_at_the_basename_first_dot():
    assert split_member("a/b.c/000123.seg.png") == ("a/b.c/000123", "seg.png")
    assert split_member("000123.JPG") == ("000123", "jpg")
    assert shard_name("sub/shard-01.tar", "s3://x/sub/shard-01.tar") == "sub/shard-01"
    assert shard_name("", "s3://x/sub/shard-01.tar?v=1") == "shard-01"
    assert file_format("x/shard-01.tar") == ("webdataset", False)


def test_members_group_into_samples_and_a_non_tar_is_refused(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k1.jpg", b"\xff\xd8a"), ("k1.json", b'{"prompts": "cat"}'), ("k2.webp", b"RIFF")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    f = ManifestFile(str(path), "", "webdataset", False, path.stat().st_size, "x")
    count = count_file(f, 10, {})
    assert count.rows == 2 and count.flags["prompts"] and not count.flags["masks"]
    got = read_rows(f, None, None, 0, 0, 2, {})
    assert got.table["image_id"].to_pylist() == ["s/k1", "s/k2"]
    assert got.table["prompts"].to_pylist() == [["cat"], None]
    assert got.images.to_pylist() == [b"\xff\xd8a", b"RIFF"]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ManifestError, match="bad.tar"):
        count_file(ManifestFile(str(bad), "", "webdataset", False, 1600, "x"), 10, {})


def test_a_folder_of_img2dataset_output_lists_only_its_tars(tmp_path):
    from clipmaps.pipeline.manifests import list_manifest_files

    for name in ("00000.tar", "00000.parquet", "00000_stats.json", "00001.tar"):
        (tmp_path / name).write_bytes(b"x" * 10)
    _, files = list_manifest_files(str(tmp_path), {}, "webdataset")
    assert [f.rel for f in files] == ["00000.tar", "00001.tar"]
    assert {f.format for f in files} == {"webdataset"}


# ------------------------------------------------------------------------------------------------ input.webdataset


def _tar(path, members) -> ManifestFile:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ManifestFile(str(path), "", "webdataset", False, path.stat().st_size, "x")


RLE = {"region_id": "r", "rle": {"size": [2, 2], "counts": "04"}}
#: img2dataset's layout: a caption in {key}.txt and in the JSON's caption field, beside the JSON's own fields
SAMPLES = [
    ("a.jpg", b"\xff\xd8a"),
    ("a.txt", b"  a red circle \n"),
    ("a.json", json.dumps({"caption": "ignored: the .txt wins", "tags": ["x", "y"], "prompts": ["p"]}).encode()),
    ("b.jpg", b"\xff\xd8b"),
    ("b.json", json.dumps({"caption": " from the json ", "tags": "one tag", "segments": [RLE]}).encode()),
    ("c.jpg", b"\xff\xd8c"),
    ("c.txt", b" \n"),  # an empty caption: no prompts
    ("c.json", json.dumps({"tags": None}).encode()),
]


def _read(f, fields, rows=3):
    return read_rows(replace(f, webdataset=fields), None, None, 0, 0, rows, {})


def test_prompts_from_the_caption(tmp_path):
    f = _tar(tmp_path / "s.tar", SAMPLES)
    caption = SampleFields(prompts="caption")
    got = _read(f, caption)
    assert not got.problems
    assert got.table["prompts"].to_pylist() == [["a red circle"], ["from the json"], None]
    assert got.table["masks"].to_pylist() == [None, None, None]
    assert count_file(replace(f, webdataset=caption), 10, {}).flags == {
        "prompts": True, "masks": False, "masks_uri": False}  # fmt: skip
    empty = _tar(tmp_path / "e.tar", [("c.jpg", b"\xff\xd8c"), ("c.txt", b"   ")])
    assert not count_file(replace(empty, webdataset=caption), 10, {}).flags["prompts"]


def test_prompts_and_masks_from_fields_of_choice(tmp_path):
    f = _tar(tmp_path / "s.tar", SAMPLES)
    fields = SampleFields(prompts="json:tags", masks="segments")
    got = _read(f, fields)
    assert not got.problems
    assert got.table["prompts"].to_pylist() == [["x", "y"], ["one tag"], None]  # a string is one prompt
    masks = got.table["masks"].to_pylist()
    assert masks[0] is None and masks[2] is None and masks[1][0]["rle"] == {"size": [2, 2], "counts": "04"}
    assert count_file(replace(f, webdataset=fields), 10, {}).flags == {
        "prompts": True, "masks": True, "masks_uri": False}  # fmt: skip
    # the defaults read {key}.json's prompts and masks; none reads no prompts at all
    assert _read(f, None).table["prompts"].to_pylist() == [["p"], None, None]
    none = SampleFields(prompts="none")
    assert _read(f, none).table["prompts"].to_pylist() == [None, None, None]
    assert count_file(replace(f, webdataset=none), 10, {}).flags == {
        "prompts": False, "masks": False, "masks_uri": False}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "meta", "named"),
    [
        (SampleFields(prompts="json:tags"), {"tags": 5}, "s-1/k2: k2.json field 'tags' (the prompts) must be a string "
                                                         "or a list of strings, got int 5"),
        (SampleFields(prompts="json:tags"), {"tags": ["a", 1]}, "k2.json field 'tags' (the prompts)"),
        (SampleFields(prompts="json:prompts"), {"prompts": {"a": 1}}, "k2.json field 'prompts' (the prompts)"),
        (SampleFields(prompts="caption"), {"caption": 3}, "k2.json field 'caption' (the caption) must be a string"),
        (SampleFields(masks="segments"), {"segments": {"rle": 1}}, "k2.json field 'segments' (the masks) must be a "
                                                                   "list of mask objects, got dict"),
    ],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_an_error_row_naming_shard_and_key(tmp_path, fields, meta, named):
    members = [("k1.jpg", b"\xff\xd81"), ("k1.json", b'{"tags": ["ok"], "caption": "ok", "prompts": "ok"}'),
               ("k2.jpg", b"\xff\xd82"), ("k2.json", json.dumps(meta).encode()),
               ("k3.jpg", b"\xff\xd83"), ("k3.txt", b"ok")]  # fmt: skip
    f = replace(_tar(tmp_path / "s-1.tar", members), webdataset=fields)
    got = read_rows(f, None, None, 0, 0, 3, {})
    assert list(got.problems) == [1]
    etype, message = got.problems[1]
    assert etype == "MalformedRow" and named in message, message
    assert got.table["image_id"].to_pylist() == ["s-1/k1", "s-1/k2", "s-1/k3"]  # the rest of the shard goes on
    assert got.images.to_pylist()[2] == b"\xff\xd83"


def test_a_caption_that_is_not_utf8_is_an_error_row(tmp_path):
    f = _tar(tmp_path / "s.tar", [("k.jpg", b"\xff\xd8"), ("k.txt", b"caf\xe9")])
    got = _read(f, SampleFields(prompts="caption"), rows=1)
    assert "sample s/k: k.txt is not UTF-8 text" in got.problems[0][1]
    assert not count_file(replace(f, webdataset=SampleFields(prompts="caption")), 10, {}).flags["prompts"]


def test_the_default_fields_are_the_json_prompts_and_masks(tmp_path):
    """Without the section, prompts and masks come from the sample JSON's ``prompts`` and ``masks`` (a string prompt
    is one prompt), as before the section existed."""
    f = _tar(tmp_path / "s.tar", SAMPLES + [("d.jpg", b"\xff\xd8d"), ("d.json", b'{"prompts": "cat", "masks": []}')])
    read = _read(f, None, rows=4)
    assert read.table["prompts"].to_pylist() == [["p"], None, None, ["cat"]]
    assert read.table["masks"].to_pylist()[3] == []


def test_the_section_is_refused_on_an_input_without_tar_shards(tmp_path):
    """Refused, not ignored: a job that expects caption prompts must not run on the manifest's own (it is checked
    when the files are listed, as ``format: auto`` decides a folder's format only then)."""
    from clipmaps.pipeline.plan import make_plan
    from clipmaps.pipeline.spec import load_spec
    from clipmaps.schemas.errors import SpecError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image_id": "a", "image_uri": "/nowhere/a.png", "prompts": ["x"]}) + "\n")
    raw = {"input": {"manifest": str(manifest), "webdataset": {"prompts": "caption"}},
           "output": {"uri": str(tmp_path / "out")}, "model": {"name": "clipmaps-tiny-vit", "seed": 0},
           "methods": {"legrad": {"size": 64}}}  # fmt: skip
    with pytest.raises(
        SpecError,
        match=r"input\.webdataset: is set, but the input holds no WebDataset tar shards "
        r"\(1 file\(s\) read as jsonl, e\.g\. '.*m\.jsonl'\)",
    ):
        make_plan(load_spec(raw), dry_run=True)


def test_a_plan_reads_the_tars_as_the_section_says(tmp_path):
    from clipmaps.pipeline.plan import make_plan
    from clipmaps.pipeline.spec import load_spec

    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "s.tar", SAMPLES)
    (tmp_path / "shards" / "s.parquet").write_bytes(b"img2dataset's sidecar")
    raw = {"input": {"manifest": str(tmp_path / "shards"), "format": "webdataset",
                     "webdataset": {"prompts": "caption"}},
           "output": {"uri": str(tmp_path / "out")}, "model": {"name": "clipmaps-tiny-vit", "seed": 0},
           "methods": {"legrad": {"size": 64}}}  # fmt: skip
    plan = make_plan(load_spec(raw), dry_run=True)
    assert [f.webdataset for f in plan.files] == [SampleFields(prompts="caption")]
    assert plan.prompt_sources == {"legrad": "manifest"}
    assert plan.fingerprint["methods"]["legrad"]["input"] == {"webdataset": {"prompts": "caption"}}
    raw["input"]["webdataset"] = {"prompts": "none"}
    with pytest.raises(Exception, match="methods.legrad.prompts"):  # no prompts, no vocabulary: refused by name
        make_plan(load_spec(raw), dry_run=True)


def test_a_bad_source_is_refused_at_load():
    from clipmaps.pipeline.spec import load_spec
    from clipmaps.schemas.errors import SpecError

    raw = {"input": {"manifest": "shards/", "format": "webdataset"}, "output": {"uri": "out"},
           "model": {"name": "clipmaps-tiny-vit", "seed": 0}, "methods": {"legrad": {}}}  # fmt: skip
    cases = {
        "input.webdataset.prompts=captions": "input.webdataset.prompts: 'captions' is not a prompt source: use "
        "json:<field> (a field of {key}.json), caption or none (did you mean 'caption'?)",
        "input.webdataset.prompts='json:'": "input.webdataset.prompts: 'json:' names no field",
        "input.webdataset.prompts=json: tags": "input.webdataset.prompts: is a mapping {json: ...}: write "
        "json:<field> with no space after the colon",
        "input.webdataset.masks=' segments'": "input.webdataset.masks: field name ' segments' has whitespace",
    }
    for override, message in cases.items():
        with pytest.raises(SpecError) as e:
            load_spec(raw, [override])
        assert message in str(e.value), override
    assert load_spec(raw, ["input.webdataset.prompts=json:tags"]).input.webdataset.prompts == "json:tags"
    with pytest.raises(ValueError, match="not a prompt source"):
        SampleFields(prompts="txt")


# ------------------------------------------------------------------------------------------------ truncated tars


def _cut_tar(tmp_path, name, cut) -> tuple[ManifestFile, dict[str, int]]:
    """A tar of samples k0…k5 (an image and a JSON each) cut to its first ``cut(headers)`` bytes; the member header
    offsets by name."""
    path = tmp_path / name
    members = []
    for k in range(6):
        members += [(f"k{k}.jpg", b"\xff\xd8" + bytes(3000)), (f"k{k}.json", json.dumps({"prompts": f"p{k}"}).encode())]
    _tar(path, members)
    with tarfile.open(path) as tar:
        headers = {m.name: m.offset for m in tar.getmembers()}
    path.write_bytes(path.read_bytes()[: cut(headers)])
    return ManifestFile(str(path), name, "webdataset", False, path.stat().st_size, "x"), headers


def _read_shards(f, count):
    """Every row of ``f`` read shard by shard (2 rows each) from the counted offsets, as the driver reads them."""
    ids, problems, digests = [], {}, []
    for n, start in enumerate(range(0, count.rows, 2)):
        rows = min(2, count.rows - start)
        got = read_rows(f, None, count.offsets[n], 0, start, rows, {})
        assert got.table.num_rows == rows
        ids += got.table["image_id"].to_pylist()
        problems.update({start + i: p for i, p in got.problems.items()})
        digests.append(got.digest)
        assert read_rows(f, None, count.offsets[n], 0, start, rows, {}).digest == got.digest  # deterministic
    return ids, problems, digests


@pytest.mark.parametrize(
    ("cut", "error_row", "at"),
    [
        # at a member-header boundary: tarfile reads a shorter archive; k3's JSON is cut off with the rest
        (lambda h: h["k3.json"], 3, "no end-of-archive marker"),
        # inside a member's data: tarfile raises ReadError (unexpected end of data)
        (lambda h: h["k4.jpg"] + 512 + 1000, 4, "ReadError: unexpected end of data in member 'k4.jpg'"),
    ],
    ids=["header-boundary", "mid-data"],
)
def test_a_truncated_tar_is_its_complete_samples_and_one_error_row(tmp_path, cut, error_row, at):
    f, headers = _cut_tar(tmp_path, "cut.tar", cut)
    count = count_file(f, 2, {})
    assert count.rows == error_row + 1  # the complete samples, then one row for the truncation
    assert count.flags["prompts"]
    ids, problems, _ = _read_shards(f, count)
    assert ids == [f"cut/k{k}" for k in range(error_row + 1)]  # the error row keeps the cut sample's id
    assert list(problems) == [error_row]
    etype, message = problems[error_row]
    assert etype == "TruncatedTar"
    assert message.startswith(f"manifest {f.uri} row {error_row}: the tar is truncated at byte {f.size} ")
    assert at in message
    assert f"sample cut/k{error_row} (header at byte {headers[f'k{error_row}.jpg']}" in message
    whole = read_rows(f, None, None, 0, 0, count.rows, {})  # one read from the start: the same rows
    assert whole.table["image_id"].to_pylist() == ids
    assert whole.table["prompts"].to_pylist()[:error_row] == [[f"p{k}"] for k in range(error_row)]
    assert whole.images.to_pylist()[error_row] is None
    assert whole.problems == {error_row: (etype, message)}


def test_a_tar_cut_in_its_end_marker_or_at_its_first_header(tmp_path):
    # the members whole and one zero block of the end-of-archive marker: nothing is lost
    f, headers = _cut_tar(tmp_path, "end.tar", lambda h: h["k5.json"] + 1024 + 512)
    count = count_file(f, 2, {})
    ids, problems, _ = _read_shards(f, count)
    assert count.rows == 6 and not problems and ids[-1] == "end/k5"
    # cut inside the first member: one error row and no sample
    f, _ = _cut_tar(tmp_path, "first.tar", lambda h: 700)
    count = count_file(f, 2, {})
    assert (count.rows, count.offsets) == (1, [0])
    _, problems, _ = _read_shards(f, count)
    assert problems[0][0] == "TruncatedTar" and "sample first/k0" in problems[0][1]
    # cut inside the first header: not a tar (the file is refused, as before)
    f, _ = _cut_tar(tmp_path, "header.tar", lambda h: 100)
    with pytest.raises(ManifestError, match="header.tar"):
        count_file(f, 2, {})


def test_an_img2dataset_folder_read_as_auto_says_to_set_the_format(tmp_path):
    """img2dataset writes a .parquet beside each tar; read as a manifest it lacked image_id, with no hint (review)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipmaps.pipeline.manifests import list_manifest_files
    from clipmaps.schemas.errors import ManifestError

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("k.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    pq.write_table(pa.table({"key": ["k"], "caption": ["a cat"]}), tmp_path / "00000.parquet")
    with pytest.raises(ManifestError, match="set input.format: webdataset"):
        list_manifest_files(str(tmp_path), {}, "auto")
    assert [f.rel for f in list_manifest_files(str(tmp_path), {}, "webdataset")[1]] == ["00000.tar"]
