"""WebDataset tar reading without Ray: member keys, sample grouping, a file that is not a tar."""

from __future__ import annotations

import io
import tarfile

import pytest

from clipmaps.pipeline.manifests import ManifestFile, count_file, file_format, read_rows
from clipmaps.pipeline.webdataset import shard_name, split_member
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
