"""Hand-made output datasets for the index, query and report tests: ``regions/`` tables with the real schema,
``_job.json`` files, unit vectors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipmaps.schemas.datasets import regions_schema

MODEL, WEIGHTS, PHASH = "clipmaps-tiny-vit", "random:seed=0", "0123456789abcdef"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int = 0, centres: int = 200) -> np.ndarray:
    """Unit vectors around ``centres`` random directions (like real embeddings: clustered, not uniform)."""
    rng = np.random.default_rng(seed)
    c = unit(rng.standard_normal((centres, dim)))
    return unit(c[rng.integers(0, centres, n)] + 0.08 * rng.standard_normal((n, dim)))


def regions_table(
    vectors: np.ndarray, image_ids, region_ids, *, model=MODEL, weights=WEIGHTS, params_hash=PHASH
) -> pa.Table:
    """A ``regions/`` table with the real schema and the given embeddings."""
    n, dim = vectors.shape
    return pa.table(
        {
            "image_id": list(image_ids),
            "image_uri": [f"s3://images/{i}.jpg" for i in image_ids],
            "region_id": list(region_ids),
            "method": ["maskinversion"] * n,
            "model": [model] * n,
            "weights": [weights] * n,
            "params_hash": [params_hash] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
            "mask": pa.nulls(n, regions_schema(dim).field("mask").type),
            "area": pa.array(np.full(n, 100), pa.int64()),
            "bbox": pa.FixedSizeListArray.from_arrays(pa.array(np.tile([1, 2, 10, 10], n), pa.int32()), 4),
            "loss": pa.array(np.full(n, 0.1), pa.float32()),
            "expl_map": pa.nulls(n, pa.binary()),
        },
        schema=regions_schema(dim),
    )


def write_regions(out: Path, vectors: np.ndarray, *, parts: int = 1, ids_prefix: str = "img", **prov) -> list[tuple]:
    """Write ``vectors`` as ``regions/`` Parquet files (``parts`` files); return ``[(image_id, region_id)]``."""
    n = len(vectors)
    ids = [(f"{ids_prefix}-{i // 4:06d}", f"r{i % 4}") for i in range(n)]
    (out / "regions").mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        t = regions_table(vectors[lo:hi], [a for a, _ in ids[lo:hi]], [b for _, b in ids[lo:hi]], **prov)
        pq.write_table(t, out / "regions" / f"part-{ids_prefix}-{p:03d}.parquet", row_group_size=3000)
    return ids


def write_job(out: Path, spec: dict) -> None:
    (out / "_job.json").write_text(json.dumps({"spec": spec, "status": "finished", "ok": True}))
