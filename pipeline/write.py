"""clipmaps' datasets from the rows of :func:`clipmaps.pipeline.annotate.annotate`: :func:`write_outputs`, with
resume (:func:`unwritten`) and markers.

::

    from clipmaps.pipeline import annotate, unwritten, write_outputs

    ds = ray.data.read_parquet("s3://bucket/images/")              # image_id, image or image_uri, …
    ds = unwritten(ds, "s3://bucket/out")                          # resume: leave out the images already written
    ds = annotate(ds, "job.yaml").filter(my_filter)                # the user's own steps in between
    result = write_outputs(ds, "s3://bucket/out", "job.yaml")      # labels/, heatmaps/, regions/, errors/, …

The output is laid out as ``clipmaps run`` lays out its own (``labels/``, ``heatmaps/``, ``regions/``, ``errors/``,
``vocabulary/``, the dataset card ``README.md``, ``_job.json``), with the same schemas and the same row builder's
values, so every clipmaps tool (``report``, ``export coco``, ``index``, ``query``) and every Parquet reader opens it.

How rows are written (exactly once, nothing mixed):

* Ray tasks take about ``rows_per_file`` annotated rows at a time (a Ray Data batch). Each writes its batch's rows
  of each dataset as one file, ``<dataset>/part-w<token>.parquet`` (``token``: 16 hex digits of the SHA-256 of the
  batch's ``image_id`` values, so a retried task replaces its own files), then its marker
  ``_written/part-w<token>.parquet`` — the batch's image ids, one column — last. Every write is atomic
  (``clipmaps.schemas.storage.write_bytes``).
* A result file whose token has no marker is the work of a task that did not finish: every call removes such files
  before it writes and again at its end.
* :func:`unwritten` leaves out of a dataset the rows whose ``image_id`` a marker holds (a Ray Data left-anti join:
  the ids are read by Ray tasks, never by the driver), so a re-run after a failure computes only the rest.
* ``_job.json`` records the spec (input section left out, secrets redacted), the result fingerprint
  (``clipmaps.pipeline.fingerprint``) and one entry per call. A call whose spec would change results is refused
  (:class:`~clipmaps.schemas.errors.OutputConflict`, naming each field and both values) while the output holds
  written rows; so is an output of ``clipmaps run`` (its resume is by manifest shard), unless ``overwrite``.
* ``image_id`` values should be unique (``clipmaps run`` refuses repeats as error rows; rows given to annotate are not
  checked). At its end, :func:`write_outputs` counts the ids the markers hold more than once (Ray tasks) and reports
  them (:attr:`WriteResult.duplicates`, a warning naming the first few, ``_job.json``).

Why not Ray Data's ``write_parquet``: one annotated row becomes rows of four datasets, and resume needs to know which
input rows are finished; markers per written batch give both with plain files on any fsspec store.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from clipmaps.actors.registry import model_info
from clipmaps.schemas import batches as cols
from clipmaps.schemas.datasets import ERRORS, HEATMAPS, LABELS, regions_schema
from clipmaps.schemas.errors import OutputConflict
from clipmaps.schemas.storage import TMP_PREFIX, filesystem, redact_text, redact_uri, remove, write_table

from . import resume
from .annotate import _arrow_schema, annotation_plan, annotation_rows, output_kinds
from .fingerprint import differences
from .progress import ProgressLine
from .sinks import EMPTY_FILE, Provenance, batch_token
from .spec import JobSpec

logger = logging.getLogger(__name__)

#: Terminal colour codes (Ray's task errors carry them).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Folder (under the output root) of the markers: one Parquet file of ``image_id`` per written batch.
WRITTEN = resume.WRITTEN
#: ``_job.json``'s ``writer`` for an output of :func:`write_outputs` (``clipmaps run`` writes none).
WRITER = "write_outputs"
#: A marker's schema.
WRITTEN_SCHEMA = pa.schema([pa.field("image_id", pa.string())])
#: Counts each batch's task returns (and :class:`WriteResult` sums).
COUNTS = ("rows", "failed_rows", "labels", "heatmaps", "regions", "errors")
DATASETS = ("labels", "heatmaps", "regions", "errors")


def file_name(token: str) -> str:
    """``part-w<token>.parquet``: a written batch's file in each dataset, and its marker."""
    return f"part-w{token}.parquet"


def token_of(name: str) -> str | None:
    """The token of a :func:`file_name` (None for another name, e.g. ``part-empty.parquet``)."""
    base = posixpath.basename(name)
    if base.startswith("part-w") and base.endswith(".parquet"):
        return base[len("part-w") : -len(".parquet")]
    return None


@dataclass(frozen=True)
class WriterConfig:
    """What a writing task needs (pickled to Ray workers)."""

    output_uri: str
    storage_options: dict
    provenance: dict[str, Provenance]
    kinds: dict[str, tuple[str, ...]]
    embed_dim: int


@dataclass
class WriteResult:
    """What :func:`write_outputs` did.

    Attributes:
        output_uri: where (redacted).
        counts: this call's totals: ``rows`` (annotated rows written), ``failed_rows`` (rows that failed before any
            method), and the rows written to ``labels``, ``heatmaps``, ``regions``, ``errors``.
        batches: written batches (markers) of this call.
        total_rows: image ids the output's markers hold after this call (earlier calls included).
        duplicates: image ids held more than once.
        seconds: wall time of the call.
    """

    output_uri: str
    counts: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    total_rows: int = 0
    duplicates: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ on the workers
def dataset_tables(table: pa.Table, config: WriterConfig) -> dict[str, pa.Table]:
    """Annotated rows (:func:`clipmaps.pipeline.annotate.output_schema`) → the rows of ``labels``, ``heatmaps``,
    ``regions`` and ``errors`` that ``clipmaps run`` writes for the same images (its schemas, the provenance of
    ``config``, URIs redacted). A method column that is null on a row (the method failed there, its error is in
    ``errors``) adds nothing.

    Raises:
        KeyError: a column of ``config.kinds`` is missing (checked up front by :func:`write_outputs`)."""
    labels: list[dict] = []
    heatmaps: list[dict] = []
    regions: list[dict] = []
    errors: list[dict] = []
    has_uri = cols.IMAGE_URI in table.column_names
    # only the columns rows are built from (a user's pass-through columns are not converted), and each output's
    # provenance once per batch
    wanted = [*required_columns(config.kinds), cols.IMAGE_URI, *(f"{n}__confidence" for n in config.kinds)]
    table = table.select([c for c in dict.fromkeys(wanted) if c in table.column_names])
    provenance = {
        name: {"method": name, "model": p.model, "weights": p.weights, "params_hash": p.params_hash}
        for name, p in config.provenance.items()
    }
    for row in table.to_pylist():
        image_id = row[cols.IMAGE_ID]
        uri = redact_uri(row[cols.IMAGE_URI]) if has_uri and row[cols.IMAGE_URI] is not None else None
        for e in row.get("errors") or []:
            errors.append(
                {
                    "image_id": image_id,
                    "uri": uri,
                    **{k: e[k] for k in ("method", "region_id", "stage", "error_type")},
                    "message": redact_text(e["message"]),
                }
            )
        for name, kinds in config.kinds.items():
            prov = config.provenance[name]
            base = {"image_id": image_id, "image_uri": uri, **provenance[name]}
            label_map = row.get(f"{name}__label_map") if "label_map" in kinds else None
            if label_map is not None:
                labels.append(
                    {
                        **base,
                        "height": row[cols.HEIGHT],
                        "width": row[cols.WIDTH],
                        "label_map": label_map,
                        "confidence": row.get(f"{name}__confidence"),
                        "vocabulary_id": prov.vocabulary_id or "",
                    }
                )
            for h in (row.get(f"{name}__heatmaps") if "heatmaps" in kinds else None) or []:
                heatmaps.append({**base, **h})
            for r in (row.get(f"{name}__regions") if "regions" in kinds else None) or []:
                regions.append({**base, **r})
    return {
        "labels": pa.Table.from_pylist(labels, schema=LABELS),
        "heatmaps": pa.Table.from_pylist(heatmaps, schema=HEATMAPS),
        "regions": pa.Table.from_pylist(regions, schema=regions_schema(config.embed_dim)),
        "errors": pa.Table.from_pylist(errors, schema=ERRORS),
    }


def write_batch(table: pa.Table, config: WriterConfig) -> pa.Table:
    """Write one batch of annotated rows (a Ray task): one file per non-empty dataset, then the marker. Returns one
    row of :data:`COUNTS` and the batch's ``token``.

    Raises:
        OSError: the output cannot be written (Ray retries the task)."""
    missing = [c for c in required_columns(config.kinds) if c not in table.column_names]
    if missing:
        raise ValueError(f"write_outputs: a batch lacks {missing} (a step after annotate dropped them?)")
    fs, root = filesystem(config.output_uri, config.storage_options)
    ids = [str(i) for i in table[cols.IMAGE_ID].to_pylist()]
    token = batch_token(ids)
    counts = {"rows": table.num_rows}
    counts["failed_rows"] = (
        table.num_rows - table[cols.ERROR_STAGE].null_count if cols.ERROR_STAGE in table.column_names else 0
    )
    for name, rows in dataset_tables(table, config).items():
        counts[name] = rows.num_rows
        if rows.num_rows:
            write_table(rows, fs, posixpath.join(root, name, file_name(token)))
    write_table(pa.table({"image_id": ids}, schema=WRITTEN_SCHEMA), fs, posixpath.join(root, WRITTEN, file_name(token)))
    return pa.table({**{k: [counts[k]] for k in COUNTS}, "token": [token]})


def required_columns(kinds: dict[str, tuple[str, ...]]) -> list[str]:
    """The columns annotated rows must have for outputs of ``kinds`` (:func:`~.annotate.output_kinds`)."""
    return [cols.IMAGE_ID, "errors", cols.HEIGHT, cols.WIDTH] + [
        f"{name}__{kind}" for name, ks in kinds.items() for kind in ks
    ]


# ------------------------------------------------------------------------------------------------ on the driver
def annotate_kwargs(ds) -> dict | None:
    """The keyword arguments :func:`~.annotate.annotate` gave its last step (``schema``: its rows' schema; ``sink``:
    the provenance of every output it computed), read from ``ds``'s logical plan without running anything (Ray
    Data's map operators keep their ``fn`` and ``fn_kwargs``); None when ``ds`` is not downstream of annotate (e.g.
    annotated rows read back from files, or a materialized dataset)."""
    stack = [getattr(getattr(ds, "_logical_plan", None), "dag", None)]
    while stack:
        op = stack.pop()
        if op is None:
            continue
        if getattr(op, "fn", None) is annotation_rows:
            return dict(getattr(op, "fn_kwargs", None) or {})
        stack.extend(getattr(op, "input_dependencies", None) or [])
    return None


def provenance_mismatch(ds, plan) -> list[str]:
    """Why the rows of ``ds`` must not be written with ``plan``'s provenance: one line per output whose model,
    weights, params hash or vocabulary id annotate computed differently (empty when they agree, or when annotate's
    settings cannot be read from ``ds``'s plan)."""
    sink = (annotate_kwargs(ds) or {}).get("sink")
    theirs = getattr(sink, "methods", None)
    if not isinstance(theirs, dict):
        return []
    mine = plan.provenance()
    lines = []
    for name in sorted(set(theirs) | set(mine)):
        a, b = theirs.get(name), mine.get(name)
        if a is None or b is None:
            where = "the spec only" if a is None else "annotate's rows only"
            lines.append(f"{name}: in {where}")
        elif a != b:
            fields = [f for f in ("model", "weights", "params_hash", "vocabulary_id") if getattr(a, f) != getattr(b, f)]
            lines.append(
                f"{name}: {', '.join(f'{f} {getattr(a, f)!r} (annotate) vs {getattr(b, f)!r}' for f in fields)}"
            )
    return lines


def rows_schema(ds) -> pa.Schema | None:
    """The schema of the annotated rows in ``ds``, found without running the pipeline when it can be.

    ``Dataset.schema()`` runs a lazy dataset's first block to learn its schema, which for annotate's rows means
    starting every actor pool and computing a batch that the write computes again. So, in order: the schema
    :func:`~.annotate.annotate` gave its rows, read from ``ds``'s logical plan (Ray Data's map operators keep their
    ``fn`` and ``fn_kwargs``; it is also the schema annotate's fingerprint was computed for, whatever a later step
    of the user's dropped); else a schema Ray already knows (a materialized or file-backed dataset); else
    ``Dataset.schema()``. A later step that drops a needed column is caught by the writing tasks."""
    schema = (annotate_kwargs(ds) or {}).get("schema")
    if isinstance(schema, pa.Schema):
        return schema
    known = ds.schema(fetch_if_missing=False)
    if known is None:
        logger.info("write_outputs: the dataset's schema is not known without running its first block")
        known = ds.schema()
    return _arrow_schema(known) if known is not None else None


def written_tokens(fs, root: str) -> set[str]:
    """Tokens of the batches whose marker is in place (a listing: one entry per batch, nothing per image)."""
    folder = posixpath.join(root, WRITTEN)
    fs.invalidate_cache()
    if not fs.exists(folder):
        return set()
    return {t for t in (token_of(p) for p in fs.ls(folder, detail=False)) if t is not None}


def remove_unmarked(fs, root: str, tokens: set[str]) -> int:
    """Delete result files of batches without a marker, and temporary files; returns how many."""
    removed = 0
    fs.invalidate_cache()
    for name in (*DATASETS, WRITTEN):
        folder = posixpath.join(root, name)
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            base = posixpath.basename(path)
            token = token_of(base)
            if base.startswith(TMP_PREFIX) or (token is not None and token not in tokens):
                remove(fs, path)
                removed += 1
    return removed


def unwritten(ds, output_uri: str, *, storage_options: Mapping[str, Any] | None = None, num_partitions: int = 0):
    """``ds`` without the rows whose ``image_id`` an earlier :func:`write_outputs` to ``output_uri`` wrote (lazy; a
    Ray Data left-anti join on ``image_id``: the ids are read by Ray tasks). ``ds`` unchanged when nothing is written
    yet. Row order is not kept.

    Args:
        ds: a ``ray.data.Dataset`` with an ``image_id`` column (the input of :func:`~.annotate.annotate`).
        output_uri: the output :func:`write_outputs` writes.
        storage_options: fsspec options for ``output_uri``.
        num_partitions: hash partitions of the join (0: one per 64 markers, at least 1 and at most 200).

    Raises:
        ValueError: ``ds`` has no ``image_id`` column.
    """
    import pyarrow.fs as pafs
    import ray

    from clipmaps.schemas.storage import userinfo_error

    if (credentials := userinfo_error(output_uri)) is not None:  # s3fs would quote the secret in its error
        raise ValueError(f"unwritten: output_uri {credentials}")
    schema = ds.schema()
    if schema is None or cols.IMAGE_ID not in schema.names:
        raise ValueError(f"unwritten: the dataset needs an {cols.IMAGE_ID!r} column")
    fs, root = filesystem(output_uri, storage_options)
    tokens = written_tokens(fs, root)
    if not tokens:
        state = resume.read_state(fs, root)
        if state.complete or (state.job is not None and state.job.get("writer") != WRITER):
            raise OutputConflict(
                f"{redact_uri(output_uri)} holds the output of `clipmaps run` (resumed by manifest shard, not by "
                "write_outputs' markers): unwritten cannot tell which of your rows it holds"
            )
        return ds
    paths = [posixpath.join(root, WRITTEN, file_name(t)) for t in sorted(tokens)]
    done = ray.data.read_parquet(paths, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)), schema=WRITTEN_SCHEMA)
    parts = num_partitions or _partitions(len(paths))
    return ds.join(done, join_type="left_anti", num_partitions=parts, on=(cols.IMAGE_ID,))


def _partitions(markers: int) -> int:
    """Hash partitions for a shuffle over the ids of ``markers`` written batches: one per 64, 1 to 200 (Ray Data's
    default of 200 costs seconds of scheduling on a small output)."""
    return min(200, max(1, markers // 64))


def write_outputs(
    ds,
    output_uri: str,
    spec: str | os.PathLike | Mapping[str, Any] | JobSpec,
    *,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    rows_per_file: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> WriteResult:
    """Write the rows of :func:`~.annotate.annotate` as clipmaps' datasets under ``output_uri`` (module docstring);
    runs ``ds``.

    Args:
        ds: annotate's rows (after any filters of the user's); its schema must have each output column of ``spec``.
        output_uri: a local folder or fsspec URI.
        spec: the spec given to annotate (path, mapping or :class:`~.spec.JobSpec`): it names the provenance every
            row carries and the result fingerprint the output is checked against.
        storage_options: fsspec options for ``output_uri``.
        overwrite: delete what a job wrote at ``output_uri`` first.
        rows_per_file: about how many annotated rows each written file holds (default ``output.shard_rows``).
        progress: receives a progress line every ``run.progress_interval_s`` and at the end (default: logged).

    Returns:
        :class:`WriteResult`.

    Raises:
        ValueError: ``ds`` lacks ``image_id``/``errors`` or an output column of ``spec`` (not annotate's rows, or
            another spec's).
        SpecError: the spec is invalid.
        OutputConflict: the output holds rows of a job with another result fingerprint, or ``clipmaps run``'s output.
        Exception: a failure of the pipeline (Ray's error); ``_job.json`` records the call as failed, what is written
            is kept, and :func:`unwritten` + a new call finish the rest.
    """
    from clipmaps.schemas.storage import userinfo_error

    from .plan import _map_batches, sink_retry_exceptions
    from .run import versions, write_skeleton

    if (credentials := userinfo_error(output_uri)) is not None:  # s3fs would quote the secret in its error
        raise ValueError(f"write_outputs: output_uri {credentials}")
    started = time.time()
    say = progress or (lambda line: logger.info("%s", line))
    schema = rows_schema(ds)
    names = list(schema.names) if schema is not None else []
    plan = annotation_plan(spec, has_prompts=cols.PROMPTS in names)
    job = plan.spec
    kinds = output_kinds(job)
    missing = [c for c in required_columns(kinds) if c not in names]
    if missing:
        raise ValueError(
            f"write_outputs: the dataset lacks {missing}: pass the rows annotate(ds, spec) returns, and the same spec"
        )
    mismatch = provenance_mismatch(ds, plan)
    if mismatch:  # the rows would be labelled with another job's vocabulary and params: refused, never mixed
        raise ValueError(
            "write_outputs: the spec differs from the one annotate computed these rows with; pass the same spec: "
            + "; ".join(mismatch)
        )
    options = dict(storage_options or {})
    fs, root = filesystem(output_uri, options)
    shown = redact_uri(output_uri)
    state = resume.read_state(fs, root)
    tokens = written_tokens(fs, root)
    if overwrite:
        resume.clear_output(fs, root)
        state, tokens = resume.OutputState(job=None), set()
    elif state.job is not None and (state.job.get("writer") != WRITER or state.complete):
        raise OutputConflict(
            f"{shown} holds the output of `clipmaps run` (resumed by manifest shard), not of write_outputs; write to "
            "another output_uri, or pass overwrite=True to replace it"
        )
    elif state.job is None and state.complete:
        raise OutputConflict(f"{shown} holds shard markers but no {resume.JOB_JSON}; use another output_uri")
    elif state.job is not None and tokens:
        diff = differences(state.job.get("fingerprint"), plan.fingerprint)
        if diff:
            raise OutputConflict(
                f"{shown} holds rows of a job with other results; writing would mix them: " + "; ".join(diff)
                + ". Write to another output_uri, or pass overwrite=True"
            )  # fmt: skip
    elif state.job is not None and state.job.get("fingerprint") != plan.fingerprint:  # nothing written: replace
        resume.clear_output(fs, root)
        state = resume.OutputState(job=None)
    removed = remove_unmarked(fs, root, tokens)
    if removed:
        logger.info("removed %d result files of batches an earlier call did not finish", removed)

    spec_doc = job.to_dict(redact=True)
    spec_doc.pop("input", None)
    spec_doc["output"] = {**spec_doc.get("output", {}), "uri": shown}
    attempt: dict[str, Any] = {"started_at": _now(), "status": "running", "pid": os.getpid()}
    doc = {
        "writer": WRITER,
        "spec": spec_doc,
        "fingerprint": plan.fingerprint,
        "status": "running",
        "attempts": [*state.attempts, attempt],
    }
    fs.makedirs(root, exist_ok=True)
    resume.write_job(fs, root, {**doc, "versions": versions()})
    write_skeleton(plan, fs, root)

    config = WriterConfig(
        output_uri=output_uri,
        storage_options=options,
        provenance=plan.provenance(),
        kinds=kinds,
        embed_dim=model_info(job.model.name).embed_dim,
    )
    counts = dict.fromkeys(COUNTS, 0)
    batches = 0
    line = ProgressLine(None, say if job.run.progress else (lambda _: None), interval_s=job.run.progress_interval_s)
    try:
        out = _map_batches(
            ds,
            write_batch,
            fn_kwargs={"config": config},
            batch_format="pyarrow",
            batch_size=rows_per_file or job.output.shard_rows,
            num_cpus=0.25,
            max_retries=job.resources.task_retries,
            retry_exceptions=sink_retry_exceptions(),
        )
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            for row in batch.to_pylist():
                batches += 1
                for k in COUNTS:
                    counts[k] += int(row[k])
                line.update(int(row["rows"]), int(row["failed_rows"]))
        line.finish()
    except BaseException as e:
        text = _ANSI.sub("", f"{type(e).__name__}: {e}")  # Ray colours its task errors for terminals
        attempt.update(status="failed", finished_at=_now(), error=redact_text(text)[:2000])
        doc.update(status="failed")
        try:
            resume.write_job(fs, root, {**doc, "versions": versions()})
        except OSError:
            logger.warning("could not record the failed call in %s", resume.JOB_JSON)
        raise
    tokens = written_tokens(fs, root)
    strays = remove_unmarked(fs, root, tokens)
    if strays:
        logger.warning("removed %d result files without a marker (a task of an earlier call finished late)", strays)
    total, duplicates, examples = _written_ids(fs, root, tokens, options)
    if duplicates:
        logger.warning(
            "%d image ids were written more than once (image_id values should be unique), e.g. %s",
            duplicates,
            ", ".join(repr(x) for x in examples),
        )
    result = WriteResult(
        output_uri=shown,
        counts=counts,
        batches=batches,
        total_rows=total,
        duplicates=duplicates,
        seconds=time.time() - started,
    )
    attempt.update(status="finished", finished_at=_now(), counts=counts, batches=batches)
    doc.update(status="finished", counts={"rows": total, "duplicate_ids": duplicates})
    resume.write_job(fs, root, {**doc, "versions": versions()})
    return result


def _written_ids(fs, root: str, tokens: set[str], storage_options: dict) -> tuple[int, int, list[str]]:
    """``(ids in the markers, ids held more than once, up to 5 of them)``, by Ray tasks
    (``clipmaps.pipeline.dupes.repeated_ids``)."""
    from .dupes import repeated_ids

    uris = [fs.unstrip_protocol(posixpath.join(root, WRITTEN, file_name(t))) for t in sorted(tokens)]
    return repeated_ids(uris, storage_options)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = [
    "COUNTS",
    "EMPTY_FILE",
    "WRITTEN",
    "WRITTEN_SCHEMA",
    "WriteResult",
    "WriterConfig",
    "dataset_tables",
    "file_name",
    "remove_unmarked",
    "token_of",
    "unwritten",
    "write_batch",
    "write_outputs",
    "written_tokens",
]
