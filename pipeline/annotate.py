"""clipmaps as a step in the user's own Ray Data pipeline: :func:`annotate` (``ray.data.Dataset`` in, one annotated
row per input row out, lazy).

::

    ds = ray.data.read_parquet("s3://bucket/images/")          # image_id, image (bytes) or image_uri, …
    out = annotate(ds, "job.yaml")                              # the job's model, vocabulary and methods
    out.filter(lambda r: r["error_stage"] is None).write_parquet("s3://bucket/annotated/")

The pipeline is the job runner's own (:func:`clipmaps.pipeline.plan.model_stages`: decode CPU tasks, one actor pool
per method); only the reading (the manifest's shards) and the writing (clipmaps' datasets) differ.

Input rows: ``image_id`` (string) and ``image`` (encoded image bytes, or a Hugging Face ``datasets`` image struct
``{bytes, path}``) or ``image_uri`` (read like a manifest's, within ``input.allowed_schemes``); optional ``masks``
(the manifest's ``list<MASK>``), ``masks_uri``, ``prompts`` (``list<string>``), ``width``/``height`` (the
annotations' frame) as in a manifest (``clipmaps.schemas.datasets.MANIFEST``). Rows are validated on the workers by
the manifest reader's rules (``clipmaps.pipeline.sources.row_problems``): a row that fails them is an error row, not
an exception. Duplicate ``image_id`` values are *not* refused here (every input row gets its own output row).

Output rows (:func:`output_schema` builds the schema; every block has exactly it):

=============================== ============================================================================
column                          value
=============================== ============================================================================
the input's other columns       passed through unchanged, except ``image``, ``masks`` and ``masks_uri``
                                (heavy, consumed by the decode stage) and ``width``/``height`` (below)
``height``, ``width``           ``int32``: the decoded image's size after EXIF orientation; null on a failed row
``error_stage``/``error_type``/ ``string``: why the row failed before the methods (``manifest`` for a row the
``error_message``               validation refused, ``read``, ``decode``, ``mask``, ``preprocess``); null if not
``errors``                      ``list<struct<method, region_id, stage, error_type, message>>``: every error record
                                ``clipmaps run`` would write to ``errors/`` for the row (the row's own, a region's,
                                a method's, a refused prompt's); empty when all went well
``{name}__label_map``           ``binary``: the label map PNG (``labels/``'s ``label_map``), for each output name
                                with label maps (``maskclip``, ``gem``, ``gem_original`` with a vocabulary)
``{name}__confidence``          ``binary``: the winning class's probability as an 8-bit PNG (``labels/``'s
                                ``confidence``), only with ``output.label_confidence``
``{name}__heatmaps``            ``list<struct<prompt, height int32, width int32, encoding, heatmap binary>>``
                                (``heatmaps/``'s rows), for each output with heatmaps (``gem``, ``legrad``…)
``{name}__regions``             ``list<struct<region_id, embedding fixed_size_list<float32, D>, mask RLE, area
                                int64, bbox list<int32, 4>, loss float32, expl_map binary>>`` (``regions/``'s rows),
                                for ``maskinversion``
=============================== ============================================================================

A method that failed on a row (a ``model`` error in ``errors``) leaves its columns null on that row; a failed row has
every method column null. The values are those ``clipmaps run`` writes for the same image and spec (the same
functions build them): label maps byte for byte.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from clipmaps.actors.registry import REGISTRY, model_info
from clipmaps.schemas import batches as cols
from clipmaps.schemas.datasets import RLE

from .decode.stage import IMAGE
from .inputs import check_rows, image_bytes
from .sinks import ERROR_REGION_ID, SinkConfig, SinkStage
from .sources import MANIFEST_READ
from .spec import JobSpec, SpecError, load_spec

logger = logging.getLogger(__name__)

#: What the placeholder ``input``/``output`` sections of a spec loaded for :func:`annotate` hold (never read).
PLACEHOLDER_INPUT = "(the rows of a Ray dataset)"
PLACEHOLDER_OUTPUT = "(written by the caller)"
#: Input columns the decode stage consumes (not in the output).
CONSUMED = (IMAGE, "masks", cols.MASKS_URI)
#: ``errors``'s element type.
ERROR_ITEM = pa.struct(
    [
        pa.field("method", pa.string()),
        pa.field("region_id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
    ]
)
HEATMAP_ITEM = pa.struct(
    [
        pa.field("prompt", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("encoding", pa.string()),
        pa.field("heatmap", pa.binary()),
    ]
)


def region_item(dim: int) -> pa.DataType:
    """``{name}__regions``'s element type for embeddings of width ``dim``."""
    return pa.struct(
        [
            pa.field("region_id", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("mask", RLE),
            pa.field("area", pa.int64()),
            pa.field("bbox", pa.list_(pa.int32(), 4)),
            pa.field("loss", pa.float32()),
            pa.field("expl_map", pa.binary()),
        ]
    )


def load_annotate_spec(source: str | os.PathLike | Mapping[str, Any] | JobSpec) -> JobSpec:
    """A job spec for :func:`annotate`: a YAML path, a mapping of the same shape or a :class:`JobSpec`; ``input`` and
    ``output`` may be left out (placeholders fill ``input.uri`` and ``output.uri``, which annotate never reads;
    ``input.allowed_schemes``, ``storage_options`` and ``annotation_frame`` are used when given). The CLI's
    :func:`clipmaps.pipeline.spec.load_spec` still requires both.

    Raises:
        SpecError: the file cannot be read or parsed, or the spec is invalid (every problem, with its path).
    """
    if isinstance(source, JobSpec):
        return source
    if isinstance(source, Mapping):
        raw: Any = dict(source)
    else:
        try:
            with open(source, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise SpecError((), f"cannot read job spec {str(source)!r}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise SpecError((), f"{source}: invalid YAML: {e}") from None
    if not isinstance(raw, Mapping):
        raise SpecError((), f"a job spec must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    given = dict(raw.get("input") or {})  # input.uri, or its older name input.manifest, may be given
    raw["input"] = given if given.get("uri") or given.get("manifest") else {**given, "uri": PLACEHOLDER_INPUT}
    raw["output"] = {"uri": PLACEHOLDER_OUTPUT, **dict(raw.get("output") or {})}
    return load_spec(raw)


def output_schema(spec: JobSpec, input_schema: pa.Schema) -> pa.Schema:
    """The schema of :func:`annotate`'s rows for ``spec`` (as loaded by :func:`load_annotate_spec`) and an input of
    ``input_schema`` (see the module docstring for the columns)."""
    fields = [f for f in input_schema if f.name not in (*CONSUMED, cols.HEIGHT, cols.WIDTH, *_ADDED)]
    fields += [
        pa.field(cols.HEIGHT, pa.int32()),
        pa.field(cols.WIDTH, pa.int32()),
        pa.field(cols.ERROR_STAGE, pa.string()),
        pa.field(cols.ERROR_TYPE, pa.string()),
        pa.field(cols.ERROR_MESSAGE, pa.string()),
        pa.field("errors", pa.list_(ERROR_ITEM)),
    ]
    for name, kinds in output_kinds(spec).items():
        if "label_map" in kinds:
            fields.append(pa.field(f"{name}__label_map", pa.binary()))
            if spec.output.label_confidence:
                fields.append(pa.field(f"{name}__confidence", pa.binary()))
        if "heatmaps" in kinds:
            fields.append(pa.field(f"{name}__heatmaps", pa.list_(HEATMAP_ITEM)))
        if "regions" in kinds:
            dim = model_info(spec.model.name).embed_dim
            fields.append(pa.field(f"{name}__regions", pa.list_(region_item(dim))))
    return pa.schema(fields)


#: Columns annotate itself adds (an input that already has them gets them replaced).
_ADDED = (cols.ERROR_STAGE, cols.ERROR_TYPE, cols.ERROR_MESSAGE, "errors", ERROR_REGION_ID)


def output_kinds(spec: JobSpec) -> dict[str, tuple[str, ...]]:
    """Output name → which of ``label_map``, ``heatmaps``, ``regions`` its rows carry with ``spec``."""
    out: dict[str, tuple[str, ...]] = {}
    for m in spec.enabled_methods():
        entry, settings = REGISTRY[m], spec.method(m)
        kinds = entry.output_kinds(settings, vocabulary=spec.vocabulary is not None, write_expl_maps=False)
        named = tuple(
            k
            for k, c in (("label_map", cols.LABELS), ("heatmaps", cols.HEATMAPS), ("regions", cols.EMBEDDINGS))
            if c in kinds
        )
        for name in entry.outputs(settings):
            out[name] = named
    return out


def annotation_plan(
    spec: str | os.PathLike | Mapping[str, Any] | JobSpec, *, has_prompts: bool, has_masks: bool | None = None
):
    """The :class:`~clipmaps.pipeline.plan.Plan` of rows given to :func:`annotate` (no manifest: no files, counts or
    shards): the resolved spec, methods, vocabulary, prompt sources, result fingerprint and ``params_hash`` per
    output. :func:`annotate` and :func:`clipmaps.pipeline.write.write_outputs` both build it, so the rows written
    carry the provenance of the job that computed them.

    Args:
        spec: as :func:`annotate`'s.
        has_prompts: the rows have a ``prompts`` column (decides the ``auto`` prompt source, as a manifest's does).
        has_masks: the rows have ``masks`` or ``masks_uri`` (MaskInversion needs them); None skips that check (the
            rows :func:`annotate` returns no longer carry masks).

    Raises:
        SpecError: as :func:`annotate`.
    """
    from . import plan as planning

    loaded = load_annotate_spec(spec)
    job = planning.resolve_vocabulary(planning.with_io_defaults_spec(loaded))
    planning.check_vocabulary_text(job, loaded.vocabulary)
    if has_masks is not None:
        job.check_manifest(has_masks=has_masks, has_prompts=has_prompts)
    return planning.job_plan(job, has_prompts=has_prompts)


def annotate(ds, spec: str | os.PathLike | Mapping[str, Any] | JobSpec):
    """Annotate the rows of ``ds`` with the methods of ``spec``; lazy (nothing runs until the result is consumed).

    Args:
        ds: a ``ray.data.Dataset`` with ``image_id`` and ``image`` or ``image_uri`` (module docstring). Its schema is
            read once here (``Dataset.schema()``: a Parquet read's footer; a dataset with transforms may run its
            first block to tell).
        spec: a job-spec path, a mapping or a :class:`JobSpec`; ``input``/``output`` are optional
            (:func:`load_annotate_spec`). ``vocabulary.file`` is read here, on the driver.

    Returns:
        a ``ray.data.Dataset`` of one row per input row, in :func:`output_schema`'s columns.

    Raises:
        ValueError: ``ds`` lacks ``image_id``, or both ``image`` and ``image_uri``, or its schema cannot be known.
        SpecError: the spec is invalid or does not fit the dataset (MaskInversion without ``masks``/``masks_uri``,
            manifest prompts without a ``prompts`` column, a vocabulary name too long for the text tower).
    """
    from .plan import _map_batches, model_stages

    schema = ds.schema()
    if schema is None:
        raise ValueError("annotate: the dataset's schema is unknown (an empty dataset?)")
    names = list(schema.names)
    if cols.IMAGE_ID not in names or (IMAGE not in names and cols.IMAGE_URI not in names):
        raise ValueError(
            f"annotate needs an {cols.IMAGE_ID!r} column and an {IMAGE!r} (encoded bytes) or {cols.IMAGE_URI!r} "
            f"column; the dataset has {names}"
        )
    plan = annotation_plan(
        spec, has_prompts=cols.PROMPTS in names, has_masks="masks" in names or cols.MASKS_URI in names
    )
    job = plan.spec
    out_schema = output_schema(job, _arrow_schema(schema))
    ds = _map_batches(
        ds,
        validate_rows,
        fn_kwargs={"allowed_schemes": tuple(job.input.allowed_schemes)},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=job.resources.decode_cpus,
        max_retries=job.resources.task_retries,
    )
    ds = model_stages(ds, job, plan.methods, plan.vocabulary, plan.prompt_sources)
    sink = SinkConfig(
        output_uri=PLACEHOLDER_OUTPUT, methods=plan.provenance(), heatmap_encoding=job.output.heatmap_encoding
    )
    return _map_batches(
        ds,
        annotation_rows,
        fn_kwargs={"sink": sink, "schema": out_schema, "kinds": output_kinds(job)},
        batch_format="numpy",
        batch_size=None,
        num_cpus=0.25,
        max_retries=job.resources.task_retries,
    )


def _arrow_schema(schema) -> pa.Schema:
    """A Ray ``Schema`` (or ``pa.Schema``) as a ``pa.Schema``."""
    if isinstance(schema, pa.Schema):
        return schema
    base = getattr(schema, "base_schema", None)
    if isinstance(base, pa.Schema):
        return base
    return pa.schema(
        [pa.field(n, t if isinstance(t, pa.DataType) else pa.null()) for n, t in zip(schema.names, schema.types)]
    )


# ------------------------------------------------------------------------------------------------ on the workers
def validate_rows(batch: pa.Table, allowed_schemes: tuple[str, ...]) -> pa.Table:
    """The manifest reader's row checks (``clipmaps.pipeline.sources.row_problems``, without the duplicate check) on a
    batch of the user's rows; adds ``error_stage`` (``manifest`` on a refused row), ``error_type``, ``error_message``
    and ``error_region_id``, and nulls a refused row's masks, prompts and image (nothing of it is decoded).

    A row with neither ``image`` bytes nor an ``image_uri`` is refused as ``MissingImage``.

    Raises:
        ValueError: a column has a type that cannot be cast to the manifest's (naming the column and both types).
    """
    n = batch.num_rows
    images = image_bytes(batch[IMAGE]) if IMAGE in batch.column_names else None
    if images is not None:  # the Hugging Face struct becomes its bytes: one form on the workers
        batch = batch.set_column(batch.column_names.index(IMAGE), IMAGE, images)
    columns = {}
    for f in MANIFEST_READ:
        if f.name not in batch.column_names:
            columns[f.name] = pa.nulls(n, f.type)
            continue
        try:
            columns[f.name] = batch[f.name].cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(
                f"annotate: column {f.name!r} is {batch.schema.field(f.name).type}, which does not cast to the "
                f"manifest's {f.type}: {e}"
            ) from None
    problems = check_rows(pa.table(columns, schema=MANIFEST_READ), images, allowed_schemes)
    failed = pa.array([p is not None for p in problems], pa.bool_())
    out = batch
    for name in ("masks", "prompts", cols.MASKS_URI, IMAGE):
        if name in out.column_names and pc.any(failed).as_py():
            i = out.column_names.index(name)
            col = out[name]
            out = out.set_column(i, name, pc.if_else(failed, pa.nulls(n, col.type), col))
    for name in (cols.ERROR_STAGE, cols.ERROR_TYPE, cols.ERROR_MESSAGE, ERROR_REGION_ID):
        if name in out.column_names:
            out = out.drop_columns([name])
    out = out.append_column(cols.ERROR_STAGE, pa.array(["manifest" if p else None for p in problems], pa.string()))
    out = out.append_column(cols.ERROR_TYPE, pa.array([p[0] if p else None for p in problems], pa.string()))
    out = out.append_column(cols.ERROR_MESSAGE, pa.array([p[1] if p else None for p in problems], pa.string()))
    return out.append_column(ERROR_REGION_ID, pa.array([p[2] if p else None for p in problems], pa.string()))


def annotation_rows(batch: dict[str, np.ndarray], sink: SinkConfig, schema: pa.Schema, kinds: dict) -> pa.Table:
    """The methods' columns of a batch → :func:`annotate`'s rows (``schema``), one per input row, in order. The
    values come from the sink's own row builder (``clipmaps.pipeline.sinks.SinkStage.tables``), so they are those
    ``clipmaps run`` writes."""
    stage = SinkStage(sink)
    n = len(batch[cols.IMAGE_ID])
    failed = cols.failed_rows(batch)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        tables = stage.tables(one)
        row: dict[str, Any] = {}
        for f in schema:
            if f.name in batch and f.name not in (cols.HEIGHT, cols.WIDTH):
                row[f.name] = _plain(batch[f.name][i])
        ok = not failed[i]
        row[cols.HEIGHT] = int(batch[cols.HEIGHT][i]) if ok else None
        row[cols.WIDTH] = int(batch[cols.WIDTH][i]) if ok else None
        for name in (cols.ERROR_STAGE, cols.ERROR_TYPE, cols.ERROR_MESSAGE):
            row[name] = str(batch[name][i]) if not ok and cols.present(batch[name][i]) else None
        row["errors"] = [{k: e[k] for k in ERROR_ITEM.names} for e in tables["errors"].to_pylist()]
        by_method: dict[str, dict[str, list]] = {}
        for dataset in ("labels", "heatmaps", "regions"):
            t = tables[dataset]
            for r in t.to_pylist() if t.num_rows else []:
                by_method.setdefault(r["method"], {}).setdefault(dataset, []).append(r)
        failed_methods = {e["method"] for e in row["errors"] if e["stage"] == "model" and e["region_id"] is None}
        for name, what in kinds.items():
            got = by_method.get(name, {})
            usable = ok and name not in failed_methods
            if "label_map" in what:
                labels = got.get("labels")
                row[f"{name}__label_map"] = labels[0]["label_map"] if labels else None
                if f"{name}__confidence" in schema.names:
                    row[f"{name}__confidence"] = labels[0].get("confidence") if labels else None
            if "heatmaps" in what:
                items = [{k: h[k] for k in HEATMAP_ITEM.names} for h in got.get("heatmaps", [])]
                row[f"{name}__heatmaps"] = items if usable else None
            if "regions" in what:
                names = [f.name for f in schema.field(f"{name}__regions").type.value_type]
                items = [{k: r[k] for k in names} for r in got.get("regions", [])]
                row[f"{name}__regions"] = items if usable else None
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def _plain(value: Any) -> Any:
    """A numpy cell (Ray's batch) as a plain Python value for ``pa.Table.from_pylist``."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # Ray's all-null column comes back as NaN
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


__all__ = [
    "ERROR_ITEM",
    "HEATMAP_ITEM",
    "annotate",
    "annotation_plan",
    "annotation_rows",
    "load_annotate_spec",
    "output_kinds",
    "output_schema",
    "region_item",
    "validate_rows",
]
