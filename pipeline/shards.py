"""Shards without a driver-held table: row ranges of manifest files, planned from row counts and markers, read by a
Ray Data datasource whose tasks validate their rows.

A shard is ``(file, start row, row count)`` with an integer id (markers ``_shards/<id:07d>.json`` and result files
``part-<id:07d>-…`` keep that form). :func:`assign_shards`:

* a fresh job: each file (in path order) is cut into ranges of ``output.shard_rows`` rows; ids ``0..n-1`` in order;
* a re-run keeps the id, file and range that each marker records; the rows no marker covers (a killed attempt's
  unfinished ranges, rows appended to a file, new files) are cut into ranges of ``shard_rows`` from the start of
  each uncovered stretch. A new range takes the id a fresh plan would give it when no marker holds that id, else a
  fresh id above every id in use; so an unchanged manifest always gets the same ids, and rows appended after a
  short last shard become a new shard starting where it ended;
* a complete shard whose file's identity (size, ETag or mtime) changed has its content digest computed again by a
  Ray task; a different digest (or a file gone, or fewer rows than the shard) is a conflict naming the shard, its
  file and rows (:func:`clipmaps.pipeline.resume.check_resumable` refuses the run).

:class:`ManifestDatasource` gives Ray Data one read task per shard to process; the task reads its rows (seeking to the
byte offset counted for it), validates them (``clipmaps.pipeline.sources.row_problems``; duplicates come from the
distributed pass in :mod:`clipmaps.pipeline.dupes`), computes the shard's content digest, and emits every row: a
row it refuses carries ``error_stage="manifest"`` and flows to ``errors/`` through the sink like any failed row.
"""

from __future__ import annotations

import bisect
import functools
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasource

from clipmaps.schemas import batches as cols
from clipmaps.schemas.errors import ManifestError
from clipmaps.schemas.storage import redact_uri

from .inputs import IMAGE, IMAGE_TYPE, check_rows
from .manifests import FileCount, ManifestFile, read_rows
from .sinks import ERROR_REGION_ID, SHARD_DIGEST
from .sources import MANIFEST_READ

logger = logging.getLogger(__name__)

#: The schema of the reader's rows (the manifest's columns, then the shard, its digest and the refusal columns).
READ_SCHEMA = pa.schema(
    [
        *MANIFEST_READ,
        pa.field(IMAGE, IMAGE_TYPE),  # a Parquet manifest's inline image bytes; null for rows read by URI
        pa.field(cols.SHARD, pa.int64()),
        pa.field(SHARD_DIGEST, pa.string()),
        pa.field(cols.ERROR_STAGE, pa.string()),
        pa.field(cols.ERROR_TYPE, pa.string()),
        pa.field(cols.ERROR_MESSAGE, pa.string()),
        pa.field(ERROR_REGION_ID, pa.string()),
    ]
)


@dataclass(frozen=True)
class Shard:
    """One shard: ``rows`` rows of file ``file`` (index into the plan's files) from row ``start``."""

    id: int
    file: int
    start: int
    rows: int


@dataclass(frozen=True)
class Seek:
    """Where a shard's read starts: the byte ``offset`` of a counted row (None: the file's start, header first) and
    how many rows to skip from there."""

    offset: int | None
    skip: int


def seek_for(count: FileCount, start: int, shard_rows: int) -> Seek:
    """The nearest counted row at or before ``start`` (offsets are counted every ``shard_rows`` rows; an Arrow
    stream's offset is its record batch's, which starts at ``count.offset_rows[k]``)."""
    if not count.offsets:
        return Seek(None, start)
    k = min(start // shard_rows, len(count.offsets) - 1)
    at = count.offset_rows[k] if count.offset_rows else k * shard_rows
    return Seek(count.offsets[k], start - at)


def describe_range(rel: str | None, start: int, rows: int) -> str:
    """``manifest rows 6-7 of part-1.jsonl`` (``manifest rows 6-7`` for a one-file manifest)."""
    where = f"manifest rows {start}-{start + rows - 1}"
    return f"{where} of {rel}" if rel else where


def cap_rows(counts: list[FileCount], limit: int | None) -> list[int]:
    """Rows to use per file: all, or the first ``limit`` rows of the manifest in file order."""
    out, left = [], limit
    for c in counts:
        n = c.rows if left is None else max(0, min(c.rows, left))
        out.append(n)
        if left is not None:
            left -= n
    return out


def fresh_shards(rows: list[int], shard_rows: int) -> list[Shard]:
    """The shards of a fresh job: each file cut into ranges of ``shard_rows`` rows, ids in order."""
    out = []
    for f, n in enumerate(rows):
        for start in range(0, n, shard_rows):
            out.append(Shard(len(out), f, start, min(shard_rows, n - start)))
    return out


@dataclass
class Assignment:
    """The shard plan against an output: ``shards`` (all, by id), ``todo`` (those without a marker), ``verify``
    (complete shards whose file changed: their digest must be computed again), ``conflicts`` (lines naming complete
    shards that no longer match the manifest)."""

    shards: dict[int, Shard]
    todo: list[Shard]
    verify: list[Shard]
    conflicts: list[str]


def _moved_to(files: list[ManifestFile], rel: str) -> int | None:
    """The file whose path ends with ``/rel`` (``wds/00000.tar`` for ``00000.tar``): the root the paths are recorded
    from moved up. Only asked when a marker's file is missing, to word the refusal."""
    return next((i for i, f in enumerate(files) if f.rel.endswith("/" + rel)), None)


def assign_shards(files: list[ManifestFile], rows: list[int], markers: dict[int, dict], shard_rows: int) -> Assignment:
    """Plan the shards of ``files`` (``rows`` per file, after ``input.limit``) against the output's ``markers``
    (shard id → marker with ``file``, ``start``, ``rows``, ``identity``); see the module docstring."""
    by_rel = {f.rel: i for i, f in enumerate(files)}
    shards: dict[int, Shard] = {}
    verify, conflicts = [], []
    covered: dict[int, list[tuple[int, int]]] = {}
    for sid, m in sorted(markers.items()):
        rel, start, n = m.get("file"), int(m.get("start", 0)), int(m.get("rows", 0))
        where = f"shard {sid} ({describe_range(rel, start, n)})"
        if rel is None:
            conflicts.append(f"shard {sid}: its marker names no manifest file (written by an earlier clipmaps)")
            continue
        f = by_rel.get(rel)
        if f is None:
            moved = _moved_to(files, rel)
            if moved is not None:  # the same file under a longer path: the root the paths are recorded from moved
                conflicts.append(
                    f"{where}: the file is now recorded as {files[moved].rel!r}: the input's root folder moved up "
                    "(an entry outside the folder of the others); keep the entries under one folder, or use a new "
                    "output"
                )
            else:
                conflicts.append(f"{where}: the file is no longer part of the manifest")
            continue
        if start + n > rows[f]:
            conflicts.append(f"{where}: the file now has {rows[f]} rows")
            continue
        shard = Shard(sid, f, start, n)
        shards[sid] = shard
        covered.setdefault(f, []).append((start, start + n))
        if m.get("identity") != files[f].identity:
            verify.append(shard)
    fresh = {(s.file, s.start): s for s in fresh_shards(rows, shard_rows)}
    used = set(markers)
    next_id = max([len(fresh), *(s + 1 for s in used)])
    todo = []
    for f, n in enumerate(rows):
        position = 0
        for a, b in [*sorted(covered.get(f, [])), (n, n)]:
            for start in range(position, a, shard_rows):  # the stretch no marker covers, cut from its start
                count = min(shard_rows, a - start)
                candidate = fresh.get((f, start))
                if candidate is not None and candidate.id not in used and candidate.rows == count:
                    sid = candidate.id
                else:
                    sid, next_id = next_id, next_id + 1
                used.add(sid)
                shards[sid] = Shard(sid, f, start, count)
                todo.append(shards[sid])
            position = max(position, b)
    return Assignment(shards=shards, todo=todo, verify=verify, conflicts=conflicts)


# ------------------------------------------------------------------------------------------------ reading shards
def read_shard(
    file: ManifestFile,
    header: list[str] | None,
    shard: Shard,
    seek: Seek,
    storage_options: dict,
    allowed_schemes: tuple[str, ...],
    duplicates: dict[int, str] | None = None,
) -> pa.Table:
    """Read, validate and digest one shard (in a Ray task); every row comes out, refused ones with their error.

    Args:
        duplicates: row in the file → message, for rows whose ``image_id`` an earlier row of the manifest has.

    Returns:
        a table in :data:`READ_SCHEMA`, ``shard.rows`` rows in file order.
    """
    got = read_rows(file, header, seek.offset, seek.skip, shard.start, shard.rows, storage_options)
    table = got.table
    problems = check_rows(table, got.images, allowed_schemes, duplicates=False)
    for i, (etype, message) in got.problems.items():
        problems[i] = (etype, message, None)
    for row, message in (duplicates or {}).items():
        i = row - shard.start
        if 0 <= i < len(problems) and problems[i] is None:
            problems[i] = ("DuplicateImageId", message, None)
    failed = np.array([p is not None for p in problems], dtype=bool)
    n = table.num_rows
    columns = {name: table[name] for name in MANIFEST_READ.names}
    columns[IMAGE] = got.images if got.images is not None else pa.nulls(n, IMAGE_TYPE)
    if failed.any():  # a refused row carries only what its error row needs
        keep = pa.array(~failed)
        for name in ("masks", "prompts", "masks_uri", IMAGE):
            columns[name] = pc.if_else(keep, columns[name], pa.nulls(n, columns[name].type))
    columns[cols.SHARD] = pa.array(np.full(n, shard.id, dtype=np.int64))
    columns[SHARD_DIGEST] = pa.array([got.digest] * n, pa.string())
    columns[cols.ERROR_STAGE] = pa.array(["manifest" if p else None for p in problems], pa.string())
    columns[cols.ERROR_TYPE] = pa.array([p[0] if p else None for p in problems], pa.string())
    columns[cols.ERROR_MESSAGE] = pa.array([p[1] if p else None for p in problems], pa.string())
    columns[ERROR_REGION_ID] = pa.array([p[2] if p else None for p in problems], pa.string())
    return pa.Table.from_pydict(columns, schema=READ_SCHEMA)


def shard_digest(file: ManifestFile, header: list[str] | None, shard: Shard, seek: Seek, storage_options: dict) -> str:
    """The content digest of one shard's rows (a Ray task, for complete shards whose file changed)."""
    return read_rows(file, header, seek.offset, seek.skip, shard.start, shard.rows, storage_options).digest


def _read_task(*args) -> list[pa.Table]:
    return [read_shard(*args)]


class ManifestDatasource(Datasource):
    """A Ray Data datasource (``ray.data.read_datasource``) with one read task per shard to process.

    Holds per shard its range and seek position (and the duplicate rows found in it), never rows.
    """

    def __init__(
        self,
        files: list[ManifestFile],
        counts: list[FileCount],
        shards: list[Shard],
        shard_rows: int,
        storage_options: dict,
        allowed_schemes: tuple[str, ...],
        duplicates: dict[int, dict[int, str]] | None = None,
    ):
        super().__init__()
        self._tasks = []
        for s in shards:
            seek = seek_for(counts[s.file], s.start, shard_rows)
            self._tasks.append(
                (
                    s,
                    (
                        files[s.file],
                        counts[s.file].header,
                        s,
                        seek,
                        storage_options,
                        allowed_schemes,
                        (duplicates or {}).get(s.id),
                    ),
                )  # fmt: skip
            )

    def get_name(self) -> str:
        return "Manifest"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        return [
            ReadTask(
                functools.partial(_read_task, *args),
                BlockMetadata(num_rows=s.rows, size_bytes=None, input_files=[redact_uri(args[0].uri)], exec_stats=None),
                schema=READ_SCHEMA,
            )
            for s, args in self._tasks
        ]


def shard_of_row(shards_by_file: dict[int, list[Shard]], file: int, row: int) -> Shard | None:
    """The shard holding ``row`` of ``file`` (``shards_by_file``: each file's shards sorted by start)."""
    ranges = shards_by_file.get(file, [])
    i = bisect.bisect_right([s.start for s in ranges], row) - 1
    if i >= 0 and row < ranges[i].start + ranges[i].rows:
        return ranges[i]
    return None


def task_error(e: BaseException) -> BaseException:
    """The worker's own exception behind a Ray task error (a ``ManifestError`` names the file and row)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, ManifestError) else e


__all__ = [
    "READ_SCHEMA",
    "Assignment",
    "ManifestDatasource",
    "Seek",
    "Shard",
    "assign_shards",
    "cap_rows",
    "fresh_shards",
    "read_shard",
    "seek_for",
    "shard_digest",
    "shard_of_row",
]
