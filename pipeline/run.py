"""``run(spec)``: the driver side of a job — resolve, plan, execute on Ray, write metadata, summarise.

The driver holds state per manifest file and per shard (``clipmaps.pipeline.shards``), never per row: Ray tasks count,
read and validate the manifest; the driver streams one small row of counts per finished batch, has each complete
shard's staged files concatenated and writes its marker. Images, masks, manifest rows and results never pass through
it.
"""

from __future__ import annotations

import logging
import os
import platform
import posixpath
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from clipmaps.actors.registry import model_info
from clipmaps.schemas import batches as cols
from clipmaps.schemas import storage
from clipmaps.schemas.card import dataset_card
from clipmaps.schemas.datasets import ERRORS, VOCABULARY
from clipmaps.schemas.errors import ConfigError, JobFailed
from clipmaps.schemas.storage import filesystem, redact_uri, write_bytes, write_table

from . import resume
from .dryrun import check_sources, output_report
from .plan import Plan, build_dataset, check_resources, make_plan, sink_retry_exceptions, with_io_defaults_spec
from .progress import ProgressLine
from .raylog import quiet_known_noise
from .sinks import (
    EMPTY_FILE,
    FILES,
    SHARD_DIGEST,
    finalize_shard,
    output_schemas,
    remove_staged,
    write_empty_datasets,
)
from .spec import JobSpec

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run did. ``ok`` is False when the error fraction exceeded ``run.max_error_fraction``.

    ``processed``, ``errors`` and ``counts`` describe the whole output (this attempt and the shards kept from
    earlier ones: what the output holds); ``attempt_images`` and ``attempt_seconds`` this attempt's own work, so
    that a resumed run's rate is not inflated by images it did not process; ``kept_shards`` / ``kept_images`` what
    it found complete and kept."""

    output_uri: str
    total: int
    processed: int
    errors: int
    counts: dict[str, int]
    seconds: float
    ok: bool
    plan_text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    attempt_images: int = 0
    attempt_seconds: float = 0.0
    kept_shards: int = 0
    kept_images: int = 0

    @property
    def error_fraction(self) -> float:
        return self.errors / self.total if self.total else 0.0

    @property
    def images_per_second(self) -> float | None:
        """Images this attempt processed per second of its execution (None when it processed none)."""
        if not self.attempt_images or self.attempt_seconds <= 0:
            return None
        return self.attempt_images / self.attempt_seconds


def run(
    spec: JobSpec,
    *,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_bars: bool | None = None,
) -> RunResult:
    """Run the job described by ``spec``.

    Re-running the same job on the same output resumes it (see :mod:`clipmaps.pipeline.resume`). With ``dry_run``,
    everything that needs no model and no Ray is checked (``clipmaps.pipeline.dryrun``: the manifest, the
    vocabulary, the weights, what the output holds) and the plan is returned; nothing is written.

    ``progress`` receives the plan and the progress lines (:class:`~.progress.ProgressLine`, every
    ``run.progress_interval_s``; default: logged at INFO). ``progress_bars`` shows Ray Data's progress bars (default:
    when stderr is a terminal); outside a terminal (Kubernetes logs) the progress lines are the only progress.

    Raises:
        ConfigError: the job cannot run as configured (spec, manifest, weights, output refusal); never resumable.
        JobFailed: a stage failed for good; what is finished is kept and a re-run resumes.
    """
    started = time.time()
    say = progress or (lambda line: logger.info("%s", line))
    if dry_run:
        plan = make_plan(spec, dry_run=True)
        spec = plan.spec
        plan.notes.extend(check_sources(spec, verify=True))
        plan.notes.extend(output_report(plan))
        text = plan.describe()
        return RunResult(spec.output.uri, plan.total, 0, 0, {}, time.time() - started, True, text)
    # before Ray starts: a missing weights file is exit 2 in a second, not a failed run
    weights_notes = check_sources(with_io_defaults_spec(spec), verify=False)

    import ray

    quiet_known_noise()  # before ray.init: the token-authentication note is logged while it starts
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=ray_address(spec), include_dashboard=False, log_to_driver=False, configure_logging=False)
    restore = configure_ray_data(spec, progress_bars=sys.stderr.isatty() if progress_bars is None else progress_bars)
    try:
        plan = make_plan(spec)  # counts the manifest's rows with Ray tasks
        spec = plan.spec
        plan.notes.extend(weights_notes)
        plan.notes.extend(check_resources(spec, ray.cluster_resources()))
        fs, root = filesystem(spec.output.uri, dict(spec.output.storage_options))
        doc: dict | None = None
        attempt: dict = {}
        try:
            state, todo = prepare_output(plan, fs, root)
            if state.complete:
                plan.notes.append(f"resuming: {len(state.complete)} of {len(plan.shard_sizes)} shards already complete")
            text = plan.describe()
            say(text)
            attempt = {
                "started_at": _now(),
                "status": "running",
                "resumed_shards": len(state.complete),
                "todo_images": sum(s.rows for s in todo),
                "pid": os.getpid(),
            }
            doc = {
                "spec": spec.to_dict(redact=True),
                "fingerprint": plan.fingerprint,
                "status": "running",
                "attempts": [*_previous_attempts(state), attempt],
            }
            resume.write_job(fs, root, {**doc, "versions": versions()})
            write_skeleton(plan, fs, root)
        except OSError as e:  # the output cannot be written (a path under a file, permission, a bucket gone…)
            raise _output_failed(e, plan, fs, root, doc, attempt) from e
        t0 = time.time()
        complete = dict(state.complete)
        if todo:
            try:
                complete.update(execute(plan, todo, fs, root, say, done=complete))
            except BaseException as e:
                failure = _failed(e, plan, fs, root, doc, attempt, complete, t0)
                if failure is e:
                    raise
                raise failure from e
            strays = resume.remove_incomplete(fs, root, complete)
            if strays:  # written after this run's start by a task of an earlier, killed attempt
                logger.warning("removed %d result files not written by this run", strays)
                attempt["removed_strays"] = strays
        execute_s = time.time() - t0
        counts = {name: sum(int(c.get(name, 0)) for c in complete.values()) for name in cols.STATS}
        kept_images = sum(int(c.get("rows", 0)) for c in state.complete.values())
        attempt_images = counts["rows"] - kept_images
        attempt.update(
            status="finished",
            finished_at=_now(),
            processed_images=attempt_images,
            execute_s=round(execute_s, 3),
        )
        failed_images = _failed_images(fs, root) if counts["errors"] else 0
        result = RunResult(
            spec.output.uri,
            plan.total,
            counts["rows"],
            failed_images,
            counts,
            time.time() - started,
            ok=True,
            plan_text=text,
            timings={"execute_s": execute_s},
            attempt_images=attempt_images,
            attempt_seconds=execute_s,
            kept_shards=len(state.complete),
            kept_images=kept_images,
        )
        result.ok = result.error_fraction <= spec.run.max_error_fraction
        doc.update(
            status="finished",
            ok=result.ok,
            versions=versions(),
            counts=_job_counts(result),
            timings={"total_s": round(result.seconds, 3), "execute_s": round(execute_s, 3)},
        )
        resume.write_job(fs, root, doc)
        return result
    finally:
        restore()
        if own_ray:
            ray.shutdown()


def execute(
    plan: Plan, todo: list, fs, root: str, say: Callable[[str], None], done: dict[int, dict] | None = None
) -> dict[int, dict]:
    """Run the pipeline on the shards ``todo``; as soon as all rows of a shard are written (as staged files), have a
    Ray task make its one file per dataset (:func:`~.sinks.finalize_shard`), then write the shard's marker, remove
    its staged files and add it to ``done`` (so a caller sees the shards finished before a failure)."""
    remaining = {s.id: s.rows for s in todo}
    return _stream(plan, build_dataset(plan, todo), remaining, fs, root, say, done)


def _stream(
    plan: Plan, ds, remaining: dict[int, int], fs, root: str, say: Callable[[str], None], done: dict[int, dict] | None
) -> dict[int, dict]:
    """Consume the sink's counts of ``ds``; finalise and mark each shard of ``remaining`` (shard → rows expected)
    once all its rows are counted. The digest a marker records is the shard's ``digest`` in the counts when the
    reader passes one, else ``plan.shard_digests``."""
    import ray

    spec = plan.spec
    finalize = ray.remote(finalize_shard).options(
        num_cpus=0,  # I/O bound, and never starved behind the pools that hold every CPU
        max_retries=spec.resources.task_retries,
        retry_exceptions=sink_retry_exceptions(),
    )
    per_shard: dict[int, dict] = {}
    pending: dict = {}  # object ref of a finalising task → (shard, its counts)
    done = {} if done is None else done
    total = sum(remaining.values())
    line = ProgressLine(
        total,
        say if spec.run.progress else (lambda _: None),
        interval_s=spec.run.progress_interval_s,
        done_before=sum(int(c.get("rows", 0)) for c in done.values()),
    )

    def collect(block: bool) -> None:
        if not pending:
            return
        refs = list(pending)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        for ref in ready:
            shard, c = pending.pop(ref)
            c[FILES] = ray.get(ref)
            resume.write_marker(fs, root, shard, c)
            done[shard] = c
            remove_staged(fs, root, shard)

    for batch in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
        for j, shard in enumerate(batch[cols.SHARD]):
            shard = int(shard)
            c = per_shard.setdefault(shard, {**dict.fromkeys(cols.STATS, 0), FILES: []})
            for name in cols.STATS:
                c[name] += int(batch[name][j])
            c[FILES].extend(f for f in str(batch[FILES][j]).split("\n") if f)
            if SHARD_DIGEST in batch and cols.present(batch[SHARD_DIGEST][j]):
                c["digest"] = str(batch[SHARD_DIGEST][j])
            line.update(int(batch["rows"][j]), int(batch["errors"][j]))
            if c["rows"] == remaining.get(shard):
                staged = sorted(set(c.pop(FILES)))
                c.setdefault("digest", plan.shard_digests.get(shard))
                c.update(plan.shard_info(shard))
                pending[finalize.remote(spec.output.uri, dict(spec.output.storage_options), shard, staged)] = (
                    shard,
                    per_shard.pop(shard),
                )
        collect(block=False)
    collect(block=True)
    line.finish()
    unfinished = sorted(set(remaining) - set(done))
    if unfinished:  # never report success with rows missing (or counted twice): the re-run redoes these shards
        counted = {s: per_shard.get(s, {}).get("rows", 0) for s in unfinished[:5]}
        raise RuntimeError(
            f"{len(unfinished)} shard(s) were not written exactly once (rows counted per shard, expected "
            f"{ {s: remaining[s] for s in unfinished[:5]} }: {counted})"
        )
    return done


def prepare_output(plan: Plan, fs, root: str) -> tuple[resume.OutputState, list]:
    """Check the output against this job, clear or clean it, assign the shards against its markers (checking the
    complete shards whose manifest file changed), find duplicate ids (Ray tasks), and return the output's state
    and the shards still to do.

    Raises:
        OutputConflict: another job's results, or complete shards whose rows changed (naming them)."""
    from .dupes import find_duplicates

    spec = plan.spec
    state = resume.read_state(fs, root)
    replaced = state.job is not None and not state.complete and state.job.get("fingerprint") != plan.fingerprint
    if (spec.output.overwrite and (state.job is not None or state.complete)) or replaced:
        # --overwrite, or an attempt of another job that finished no shard: nothing of it is kept (its vocabulary
        # and empty dataset files included)
        resume.clear_output(fs, root)
        state = resume.OutputState(job=None)
    resume.check_resumable(state, plan, spec.output.uri)
    todo = resume.assign(plan, state, spec.output.uri)
    plan.duplicates, stats = find_duplicates(
        plan.files,
        plan.counts,
        list(plan.shards.values()),
        spec.output.shard_rows,
        dict(spec.input.storage_options),
        retries=spec.resources.task_retries,
    )
    plan.notes.append(
        f"ids       {stats['rows']} checked for duplicates in {stats['seconds']:.1f} s ({stats['maps']} map, "
        f"{stats['buckets']} reduce tasks): {stats['duplicates']} repeated"
    )
    removed = resume.remove_incomplete(fs, root, state.complete)
    if removed:
        logger.info("removed %d result files of unfinished shards", removed)
    fs.makedirs(root, exist_ok=True)
    return state, todo


def ray_address(spec: JobSpec) -> str | None:
    """The address for ``ray.init``: ``run.ray_address``; else ``RAY_ADDRESS`` (KubeRay sets it); else ``"local"``
    — a new in-process instance. (``ray.init()`` with no address would join whatever Ray cluster was last started
    on this host, e.g. another user's.)"""
    if spec.run.ray_address:
        return spec.run.ray_address
    return None if os.environ.get("RAY_ADDRESS") else "local"


def configure_ray_data(spec: JobSpec, *, progress_bars: bool = False) -> Callable[[], None]:
    """The driver's Ray Data settings for this job: progress bars on or off, Ray Data's per-stage logs quiet, and the
    no-progress timeout. Returns a function that puts the settings back (the context is per process, and a process
    may run several jobs)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_no_progress_timeout_s, ctx.enable_progress_bars)
    # bars where a person watches a terminal; elsewhere they are carriage-return noise in a log, and the timer line
    # (pipeline/progress.py) is the progress
    ctx.enable_progress_bars = progress_bars
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False
    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if spec.run.stall_timeout_s is not None:
        ctx.execution_no_progress_timeout_s = float(spec.run.stall_timeout_s)

    def restore() -> None:
        ctx.execution_no_progress_timeout_s, ctx.enable_progress_bars = before

    return restore


def write_skeleton(plan: Plan, fs, root: str) -> None:
    """What an output holds from the start of every attempt, whatever its methods write and however it ends: the
    vocabulary, every dataset's folder with a 0-row file of its schema (readers — pandas, DuckDB, Polars,
    ``datasets`` — fail on a missing folder but read a 0-row file), ``errors/part-manifest.parquet`` and the
    dataset card. Used by :func:`run` and :func:`clipmaps.pipeline.write.write_outputs`.

    Raises:
        OSError: the output cannot be written."""
    write_vocabulary(plan, fs, root)
    write_empty_datasets(fs, root, model_info(plan.spec.model.name).embed_dim)
    write_card(plan, fs, root)
    path = posixpath.join(root, "errors", "part-manifest.parquet")
    if not fs.exists(path):
        write_table(ERRORS.empty_table(), fs, path)


def write_card(plan: Plan, fs, root: str) -> None:
    """The output's dataset card, ``README.md`` (:mod:`clipmaps.schemas.card`): ``datasets.load_dataset(OUTPUT,
    NAME)`` loads each dataset. Written at every attempt (a resumed job's card is the same).

    Raises:
        OSError: the output cannot be written."""
    spec = plan.spec
    schemas = {**output_schemas(model_info(spec.model.name).embed_dim), "errors": ERRORS, "vocabulary": VOCABULARY}
    body = (
        f"clipmaps output of {', '.join(plan.outputs)} with {spec.model.name} ({redact_uri(spec.model.weights_id)}). "
        "`_job.json` holds the job spec (secrets removed), counts and versions."
    )
    card = dataset_card(schemas, heatmap_encoding=spec.output.heatmap_encoding, title="clipmaps output", body=body)
    write_bytes(card.encode("utf-8"), fs, posixpath.join(root, "README.md"))


def vocabulary_rows(plan: Plan, method: str) -> list[dict]:
    """The ``vocabulary/`` rows of ``method``'s vocabulary: one per label value of its label maps.

    Label 0 (background) is one row, whatever the number of background names: every background prompt's winning
    pixels get label 0 (``BackgroundRule``), so a row per name would give label 0 several names. Its ``name`` is
    the first background name (``"background"`` when the spec gives none: then label 0 comes from the threshold
    alone, or never appears), and ``background_names`` lists every background prompt in the spec's order. Class
    ``c`` of the vocabulary is label ``c + 1``; its ``background_names`` is null. Empty when ``method`` uses no
    vocabulary."""
    vid = plan.vocabulary_id(method)
    if plan.vocabulary is None or vid is None:
        return []
    templates = plan.spec.templates(method)
    templates = [templates] if isinstance(templates, str) else list(templates)
    background = list(plan.spec.vocabulary.background)
    row = {"vocabulary_id": vid, "templates": templates}
    rows = [
        {
            **row,
            "class_index": 0,
            "name": background[0] if background else "background",
            "is_background": True,
            "background_names": background,
        }
    ]
    rows += [
        {**row, "class_index": i + 1, "name": n, "is_background": False, "background_names": None}
        for i, n in enumerate(plan.vocabulary)
    ]
    return rows


def write_vocabulary(plan: Plan, fs, root: str) -> None:
    """One ``vocabulary/`` file per vocabulary id in use (methods with different templates have different ids), of
    :func:`vocabulary_rows`; a job whose methods use no vocabulary writes :data:`~.sinks.EMPTY_FILE` instead, so
    the dataset exists with its schema.

    Raises:
        OSError: the output cannot be written."""
    written = False
    for method in plan.methods:
        rows = vocabulary_rows(plan, method)
        if not rows:
            continue
        path = posixpath.join(root, "vocabulary", f"{rows[0]['vocabulary_id']}.parquet")
        if not fs.exists(path):  # a resumed job's vocabulary is the same (the fingerprint holds its id)
            write_table(pa.Table.from_pylist(rows, schema=VOCABULARY), fs, path)
        written = True
    empty = posixpath.join(root, "vocabulary", EMPTY_FILE)
    if not written and not fs.exists(empty):
        write_table(VOCABULARY.empty_table(), fs, empty)


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in ("clipmaps", "torch", "open_clip_torch", "ray", "pyarrow", "numpy", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _output_failed(error: OSError, plan: Plan, fs, root: str, doc: dict | None, attempt: dict) -> JobFailed:
    """The error to raise when the output could not be prepared (before any work): a :class:`JobFailed` naming the
    root cause (type, errno, path; redacted). When ``_job.json`` was already written, the attempt is recorded
    there as failed too."""
    if doc is not None:
        failure = _failed(error, plan, fs, root, doc, attempt, {}, time.time())
        if isinstance(failure, JobFailed):
            return failure
    reason = _error_text(error, plan.spec)
    return JobFailed(
        f"cannot write the output {storage.redact_uri(plan.spec.output.uri)}: {reason}. Nothing was run; re-run "
        "the same command once the output can be written"
    )


def _failed(
    error: BaseException, plan: Plan, fs, root: str, doc: dict, attempt: dict, complete: dict, t0: float
) -> BaseException:
    """Record a stopped run in ``_job.json`` (status ``failed`` or ``interrupted``) and return the error to raise.

    The reason (:func:`_error_text`) is the root cause, e.g. the worker's ``OSError`` with its errno and path, not
    Ray's wrapper. When ``_job.json`` cannot be written either (the output is gone or read-only), the returned
    error still names the cause, and says that it could not be recorded."""
    interrupted = isinstance(error, KeyboardInterrupt)
    reason = _error_text(error, plan.spec)
    attempt.update(
        status="interrupted" if interrupted else "failed",
        finished_at=_now(),
        execute_s=round(time.time() - t0, 3),
        error=reason,
        complete_shards=len(complete),
    )
    doc.update(status="interrupted" if interrupted else "failed", versions=versions())
    unrecorded = ""
    try:
        resume.write_job(fs, root, doc)
    except Exception as e:  # noqa: BLE001 - the original error matters more: it is still raised, with its cause
        # this error alone: its context is the failure being recorded, which the message names already
        why = storage.redact_text(_describe_error(e), storage_options=_options(plan.spec), uris=_uris(plan.spec))
        unrecorded = f" (not recorded in {resume.JOB_JSON}: {why})"
        logger.warning("could not record the failure in %s: %s", resume.JOB_JSON, why)
    if interrupted or not isinstance(error, Exception):
        return error
    config = _config_error(error)
    if config is not None:  # re-running cannot fix a configuration error: say what to change instead
        message = storage.redact_text(config.message, storage_options=_options(plan.spec), uris=_uris(plan.spec))
        return ConfigError(f"{message} ({len(complete)} of {len(plan.shard_sizes)} shards complete and kept)")
    total = len(plan.shard_sizes)
    return JobFailed(
        f"the job stopped: {reason}. {len(complete)} of {total} shards are complete and kept; re-run the same "
        f"command to resume (only unfinished shards are redone){unrecorded}"
    )


_CONFIG_ERROR_LINE = re.compile(r"(?:clipmaps\.schemas\.errors\.)?(ConfigError|SpecError|ManifestError): (.+)")


def _config_error(error: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` behind ``error`` (raised in a worker, e.g. by an actor whose weights do not fit the
    architecture), following causes and Ray's ``RayTaskError.cause``; None if there is none. An actor that dies in
    its constructor reaches the driver as an ``ActorDiedError`` that keeps only the text of the worker's exception,
    so its last ``ConfigError: …`` line is read back from that text."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return e
        found = _CONFIG_ERROR_LINE.findall(_ANSI.sub("", str(e)))
        if found:
            return ConfigError(found[-1][1].strip(), stage="model")
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the worker's exception here
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def _error_text(error: BaseException, spec: JobSpec) -> str:
    """One line naming the error and its causes (for errors raised in a Ray worker, the worker's exception, not
    its traceback), without secrets."""
    causes, seen = [], set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen and len(causes) < 4:
        seen.add(id(e))
        line = _describe_error(e)
        if line and not any(line in c for c in causes):
            causes.append(line)
        e = e.__cause__ or e.__context__
    # redacted before cutting: a secret cut in two would no longer match
    return storage.redact_text(" <- ".join(causes), storage_options=_options(spec), uris=_uris(spec))[:1500]


def _uris(spec: JobSpec) -> tuple:
    return (*spec.input.uris, spec.output.uri, spec.model.weights, spec.vocabulary.file if spec.vocabulary else None)


def _options(spec: JobSpec) -> tuple:
    return (spec.input.storage_options, spec.output.storage_options, spec.model.storage_options)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^\s*((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)):(?: |$)", re.M)
# Python's separators between the exceptions of a chain in a printed traceback (Ray copies the worker's into the
# driver's exception text: the worker's exception objects themselves do not travel with their causes)
_CHAIN_SEPARATOR = re.compile(
    r"^\s*(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)\s*$",
    re.M,
)
_RAY_TASK = re.compile(r"ray::([\w.()\-]+?)\(\)")
# Ray's wrappers around a worker's exception: they say that a task failed, never why
_RAY_WRAPPER = re.compile(r"^(?:ray\.exceptions\.\w+|\w*RayTaskError\w*|RaySystemError|UserCodeException)$")


def _describe_error(e: BaseException) -> str:
    """``Type: message`` of ``e``, or of the root cause its text carries.

    A message that carries a traceback (a ``RayTaskError`` from a worker, which keeps the worker's exception chain
    only as text) is cut into the chain's exceptions; the first one that is not one of Ray's wrappers (``UDF failed
    to process a data block``, ``RayTaskError``) is the root cause, e.g. ``FileExistsError: [Errno 17] File exists:
    '…/labels'``, named with the Ray task that raised it. Without such a cause, the last exception line and what
    follows it (its own, possibly multi-line, message)."""
    text = _ANSI.sub("", str(e))
    name = type(e).__name__
    if "Traceback (most recent call last)" in text or '  File "' in text or _CHAIN_SEPARATOR.search(text):
        found = []  # (exception type, "Type: message", the Ray task it was raised in)
        for block in _CHAIN_SEPARATOR.split(text):
            lines = list(_EXCEPTION_LINE.finditer(block))
            if lines:
                task = _RAY_TASK.search(block)
                found.append((lines[-1].group(1), block[lines[-1].start() :], task.group(1) if task else None))
        roots = [f for f in found if not _RAY_WRAPPER.match(f[0])]
        if roots:
            _, line, task = roots[0]
            line = " ".join(line.split())[:700]
            return f"{line} (in Ray task {task})" if task else line
        if found:
            text = found[-1][1]
    text = " ".join(text.split())
    if not text:
        return ""
    return f"{name}: {text[:700]}"


def _previous_attempts(state: resume.OutputState) -> list[dict]:
    """The earlier attempts from ``_job.json``; one still marked running ended without recording it (its driver was
    killed or lost): it is marked ``lost``, with the shards complete when this run found the output."""
    attempts = state.attempts
    if attempts and attempts[-1].get("status", "running") == "running" and "finished_at" not in attempts[-1]:
        attempts[-1] = {**attempts[-1], "status": "lost", "complete_shards": len(state.complete)}
    return attempts


def _job_counts(result: RunResult) -> dict:
    return {
        "images": result.total,
        "processed": result.processed,
        "failed_images": result.errors,
        **{f"rows_{k}": v for k, v in result.counts.items() if k not in ("rows", "prompts_collapsed")},
        # not output rows: prompts no row was written for, as the same text as an earlier prompt of their image
        "prompts_collapsed": result.counts.get("prompts_collapsed", 0),
    }


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
