"""Manifests: read a Parquet / JSONL / CSV manifest into the ``MANIFEST`` schema and split off invalid rows.

A manifest has one row per image: ``image_id``, ``image_uri`` (required), ``masks`` (list of ``MASK`` structs),
``prompts`` (list of strings) and ``width``/``height`` (int32: the frame the row's annotations are drawn in, as COCO
and SA-1B declare it; null or absent = unknown), all optional (see :mod:`clipmaps.schemas.datasets`; how the decode
stage uses the declared size is in :mod:`clipmaps.pipeline.decode.masks`). ``masks_uri`` (a string) names the
row's masks by reference instead (read by the decode stage). A pipeline run never reads a whole manifest here: Ray
tasks read it shard by shard (:mod:`clipmaps.pipeline.manifests`, :mod:`clipmaps.pipeline.shards`) with this module's
normalisation (:func:`_norm_row`) and checks (:func:`row_problems`); :func:`read_manifest_table` and
:func:`validate_manifest` serve tools that want a manifest as one table (``clipmaps report``, tests).

* :func:`read_manifest_table` reads and conforms types. It raises ``clipmaps.schemas.errors.ManifestError`` (exit 2) for
  what makes the whole manifest unusable: unreadable file, unknown format, missing required columns, no rows,
  values of the wrong type (naming the line). It does not drop rows.
* :func:`validate_manifest` splits the rows that cannot be processed into error records (stage ``"manifest"``):
  missing id or URI, duplicate ``image_id`` (2nd+ occurrence), URI scheme not allowed, malformed mask structs.
  What concerns one region only (a repeated ``region_id``, a degenerate polygon part, an RLE whose size is not
  the image's) is left to the decode stage, which reports it per region and keeps the image.

Formats, by file name (a trailing ``.gz``/``.bz2``/``.xz``/``.zst`` on JSONL/CSV is decompressed):

* Parquet (``.parquet``, ``.pq``, or a directory of Parquet files), read with ``pyarrow.dataset`` so that
  ``limit`` reads only the first row groups needed. Struct fields are matched by name; missing ones are null.
* JSONL (``.jsonl``, ``.ndjson``): one JSON object per line. ``masks`` is a list of objects with ``region_id``
  and one of ``rle`` (``{"size": [H, W], "counts": str | list[int]}``; uncompressed counts, as COCO's ``iscrowd``
  annotations have, are converted to the compressed string), ``uri``, ``polygon`` (list of ``[x0, y0, x1, y1, …]``
  parts; a single flat list is accepted; degenerate parts are kept here and dropped when the mask is decoded).
* CSV (``.csv``): a header row; ``masks`` is a JSON string (as in JSONL); ``prompts`` a JSON list string or a
  ``|``-separated string. Every value is read as text (``image_id`` ``007`` stays ``"007"``); ``width``/``height``
  are parsed as integers (empty = unknown).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from clipmaps.schemas.datasets import MANIFEST, MANIFEST_REQUIRED
from clipmaps.schemas.errors import ManifestError
from clipmaps.schemas.storage import (
    DEFAULT_ALLOWED_SCHEMES,
    filesystem,
    redact_text,
    redact_uri,
    scheme_error,
    uri_schemes,
)

log = logging.getLogger(__name__)

#: The manifest schema as :func:`read_manifest_table` returns it: ``MANIFEST``'s types, every field nullable (rows
#: with a missing id or URI are kept for :func:`validate_manifest` to report).
MANIFEST_READ = pa.schema([f.with_nullable(True) for f in MANIFEST])

_PARQUET_EXT = (".parquet", ".pq")
_JSONL_EXT = (".jsonl", ".ndjson")
_CSV_EXT = (".csv",)
_COMPRESSION_EXT = (".gz", ".bz2", ".xz", ".zst")
_CHUNK_ROWS = 65_536
_MASK_FIELDS = ("rle", "uri", "polygon")


# ------------------------------------------------------------------------------------------------ reading
def read_manifest_table(uri: str, *, storage_options: dict | None = None, limit: int | None = None) -> pa.Table:
    """Read the manifest at ``uri`` (Parquet, JSONL or CSV; see the module docstring) into ``MANIFEST_READ``.

    Args:
        uri: local path or fsspec URI; a directory is read as a Parquet dataset.
        storage_options: fsspec options (credentials, endpoint…); never put in messages.
        limit: read at most this many rows (Parquet: only the row groups needed; JSONL/CSV: stop reading).

    Missing optional columns are null; extra columns are dropped with a warning. Rows are returned as they are
    (duplicates, empty URIs…): call :func:`validate_manifest` to split off the invalid ones.

    Raises:
        ManifestError: unreadable or unknown file, missing required columns (named), an empty manifest, or a
            value of the wrong type (naming the line/row and column).
    """
    if limit is not None and limit < 0:
        raise ManifestError(f"limit must be ≥ 0, got {limit}")
    storage_options = dict(storage_options or {})
    shown = redact_uri(uri)
    try:
        fs, path = filesystem(uri, storage_options)
    except Exception as e:  # noqa: BLE001 — bad protocol, missing driver package…
        raise ManifestError(
            f"cannot read manifest {shown}: {type(e).__name__}: {_scrub(e, storage_options, uri)}"
        ) from None
    kind = _manifest_format(fs, path, shown)
    try:
        if kind == "parquet":
            table = _read_parquet(fs, path, shown, limit)
        else:
            with fsspec.open(uri, "rt", compression="infer", encoding="utf-8", newline="", **storage_options) as f:
                table = (_read_jsonl if kind == "jsonl" else _read_csv)(f, shown, limit)
    except ManifestError:
        raise
    except FileNotFoundError:
        raise ManifestError(f"cannot read manifest {shown}: file not found") from None
    except PermissionError:
        raise ManifestError(f"cannot read manifest {shown}: permission denied") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"cannot read manifest {shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except Exception as e:  # noqa: BLE001 — corrupt Parquet, I/O errors…
        detail = _short(_scrub(e, storage_options, uri))
        raise ManifestError(f"cannot read manifest {shown}: {type(e).__name__}: {detail}") from None
    if table.num_rows == 0 and limit != 0:
        raise ManifestError(f"manifest {shown} is empty: it has no rows")
    return table


def _manifest_format(fs, path: str, shown: str) -> str:
    try:
        is_dir = fs.isdir(path)
    except Exception:  # noqa: BLE001
        is_dir = False
    if is_dir:
        return "parquet"
    name = path.lower()
    if name.endswith(_PARQUET_EXT):
        kind = "parquet"
    elif (name := _strip_compression(name)).endswith(_JSONL_EXT):
        kind = "jsonl"
    elif name.endswith(_CSV_EXT):
        kind = "csv"
    else:
        raise ManifestError(
            f"cannot read manifest {shown}: unknown format (expected a .parquet, .jsonl, .ndjson or .csv file, "
            "or a directory of Parquet files)"
        )
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ManifestError(f"cannot read manifest {shown}: file not found") from None
    except Exception:  # noqa: BLE001 — let the read report it
        return kind
    if info.get("size") == 0:
        raise ManifestError(f"manifest {shown} is empty: the file has 0 bytes")
    return kind


def _strip_compression(name: str) -> str:
    for ext in _COMPRESSION_EXT:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _read_parquet(fs, path: str, shown: str, limit: int | None) -> pa.Table:
    dataset = pads.dataset(path, format="parquet", filesystem=fs)
    names = dataset.schema.names
    _check_columns(names, shown)
    columns = [n for n in MANIFEST.names if n in names]
    table = dataset.head(limit, columns=columns) if limit is not None else dataset.to_table(columns=columns)
    return _conform_arrow(table, shown)


def _conform_arrow(table: pa.Table, shown: str) -> pa.Table:
    """Cast an Arrow table with a subset of the manifest columns to ``MANIFEST_READ``."""
    arrays = []
    for field in MANIFEST_READ:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table[field.name]
        if col.type == field.type:
            arrays.append(col)
            continue
        try:
            arrays.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            if field.name not in ("masks", "prompts", "image_id"):
                raise ManifestError(
                    f"manifest {shown}: column {field.name!r} has type {col.type}, expected {field.type} ({e})"
                ) from None
            # values that need more than a cast (uncompressed RLE counts, integer ids…): normalise in Python
            norm = {"masks": _norm_masks, "prompts": _norm_prompts, "image_id": _norm_str}[field.name]
            values = []
            for i, v in enumerate(col.to_pylist()):
                values.append(norm(v, f"manifest {shown} row {i}", field.name))
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=MANIFEST_READ)


def _check_columns(names: Iterable[str], shown: str) -> None:
    names = list(names)
    missing = [c for c in MANIFEST_REQUIRED if c not in names]
    if missing:
        raise ManifestError(
            f"manifest {shown} is missing required column(s) {', '.join(missing)} "
            f"(it has: {', '.join(names) if names else 'no columns'})"
        )
    extra = [c for c in names if c not in MANIFEST.names]
    if extra:
        log.warning("manifest %s: ignoring extra column(s) %s", shown, ", ".join(extra))


def _read_jsonl(f, shown: str, limit: int | None) -> pa.Table:
    seen: dict[str, None] = {}  # column names in first-seen order

    def rows() -> Iterator[dict]:
        n = 0
        for lineno, line in enumerate(f, start=1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            where = f"manifest {shown} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            seen.update(dict.fromkeys(obj))
            yield _norm_row(obj, where)
            n += 1

    table = _rows_to_table(rows())
    if table.num_rows:
        _check_columns(seen, shown)
    return table


def _read_csv(f, shown: str, limit: int | None) -> pa.Table:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header:
        raise ManifestError(f"manifest {shown} is empty: no header row")
    header = [h.strip() if h else h for h in header]
    reader.fieldnames = header
    _check_columns(header, shown)

    def rows() -> Iterator[dict]:
        for n, rec in enumerate(reader):
            if limit is not None and n >= limit:
                return
            where = f"manifest {shown} line {reader.line_num}"
            row: dict[str, Any] = {k: (v if v != "" else None) for k, v in rec.items() if k in MANIFEST.names}
            if row.get("masks") is not None:
                try:
                    row["masks"] = json.loads(row["masks"])
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{where}: column 'masks' is not a JSON list ({e.msg})") from None
            if row.get("prompts") is not None:
                row["prompts"] = _parse_prompt_string(row["prompts"], where)
            yield _norm_row(row, where)

    return _rows_to_table(rows())


def _parse_prompt_string(s: str, where: str) -> list[str]:
    s = s.strip()
    if s.startswith("["):
        try:
            value = json.loads(s)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: column 'prompts' looks like JSON but is not ({e.msg})") from None
        return _norm_prompts(value, where, "prompts")
    return [p.strip() for p in s.split("|") if p.strip()]


def _rows_to_table(rows: Iterable[dict]) -> pa.Table:
    batches, chunk = [], []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= _CHUNK_ROWS:
            batches.append(pa.RecordBatch.from_pylist(chunk, schema=MANIFEST_READ))
            chunk = []
    if chunk or not batches:
        batches.append(pa.RecordBatch.from_pylist(chunk, schema=MANIFEST_READ))
    return pa.Table.from_batches(batches, schema=MANIFEST_READ)


# ------------------------------------------------------------------------------------------------ normalising values
def _norm_row(obj: dict, where: str) -> dict:
    return {
        "image_id": _norm_str(obj.get("image_id"), where, "image_id"),
        "image_uri": _norm_str(obj.get("image_uri"), where, "image_uri"),
        "masks": _norm_masks(obj.get("masks"), where, "masks"),
        "prompts": _norm_prompts(obj.get("prompts"), where, "prompts"),
        "width": _norm_size(obj.get("width"), where, "width"),
        "height": _norm_size(obj.get("height"), where, "height"),
        "masks_uri": _norm_str(obj.get("masks_uri"), where, "masks_uri"),
    }


def _norm_size(v: Any, where: str, name: str) -> int | None:
    """A declared ``width``/``height``: an integer, an integral float (JSON ``480.0``) or a decimal string (CSV);
    ``None``/``""`` = unknown. Its value is judged against the image by the decode stage (per region), not here.

    Raises:
        ManifestError: not an integer, or outside int32, naming ``where`` and the column.
    """
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    out: int | None = None
    if _is_int(v) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
        out = int(v)
    elif isinstance(v, str):
        try:
            out = int(v.strip())
        except ValueError:
            out = None
    if out is None or not -(2**31) <= out < 2**31:
        raise ManifestError(f"{where}: column {name!r} must be an integer (pixels), got {_short(repr(v), 60)}")
    return out


def _norm_str(v: Any, where: str, name: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    raise ManifestError(f"{where}: column {name!r} must be a string, got {type(v).__name__} {_short(repr(v), 60)}")


def _norm_prompts(v: Any, where: str, name: str = "prompts") -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple, np.ndarray)) and all(isinstance(p, str) for p in v):
        return [str(p) for p in v]
    raise ManifestError(f"{where}: column {name!r} must be a list of strings, got {_short(repr(v), 80)}")


def _norm_masks(v: Any, where: str, name: str = "masks") -> list[dict] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise ManifestError(f"{where}: column {name!r} must be a list of mask objects, got {type(v).__name__}")
    return [normalize_mask(m, f"{where} {name}[{i}]") for i, m in enumerate(v)]


def normalize_mask(m: Any, where: str = "mask") -> dict:
    """One mask object (JSON / Python / Ray-numpy form) → a dict in the ``MASK`` struct's form.

    Accepts ``region_id`` as string or integer, ``rle`` with compressed (string/bytes) or uncompressed (list)
    counts — the latter converted to the compressed string — and ``polygon`` as a list of coordinate lists or one
    flat list. Whether exactly one of ``rle``/``uri``/``polygon`` is set is left to :func:`validate_manifest`.

    Raises:
        ManifestError: a value of the wrong type, naming ``where``.
    """
    if not isinstance(m, dict):
        raise ManifestError(f"{where}: a mask must be an object, got {type(m).__name__} {_short(repr(m), 60)}")
    region_id = m.get("region_id")
    if region_id is not None:
        region_id = _norm_str(region_id, where, "region_id")
    uri = m.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise ManifestError(f"{where}: 'uri' must be a string, got {type(uri).__name__}")
    return {
        "region_id": region_id,
        "rle": _norm_rle(m.get("rle"), where),
        "uri": uri,
        "polygon": _norm_polygon(m.get("polygon"), where),
    }


def _norm_rle(rle: Any, where: str) -> dict | None:
    if rle is None:
        return None
    if not isinstance(rle, dict):
        raise ManifestError(f"{where}: 'rle' must be an object {{size, counts}}, got {type(rle).__name__}")
    size, counts = rle.get("size"), rle.get("counts")
    if size is not None:
        if not isinstance(size, (list, tuple, np.ndarray)) or not all(_is_int(s) for s in size):
            raise ManifestError(f"{where}: 'rle.size' must be a list of integers [H, W], got {_short(repr(size), 60)}")
        size = [int(s) for s in size]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    elif isinstance(counts, (list, tuple, np.ndarray)):
        if not all(_is_int(c) for c in counts):
            raise ManifestError(f"{where}: uncompressed 'rle.counts' must be integers")
        counts = compress_rle_counts([int(c) for c in counts])
    elif counts is not None and not isinstance(counts, str):
        raise ManifestError(
            f"{where}: 'rle.counts' must be a string or a list of integers, got {type(counts).__name__}"
        )
    return {"size": size, "counts": counts}


def _norm_polygon(poly: Any, where: str) -> list[list[float]] | None:
    if poly is None:
        return None
    if not isinstance(poly, (list, tuple, np.ndarray)):
        raise ManifestError(f"{where}: 'polygon' must be a list of coordinate lists, got {type(poly).__name__}")
    if len(poly) and all(_is_number(x) for x in poly):  # one flat polygon
        poly = [poly]
    out = []
    for part in poly:
        if not isinstance(part, (list, tuple, np.ndarray)) or not all(_is_number(x) for x in part):
            raise ManifestError(f"{where}: 'polygon' must be a list of [x0, y0, x1, y1, …] lists of numbers")
        out.append([float(x) for x in part])
    return out


def compress_rle_counts(runs: Sequence[int]) -> str:
    """Uncompressed COCO RLE counts (run lengths, starting with 0s) → COCO's compressed counts string.

    No validation: a bad RLE (runs not summing to H·W, negative runs) is reported when the mask is decoded.
    """
    from clipmaps.schemas.encodings import _counts_to_string  # the codec lives in schemas.encodings

    return _counts_to_string([int(r) for r in runs])


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _scrub(error: BaseException, storage_options: dict, uri: str) -> str:
    """An exception's text without the secrets of the manifest's URI and storage options (clients quote them)."""
    return redact_text(str(error), storage_options=storage_options, uris=[uri])


def _short(s: str, n: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


# ------------------------------------------------------------------------------------------------ validation
def validate_manifest(
    table: pa.Table, *, allowed_schemes: Iterable[str] = DEFAULT_ALLOWED_SCHEMES
) -> tuple[pa.Table, list[dict]]:
    """Split ``table`` (as :func:`read_manifest_table` returns it) into valid rows and error records.

    The reasons are :func:`row_problems`'s, duplicates included (the table is the whole manifest here; a pipeline
    run reads shards on workers and finds duplicates with a distributed pass, ``clipmaps.pipeline.dupes``).

    Returns:
        ``(valid, errors)``: the valid rows, in order, in exactly the ``MANIFEST`` schema; and one dict per
        invalid row ``{image_id, uri, region_id, stage: "manifest", error_type, message}`` (``region_id`` set
        for mask errors), in row order — ``pa.Table.from_pylist(errors, schema=ERRORS)`` fills the rest.
    """
    table = _conform_arrow(table.select([c for c in table.column_names if c in MANIFEST.names]), "table")
    reason = row_problems(table, allowed_schemes=allowed_schemes, duplicates=True)
    n = table.num_rows
    id_list = table["image_id"].to_pylist()
    uri_list = table["image_uri"].to_pylist()
    bad_rows = [i for i in range(n) if reason[i] is not None]
    errors = [
        {
            "image_id": id_list[i],
            "uri": redact_uri(uri_list[i]),
            "region_id": reason[i][2],
            "stage": "manifest",
            "error_type": reason[i][0],
            "message": reason[i][1],
        }
        for i in bad_rows
    ]
    if bad_rows:
        keep = np.ones(n, dtype=bool)
        keep[bad_rows] = False
        table = table.filter(pa.array(keep))
    return table.cast(MANIFEST), errors


def row_problems(
    table: pa.Table, *, allowed_schemes: Iterable[str] = DEFAULT_ALLOWED_SCHEMES, duplicates: bool = True
) -> list[tuple[str, str, str | None] | None]:
    """Per row of ``table`` (``MANIFEST_READ`` schema), why it cannot be processed: ``(error_type, message,
    region_id)`` or None. The first matching reason, in this order:

    * ``MissingImageId`` — ``image_id`` null or empty;
    * ``DuplicateImageId`` — (with ``duplicates``) an ``image_id`` seen on an earlier row of ``table`` (the first
      occurrence is kept, whatever becomes of it);
    * ``MissingImageUri`` — ``image_uri`` null or blank;
    * ``UnsupportedScheme`` — the image URI's scheme (bare path = ``file``) is not in ``allowed_schemes`` (exact,
      case-insensitive names: ``s3a`` is not ``s3``), or a mask URI's, or ``masks_uri``'s;
    * ``MalformedMask`` — a mask with none or several of ``rle``/``uri``/``polygon``, an ``rle`` without
      ``size``/``counts``, or a row with both inline ``masks`` and a ``masks_uri``.

    Two masks of one image with the same ``region_id`` do not make the row invalid: the image is processed and
    the decode stage turns each later mask of that id into an error of stage ``mask`` (``DuplicateRegionId``,
    carrying the ``region_id``), so a clash costs at most the clashing regions. Likewise a polygon's degenerate
    parts and its geometry against the image are judged per region when the mask is decoded.
    """
    allowed = {s.lower() for s in allowed_schemes}
    n = table.num_rows
    reason: list[tuple[str, str, str | None] | None] = [None] * n

    def flag(rows: Iterable[int], make) -> None:
        for i in rows:
            if reason[i] is None:
                reason[i] = make(i)

    ids = table["image_id"].combine_chunks()
    uris = table["image_uri"].combine_chunks()
    id_list = ids.to_pylist()
    uri_list = uris.to_pylist()

    missing_id = pc.or_kleene(pc.is_null(ids), pc.equal(pc.utf8_trim_whitespace(ids), "")).fill_null(True)
    flag(_where(missing_id), lambda i: ("MissingImageId", "image_id is missing or empty", None))

    if duplicates:
        idx = pa.array(np.arange(n, dtype=np.int64))
        firsts = pa.table({"id": ids, "i": idx}).filter(pc.is_valid(ids)).group_by("id").aggregate([("i", "min")])
        dup = pc.and_(pc.is_valid(ids), pc.invert(pc.is_in(idx, firsts["i_min"])))
        first_of = {}
        if pc.any(dup).as_py():
            first_of = dict(zip(firsts["id"].to_pylist(), firsts["i_min"].to_pylist()))
        flag(
            _where(dup),
            lambda i: (
                "DuplicateImageId",
                f"image_id {id_list[i]!r} already appears on row {first_of[id_list[i]]}",
                None,
            ),
        )

    missing_uri = pc.or_kleene(pc.is_null(uris), pc.equal(pc.utf8_trim_whitespace(uris), "")).fill_null(True)
    flag(_where(missing_uri), lambda i: ("MissingImageUri", "image_uri is missing or empty", None))

    allowed_arr = pa.array(sorted(allowed), pa.string())
    bad_scheme = pc.invert(pc.is_in(uri_schemes(uris), allowed_arr))
    bad_scheme = pc.and_(bad_scheme, pc.invert(missing_uri))
    flag(_where(bad_scheme), lambda i: ("UnsupportedScheme", scheme_error(uri_list[i], allowed), None))

    masks = table["masks"].combine_chunks()
    has_inline = pc.greater(pc.list_value_length(masks).fill_null(0), 0) if len(masks) else pa.array([], pa.bool_())
    if "masks_uri" in table.column_names:
        refs = table["masks_uri"].combine_chunks()
        given = pc.and_(pc.is_valid(refs), pc.not_equal(pc.utf8_trim_whitespace(refs), "")).fill_null(False)
        if pc.any(given).as_py():
            ref_list = refs.to_pylist()
            flag(
                _where(pc.and_(given, has_inline)),
                lambda i: ("AmbiguousMasks", "the row sets both masks and masks_uri; set one", None),
            )
            bad_ref = pc.and_(given, pc.invert(pc.is_in(uri_schemes(refs), allowed_arr)))
            flag(
                _where(bad_ref),
                lambda i: ("UnsupportedScheme", f"masks_uri: {scheme_error(ref_list[i], allowed)}", None),
            )
    if len(masks) and pc.any(has_inline).as_py():
        _validate_masks(masks, allowed, flag)
    return reason


def _validate_masks(masks: pa.ListArray, allowed: set[str], flag) -> None:
    flat = masks.flatten()  # MASK structs of all rows (null lists contribute nothing)
    parent = pc.list_parent_indices(masks)
    offsets = masks.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced array's offsets point into the unsliced values
    rle, uri, poly = flat.field("rle"), flat.field("uri"), flat.field("polygon")
    n_set = np.zeros(len(flat), dtype=np.int64)
    for arr in (rle, uri, poly):
        n_set += pc.is_valid(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    null_mask = pc.is_null(flat).to_numpy(zero_copy_only=False)
    rle_incomplete = pc.and_(pc.is_valid(rle), pc.or_(pc.is_null(rle.field("size")), pc.is_null(rle.field("counts"))))
    rle_incomplete = rle_incomplete.fill_null(False).to_numpy(zero_copy_only=False)
    mask_schemes = uri_schemes(uri)
    bad_uri = pc.and_(pc.is_valid(uri), pc.invert(pc.is_in(mask_schemes, pa.array(sorted(allowed), pa.string()))))
    bad_uri = bad_uri.fill_null(False).to_numpy(zero_copy_only=False)
    bad = (n_set != 1) | null_mask | rle_incomplete | bad_uri
    parent_np = parent.to_numpy()
    region_ids = flat.field("region_id")

    for j in np.flatnonzero(bad):
        row = int(parent_np[j])
        k = int(j - offsets[row])
        rid = region_ids[j].as_py() if not null_mask[j] else None
        label = f"mask {k}" + (f" (region_id {rid!r})" if rid is not None else "")
        if null_mask[j]:
            r = ("MalformedMask", f"{label} is null", rid)
        elif bad_uri[j] and n_set[j] == 1:
            r = ("UnsupportedScheme", f"{label}: {scheme_error(uri[j].as_py(), allowed)}", rid)
        elif n_set[j] == 0:
            r = ("MalformedMask", f"{label} has none of rle, uri, polygon", rid)
        elif n_set[j] > 1:
            fields = [name for name, a in zip(_MASK_FIELDS, (rle, uri, poly)) if a[j].is_valid]
            r = (
                "MalformedMask",
                f"{label} sets several of rle, uri, polygon ({', '.join(fields)}); set exactly one",
                rid,
            )
        else:
            r = ("MalformedMask", f"{label}: rle needs both size and counts", rid)
        flag([row], lambda _i, r=r: r)

    # Two masks of one image with the same region_id are deliberately not refused here: refusing the row would
    # cost the image's label maps and heatmaps, which do not depend on region ids. The decode stage keeps the
    # first mask of an id and reports each later one as a per-region error (stage "mask", DuplicateRegionId).


def _where(mask: pa.Array) -> list[int]:
    return np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False)).tolist()


# ------------------------------------------------------------------------------------------------ helpers
def iter_table_batches(table: pa.Table, rows_per_batch: int = 1024) -> list[pa.Table]:
    """``table`` cut into tables of at most ``rows_per_batch`` rows (zero-copy slices), e.g. for
    ``ray.data.from_arrow``."""
    if rows_per_batch < 1:
        raise ValueError("rows_per_batch must be ≥ 1")
    return [table.slice(i, rows_per_batch) for i in range(0, table.num_rows, rows_per_batch)] or [table]


def manifest_from_rows(rows: Iterable[dict]) -> pa.Table:
    """Python dicts (``image_id``, ``image_uri``, optional ``masks``, ``prompts``, ``width``, ``height``) → a
    ``MANIFEST_READ`` table, with
    the same normalisation as JSONL manifests."""
    return _rows_to_table(_norm_row(r, f"row {i}") for i, r in enumerate(rows))


__all__ = [
    "MANIFEST_READ",
    "compress_rle_counts",
    "iter_table_batches",
    "manifest_from_rows",
    "normalize_mask",
    "read_manifest_table",
    "row_problems",
    "validate_manifest",
]
