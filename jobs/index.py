"""``clipmaps index``: a nearest-neighbour index over the region embeddings of a job's ``regions/`` dataset.

The index is built by streaming ``regions/`` (``pyarrow.dataset`` scanner batches; only one batch of rows is in
memory besides the index itself) and written next to the datasets, under ``OUTPUT_URI/index/``:

* ``regions.faiss``: a FAISS index of the vectors (inner product on L2-normalised embeddings = cosine). Below
  ``exact_below`` vectors (50,000 by default) it is a flat index searched exhaustively (exact results); from
  there on an HNSW graph (``IndexHNSWFlat``, float32, M 32, efConstruction 100, efSearch 128: approximate).
* ``ids.parquet``: one row per vector, in vector order: ``row``, ``image_id``, ``region_id``, ``image_uri``
  (joined from the job's manifest when it can be read, else null: ``regions/`` has no URI column), ``method``,
  ``model``, ``weights``, ``params_hash``.
* ``index.json`` (written last): what was indexed (model, weights, parameters hash, dimension, count, the
  ``regions/`` files it saw), how (exact or HNSW and its parameters) and when.

Embeddings from different models, weights or MaskInversion parameters live in different spaces and must not be
mixed in one index: a ``regions/`` dataset that holds several ``params_hash`` values is refused unless
``--params-hash`` picks one. Image-level embeddings are not indexed: no dataset holds them (MaskInversion's
starting point, the image embedding, is not written), and a mean of region embeddings is not a CLIP image
embedding, so it is not offered as one.

Local paths and fsspec URIs (``s3://…``) work alike (the output is read through :mod:`.outputs`): the files are
built in a local temporary folder and uploaded. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from clipmaps.schemas.datasets import PROVENANCE
from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import filesystem, join_uri, redact_text, redact_uri, remove

from .outputs import JobOutputs, dataset_schema, is_local, parse_storage_options

logger = logging.getLogger(__name__)

INDEX_DIR = "index"
META_FILE = "index.json"
IDS_FILE = "ids.parquet"
VECTORS_FILE = "regions.faiss"
FORMAT_VERSION = 1
#: Below this many vectors the index is searched exhaustively (exact); from it on, HNSW.
EXACT_BELOW = 50_000
#: HNSW parameters: links per node (M), candidate list size when adding (efConstruction) and searching (efSearch).
HNSW_M = 32
EF_CONSTRUCTION = 100
EF_SEARCH = 128
#: Rows per row group of ``ids.parquet`` (a query reads only the row groups that hold its hits).
IDS_ROW_GROUP = 65_536
PROVENANCE_COLUMNS = tuple(f.name for f in PROVENANCE)  # method, model, weights, params_hash
ID_COLUMNS = ("image_id", "region_id")
IDS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("region_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("method", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("weights", pa.string(), nullable=False),
        pa.field("params_hash", pa.string(), nullable=False),
    ]
)


class RegionIndexError(ConfigError):
    """The region index cannot be built or used as asked (no ``regions/``, mixed models or parameters, a missing or
    stale index…): something the user can fix; the CLI exits with 2."""

    default_stage = "index"


# ---------------------------------------------------------------------------------------------- regions/
def regions_dataset(outputs: JobOutputs) -> pads.Dataset:
    """The output's ``regions/`` dataset (refused when missing, empty or without the columns an index needs)."""
    where = outputs.shown("regions")
    ds = outputs.dataset("regions")
    if ds is None:
        raise RegionIndexError(
            f"{where} does not exist: the job wrote no region embeddings "
            "(run it with methods.maskinversion and a manifest with masks)"
        )
    if not ds.files:
        raise RegionIndexError(f"{where} holds no Parquet files: nothing to index")
    emb = ds.schema.field("embedding").type if "embedding" in ds.schema.names else None
    dim = emb.list_size if emb is not None and pa.types.is_fixed_size_list(emb) else None
    if dim is None or emb != dataset_schema("regions", dim).field("embedding").type:
        raise RegionIndexError(
            f"{where} has no fixed_size_list<float32, D> 'embedding' column (got {emb}); "
            "is it a clipmaps regions dataset?"
        )
    missing = [c for c in (*ID_COLUMNS, *PROVENANCE_COLUMNS) if c not in ds.schema.names]
    if missing:
        raise RegionIndexError(f"{where} lacks the columns {missing}")
    return ds


def files_fingerprint(ds: pads.Dataset) -> list[list]:
    """``[[file name, size in bytes], …]`` of a dataset, sorted: tells whether ``regions/`` changed since."""
    fs = ds.filesystem
    out = []
    for path in ds.files:
        try:
            size = fs.get_file_info(path).size
        except Exception:  # noqa: BLE001 - informative only
            size = None
        out.append([path.rsplit("/", 1)[-1], size])
    return sorted(out)


def provenance_groups(ds: pads.Dataset, batch_rows: int = 262_144) -> Counter:
    """Rows per ``(method, model, weights, params_hash)`` in ``regions/`` (reads only those four columns)."""
    groups: Counter = Counter()
    for batch in ds.to_batches(columns=list(PROVENANCE_COLUMNS), batch_size=batch_rows):
        if batch.num_rows == 0:
            continue
        counts = pa.Table.from_batches([batch]).group_by(list(PROVENANCE_COLUMNS)).aggregate([([], "count_all")])
        for row in counts.to_pylist():
            groups[tuple(row[c] for c in PROVENANCE_COLUMNS)] += row["count_all"]
    return groups


def describe_groups(groups: Counter) -> str:
    return "; ".join(
        f"params_hash {h} ({n} rows: method {m}, model {mo}, weights {w})"
        for (m, mo, w, h), n in sorted(groups.items(), key=lambda kv: -kv[1])
    )


def choose_group(groups: Counter, params_hash: str | None, where: str) -> tuple[str, str, str, str]:
    """The one provenance group to index: the only one, or the one ``params_hash`` names."""
    if not groups:
        raise RegionIndexError(f"{where} holds no rows: nothing to index")
    if params_hash is not None:
        match = [g for g in groups if g[3] == params_hash]
        if not match:
            raise RegionIndexError(
                f"{where} has no rows with params_hash {params_hash!r}; it has: {describe_groups(groups)}"
            )
        return match[0]
    if len(groups) > 1:
        raise RegionIndexError(
            f"{where} mixes embeddings of {len(groups)} model/parameter sets, which live in different spaces and "
            f"cannot share one index: {describe_groups(groups)}. Pick one with --params-hash."
        )
    return next(iter(groups))


def embedding_matrix(column: pa.Array | pa.ChunkedArray, dim: int) -> np.ndarray:
    """A ``fixed_size_list<float32, dim>`` column → ``float32 [n, dim]`` L2-normalised (again: cheap, and a
    dataset written by another tool may not be)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise RegionIndexError(f"{column.null_count} region embeddings are null")
    x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise RegionIndexError("some region embeddings are zero, NaN or infinite; they cannot be indexed")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- manifest URIs
def manifest_uris(outputs: JobOutputs) -> pa.Table | None:
    """``image_id → image_uri`` from the job's manifest, or ``None`` when ``_job.json`` names none or it cannot be
    read (then the id map's ``image_uri`` is null)."""
    if outputs.manifest_uri is None:
        return None
    try:
        return outputs.image_uris()
    except Exception as e:  # noqa: BLE001 - URIs are a convenience: index without them
        detail = redact_text(str(e), storage_options=outputs.input_options, uris=[outputs.manifest_uri])
        logger.warning("image URIs left out: cannot read the manifest %s: %s", redact_uri(outputs.manifest_uri), detail)
        return None


def with_uris(batch: pa.Table, uris: pa.Table | None) -> pa.Array:
    """``image_uri`` for every row of ``batch`` (in order; null where unknown)."""
    if uris is None:
        return pa.nulls(batch.num_rows, pa.string())
    pos = pc.index_in(batch["image_id"], value_set=uris["image_id"])
    return pc.take(uris["image_uri"], pos)


# ---------------------------------------------------------------------------------------------- the index
def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a dependency
        raise RegionIndexError("the 'faiss-cpu' package is missing: pip install faiss-cpu") from e
    return faiss


@dataclass
class VectorIndex:
    """The vectors of an index and how to search them (FAISS, inner product).

    Attributes:
        kind: ``"exact"`` (``IndexFlatIP``: exhaustive search) or ``"hnsw"`` (``IndexHNSWFlat``: approximate).
        dim: embedding dimension.
        index: the FAISS index; vector ``r`` is the ``r``-th added (row ``r`` of the id map).
        ef_search: HNSW candidate list size when searching.
    """

    kind: str
    dim: int
    index: Any
    ef_search: int = EF_SEARCH

    @classmethod
    def new(
        cls, kind: str, dim: int, *, m: int = HNSW_M, ef_construction: int = EF_CONSTRUCTION, ef_search: int = EF_SEARCH
    ) -> VectorIndex:
        faiss = _faiss()
        if kind == "exact":
            return cls(kind, dim, faiss.IndexFlatIP(dim), ef_search)
        if kind != "hnsw":
            raise ValueError(f"index kind must be 'exact' or 'hnsw', got {kind!r}")
        idx = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = ef_construction
        idx.hnsw.efSearch = ef_search
        return cls(kind, dim, idx, ef_search)

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``queries`` ``[Q, D]`` (unit vectors) → ``(rows int64 [Q, k'], scores float32 [Q, k'])``, best first;
        ``k' = min(k, len)``; score = inner product = cosine; row -1 where HNSW found fewer than ``k'``."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise RegionIndexError(f"query vectors have dimension {queries.shape[1]}, the index {self.dim}")
        k = min(k, len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)
        scores, rows = self.index.search(queries, k)
        return rows.astype(np.int64), scores.astype(np.float32)

    def save(self, path: str) -> None:
        _faiss().write_index(self.index, path)

    @classmethod
    def load(cls, path: str, kind: str, dim: int, ef_search: int = EF_SEARCH) -> VectorIndex:
        faiss = _faiss()
        try:
            idx = faiss.read_index(path)
        except RuntimeError as e:
            raise RegionIndexError(f"cannot read the FAISS index {path}: {e}") from e
        if idx.d != dim:
            raise RegionIndexError(f"the FAISS index {path} has dimension {idx.d}, index.json says {dim}")
        return cls(kind, dim, idx, ef_search)


# ---------------------------------------------------------------------------------------------- building
@dataclass
class BuildResult:
    """What :func:`build_index` wrote: the ``index.json`` content and where."""

    meta: dict
    uri: str
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


def build_index(
    output_uri: str,
    *,
    storage_options: dict | None = None,
    params_hash: str | None = None,
    exact_below: int = EXACT_BELOW,
    kind: str = "auto",
    batch_rows: int = 16_384,
    image_uris: bool = True,
    m: int = HNSW_M,
    ef_construction: int = EF_CONSTRUCTION,
    ef_search: int = EF_SEARCH,
    progress: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build ``OUTPUT_URI/index/`` from ``OUTPUT_URI/regions/`` (see the module docstring).

    Args:
        output_uri: the job's output URI (local path or fsspec URI).
        storage_options: fsspec options for ``output_uri`` (and the manifest).
        params_hash: index only the rows with this ``params_hash`` (needed when ``regions/`` mixes several).
        exact_below: with ``kind="auto"``, exhaustive search below this many vectors, HNSW from it on.
        kind: ``"auto"``, ``"exact"`` or ``"hnsw"``.
        batch_rows: rows per scanner batch (the memory held besides the index).
        image_uris: join ``image_uri`` from the manifest of ``_job.json`` into the id map.
        m, ef_construction, ef_search: HNSW parameters (FAISS names; ``ef_search`` is stored as the default).
        progress: called with a line of text now and then.
    """
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    outputs = JobOutputs(output_uri, storage_options)
    ds = regions_dataset(outputs)
    where = outputs.shown("regions")
    dim = ds.schema.field("embedding").type.list_size
    groups = provenance_groups(ds)
    method, model, weights, phash = choose_group(groups, params_hash, where)
    count = groups[(method, model, weights, phash)]
    flt = pc.field("params_hash") == phash
    if kind == "auto":
        kind = "exact" if count < exact_below else "hnsw"
    uris = manifest_uris(outputs) if image_uris else None
    say(
        f"indexing {count} regions ({dim}-d, model {model}, weights {weights}, params_hash {phash}) "
        f"as {'an exact' if kind == 'exact' else 'an HNSW'} index"
    )
    vindex = VectorIndex.new(kind, dim, m=m, ef_construction=ef_construction, ef_search=ef_search)
    tmp = tempfile.mkdtemp(prefix="clipmaps-index-")
    try:
        ids_path = os.path.join(tmp, IDS_FILE)
        writer = pq.ParquetWriter(ids_path, IDS_SCHEMA, compression="zstd")
        n = 0
        pending: list[pa.Table] = []
        pending_rows = 0
        for batch in _scan(ds, flt, batch_rows):
            vectors = embedding_matrix(batch["embedding"], dim)
            vindex.add(vectors)
            ids = pa.table(
                {
                    "row": pa.array(np.arange(n, n + batch.num_rows, dtype=np.int64)),
                    "image_id": batch["image_id"],
                    "region_id": batch["region_id"],
                    "image_uri": with_uris(batch, uris),
                    **{c: batch[c] for c in PROVENANCE_COLUMNS},
                }
            ).cast(IDS_SCHEMA)
            pending.append(ids)
            pending_rows += ids.num_rows
            while pending_rows >= IDS_ROW_GROUP:  # fixed-size row groups: row r is in group r // IDS_ROW_GROUP
                whole = pa.concat_tables(pending)
                writer.write_table(whole.slice(0, IDS_ROW_GROUP), row_group_size=IDS_ROW_GROUP)
                rest = whole.slice(IDS_ROW_GROUP)
                pending, pending_rows = [rest], rest.num_rows
            n += batch.num_rows
            if n and n % (batch_rows * 16) < batch.num_rows:
                say(f"  {n}/{count} vectors added ({time.perf_counter() - t0:.0f} s)")
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=IDS_ROW_GROUP)
        writer.close()
        if n != count:
            raise RegionIndexError(f"{where} changed while it was indexed ({count} rows counted, {n} read); run again")
        vindex.save(os.path.join(tmp, VECTORS_FILE))
        seconds = time.perf_counter() - t0
        meta = {
            "format": FORMAT_VERSION,
            "library": "faiss",
            "library_version": _version("faiss-cpu") or getattr(_faiss(), "__version__", None),
            "faiss_index": type(vindex.index).__name__,
            "kind": kind,
            "metric": "inner_product",
            "dim": dim,
            "count": n,
            "files": {"vectors": VECTORS_FILE, "ids": IDS_FILE},
            "ids_row_group": IDS_ROW_GROUP,
            "hnsw": {"m": m, "ef_construction": ef_construction, "ef_search": ef_search} if kind == "hnsw" else None,
            "exact_below": exact_below,
            "source": {
                "dataset": "regions",
                "method": method,
                "model": model,
                "weights": weights,
                "params_hash": phash,
                "groups_in_dataset": len(groups),
                "rows_in_dataset": sum(groups.values()),
                "files": files_fingerprint(ds),
            },
            "image_uris": "manifest" if uris is not None else None,
            "image_level": None,  # no image-level embeddings exist to index (see the module docstring)
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(seconds, 3),
        }
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        dest = _publish(tmp, outputs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(meta=meta, uri=dest, seconds=time.perf_counter() - t0, files=[VECTORS_FILE, IDS_FILE, META_FILE])


def _scan(ds: pads.Dataset, flt, batch_rows: int) -> Iterator[pa.Table]:
    cols = [*ID_COLUMNS, *PROVENANCE_COLUMNS, "embedding"]
    # little read-ahead: the memory held besides the index stays a couple of batches, not a file's worth
    scanner = ds.scanner(columns=cols, filter=flt, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1)
    for batch in scanner.to_batches():
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


def _publish(tmp: str, outputs: JobOutputs) -> str:
    """Move the built files to ``OUTPUT_URI/index/``: ``index.json`` last (it marks a complete index); the old
    ``index.json`` is removed first so that a half-replaced index is never taken for a complete one."""
    fs, dest = outputs.fs, outputs.path(INDEX_DIR)
    meta = join_uri(dest, META_FILE)
    remove(fs, meta)  # literal: the output folder may be named like a glob pattern
    fs.makedirs(dest, exist_ok=True)
    for name in (VECTORS_FILE, IDS_FILE, META_FILE):
        src = os.path.join(tmp, name)
        if is_local(fs):
            part = join_uri(dest, f".{name}.part")
            shutil.copyfile(src, part)
            os.replace(part, join_uri(dest, name))
        else:
            fs.put_file(src, join_uri(dest, name))
    return join_uri(outputs.uri, INDEX_DIR)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedIndex:
    """An index read back: :meth:`search` and :meth:`lookup`."""

    meta: dict
    vectors: VectorIndex
    ids_uri: str
    storage_options: dict

    @property
    def source(self) -> dict:
        return self.meta["source"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.vectors.search(queries, k)

    def lookup(self, rows: Sequence[int]) -> list[dict]:
        """The id-map rows (dicts) of ``rows`` (vector numbers), in that order; reads only their row groups."""
        rows = [int(r) for r in rows]
        found: dict[int, dict] = {}
        if any(r >= 0 for r in rows):
            fs, path = filesystem(self.ids_uri, self.storage_options)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                md = pf.metadata
                starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
                wanted = sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows if r >= 0})
                table = pf.read_row_groups([g for g in wanted if 0 <= g < md.num_row_groups])
            keep = table.filter(pc.is_in(table["row"], value_set=pa.array(rows, pa.int64())))
            found = {r["row"]: r for r in keep.to_pylist()}
        return [found.get(r, {"row": r}) for r in rows]


def load_index(
    output_uri: str, *, storage_options: dict | None = None, ef_search: int | None = None, check_stale: bool = True
) -> LoadedIndex:
    """Read ``OUTPUT_URI/index/`` (downloading the vectors file from object storage to a temporary file)."""
    outputs = JobOutputs(output_uri, storage_options)
    fs, where = outputs.fs, outputs.shown(INDEX_DIR)
    meta_path = outputs.path(INDEX_DIR, META_FILE)
    if not fs.exists(meta_path):
        raise RegionIndexError(f"no index at {where}: build it with `clipmaps index {outputs.shown()}`")
    with fs.open(meta_path, "rb") as f:
        meta = json.loads(f.read())
    if meta.get("format") != FORMAT_VERSION or meta.get("library") != "faiss":
        raise RegionIndexError(
            f"the index at {where} has format {meta.get('format')} ({meta.get('library')}); this clipmaps reads "
            f"format {FORMAT_VERSION}: rebuild it"
        )
    src = meta.get("source") or {}
    if (
        len({src.get("model"), src.get("weights"), src.get("params_hash")} - {None}) != 3
        or src.get("groups_in_dataset", 1) < 1
    ):
        raise RegionIndexError(f"the index at {where} does not name one model, weights and params_hash; rebuild it")
    if check_stale:
        _warn_if_stale(outputs, meta)
    vec_path = outputs.path(INDEX_DIR, meta["files"]["vectors"])
    ef = ef_search or (meta.get("hnsw") or {}).get("ef_search") or EF_SEARCH
    if is_local(fs):
        vectors = VectorIndex.load(vec_path, meta["kind"], meta["dim"], ef)
    else:
        with tempfile.TemporaryDirectory(prefix="clipmaps-index-") as tmp:
            local = os.path.join(tmp, VECTORS_FILE)
            fs.get_file(vec_path, local)
            vectors = VectorIndex.load(local, meta["kind"], meta["dim"], ef)
    check_homogeneous(outputs.path(INDEX_DIR, meta["files"]["ids"]), fs, meta, where)
    if len(vectors) != meta["count"]:
        raise RegionIndexError(
            f"the index at {where} holds {len(vectors)} vectors, its index.json says {meta['count']}: rebuild it"
        )
    return LoadedIndex(
        meta=meta,
        vectors=vectors,
        ids_uri=join_uri(output_uri, INDEX_DIR, meta["files"]["ids"]),
        storage_options=outputs.storage_options,
    )


def check_homogeneous(ids_path: str, fs, meta: dict, where: str) -> None:
    """Refuse an index whose id map holds more than one model, weights or params_hash (or another one than its
    ``index.json`` names). Reads the Parquet statistics (min = max in every row group), or the three columns
    where a row group has none."""
    src = meta["source"]
    found: dict[str, set] = {c: set() for c in ("model", "weights", "params_hash")}
    with fs.open(ids_path, "rb") as f:
        pf = pq.ParquetFile(f)
        md = pf.metadata
        names = md.schema.to_arrow_schema().names
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in found:
                st = rg.column(names.index(c)).statistics
                if st is not None and st.has_min_max:
                    found[c].update({st.min, st.max})
                else:
                    found[c].update(pc.unique(pf.read_row_group(g, columns=[c]).column(0)).to_pylist())
    for c, values in found.items():
        if values - {src[c]}:
            raise RegionIndexError(
                f"the index at {where} mixes several {c} values ({sorted(map(str, values))}); "
                f"embeddings of different models or parameters cannot be searched together: rebuild "
                f"it with `clipmaps index --params-hash …` for one of them"
            )


def _warn_if_stale(outputs: JobOutputs, meta: dict) -> None:
    try:
        now = files_fingerprint(regions_dataset(outputs))
    except Exception:  # noqa: BLE001 - the index can be used without its source
        return
    if now != meta["source"].get("files"):
        logger.warning(
            "%s changed since the index was built (%s); rebuild it with `clipmaps index %s`",
            outputs.shown("regions"),
            meta.get("created_at"),
            outputs.shown(),
        )


# ---------------------------------------------------------------------------------------------- CLI
def run_index_cli(args: argparse.Namespace) -> int:
    """``clipmaps index`` (arguments: :func:`clipmaps.jobs.commands.add_index_parser`); returns the exit code."""
    from .cli import printer

    so: dict = {}
    try:
        so = parse_storage_options(args.storage_option)
        result = build_index(
            args.output_uri,
            storage_options=so,
            params_hash=args.params_hash,
            exact_below=args.exact_below,
            kind=args.kind,
            batch_rows=args.batch_rows,
            image_uris=not args.no_image_uris,
            m=args.m,
            ef_construction=args.ef_construction,
            ef_search=args.ef_search,
            progress=printer(args),
        )
    except (OSError, ValueError) as e:  # RegionIndexError and the other ConfigErrors are ValueErrors, as Arrow's
        text = redact_text(str(e), storage_options=so, uris=[args.output_uri])
        print(f"clipmaps index: error: {text}", file=sys.stderr)
        return 2
    m = result.meta
    printer(args)(
        f"clipmaps index: {m['count']} regions, {m['dim']}-d, {m['kind']} "
        f"({'exhaustive search' if m['kind'] == 'exact' else 'HNSW'}), image URIs "
        f"{'from the manifest' if m['image_uris'] else 'not available'}, {result.seconds:.1f} s -> {result.uri}"
    )
    return 0


__all__ = ["LoadedIndex", "RegionIndexError", "VectorIndex", "build_index", "load_index", "run_index_cli"]
