"""Duplicate ``image_id`` across the whole manifest, found by Ray tasks with hash partitioning.

Map tasks (one per stretch of about :data:`ROWS_PER_MAP` rows of one file) read their rows' ids and split
``(id, file, row)`` into ``B`` buckets by a hash of the id; one reduce task per bucket finds the ids seen more than
once and returns only those rows. The first occurrence in (file order, row) order wins; every later one is
returned with the position of the first, and becomes an error row (``DuplicateImageId``) of its shard. The driver
receives duplicates only, never an id per valid row.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .manifests import FileCount, ManifestFile, read_rows
from .shards import Shard, seek_for, shard_of_row

logger = logging.getLogger(__name__)

#: Rows one map task reads (consecutive shards of one file).
ROWS_PER_MAP = 200_000
#: Rows per reduce bucket (the number of buckets grows with the manifest, at most :data:`MAX_BUCKETS`).
ROWS_PER_BUCKET = 500_000
MAX_BUCKETS = 64
#: Files one map task of :func:`repeated_ids` reads (``write_outputs``' markers: a batch's ids each).
FILES_PER_MAP = 256
_ID_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.int32()), ("row", pa.int64())])


def _map_ids(
    file: ManifestFile,
    index: int,
    header: list[str] | None,
    ranges: list[tuple[int, int, int | None, int]],
    storage_options: dict,
    buckets: int,
) -> list[pa.Table] | pa.Table:
    """Ids of row ranges ``(start, rows, seek offset, skip)`` of ``file`` (number ``index``), split into ``buckets``
    tables of ``(id, file, row)``."""
    parts = []
    for start, rows, offset, skip in ranges:
        ids = read_rows(file, header, offset, skip, start, rows, storage_options, ids_only=True).table["image_id"]
        parts.append(_id_table(ids, index, start))
    return _split(parts, buckets)


def _id_table(ids: pa.Array | pa.ChunkedArray, file: int, start: int) -> pa.Table:
    """``(id, file, row)`` rows for ``ids``, the rows ``start``, ``start + 1``… of file number ``file``."""
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "file": pa.array(np.full(n, file, np.int32)),
            "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
        },
        schema=_ID_SCHEMA,
    )


def _split(parts: list[pa.Table], buckets: int) -> list[pa.Table] | pa.Table:
    """``parts`` (``_ID_SCHEMA``) joined, null ids left out, split into ``buckets`` tables by a hash of ``id`` (the
    table itself for one)."""
    import pandas as pd

    table = pa.concat_tables(parts) if parts else _ID_SCHEMA.empty_table()
    table = table.filter(pc.is_valid(table["id"]))
    if buckets == 1:
        return table
    values = table["id"].to_numpy(zero_copy_only=False)
    bucket = pd.util.hash_array(values.astype(object)) % np.uint64(buckets)
    return [table.filter(pa.array(bucket == b)) for b in range(buckets)]


def _map_id_files(uris: list[str], first: int, storage_options: dict, buckets: int) -> list[pa.Table] | pa.Table:
    """The ``image_id`` column of the Parquet files ``uris`` (numbered from ``first``), split into ``buckets``
    tables of ``(id, file, row)``."""
    import pyarrow.parquet as pq

    from clipmaps.schemas.storage import filesystem

    parts = []
    for k, uri in enumerate(uris):
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            parts.append(_id_table(pq.read_table(f, columns=["image_id"])["image_id"].cast(pa.string()), first + k, 0))
    return _split(parts, buckets)


def _reduce_counted(*tables: pa.Table) -> tuple[int, list[tuple[str, int, int, int, int]]]:
    """``(rows, _reduce_ids(tables))``."""
    return sum(t.num_rows for t in tables), _reduce_ids(*tables)


def repeated_ids(
    uris: list[str], storage_options: dict, *, retries: int = 3, examples: int = 5
) -> tuple[int, int, list[str]]:
    """``(ids, ids held more than once, up to examples of them)`` over the ``image_id`` columns of the Parquet files
    ``uris`` — by Ray tasks (map: :data:`FILES_PER_MAP` files each; reduce: one per bucket), the driver receiving the
    counts and the repeats only. ``ray`` must be initialised."""
    import ray

    if not uris:
        return 0, 0, []
    # sized by files: a marker holds about a batch of ids (the buckets only spread the reduce)
    buckets = max(1, min(MAX_BUCKETS, -(-len(uris) * 1000 // ROWS_PER_BUCKET)))
    mapper = ray.remote(_map_id_files).options(
        num_returns=buckets, num_cpus=0.25, max_retries=retries, retry_exceptions=[OSError]
    )
    reducer = ray.remote(_reduce_counted).options(num_cpus=0.25, max_retries=retries)
    mapped = []
    for first in range(0, len(uris), FILES_PER_MAP):
        refs = mapper.remote(uris[first : first + FILES_PER_MAP], first, storage_options, buckets)
        mapped.append(refs if buckets > 1 else [refs])
    reduced = ray.get([reducer.remote(*[m[b] for m in mapped]) for b in range(buckets)])
    ids = sorted({r[0] for _, part in reduced for r in part})
    return sum(n for n, _ in reduced), len(ids), ids[:examples]


def _reduce_ids(*tables: pa.Table) -> list[tuple[str, int, int, int, int]]:
    """``(id, file, row, first file, first row)`` for every occurrence of an id after its first."""
    table = pa.concat_tables(tables)
    if not table.num_rows:
        return []
    counts = table.group_by("id").aggregate([("row", "count")])
    repeated = counts.filter(pc.greater(counts["row_count"], 1))["id"]
    if not len(repeated):
        return []
    rows = table.filter(pc.is_in(table["id"], repeated)).sort_by([("id", "ascending"), ("file", "ascending"),
                                                                   ("row", "ascending")])  # fmt: skip
    out, first = [], {}
    for i, f, r in zip(rows["id"].to_pylist(), rows["file"].to_pylist(), rows["row"].to_pylist()):
        if i in first:
            out.append((i, f, r, *first[i]))
        else:
            first[i] = (f, r)
    return out


def find_duplicates(
    files: list[ManifestFile],
    counts: list[FileCount],
    shards: list[Shard],
    shard_rows: int,
    storage_options: dict,
    *,
    retries: int = 3,
) -> tuple[dict[int, dict[int, str]], dict]:
    """Find the rows whose ``image_id`` an earlier row of the manifest has (Ray tasks; ``ray`` initialised).

    Args:
        shards: every shard of the manifest (complete or not: a new row may repeat an id of a finished shard).

    Returns:
        ``(by_shard, stats)``: shard id → {row in its file → message naming the first occurrence}; and
        ``{"rows", "duplicates", "buckets", "maps", "seconds"}``.
    """
    import ray

    t0 = time.time()
    total = sum(s.rows for s in shards)
    buckets = max(1, min(MAX_BUCKETS, -(-total // ROWS_PER_BUCKET)))
    # one map task per stretch of about ROWS_PER_MAP rows of one file, read as contiguous ranges (one open and seek
    # per range, not per shard)
    groups: list[tuple[int, list[list]]] = []
    size, end = 0, None
    for s in sorted(shards, key=lambda s: (s.file, s.start)):
        if not groups or size + s.rows > ROWS_PER_MAP or s.file != groups[-1][0]:
            groups.append((s.file, []))
            size, end = 0, None
        ranges = groups[-1][1]
        if end == s.start:
            ranges[-1][1] += s.rows
        else:
            seek = seek_for(counts[s.file], s.start, shard_rows)
            ranges.append([s.start, s.rows, seek.offset, seek.skip])
        end = s.start + s.rows
        size += s.rows
    mapper = ray.remote(_map_ids).options(
        num_returns=buckets, num_cpus=0.5, max_retries=retries, retry_exceptions=[OSError]
    )
    reducer = ray.remote(_reduce_ids).options(num_cpus=0.5, max_retries=retries)
    mapped = []
    for f, ranges in groups:
        refs = mapper.remote(files[f], f, counts[f].header, [tuple(r) for r in ranges], storage_options, buckets)
        mapped.append(refs if buckets > 1 else [refs])
    reduced = [reducer.remote(*[m[b] for m in mapped]) for b in range(buckets)] if mapped else []
    by_file: dict[int, list[Shard]] = defaultdict(list)
    for s in shards:
        by_file[s.file].append(s)
    for ranges in by_file.values():
        ranges.sort(key=lambda s: s.start)
    out: dict[int, dict[int, str]] = defaultdict(dict)
    found = 0
    for part in ray.get(reduced):
        for image_id, f, row, first_file, first_row in part:
            shard = shard_of_row(by_file, f, row)
            if shard is None:
                continue
            where = files[first_file].rel
            out[shard.id][row] = f"image_id {image_id!r} already appears in {where} row {first_row}"
            found += 1
    stats = {
        "rows": total,
        "duplicates": found,
        "buckets": buckets,
        "maps": len(groups),
        "seconds": round(time.time() - t0, 3),
    }
    logger.info("duplicate ids: %s", stats)
    return dict(out), stats


__all__ = ["find_duplicates", "repeated_ids"]
