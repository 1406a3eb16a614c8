"""Hugging Face ``datasets`` folders written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` as input,
and the Arrow IPC stream files they hold (``input.format: arrow``, or ``auto`` for such a folder or ``.arrow``
names).

A ``Dataset`` folder holds ``state.json`` (its ``_data_files`` list the data files in order), ``dataset_info.json``
and ``data-0000k-of-0000N.arrow``: Arrow IPC *stream* files of record batches (``datasets`` writes batches of a few
hundred rows; fewer for images). A ``DatasetDict`` folder holds ``dataset_dict.json`` (``{"splits": [...]}``) and one
``Dataset`` folder per split: the split is chosen with ``input.split``, or by pointing ``input.uri`` at the split's
folder; without one the input is refused, naming the splits. Rows are read like a Parquet manifest's: ``image_id``,
and ``image`` (the ``datasets`` image struct ``{bytes, path}``, which ``save_to_disk`` always fills with the bytes) or
``image_uri``, plus the optional manifest columns; other columns (``label``…) are ignored. A dataset without an
``image_id`` column is refused with the fix (add one, or rename an id column, and save again): ids made from row
positions would silently name other images after a re-save with another order or sharding.

Counting a file (one Ray task per file) reads each message's *metadata* only — a few hundred bytes — and seeks past
its body, recording the row count, and for every ``shard_rows``-th row the byte offset of the record batch holding
it and that batch's first row; a shard's read then reads the schema message at the file's start, seeks to its batch
and decodes only the batches it needs. A stream cannot read one column alone, so the duplicate-id pass
(``clipmaps.pipeline.dupes``) reads each shard's batches whole, images included, as it reads a tar's samples. A file
whose schema has dictionary-encoded columns (not written by ``datasets``) has no offsets: its shards decode the stream
from the start (O(file) each). An Arrow IPC *file* (``ARROW1`` magic, Feather v2) is read the same way: its body is a
stream. ``--dry-run`` counts each file on the driver the same way (one small read per record batch).
"""

from __future__ import annotations

import json
import logging
import posixpath
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from clipmaps.schemas.errors import ManifestError

logger = logging.getLogger(__name__)

#: ``save_to_disk``'s marker files.
STATE_FILE = "state.json"
DATASET_DICT_FILE = "dataset_dict.json"
_FILE_MAGIC = b"ARROW1"
_CONTINUATION = 0xFFFFFFFF
# Message.fbs: the MessageHeader union's members
_SCHEMA, _DICTIONARY_BATCH, _RECORD_BATCH = 1, 2, 3


# ------------------------------------------------------------------------------------------------ folders
def folder_kind(names: set[str], folder: str) -> str | None:
    """``dataset_dict``, ``dataset`` or None: what a folder is, from the paths listed under it (``names``)."""
    if posixpath.join(folder, DATASET_DICT_FILE) in names:
        return "dataset_dict"
    if posixpath.join(folder, STATE_FILE) in names:
        return "dataset"
    return None


def split_folder(fs, folder: str, split: str | None, shown: str) -> str:
    """The folder of ``split`` in the ``DatasetDict`` folder ``folder``.

    Raises:
        ManifestError: no split chosen, or one the folder does not have (naming the splits it has), or an unreadable
            ``dataset_dict.json``.
    """
    splits = _read_json(fs, posixpath.join(folder, DATASET_DICT_FILE), shown).get("splits") or []
    names = ", ".join(map(str, splits)) or "none"
    if split is None:
        raise ManifestError(
            f"{shown} is a datasets DatasetDict with splits {names}: choose one with input.split (or point input.uri "
            "at the split's folder)"
        )
    if split not in splits:
        raise ManifestError(f"{shown} has no split {split!r} (its splits: {names}); set input.split to one of them")
    return posixpath.join(folder, split)


def data_files(fs, folder: str, split: str | None, found: dict[str, dict], shown: str) -> list[dict]:
    """The data files of the ``Dataset`` folder ``folder`` in ``state.json``'s order, as fsspec infos.

    Args:
        split: ``input.split``; refused when ``state.json`` names another split.
        found: path → info of the files listed under ``folder`` (``fs.find(folder, detail=True)``).

    Raises:
        ManifestError: an unreadable ``state.json``, another split, no data file, or data files that are missing.
    """
    state = _read_json(fs, posixpath.join(folder, STATE_FILE), shown)
    own = state.get("_split")
    if split is not None and own is not None and own != split:
        raise ManifestError(f"{shown} holds the {own!r} split of its dataset, but input.split is {split!r}")
    names = [d.get("filename") for d in state.get("_data_files") or [] if isinstance(d, dict)]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ManifestError(f"{shown}: state.json lists no data files (not a folder written by save_to_disk?)")
    paths = [posixpath.join(folder, n) for n in names]
    missing = [p for p in paths if p not in found]
    if missing:
        raise ManifestError(
            f"{shown}: {len(missing)} data file(s) that state.json lists are missing: "
            + ", ".join(posixpath.basename(p) for p in missing[:5])
            + (", …" if len(missing) > 5 else "")
        )
    return [found[p] for p in paths]


def _read_json(fs, path: str, shown: str) -> dict:
    try:
        obj = json.loads(fs.cat_file(path))
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read {shown}: {posixpath.basename(path)}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"cannot read {shown}: {posixpath.basename(path)} is not a JSON object")
    return obj


# ------------------------------------------------------------------------------------------------ stream files
@dataclass
class StreamCount:
    """What counting one Arrow stream file found.

    Attributes:
        rows: rows in the file.
        schema: its schema.
        offsets: byte offset of the record batch holding rows ``0, k, 2k, …`` (``k`` = ``shard_rows``); empty when
            batches cannot be read on their own (dictionary-encoded columns).
        offset_rows: the file row each offset's batch starts at.
    """

    rows: int
    schema: pa.Schema
    offsets: list[int] = field(default_factory=list)
    offset_rows: list[int] = field(default_factory=list)


def _start(f) -> int:
    """Seek ``f`` to its stream's first message (after an IPC file's magic) and return that offset."""
    f.seek(0)
    head = f.read(8)
    base = 8 if head[:6] == _FILE_MAGIC else 0
    f.seek(base)
    return base


def _messages(f, base: int) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield ``(offset, header type, rows of a record batch (else 0), encapsulated metadata)`` per message from
    ``base``, reading each message's metadata and seeking past its body; stops at the end-of-stream marker or the
    end of the file.

    Raises:
        ValueError: not an Arrow IPC stream (or one older than the 0.15 format), or a truncated message.
    """
    pos = base
    f.seek(pos)
    while True:
        prefix = f.read(8)
        if len(prefix) < 8:
            return
        marker, size = struct.unpack("<Ii", prefix)
        if marker != _CONTINUATION:
            raise ValueError("not an Arrow IPC stream (no message continuation marker)")
        if size == 0:
            return
        meta = f.read(size)
        if len(meta) < size or size < 8:
            raise ValueError("truncated Arrow IPC message")
        kind, body, rows = _parse_message(meta)
        yield pos, kind, rows, prefix + meta
        pos += 8 + size + body
        f.seek(pos)


def _parse_message(buf: bytes) -> tuple[int, int, int]:
    """``(header type, body length, rows)`` of one Message flatbuffer (``rows``: a record batch's ``length``).

    Reads the fields by their vtable slots (Message.fbs: 1 header_type, 2 header, 3 bodyLength; RecordBatch: 0
    length)."""

    def slot(table: int, index: int) -> int:
        vtable = table - struct.unpack_from("<i", buf, table)[0]
        size = struct.unpack_from("<H", buf, vtable)[0]
        at = 4 + 2 * index
        return struct.unpack_from("<H", buf, vtable + at)[0] if at < size else 0

    def scalar(table: int, index: int, fmt: str) -> int:
        off = slot(table, index)
        return struct.unpack_from(fmt, buf, table + off)[0] if off else 0

    root = struct.unpack_from("<I", buf, 0)[0]
    kind = scalar(root, 1, "<B")
    body = scalar(root, 3, "<q")
    rows = 0
    if kind == _RECORD_BATCH and (off := slot(root, 2)):
        header = root + off + struct.unpack_from("<I", buf, root + off)[0]
        rows = scalar(header, 0, "<q")
    return kind, body, rows


def count_stream(f, shard_rows: int) -> StreamCount:
    """Count the rows of the Arrow stream (or IPC file) ``f`` from its messages' metadata.

    Raises:
        ValueError: not an Arrow IPC stream, no schema message, or a truncated message.
    """
    base = _start(f)
    schema, rows, offsets, offset_rows, dictionaries = None, 0, [], [], False
    for offset, kind, n, meta in _messages(f, base):
        if kind == _SCHEMA:
            schema = pa.ipc.read_schema(pa.py_buffer(meta))
            dictionaries = any(pa.types.is_dictionary(t.type) for t in _leaves(schema))
        elif kind == _DICTIONARY_BATCH:
            dictionaries = True
        elif kind == _RECORD_BATCH:
            first = -(-rows // shard_rows) * shard_rows  # the first multiple of shard_rows at or after this batch
            for _ in range(first, rows + n, shard_rows):
                offsets.append(offset)
                offset_rows.append(rows)
            rows += n
    if schema is None:
        raise ValueError("not an Arrow IPC stream (no schema message)")
    if dictionaries:
        offsets, offset_rows = [], []
    return StreamCount(rows=rows, schema=schema, offsets=offsets, offset_rows=offset_rows)


def _leaves(schema: pa.Schema) -> Iterator[pa.Field]:
    stack = list(schema)
    while stack:
        f = stack.pop()
        yield f
        t = f.type
        if pa.types.is_struct(t):
            stack.extend(t.field(i) for i in range(t.num_fields))
        elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            stack.append(t.value_field)


def read_stream_rows(f, offset: int | None, skip: int, rows: int, columns: list[str]) -> pa.Table | None:
    """``rows`` rows of the stream ``f`` (those of ``columns`` it has), ``skip`` rows after the start of the record
    batch at byte ``offset`` (None: after the stream's start); None when no row is there.

    Raises:
        ValueError / pa.ArrowInvalid: not an Arrow stream, or a truncated one.
    """
    if not isinstance(f, pa.NativeFile):
        f = pa.PythonFile(f, mode="r")
    _start(f)
    if offset is None:
        batches: Iterator[pa.RecordBatch] = iter(pa.ipc.open_stream(f))
    else:
        schema = pa.ipc.read_schema(pa.ipc.read_message(f))
        f.seek(offset)
        batches = _batches_from(f, schema)
    parts, want_end, position = [], skip + rows, 0
    for batch in batches:
        lo, hi = max(skip, position), min(want_end, position + batch.num_rows)
        if hi > lo:
            parts.append(batch.slice(lo - position, hi - lo).select([c for c in columns if c in batch.schema.names]))
        position += batch.num_rows
        if position >= want_end:
            break
    return pa.Table.from_batches(parts) if parts else None


def _batches_from(f, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The record batches from ``f``'s position on (no dictionary batches there: see :func:`count_stream`)."""
    while True:
        try:
            message = pa.ipc.read_message(f)
        except (StopIteration, EOFError):
            return
        except pa.ArrowInvalid as e:
            if "end of" in str(e).lower():
                return
            raise
        if message.type == "record batch":
            yield pa.ipc.read_record_batch(message, schema)


def missing_id_message(shown: str, names: list[str]) -> str:
    """The refusal of a ``datasets`` file without an ``image_id`` column, with the fix."""
    has = ", ".join(names) or "no columns"
    return (
        f"{shown} has no image_id column (it has: {has}). Output rows are keyed by image_id, so the input must name "
        "its images: add one and save again, e.g. ds = ds.map(lambda _, i: {'image_id': f'{i:08d}'}, "
        "with_indices=True), or ds = ds.rename_column('<your id column>', 'image_id'); then ds.save_to_disk(...)"
    )


__all__ = [
    "DATASET_DICT_FILE",
    "STATE_FILE",
    "StreamCount",
    "count_stream",
    "data_files",
    "folder_kind",
    "missing_id_message",
    "read_stream_rows",
    "split_folder",
]
