"""Resume and exactly-once outputs: the state of a job's output URI.

The validated manifest is cut into shards of ``output.shard_rows`` rows, in manifest order. Result files are named
``part-<shard>-<hash of their image ids>.parquet`` and are written atomically (see :mod:`clipmaps.pipeline.sinks`).
When the driver has seen every row of a shard written, it writes the shard's completion marker
``_shards/<shard>.json`` with the shard's counts and the list of its files. A re-run of the same job on the same
output:

1. refuses if ``_job.json``'s result fingerprint differs from this job's (naming each method, field and the two
   values), or if a complete shard's rows changed (its marker's content digest differs; naming the shards), unless
   ``output.overwrite`` (the CLI's ``--overwrite``) clears the output; see :mod:`clipmaps.pipeline.fingerprint`;
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
from .sinks import FILES, shard_of_file

logger = logging.getLogger(__name__)

RESULT_DATASETS = ("labels", "heatmaps", "regions", "errors")
MARKERS = "_shards"
JOB_JSON = "_job.json"


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
    lines = differences(state.job.get("fingerprint"), plan.fingerprint)
    if lines:
        return lines
    n = plan.spec.output.shard_rows
    changed = [s for s, marker in sorted(state.complete.items()) if plan.shard_digests.get(s) != marker.get("digest")]
    if changed:
        shown = ", ".join(f"{s} (manifest rows {s * n}-{s * n + n - 1})" for s in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        lines.append(f"the manifest rows of complete shard(s) {shown}{more} changed (ids, URIs, masks or prompts)")
    return lines


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
    """Remove everything a job writes under ``root``."""
    for name in (*RESULT_DATASETS, "vocabulary", MARKERS, JOB_JSON):
        path = posixpath.join(root, name)
        remove(fs, path, recursive=True)  # literal: an output folder may be named like a glob pattern


def remove_incomplete(fs, root: str, complete: dict[int, dict]) -> int:
    """Delete what is not a finished result: files of shards without a completion marker, temporary files, and files
    of a complete shard that its marker does not list (written late by a task of a killed attempt). Returns how
    many files were removed."""
    fs.invalidate_cache()
    removed = 0
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
