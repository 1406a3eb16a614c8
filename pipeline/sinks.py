"""The sink stage: turns finished batches into rows of the output datasets and writes them as Parquet.

Runs as the last ``map_batches`` stage (CPU tasks), so the driver only ever sees a small table of counts per batch.
Writing is in two steps, so that a dataset gets at most one file per manifest shard however small the batches are:

1. each sink task writes its batch's rows of a shard as *staged* files, one per dataset,
   ``_staging/<shard>/<dataset>/part-<shard>-<hash of the batch's image ids>.parquet`` (the same rows always map to
   the same name, so a retried task replaces its own file), and returns their names with its counts;
2. when the driver has counted every row of a shard, :func:`finalize_shard` (a Ray task) concatenates exactly the
   staged files the driver was told about into ``<dataset>/part-<shard>-<token>.parquet`` (one file per dataset,
   row groups of at most :data:`ROW_GROUP_ROWS` rows / about :data:`ROW_GROUP_BYTES`); the driver then writes the
   shard's completion marker listing those files, and removes the shard's staged files.

A reader never sees a partial file: files are written with ``clipmaps.schemas.storage.write_bytes`` (in place on
object stores, where a PUT is atomic; elsewhere under a temporary name, renamed). Every schema comes from
``clipmaps.schemas.datasets``; every URI in a row is redacted (``clipmaps.schemas.storage.redact_uri``).
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from clipmaps.actors.registry import REGISTRY
from clipmaps.schemas import batches as cols
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS, regions_schema
from clipmaps.schemas.errors import error_record
from clipmaps.schemas.storage import filesystem, redact_text, redact_uri, remove, write_bytes, write_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provenance:
    """What every result row of one method names."""

    method: str
    model: str
    weights: str
    params_hash: str
    vocabulary_id: str | None = None


@dataclass(frozen=True)
class SinkConfig:
    """Where and what the sink writes."""

    output_uri: str
    methods: dict[str, Provenance]
    heatmap_encoding: str = "png8"
    storage_options: dict = field(default_factory=dict)


#: Column of the sink's output: per shard row, the staged files written (``_staging/<shard>/<dataset>/part-….parquet``,
#: newline-separated); in a completion marker, the shard's final files (``<dataset>/part-….parquet``).
FILES = "files"
#: Column (of the reader's rows and of the sink's counts): the content digest of the row's manifest shard, computed by
#: the task that read the shard (``clipmaps.pipeline.manifests``); the driver records it in the shard's marker.
SHARD_DIGEST = "shard_digest"
#: Folder (under the output root) of the sink tasks' staged files; nothing in it is a result.
STAGING = "_staging"
#: Row groups of the per-shard files: at most this many rows, and about this many bytes (readers fetch a row group
#: at a time: DuckDB and Polars parallelise over them, and a heatmap group stays well under 128 MB).
ROW_GROUP_ROWS = 4096
ROW_GROUP_BYTES = 64 << 20


#: The file every result dataset (``labels/``, ``heatmaps/``, ``regions/``; ``vocabulary/`` when no method uses a
#: vocabulary) gets when a job starts: its schema and no rows, so that a run in which nothing succeeded, or a
#: method wrote nothing, still leaves datasets that pandas, DuckDB, Polars and ``datasets`` open (a folder that
#: does not exist makes every one of them fail). Its name holds no shard, so resume keeps it
#: (:func:`shard_of_file`). ``errors/`` has ``part-manifest.parquet`` (the manifest-stage refusals, maybe none).
EMPTY_FILE = "part-empty.parquet"


def output_schemas(embed_dim: int) -> dict[str, pa.Schema]:
    """The schemas of the result datasets a job writes, ``regions/``'s for embeddings of width ``embed_dim`` (the
    model's joint-space width, from its config: ``clipmaps.actors.registry.model_info(name).embed_dim``).

    Raises:
        ValueError: ``embed_dim`` is not positive.
    """
    return {"labels": LABELS, "heatmaps": HEATMAPS, "regions": regions_schema(embed_dim)}


def write_empty_datasets(fs, root: str, embed_dim: int) -> list[str]:
    """Write :data:`EMPTY_FILE` into ``labels/``, ``heatmaps/`` and ``regions/`` under ``root`` where it is
    missing or has another schema; returns the paths written. A resumed job finds them from its first attempt; an
    attempt that replaces an unfinished one of another model may find a ``regions/`` file of another embedding
    width, which would give the folder two schemas.

    Raises:
        ValueError: ``embed_dim`` is not positive.
        OSError: the output cannot be written (the filesystem's error, with its errno and path).
    """
    import pyarrow.parquet as pq

    written = []
    for name, schema in output_schemas(embed_dim).items():
        path = posixpath.join(root, name, EMPTY_FILE)
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                if pq.read_schema(f).equals(schema, check_metadata=False):
                    continue
        write_table(schema.empty_table(), fs, path)
        written.append(path)
    return written


def batch_token(ids: list[str]) -> str:
    """16 hex digits of the SHA-256 of a batch's ``image_id`` values (in order): the name of its files, so that a
    retried task writes the same names (the job runner's staged files, ``write_outputs``' batches)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def shard_file(shard: int, token: str) -> str:
    """File name of rows of one shard: ``part-<shard>-<token>.parquet`` (16 hex digits of a hash: of the batch's
    image ids for a staged file, of the staged files' names for a shard's final file)."""
    return f"part-{shard:07d}-{token}.parquet"


def staging_folder(shard: int) -> str:
    """The folder (relative to the output root) of ``shard``'s staged files."""
    return posixpath.join(STAGING, f"{shard:07d}")


def finalize_shard(output_uri: str, storage_options: dict, shard: int, staged: list[str]) -> list[str]:
    """Concatenate ``shard``'s staged files into one file per dataset; returns the written files' paths relative to
    the output root (``labels/part-0000003-<token>.parquet``…), sorted.

    Args:
        output_uri: the job's output root.
        storage_options: fsspec options for it.
        shard: the shard id.
        staged: the staged files (``_staging/<shard>/<dataset>/part-….parquet``, relative to the root) that the sink
            tasks reported for the shard: exactly these are read, never a listing (which could hold a late file of a
            killed attempt).

    Deterministic (same staged names → same output names and rows), so a retried task replaces its own files.

    Raises:
        OSError: a staged file cannot be read or the result cannot be written.
    """
    import pyarrow.parquet as pq

    fs, root = filesystem(output_uri, storage_options)
    by_dataset: dict[str, list[str]] = {}
    for rel in sorted(set(staged)):
        by_dataset.setdefault(rel.split("/")[-2], []).append(rel)
    written = []
    for name, files in sorted(by_dataset.items()):
        tables = []
        for rel in files:
            with fs.open(posixpath.join(root, rel), "rb") as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        if not table.num_rows:
            continue
        token = hashlib.sha256("\n".join(posixpath.basename(f) for f in files).encode()).hexdigest()[:16]
        relative = posixpath.join(name, shard_file(shard, token))
        per_row = max(1, table.nbytes // table.num_rows)
        buf = pa.BufferOutputStream()
        pq.write_table(
            table, buf, compression="zstd", row_group_size=max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // per_row))
        )
        write_bytes(buf.getvalue().to_pybytes(), fs, posixpath.join(root, relative))
        written.append(relative)
    return sorted(written)


def remove_staged(fs, root: str, shard: int) -> int:
    """Delete ``shard``'s staged files (after its marker is written); returns how many were removed."""
    return remove(fs, posixpath.join(root, staging_folder(shard)), recursive=True)


def shard_of_file(name: str) -> int | None:
    """The shard a result file belongs to, or None for other files (e.g. ``part-manifest.parquet``)."""
    parts = posixpath.basename(name).split("-")
    if len(parts) == 3 and parts[0] == "part" and parts[1].isdigit():
        return int(parts[1])
    return None


class SinkStage:
    """Callable for ``map_batches``: writes the batch's rows, returns one row of counts (and file names) per shard."""

    def __init__(self, config: SinkConfig):
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write the batch's rows as staged files, one per dataset and shard; return one row of counts (and the staged
        files' names) per shard."""
        cfg = self.config
        fs, root = filesystem(cfg.output_uri, cfg.storage_options)
        shards = batch[cols.SHARD] if cols.SHARD in batch else np.zeros(len(batch[cols.IMAGE_ID]), np.int64)
        out: dict[str, list[int]] = {name: [] for name in (cols.SHARD, *cols.STATS)}
        files: list[str] = []
        digests: list[str | None] = []
        for shard in sorted({int(v) for v in shards}):
            rows = [i for i, v in enumerate(shards) if int(v) == shard]
            sub = {k: [v[i] for i in rows] for k, v in batch.items()}
            digests.append(_text(sub[SHARD_DIGEST][0]) if SHARD_DIGEST in sub else None)
            ids = [str(i) for i in sub[cols.IMAGE_ID]]
            token = batch_token(ids)
            out[cols.SHARD].append(shard)
            out["rows"].append(len(rows))
            written = []
            out["prompts_collapsed"].append(self.prompts_collapsed(sub))
            for name, table in self.tables(sub).items():
                if table.num_rows:
                    relative = posixpath.join(staging_folder(shard), name, shard_file(shard, token))
                    write_table(table, fs, posixpath.join(root, relative))
                    written.append(relative)
                out[name].append(table.num_rows)
            files.append("\n".join(written))
        result = {k: np.array(v, dtype=np.int64) for k, v in out.items()}
        result[FILES] = np.array(files, dtype=object)
        if SHARD_DIGEST in batch:
            result[SHARD_DIGEST] = np.array(digests, dtype=object)
        return result

    def prompts_collapsed(self, batch: dict) -> int:
        """Manifest prompts the methods dropped as token-identical to an earlier prompt of their row: per image the
        most any heatmap output dropped (every output sees the same row), summed over the batch's images."""
        total = 0
        for i in range(len(batch[cols.IMAGE_ID])):
            counts = [0]
            for method in self.config.methods:
                values = batch.get(cols.col(method, cols.PROMPTS_COLLAPSED))
                if values is not None and cols.present(values[i]):
                    counts.append(int(values[i]))
            total += max(counts)
        return total

    def tables(self, batch: dict) -> dict[str, pa.Table]:
        """The batch's rows per output dataset (``labels``, ``heatmaps``, ``regions``, ``errors``)."""
        labels, heatmaps, regions, errors = [], [], [], []
        n = len(batch[cols.IMAGE_ID])
        failed = cols.failed_rows(batch)
        region_of_error = batch.get(ERROR_REGION_ID)
        for i in range(n):
            image_id = _text(batch[cols.IMAGE_ID][i])
            uri = _text(batch[cols.IMAGE_URI][i]) if cols.IMAGE_URI in batch else None
            uri = redact_uri(uri) if uri is not None else None
            if failed[i]:
                errors.append(
                    _error(
                        image_id,
                        uri,
                        None,
                        _text(region_of_error[i]) if region_of_error is not None else None,
                        batch[cols.ERROR_STAGE][i],
                        batch[cols.ERROR_TYPE][i],
                        batch[cols.ERROR_MESSAGE][i],
                    )
                )
                continue
            mask_errors = batch.get(cols.MASK_ERRORS)
            if mask_errors is not None and cols.present(mask_errors[i]) and len(mask_errors[i]):
                for e in mask_errors[i]:
                    errors.append(
                        _error(image_id, uri, None, e.get("region_id"), "mask", e.get("error_type"), e.get("message"))
                    )
            for method, prov in self.config.methods.items():
                source = REGISTRY[method].parent or method  # GEM's baseline fails with GEM's pass
                etype = batch.get(cols.col(source, cols.ERROR_TYPE_OF))
                if etype is not None and cols.present(etype[i]):
                    message = batch[cols.col(source, cols.ERROR_MESSAGE_OF)][i]
                    errors.append(_error(image_id, uri, method, None, "model", etype[i], message))
                    continue
                self._rows(batch, i, image_id, prov, labels, heatmaps, regions, errors, uri)
        out = {
            "labels": pa.Table.from_pylist(labels, schema=LABELS),
            "heatmaps": pa.Table.from_pylist(heatmaps, schema=HEATMAPS),
            "errors": pa.Table.from_pylist(errors, schema=ERRORS),
        }
        if regions:
            dim = len(regions[0]["embedding"])
            out["regions"] = pa.Table.from_pylist(regions, schema=regions_schema(dim))
        else:
            out["regions"] = pa.table({})
        return out

    def _rows(self, batch, i, image_id, prov, labels, heatmaps, regions, errors, uri) -> None:
        base = {"method": prov.method, "model": prov.model, "weights": prov.weights, "params_hash": prov.params_hash}
        h, w = int(batch[cols.HEIGHT][i]), int(batch[cols.WIDTH][i])
        label_col = batch.get(cols.col(prov.method, cols.LABELS))
        if label_col is not None and cols.present(label_col[i]):
            labels.append(
                {
                    "image_id": image_id,
                    "image_uri": uri,
                    **base,
                    "height": h,
                    "width": w,
                    "label_map": label_col[i],
                    "confidence": _value(batch.get(cols.col(prov.method, cols.CONFIDENCE)), i),
                    "vocabulary_id": prov.vocabulary_id or "",
                }
            )
        refused = batch.get(cols.col(prov.method, cols.PROMPT_ERRORS))
        if refused is not None and cols.present(refused[i]):
            # a prompt the text tower cannot hold costs only its own heatmap; the errors schema has no prompt
            # column, so the message names it
            for e in refused[i]:
                errors.append(_error(image_id, uri, prov.method, None, "text", e.get("error_type"), e.get("message")))
        maps = batch.get(cols.col(prov.method, cols.HEATMAPS))
        if maps is not None and cols.present(maps[i]):
            prompts = batch[cols.col(prov.method, cols.HEATMAP_PROMPTS)][i]
            mh, mw = batch[cols.col(prov.method, cols.HEATMAP_HW)][i]
            for prompt, data in zip(prompts, maps[i]):
                heatmaps.append(
                    {
                        "image_id": image_id,
                        "image_uri": uri,
                        "prompt": str(prompt),
                        **base,
                        "height": int(mh),
                        "width": int(mw),
                        "encoding": self.config.heatmap_encoding,
                        "heatmap": data,
                    }
                )
        emb = batch.get(cols.col(prov.method, cols.EMBEDDINGS))
        if emb is not None and cols.present(emb[i]) and len(emb[i]):
            loss = batch[cols.col(prov.method, cols.LOSS)][i]
            expl = batch.get(cols.col(prov.method, cols.EXPL_MAPS))
            ids, areas, boxes = batch[cols.MASK_IDS][i], batch[cols.MASK_AREA][i], batch[cols.MASK_BBOX][i]
            rles = batch.get(MASK_RLE)
            rles = rles[i] if rles is not None and cols.present(rles[i]) else None
            for r, region_id in enumerate(ids):
                vec = np.asarray(emb[i][r], dtype=np.float32)
                if not np.isfinite(vec).all():
                    errors.append(
                        _error(
                            image_id,
                            uri,
                            prov.method,
                            str(region_id),
                            "model",
                            "NonFiniteEmbedding",
                            "the optimised embedding has NaN or inf values",
                        )
                    )
                    continue
                regions.append(
                    {
                        "image_id": image_id,
                        "image_uri": uri,
                        "region_id": str(region_id),
                        **base,
                        "embedding": vec.tolist(),
                        "mask": _rle(rles[r]) if rles is not None and r < len(rles) else None,
                        "area": int(areas[r]),
                        "bbox": [int(v) for v in boxes[r]],
                        "loss": float(loss[r]),
                        "expl_map": expl[i][r] if expl is not None and cols.present(expl[i]) else None,
                    }
                )


#: Column the manifest reader sets on a row it refused for one of its masks: that mask's ``region_id``.
ERROR_REGION_ID = "error_region_id"
#: The decode stage's per-row COCO RLE of each usable mask, aligned with ``mask_ids``
#: (``schemas.batches.MASK_RLE``; read here by name so the sink works with a decode stage that does not write it).
MASK_RLE = getattr(cols, "MASK_RLE", "mask_rle")


def _text(value) -> str | None:
    """A cell as a string, None when absent (Ray turns an all-None column into NaN)."""
    return str(value) if cols.present(value) else None


def _rle(value) -> dict | None:
    """One ``mask_rle`` entry (``dict(size=[h, w], counts=str)``, numpy-ified by Ray) → the ``RLE`` struct's dict."""
    if not isinstance(value, dict) or value.get("counts") is None:
        return None
    counts = value["counts"]
    counts = counts.decode("ascii") if isinstance(counts, bytes) else str(counts)
    return {"size": [int(v) for v in value["size"]], "counts": counts}


def sink_batch(batch: dict[str, np.ndarray], config: SinkConfig) -> dict[str, np.ndarray]:
    """Function form of :class:`SinkStage` for task-based ``map_batches``."""
    return SinkStage(config)(batch)


def _error(image_id, uri, method, region_id, stage, error_type, message) -> dict:
    # the last line of defence: upstream messages are redacted already
    return error_record(
        image_id=image_id,
        uri=uri,
        method=method,
        region_id=region_id,
        stage=stage,
        error_type=error_type,
        message=redact_text(str(message or "")),
    )


def _value(column, i: int):
    """Row ``i`` of an optional in-flight column (``None`` when the column is absent or the row has no value)."""
    return column[i] if column is not None and cols.present(column[i]) else None
