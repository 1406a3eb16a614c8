"""Manifests of several files read by Ray workers, on the real S3 server and locally: worker-side validation,
duplicate ids across files, append mode (finished shards untouched), a changed shard refused, one file per dataset
per shard, and result rows that name their image's URI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from clipmaps.pipeline.run import run
from clipmaps.pipeline.spec import load_spec
from clipmaps.schemas.errors import OutputConflict
from tests.helpers.specs import JOB_SPEC

DATASETS = ("labels", "heatmaps", "regions", "errors")


def _image(path: Path, k: int) -> None:
    rng = np.random.default_rng(k)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


def _rows(prefix: str, ids: list[str]) -> list[dict]:
    return [{"image_id": i, "image_uri": f"{prefix}/{i}.png", "prompts": ["a cat"]} for i in ids]


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _overrides(manifest: str, out: str, *extra: str) -> list[str]:
    """GEM alone (label maps + heatmaps) at 64 px on the tiny seeded model, 2 rows per shard."""
    return [
        f"input.manifest={manifest}",
        f"output.uri={out}",
        "output.overwrite=false",
        "output.shard_rows=2",
        "methods.maskclip=null",
        "methods.legrad=null",
        "methods.maskinversion=null",
        "methods.gem.size=64",
        "methods.gem.resources.batch_size=4",
        "run.max_error_fraction=1.0",
        *extra,
    ]


def _tables(out: str, fs=None) -> dict:
    return {n: pads.dataset(f"{out}/{n}", format="parquet", filesystem=fs).to_table() for n in DATASETS}


def test_a_manifest_of_several_files_on_s3_with_duplicates_and_bad_rows(ray_local, s3, tmp_path):
    fs = s3.filesystem()
    root = f"{s3.bucket}/many-{os.getpid()}"
    ids = [f"m{k:02d}" for k in range(7)]
    for k, i in enumerate(ids):
        _image(tmp_path / f"{i}.png", k)
        fs.put(str(tmp_path / f"{i}.png"), f"{root}/images/{i}.png")
    prefix = f"s3://{root}/images"
    a = _rows(prefix, ids[:3])
    b = _rows(prefix, ids[3:6]) + [{"image_id": "m01", "image_uri": f"{prefix}/m06.png"}]  # m01 again
    c = [*_rows(prefix, ids[6:]), {"image_id": "nouri"}, {"image_id": "http", "image_uri": "http://x/y.png"}]
    fs.pipe(f"{root}/manifest/a.jsonl", _lines(a).encode())
    fs.pipe(f"{root}/manifest/b.jsonl", _lines(b).encode())
    fs.pipe(f"{root}/manifest/sub/c.jsonl", _lines(c).encode() + b"{broken\n")
    opts = json.dumps(s3.storage_options)
    spec = load_spec(
        JOB_SPEC,
        overrides=_overrides(
            f"s3://{root}/manifest",
            f"s3://{root}/out",
            f"input.storage_options={opts}",
            f"output.storage_options={opts}",
        ),
    )
    result = run(spec)
    assert result.total == 3 + 4 + 4 and result.processed == result.total
    t = _tables(f"{root}/out", fs)
    assert sorted(t["labels"].column("image_id").to_pylist()) == ids
    errors = {(r["image_id"], r["error_type"]): r for r in t["errors"].to_pylist()}
    dup = errors[("m01", "DuplicateImageId")]
    assert dup["stage"] == "manifest" and "already appears in a.jsonl row 1" in dup["message"]
    assert dup["uri"] == f"{prefix}/m06.png"
    assert ("nouri", "MissingImageUri") in errors and ("http", "UnsupportedScheme") in errors
    broken = errors[(None, "MalformedRow")]
    assert "c.jsonl row 3" in broken["message"] and "not valid JSON" in broken["message"]
    assert len(t["errors"]) == 4
    for name in ("labels", "heatmaps"):
        assert set(t[name].column("image_uri").to_pylist()) == {f"{prefix}/{i}.png" for i in ids}
    markers = [json.loads(fs.cat(p)) for p in fs.find(f"{root}/out/_shards")]
    assert sorted((m["file"], m["start"], m["rows"]) for m in markers) == [
        ("a.jsonl", 0, 2), ("a.jsonl", 2, 1), ("b.jsonl", 0, 2), ("b.jsonl", 2, 2),
        ("sub/c.jsonl", 0, 2), ("sub/c.jsonl", 2, 2),
    ]  # fmt: skip
    for name in DATASETS:
        parts = [p for p in fs.find(f"{root}/out/{name}") if "/part-0" in p]
        assert len(parts) <= len(markers), (name, parts)
    assert not [p for p in fs.find(f"{root}/out/_staging") if p.endswith(".parquet")]


def _snapshot(out: Path) -> dict:
    return {
        p.relative_to(out).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for d in (*DATASETS, "_shards")
        for p in (out / d).glob("*")
    }


def test_append_rows_and_files_then_a_changed_shard_is_refused(ray_local, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ids = [f"p{k:02d}" for k in range(9)]
    for k, i in enumerate(ids):
        _image(images / f"{i}.png", k)
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    (manifest / "a.jsonl").write_text(_lines(_rows(str(images), ids[:3])))  # shards 0-1 and 2 (short: 1 row)
    out = tmp_path / "out"
    spec = load_spec(JOB_SPEC, overrides=_overrides(str(manifest), str(out)))
    first = run(spec)
    assert first.ok and first.processed == 3
    before = _snapshot(out)

    # rows appended to a.jsonl after its short last shard, and a new file
    with open(manifest / "a.jsonl", "a") as f:
        f.write(_lines(_rows(str(images), ids[3:6])))
    (manifest / "b.jsonl").write_text(_lines(_rows(str(images), ids[6:])))
    second = run(spec)
    assert second.ok and second.processed == 9 and second.kept_shards == 2 and second.attempt_images == 6
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # finished files byte-identical, untouched
    t = _tables(str(out))
    assert sorted(t["labels"].column("image_id").to_pylist()) == ids and t["errors"].num_rows == 0
    markers = {int(p.stem): json.loads(p.read_text()) for p in (out / "_shards").glob("*.json")}
    ranges = sorted((m["file"], m["start"], m["rows"]) for m in markers.values())
    assert ranges == [("a.jsonl", 0, 2), ("a.jsonl", 2, 1), ("a.jsonl", 3, 2), ("a.jsonl", 5, 1),
                      ("b.jsonl", 0, 2), ("b.jsonl", 2, 1)]  # fmt: skip
    for name in ("labels", "heatmaps"):
        assert len(list((out / name).glob("part-0*.parquet"))) == len(markers)

    # a row of a complete shard changed: refused, naming the shard, its file and rows
    rows = [json.loads(line) for line in (manifest / "a.jsonl").read_text().splitlines()]
    rows[1]["image_uri"] = str(images / "p05.png")
    (manifest / "a.jsonl").write_text(_lines(rows))
    shard = next(k for k, m in markers.items() if (m["file"], m["start"]) == ("a.jsonl", 0))
    with pytest.raises(OutputConflict, match=rf"complete shard\(s\) {shard} \(manifest rows 0-1 of a\.jsonl\) changed"):
        run(spec)
    assert _snapshot(out) == after
