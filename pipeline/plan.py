"""Plan building: from a validated job spec and its manifest to the Ray Data pipeline.

read (one Ray task per manifest shard: rows read, validated and digested on the worker) → decode (CPU tasks) →
one actor pool per method, chained → sink (CPU tasks, writes Parquet) → a small table of counts that the driver
streams for progress.

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
import importlib
import logging
import warnings
from dataclasses import dataclass, field

from clipmaps.actors.registry import REGISTRY
from clipmaps.schemas.errors import ConfigError, ManifestError
from clipmaps.schemas.storage import filesystem, redact_uri, uri_scheme, with_io_defaults

from . import fingerprint as fp
from .spec import JobSpec

logger = logging.getLogger(__name__)


_PROMPT_SOURCES = {
    "manifest": ", prompts: the manifest's",
    "vocabulary": ", prompts: the class names",
    "auto": ", prompts: each row's own, else the class names",
}


@dataclass
class Plan:
    """A resolved job: its manifest files and their row counts, the shards, the resolved vocabulary, the result
    fingerprint. Holds state per file and per shard, never per row.

    Attributes:
        spec: the job, ``vocabulary.file`` resolved into names and I/O defaults merged into storage options.
        files: the manifest files (``clipmaps.pipeline.manifests.ManifestFile``), in path order.
        counts: per file, its row count, the byte offsets of every ``shard_rows``-th row and its column flags.
        rows: per file, the rows the job uses (``input.limit`` applied).
        vocabulary: the foreground class names, or None.
        methods: enabled methods, in pipeline order.
        prompt_sources: method → ``manifest`` | ``vocabulary`` for methods that write heatmaps.
        fingerprint: the job's result fingerprint (``clipmaps.pipeline.fingerprint``).
        params_hash: output name → the ``params_hash`` its rows carry.
        shards: shard id → its range (``clipmaps.pipeline.shards.Shard``); a fresh plan until
            :func:`clipmaps.pipeline.run.prepare_output` assigns them against the output's markers.
        duplicates: shard id → {row in its file → message}: rows whose ``image_id`` an earlier row has.
        estimated: the row counts of text files are estimates from a sample (``--dry-run``).
    """

    spec: JobSpec
    files: list
    counts: list
    rows: list[int]
    vocabulary: list[str] | None
    methods: list[str]
    prompt_sources: dict[str, str]
    fingerprint: dict
    params_hash: dict[str, str]
    shards: dict = field(default_factory=dict)
    duplicates: dict[int, dict[int, str]] = field(default_factory=dict)
    estimated: bool = False
    shard_digests: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Manifest rows the job covers (valid or not: refused rows become error rows)."""
        return sum(self.rows)

    @property
    def shard_sizes(self) -> dict[int, int]:
        """Shard → number of manifest rows in it."""
        return {sid: s.rows for sid, s in self.shards.items()}

    def shard_info(self, shard: int) -> dict:
        """What a shard's marker records about where its rows come from: the file (relative to the manifest root),
        the first row, the row count and the file's identity (size and ETag or mtime)."""
        s = self.shards[shard]
        f = self.files[s.file]
        return {"file": f.rel, "start": s.start, "rows": s.rows, "identity": f.identity}

    @property
    def outputs(self) -> list[str]:
        """Output names (the ``method`` column values): the methods, and GEM's baseline when asked for."""
        return [name for m in self.methods for name in REGISTRY[m].outputs(self.spec.method(m))]

    def vocabulary_id(self, name: str) -> str | None:
        """The vocabulary id output ``name``'s rows carry (None without a vocabulary or for a method without text)."""
        method = REGISTRY[name].parent or name
        if self.spec.vocabulary is None or not REGISTRY[method].encodes_text:
            return None
        return self.spec.vocabulary_id(method)

    def provenance(self):
        """Output name → the :class:`~clipmaps.pipeline.sinks.Provenance` its result rows carry (method, model,
        weights, params_hash, vocabulary id)."""
        from .sinks import Provenance

        spec = self.spec
        return {
            name: Provenance(
                method=name,
                model=spec.model.name,
                weights=spec.model.weights_id,
                params_hash=self.params_hash[name],
                vocabulary_id=self.vocabulary_id(name),
            )
            for name in self.outputs
        }

    def describe(self) -> str:
        """The plan as a few human-readable lines."""
        s = self.spec
        m = s.model
        about = "about " if self.estimated else ""
        files = f" from {len(self.files)} files" if len(self.files) > 1 else ""
        lines = [
            f"input     {s.input.shown}: {about}{self.total} images in {about}{len(self.shards)} shards{files}",
            f"model     {m.name} ({m.weights_id}), {m.info.family}, precision {m.precision}, device {m.device}",
            f"output    {redact_uri(s.output.uri)}",
        ]
        if self.vocabulary is not None:
            bg = f" + {len(s.vocabulary.background)} background" if s.vocabulary.background else ""
            lines.append(f"vocabulary {len(self.vocabulary)} classes{bg} (id {s.vocabulary_id()})")
        lines.append(f"decode    CPU tasks, {s.resources.decode_cpus} CPU each")
        for name in self.methods:
            pool = s.method(name).resources
            source = _PROMPT_SOURCES.get(self.prompt_sources.get(name), "")
            lines.append(
                f"{name:<9} pool {pool.min_actors}-{pool.max_actors} actors x ({pool.num_gpus} GPU, "
                f"{pool.num_cpus} CPU), batch {pool.batch_size}, params {self.params_hash[name]}{source}"
            )
        r, stall = s.resources, s.run.stall_timeout_s
        lines.append(
            f"faults    {r.io_retries} attempts per object-store request, {r.task_retries} retries per task, "
            f"stall timeout {f'{stall:g} s' if stall is not None else 'Ray default'}"
        )
        lines.extend(f"note      {n}" for n in self.notes)
        return "\n".join(lines)


def resolve_vocabulary(spec: JobSpec) -> JobSpec:
    """``spec`` with the names of a ``vocabulary.file`` read in (other vocabularies are already inline).

    Raises:
        ConfigError: the file cannot be read (naming ``vocabulary.file``); SpecError: bad names in it."""
    v = spec.vocabulary
    if v is None or not v.file:
        return spec
    from .vocabularies import parse_vocabulary_file

    fs, path = filesystem(v.file, dict(spec.input.storage_options))
    try:
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        shown = redact_uri(v.file)
        raise ConfigError(f"vocabulary.file: cannot read {shown!r}: {type(e).__name__}: {e}") from None
    return spec.with_vocabulary_names(parse_vocabulary_file(text))


def check_vocabulary_text(spec: JobSpec, source=None) -> None:
    """Refuse vocabulary names the text tower cannot represent (too many tokens with one of the templates a method
    fills them into) or cannot tell apart (equal token ids), with the model's own tokenizer.

    Args:
        spec: the job, ``vocabulary.file`` already resolved into names.
        source: the vocabulary section as written (before the file was read), so problems name ``vocabulary.file``
            for a file's names; default ``spec.vocabulary``.

    The tokenizer needs open_clip (and torch), so this runs here, at plan time (``clipmaps run`` and ``--dry-run``),
    not in ``load_spec``. A tokenizer that cannot be built offline (a Hugging Face one for SigLIP) skips the check
    with a warning; the actors still refuse too-long text then (``clipmaps.actors.text.TextEncoder``).

    Raises:
        SpecError: naming each bad name's field (``vocabulary.names[3]``, ``vocabulary.background[0]``,
            ``vocabulary.file``), its token count and the limit, or the name it duplicates.
    """
    from .spec import SpecError
    from .vocabularies import text_problems

    v = spec.vocabulary
    methods = [m for m in spec.enabled_methods() if REGISTRY[m].encodes_text]
    if v is None or not methods:
        return
    source = source if source is not None else v
    try:
        import open_clip

        from clipmaps.actors.models import register_model_configs
        from clipmaps.actors.text import prompt_tokens, resolve_templates

        register_model_configs()
        tokenizer = open_clip.get_tokenizer(spec.model.name)
    except Exception as e:  # noqa: BLE001 - the check is a convenience; the actors refuse cut text anyway
        logger.warning("vocabulary text not checked at plan time (no tokenizer for %s: %s)", spec.model.name, e)
        return
    templates = list(dict.fromkeys(t for m in methods for t in resolve_templates(spec.templates(m))))
    limit = spec.model.info.context_length or getattr(tokenizer, "context_length", None) or 77
    found = text_problems(
        {"names": v.class_names(), "background": v.background},
        templates,
        lambda text: prompt_tokens(tokenizer, text),
        limit,
        model=spec.model.name,
    )
    if not found:
        return
    problems = []
    for key, i, reason in found:
        if key == "names" and source.file is not None:
            reason = reason.replace("(names[", "(name [")  # the file's names have no field of their own
            problems.append((("vocabulary", "file"), f"name [{i}] {reason} (in {redact_uri(source.file)})"))
        elif key == "names" and source.preset is not None:
            problems.append((("vocabulary", "preset"), f"name [{i}] {reason}"))
        else:
            problems.append((("vocabulary", key, f"[{i}]"), reason))
    raise SpecError(problems=problems)


def with_io_defaults_spec(spec: JobSpec) -> JobSpec:
    """``spec`` with ``resources.io_retries`` / ``read_timeout_s`` merged into the ``storage_options`` of every part
    that may touch ``s3://`` (input: when the manifest is on S3 or S3 URIs are allowed; output; weights), unless the
    user set them (``clipmaps.schemas.storage.with_io_defaults``)."""
    r = spec.resources

    def merged(options, *uris: str | None) -> dict:
        if not any(u and uri_scheme(u) in ("s3", "s3a") for u in uris):
            return dict(options)
        return with_io_defaults(dict(options), attempts=r.io_retries, timeout_s=r.read_timeout_s)

    i, o, m = spec.input, spec.output, spec.model
    image_s3 = "s3://x" if {"s3", "s3a"} & set(i.allowed_schemes) else None
    return spec.model_copy(
        update={
            "input": i.model_copy(update={"storage_options": merged(i.storage_options, *i.uris, image_s3)}),
            "output": o.model_copy(update={"storage_options": merged(o.storage_options, o.uri)}),
            "model": m.model_copy(update={"storage_options": merged(m.storage_options, m.weights)}),
        }
    )


def option_schemes(spec: JobSpec) -> tuple[str, ...]:
    """The URI schemes ``input.storage_options`` apply to when images and masks are read: the input's own, and the
    object stores among ``input.allowed_schemes`` (a local manifest of ``s3://`` images takes the S3 endpoint and
    keys); ``http``/``https`` image URIs only when the input itself is on the web (aiohttp refuses S3 client settings
    such as ``endpoint_url``, which failed every https row of a job with S3 options)."""
    own = {uri_scheme(u) for u in spec.input.uris}
    return tuple(sorted(own | {s for s in spec.input.allowed_schemes if s not in ("http", "https")}))


def make_plan(spec: JobSpec, *, dry_run: bool = False) -> Plan:
    """List the manifest's files and count their rows, resolve the vocabulary and prompt sources, check the
    vocabulary's text against the model's tokenizer (:func:`check_vocabulary_text`), fingerprint the job: everything
    up to running models. Rows are never read here: counts come from Parquet footers and from one Ray task per text
    file (``ray`` must be initialised), or, with ``dry_run``, from the footers and a sample of each text file
    (:func:`clipmaps.pipeline.manifests.sample_count`; no Ray).

    Raises:
        ManifestError: the manifest as a whole is unusable (no file, unknown format, missing columns, no rows);
            SpecError: the job does not fit the manifest, or a vocabulary name is too long for the text tower or the
            same text as another."""
    from .manifests import count_files, list_manifest_files, sample_count
    from .shards import cap_rows, fresh_shards
    from .webdataset import with_sample_fields

    source_vocabulary = spec.vocabulary
    spec = resolve_vocabulary(with_io_defaults_spec(spec))
    check_vocabulary_text(spec, source_vocabulary)
    options = dict(spec.input.storage_options)
    shard_rows = spec.output.shard_rows
    _, files = list_manifest_files(spec.input.uri, options, spec.input.format, split=spec.input.split)
    files = with_sample_fields(files, spec.input.webdataset)  # as input.webdataset says (refused without tars)
    if dry_run:
        counts = [sample_count(f, shard_rows, options) for f in files]
    else:
        counts = count_files(files, shard_rows, options, retries=spec.resources.task_retries)
    rows = cap_rows(counts, spec.input.limit)
    if not sum(rows):
        raise ManifestError(f"manifest {spec.input.shown} is empty: it has no rows")
    used = [c for c, n in zip(counts, rows) if n]
    has_masks = any(c.flags.get("masks") or c.flags.get("masks_uri") for c in used)
    has_prompts = any(c.flags.get("prompts") for c in used)
    spec.check_manifest(has_masks=has_masks, has_prompts=has_prompts)
    return job_plan(
        spec,
        has_prompts=has_prompts,
        files=files,
        counts=counts,
        rows=rows,
        shards={s.id: s for s in fresh_shards(rows, shard_rows)},
        estimated=any(c.estimated for c in counts),
    )


def job_plan(spec: JobSpec, *, has_prompts: bool, files=(), counts=(), rows=(), **fields) -> Plan:
    """The :class:`Plan` of ``spec`` (vocabulary resolved, I/O defaults merged) whose input has a ``prompts`` column
    or not (``has_prompts``: decides the ``auto`` prompt source and the fingerprint): its methods, vocabulary,
    prompt sources, result fingerprint and ``params_hash`` per output; ``files``/``counts``/``rows`` and other
    ``fields`` as given (a manifest's, from :func:`make_plan`; none for the rows given to
    :func:`clipmaps.pipeline.annotate.annotate`)."""
    methods = spec.enabled_methods()
    fingerprint = fp.job_fingerprint(spec, manifest_has_prompts=has_prompts)
    return Plan(
        spec=spec,
        files=list(files),
        counts=list(counts),
        rows=list(rows),
        vocabulary=list(spec.vocabulary.class_names()) if spec.vocabulary is not None else None,
        methods=methods,
        prompt_sources={
            m: spec.prompt_source(m, manifest_has_prompts=has_prompts) for m in methods if spec.method(m).heatmaps
        },
        fingerprint=fingerprint,
        params_hash=fp.params_hashes(fingerprint),
        **fields,
    )


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
    CPU starve the read and decode stages and the job hangs). Returns notes.

    Raises:
        ConfigError: the cluster lacks what the pools' minimum sizes reserve (naming the fields to change)."""
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
        raise ConfigError("; ".join(problems))
    return [f"reserves {need_cpu:g}/{cpus:g} CPUs and {need_gpu:g}/{gpus:g} GPUs at minimum pool sizes"]


def _map_batches(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)``. The retry options (``max_retries``, ``retry_exceptions``, ``max_restarts``,
    ``max_task_retries``) only exist as ``**ray_remote_args`` in Ray 2.60, which warns that they go in Ray 2.64 with
    no named replacement yet; the warning is silenced here, and a removal will fail the pipeline tests loudly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ds.map_batches(fn, **kwargs)


def build_dataset(plan: Plan, shards: list | None = None):
    """The Ray dataset of per-batch, per-shard counts (``shard``, ``schemas.batches.STATS``, the staged files and the
    shard's digest) for ``shards`` (default: all of the plan's): read (one task per shard, validating on the worker)
    → decode → one actor pool per method → sink."""
    import ray

    from .shards import ManifestDatasource
    from .sinks import SinkConfig, sink_batch

    spec = plan.spec
    shards = sorted(plan.shards.values(), key=lambda s: s.id) if shards is None else shards
    source = ManifestDatasource(
        plan.files,
        plan.counts,
        shards,
        spec.output.shard_rows,
        dict(spec.input.storage_options),
        tuple(spec.input.allowed_schemes),
        plan.duplicates,
    )
    # the read tasks ask for the decode stage's CPU share, not Ray Data's default of 1 CPU: check_resources budgets
    # that share beside the pools, and a 1-CPU task never fits a node whose CPUs the actors partly hold
    ds = ray.data.read_datasource(source, override_num_blocks=max(1, len(shards)), num_cpus=spec.resources.decode_cpus)

    ds = model_stages(ds, spec, plan.methods, plan.vocabulary, plan.prompt_sources)
    retries = spec.resources.task_retries
    out = spec.output
    sink = SinkConfig(
        output_uri=out.uri,
        methods=plan.provenance(),
        heatmap_encoding=out.heatmap_encoding,
        storage_options=dict(out.storage_options),
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


def model_stages(ds, spec: JobSpec, methods: list[str], vocabulary: list[str] | None, prompt_sources: dict[str, str]):
    """``ds`` (rows with ``image_id`` and ``image_uri`` or ``image``; optional ``masks``, ``masks_uri``, ``prompts``,
    and ``error_*`` for rows refused upstream) → decode (CPU tasks) → one actor pool per method, chained. The part of
    the pipeline that :func:`build_dataset` (the job runner) and :func:`clipmaps.pipeline.annotate.annotate` (a step
    in the user's own pipeline) share.

    Args:
        spec: the job (``vocabulary.file`` resolved, I/O defaults merged).
        methods: enabled methods, in pipeline order.
        vocabulary: the foreground class names, or None.
        prompt_sources: method → ``manifest`` | ``vocabulary`` | ``auto`` for methods that write heatmaps.

    Returns:
        the lazy dataset of decoded rows with each method's columns (``clipmaps.schemas.batches``).
    """
    from ray.data import ActorPoolStrategy

    from clipmaps.actors.actor import ActorConfig, MethodActor
    from clipmaps.actors.predictors import OutputOptions, Vocabulary

    from .decode import DecodeConfig, decode_batch

    square = [m for m in methods if REGISTRY[m].square_input]
    decode_cfg = DecodeConfig(
        square_size=spec.method(square[0]).size if square else None,
        square_normalize=spec.preprocess_params(square[0])["normalize"] if square else "clip",
        maskclip=spec.preprocess("maskclip") if "maskclip" in methods else None,
        need_masks=spec.requires_masks,
        max_pixels=spec.resources.max_pixels,
        storage_options=dict(spec.input.storage_options),
        options_schemes=option_schemes(spec),
        allowed_schemes=tuple(spec.input.allowed_schemes),
        retries=spec.resources.retries,
        annotation_frame=spec.input.annotation_frame,
    )
    first_pool = spec.method(methods[0]).resources
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
    vocab = None
    if vocabulary is not None:
        v = spec.vocabulary
        vocab = Vocabulary(names=tuple(vocabulary), background=tuple(v.background), threshold=v.threshold)
    out = spec.output
    for index, name in enumerate(methods):
        entry = REGISTRY[name]
        later = {c for other in methods[index + 1 :] for c in REGISTRY[other].inputs}
        settings = spec.method(name)
        pool = settings.resources
        config = ActorConfig(
            method=name,
            model=spec.model,
            settings=settings,
            templates=spec.templates(name) if entry.encodes_text else None,
            vocabulary=vocab,
            options=OutputOptions(
                heatmap_encoding=out.heatmap_encoding,
                heatmap_size=out.heatmap_size,
                write_expl_maps=out.write_expl_maps,
                prompt_source=prompt_sources.get(name),
                label_confidence=out.label_confidence,
            ),
            drop_columns=tuple(c for c in entry.inputs if c not in later),
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
            **({"memory": int(pool.memory)} if pool.memory else {}),
            batch_format="numpy",
            max_restarts=-1,
            max_task_retries=-1,
        )
    return ds
