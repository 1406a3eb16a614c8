"""``clipmaps index``: streaming build from ``regions/``, exact vs HNSW, recall against exact search, the id map,
refusal of mixed models/parameters, the manifest join for image URIs, and S3.

Its helpers are in ``tests/helpers/outputs.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipmaps.jobs.cli import main
from clipmaps.jobs.index import RegionIndexError, build_index, load_index
from clipmaps.jobs.outputs import JobOutputs
from tests.helpers.outputs import MODEL, PHASH, WEIGHTS, clustered, unit, write_job, write_regions


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def test_hnsw_recall_against_exact_search(tmp_path, monkeypatch):
    """20,000 clustered 128-d vectors in 4 files, streamed in 4,096-row batches into an HNSW index: recall@10
    against exact search (numpy) ≥ 0.98 on 300 held-out queries, and the id map follows vector order."""
    monkeypatch.setattr("clipmaps.jobs.index.IDS_ROW_GROUP", 5000)  # lookups across id-map row groups
    n, dim, k = 20_000, 128, 10
    x = clustered(n, dim)
    ids = write_regions(tmp_path, x, parts=4)
    result = build_index(str(tmp_path), kind="hnsw", batch_rows=4096, image_uris=False)
    assert result.meta["kind"] == "hnsw" and result.meta["count"] == n and result.meta["dim"] == dim
    assert (tmp_path / "index" / "index.json").exists() and (tmp_path / "index" / "ids.parquet").exists()

    index = load_index(str(tmp_path))
    queries = unit(
        x[np.random.default_rng(1).choice(n, 300, replace=False)]
        + 0.05 * np.random.default_rng(2).standard_normal((300, dim))
    )
    rows, scores = index.search(queries, k)
    truth = exact_topk(x, queries, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, truth)])
    print(f"HNSW recall@{k} vs exact on {n} clustered {dim}-d vectors: {recall:.4f}")
    assert recall >= 0.98, recall
    # scores are cosines, best first
    np.testing.assert_allclose(scores[:, 0], np.take_along_axis(queries @ x.T, rows[:, :1], 1)[:, 0], atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)

    # the id map: row r is the r-th vector in scan order (files sorted by name, rows in file order)
    assert pq.ParquetFile(tmp_path / "index" / "ids.parquet").metadata.num_row_groups == 4
    picks = [n - 1, 0, 4095, 4096, 9999, 10000, 5]
    for info, r in zip(index.lookup(picks), picks):
        assert (info["image_id"], info["region_id"]) == ids[r]
        assert (info["model"], info["weights"], info["params_hash"]) == (MODEL, WEIGHTS, PHASH)
        assert info["image_uri"] is None
    # a stored vector finds itself first
    self_rows, self_scores = index.search(x[[7, 12345]], 1)
    assert self_rows[:, 0].tolist() == [7, 12345] and np.all(self_scores > 0.9999)


def test_hnsw_recall_on_uniform_vectors(tmp_path):
    """The hard case for graph search (uniform random directions, no clusters): recall@10 stays ≥ 0.85 at
    20,000 128-d vectors with the default parameters (measured 0.91)."""
    n, dim, k = 20_000, 128, 10
    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((n, dim)))
    write_regions(tmp_path, x, parts=2)
    build_index(str(tmp_path), exact_below=10_000, image_uris=False)  # above the threshold: HNSW
    index = load_index(str(tmp_path))
    assert index.meta["kind"] == "hnsw"
    q = unit(rng.standard_normal((300, dim)))
    rows, _ = index.search(q, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, exact_topk(x, q, k))])
    print(f"HNSW recall@{k} vs exact on {n} uniform {dim}-d vectors: {recall:.4f}")
    assert recall >= 0.85, recall


def test_small_dataset_is_exact(tmp_path):
    """Below exact_below the index is searched exhaustively: the same top-k as numpy, every time."""
    x = clustered(3000, 64, seed=5)
    write_regions(tmp_path, x, parts=2)
    meta = build_index(str(tmp_path), image_uris=False).meta
    assert meta["kind"] == "exact" and meta["hnsw"] is None
    index = load_index(str(tmp_path))
    q = unit(np.random.default_rng(3).standard_normal((50, 64)))
    rows, _ = index.search(q, 10)
    np.testing.assert_array_equal(rows, exact_topk(x, q, 10))
    rows, _ = index.search(q[:1], 5000)  # k above the count: every vector once
    assert sorted(rows[0].tolist()) == list(range(3000))


def test_mixed_params_are_refused_unless_one_is_picked(tmp_path):
    a, b = clustered(100, 32, seed=1), clustered(60, 32, seed=2)
    write_regions(tmp_path, a, ids_prefix="a")
    write_regions(tmp_path, b, ids_prefix="b", params_hash="fedcba9876543210", weights="random:seed=1")
    with pytest.raises(RegionIndexError, match=r"mixes embeddings of 2 model/parameter sets.*--params-hash"):
        build_index(str(tmp_path), image_uris=False)
    meta = build_index(str(tmp_path), params_hash="fedcba9876543210", image_uris=False).meta
    assert meta["count"] == 60 and meta["source"]["weights"] == "random:seed=1"
    assert meta["source"]["groups_in_dataset"] == 2
    index = load_index(str(tmp_path))
    assert {r["image_id"][0] for r in index.lookup(range(60))} == {"b"}
    with pytest.raises(RegionIndexError, match="no rows with params_hash 'nope'"):
        build_index(str(tmp_path), params_hash="nope")


def test_an_index_with_mixed_id_map_is_refused(tmp_path):
    """An id map that names several params hashes (tampered, or written by another tool) is refused on load."""
    write_regions(tmp_path, clustered(50, 16))
    build_index(str(tmp_path), image_uris=False)
    ids = pq.read_table(tmp_path / "index" / "ids.parquet")
    hashes = ids["params_hash"].to_pylist()
    hashes[-1] = "ffffffffffffffff"
    pq.write_table(
        ids.set_column(ids.schema.get_field_index("params_hash"), "params_hash", pa.array(hashes)),
        tmp_path / "index" / "ids.parquet",
    )
    with pytest.raises(RegionIndexError, match="mixes several params_hash values"):
        load_index(str(tmp_path))


def test_cli_joins_image_uris_from_the_manifest(tmp_path, capsys):
    x = clustered(40, 16)
    ids = write_regions(tmp_path / "out", x)
    manifest = tmp_path / "manifest.jsonl"
    images = sorted({a for a, _ in ids})
    manifest.write_text(
        "".join(json.dumps({"image_id": i, "image_uri": f"/data/{i}.jpg"}) + "\n" for i in images[:-1])
    )  # the last image is not in the manifest
    write_job(tmp_path / "out", {"input": {"manifest": str(manifest)}, "model": {"name": MODEL, "seed": 0}})
    assert main(["index", str(tmp_path / "out")]) == 0
    assert "40 regions, 16-d, exact" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "out" / "index" / "ids.parquet")
    assert table["row"].to_pylist() == list(range(40))
    uris = dict(zip(table["image_id"].to_pylist(), table["image_uri"].to_pylist()))
    assert uris[images[0]] == f"/data/{images[0]}.jpg" and uris[images[-1]] is None
    # rebuilding replaces the index
    assert main(["index", str(tmp_path / "out"), "--no-image-uris"]) == 0
    assert pq.read_table(tmp_path / "out" / "index" / "ids.parquet")["image_uri"].null_count == 40


def test_missing_regions_is_a_clear_error(tmp_path, capsys):
    assert main(["index", str(tmp_path)]) == 2
    assert "does not exist: the job wrote no region embeddings" in capsys.readouterr().err
    with pytest.raises(RegionIndexError, match="no index at"):
        load_index(str(tmp_path))
    (tmp_path / "regions").mkdir()
    with pytest.raises(RegionIndexError, match="holds no Parquet files"):
        build_index(str(tmp_path))


def test_s3_build_and_load(s3, tmp_path):
    """The same on object storage: regions/ read from S3, the index uploaded there and downloaded to search."""
    fs = s3.filesystem()
    x = clustered(500, 32, seed=9)
    write_regions(tmp_path / "out", x, parts=2)
    fs.put(str(tmp_path / "out" / "regions") + "/", "clipmaps/index-test/regions/", recursive=True)
    write_job(tmp_path / "out", {"model": {"name": MODEL, "seed": 0}})
    fs.put_file(str(tmp_path / "out" / "_job.json"), "clipmaps/index-test/_job.json")
    uri = "s3://clipmaps/index-test"
    assert JobOutputs(uri, s3.storage_options).job["spec"]["model"]["name"] == MODEL
    meta = build_index(uri, storage_options=s3.storage_options, image_uris=False).meta
    assert meta["count"] == 500
    assert fs.exists("clipmaps/index-test/index/index.json")
    index = load_index(uri, storage_options=s3.storage_options)
    rows, scores = index.search(x[[3]], 1)
    assert rows[0, 0] == 3 and scores[0, 0] > 0.9999
    assert index.lookup([3])[0]["region_id"] == "r3"


def test_stale_index_warns(tmp_path, caplog):
    write_regions(tmp_path, clustered(30, 16))
    build_index(str(tmp_path), image_uris=False)
    load_index(str(tmp_path))
    assert "changed since the index was built" not in caplog.text
    write_regions(tmp_path, clustered(10, 16, seed=3), ids_prefix="late")
    assert len(load_index(str(tmp_path)).vectors) == 30
    assert "regions changed since the index was built" in caplog.text
