"""Resume and exactly-once outputs: the state of a job's output URI.

The validated manifest is cut into shards of ``output.shard_rows`` rows, in manifest order. Result files are named
``part-<shard>-<hash of their image ids>.parquet`` and are written atomically (see :mod:`clipmaps.pipeline.sinks`).
When the driver has seen every row of a shard written, it writes the shard's completion marker
``_shards/<shard>.json`` with the shard's counts and the list of its files. A re-run of the same job on the same
output:

1. refuses if ``_job.json`` says the results were made with other parameters (unless ``output.overwrite``, the
   CLI's ``--overwrite``);
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

from clipmaps.schemas.storage import TMP_PREFIX, write_bytes

from .sinks import FILES, shard_of_file

logger = logging.getLogger(__name__)

RESULT_DATASETS = ("labels", "heatmaps", "regions", "errors")
MARKERS = "_shards"
JOB_JSON = "_job.json"


@dataclass
class OutputState:
    """What an output URI already holds."""

    job: dict | None
    complete: dict[int, dict] = field(default_factory=dict)  # shard → its marker (counts)

    @property
    def attempts(self) -> list[dict]:
        return list((self.job or {}).get("attempts", []))


def fingerprint(spec, plan) -> dict:
    """What must match for results in an output to be resumable by this job."""
    return {
        "params": {m: spec.method_params_hash(m) for m in plan.methods},
        "shard_rows": spec.output.shard_rows,
        "images": plan.manifest.num_rows,
        "manifest": plan.manifest_digest,
        "heatmap_encoding": spec.output.heatmap_encoding,
        "heatmap_size": list(spec.output.heatmap_size) if spec.output.heatmap_size else None,
    }


def read_state(fs, root: str) -> OutputState:
    """Read ``_job.json`` and the shard markers under ``root`` (never from a stale listing cache: s3fs caches
    listings per filesystem instance, and fsspec reuses instances within a process)."""
    fs.invalidate_cache()
    job_path = posixpath.join(root, JOB_JSON)
    job = None
    if fs.exists(job_path):
        try:
            job = json.loads(fs.cat(job_path))
        except ValueError as e:  # written atomically, so only a foreign or hand-edited file gets here
            raise FileExistsError(f"{job_path} is not valid JSON ({e}); use a new output.uri or overwrite") from None
    complete = {}
    marker_dir = posixpath.join(root, MARKERS)
    if fs.exists(marker_dir):
        for path in fs.ls(marker_dir, detail=False):
            name = posixpath.basename(path)
            if name.endswith(".json") and name[:-5].isdigit():
                try:
                    complete[int(name[:-5])] = json.loads(fs.cat(path))
                except ValueError:  # not a marker we wrote (they are atomic): the shard is redone
                    logger.warning("ignoring unreadable shard marker %s; the shard will be recomputed", path)
    return OutputState(job=job, complete=complete)


def check_resumable(state: OutputState, expected: dict, uri: str) -> None:
    """Refuse to add results made with other parameters to an output (``output.overwrite`` clears it instead)."""
    if state.job is None:
        if state.complete:
            raise FileExistsError(
                f"{uri} holds shard markers but no {JOB_JSON}; use a new output.uri, or --overwrite to replace them"
            )
        return
    previous = state.job.get("fingerprint")
    if previous != expected:
        changed = sorted(k for k in set(previous or {}) | set(expected) if (previous or {}).get(k) != expected.get(k))
        raise FileExistsError(
            f"{uri} holds results of a job with other settings ({', '.join(changed) or 'unknown'} differ); "
            "choose a new output.uri, or replace them with --overwrite (output.overwrite: true)"
        )


def clear_output(fs, root: str) -> None:
    """Remove everything a job writes under ``root``."""
    for name in (*RESULT_DATASETS, "vocabulary", MARKERS, JOB_JSON):
        path = posixpath.join(root, name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


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
                fs.rm(path)
                removed += 1
    return removed


def write_marker(fs, root: str, shard: int, counts: dict) -> None:
    """Mark ``shard`` complete (written after all its result files are in place)."""
    path = posixpath.join(root, MARKERS, f"{shard:07d}.json")
    write_bytes(json.dumps({**counts, "finished_at": time.time()}).encode(), fs, path)


def write_job(fs, root: str, doc: dict) -> None:
    """Write ``_job.json`` atomically (a driver killed while writing it leaves the previous version)."""
    write_bytes(json.dumps(doc, indent=2).encode(), fs, posixpath.join(root, JOB_JSON))
