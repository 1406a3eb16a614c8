"""Plan building: from a validated job spec and its manifest to the Ray Data pipeline.

read (driver-validated manifest, in blocks) → decode (CPU tasks) → one actor pool per method, chained →
sink (CPU tasks, writes Parquet) → a small table of counts that the driver streams for progress.

Fault tolerance is set explicitly (Ray 2.60's defaults, checked: pool actors get ``max_restarts=-1,
max_task_retries=-1``; Ray Data tasks ``max_retries=-1``):

* method actors: ``max_restarts=-1`` (a dead actor is always replaced: SIGKILL, OOM, preempted node) and
  ``max_task_retries=-1`` (the batch it ran is re-sent to the restarted actor). Not a finite count: while an actor
  restarts (for minutes when its node is gone and a new one has to come), each re-send fails at once with
  ``ActorUnavailableError``, so a budget of N is spent in seconds and the job fails although it would recover
  (measured: 4 retries gone ~6 s after a node kill). The bound is ``run.stall_timeout_s`` instead (Ray Data's
  ``execution_no_progress_timeout_s``): a pool that cannot come back, or a batch that kills every actor, stops the
  job with ``ExecutionTimeoutError`` once nothing else moves.
* decode and sink tasks: ``max_retries=resources.task_retries`` (a task lost with its worker or node is re-run that
  often). Sink tasks also retry on exceptions (``retry_exceptions``: I/O errors that outlived the storage client's
  own retries): their writes are idempotent — deterministic file names, whole-object PUTs or rename — so a re-run
  task replaces its files, never duplicates them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import warnings
from dataclasses import dataclass, field

import pyarrow as pa

from clipmaps.schemas import batches as cols

from .spec import JobSpec

logger = logging.getLogger(__name__)

#: Input columns each method reads (so a pool can drop what no later pool needs).
METHOD_INPUTS = {
    "maskclip": (cols.PIXELS_MASKCLIP,),
    "gem": (cols.PIXELS_SQUARE,),
    "legrad": (cols.PIXELS_SQUARE,),
    "maskinversion": (cols.PIXELS_SQUARE, cols.MASKS_SQUARE),
}
SQUARE_METHODS = ("gem", "legrad", "maskinversion")
#: Methods that encode text (and so have a vocabulary id).
TEXT_METHODS = ("maskclip", "gem", "legrad")


def method_vocabulary_id(spec: JobSpec, method: str) -> str | None:
    """The vocabulary id ``method``'s outputs name, or None (no vocabulary, or a method without text)."""
    if spec.vocabulary is None or method not in TEXT_METHODS:
        return None
    return spec.vocabulary_id(method)


@dataclass
class Plan:
    """A resolved job: valid manifest rows, rows refused before any work, vocabulary, and the stages."""

    spec: JobSpec
    manifest: pa.Table
    refused: list[dict]
    vocabulary: list[str] | None
    methods: list[str]
    square_size: int | None
    manifest_digest: str = ""
    shard_sizes: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.manifest.num_rows + len(self.refused)

    def describe(self) -> str:
        """The plan as a few human-readable lines."""
        s = self.spec
        m = s.model
        weights = m.weights_id
        lines = [
            f"input     {s.input.manifest}: {self.manifest.num_rows} images to process, {len(self.refused)} refused",
            f"model     {m.name} ({weights}), precision {m.precision}, device {m.device}",
            f"output    {s.output.uri}",
        ]
        if self.vocabulary is not None:
            bg = f" + {len(s.vocabulary.background)} background" if s.vocabulary.background else ""
            lines.append(f"vocabulary {len(self.vocabulary)} classes{bg} (id {s.vocabulary_id()})")
        lines.append(f"decode    CPU tasks, {s.resources.decode_cpus} CPU each")
        for name in self.methods:
            pool = s.method(name).resources
            lines.append(
                f"{name:<9} pool {pool.min_actors}-{pool.max_actors} actors x ({pool.num_gpus} GPU, "
                f"{pool.num_cpus} CPU), batch {pool.batch_size}, params {s.method_params_hash(name)}"
            )
        r, stall = s.resources, s.run.stall_timeout_s
        lines.append(
            f"faults    {r.io_retries} attempts per object-store request, {r.task_retries} retries per task, "
            f"stall timeout {f'{stall:g} s' if stall is not None else 'Ray default'}"
        )
        lines.extend(f"note      {n}" for n in self.notes)
        return "\n".join(lines)


def sink_retry_exceptions() -> list[type[BaseException]]:
    """Exceptions a sink task is re-run for: I/O failures (``OSError`` covers s3fs's translated errors, connection
    resets and timeouts) and the storage clients' own error types when they are installed."""
    out: list[type[BaseException]] = [OSError]
    for module, name in (
        ("botocore.exceptions", "BotoCoreError"),
        ("botocore.exceptions", "ClientError"),
        ("aiohttp", "ClientError"),
    ):
        with contextlib.suppress(ImportError, AttributeError):
            out.append(getattr(importlib.import_module(module), name))
    return out


def check_resources(spec: JobSpec, available: dict) -> list[str]:
    """Refuse plans whose pools cannot all start next to the decode tasks (on 2 CPUs, pools that reserve every
    CPU starve the read and decode stages and the job hangs). Returns notes; raises ``ValueError`` if infeasible."""
    cpus = float(available.get("CPU", 0))
    gpus = float(available.get("GPU", 0))
    need_cpu = spec.resources.decode_cpus
    need_gpu = 0.0
    for name in spec.enabled_methods():
        pool = spec.method(name).resources
        need_cpu += pool.min_actors * pool.num_cpus
        need_gpu += pool.min_actors * pool.num_gpus
    problems = []
    for name in spec.enabled_methods():
        pool = spec.method(name).resources
        for res, amount in pool.custom_resources.items():
            have = float(available.get(res, 0))
            if amount * pool.min_actors > have:
                problems.append(
                    f"methods.{name}.resources.custom_resources.{res}: {pool.min_actors} actor(s) x {amount:g} "
                    f"needs {amount * pool.min_actors:g}, the cluster has {have:g} (start nodes with that resource)"
                )
    if need_cpu > cpus:
        problems.append(
            f"the pools' minimum actors reserve {need_cpu:g} CPUs with the decode stage, the cluster has {cpus:g}: "
            "lower methods.<name>.resources.num_cpus / min_actors or resources.decode_cpus"
        )
    if need_gpu > gpus:
        problems.append(
            f"the pools' minimum actors need {need_gpu:g} GPUs, the cluster has {gpus:g}: "
            "set methods.<name>.resources.num_gpus to 0 to run on CPUs, or add GPU nodes"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return [f"reserves {need_cpu:g}/{cpus:g} CPUs and {need_gpu:g}/{gpus:g} GPUs at minimum pool sizes"]


def _map_batches(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)``. The retry options (``max_retries``, ``retry_exceptions``, ``max_restarts``,
    ``max_task_retries``) only exist as ``**ray_remote_args`` in Ray 2.60, which warns that they go in Ray 2.64 with
    no named replacement yet; the warning is silenced here, and a removal will fail the pipeline tests loudly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ds.map_batches(fn, **kwargs)


def build_dataset(plan: Plan, table: pa.Table | None = None, *, blocks: int = 0):
    """The Ray dataset of per-batch, per-shard counts (``shard`` and ``schemas.batches.STATS`` columns) for the
    rows of ``table`` (default: all of the plan's manifest)."""
    import ray
    from ray.data import ActorPoolStrategy

    from clipmaps.actors.actor import ActorConfig, MethodActor, ModelSource
    from clipmaps.actors.runners import ORIGINAL_GEM, OutputOptions, Vocabulary

    from .decode import DecodeConfig, decode_batch
    from .sinks import Provenance, SinkConfig, sink_batch

    spec = plan.spec
    table = plan.manifest if table is None else table
    n_blocks = blocks or max(1, min(table.num_rows, 200))
    step = max(1, -(-table.num_rows // n_blocks))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])

    decode_cfg = DecodeConfig(
        square_size=plan.square_size,
        maskclip=spec.preprocess("maskclip") if "maskclip" in plan.methods else None,
        need_masks="maskinversion" in plan.methods,
        max_pixels=spec.resources.max_pixels,
        storage_options=dict(spec.input.storage_options),
        allowed_schemes=tuple(spec.input.allowed_schemes),
        retries=spec.resources.retries,
    )
    first_pool = spec.method(plan.methods[0]).resources
    retries = spec.resources.task_retries
    ds = _map_batches(
        ds,
        decode_batch,
        fn_kwargs={"config": decode_cfg},
        batch_format="numpy",
        batch_size=first_pool.batch_size,
        num_cpus=spec.resources.decode_cpus,
        max_retries=retries,
    )

    m = spec.model
    model = ModelSource(
        name=m.name,
        pretrained=m.pretrained,
        weights=m.weights,
        weights_sha256=m.weights_sha256,
        seed=m.seed,
        storage_options=dict(m.storage_options),
        device=m.device,
        precision=m.precision,
    )
    vocab = None
    if plan.vocabulary is not None:
        v = spec.vocabulary
        vocab = Vocabulary(names=tuple(plan.vocabulary), background=tuple(v.background), threshold=v.threshold)
    for index, name in enumerate(plan.methods):
        later = {c for other in plan.methods[index + 1 :] for c in METHOD_INPUTS[other]}
        drop = tuple(c for c in METHOD_INPUTS[name] if c not in later)
        pool = spec.method(name).resources
        config = ActorConfig(
            method=name,
            model=model,
            params=spec.method_params(name),
            vocabulary=vocab,
            options=OutputOptions(**spec.output_options(name)),
            drop_columns=drop,
            torch_threads=pool.torch_threads,
        )
        ds = _map_batches(
            ds,
            MethodActor,
            fn_constructor_kwargs={"config": config},
            compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_gpus=pool.num_gpus or None,
            num_cpus=pool.num_cpus,
            batch_size=pool.batch_size,
            # resources=None breaks Ray Data's operator fusion before Ray 2.60 (AttributeError in _canonicalize)
            **({"resources": dict(pool.custom_resources)} if pool.custom_resources else {}),
            batch_format="numpy",
            max_restarts=-1,
            max_task_retries=-1,
        )
    provenance = {
        name: Provenance(
            method=name,
            model=m.name,
            weights=m.weights_id,
            params_hash=spec.method_params_hash(name),
            vocabulary_id=method_vocabulary_id(spec, name),
        )
        for name in plan.methods
    }
    if "gem" in plan.methods and spec.method("gem").original:
        provenance[ORIGINAL_GEM] = dataclasses.replace(provenance["gem"], method=ORIGINAL_GEM)
    sink = SinkConfig(
        output_uri=spec.output.uri,
        methods=provenance,
        heatmap_encoding=spec.output.heatmap_encoding,
        storage_options=dict(spec.output.storage_options),
    )
    return _map_batches(
        ds,
        sink_batch,
        fn_kwargs={"config": sink},
        batch_format="numpy",
        num_cpus=0.25,
        batch_size=None,
        max_retries=retries,
        retry_exceptions=sink_retry_exceptions(),
    )
