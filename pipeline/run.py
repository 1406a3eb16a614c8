"""``run(spec)``: the driver side of a job — resolve, plan, execute on Ray, write metadata, summarise.

The driver holds the validated manifest and streams one small row of counts per finished batch; images, masks and
results never pass through it.
"""

from __future__ import annotations

import json
import logging
import platform
import posixpath
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from clipmaps.schemas import batches as cols
from clipmaps.schemas.datasets import ERRORS, VOCABULARY

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
    return Plan(spec=spec, manifest=valid, refused=refused, vocabulary=vocabulary, methods=methods,
                square_size=square[0] if square else None)


def run(spec: JobSpec, *, dry_run: bool = False, progress: Callable[[str], None] | None = None) -> RunResult:
    """Run the job described by ``spec``; ``dry_run`` validates, resolves inputs and returns the plan only."""
    started = time.time()
    say = progress or (lambda line: logger.info("%s", line))
    plan = make_plan(spec)
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
        text = plan.describe()
        say(text)
        fs, root = filesystem(spec.output.uri, dict(spec.output.storage_options))
        prepare_output(spec, fs, root)
        write_vocabulary(plan, fs, root)
        # the errors dataset always exists (readers of an empty run see its schema); refused rows go in first
        write_table(pa.Table.from_pylist([_refused_row(r) for r in plan.refused], schema=ERRORS), fs,
                    posixpath.join(root, "errors", "part-manifest.parquet"))
        counts = {name: 0 for name in cols.STATS}
        counts["errors"] = len(plan.refused)
        t0 = time.time()
        if plan.manifest.num_rows:
            for batch in build_dataset(plan).iter_batches(batch_format="numpy", batch_size=None):
                for name in cols.STATS:
                    counts[name] += int(batch[name].sum())
                if spec.run.progress:
                    rate = counts["rows"] / max(time.time() - t0, 1e-9)
                    say(f"progress  {counts['rows']}/{plan.manifest.num_rows} images, {rate:.2f} images/s, "
                        f"{counts['errors']} errors")
        seconds = time.time() - started
        failed_images = _failed_images(fs, root) if counts["errors"] else 0
        result = RunResult(spec.output.uri, plan.total, counts["rows"], failed_images, counts, seconds,
                           ok=True, plan_text=text, timings={"execute_s": time.time() - t0})
        result.ok = result.error_fraction <= spec.run.max_error_fraction
        write_job_json(spec, result, fs, root)
        return result
    finally:
        if own_ray:
            ray.shutdown()


def quiet_ray_data() -> None:
    """clipmaps prints its own progress line; Ray Data's progress bars and per-stage logs would repeat it."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False
    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def prepare_output(spec: JobSpec, fs, root: str) -> None:
    """Refuse to mix results of another job into ``root``; with ``output.overwrite`` clear it first."""
    marker = posixpath.join(root, "_job.json")
    if fs.exists(marker):
        if spec.output.overwrite:
            for name in ("labels", "heatmaps", "regions", "errors", "vocabulary", "_job.json"):
                path = posixpath.join(root, name)
                if fs.exists(path):
                    fs.rm(path, recursive=True)
        else:
            raise FileExistsError(
                f"{spec.output.uri} already holds a job's output; choose a new output.uri or set output.overwrite"
            )
    fs.makedirs(root, exist_ok=True)


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


def write_job_json(spec: JobSpec, result: RunResult, fs, root: str) -> None:
    from importlib import metadata

    versions = {}
    for dist in ("clipmaps", "torch", "open_clip_torch", "ray", "pyarrow", "numpy", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    doc = {
        "spec": spec.to_dict(redact=True),
        "versions": {"python": sys.version.split()[0], "platform": platform.platform(), **versions},
        "counts": {"images": result.total, "processed": result.processed, "failed_images": result.errors,
                   **{f"rows_{k}": v for k, v in result.counts.items() if k != "rows"}},
        "timings": {"total_s": round(result.seconds, 3), **{k: round(v, 3) for k, v in result.timings.items()}},
        "ok": result.ok,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with fs.open(posixpath.join(root, "_job.json"), "w") as f:
        f.write(json.dumps(doc, indent=2))


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
