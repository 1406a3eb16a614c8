"""What ``clipmaps run --dry-run`` checks beyond the spec and the manifest, without running a model or Ray.

The spec itself (fields, bounds against the model's configuration, backbone families) is checked by
:func:`clipmaps.pipeline.spec.load_spec`, and the manifest, the vocabulary and the prompt sources by
:func:`clipmaps.pipeline.plan.make_plan`; here: that the weights can be read (and match their digest when one is
given) and what the output holds (complete shards, shards to do, whether the run would be refused and why). The
manifest is never read whole: ``make_plan(spec, dry_run=True)`` takes row counts from Parquet footers and from a
sample of each text file (``clipmaps.pipeline.manifests.sample_count``).
Every failure is a :class:`~clipmaps.schemas.errors.ConfigError` naming the field (CLI exit code 2).
"""

from __future__ import annotations

import hashlib
import json
import logging

from clipmaps.actors.registry import bundled_weights
from clipmaps.schemas.errors import ConfigError, OutputConflict
from clipmaps.schemas.storage import filesystem, redact_text, redact_uri

from . import resume
from .plan import Plan
from .spec import JobSpec

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20


def check_sources(spec: JobSpec, *, verify: bool = True) -> list[str]:
    """Check that the model's weights can be had; returns notes for the plan.

    Args:
        spec: the job.
        verify: also read the weights whole to check their digest (``weights_sha256`` or a ``<uri>.sha256`` file)
            and a safetensors file's header; without it only that they exist (what every run checks before Ray
            starts, so a missing file is exit 2, not a failed run).

    Raises:
        ConfigError: ``model.weights`` is missing, unreadable, not a valid safetensors file, or does not match its
            digest; ``model.pretrained`` is a tag neither clipmaps nor open_clip knows for ``model.name``."""
    m = spec.model
    if m.weights is not None:
        return [_check_weights(m.weights, m.weights_sha256, dict(m.storage_options), verify=verify)]
    if not verify:
        return []
    if m.pretrained is not None:
        path = bundled_weights(m.name, m.pretrained)
        if path is not None:
            return [f"weights   {m.name}/{m.pretrained}: shipped with clipmaps ({path.stat().st_size} bytes)"]
        import open_clip  # only here: open_clip's pretrained registry needs its package (and torch)

        tags = open_clip.list_pretrained_tags_by_model(m.name)
        if m.pretrained not in tags:
            known = ", ".join(tags) or "none"
            raise ConfigError(
                f"model.pretrained: {m.pretrained!r} is not a pretrained tag of {m.name} (open_clip knows: {known})"
            )
        return [f"weights   {m.name}/{m.pretrained}: downloaded by open_clip on each node (needs hub access)"]
    return [f"weights   random (seed {m.seed}): the maps are noise"]


def _check_weights(uri: str, sha256: str | None, storage_options: dict, *, verify: bool) -> str:
    shown = redact_uri(uri)
    path_part = uri.split("?", 1)[0]
    try:
        fs, path = filesystem(uri, storage_options)
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ConfigError(f"model.weights: {shown} is a folder, not a weights file")
        size = int(info.get("size") or 0)
        if not verify:
            return f"weights   {shown}: {size} bytes"
        if sha256 is None and "?" not in uri:  # the cache verifies a <uri>.sha256 file when there is one
            sidecar = fs.cat_file(path + ".sha256").split() if fs.exists(path + ".sha256") else []
            sha256 = sidecar[0].decode().lower() if sidecar else None
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            head = f.read(_CHUNK)
            digest.update(head)
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"model.weights: {shown} not found") from None
    except Exception as e:  # noqa: BLE001 - any client error means the actors could not read it either
        text = redact_text(f"{type(e).__name__}: {e}", storage_options=storage_options, uris=[uri])
        raise ConfigError(f"model.weights: cannot read {shown}: {text}") from None
    if path_part.endswith(".safetensors") and (problem := _safetensors_problem(head, size)) is not None:
        raise ConfigError(f"model.weights: {shown} is not a valid safetensors file ({problem})")
    if sha256 is None:
        return f"weights   {shown}: {size} bytes (no digest given)"
    if digest.hexdigest() != sha256.lower():
        raise ConfigError(f"model.weights_sha256: {shown} has sha256 {digest.hexdigest()}, expected {sha256.lower()}")
    return f"weights   {shown}: {size} bytes, sha256 matches"


def _safetensors_problem(head: bytes, size: int) -> str | None:
    """Why the first bytes of a file are not a safetensors header (8-byte little-endian length, then JSON)."""
    if len(head) < 8:
        return f"{size} bytes: too short for a header"
    length = int.from_bytes(head[:8], "little")
    if 8 + length > size:
        return f"its header claims {length} bytes, the file has {size}"
    try:
        header = json.loads(head[8 : 8 + length]) if 8 + length <= len(head) else {}
    except ValueError:
        return "its header is not JSON"
    return None if isinstance(header, dict) else "its header is not a JSON object"


def output_report(plan: Plan) -> list[str]:
    """What the output URI holds and what a run would do there; nothing is changed, no Ray task runs.

    Shards are assigned against the output's markers as a run would (``clipmaps.pipeline.resume.assign``), except
    that complete shards whose manifest file changed are only counted (a run computes their digests again).

    Raises:
        OutputConflict: the run would be refused (naming each changed field, or a complete shard whose file is gone
            or shorter), unless ``output.overwrite``.
    """
    spec = plan.spec
    fs, root = filesystem(spec.output.uri, dict(spec.output.storage_options))
    if fs.isfile(root):
        raise OutputConflict(f"output.uri: {redact_uri(spec.output.uri)} is a file; the output is a folder")
    state = resume.read_state(fs, root) if fs.exists(root) else resume.OutputState(job=None)
    if spec.output.overwrite and (state.job is not None or state.complete):
        shards = len(plan.shards)
        return [f"output    holds {len(state.complete)} complete shards; --overwrite replaces them: {shards} to do"]
    resume.check_resumable(state, plan, spec.output.uri)  # raises OutputConflict naming what differs
    changed = _changed_files(plan, state)
    todo = resume.assign(plan, state, spec.output.uri, verify=False)
    shards = len(plan.shards)
    todo_rows = sum(s.rows for s in todo)
    about = "about " if plan.estimated else ""
    lines = []
    if changed:
        lines.append(
            f"output    {changed} complete shards come from manifest files changed since: a run checks their rows "
            "(and refuses if they changed)"
        )
    if not state.complete:
        return [*lines, f"output    empty: {shards} shards ({about}{todo_rows} images) to do"]
    return [
        *lines,
        f"output    {len(state.complete)} of {shards} shards complete (resumed); {len(todo)} ({about}{todo_rows} "
        "images) to do",
    ]


def _changed_files(plan: Plan, state: resume.OutputState) -> int:
    """Complete shards whose manifest file's identity differs from its marker's."""
    identity = {f.rel: f.identity for f in plan.files}
    return sum(
        1 for m in state.complete.values() if identity.get(m.get("file"), m.get("identity")) != m.get("identity")
    )


__all__ = ["OutputConflict", "check_sources", "output_report"]
