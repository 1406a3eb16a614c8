"""Resume and exactly-once outputs: the state of a job's output URI.

Each manifest file is cut into shards of ``output.shard_rows`` rows (``clipmaps.pipeline.shards``: a shard is a
file, a first row and a row count, with an integer id). Sink tasks stage their batches' rows under ``_staging/``;
when the driver has seen every row of a shard written, one Ray task concatenates them into one file per dataset,
``<dataset>/part-<shard>-<token>.parquet``, written atomically (see :mod:`clipmaps.pipeline.sinks`), then the driver
writes the shard's completion marker ``_shards/<shard>.json`` with the shard's counts, the list of its files, its
manifest file, first row, row count, the file's identity and the content digest of its rows. A re-run of the same
job on the same output:

1. refuses if ``_job.json``'s result fingerprint differs from this job's (naming each method, field and the two
   values), or if a complete shard's rows changed (its file changed and the digest computed again differs, or the
   file is gone or shorter; naming the shards, files and rows), unless ``output.overwrite`` (the CLI's
   ``--overwrite``) clears the output; see :mod:`clipmaps.pipeline.fingerprint`. Rows appended to a file, and new
   files, are new shards: append mode;
2. keeps the shards that have a marker and deletes everything else a job writes: result files of shards without a
   marker (work of the interrupted attempt), temporary files, and files of a complete shard that its marker does
   not list — and runs the same cleanup once more at its end, against files written late by tasks of a killed
   attempt; so no (image, method, prompt/region) is ever there twice;
3. processes only the shards without a marker, and appends an entry to ``_job.json``'s ``attempts`` (an attempt
   still marked ``running`` that a re-run finds is marked ``lost``: its driver died without recording an end).

Markers and ``_job.json`` are written atomically too, so a driver killed while writing one leaves the old state.

Why not Ray Data's ``CheckpointConfig``: it is beta, checkpoints the *read* side by row id and assumes one output
dataset per pipeline, while a clipmaps job writes five datasets from one sink stage; markers per manifest shard give
the same guarantee with plain files on any fsspec store and are easy to inspect.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field

from clipmaps.schemas.errors import OutputConflict
from clipmaps.schemas.storage import TMP_PREFIX, read_bytes, redact_uri, remove, write_bytes

from .fingerprint import differences
from .sinks import FILES, STAGING, shard_of_file

logger = logging.getLogger(__name__)

RESULT_DATASETS = ("labels", "heatmaps", "regions", "errors")
MARKERS = "_shards"
JOB_JSON = "_job.json"
#: ``clipmaps.pipeline.write.write_outputs``' markers (one per written batch) and every output's dataset card.
WRITTEN = "_written"
CARD = "README.md"


@dataclass
class OutputState:
    """What an output URI already holds."""

    job: dict | None
    complete: dict[int, dict] = field(default_factory=dict)  # shard → its marker (counts, files, digest)

    @property
    def attempts(self) -> list[dict]:
        return list((self.job or {}).get("attempts", []))


def read_state(fs, root: str) -> OutputState:
    """Read ``_job.json`` and the shard markers under ``root`` (never from a stale listing cache: s3fs caches
    listings per filesystem instance, and fsspec reuses instances within a process)."""
    fs.invalidate_cache()
    job_path = posixpath.join(root, JOB_JSON)
    job = None
    if fs.exists(job_path):
        try:
            job = json.loads(read_bytes(fs, job_path))
        except ValueError as e:  # written atomically, so only a foreign or hand-edited file gets here
            raise OutputConflict(f"{job_path} is not valid JSON ({e}); use a new output.uri or --overwrite") from None
    complete = {}
    marker_dir = posixpath.join(root, MARKERS)
    if fs.exists(marker_dir):
        for path in fs.ls(marker_dir, detail=False):
            name = posixpath.basename(path)
            if name.endswith(".json") and name[:-5].isdigit():
                try:
                    complete[int(name[:-5])] = json.loads(read_bytes(fs, path))
                except ValueError:  # not a marker we wrote (they are atomic): the shard is redone
                    logger.warning("ignoring unreadable shard marker %s; the shard will be recomputed", path)
    return OutputState(job=job, complete=complete)


def conflicts(state: OutputState, plan) -> list[str]:
    """Why this plan must not add to the output, one line per reason; empty when it may (an output with no complete
    shard, or the same fingerprint and unchanged rows in every complete shard)."""
    if state.job is None:
        return [f"it holds shard markers but no {JOB_JSON} (not a clipmaps output, or a damaged one)"] * bool(
            state.complete
        )
    if not state.complete:  # nothing finished to mix with: the run replaces what an unfinished attempt left
        return []
    return differences(state.job.get("fingerprint"), plan.fingerprint)


def assign(plan, state: OutputState, uri: str, *, verify: bool = True) -> list:
    """Assign ``plan.shards`` against the output's complete shards (``clipmaps.pipeline.shards.assign_shards``) and
    return the shards to do. With ``verify``, the complete shards whose manifest file changed (size, ETag or mtime)
    have their digest computed again by Ray tasks and compared with their marker's.

    Raises:
        OutputConflict: complete shards whose rows changed (or whose file is gone or shorter), naming each shard, its
            file and rows, and what to do.
    """
    from .shards import assign_shards, describe_range, seek_for, shard_digest

    spec = plan.spec
    found = assign_shards(plan.files, plan.rows, state.complete, spec.output.shard_rows)
    conflicts = list(found.conflicts)
    if verify and found.verify:
        import ray

        task = ray.remote(shard_digest).options(num_cpus=0.5, max_retries=spec.resources.task_retries)
        options = dict(spec.input.storage_options)
        refs = []
        for s in found.verify:
            c = plan.counts[s.file]
            seek = seek_for(c, s.start, spec.output.shard_rows)
            refs.append(task.remote(plan.files[s.file], c.header, s, seek, options))
        changed = [s for s, d in zip(found.verify, ray.get(refs)) if d != state.complete[s.id].get("digest")]
        if changed:
            shown = ", ".join(
                f"{s.id} ({describe_range(plan.files[s.file].rel, s.start, s.rows)})" for s in changed[:5]
            )
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            conflicts.append(
                f"the manifest rows of complete shard(s) {shown}{more} changed "
                "(ids, URIs, masks, prompts or inline image bytes)"
            )
        logger.info("checked %d complete shards of changed manifest files", len(found.verify))
    if conflicts:
        more = f"\n  and {len(conflicts) - 10} more complete shards" if len(conflicts) > 10 else ""
        raise OutputConflict(
            f"{redact_uri(uri)} holds complete shards that no longer match the manifest:\n"
            + "\n".join(f"  {line}" for line in conflicts[:10])
            + more
            + "\nrestore those rows (appending rows or files is fine), choose a new output.uri, or replace the output"
            " with --overwrite (output.overwrite: true)"
        )
    plan.shards = found.shards
    return sorted(found.todo, key=lambda s: s.id)


def check_resumable(state: OutputState, plan, uri: str) -> None:
    """Refuse to add to an output what :func:`conflicts` names.

    Raises:
        OutputConflict: with every reason, and what to do (a new ``output.uri``, or ``--overwrite``)."""
    lines = conflicts(state, plan)
    if lines:
        raise OutputConflict(
            f"{redact_uri(uri)} holds results this job must not be mixed with:\n"
            + "\n".join(f"  {line}" for line in lines)
            + "\nchoose a new output.uri, or replace them with --overwrite (output.overwrite: true)"
        )


def clear_output(fs, root: str) -> None:
    """Remove everything a job (``clipmaps run`` or ``write_outputs``) writes under ``root``."""
    for name in (*RESULT_DATASETS, "vocabulary", MARKERS, WRITTEN, STAGING, JOB_JSON, CARD):
        path = posixpath.join(root, name)
        remove(fs, path, recursive=True)  # literal: an output folder may be named like a glob pattern


def remove_incomplete(fs, root: str, complete: dict[int, dict]) -> int:
    """Delete what is not a finished result: files of shards without a completion marker, temporary files, and files
    of a complete shard that its marker does not list (written late by a task of a killed attempt), and every staged
    file (``_staging/``: a finished shard's are removed once its marker is written, so what is left there belongs to
    an unfinished shard or to a late task). Returns how many files were removed."""
    fs.invalidate_cache()
    removed = 0
    staging = posixpath.join(root, STAGING)
    if fs.exists(staging):
        # counted: the staged files (an object store may also list a folder's own marker object)
        removed += sum(1 for path in fs.find(staging) if path.endswith(".parquet"))
        remove(fs, staging, recursive=True)
    for name in (*RESULT_DATASETS, "vocabulary", MARKERS):
        folder = posixpath.join(root, name)
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            base = posixpath.basename(path)
            shard = shard_of_file(base) if name in RESULT_DATASETS else None
            stray = base.startswith(TMP_PREFIX) or (shard is not None and shard not in complete)
            if not stray and shard is not None:
                listed = complete[shard].get(FILES)
                stray = listed is not None and posixpath.join(name, base) not in listed
            if stray:
                remove(fs, path)
                removed += 1
    return removed


def write_marker(fs, root: str, shard: int, counts: dict) -> None:
    """Mark ``shard`` complete (written after all its result files are in place); ``counts`` holds its counts, its
    files and the content digest of its manifest rows."""
    path = posixpath.join(root, MARKERS, f"{shard:07d}.json")
    write_bytes(json.dumps({**counts, "finished_at": time.time()}).encode(), fs, path)


def write_job(fs, root: str, doc: dict) -> None:
    """Write ``_job.json`` atomically (a driver killed while writing it leaves the previous version)."""
    write_bytes(json.dumps(doc, indent=2).encode(), fs, posixpath.join(root, JOB_JSON))
