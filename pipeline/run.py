"""``run(spec)``: the driver side of a job — resolve, plan, execute on Ray, write metadata, summarise.

The driver holds the validated manifest and streams one small row of counts per finished batch; images, masks and
results never pass through it.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipmaps.schemas import batches as cols
from clipmaps.schemas.datasets import ERRORS, VOCABULARY

from . import resume
from .plan import SQUARE_METHODS, Plan, build_dataset, check_resources, method_vocabulary_id
from .sinks import filesystem, write_table
from .sources import read_manifest_table, validate_manifest
from .spec import JobSpec
from .vocabularies import parse_vocabulary_file

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run did. ``ok`` is False when the error fraction exceeded ``run.max_error_fraction``."""

    output_uri: str
    total: int
    processed: int
    errors: int
    counts: dict[str, int]
    seconds: float
    ok: bool
    plan_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def error_fraction(self) -> float:
        return self.errors / self.total if self.total else 0.0


def resolve_vocabulary(spec: JobSpec) -> JobSpec:
    """``spec`` with the names of a ``vocabulary.file`` read in (other vocabularies are already inline)."""
    v = spec.vocabulary
    if v is None or not v.file:
        return spec
    import fsspec

    with fsspec.open(v.file, "rt", encoding="utf-8", **dict(spec.input.storage_options)) as f:
        names = parse_vocabulary_file(f.read())
    return spec.with_vocabulary_names(names)


def make_plan(spec: JobSpec) -> Plan:
    """Read and validate the manifest, resolve the vocabulary: everything up to running models."""
    spec = resolve_vocabulary(spec)
    table = read_manifest_table(spec.input.manifest, storage_options=dict(spec.input.storage_options),
                                limit=spec.input.limit)
    valid, refused = validate_manifest(table, allowed_schemes=tuple(spec.input.allowed_schemes))
    has_masks = "masks" in valid.column_names and any(valid.column("masks").to_pylist())
    has_prompts = "prompts" in valid.column_names and valid.column("prompts").null_count < valid.num_rows
    spec.check_manifest(has_masks=has_masks, has_prompts=has_prompts)
    methods = spec.enabled_methods()
    square = [spec.method(m).size for m in methods if m in SQUARE_METHODS]
    vocabulary = list(spec.vocabulary.class_names()) if spec.vocabulary is not None else None
    shards = np.arange(valid.num_rows, dtype=np.int64) // spec.output.shard_rows
    valid = valid.append_column(cols.SHARD, pa.array(shards, pa.int64()))
    digest = hashlib.sha256()
    for image_id, uri in zip(valid.column("image_id").to_pylist(), valid.column("image_uri").to_pylist()):
        digest.update(f"{image_id}\t{uri}\n".encode())
    return Plan(spec=spec, manifest=valid, refused=refused, vocabulary=vocabulary, methods=methods,
                square_size=square[0] if square else None, manifest_digest=digest.hexdigest()[:32],
                shard_sizes=dict(Counter(shards.tolist())))


def run(spec: JobSpec, *, dry_run: bool = False, progress: Callable[[str], None] | None = None) -> RunResult:
    """Run the job described by ``spec``; ``dry_run`` validates, resolves inputs and returns the plan only.

    Re-running the same job on the same output resumes it (see :mod:`clipmaps.pipeline.resume`).
    """
    started = time.time()
    say = progress or (lambda line: logger.info("%s", line))
    plan = make_plan(spec)
    spec = plan.spec
    if dry_run:
        text = plan.describe()
        return RunResult(spec.output.uri, plan.total, 0, len(plan.refused), {}, time.time() - started, True, text)

    import ray

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=spec.run.ray_address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        quiet_ray_data()
        plan.notes.extend(check_resources(spec, ray.cluster_resources()))
        fs, root = filesystem(spec.output.uri, dict(spec.output.storage_options))
        state, todo = prepare_output(plan, fs, root)
        if state.complete:
            plan.notes.append(f"resuming: {len(state.complete)} of {len(plan.shard_sizes)} shards already complete")
        text = plan.describe()
        say(text)
        attempt = {"started_at": _now(), "resumed_shards": len(state.complete), "todo_images": todo.num_rows}
        doc = {"spec": spec.to_dict(redact=True), "fingerprint": resume.fingerprint(spec, plan), "status": "running",
               "attempts": [*state.attempts, attempt]}
        resume.write_job(fs, root, {**doc, "versions": versions()})
        write_vocabulary(plan, fs, root)
        # the errors dataset always exists (readers of an empty run see its schema); refused rows go in first
        write_table(pa.Table.from_pylist([_refused_row(r) for r in plan.refused], schema=ERRORS), fs,
                    posixpath.join(root, "errors", "part-manifest.parquet"))
        t0 = time.time()
        complete = dict(state.complete)
        if todo.num_rows:
            complete.update(execute(plan, todo, fs, root, say))
        counts = {name: sum(int(c.get(name, 0)) for c in complete.values()) for name in cols.STATS}
        counts["errors"] += len(plan.refused)
        attempt.update(finished_at=_now(), processed_images=sum(int(c.get("rows", 0)) for c in complete.values())
                       - sum(int(c.get("rows", 0)) for c in state.complete.values()),
                       execute_s=round(time.time() - t0, 3))
        failed_images = _failed_images(fs, root) if counts["errors"] else 0
        result = RunResult(spec.output.uri, plan.total, counts["rows"] + len(plan.refused), failed_images, counts,
                           time.time() - started, ok=True, plan_text=text, timings={"execute_s": time.time() - t0})
        result.ok = result.error_fraction <= spec.run.max_error_fraction
        doc.update(status="finished", ok=result.ok, versions=versions(), counts=_job_counts(result),
                   timings={"total_s": round(result.seconds, 3), "execute_s": round(time.time() - t0, 3)})
        resume.write_job(fs, root, doc)
        return result
    finally:
        if own_ray:
            ray.shutdown()


def execute(plan: Plan, todo: pa.Table, fs, root: str, say: Callable[[str], None]) -> dict[int, dict]:
    """Run the pipeline on ``todo``; write each shard's marker as soon as all its rows are written."""
    remaining = {int(k): v for k, v in Counter(todo.column(cols.SHARD).to_pylist()).items()}
    per_shard: dict[int, dict] = {}
    done: dict[int, dict] = {}
    rows = errors = 0
    t0 = time.time()
    for batch in build_dataset(plan, todo).iter_batches(batch_format="numpy", batch_size=None):
        for j, shard in enumerate(batch[cols.SHARD]):
            shard = int(shard)
            c = per_shard.setdefault(shard, dict.fromkeys(cols.STATS, 0))
            for name in cols.STATS:
                c[name] += int(batch[name][j])
            rows += int(batch["rows"][j])
            errors += int(batch["errors"][j])
            if c["rows"] == remaining[shard]:
                resume.write_marker(fs, root, shard, c)
                done[shard] = per_shard.pop(shard)
        if plan.spec.run.progress:
            rate = rows / max(time.time() - t0, 1e-9)
            say(f"progress  {rows}/{todo.num_rows} images, {rate:.2f} images/s, {errors} errors")
    return done


def prepare_output(plan: Plan, fs, root: str) -> tuple[resume.OutputState, pa.Table]:
    """Check the output against this job, clear or clean it, and return its state and the rows still to do."""
    spec = plan.spec
    state = resume.read_state(fs, root)
    if spec.output.overwrite and (state.job is not None or state.complete):
        resume.clear_output(fs, root)
        state = resume.OutputState(job=None)
    resume.check_resumable(state, resume.fingerprint(spec, plan), spec.output.uri)
    removed = resume.remove_incomplete(fs, root, set(state.complete))
    if removed:
        logger.info("removed %d result files of unfinished shards", removed)
    fs.makedirs(root, exist_ok=True)
    shard = plan.manifest.column(cols.SHARD)
    todo = plan.manifest.filter(pc.invert(pc.is_in(shard, pa.array(sorted(state.complete), pa.int64()))))
    return state, todo


def quiet_ray_data() -> None:
    """clipmaps prints its own progress line; Ray Data's progress bars and per-stage logs would repeat it."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False
    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def write_vocabulary(plan: Plan, fs, root: str) -> None:
    """One ``vocabulary/`` file per vocabulary id in use (methods with different templates have different ids)."""
    if plan.vocabulary is None:
        return
    spec = plan.spec
    v = spec.vocabulary
    for method in plan.methods:
        vid = method_vocabulary_id(spec, method)
        if vid is None:
            continue
        templates = spec.templates(method)
        templates = [templates] if isinstance(templates, str) else list(templates)
        rows = [{"vocabulary_id": vid, "class_index": 0, "name": "background", "is_background": True,
                 "templates": templates}]
        rows += [{"vocabulary_id": vid, "class_index": i + 1, "name": n, "is_background": False,
                  "templates": templates} for i, n in enumerate(plan.vocabulary)]
        rows += [{"vocabulary_id": vid, "class_index": 0, "name": n, "is_background": True, "templates": templates}
                 for n in v.background]
        path = posixpath.join(root, "vocabulary", f"{vid}.parquet")
        if not fs.exists(path):
            write_table(pa.Table.from_pylist(rows, schema=VOCABULARY), fs, path)


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("clipmaps", "torch", "open_clip_torch", "ray", "pyarrow", "numpy", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _job_counts(result: RunResult) -> dict:
    return {"images": result.total, "processed": result.processed, "failed_images": result.errors,
            **{f"rows_{k}": v for k, v in result.counts.items() if k != "rows"}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _failed_images(fs, root: str) -> int:
    """Distinct image ids with at least one error row (an image can fail in several methods)."""
    import pyarrow.dataset as pads

    path = posixpath.join(root, "errors")
    if not fs.exists(path):
        return 0
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id"])
    return len(set(table.column("image_id").to_pylist()))


def _refused_row(r: dict) -> dict:
    return {"image_id": r.get("image_id"), "uri": r.get("uri"), "method": None, "region_id": None,
            "stage": r.get("stage", "manifest"), "error_type": r.get("error_type", "Error"),
            "message": r.get("message", "")}
