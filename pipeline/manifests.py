"""Manifest files read by Ray workers: listing, row counts, and reading one row range (a shard) of one file.

``input.uri`` (or its older name ``input.manifest``) is one entry or a list of entries; each entry may hold brace
patterns (``shard-{0000..0099}.tar``, ``{train,val}/``: ``clipmaps.pipeline.uris``), and each string it expands to
names one of (a path with pattern characters that exists is taken literally):

* **a file** — ``.parquet``/``.pq``, ``.jsonl``/``.ndjson`` or ``.csv`` (text optionally ``.gz``/``.bz2``/``.xz``/
  ``.zst``), ``.tar`` (WebDataset) or ``.arrow`` (Arrow stream); ``input.format`` overrides the extension;
* **a folder** — every input file under it, recursively, in path order (names starting with ``_`` or ``.`` are
  skipped, as Spark/Hive writers' ``_SUCCESS`` and ``.crc`` files; with ``input.format`` set, every other file; with
  ``webdataset``/``arrow`` only ``.tar``/``.arrow`` files). A folder written by ``datasets``' ``save_to_disk``
  (``state.json``, or ``dataset_dict.json`` and ``input.split``) is its data files (``clipmaps.pipeline.hfdatasets``);
* **a glob pattern** — ``s3://bucket/manifests/part-*.jsonl`` (fsspec's glob: ``*``, ``?``, ``[...]``, ``**``).

All files are read in path order. Paths are recorded relative to the *manifest root*, so a shard marker stays valid
when the bucket is mounted elsewhere. For one entry without braces the root is the folder, or the glob's fixed
prefix; a manifest that is one plain file is recorded as ``""``, so the file may be renamed or moved (its rows are
what counts: a re-run compares their digests). For a list or a brace pattern the root is the common folder of what
the entries fix (``clipmaps.pipeline.uris.entry_folder``), so that growing a range or a list keeps the recorded
paths: the new files become new shards, the finished ones are kept. Entries that do not exist are refused together
(how many, and the first few); the existence of many files in one folder is read from one listing of it. The driver
lists the files and holds one :class:`ManifestFile` per file; it never reads rows:

* row counts: Parquet from the footer (and whether it has masks/prompts from the column statistics); JSONL and CSV
  by one Ray task per file (:func:`count_file`) that also returns the byte offset of every ``shard_rows``-th row, so
  that the task reading a shard seeks to it instead of scanning from the start. A compressed text file cannot seek:
  its shards read (decompress) from the start of the file, which costs O(file) per shard; split big compressed
  manifests into several files, or use Parquet. Arrow streams (``datasets`` folders) from their messages' metadata,
  noting the record batch holding every ``shard_rows``-th row (``clipmaps.pipeline.hfdatasets``).
* rows: :func:`read_rows` (in a worker) reads rows ``[start, start + rows)`` of a file and normalises them
  (``clipmaps.pipeline.sources``' rules); a row that cannot be parsed or has a value of the wrong type becomes an
  error of that row (naming the file and row), not of the whole manifest.

JSONL rows are the non-blank lines; CSV rows are the records after the header (a quoted field may hold newlines;
blank lines between records are skipped, as Python's ``csv`` does).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from clipmaps.schemas.datasets import MANIFEST
from clipmaps.schemas.errors import ManifestError
from clipmaps.schemas.storage import filesystem, has_glob_characters, redact_text, redact_uri

from .hfdatasets import (
    DATASET_DICT_FILE,
    count_stream,
    data_files,
    folder_kind,
    missing_id_message,
    read_stream_rows,
    split_folder,
)
from .inputs import IMAGE, image_bytes, image_digests, image_type_problem
from .sources import (
    _COMPRESSION_EXT,
    _CSV_EXT,
    _JSONL_EXT,
    _PARQUET_EXT,
    MANIFEST_READ,
    _check_columns,
    _conform_arrow,
    _norm_row,
    _parse_prompt_string,
    _short,
)
from .uris import common_folder, describe, entries_of, entry_folder, expand, is_pattern, mixed_store_problem, relative
from .webdataset import SampleFields, TruncatedTar, count_tar, shard_name, tar_records

logger = logging.getLogger(__name__)

#: Manifest columns a shard's content digest covers (in this order, per row).
DIGEST_COLUMNS = ("image_id", "image_uri", "masks", "prompts", "width", "height", "masks_uri")
#: Columns whose presence in a row decides what a job may do (MaskInversion needs masks; prompts: manifest).
FLAG_COLUMNS = ("masks", "prompts", "masks_uri")


@dataclass(frozen=True)
class ManifestFile:
    """One manifest file as the driver lists it.

    Attributes:
        uri: the file's full URI (``s3://bucket/key``, a local path).
        rel: its path relative to the manifest root (what markers record); ``""`` for a one-file manifest.
        format: ``parquet``, ``jsonl``, ``csv``, ``webdataset`` or ``arrow``.
        compressed: a compressed text file (read from its start; no seeking).
        size: bytes.
        identity: ``"<size>:<ETag or mtime>"``: a changed identity makes a re-run check the file's complete shards'
            digests again.
        webdataset: where a WebDataset tar's samples give prompts and masks (``input.webdataset``); None: the
            defaults (``clipmaps.pipeline.webdataset.SampleFields``).
    """

    uri: str
    rel: str
    format: str
    compressed: bool
    size: int
    identity: str
    webdataset: SampleFields | None = None


@dataclass
class FileCount:
    """What counting one file found (small: one offset per shard).

    Attributes:
        rows: rows in the file.
        offsets: byte offset of rows ``0, k, 2k, …`` (``k`` = ``shard_rows``); empty for Parquet and compressed files.
            For an Arrow stream, the offset of the record batch holding that row (see ``offset_rows``).
        header: a CSV file's column names.
        flags: column → whether some row has a non-empty value (``masks``, ``prompts``, ``masks_uri``).
        estimated: ``rows`` (and ``flags``) come from a sample (:func:`sample_count`), not the whole file.
    """

    rows: int
    offsets: list[int] = field(default_factory=list)
    header: list[str] | None = None
    flags: dict[str, bool] = field(default_factory=dict)
    estimated: bool = False
    #: the row each offset is at, when it is not ``k`` times ``shard_rows`` (an Arrow record batch's first row)
    offset_rows: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ listing
def list_manifest_files(
    uri: str | Sequence[str], storage_options: dict, fmt: str = "auto", *, split: str | None = None
) -> tuple[str | None, list[ManifestFile]]:
    """The input files ``uri`` names (see the module docstring), sorted by path, and the manifest root (None: one
    plain file, recorded as ``""``).

    Args:
        uri: ``input.uri``: one entry or a list; an entry may hold brace patterns (``clipmaps.pipeline.uris``).
        fmt: ``input.format``.
        split: ``input.split``, the split of a ``datasets`` DatasetDict folder (``clipmaps.pipeline.hfdatasets``).

    Raises:
        ManifestError: nothing there (for a list or pattern: how many entries do not exist, and the first few), no
            input file in a folder or matching a pattern, a file of unknown format, a single file of 0 bytes, entries
            in different stores, a DatasetDict without a chosen split, or the store cannot be listed (naming the
            redacted URI).
    """
    entries = entries_of(uri)
    shown = describe(uri)
    if not entries:
        raise ManifestError("input.uri names no file, folder or pattern")
    problem = mixed_store_problem(entries)
    if problem is not None:
        raise ManifestError(f"input.uri: {problem}")
    try:
        listing = _Listing(storage_options, fmt, split, single=isinstance(uri, str))
        for entry in entries:
            listing.add(entry)
        return listing.result(shown)
    except ManifestError:
        raise
    except Exception as e:  # noqa: BLE001 - bad protocol, permissions, unreachable store
        why = _short(redact_text(str(e), storage_options=storage_options, uris=entries))  # redacted before cutting
        raise ManifestError(f"cannot read manifest {shown}: {type(e).__name__}: {why}") from None


#: Entries of one folder above which their existence is read from one listing of the folder, not one request each.
_LIST_PARENT_ABOVE = 16


class _Listing:
    """The files of ``input.uri``'s entries, gathered entry by entry (driver side; state per file, never per row)."""

    def __init__(self, storage_options: dict, fmt: str, split: str | None, *, single: bool):
        self.options, self.fmt, self.split, self.single = storage_options, fmt, split, single
        self.fs = None
        self.remote = False
        self.found: dict[str, tuple[dict, str | None]] = {}  # path → (fsspec info, format forced by the folder)
        self.folders: list[str | None] = []  # per entry, the folder it fixes (None: one plain file, recorded as "")
        self.missing: list[str] = []
        self.expanded = 0
        self.used_split = False

    def add(self, entry: str) -> None:
        fs, path = filesystem(entry, self.options)
        self.fs, self.remote = fs, "://" in entry
        pattern = is_pattern(path) and not fs.exists(path)  # an existing path with braces is taken literally
        items = expand(path) if pattern else [path]
        self.expanded += len(items)
        one = self.single and not pattern
        plain = []
        for item in items:
            if has_glob_characters(item) and not fs.exists(item):
                infos = [i for i in fs.glob(item, detail=True).values() if i.get("type", "file") == "file"]
                if not infos and one:
                    raise ManifestError(f"manifest pattern {redact_uri(entry)} matches no file")
                if not infos:
                    self.missing.append(self._shown(item))
                self._take(infos)
                if not pattern:
                    self.folders.append(entry_folder(item, kind="pattern"))
            else:
                plain.append(item)
        if pattern:
            self.folders.append(entry_folder(path, kind="pattern"))
        for item, info in self._infos(plain).items():
            if info is None:
                if one:
                    raise ManifestError(f"cannot read manifest {redact_uri(entry)}: file not found")
                self.missing.append(self._shown(item))
            elif info.get("type") == "directory":
                folder = self._folder(item, entry if one else self._shown(item))
                if not pattern:
                    self.folders.append(folder)
            else:
                if one and info.get("size") == 0:
                    raise ManifestError(f"manifest {redact_uri(entry)} is empty: the file has 0 bytes")
                self._take([info])
                if not pattern:
                    self.folders.append(None if one else entry_folder(item, kind="file"))

    def _infos(self, paths: list[str]) -> dict[str, dict | None]:
        """Path → fsspec info (None: not there), by one listing per folder holding many of them, else one request
        each. Cached listings of those folders are dropped first (a re-run in the same process sees new files)."""
        out: dict[str, dict | None] = dict.fromkeys(paths)
        by_parent: dict[str, list[str]] = {}
        for p in paths:
            by_parent.setdefault(posixpath.dirname(p.rstrip("/")), []).append(p)
        for parent, group in by_parent.items():
            self.fs.invalidate_cache(parent)
            if len(group) > _LIST_PARENT_ABOVE:
                try:
                    listed = {i["name"].rstrip("/"): i for i in self.fs.ls(parent, detail=True)}
                except FileNotFoundError:
                    listed = {}
                for p in group:
                    out[p] = listed.get(p.rstrip("/"))
                continue
            for p in group:
                try:
                    out[p] = self.fs.info(p)
                except FileNotFoundError:
                    out[p] = None
        return out

    def _folder(self, path: str, shown: str) -> str:
        """List a folder (a ``datasets`` save_to_disk folder by its ``state.json``/``dataset_dict.json``); returns the
        folder its files are recorded under (a DatasetDict's split folder)."""
        root = path.rstrip("/")
        found = {i["name"]: i for i in self.fs.find(root, detail=True).values() if i.get("type", "file") == "file"}
        kind = folder_kind(set(found), root) if self.fmt in ("auto", "arrow") else None
        if kind == "dataset_dict":
            root = split_folder(self.fs, root, self.split, redact_uri(shown))
            if folder_kind(set(found), root) != "dataset":
                raise ManifestError(f"{redact_uri(shown)}: split folder {posixpath.basename(root)!r} has no state.json")
        elif kind == "dataset" and self.split is not None and posixpath.basename(root) != self.split:
            parent = posixpath.dirname(root)
            if self.fs.exists(posixpath.join(parent, DATASET_DICT_FILE)):  # pointed into another split's folder
                raise ManifestError(
                    f"{redact_uri(shown)} is the split {posixpath.basename(root)!r} of a DatasetDict, but input.split "
                    f"is {self.split!r}"
                )
        if kind is not None:
            self.used_split = True
            self._take(data_files(self.fs, root, self.split, found, redact_uri(shown)), forced="arrow")
            return root
        infos = [i for name, i in found.items() if _listed(posixpath.relpath(name, root), self.fmt)]
        if not infos:
            raise ManifestError(
                f"manifest folder {redact_uri(shown)} holds no .parquet, .jsonl, .ndjson, .csv, .tar or .arrow file"
            )
        self._take(infos)
        return root

    def _take(self, infos: Iterable[dict], forced: str | None = None) -> None:
        for info in infos:
            name = info["name"]
            if name in self.found:
                logger.warning("input file %s is named by more than one entry; read once", redact_uri(name))
                continue
            self.found[name] = (info, forced)

    def _shown(self, path: str) -> str:
        return redact_uri(self.fs.unstrip_protocol(path) if self.remote else path)

    def result(self, shown: str) -> tuple[str | None, list[ManifestFile]]:
        if self.missing:
            n = len(self.missing)
            raise ManifestError(
                f"{n} of {self.expanded} entries of input {shown} do not exist: {', '.join(self.missing[:5])}"
                + (", …" if n > 5 else "")
            )
        if self.split is not None and not self.used_split:
            raise ManifestError(
                f"input.split is {self.split!r}, but input {shown} is not a datasets folder written by save_to_disk"
            )
        root = None if self.folders == [None] else common_folder([f or "" for f in self.folders])
        files = []
        for name, (info, forced) in sorted(self.found.items()):
            kind, compressed = (forced, False) if forced else file_format(name, self.fmt)
            if kind is None:
                raise ManifestError(
                    f"cannot read manifest {self._shown(name)}: unknown format (expected a .parquet, .jsonl, "
                    ".ndjson, .csv, .tar or .arrow file, or set input.format)"
                )
            if not info.get("size") and len(self.found) > 1:
                logger.warning("manifest file %s has 0 bytes; skipped", self._shown(name))
                continue
            version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
            files.append(
                ManifestFile(
                    uri=self.fs.unstrip_protocol(name) if self.remote else name,
                    rel="" if root is None else relative(name, root),
                    format=kind,
                    compressed=compressed,
                    size=int(info.get("size") or 0),
                    identity=f"{int(info.get('size') or 0)}:{str(version).strip(chr(34))}",
                )
            )
        kinds = {f.format for f in files}
        if self.fmt == "auto" and "webdataset" in kinds and len(kinds) > 1:
            # img2dataset writes a .parquet (and a _stats.json) beside each tar: read as a manifest, it lacks image_id
            raise ManifestError(
                f"input {shown} holds WebDataset tars and {', '.join(sorted(kinds - {'webdataset'}))} files "
                "(img2dataset writes a .parquet beside each tar): set input.format: webdataset to read the tars "
                "only, or name the files to read"
            )
        return root, files


def file_format(name: str, fmt: str = "auto") -> tuple[str | None, bool]:
    """``(format, compressed)`` of an input file by its name (``fmt`` overrides the extension; ``manifest`` reads
    Parquet, JSON lines and CSV by their extensions only)."""
    lower = name.lower()
    compressed = lower.endswith(_COMPRESSION_EXT)
    if compressed:
        lower = lower.rsplit(".", 1)[0]
    if fmt not in ("auto", "manifest"):
        return fmt, compressed and fmt not in ("parquet", "webdataset", "arrow")
    if fmt == "auto" and not compressed:
        if lower.endswith(".tar"):  # WebDataset shards (``clipmaps.pipeline.webdataset``)
            return "webdataset", False
        if lower.endswith(".arrow"):  # Arrow IPC streams (``clipmaps.pipeline.hfdatasets``)
            return "arrow", False
    if lower.endswith(_PARQUET_EXT) and not compressed:
        return "parquet", False
    if lower.endswith(_JSONL_EXT):
        return "jsonl", compressed
    if lower.endswith(_CSV_EXT):
        return "csv", compressed
    return None, compressed


def _listed(rel: str, fmt: str) -> bool:
    if any(part.startswith(("_", ".")) for part in rel.split("/")):
        return False
    if fmt == "webdataset":  # img2dataset writes a .parquet and a _stats.json beside each tar: only tars are shards
        return rel.lower().endswith(".tar")
    if fmt == "arrow":
        return rel.lower().endswith(".arrow")
    return fmt not in ("auto", "manifest") or file_format(rel, fmt)[0] is not None


# ------------------------------------------------------------------------------------------------ counting
def count_file(file: ManifestFile, shard_rows: int, storage_options: dict) -> FileCount:
    """Count ``file``'s rows (run as a Ray task for text files; Parquet reads only the footer).

    Raises:
        ManifestError: missing required columns, a Parquet column of the wrong type, an unreadable file (naming
            the redacted file URI).
    """
    shown = redact_uri(file.uri)
    try:
        fs, path = filesystem(file.uri, storage_options)
        if file.format == "arrow":
            return _count_arrow(fs, path, shard_rows, shown)
        if file.format == "parquet":
            return _count_parquet(fs, path, shown)
        if file.format == "webdataset":
            with fs.open(path, "rb") as f:
                rows, offsets, flags = count_tar(f, shard_rows, file.webdataset)
            return FileCount(rows=rows, offsets=offsets, flags=flags)
        with _open_binary(fs, path, file) as f:
            if file.format == "jsonl":
                count = _count_jsonl(f, shard_rows, file.compressed)
                if count.rows:  # a key no line mentions: the whole file lacks the column
                    _check_columns([c for c in MANIFEST.names if count.flags.get(f"key:{c}")], shown)
                return count
            return _count_csv(f, shard_rows, file.compressed, shown)
    except ManifestError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"cannot read manifest {shown}: file not found") from None
    except Exception as e:  # noqa: BLE001 - corrupt Parquet, I/O errors
        why = _short(redact_text(str(e), storage_options=storage_options, uris=[file.uri]))
        raise ManifestError(f"cannot read manifest {shown}: {type(e).__name__}: {why}") from None


def count_files(
    files: list[ManifestFile], shard_rows: int, storage_options: dict, *, retries: int = 3
) -> list[FileCount]:
    """:func:`count_file` for every file, one Ray task each (``ray`` initialised); in file order.

    Raises:
        ManifestError: the first file that cannot be used, as the worker reported it.
    """
    import ray

    task = ray.remote(count_file).options(num_cpus=0.5, max_retries=retries, retry_exceptions=[OSError])
    refs = [task.remote(f, shard_rows, storage_options) for f in files]
    try:
        return ray.get(refs)
    except Exception as e:  # noqa: BLE001 - a RayTaskError: raise the worker's own ManifestError
        cause = getattr(e, "cause", None)
        if isinstance(cause, ManifestError):
            raise ManifestError(str(cause)) from None
        raise


#: Bytes of a text manifest a dry run reads to estimate its rows.
SAMPLE_BYTES = 4 << 20


def sample_count(file: ManifestFile, shard_rows: int, storage_options: dict) -> FileCount:
    """Row count and column flags without reading a whole file (``--dry-run``, on the driver): Parquet from its
    footer; a text file exactly when it is at most :data:`SAMPLE_BYTES`, else estimated from its first
    :data:`SAMPLE_BYTES` (rows ≈ size / bytes per sampled row; ``estimated`` set; a compressed file's size is its
    compressed size, so its estimate is low).

    Raises:
        ManifestError: as :func:`count_file`.
    """
    if file.format in ("parquet", "webdataset", "arrow") or (file.size <= SAMPLE_BYTES and not file.compressed):
        return count_file(file, shard_rows, storage_options)
    shown = redact_uri(file.uri)
    try:
        fs, path = filesystem(file.uri, storage_options)
        with _open_binary(fs, path, file) as f:
            head = f.read(SAMPLE_BYTES)
            more = bool(f.read(1))
    except Exception as e:  # noqa: BLE001
        why = _short(redact_text(str(e), storage_options=storage_options, uris=[file.uri]))
        raise ManifestError(f"cannot read manifest {shown}: {type(e).__name__}: {why}") from None
    if more:
        head = head[: head.rfind(b"\n") + 1]  # whole lines only
    sample = io.BytesIO(head)
    count = (
        _count_jsonl(sample, shard_rows, True)
        if file.format == "jsonl"
        else _count_csv(sample, shard_rows, True, shown)
    )
    if more and count.rows:
        count.rows = max(count.rows, round(file.size * count.rows / max(1, len(head))))
        count.estimated = True
    return count


def _open_binary(fs, path: str, file: ManifestFile):
    f = fs.open(path, "rb")
    if not file.compressed:
        return f
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    return compr[infer_compression(path)](f, mode="rb")


def _count_parquet(fs, path: str, shown: str) -> FileCount:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    _check_schema(schema, shown)
    flags = {c: c in schema.names and _parquet_has_values(meta, c) for c in FLAG_COLUMNS}
    return FileCount(rows=meta.num_rows, flags=flags)


def _check_schema(schema: pa.Schema, shown: str) -> None:
    """Refuse an Arrow schema (Parquet, Arrow stream) without the manifest's required columns, with an ``image``
    column that holds no image bytes, or with a manifest column of the wrong type."""
    names = schema.names
    if IMAGE in names:  # images inside the file: the column stands for image_uri, and is not an extra column
        problem = image_type_problem(schema.field(IMAGE).type)
        if problem is not None:
            raise ManifestError(f"manifest {shown}: {problem}")
        names = [n for n in names if n != IMAGE] + (["image_uri"] if "image_uri" not in names else [])
    _check_columns(names, shown)
    columns = [n for n in MANIFEST.names if n in schema.names]
    _conform_arrow(schema.empty_table().select(columns), shown)  # a column of the wrong type: refused now


def _count_arrow(fs, path: str, shard_rows: int, shown: str) -> FileCount:
    """Count an Arrow stream file from its messages' metadata (``clipmaps.pipeline.hfdatasets``); flags say which
    optional columns exist (their values are not read)."""
    with fs.open(path, "rb", block_size=1 << 16) as f:  # small reads: metadata only, bodies are skipped
        try:
            count = count_stream(f, shard_rows)
        except ValueError as e:
            raise ManifestError(f"cannot read manifest {shown}: {redact_text(str(e))}") from None
    if "image_id" not in count.schema.names:
        raise ManifestError(missing_id_message(shown, count.schema.names))
    _check_schema(count.schema, shown)
    flags = {c: c in count.schema.names for c in FLAG_COLUMNS}
    return FileCount(rows=count.rows, offsets=count.offsets, offset_rows=count.offset_rows, flags=flags)


def _parquet_has_values(meta, column: str) -> bool:
    """Whether some row of ``column`` holds a value, from the footer's statistics: a leaf with fewer nulls than
    values; True when a chunk has no statistics (unknown)."""
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] != column:
                continue
            stats = chunk.statistics
            if stats is None or not stats.has_null_count or stats.null_count < chunk.num_values:
                return True
    return False


def _count_jsonl(f, shard_rows: int, compressed: bool) -> FileCount:
    rows, pos, offsets = 0, 0, []
    flags = dict.fromkeys(FLAG_COLUMNS, False)
    keys = {c: f'"{c}"'.encode() for c in FLAG_COLUMNS}
    required = {c: f'"{c}"'.encode() for c in MANIFEST.names}
    for line in f:
        if line.strip():
            if rows % shard_rows == 0 and not compressed:
                offsets.append(pos)
            rows += 1
            if required:  # which column names appear at all (until every one has)
                for c in [c for c, key in required.items() if key in line]:
                    flags[f"key:{c}"] = True
                    del required[c]
            for c, key in keys.items():
                if not flags[c] and key in line:  # parse only rows that may set a flag still unset
                    with contextlib.suppress(ValueError, AttributeError):
                        flags[c] = _filled(json.loads(line).get(c))
        pos += len(line)
    return FileCount(rows=rows, offsets=offsets, flags=flags)


def _count_csv(f, shard_rows: int, compressed: bool, shown: str) -> FileCount:
    pos, header_bytes, header = 0, b"", None
    for line in f:  # the header record (its fields may be quoted)
        header_bytes += line
        pos += len(line)
        if header_bytes.count(b'"') % 2 == 0:
            break
    text = header_bytes.decode("utf-8-sig")
    fields = next(csv.reader(io.StringIO(text)), None)
    if not fields:
        raise ManifestError(f"manifest {shown} is empty: no header row")
    header = [h.strip() for h in fields]
    _check_columns(header, shown)
    wanted = {c: header.index(c) for c in FLAG_COLUMNS if c in header}
    flags = dict.fromkeys(FLAG_COLUMNS, False)
    rows, in_quotes, record, offsets = 0, False, b"", []
    for line in f:
        if not in_quotes:
            if not line.strip():  # a blank line between records: not a row
                pos += len(line)
                continue
            if rows % shard_rows == 0 and not compressed:
                offsets.append(pos)
            rows += 1
            record = b""
        if any(not flags[c] for c in wanted):
            record += line
        in_quotes ^= line.count(b'"') % 2 == 1
        if not in_quotes and record:
            values = next(csv.reader(io.StringIO(record.decode("utf-8", "replace"))), [])
            for c, i in wanted.items():
                flags[c] = flags[c] or (i < len(values) and values[i].strip() not in ("", "[]"))
            record = b""
        pos += len(line)
    return FileCount(rows=rows, offsets=offsets, header=header, flags=flags)


def _filled(v: Any) -> bool:
    return v is not None and v != "" and v != []


# ------------------------------------------------------------------------------------------------ reading a range
@dataclass
class RowsRead:
    """Rows ``[start, start + n)`` of one file, normalised: ``table`` (``MANIFEST_READ``; a row that could not be
    read is all null), ``problems`` (row → ``(error_type, message)`` for those), ``digest`` (32 hex digits)."""

    table: pa.Table
    problems: dict[int, tuple[str, str]]
    digest: str
    #: a Parquet file's inline images (``binary``, null where a row has none), or None (no ``image`` column)
    images: pa.Array | None = None


def read_rows(
    file: ManifestFile,
    header: list[str] | None,
    offset: int | None,
    skip: int,
    start: int,
    rows: int,
    storage_options: dict,
    *,
    ids_only: bool = False,
) -> RowsRead:
    """Read and normalise rows ``[start, start + rows)`` of ``file`` (in a worker).

    Args:
        header: a CSV file's column names (from :func:`count_file`).
        offset: byte offset of a counted row at or before ``start`` (text files); None: read from the file's start.
        skip: rows to skip from ``offset`` (or from the start) to reach ``start``.
        ids_only: normalise only ``image_id`` (the other columns null; the digest is then meaningless).

    Raises:
        ManifestError / OSError: the file cannot be read (the task is retried, then the job stops naming it).
    """
    fs, path = filesystem(file.uri, storage_options)
    if file.format == "arrow":
        return _read_arrow_rows(fs, path, file, offset, skip, start, rows, ids_only)
    if file.format == "parquet":
        return _read_parquet_rows(fs, path, file, start, rows, ids_only)
    if file.format == "webdataset":
        return _read_tar_rows(fs, path, file, offset, skip, start, rows, ids_only)
    with _open_binary(fs, path, file) as f:
        if offset is not None:
            f.seek(offset)
        if file.format == "jsonl":
            raw = _jsonl_records(f, skip)
        else:  # without an offset the read starts at the file's start, header first
            raw = _csv_records(f, header, skip, header_first=offset is None)
        # streamed: a parsed row is dropped once normalised (an ids-only pass reads 200,000 rows per task)
        return _normalise(file, start, (next(raw, None) for _ in range(rows)), ids_only)


def _jsonl_records(f, skip: int):
    """Yield each non-blank line's parsed object (or the ``ValueError`` and the line) after skipping ``skip``."""
    for line in f:
        if not line.strip():
            continue
        if skip > 0:
            skip -= 1
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            yield ValueError(f"not valid JSON ({e})"), line[:200]
            continue
        if not isinstance(obj, dict):
            yield ValueError(f"expected a JSON object, got {type(obj).__name__}"), line[:200]
            continue
        yield obj, line


def _csv_records(f, header, skip: int, *, header_first: bool):
    """Yield each CSV record as a dict after skipping ``skip`` records (and the header, with ``header_first``)."""
    text = io.TextIOWrapper(f, encoding="utf-8-sig" if header_first else "utf-8", newline="")
    reader = csv.reader(text)
    if header_first:
        next(reader, None)
    for values in reader:
        if not values:
            continue
        if skip > 0:
            skip -= 1
            continue
        rec = {k: (v if v != "" else None) for k, v in zip(header, values) if k in MANIFEST.names}
        if rec.get("masks") is not None:
            try:
                rec["masks"] = json.loads(rec["masks"])
            except ValueError as e:
                yield ValueError(f"column 'masks' is not a JSON list ({e})"), ",".join(values)[:200]
                continue
        yield rec, ",".join(values)


def _normalise(
    file: ManifestFile,
    start: int,
    records: Iterable,
    ids_only: bool = False,
    image_hashes: list[str | None] | None = None,
) -> RowsRead:
    rows, problems = [], {}
    digest = hashlib.sha256()
    shown = redact_uri(file.uri)
    for i, rec in enumerate(records):
        where = f"manifest {shown} row {start + i}"
        if rec is None:
            raise ManifestError(f"{where}: the file has fewer rows than when it was counted (changed during the run)")
        obj, raw = rec
        if ids_only:
            image_id = obj.get("image_id") if isinstance(obj, dict) else None
            ok = isinstance(image_id, str) or (isinstance(image_id, int) and not isinstance(image_id, bool))
            rows.append({"image_id": str(image_id) if ok else None})
            continue
        try:
            if isinstance(obj, Exception):
                raise ManifestError(f"{where}: {obj}")
            if file.format == "csv" and obj.get("prompts") is not None:
                obj["prompts"] = _parse_prompt_string(obj["prompts"], where)
            row = _norm_row(obj, where)
        except ManifestError as e:
            problems[i] = ("MalformedRow", str(e))
            rows.append(dict.fromkeys(MANIFEST_READ.names))
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            digest.update(json.dumps({"unreadable": text}).encode() + b"\n")
            continue
        rows.append(row)
        values = [row.get(c) for c in DIGEST_COLUMNS]
        if image_hashes is not None and image_hashes[i] is not None:
            values.append({IMAGE: image_hashes[i]})  # only rows with inline bytes: other digests stay as they were
        digest.update(_canonical(values) + b"\n")
    table = pa.Table.from_pylist(rows, schema=MANIFEST_READ)
    return RowsRead(table=table, problems=problems, digest=digest.hexdigest()[:32])


def _read_parquet_rows(fs, path: str, file: ManifestFile, start: int, rows: int, ids_only: bool) -> RowsRead:
    """Rows ``[start, start + rows)`` of a Parquet file: the row groups that hold them, streamed in batches so that
    only the wanted rows are kept (a big row group is still decoded up to the range's end: Parquet has no row offset
    to seek to, so manifests should have row groups of a few thousand rows)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = ["image_id"] if ids_only else [n for n in MANIFEST.names if n in pf.schema_arrow.names]
        if not ids_only and IMAGE in pf.schema_arrow.names:
            names.append(IMAGE)
        groups, first, seen = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > start and seen < start + rows:
                groups.append(g)
                first = seen if first is None else first
            seen += n
        parts, position = [], first or 0
        batch = max(1024, min(rows, 65_536))
        for b in pf.iter_batches(batch_size=batch, row_groups=groups, columns=names) if groups else []:
            lo, hi = max(start, position), min(start + rows, position + b.num_rows)
            if hi > lo:
                parts.append(b.slice(lo - position, hi - lo))
            position += b.num_rows
            if position >= start + rows:
                break
    return _table_rows(file, start, pa.Table.from_batches(parts) if parts else None, ids_only)


def _read_arrow_rows(
    fs, path: str, file: ManifestFile, offset: int | None, skip: int, start: int, rows: int, ids_only: bool
) -> RowsRead:
    """Rows ``[start, start + rows)`` of an Arrow stream file: from the record batch at ``offset`` (counted), only the
    batches that hold them are decoded."""
    wanted = ["image_id"] if ids_only else [*MANIFEST.names, IMAGE]
    with fs.open(path, "rb") as f:
        table = read_stream_rows(f, offset, skip, rows, wanted)
    return _table_rows(file, start, table, ids_only)


def _table_rows(file: ManifestFile, start: int, table: pa.Table | None, ids_only: bool) -> RowsRead:
    """Normalise rows read from a columnar file (Parquet, Arrow), its ``image`` column kept as bytes and digested."""
    images = None
    if table is not None and IMAGE in table.column_names:
        # kept as one Arrow array (never Python objects per row) beside the normalised rows
        images = image_bytes(table[IMAGE])
        table = table.drop_columns([IMAGE])
    objs = table.to_pylist() if table is not None else []
    got = _normalise(file, start, ((o, o) for o in objs), ids_only, image_digests(images, len(objs)))
    got.images = images
    return got


def _read_tar_rows(
    fs, path: str, file: ManifestFile, offset: int | None, skip: int, start: int, rows: int, ids_only: bool
) -> RowsRead:
    """Samples ``[start, start + rows)`` of a WebDataset tar (``clipmaps.pipeline.webdataset``), with their images."""
    with fs.open(path, "rb") as f:
        got = list(tar_records(f, offset, skip, rows, shard_name(file.rel, file.uri), file.webdataset))
    records = [None if g is None else (g[0], g[1]) for g in got]
    images = None if ids_only else pa.array([g[2] if g is not None else None for g in got], pa.binary())
    out = _normalise(file, start, iter(records), ids_only, None if ids_only else image_digests(images, len(got)))
    out.images = images
    if out.problems and not ids_only:  # a sample that failed to parse keeps its id (shard/key) on its error row
        ids = out.table["image_id"].to_pylist()
        for i in out.problems:
            ids[i] = json.loads(got[i][1])["image_id"] if got[i] is not None else None
            if got[i] is not None and isinstance(got[i][0], TruncatedTar):  # the tar cut off: its one error row
                out.problems[i] = ("TruncatedTar", out.problems[i][1])
        out.table = out.table.set_column(out.table.schema.get_field_index("image_id"), "image_id", pa.array(ids))
    return out


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


__all__ = [
    "DIGEST_COLUMNS",
    "FileCount",
    "ManifestFile",
    "RowsRead",
    "count_file",
    "file_format",
    "list_manifest_files",
    "read_rows",
]
