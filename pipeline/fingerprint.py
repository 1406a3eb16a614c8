"""The result fingerprint: every setting that can change which rows a job writes or what they hold.

A job's fingerprint (``_job.json`` key ``fingerprint``) is plain JSON data::

    {"version": 2,
     "model": {"name", "weights", "weights_sha256", "precision"},
     "methods": {"gem": {<every settings field but resources>, "templates", "preprocess", "vocabulary_id",
                         "threshold", "prompt_source", "heatmap_encoding", "heatmap_size", …}, …},
     "shard_rows": 64}

and the manifest is fingerprinted by content, per shard (ids, URIs, masks, masks_uri, prompts and the frame the masks
declare, :data:`DIGEST_COLUMNS`), in each shard's completion marker: the worker that reads a shard computes it
(``clipmaps.pipeline.manifests.read_rows``; :func:`shard_digests` is the same over a table). A re-run compares both: a
changed setting is refused naming the method, the field and the two values (:func:`differences`); a complete shard
whose rows changed is refused naming the shard. Shards that are new (rows added after the last complete shard) are
simply processed, which is what append mode builds on. Each method's ``params_hash`` (in every output row) is a hash
of its fingerprint with the model's.

Which fields count comes from the method registry: a settings field counts unless it is in
``clipmaps.actors.params.OPERATIONAL_FIELDS`` (pool resources); so a new field is fingerprinted by default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from clipmaps.actors.params import OPERATIONAL_FIELDS
from clipmaps.actors.registry import ORIGINAL_GEM, REGISTRY
from clipmaps.schemas.batches import MASKS_SQUARE

from .spec import JobSpec
from .webdataset import DEFAULT_MASKS, DEFAULT_PROMPTS

VERSION = 2
#: ``input.webdataset``'s defaults: left out of a fingerprint, so that a job keeping them (every job before the section
#: existed) has the fingerprint and ``params_hash`` it had.
WEBDATASET_DEFAULTS = {"prompts": DEFAULT_PROMPTS, "masks": DEFAULT_MASKS}
#: Manifest columns a shard's digest covers.
DIGEST_COLUMNS = ("image_id", "image_uri", "masks", "prompts", "width", "height", "masks_uri")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _hash(value: Any, n: int = 16) -> str:
    return hashlib.sha256(_canonical(value).encode("utf-8")).hexdigest()[:n]


def model_fingerprint(spec: JobSpec) -> dict[str, Any]:
    """The model part: architecture, weights (tag, redacted URI or seed) and their digest, precision."""
    m = spec.model
    return {"name": m.name, "weights": m.weights_id, "weights_sha256": m.weights_sha256, "precision": m.precision}


def method_fingerprint(
    spec: JobSpec, method: str, *, manifest_has_prompts: bool, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Everything that decides ``method``'s rows, as plain data. A method that reads region masks
    (``schemas.batches.MASKS_SQUARE`` in its registry ``inputs``) also carries ``annotation_frame``
    (``input.annotation_frame``): which frame the masks are read in decides which pixels each region covers. A
    method that reads the input's prompts or masks carries ``input.webdataset``'s ``prompts``/``masks`` under
    ``{"input": {"webdataset": …}}`` when they differ from the defaults (:data:`WEBDATASET_DEFAULTS`, left out so
    that jobs keeping them hash as before the section existed).

    Args:
        spec: the job.
        method: a method enabled in ``spec`` (a registry key with settings).
        manifest_has_prompts: whether the manifest has a ``prompts`` column (resolves ``prompts: auto``).
        class_names: the names of a ``vocabulary.file`` read at plan time.
    """
    e = REGISTRY[method]
    settings = spec.method(method)
    out: dict[str, Any] = settings.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS))
    out["implementation"] = e.version  # a change of the method's code that moves results
    out["preprocess"] = e.preprocess(settings, spec.model.info)
    source = None
    if settings.heatmaps:
        source = spec.prompt_source(method, manifest_has_prompts=manifest_has_prompts)
        out["prompt_source"] = source
    output = spec.output.model_dump(mode="json")
    out.update({name: output[name] for name in e.output_fields(settings)})
    if MASKS_SQUARE in e.inputs:  # which frame masks are read in decides which pixels a region covers
        out["annotation_frame"] = spec.input.annotation_frame
    section = spec.input.webdataset
    if section is not None:  # where tar samples' prompts and masks come from: only what differs from the default
        changed = {
            k: getattr(section, k)
            for k in _webdataset_read(method, source)
            if getattr(section, k) != WEBDATASET_DEFAULTS[k]
        }
        if changed:
            out["input"] = {"webdataset": changed}
    if e.encodes_text:
        templates = spec.templates(method)
        out["templates"] = templates if isinstance(templates, str) else list(templates)
        if spec.vocabulary is not None and (settings.labels or source in ("vocabulary", "auto")):
            v = spec.vocabulary
            # the names themselves (not only their id), so that a refusal can say which changed
            out["vocabulary"] = {"names": list(v.class_names(class_names)), "background": list(v.background)}
            out["vocabulary_id"] = spec.vocabulary_id(method, class_names)
            out["threshold"] = v.threshold if settings.labels else None
    return out


def _webdataset_read(method: str, prompt_source: str | None) -> tuple[str, ...]:
    """The ``input.webdataset`` settings ``method``'s rows depend on: ``prompts`` when its heatmaps read the input's
    prompts (prompt source ``manifest`` or ``auto``), ``masks`` when it reads region masks."""
    e = REGISTRY.get(method)
    return (("prompts",) if prompt_source in ("manifest", "auto") else ()) + (
        ("masks",) if e is not None and MASKS_SQUARE in e.inputs else ()
    )


def job_fingerprint(
    spec: JobSpec, *, manifest_has_prompts: bool, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """The fingerprint written to ``_job.json`` (see the module docstring)."""
    return {
        "version": VERSION,
        "model": model_fingerprint(spec),
        "methods": {
            m: method_fingerprint(spec, m, manifest_has_prompts=manifest_has_prompts, class_names=class_names)
            for m in spec.enabled_methods()
        },
        "shard_rows": spec.output.shard_rows,
    }


def params_hashes(fingerprint: dict[str, Any]) -> dict[str, str]:
    """Output name → ``params_hash`` (16 hex digits) for every output of a job fingerprint (GEM's baseline shares
    GEM's settings, and is told apart by its ``method`` column)."""
    out = {}
    for m, fp in fingerprint["methods"].items():
        h = _hash({"method": m, "model": fingerprint["model"], **fp})
        for name in REGISTRY[m].outputs(_Flags(fp)):
            out[name] = h
    return out


def params_hash(
    spec: JobSpec, method: str, *, manifest_has_prompts: bool = False, class_names: Sequence[str] | None = None
) -> str:
    """The ``params_hash`` that ``method``'s rows carry (16 hex digits), for one job."""
    fingerprint = job_fingerprint(spec, manifest_has_prompts=manifest_has_prompts, class_names=class_names)
    return params_hashes(fingerprint)[method]


class _Flags:
    """Attribute view of a method fingerprint, for :meth:`MethodEntry.outputs`."""

    def __init__(self, fp: dict[str, Any]):
        self.original = bool(fp.get("original"))


def differences(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Lines naming each field that differs, ``methods.gem.original: false → true``, in a stable order; a method
    added or removed is one line. Empty when the two fingerprints match."""
    if not previous or previous.get("version") != current.get("version"):
        return ["the output was written by another clipmaps version (its result fingerprint has another format)"]
    lines: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(f"{path}.{k}" if path else k, a.get(k), b.get(k))
        elif a != b:
            lines.append(f"{path}: {_show(a)} → {_show(b)}")

    for m in sorted(set(previous["methods"]) | set(current["methods"])):
        a, b = previous["methods"].get(m), current["methods"].get(m)
        if a is None or b is None:
            lines.append(f"methods.{m}: {'added' if a is None else 'removed'} (the output holds "
                         f"{', '.join(sorted(previous['methods']))})")  # fmt: skip
        else:
            walk(f"methods.{m}", _with_defaults(m, a), _with_defaults(m, b))
    walk("model", previous.get("model"), current.get("model"))
    walk("output.shard_rows", previous.get("shard_rows"), current.get("shard_rows"))
    return lines


def _with_defaults(method: str, fp: dict[str, Any]) -> dict[str, Any]:
    """``fp`` with the ``input.webdataset`` defaults it leaves out filled in (for the settings ``method`` reads), so
    that a refusal shows both values: ``methods.legrad.input.webdataset.prompts: "json:prompts" → "caption"``."""
    read = _webdataset_read(method, fp.get("prompt_source"))
    if not read:
        return fp
    given = (fp.get("input") or {}).get("webdataset") or {}
    return {
        **fp,
        "input": {**(fp.get("input") or {}), "webdataset": {**{k: WEBDATASET_DEFAULTS[k] for k in read}, **given}},
    }


def _show(v: Any) -> str:
    if isinstance(v, list) and len(v) > 6:  # long lists (class names): their size and ends
        return f"{len(v)} items [{_canonical(v[0])}, {_canonical(v[1])}, …, {_canonical(v[-1])}]"
    text = _canonical(v) if v is not None else "unset"
    return text if len(text) <= 80 else text[:77] + "..."


def shard_digests(table: pa.Table, shard_rows: int) -> dict[int, str]:
    """Shard index → 32 hex digits of a sha256 over the canonical JSON of each row's :data:`DIGEST_COLUMNS` (id,
    URI, masks, prompts, declared width and height, masks_uri), in manifest order. Shard ``k`` holds rows
    ``[k · shard_rows, (k + 1) · shard_rows)``: the digests a run's readers compute for a one-file manifest whose rows
    all parse."""
    names = [c for c in DIGEST_COLUMNS if c in table.column_names]
    out: dict[int, str] = {}
    for start in range(0, table.num_rows, shard_rows):
        digest = hashlib.sha256()
        for row in table.slice(start, shard_rows).select(names).to_pylist():
            digest.update(_canonical([row.get(c) for c in DIGEST_COLUMNS]).encode("utf-8"))
            digest.update(b"\n")
        out[start // shard_rows] = digest.hexdigest()[:32]
    return out


__all__ = [
    "DIGEST_COLUMNS",
    "ORIGINAL_GEM",
    "differences",
    "job_fingerprint",
    "method_fingerprint",
    "model_fingerprint",
    "params_hash",
    "params_hashes",
    "shard_digests",
]
