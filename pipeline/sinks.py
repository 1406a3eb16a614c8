"""The sink stage: turns finished batches into rows of the output datasets and writes them as Parquet.

Runs as the last ``map_batches`` stage (CPU tasks), so the driver only ever sees a small table of counts per batch.
Each batch writes at most one file per dataset and manifest shard, named by the shard and a hash of the
batch's image ids (the same rows always map to the same name, so a retried task replaces its own file). A reader
never sees a partial file: on object stores a PUT (or a completed multipart upload) is atomic, so files are written
in place; elsewhere they are written to ``_tmp-<random>-<name>.tmp`` (a name no ``*.parquet`` glob and no Parquet
reader picks up) and renamed. Every schema comes from ``clipmaps.schemas.datasets``.

Why no temporary name on S3: fsspec's ``mv`` there is copy + delete, two requests that each may be retried; a task
that dies between them leaves a stray temporary object, and a copy's success may be lost to a connection reset and
the copy sent again. A single PUT of the final key has neither problem, and retrying it (botocore retries, Ray task
retries) rewrites the same bytes under the same name.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipmaps.schemas import batches as cols
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS, regions_schema

from .spec import redact_uri

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


#: Object stores whose writes are atomic (an object appears whole when the upload completes, or not at all).
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "az", "adl", "oss", "r2"})
TMP_PREFIX = "_tmp-"
#: Column of the sink's output: per shard row, the files written (``dataset/part-….parquet``, newline-separated).
FILES = "files"


def filesystem(uri: str, storage_options: dict | None = None):
    """``(fsspec filesystem, path)`` for ``uri``."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def with_io_defaults(storage_options: dict | None, *, attempts: int, timeout_s: float | None) -> dict:
    """s3fs ``storage_options`` with clipmaps' retry and timeout defaults merged in where the user set none.

    ``config_kwargs.retries = {"max_attempts": attempts, "mode": "standard"}``: botocore retries 500/502/503/504,
    ``SlowDown`` and the other throttling codes, connection resets and timeouts, with exponential back-off and jitter;
    ``config_kwargs.connect_timeout`` / ``read_timeout`` = ``timeout_s``. s3fs retries ``SlowDown`` and dropped
    connections again on top (its class attribute ``S3FileSystem.retries``, 5 attempts; not a constructor option).
    Other filesystems ignore these keys. Never mutates its argument."""
    options = dict(storage_options or {})
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"max_attempts": int(attempts), "mode": "standard"})
    if timeout_s is not None:
        config.setdefault("connect_timeout", float(timeout_s))
        config.setdefault("read_timeout", float(timeout_s))
    options["config_kwargs"] = config
    return options


def atomic_put(fs) -> bool:
    """Whether ``fs`` writes objects atomically (so no temporary name is needed)."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return any(p in ATOMIC_PUT_PROTOCOLS for p in protocols)


def write_bytes(data: bytes, fs, path: str) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file, the new one, or none — never a part."""
    parent = posixpath.dirname(path)
    if not atomic_put(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(path)}.tmp")
        try:
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)  # a rename on local and POSIX-like filesystems
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
        return
    fs.pipe_file(path, data)


def write_table(table: pa.Table, fs, path: str) -> None:
    """Write ``table`` as zstd Parquet to ``path`` atomically (see :func:`write_bytes`)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(buf.getvalue().to_pybytes(), fs, path)


def shard_file(shard: int, token: str) -> str:
    """File name of one batch's rows of one shard: ``part-<shard>-<hash of its image ids>.parquet``."""
    return f"part-{shard:07d}-{token}.parquet"


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
        """Write the batch's rows, one file per dataset and shard; return one row of counts per shard."""
        cfg = self.config
        fs, root = filesystem(cfg.output_uri, cfg.storage_options)
        shards = batch[cols.SHARD] if cols.SHARD in batch else np.zeros(len(batch[cols.IMAGE_ID]), np.int64)
        out: dict[str, list[int]] = {name: [] for name in (cols.SHARD, *cols.STATS)}
        files: list[str] = []
        for shard in sorted({int(v) for v in shards}):
            rows = [i for i, v in enumerate(shards) if int(v) == shard]
            sub = {k: [v[i] for i in rows] for k, v in batch.items()}
            ids = [str(i) for i in sub[cols.IMAGE_ID]]
            token = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
            out[cols.SHARD].append(shard)
            out["rows"].append(len(rows))
            written = []
            for name, table in self.tables(sub).items():
                if table.num_rows:
                    relative = posixpath.join(name, shard_file(shard, token))
                    write_table(table, fs, posixpath.join(root, relative))
                    written.append(relative)
                out[name].append(table.num_rows)
            files.append("\n".join(written))
        result = {k: np.array(v, dtype=np.int64) for k, v in out.items()}
        result[FILES] = np.array(files, dtype=object)
        return result

    def tables(self, batch: dict) -> dict[str, pa.Table]:
        """The batch's rows per output dataset (``labels``, ``heatmaps``, ``regions``, ``errors``)."""
        labels, heatmaps, regions, errors = [], [], [], []
        n = len(batch[cols.IMAGE_ID])
        failed = cols.failed_rows(batch)
        for i in range(n):
            image_id = str(batch[cols.IMAGE_ID][i])
            uri = redact_uri(str(batch[cols.IMAGE_URI][i])) if cols.IMAGE_URI in batch else None
            if failed[i]:
                errors.append(
                    _error(
                        image_id,
                        uri,
                        None,
                        None,
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
                err = batch.get(cols.col(method, cols.ERROR))
                if err is not None and cols.present(err[i]):
                    etype, _, message = str(err[i]).partition(": ")
                    errors.append(_error(image_id, uri, method, None, "model", etype, message))
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
                    **base,
                    "height": h,
                    "width": w,
                    "label_map": label_col[i],
                    "vocabulary_id": prov.vocabulary_id or "",
                }
            )
        maps = batch.get(cols.col(prov.method, cols.HEATMAPS))
        if maps is not None and cols.present(maps[i]):
            prompts = batch[cols.col(prov.method, cols.HEATMAP_PROMPTS)][i]
            mh, mw = batch[cols.col(prov.method, cols.HEATMAP_HW)][i]
            for prompt, data in zip(prompts, maps[i]):
                heatmaps.append(
                    {
                        "image_id": image_id,
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
                        "region_id": str(region_id),
                        **base,
                        "embedding": vec.tolist(),
                        "area": int(areas[r]),
                        "bbox": [int(v) for v in boxes[r]],
                        "loss": float(loss[r]),
                        "expl_map": expl[i][r] if expl is not None and cols.present(expl[i]) else None,
                    }
                )


def sink_batch(batch: dict[str, np.ndarray], config: SinkConfig) -> dict[str, np.ndarray]:
    """Function form of :class:`SinkStage` for task-based ``map_batches``."""
    return SinkStage(config)(batch)


def _error(image_id, uri, method, region_id, stage, error_type, message) -> dict:
    return {
        "image_id": image_id,
        "uri": uri,
        "method": method,
        "region_id": region_id,
        "stage": str(stage),
        "error_type": str(error_type or "Error"),
        "message": str(message or ""),
    }
