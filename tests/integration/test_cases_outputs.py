"""Outputs through the real CLI (``clipmaps run`` in a subprocess, local Ray, the shipped tiny CLIP):

* every dataset exists with its schema, 0 rows included, and opens in pandas, DuckDB, Polars and Hugging Face
  ``datasets`` (field case ``empty-datasets-missing``); ``vocabulary/`` has one row per class index;
* folders, image names, the manifest and the output whose names hold ``[1]``, ``*``, ``?`` and ``{a,b}`` are taken
  literally, through a resumed run (whose summary tells this run's images from the kept ones);
* a failed job names its root cause (the worker's ``OSError``, errno and path), not Ray's wrapper, in the exit
  message and ``_job.json``, also when ``_job.json`` cannot be written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipmaps.actors.registry import model_info
from clipmaps.pipeline.sinks import EMPTY_FILE
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS, VOCABULARY, regions_schema

CASE = Path(__file__).resolve().parents[3] / "shared" / "cases" / "empty-datasets-missing"
CLIPMAPS = Path(sys.executable).parent / "clipmaps"
MODEL = "clipmaps-synth-vit"
PATTERN = "[1]*?{a,b}"  # every character fsspec reads as a glob pattern
IMAGE_NAMES = ["img[1]", "img*2", "img?3", "img{a,b}4"]


def clipmaps(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``clipmaps ARGS`` in ``cwd``, as a user runs it (a new process, its own local Ray)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(CLIPMAPS), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def schemas() -> dict:
    return {
        "labels": LABELS,
        "heatmaps": HEATMAPS,
        "regions": regions_schema(model_info(MODEL).embed_dim),
        "errors": ERRORS,
        "vocabulary": VOCABULARY,
    }


def read_everywhere(out: Path, hf_cache: Path) -> dict[str, int]:
    """Read every dataset under ``out`` with pyarrow, pandas, DuckDB, Polars and ``datasets``; check that each has
    the ``schemas/datasets.py`` schema and that all readers agree on its row count; return the counts.

    Hugging Face ``datasets`` cannot build a split of 0 rows (``ValueError: Instruction "train" corresponds to no
    data``, whatever the files), so a 0-row dataset is checked there through its features only."""
    import datasets

    counts = {}
    for name, schema in schemas().items():
        folder = out / name
        files = sorted(folder.glob("*.parquet"))
        assert files, f"{name}/ has no Parquet file"
        for f in files:  # every file, the 0-row one included, carries the dataset's schema
            assert pq.read_schema(f).equals(schema, check_metadata=False), (f, pq.read_schema(f))
        df = pd.read_parquet(folder)
        assert list(df.columns) == schema.names
        n = len(df)
        assert duckdb.sql(f"select count(*) from read_parquet('{folder}/*.parquet')").fetchall()[0][0] == n
        assert pl.read_parquet(f"{folder}/*.parquet").shape == (n, len(schema))
        assert pl.scan_parquet(folder).collect().height == n
        features = datasets.Features.from_arrow_schema(schema)
        if n:
            ds = datasets.load_dataset("parquet", data_dir=str(folder), split="train", cache_dir=str(hf_cache / name))
            assert ds.num_rows == n and list(ds.features) == schema.names
        else:
            assert list(features) == schema.names
        counts[name] = n
    return counts


def check_vocabulary(out: Path, names: list[str], background: list[str]) -> None:
    """One row per class index per vocabulary: 0 is background (named by the first background name, all of them
    in ``background_names``), class ``c`` is ``c + 1``."""
    vocab = pd.read_parquet(out / "vocabulary")
    assert not vocab.empty
    for _, rows in vocab.groupby("vocabulary_id"):
        rows = rows.sort_values("class_index")
        assert rows["class_index"].tolist() == list(range(len(names) + 1))
        assert rows["name"].tolist() == [background[0] if background else "background", *names]
        assert rows["is_background"].tolist() == [True] + [False] * len(names)
        assert list(rows["background_names"].iloc[0]) == background
        assert rows["background_names"].iloc[1:].isna().all()


# ---------------------------------------------------------------------------------------------- every dataset
@pytest.mark.slow  # CLI run, ~20 s; also tests/unit/test_empty_datasets.py
@pytest.mark.timeout(400)
def test_empty_datasets_case(tmp_path):
    """The field case: no image can be read, so no method writes a row; every dataset still opens, empty."""
    subprocess.run([sys.executable, str(CASE / "make_case.py"), str(tmp_path / "work")], check=True, timeout=60)
    work = tmp_path / "work"
    run = clipmaps("run", "job.yaml", cwd=work)
    assert run.returncode == 0, run.stderr[-3000:]
    check = subprocess.run(
        [sys.executable, str(CASE / "check.py"), "out"], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and "PASS" in check.stdout, check.stdout
    counts = read_everywhere(work / "out", tmp_path / "hf")
    assert counts == {"labels": 0, "heatmaps": 0, "regions": 0, "errors": 2, "vocabulary": 3}
    check_vocabulary(work / "out", ["red square", "blue square"], ["background"])
    assert (work / "out" / "regions" / EMPTY_FILE).is_file()


# ---------------------------------------------------------------------------------------------- literal paths
def write_pattern_job(base: Path, images: int, *, shard_rows: int = 1) -> Path:
    """A job whose input folder, image names, manifest and output folder hold every glob character; returns the
    output folder. Each image has a prompt, a polygon mask and a PNG mask (named with the pattern too), so GEM and
    MaskInversion write every dataset."""
    folder = base / f"in{PATTERN}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(images):
        name = f"{IMAGE_NAMES[i % len(IMAGE_NAMES)]}-{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
        mask = np.zeros((48, 64), np.uint8)
        mask[10:40, 20:60] = 255
        Image.fromarray(mask).save(folder / f"mask{PATTERN}-{i}.png")
        polygon = [[4, 4, 30, 4, 30, 30, 4, 30]]
        rows.append(
            {
                "image_id": f"id{i}",
                "image_uri": str(folder / name),
                "prompts": ["red square"],
                "masks": [
                    {"region_id": "r", "polygon": polygon},
                    {"region_id": "m", "uri": str(folder / f"mask{PATTERN}-{i}.png")},
                ],
            }
        )
    manifest = folder / f"manifest{PATTERN}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = base / f"out{PATTERN}"
    spec = {
        "input": {"manifest": str(manifest)},
        "output": {"uri": str(out), "shard_rows": shard_rows},
        "model": {"name": MODEL, "pretrained": "synth-shapes-v1"},
        "vocabulary": {"names": ["red square", "blue square"], "background": ["background", "sky"]},
        "methods": {
            "gem": {"size": 64, "resources": {"batch_size": 1}},
            "maskinversion": {"size": 64, "iterations": 3, "resources": {"batch_size": 1}},
        },
        "resources": {"task_retries": 1},
        "run": {"max_error_fraction": 0.0},
    }
    (base / "job.yaml").write_text(json.dumps(spec))  # JSON is YAML: no quoting rules to get wrong
    return out


def summary(stdout: str) -> dict[str, str]:
    """The summary table's rows (``key  value``) by key."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^\s*(\S.*?)\s{2,}(\S.*)$", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


@pytest.mark.slow  # ~37 s; unit tests cover the literal-path helpers
@pytest.mark.timeout(500)
def test_pattern_paths_are_literal_through_a_resumed_run(tmp_path):
    images = 4
    out = write_pattern_job(tmp_path, images)
    first = clipmaps("run", "job.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["job.yaml", f"in{PATTERN}", f"out{PATTERN}"])
    # pyarrow and pandas take a path literally; DuckDB, Polars and datasets glob it, so they read a plain-named copy
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    counts = read_everywhere(plain, tmp_path / "hf")
    assert counts == {"labels": images, "heatmaps": images, "regions": 2 * images, "errors": 0, "vocabulary": 3}
    assert sorted(pd.read_parquet(out / "labels")["image_id"]) == [f"id{i}" for i in range(images)]
    check_vocabulary(out, ["red square", "blue square"], ["background", "sky"])
    row = summary(first.stdout)
    assert row["images processed"] == str(images) and row["by this run"] == str(images)
    assert row["kept"].startswith("0 ")

    # a re-run that finds one shard unfinished: the unfinished shard's files are deleted (a literal rm in a
    # folder named like a pattern) and redone; the summary says which images this run processed
    (out / "_shards" / "0000002.json").unlink()
    planted = out / "labels" / "part-0000002-0123456789abcdef.parquet"  # a stray of the unfinished shard
    shutil.copy(next((out / "labels").glob("part-0000000-*.parquet")), planted)
    second = clipmaps("run", "job.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not planted.exists()
    row = summary(second.stdout)
    assert row["images processed"] == str(images) and row["by this run"] == "1"
    assert row["kept"] == f"{images - 1} ({images - 1} shards of earlier runs)"
    assert "(this run)" in row["images/s"]
    labels = pd.read_parquet(out / "labels")
    assert sorted(labels["image_id"]) == [f"id{i}" for i in range(images)]  # none lost, none twice
    attempts = json.loads((out / "_job.json").read_text())["attempts"]
    assert [a["status"] for a in attempts] == ["finished", "finished"]
    assert attempts[-1]["processed_images"] == 1 and attempts[-1]["resumed_shards"] == images - 1


# ---------------------------------------------------------------------------------------------- failures say why
@pytest.mark.timeout(300)
def test_an_output_that_cannot_be_created_names_the_cause(tmp_path):
    """Output under a regular file: nothing can be written, ``_job.json`` neither; the CLI still says why."""
    write_pattern_job(tmp_path, 1)
    (tmp_path / "file.txt").write_text("a file, not a folder")
    out = tmp_path / "file.txt" / "out"
    run = clipmaps("run", "job.yaml", "--set", f"output.uri={out}", cwd=tmp_path)
    assert run.returncode == 4, (run.returncode, run.stderr[-3000:])
    message = next(line for line in run.stderr.splitlines() if line.startswith("clipmaps run:"))
    assert "Traceback" not in run.stderr
    assert "cannot write the output" in message and "[Errno" in message and str(tmp_path / "file.txt") in message
    assert "NotADirectoryError" in message or "FileExistsError" in message


@pytest.mark.slow  # CLI run of 12 shards, ~25 s
@pytest.mark.timeout(400)
def test_a_failure_mid_run_names_the_workers_error(tmp_path):
    """``labels/`` turns into a file after the first shard is written (what a full disk or a revoked permission
    does to the sink tasks): the run fails with exit 4, and the exit message and ``_job.json`` name the sink
    worker's ``OSError`` with its errno and path, not Ray's "UDF failed to process a data block"."""
    out = write_pattern_job(tmp_path, 12)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [str(CLIPMAPS), "run", "job.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "_shards").is_dir() or not any((out / "_shards").iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "no shard was completed"
            time.sleep(0.02)
        shutil.rmtree(out / "labels")
        (out / "labels").write_text("in the way")
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, (proc.returncode, stderr[-3000:])
    message = next(line for line in stderr.splitlines() if line.startswith("clipmaps run:"))
    attempt = json.loads((out / "_job.json").read_text())["attempts"][-1]
    assert attempt["status"] == "failed"
    for text in (message, attempt["error"]):
        assert "UDF failed" not in text and "UserCodeException" not in text, text
        assert "NotADirectoryError: [Errno 20]" in text or "FileExistsError: [Errno 17]" in text, text
        assert str(out / "labels") in text, text
    assert 1 <= attempt["complete_shards"] < 12


@pytest.mark.slow  # ~40 s; the unit tests of schemas/storage.py cover the literal-path helpers
@pytest.mark.timeout(500)
def test_pattern_keys_on_s3_are_literal(s3, tmp_path):
    """The same on the S3 server: image, manifest and output keys with ``[1]``, ``*``, ``?`` and ``{a,b}``, next to
    keys that the patterns would match; a resumed run deletes the unfinished shard's files and nothing else."""
    fs = s3.filesystem()
    local = write_pattern_job(tmp_path / "local", 2)
    prefix = f"{s3.bucket}/lit{PATTERN}"
    decoy = f"{s3.bucket}/lit1/out1/labels/part-0000001-0123456789abcdef.parquet"  # what out[1] would match
    fs.pipe_file(decoy, b"not ours")
    rows = []
    for line in (local.parent / f"in{PATTERN}" / f"manifest{PATTERN}.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = f"{prefix}/images/{Path(row['image_uri']).name}"
        fs.put_file(row["image_uri"], key)
        masks = []
        for mask in row["masks"]:
            if mask.get("uri"):
                fs.put_file(mask["uri"], f"{prefix}/masks/{Path(mask['uri']).name}")
                mask = {**mask, "uri": f"s3://{prefix}/masks/{Path(mask['uri']).name}"}
            masks.append(mask)
        rows.append({**row, "image_uri": f"s3://{key}", "masks": masks})
    fs.pipe_file(f"{prefix}/manifest{PATTERN}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = f"{prefix}/out{PATTERN}"
    spec = json.loads((local.parent / "job.yaml").read_text())
    spec["input"] = {"manifest": f"s3://{prefix}/manifest{PATTERN}.jsonl", "storage_options": s3.storage_options}
    spec["output"] = {"uri": f"s3://{out}", "shard_rows": 1, "storage_options": s3.storage_options}
    (tmp_path / "job.yaml").write_text(json.dumps(spec))

    first = clipmaps("run", "job.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    fs.invalidate_cache()
    for name in ("labels", "heatmaps", "regions", "errors", "vocabulary"):
        assert fs.exists(f"{out}/{name}"), name
    assert fs.exists(f"{out}/regions/{EMPTY_FILE}")

    fs.rm_file(f"{out}/_shards/0000001.json")
    second = clipmaps("run", "job.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert summary(second.stdout)["by this run"] == "1"
    fs.invalidate_cache()
    labels = pq.ParquetDataset(f"{out}/labels", filesystem=fs).read().column("image_id").to_pylist()
    assert sorted(labels) == ["id0", "id1"]  # the redone shard once, the kept one once
    regions = pq.ParquetDataset(f"{out}/regions", filesystem=fs).read().column("region_id").to_pylist()
    assert sorted(regions) == ["m", "m", "r", "r"]  # the PNG masks were read from their pattern-named keys
    assert fs.cat_file(decoy) == b"not ours"  # a key the pattern matches is never touched
