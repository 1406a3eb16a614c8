"""Shard plans against an output's markers, file listing and counting, and reading one shard (no Ray)."""

from __future__ import annotations

import gzip
import json

import pytest

from clipmaps.pipeline.manifests import ManifestFile, count_file, list_manifest_files, read_rows, sample_count
from clipmaps.pipeline.shards import Shard, assign_shards, cap_rows, fresh_shards, read_shard, seek_for
from clipmaps.schemas.errors import ManifestError


def _files(*specs):
    return [ManifestFile(uri=f"/m/{rel}", rel=rel, format="jsonl", compressed=False, size=1, identity=ident)
            for rel, ident in specs]  # fmt: skip


def _marker(shard: Shard, files, identity=None):
    f = files[shard.file]
    return {"file": f.rel, "start": shard.start, "rows": shard.rows, "identity": identity or f.identity}


def test_a_fresh_plan_numbers_ranges_in_file_order():
    shards = fresh_shards([5, 0, 3], 2)
    assert [(s.id, s.file, s.start, s.rows) for s in shards] == [
        (0, 0, 0, 2), (1, 0, 2, 2), (2, 0, 4, 1), (3, 2, 0, 2), (4, 2, 2, 1),
    ]  # fmt: skip
    assert cap_rows([_c(5), _c(0), _c(3)], 6) == [5, 0, 1]


def _c(rows):
    from clipmaps.pipeline.manifests import FileCount

    return FileCount(rows=rows)


def test_a_resumed_plan_keeps_ids_and_fills_gaps_with_the_fresh_ids():
    files = _files(("a.jsonl", "1:x"))
    fresh = fresh_shards([10], 2)
    markers = {s.id: _marker(s, files) for s in fresh if s.id in (0, 1, 3)}
    a = assign_shards(files, [10], markers, 2)
    assert sorted(a.shards) == [0, 1, 2, 3, 4] and [s.id for s in a.todo] == [2, 4]
    assert a.shards[2] == fresh[2] and a.shards[4] == fresh[4]
    assert not a.verify and not a.conflicts


def test_rows_appended_after_a_short_last_shard_are_a_new_shard_where_it_ended():
    files = _files(("a.jsonl", "7:old"))
    done = {s.id: _marker(s, files) for s in fresh_shards([7], 4)}  # 0: rows 0-3, 1: rows 4-6 (short)
    grown = _files(("a.jsonl", "12:new"))
    a = assign_shards(grown, [12], done, 4)
    assert [(s.id, s.start, s.rows) for s in a.todo] == [(3, 7, 4), (4, 11, 1)]  # ids above any in use
    assert {s.id for s in a.verify} == {0, 1}  # the file changed: its complete shards' digests are checked
    # a new file that sorts first: its fresh ids are taken by the markers, so it gets ids above every one in use
    more = _files(("0.jsonl", "2:n"), ("a.jsonl", "7:old"))
    b = assign_shards(more, [2, 7], {k: {**m} for k, m in done.items()}, 4)
    assert [(s.id, s.file, s.start, s.rows) for s in b.todo] == [(3, 0, 0, 2)] and not b.verify


def test_a_complete_shard_whose_file_is_gone_or_shorter_is_a_conflict():
    files = _files(("a.jsonl", "1:x"), ("b.jsonl", "1:y"))
    done = {s.id: _marker(s, files) for s in fresh_shards([4, 4], 2)}
    a = assign_shards(files[:1], [4], done, 2)
    assert [c.split(":")[0] for c in a.conflicts] == [
        "shard 2 (manifest rows 0-1 of b.jsonl)",
        "shard 3 (manifest rows 2-3 of b.jsonl)",
    ]
    b = assign_shards(files, [4, 3], done, 2)
    assert b.conflicts == ["shard 3 (manifest rows 2-3 of b.jsonl): the file now has 3 rows"]
    old = assign_shards(files, [4, 4], {0: {"rows": 2, "digest": "d"}}, 2)  # a marker of an earlier clipmaps
    assert old.conflicts == ["shard 0: its marker names no manifest file (written by an earlier clipmaps)"]


def test_counting_and_reading_a_jsonl_range_seeks_to_its_offset(tmp_path):
    rows = [{"image_id": f"i{k}", "image_uri": f"/x/{k}.jpg", "prompts": ["a"] if k == 3 else None}
            for k in range(7)]  # fmt: skip
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "   ")  # blank lines are not rows
    lines.insert(5, "{not json")
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    root, files = list_manifest_files(str(path), {})
    (f,) = files
    assert f.rel == "" and f.format == "jsonl"  # one file: recorded as "", so it may be renamed
    count = count_file(f, 3, {})
    assert count.rows == 8 and len(count.offsets) == 3 and count.flags["prompts"] and not count.flags["masks"]
    seek = seek_for(count, 4, 3)
    got = read_rows(f, None, seek.offset, seek.skip, 4, 3, {})
    assert got.table["image_id"].to_pylist() == [None, "i4", "i5"]
    assert "row 4" in got.problems[0][1] and "not valid JSON" in got.problems[0][1]
    whole = read_rows(f, None, None, 4, 4, 3, {})  # the same rows read from the start (a compressed file's way)
    assert whole.digest == got.digest
    table = read_shard(f, None, Shard(7, 0, 4, 3), seek, {}, ("file",), {6: "image_id 'i5' already appears"})
    assert table["error_type"].to_pylist() == ["MalformedRow", None, "DuplicateImageId"]
    assert set(table["shard"].to_pylist()) == {7} and len(set(table["shard_digest"].to_pylist())) == 1


def test_csv_counting_honours_quoted_newlines_and_compressed_files_read_from_the_start(tmp_path):
    text = 'image_id,image_uri,prompts\na,/x/a.jpg,"one\ntwo"\n\nb,/x/b.jpg,\nc,/x/c.jpg,"x|y"\n'
    (tmp_path / "m.csv").write_text(text)
    with gzip.open(tmp_path / "n.csv.gz", "wt") as g:
        g.write(text)
    root, files = list_manifest_files(str(tmp_path), {})
    assert [f.rel for f in files] == ["m.csv", "n.csv.gz"] and files[1].compressed
    plain, packed = (count_file(f, 2, {}) for f in files)
    assert plain.rows == packed.rows == 3 and len(plain.offsets) == 2 and not packed.offsets
    for f, c in zip(files, (plain, packed)):
        seek = seek_for(c, 1, 2)
        got = read_rows(f, c.header, seek.offset, seek.skip, 1, 2, {})
        assert got.table["image_id"].to_pylist() == ["b", "c"] and got.table["prompts"].to_pylist() == [
            None,
            ["x", "y"],
        ]
    first = read_rows(files[0], plain.header, plain.offsets[0], 0, 0, 1, {})
    assert first.table["prompts"].to_pylist() == [["one\ntwo"]]


def test_listing_a_pattern_and_refusing_what_is_not_a_manifest(tmp_path):
    for name in ("p-1.jsonl", "p-2.jsonl", "q.jsonl", "_SUCCESS"):
        (tmp_path / name).write_text('{"image_id": "a", "image_uri": "/a.jpg"}\n')
    root, files = list_manifest_files(str(tmp_path / "p-*.jsonl"), {})
    assert [f.rel for f in files] == ["p-1.jsonl", "p-2.jsonl"]
    assert [f.rel for f in list_manifest_files(str(tmp_path), {})[1]] == ["p-1.jsonl", "p-2.jsonl", "q.jsonl"]
    with pytest.raises(ManifestError, match="matches no file"):
        list_manifest_files(str(tmp_path / "z-*.jsonl"), {})
    (tmp_path / "bad.jsonl").write_text('{"uri": "/a.jpg"}\n')
    with pytest.raises(ManifestError, match="missing required column"):
        count_file(list_manifest_files(str(tmp_path / "bad.jsonl"), {})[1][0], 2, {})


def test_a_dry_run_estimates_big_text_files_from_a_sample(tmp_path, monkeypatch):
    import clipmaps.pipeline.manifests as m

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image_id": f"i{k:05d}", "image_uri": "/a.jpg"}) + "\n" for k in range(2000)))
    monkeypatch.setattr(m, "SAMPLE_BYTES", 4096)
    (f,) = list_manifest_files(str(path), {})[1]
    c = sample_count(f, 64, {})
    assert c.estimated and 1900 <= c.rows <= 2100


def test_parquet_ranges_cross_row_groups_and_counts_come_from_the_footer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 5000
    table = pa.table({"image_id": [f"i{k}" for k in range(n)], "image_uri": [f"/x/{k}.jpg" for k in range(n)]})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=1500)
    (f,) = list_manifest_files(str(tmp_path / "m.parquet"), {})[1]
    count = count_file(f, 64, {})
    assert count.rows == n and not count.offsets and not any(count.flags.values())
    for start, rows in ((0, 64), (1480, 64), (2999, 2), (4990, 10)):
        got = read_rows(f, None, None, 0, start, rows, {})
        assert got.table["image_id"].to_pylist() == [f"i{k}" for k in range(start, start + rows)], start
        ids = read_rows(f, None, None, 0, start, rows, {}, ids_only=True).table["image_id"]
        assert ids.to_pylist() == got.table["image_id"].to_pylist()


def test_a_root_that_moved_up_is_named_as_such():
    """An entry added outside the others' folder moves the root: every recorded path gains a folder (review)."""
    files = _files(("00000.tar", "1:x"))
    done = {s.id: _marker(s, files) for s in fresh_shards([2], 2)}
    moved = _files(("wds/00000.tar", "1:x"), ("wds2/00009.tar", "1:y"))
    a = assign_shards(moved, [2, 2], done, 2)
    assert (
        len(a.conflicts) == 1 and "now recorded as 'wds/00000.tar': the input's root folder moved up" in a.conflicts[0]
    )
