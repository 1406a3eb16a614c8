"""The job spec: one YAML document, validated into frozen, typed dataclasses.

The same spec drives ``clipmaps run JOB.yaml [--set key.path=value …]``, the Python API and the Kubernetes job::

    input:                       # InputSpec
      manifest: s3://bucket/manifest.parquet
      storage_options: {client_kwargs: {endpoint_url: http://minio:9000}}
    output: {uri: s3://bucket/out}                       # OutputSpec
    model: {name: ViT-B-16, pretrained: openai}          # ModelSpec
    vocabulary: {preset: coco80, background: [background]}   # VocabularySpec (optional)
    methods:                     # MethodsSpec: one entry per method to run
      maskclip: {}
      gem: {depth: 7, resources: {num_gpus: 1, max_actors: 4}}
    resources: {decode_cpus: 1}  # ResourcesSpec
    run: {max_error_fraction: 0.01}                      # RunSpec

:func:`load_spec` reads YAML (``yaml.safe_load``) or a dict, applies ``--set`` overrides and validates; every
problem is a :class:`SpecError` whose message starts with the full path of the bad field, e.g.
``methods.gem.depth: expected int, got str 'five'`` or ``methods.gem: unknown key 'dept' (did you mean 'depth'?)``.
The dataclasses validate themselves too, so specs built in Python get the same checks (paths then start at the
object being built).

Relative local paths are resolved against the working directory of the process that runs the job.

Imports only the standard library and PyYAML (the driver loads it; no torch, no Ray).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .vocabularies import PRESETS, check_names, template_error
from .vocabularies import vocabulary_id as _vocabulary_id

__all__ = [
    "METHODS",
    "GEMSpec",
    "InputSpec",
    "JobSpec",
    "LeGradSpec",
    "MaskCLIPSpec",
    "MaskInversionSpec",
    "MethodsSpec",
    "ModelSpec",
    "OutputSpec",
    "PoolSpec",
    "ResourcesSpec",
    "RunSpec",
    "SpecError",
    "VocabularySpec",
    "apply_overrides",
    "load_spec",
    "redact_uri",
    "uri_scheme",
]

#: Method names in pipeline order.
METHODS: tuple[str, ...] = ("maskclip", "gem", "legrad", "maskinversion")
#: Methods that need a ViT image tower (MaskCLIP also runs on ResNets).
VIT_METHODS: tuple[str, ...] = ("gem", "legrad", "maskinversion")
#: Methods that write per-prompt heatmaps and take ``prompts``.
HEATMAP_METHODS: tuple[str, ...] = ("gem", "legrad")
#: Methods that resize to a ``size × size`` square (MaskCLIP keeps the aspect ratio: short side ``size``).
SQUARE_METHODS: tuple[str, ...] = ("gem", "legrad", "maskinversion")
_DISPLAY = {"maskclip": "MaskCLIP", "gem": "GEM", "legrad": "LeGrad", "maskinversion": "MaskInversion"}
#: The template set a method falls back to when its ``templates`` is null and there is no vocabulary.
_FALLBACK_TEMPLATES = {"gem": "photo", "legrad": "raw", "maskclip": "ensemble85"}

_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"key|secret|token|password|passwd|credential|signature|sig", re.IGNORECASE)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEME_NAME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # PyYAML reads 1e-3 as a string
REDACTED = "***"


# --------------------------------------------------------------------------------------------------- errors


class SpecError(ValueError):
    """A job spec problem. ``str(e)`` is ``"<field path>: <reason>"``.

    Attributes:
        path: the bad field, as a tuple of keys (list items as ``"[i]"``); empty for the whole spec.
        reason: what is wrong with it.
    """

    def __init__(self, path: str | Sequence[str], reason: str):
        self.path: tuple[str, ...] = tuple(p for p in path.split(".") if p) if isinstance(path, str) else tuple(path)
        self.reason = reason
        super().__init__(str(self))

    @property
    def field(self) -> str:
        """The dotted path of the bad field, e.g. ``methods.gem.depth`` or ``vocabulary.names[2]``."""
        return _format_path(self.path)

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.path else self.reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)

    def within(self, *prefix: str) -> SpecError:
        """The same error with ``prefix`` prepended to its path."""
        return type(self)((*prefix, *self.path), self.reason)


class _TypeMismatch(SpecError):
    """A value of the wrong type at exactly this path (lets unions try their next member)."""


def _format_path(path: Sequence[str]) -> str:
    out = ""
    for p in path:
        out += p if p.startswith("[") or not out else "." + p
    return out


def _suggest(word: object, options: Sequence[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------------- typing


def _got(value: object) -> str:
    if value is None:
        return "null"
    name = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )
    text = repr(redact_uri(value) if isinstance(value, str) else value)
    return f"{name} {text if len(text) <= 60 else text[:57] + '...'}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        args = sorted(typing.get_args(tp), key=lambda a: a is type(None))
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(o) for o in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_describe(args[0])}"
        return f"list of {len(args)} {_describe(args[0])}"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return {str: "str", int: "int", float: "number", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _mismatch(tp: Any, value: object, path: tuple[str, ...]) -> _TypeMismatch:
    wanted = _describe(tp)
    hint = ""
    if isinstance(value, (bool, int, float)) and "str" in wanted.split(" "):
        hint = " (quote it in YAML to make it a string)"
    return _TypeMismatch(path, f"expected {wanted}, got {_got(value)}{hint}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _coerce(tp: Any, value: Any, path: tuple[str, ...]) -> Any:
    """``value`` checked against the annotation ``tp`` and normalised (lists → tuples, ints → floats where a
    float is wanted, mappings → spec dataclasses). Raises :class:`SpecError` naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _mismatch(tp, value, path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except _TypeMismatch as e:
                if e.path != path:  # a wrong type deeper inside a member that matched
                    raise
        raise _mismatch(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(tp, value, path)
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, str) and value in options:
            return value
        raise _TypeMismatch(
            path, f"expected one of {', '.join(map(repr, options))}, got {_got(value)}{_suggest(value, options)}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _from_mapping(tp, value, path)
        raise _mismatch(tp, value, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, path)
        if len(args) == 2 and args[1] is Ellipsis:
            elem = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise _TypeMismatch(path, f"expected {_describe(tp)}, got a list of {len(value)}")
            elem = list(args)
        return tuple(_coerce(t, v, (*path, f"[{i}]")) for i, (t, v) in enumerate(zip(elem, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, path)
        for k in value:
            if not isinstance(k, str):
                raise SpecError(path, f"keys must be strings, got {_got(k)}")
        return copy.deepcopy(dict(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(tp, value, path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(tp, value, path)
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SpecError(path, f"expected a finite number, got {value!r}")
            return float(value)
        raise _mismatch(tp, value, path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(tp, value, path)
    raise TypeError(f"unsupported annotation {tp!r} at {_format_path(path)}")  # a bug in this module


def _from_mapping(cls: type, data: Mapping, path: tuple[str, ...]) -> Any:
    """Build the spec dataclass ``cls`` from a mapping: unknown and missing keys are errors naming ``path``."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str):
            raise SpecError(path, f"keys must be strings, got {_got(key)}")
        if key not in fields:
            hint = _suggest(key, list(fields)) or f" (expected one of: {', '.join(fields)})"
            raise SpecError(path, f"unknown key {key!r}{hint}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError((*path, name), "required but missing")
    check = getattr(cls, "_check_mapping", None)
    if check is not None:
        check(data, path)
    try:
        return cls(**data)
    except SpecError as e:
        raise e.within(*path) from None


class _Spec:
    """Mixin: coerces every field to its annotation, then runs ``_validate`` (relative field paths)."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce(hints[f.name], value, (f.name,)))
        self._validate()

    def _validate(self) -> None:
        pass


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and getattr(obj, "_omit_none", False):
                continue
            out[f.name] = _plain(value)
        return out
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return copy.deepcopy(obj)


def _need(ok: bool, path: str | Sequence[str], reason: str) -> None:
    if not ok:
        raise SpecError(path, reason)


def _templates_check(templates: str | tuple[str, ...] | None, path: str) -> None:
    if templates is None:
        return
    problem = template_error(templates)
    if problem is not None:
        index, reason = problem
        raise SpecError((path,) if index is None else (path, f"[{index}]"), reason)


# --------------------------------------------------------------------------------------------------- URIs


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of a URI; bare local paths (and Windows drive paths) count as ``"file"``."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else "file"


def redact_uri(uri: str) -> str:
    """``uri`` with credentials hidden: ``scheme://user:secret@host/…`` → ``scheme://***@host/…``, and the values
    of query parameters named like a secret (key, token, signature…) → ``***``. Other strings are unchanged."""
    m = _SCHEME.match(uri)
    if not m:
        return uri
    head, rest = uri[: m.end()], uri[m.end() :]
    if "@" in rest:
        before = rest[: rest.index("@")]
        if ":" in before or "/" not in before:  # userinfo (a secret may contain '/', '+', '@')
            rest = REDACTED + rest[rest.rindex("@") :]
    if "?" in rest:
        base, _, query = rest.partition("?")
        parts = []
        for item in query.split("&"):
            k, eq, v = item.partition("=")
            parts.append(f"{k}={REDACTED}" if eq and _SECRET_QUERY.search(k) else item)
        rest = base + "?" + "&".join(parts)
    return head + rest


def _redact(value: Any, *, secret_keys: bool = False) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if secret_keys and isinstance(k, str) and _SECRET_KEY.search(k):
                out[k] = REDACTED
            else:
                out[k] = _redact(v, secret_keys=secret_keys or k == "storage_options")
        return out
    if isinstance(value, (list, tuple)):
        return [_redact(v, secret_keys=secret_keys) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value


def _location(uri: str) -> tuple[str, tuple[str, ...]]:
    """(scheme, path components) of a URI or local path, for containment checks (no I/O)."""
    scheme = uri_scheme(uri)
    if scheme == "file":
        path = uri[len("file://") :] if uri.lower().startswith("file://") else uri
        path = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
        return "file", tuple(p for p in Path(path).parts)
    rest = uri[_SCHEME.match(uri).end() :].split("?", 1)[0]
    rest = redact_uri("x://" + rest)[len("x://") :]
    if rest.startswith(REDACTED + "@"):
        rest = rest[len(REDACTED) + 1 :]
    scheme = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(scheme, scheme)
    return scheme, tuple(p for p in rest.split("/") if p)


def _inside(inner: str, outer: str) -> bool:
    (s1, p1), (s2, p2) = _location(inner), _location(outer)
    return s1 == s2 and p1[: len(p2)] == p2


# --------------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class InputSpec(_Spec):
    """Where the images come from.

    Attributes:
        manifest: path or URI of the manifest (Parquet file or folder, JSON lines, CSV): one row per image with
            ``image_id``, ``image_uri`` and optional ``masks`` and ``prompts`` (``clipmaps.schemas.datasets``).
        format: ``"auto"`` (from the extension: ``.jsonl``/``.ndjson`` → jsonl, ``.csv`` → csv, ``.parquet``,
            ``.pq``, a folder or no extension → parquet; ``.gz``/``.bz2``/``.xz``/``.zst`` are looked through),
            or ``"parquet"``, ``"jsonl"``, ``"csv"``.
        allowed_schemes: schemes that image and mask URIs in the manifest may use (bare paths count as
            ``"file"``); a row with another scheme becomes an error row.
        storage_options: fsspec options for reading the manifest, images and masks (s3: ``key``, ``secret``,
            ``token``, ``client_kwargs: {endpoint_url: …}``…). Redacted in :meth:`JobSpec.to_dict`.
        limit: process only the first ``limit`` rows of the manifest.
    """

    manifest: str
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    allowed_schemes: tuple[str, ...] = ("file", "s3")
    storage_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None

    def _validate(self) -> None:
        _need(bool(self.manifest.strip()), "manifest", "must not be empty")
        _need(len(self.allowed_schemes) > 0, "allowed_schemes", "must name at least one scheme")
        for i, s in enumerate(self.allowed_schemes):
            _need(
                bool(_SCHEME_NAME.match(s)),
                ("allowed_schemes", f"[{i}]"),
                f"{s!r} is not a lower-case URI scheme such as 'file', 's3' or 'gs'",
            )
        _need(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        if self.format == "auto" and self._format_from_name() is None:
            raise SpecError(
                "format",
                f"cannot tell the format of {redact_uri(self.manifest)!r} from its name; "
                "set input.format to parquet, jsonl or csv",
            )

    def _format_from_name(self) -> str | None:
        name = self.manifest.split("?", 1)[0].rstrip("/").lower()
        if self.manifest.split("?", 1)[0].endswith("/"):
            return "parquet"
        base = name.rsplit("/", 1)[-1]
        for suffix in (".gz", ".bz2", ".xz", ".zst"):
            base = base.removesuffix(suffix)
        if "." not in base:
            return "parquet"
        ext = base.rsplit(".", 1)[-1]
        return {"parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv"}.get(ext)

    @property
    def manifest_format(self) -> str:
        """``"parquet"``, ``"jsonl"`` or ``"csv"`` (``format``, or what ``auto`` resolves to)."""
        return self.format if self.format != "auto" else typing.cast(str, self._format_from_name())

    def scheme_allowed(self, uri: str) -> bool:
        """Whether an image/mask URI from the manifest may be read (its scheme is in ``allowed_schemes``)."""
        return uri_scheme(uri) in self.allowed_schemes


@dataclass(frozen=True, kw_only=True)
class OutputSpec(_Spec):
    """Where and how results are written.

    Attributes:
        uri: folder or URI of the output datasets (``labels/``, ``heatmaps/``, ``regions/``, ``errors/``,
            ``vocabulary/``, ``_job.json``).
        storage_options: fsspec options for writing. Redacted in :meth:`JobSpec.to_dict`.
        heatmap_encoding: ``"png8"`` (8-bit PNG of ``round(255·v)``) or ``"float16"`` (raw little-endian).
        heatmap_size: ``null`` = each image's original size; ``[h, w]`` = this fixed size for every heatmap.
        write_expl_maps: also write MaskInversion's final explainability map per region.
        overwrite: delete what is at ``uri`` first (otherwise a re-run resumes).
        shard_rows: manifest rows per shard, the unit of resume: a shard's outputs are marked complete once all its
            rows are written, and a re-run of the same job skips complete shards and redoes the others.
    """

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    heatmap_encoding: Literal["png8", "float16"] = "png8"
    heatmap_size: tuple[int, int] | None = None
    write_expl_maps: bool = False
    overwrite: bool = False
    shard_rows: int = 64

    def _validate(self) -> None:
        _need(bool(self.uri.strip()), "uri", "must not be empty")
        if self.heatmap_size is not None:
            for i, v in enumerate(self.heatmap_size):
                _need(v >= 1, ("heatmap_size", f"[{i}]"), f"must be >= 1, got {v}")
        _need(self.shard_rows >= 1, "shard_rows", f"must be >= 1, got {self.shard_rows}")


@functools.lru_cache(maxsize=64)
def _config_patch_size(name: str) -> int | None:
    """Patch size of one of clipmaps' own architectures (``actors/model_configs/<name>.json``), read as JSON."""
    try:
        from importlib.resources import files

        text = (files("clipmaps.actors") / "model_configs" / f"{name}.json").read_text()
        patch = json.loads(text)["vision_cfg"].get("patch_size")
        return int(patch) if patch else None
    except (ImportError, OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True, kw_only=True)
class ModelSpec(_Spec):
    """The CLIP model and its weights: exactly one of ``pretrained``, ``weights`` and ``seed``.

    Attributes:
        name: open_clip architecture (``clipmaps models`` lists them), e.g. ``ViT-B-16``, ``RN50``.
        pretrained: pretrained tag: clipmaps' own shipped weights (``synth-shapes-v1`` for ``clipmaps-synth-vit``,
            read from the package) or an open_clip tag (``openai``…), downloaded by open_clip (needs hub access).
        weights: path or URI of a state dict (safetensors, or a plain ``torch.save`` state dict). URIs are downloaded
            once per node (``$CLIPMAPS_CACHE``) and verified against ``weights_sha256`` or a ``<uri>.sha256`` file.
        weights_sha256: expected sha256 (64 hex digits) of the ``weights`` file; a mismatch fails the actor.
        seed: seeded random initialisation (demos and tests: the maps are noise).
        storage_options: fsspec options for reading ``weights``. Redacted in :meth:`JobSpec.to_dict`.
        precision: ``"fp32"``, or ``"bf16"`` (autocast on the GPU; every pool must then reserve a GPU).
        device: ``"auto"`` (CUDA where the actor has a GPU, else CPU), ``"cpu"`` or ``"cuda"``.
    """

    name: str = "ViT-B-16"
    pretrained: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def _validate(self) -> None:
        _need(bool(self.name.strip()), "name", "must not be empty")
        given = [k for k in ("pretrained", "weights", "seed") if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none given" if not given else " and ".join(given) + " given"
            raise SpecError(
                (),
                f"give exactly one of pretrained (an open_clip tag), weights (a path or URI) "
                f"or seed (random init); {what}",
            )
        _need(self.pretrained is None or bool(self.pretrained.strip()), "pretrained", "must not be empty")
        _need(self.weights is None or bool(self.weights.strip()), "weights", "must not be empty")
        if self.weights_sha256 is not None:
            _need(self.weights is not None, "weights_sha256", "is only used with weights (a path or URI)")
            _need(
                bool(re.fullmatch(r"[0-9a-fA-F]{64}", self.weights_sha256)),
                "weights_sha256",
                f"must be 64 hexadecimal digits (a sha256), got {self.weights_sha256!r}",
            )
        _need(self.seed is None or self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _need(
            not (self.precision == "bf16" and self.device == "cpu"),
            "precision",
            "bf16 is autocast on the GPU; it cannot be used with device: cpu",
        )

    @property
    def is_resnet(self) -> bool:
        """ResNet image tower (``RN50``, ``RN101-quickgelu``, ``clipmaps-tiny-rn``…): only MaskCLIP supports it."""
        return self.name.startswith("RN") or "-rn" in self.name

    @property
    def patch_size(self) -> int | None:
        """The ViT patch size when the name tells it (``ViT-B-16`` → 16, ``ViT-L-14-336`` → 14), else ``None``."""
        if self.is_resnet:
            return None
        m = re.match(r"^(?:ViT|EVA\d*)-[A-Za-z0-9]+-(\d+)(?:-|$)", self.name)
        return int(m.group(1)) if m else _config_patch_size(self.name)

    @property
    def weights_id(self) -> str:
        """Where the weights come from, as recorded in every output row: the pretrained tag, the weights URI
        (credentials redacted) or ``random:seed=N`` (as ``clipmaps.actors.models.load_model`` names it)."""
        if self.pretrained is not None:
            return self.pretrained
        if self.weights is not None:
            return redact_uri(self.weights)
        return f"random:seed={self.seed}"


@dataclass(frozen=True, kw_only=True)
class VocabularySpec(_Spec):
    """The class names for segmentation (and prompts for heatmaps with ``prompts: vocabulary``).

    Exactly one of ``names``, ``preset`` and ``file``. Class ``c`` is label ``c + 1`` in label maps; label 0 is
    background: the ``background`` names are appended to the vocabulary and a pixel whose best class is one of
    them is labelled 0 (``clipmaps.actors.methods.common.BackgroundRule``).

    Attributes:
        names: the class names, inline.
        preset: a built-in list: ``voc20``, ``context59``, ``coco80``, ``cocostuff171``, ``ade150``.
        file: path or URI of a text file, one name per line (read at plan time, with ``input.storage_options``).
        background: background names, rendered as label 0 (e.g. ``[background, ground, sky]``).
        templates: the prompt templates of the class names: a set name (``photo``, ``raw``, ``ensemble85``) or a
            list of templates with one ``{}`` each. Methods whose own ``templates`` is null use these.
        threshold: also label a pixel 0 when its best class's probability ``softmax(100·cos)`` is below this,
            in (0, 1); ``null`` = no threshold.
    """

    names: tuple[str, ...] | None = None
    preset: str | None = None
    file: str | None = None
    background: tuple[str, ...] = ()
    templates: str | tuple[str, ...] = "photo"
    threshold: float | None = None

    def _validate(self) -> None:
        given = [k for k in ("names", "preset", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none given" if not given else " and ".join(given) + " given"
            raise SpecError((), f"give exactly one of names, preset or file; {what}")
        if self.names is not None:
            _names_check(self.names, "names")
        if self.preset is not None and self.preset not in PRESETS:
            raise SpecError(
                "preset",
                f"unknown preset {self.preset!r}{_suggest(self.preset, list(PRESETS))}; presets: {', '.join(PRESETS)}",
            )
        _need(self.file is None or bool(self.file.strip()), "file", "must not be empty")
        if self.background:
            _names_check(self.background, "background")
            if self.file is None:
                _overlap_check(self.class_names(), self.background)
        _templates_check(self.templates, "templates")
        _need(
            self.threshold is None or 0.0 < self.threshold < 1.0,
            "threshold",
            f"must be in (0, 1) or null, got {self.threshold}",
        )

    @property
    def num_background(self) -> int:
        """How many background names are appended (``BackgroundRule.num_background``)."""
        return len(self.background)

    def class_names(self, file_names: Sequence[str] | None = None) -> tuple[str, ...]:
        """The foreground class names in label order (without the background names).

        Args:
            file_names: for a ``file`` vocabulary, the names read from it at plan time
                (``clipmaps.pipeline.vocabularies.parse_vocabulary_file``); they are validated here.
        """
        if self.names is not None:
            return self.names
        if self.preset is not None:
            return PRESETS[self.preset]
        if file_names is None:
            raise SpecError(
                "vocabulary.file",
                "the names of a vocabulary file are read at plan time; pass them as file_names/class_names",
            )
        names = tuple(file_names)
        try:
            _names_check(names, "file")
            _overlap_check(names, self.background)
        except SpecError as e:
            raise SpecError(("vocabulary", *e.path), f"{e.reason} (in {self.file})") from None
        return names

    def all_names(self, file_names: Sequence[str] | None = None) -> tuple[str, ...]:
        """Class names then background names: what the methods encode (the logits' class axis)."""
        return self.class_names(file_names) + self.background

    def vocabulary_id(
        self, file_names: Sequence[str] | None = None, *, templates: str | Sequence[str] | None = None
    ) -> str:
        """Short stable id (16 hex digits) of (class names, background names, templates); ``templates`` overrides
        this vocabulary's own (a method's templates, see :meth:`JobSpec.vocabulary_id`)."""
        return _vocabulary_id(
            self.class_names(file_names), self.background, self.templates if templates is None else templates
        )


def _names_check(names: Sequence[str], path: str) -> None:
    problem = check_names(names)
    if problem is not None:
        index, reason = problem
        raise SpecError((path,) if index is None else (path, f"[{index}]"), reason)


def _overlap_check(names: Sequence[str], background: Sequence[str]) -> None:
    both = set(names) & set(background)
    if both:
        raise SpecError("background", f"{sorted(both)[0]!r} is both a class name and a background name")


@dataclass(frozen=True, kw_only=True)
class PoolSpec(_Spec):
    """The actor pool of one method (``map_batches(..., compute=ActorPoolStrategy(min, max))``).

    Attributes:
        batch_size: images per batch handed to an actor.
        num_gpus: GPUs reserved per actor (0 = CPU actors; a GPU cluster sets 1, or a fraction to share one).
        num_cpus: CPUs reserved per actor. The small default lets all four pools start beside the decode tasks on a
            2-core machine (pools that reserve every CPU starve the read stage and the job hangs); raise it on
            CPU-only clusters where each actor should own whole cores.
        min_actors, max_actors: pool size bounds (autoscaling between them).
        custom_resources: Ray custom resources each actor reserves, e.g. ``{accelerator_node: 1}`` to place the
            pool on nodes started with that resource.
        torch_threads: torch CPU threads per actor; null = Ray's ``OMP_NUM_THREADS`` (``floor(num_cpus)``, at
            least 1). A CPU-only pool that reserves a fraction of a CPU gets one thread by default (measured: the
            pipeline at 0.57x a bare loop on 2 cores), so set it to the cores the actor may really use.
    """

    batch_size: int = 8
    num_gpus: float = 0.0
    num_cpus: float = 0.25
    min_actors: int = 1
    max_actors: int = 1
    custom_resources: dict[str, float] = field(default_factory=dict)
    torch_threads: int | None = None

    def _validate(self) -> None:
        _need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _need(
            self.torch_threads is None or self.torch_threads >= 1,
            "torch_threads",
            f"must be >= 1 or null, got {self.torch_threads}",
        )
        _need(self.num_gpus >= 0, "num_gpus", f"must be >= 0, got {self.num_gpus}")
        _need(
            self.num_gpus <= 1 or self.num_gpus.is_integer(),
            "num_gpus",
            f"a fraction of a GPU must be below 1 (Ray), got {self.num_gpus}",
        )
        _need(self.num_cpus >= 0, "num_cpus", f"must be >= 0, got {self.num_cpus}")
        _need(self.min_actors >= 1, "min_actors", f"must be >= 1, got {self.min_actors}")
        _need(
            self.min_actors <= self.max_actors,
            "min_actors",
            f"{self.min_actors} is more than max_actors ({self.max_actors})",
        )
        for name, amount in self.custom_resources.items():
            _need(
                isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0,
                ("custom_resources", name),
                f"must be a number > 0, got {_got(amount)}",
            )
            _need(name not in ("CPU", "GPU", "memory"), ("custom_resources", name), "use num_cpus / num_gpus instead")


_PROMPTS = Literal["auto", "vocabulary", "manifest"]


def _with_templates(params: dict[str, Any], templates: str | tuple[str, ...] | None) -> dict[str, Any]:
    if templates is not None:
        params["templates"] = templates
    return params


def _output_options(
    output: OutputSpec,
    *,
    labels: bool,
    heatmaps: bool,
    prompts: str = "auto",
    write_expl_maps: bool = False,
    original: bool = False,
) -> dict[str, Any]:
    return {
        "original": original,
        "heatmap_encoding": output.heatmap_encoding,
        "heatmap_size": output.heatmap_size,
        "write_expl_maps": write_expl_maps,
        "labels": labels,
        "heatmaps": heatmaps,
        "prompts": prompts,
    }


@dataclass(frozen=True, kw_only=True)
class GEMSpec(_Spec):
    """GEM (Grounding Everything): label maps over the vocabulary and per-prompt heatmaps.

    Attributes:
        depth, ss_attn_iter, ss_attn_temp: ``GEMParams`` (upstream defaults 7, 1, null).
        templates: prompt templates (set name or list); null = the vocabulary's (``photo`` = GEM's upstream prompt).
        size: square input side in pixels (a multiple of the patch size).
        labels: write label maps (needs a vocabulary).
        heatmaps: write per-prompt heatmaps.
        prompts: heatmap prompts: ``manifest`` (each row's ``prompts``), ``vocabulary`` (every class name) or
            ``auto`` (the manifest's when it has a ``prompts`` column, else the vocabulary).
        original: also write the unmodified model's maps (upstream ``return_ori``), a baseline.
        resources: the actor pool.
    """

    depth: int = 7
    ss_attn_iter: int = 1
    ss_attn_temp: float | None = None
    templates: str | tuple[str, ...] | None = None
    size: int = 448
    labels: bool = True
    heatmaps: bool = True
    prompts: _PROMPTS = "auto"
    original: bool = False
    resources: PoolSpec = field(default_factory=PoolSpec)

    def _validate(self) -> None:
        _need(self.depth >= 2, "depth", f"must be >= 2 (the last depth - 1 blocks are modified), got {self.depth}")
        _need(self.ss_attn_iter >= 0, "ss_attn_iter", f"must be >= 0, got {self.ss_attn_iter}")
        _need(
            self.ss_attn_temp is None or self.ss_attn_temp > 0,
            "ss_attn_temp",
            f"must be > 0 or null, got {self.ss_attn_temp}",
        )
        _templates_check(self.templates, "templates")
        _need(self.size >= 1, "size", f"must be >= 1, got {self.size}")
        _need(self.labels or self.heatmaps, "labels", "labels and heatmaps are both false: GEM has nothing to write")

    def method_params(self, templates: str | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Keyword arguments of ``GEMParams`` (``build_params("gem", …)``). ``templates`` (resolved by
        :meth:`JobSpec.method_params`) wins over this spec's own; when both are null the key is left out, so the
        actor's default applies. Prefer :meth:`JobSpec.method_params`, which falls back to the vocabulary's."""
        params = {"depth": self.depth, "ss_attn_iter": self.ss_attn_iter, "ss_attn_temp": self.ss_attn_temp}
        return _with_templates(params, templates if templates is not None else self.templates)

    def output_options(self, output: OutputSpec) -> dict[str, Any]:
        """Keyword arguments of the actor's ``OutputOptions`` for this method."""
        return _output_options(
            output, labels=self.labels, heatmaps=self.heatmaps, prompts=self.prompts, original=self.original
        )


@dataclass(frozen=True, kw_only=True)
class MaskCLIPSpec(_Spec):
    """MaskCLIP: label maps over the vocabulary (ViT and ResNet models).

    Attributes:
        templates: prompt templates; default the original's 85-template ensemble; null = the vocabulary's.
        ks_thresh, pd_thresh: key smoothing and prompt denoising thresholds in [0, 1] (0 = off).
        size: short side of the input in pixels (aspect ratio kept), long side at most ``max_long_side``.
        normalize: ``imagenet`` (the original's mean/std, an upstream quirk) or ``clip``.
        labels: write label maps (MaskCLIP writes nothing else, so this must stay true).
        resources: the actor pool.
    """

    templates: str | tuple[str, ...] | None = "ensemble85"
    ks_thresh: float = 0.0
    pd_thresh: float = 0.0
    size: int = 512
    max_long_side: int = 2048
    normalize: Literal["imagenet", "clip"] = "imagenet"
    labels: bool = True
    resources: PoolSpec = field(default_factory=PoolSpec)

    def _validate(self) -> None:
        _templates_check(self.templates, "templates")
        _need(0.0 <= self.ks_thresh <= 1.0, "ks_thresh", f"must be in [0, 1], got {self.ks_thresh}")
        _need(0.0 <= self.pd_thresh <= 1.0, "pd_thresh", f"must be in [0, 1], got {self.pd_thresh}")
        _need(self.size >= 1, "size", f"must be >= 1, got {self.size}")
        _need(
            self.max_long_side >= self.size, "max_long_side", f"must be >= size ({self.size}), got {self.max_long_side}"
        )
        _need(self.labels, "labels", "MaskCLIP only writes label maps; remove methods.maskclip instead")

    def method_params(self, templates: str | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Keyword arguments of ``MaskCLIPParams`` (``build_params("maskclip", …)``). ``templates`` (resolved by
        :meth:`JobSpec.method_params`) wins over this spec's own; when both are null the key is left out, so the
        actor's default applies. Prefer :meth:`JobSpec.method_params`, which falls back to the vocabulary's."""
        params = {"ks_thresh": self.ks_thresh, "pd_thresh": self.pd_thresh}
        return _with_templates(params, templates if templates is not None else self.templates)

    def output_options(self, output: OutputSpec) -> dict[str, Any]:
        """Keyword arguments of the actor's ``OutputOptions`` for this method."""
        return _output_options(output, labels=True, heatmaps=False)


@dataclass(frozen=True, kw_only=True)
class LeGradSpec(_Spec):
    """LeGrad: per-prompt explainability heatmaps.

    Attributes:
        layers: how many of the last blocks contribute (``LeGradParams``; upstream ``layer_index=-2`` ⇒ 2).
        templates: prompt templates; default ``raw`` (the prompt as written, as upstream); null = the vocabulary's.
        size: square input side in pixels (a multiple of the patch size).
        prompts: ``manifest``, ``vocabulary`` or ``auto`` (see :class:`GEMSpec`).
        resources: the actor pool.
    """

    layers: int = 2
    templates: str | tuple[str, ...] | None = "raw"
    size: int = 448
    prompts: _PROMPTS = "auto"
    resources: PoolSpec = field(default_factory=PoolSpec)

    @property
    def heatmaps(self) -> bool:
        return True

    def _validate(self) -> None:
        _need(self.layers >= 1, "layers", f"must be >= 1, got {self.layers}")
        _templates_check(self.templates, "templates")
        _need(self.size >= 1, "size", f"must be >= 1, got {self.size}")

    def method_params(self, templates: str | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Keyword arguments of ``LeGradParams`` (``build_params("legrad", …)``). ``templates`` (resolved by
        :meth:`JobSpec.method_params`) wins over this spec's own; when both are null the key is left out, so the
        actor's default applies. Prefer :meth:`JobSpec.method_params`, which falls back to the vocabulary's."""
        return _with_templates({"layers": self.layers}, templates if templates is not None else self.templates)

    def output_options(self, output: OutputSpec) -> dict[str, Any]:
        """Keyword arguments of the actor's ``OutputOptions`` for this method."""
        return _output_options(output, labels=False, heatmaps=True, prompts=self.prompts)


@dataclass(frozen=True, kw_only=True)
class MaskInversionSpec(_Spec):
    """MaskInversion: one embedding per region mask (the manifest needs ``masks``); writes ``regions/``.

    Attributes:
        iterations, lr, alpha, wd, optimizer, layers: ``MaskInversionParams`` (upstream defaults).
        size: square input side in pixels (a multiple of the patch size).
        resources: the actor pool.
    """

    iterations: int = 10
    lr: float = 0.1
    alpha: float = 0.0
    wd: float = 0.0
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    layers: int = 1
    size: int = 448
    resources: PoolSpec = field(default_factory=PoolSpec)

    def _validate(self) -> None:
        _need(self.iterations >= 0, "iterations", f"must be >= 0, got {self.iterations}")
        _need(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _need(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")
        _need(self.wd >= 0, "wd", f"must be >= 0, got {self.wd}")
        _need(self.layers >= 1, "layers", f"must be >= 1, got {self.layers}")
        _need(self.size >= 1, "size", f"must be >= 1, got {self.size}")

    def method_params(self, templates: None = None) -> dict[str, Any]:
        """Keyword arguments of ``MaskInversionParams`` (``build_params("maskinversion", …)``)."""
        return {
            "iterations": self.iterations,
            "lr": self.lr,
            "alpha": self.alpha,
            "wd": self.wd,
            "optimizer": self.optimizer,
            "layers": self.layers,
        }

    def output_options(self, output: OutputSpec) -> dict[str, Any]:
        """Keyword arguments of the actor's ``OutputOptions`` for this method."""
        return _output_options(output, labels=False, heatmaps=False, write_expl_maps=output.write_expl_maps)


@dataclass(frozen=True, kw_only=True)
class MethodsSpec(_Spec):
    """Which methods run (an absent entry does not run; ``{}`` runs one with its defaults). At least one."""

    maskclip: MaskCLIPSpec | None = None
    gem: GEMSpec | None = None
    legrad: LeGradSpec | None = None
    maskinversion: MaskInversionSpec | None = None

    _omit_none: ClassVar[bool] = True

    @staticmethod
    def _check_mapping(data: Mapping, path: tuple[str, ...]) -> None:
        for name, value in data.items():
            if value is None:
                raise SpecError(
                    (*path, name),
                    f"is empty (null): write '{name}: {{}}' to run "
                    f"{_DISPLAY.get(name, name)} with its defaults, or remove the key",
                )

    def _validate(self) -> None:
        _need(
            any(getattr(self, m) is not None for m in METHODS),
            (),
            "at least one method is required: maskclip, gem, legrad or maskinversion",
        )


@dataclass(frozen=True, kw_only=True)
class ResourcesSpec(_Spec):
    """The CPU fetch + decode stage.

    Attributes:
        decode_cpus: CPUs per decode task.
        max_pixels: decompression-bomb limit (Pillow's default); larger images become error rows.
        read_timeout_s: timeout of one object-store request in seconds (botocore ``read_timeout`` and
            ``connect_timeout`` of ``s3://`` storage; null = the client's default).
        retries: retries of a failed image or mask read (after the client's own retries) before the row becomes an
            error row.
        io_retries: attempts of one object-store request before it fails: botocore's ``standard`` retry mode
            (500/503, ``SlowDown``, throttling, connection errors, with back-off) and s3fs's own ``retries``. Merged
            into the ``storage_options`` of every ``s3://`` input, output and weights URI that does not set
            ``config_kwargs.retries`` / ``retries`` itself.
        task_retries: how often Ray re-runs a decode or sink task that failed (worker or node lost, or, for the
            sink, an I/O error): ``max_retries`` (+ ``retry_exceptions`` for the sink). Sink writes are idempotent,
            so a re-run replaces, never duplicates. (A method actor's batch is re-sent until the actor is back; the
            bound there is ``run.stall_timeout_s``.)
    """

    decode_cpus: float = 0.5
    max_pixels: int = 89_478_485
    read_timeout_s: float | None = 60.0
    retries: int = 3
    io_retries: int = 10
    task_retries: int = 4

    def _validate(self) -> None:
        _need(self.decode_cpus > 0, "decode_cpus", f"must be > 0, got {self.decode_cpus}")
        _need(self.max_pixels >= 1, "max_pixels", f"must be >= 1, got {self.max_pixels}")
        _need(
            self.read_timeout_s is None or self.read_timeout_s > 0,
            "read_timeout_s",
            f"must be > 0 or null, got {self.read_timeout_s}",
        )
        _need(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")
        _need(self.io_retries >= 1, "io_retries", f"must be >= 1 (attempts, the first included), got {self.io_retries}")
        _need(self.task_retries >= 0, "task_retries", f"must be >= 0, got {self.task_retries}")


@dataclass(frozen=True, kw_only=True)
class RunSpec(_Spec):
    """How the job runs.

    Attributes:
        ray_address: Ray cluster address (``ray://…`` or ``auto``); null = ``RAY_ADDRESS`` when set (KubeRay sets
            it), else a new local in-process Ray (never a Ray that happens to run on the host already).
        max_error_fraction: the job exits non-zero when more than this fraction of input rows failed.
        progress: show progress bars.
        stall_timeout_s: fail the run when no stage has produced or consumed anything for this long (Ray Data's
            ``execution_no_progress_timeout_s``), e.g. when the nodes a pool needs are gone; null = Ray Data's
            default (30 minutes). A re-run resumes.
    """

    ray_address: str | None = None
    max_error_fraction: float = 0.0
    progress: bool = True
    stall_timeout_s: float | None = None

    def _validate(self) -> None:
        _need(self.ray_address is None or bool(self.ray_address.strip()), "ray_address", "must not be empty")
        _need(
            0.0 <= self.max_error_fraction <= 1.0,
            "max_error_fraction",
            f"must be in [0, 1], got {self.max_error_fraction}",
        )
        _need(
            self.stall_timeout_s is None or self.stall_timeout_s > 0,
            "stall_timeout_s",
            f"must be > 0 or null, got {self.stall_timeout_s}",
        )


# --------------------------------------------------------------------------------------------------- the job


@dataclass(frozen=True, kw_only=True)
class JobSpec(_Spec):
    """One clipmaps job. Build it with :func:`load_spec` (YAML or dict) or directly in Python."""

    input: InputSpec
    output: OutputSpec
    model: ModelSpec
    vocabulary: VocabularySpec | None = None
    methods: MethodsSpec
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    run: RunSpec = field(default_factory=RunSpec)

    # ------------------------------------------------------------------ validation across sections

    def _validate(self) -> None:
        model = self.model
        for m in self.enabled_methods():
            spec = self.method(m)
            if m in VIT_METHODS and model.is_resnet:
                raise SpecError(
                    ("methods", m),
                    f"{_DISPLAY[m]} needs a ViT model; model.name {model.name!r} is a "
                    "ResNet (only MaskCLIP runs on ResNets)",
                )
            patch = model.patch_size
            if m in SQUARE_METHODS and patch and spec.size % patch:
                raise SpecError(
                    ("methods", m, "size"), f"{spec.size} is not a multiple of the patch size {patch} of {model.name}"
                )
            if getattr(spec, "labels", False) and self.vocabulary is None:
                raise SpecError(
                    "vocabulary",
                    f"required by methods.{m}.labels (segmentation needs class names): "
                    "set vocabulary.names, .preset or .file",
                )
            if m in HEATMAP_METHODS and spec.heatmaps and spec.prompts == "vocabulary" and self.vocabulary is None:
                raise SpecError("vocabulary", f"required by methods.{m}.prompts: vocabulary")
            gpus = spec.resources.num_gpus
            pool = f"methods.{m}.resources.num_gpus"
            if model.device == "cuda" and gpus == 0:
                raise SpecError(
                    ("methods", m, "resources", "num_gpus"),
                    "is 0 but model.device is 'cuda': Ray "
                    "hides GPUs from actors that reserve none (set num_gpus > 0, or device: auto)",
                )
            if model.device == "cpu" and gpus > 0:
                raise SpecError(
                    ("model", "device"),
                    f"is 'cpu' but {pool} reserves {gpus:g} GPU(s) (set device: auto, or num_gpus: 0)",
                )
            if model.precision == "bf16" and gpus == 0:
                raise SpecError(
                    ("methods", m, "resources", "num_gpus"), "is 0 but model.precision is bf16, which needs a GPU"
                )
        square = [(m, self.method(m).size) for m in self.enabled_methods() if m in SQUARE_METHODS]
        for m, size in square[1:]:
            first, first_size = square[0]
            _need(
                size == first_size,
                ("methods", m, "size"),
                f"{size} differs from methods.{first}.size ({first_size}): GEM, LeGrad and MaskInversion share one "
                "square input",
            )
        if self.output.write_expl_maps and self.methods.maskinversion is None:
            raise SpecError(
                ("output", "write_expl_maps"),
                "only MaskInversion writes explainability maps, and methods.maskinversion is not set",
            )
        out, manifest = self.output.uri, self.input.manifest
        if _inside(out, manifest):
            raise SpecError(("output", "uri"), f"{redact_uri(out)!r} is the input manifest or inside it")
        if _inside(manifest, out):
            raise SpecError(
                ("output", "uri"),
                f"{redact_uri(out)!r} contains the input manifest "
                f"{redact_uri(manifest)!r}; writing there (or overwrite) could "
                "clobber the input",
            )

    # ------------------------------------------------------------------ what runs

    def enabled_methods(self) -> list[str]:
        """Names of the methods that run, in pipeline order: maskclip, gem, legrad, maskinversion."""
        return [m for m in METHODS if getattr(self.methods, m) is not None]

    def method(self, name: str) -> GEMSpec | MaskCLIPSpec | LeGradSpec | MaskInversionSpec:
        """The spec of an enabled method; ``KeyError`` if it is unknown or not enabled."""
        if name not in METHODS:
            raise KeyError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
        spec = getattr(self.methods, name)
        if spec is None:
            raise KeyError(f"method {name!r} is not enabled in this job")
        return spec

    @property
    def requires_masks(self) -> bool:
        """Whether the manifest rows must carry region masks (MaskInversion runs)."""
        return self.methods.maskinversion is not None

    @property
    def requires_manifest_prompts(self) -> bool:
        """Whether some heatmap method can only take its prompts from the manifest's ``prompts`` column."""
        for m in HEATMAP_METHODS:
            spec = getattr(self.methods, m)
            if spec is None or not spec.heatmaps:
                continue
            if spec.prompts == "manifest" or (spec.prompts == "auto" and self.vocabulary is None):
                return True
        return False

    def prompt_source(self, method: str, *, manifest_has_prompts: bool) -> Literal["vocabulary", "manifest"]:
        """Where ``method``'s heatmap prompts come from, ``auto`` resolved against the manifest's columns.

        Raises :class:`SpecError` when the chosen source is missing."""
        spec = self.method(method)
        _need(method in HEATMAP_METHODS, ("methods", method), f"{_DISPLAY[method]} writes no heatmaps")
        source = spec.prompts
        if source == "auto":
            source = "manifest" if manifest_has_prompts or self.vocabulary is None else "vocabulary"
        if source == "manifest" and not manifest_has_prompts:
            fix = "set prompts: vocabulary" if self.vocabulary is not None else "set a vocabulary"
            raise SpecError(
                ("methods", method, "prompts"),
                f"{_DISPLAY[method]} heatmaps need prompts, but the manifest {redact_uri(self.input.manifest)!r} "
                f"has no 'prompts' column ({fix} to use class names as prompts)",
            )
        if source == "vocabulary" and self.vocabulary is None:
            raise SpecError("vocabulary", f"required by methods.{method}.prompts: vocabulary")
        return typing.cast(Literal["vocabulary", "manifest"], source)

    def check_manifest(self, *, has_masks: bool, has_prompts: bool) -> None:
        """Check the job against what the input provides (called once the manifest's columns are known).

        Raises :class:`SpecError` naming the field: MaskInversion without masks, heatmaps without prompts."""
        if self.requires_masks and not has_masks:
            raise SpecError(
                ("methods", "maskinversion"),
                f"needs region masks, but the manifest "
                f"{redact_uri(self.input.manifest)!r} has no 'masks' column (give a manifest with "
                "masks, or remove methods.maskinversion)",
            )
        for m in HEATMAP_METHODS:
            spec = getattr(self.methods, m)
            if spec is not None and spec.heatmaps:
                self.prompt_source(m, manifest_has_prompts=has_prompts)

    def with_vocabulary_names(self, names: Sequence[str]) -> JobSpec:
        """This spec with the names read from ``vocabulary.file`` (at plan time) inlined as ``vocabulary.names``,
        so later calls need no ``class_names``; the names are validated (errors name ``vocabulary.file``)."""
        v = self.vocabulary
        if v is None or v.file is None:
            raise SpecError("vocabulary.file", "this job has no vocabulary file to resolve")
        resolved = v.class_names(names)
        return dataclasses.replace(self, vocabulary=dataclasses.replace(v, names=resolved, file=None))

    # ------------------------------------------------------------------ what the actors get

    def templates(self, method: str) -> str | tuple[str, ...]:
        """The prompt templates ``method`` encodes text with: its own, else the vocabulary's, else its default."""
        _need(method != "maskinversion", ("methods", method), "MaskInversion encodes no text")
        own = self.method(method).templates
        if own is not None:
            return own
        return self.vocabulary.templates if self.vocabulary is not None else _FALLBACK_TEMPLATES[method]

    def method_params(self, method: str) -> dict[str, Any]:
        """Keyword arguments of the method's ``*Params`` (``build_params(method, spec.method_params(method))``),
        templates resolved by :meth:`templates` (a set name that ``resolve_templates`` understands, or a tuple)."""
        spec = self.method(method)
        return spec.method_params(None if method == "maskinversion" else self.templates(method))

    def output_options(self, method: str) -> dict[str, Any]:
        """Keyword arguments of the actor's ``OutputOptions`` for ``method`` (what to write, heatmap encoding)."""
        return self.method(method).output_options(self.output)

    def preprocess_params(self, method: str) -> dict[str, Any]:
        """How the decode stage resizes and normalises images for ``method`` (plain values, for hashing)."""
        spec = self.method(method)
        if method == "maskclip":
            return {
                "mode": "short_side",
                "size": spec.size,
                "max_long_side": spec.max_long_side,
                "normalize": spec.normalize,
                "resample": "bilinear",
            }
        return {"mode": "square", "size": spec.size, "normalize": "clip", "resample": "bicubic"}

    def preprocess(self, method: str):
        """A ``clipmaps.actors.preprocess.Preprocess`` for ``method`` (imports numpy and Pillow, not torch)."""
        from clipmaps.pipeline.decode.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, Preprocess

        p = self.preprocess_params(method)
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if p["normalize"] == "imagenet" else (OPENAI_MEAN, OPENAI_STD)
        return Preprocess(
            size=p["size"],
            mode=p["mode"],
            mean=mean,
            std=std,
            resample=p["resample"],
            max_long_side=p.get("max_long_side", 2048),
        )

    def vocabulary_id(self, method: str | None = None, class_names: Sequence[str] | None = None) -> str | None:
        """The id of the vocabulary as ``method`` encodes it (with the method's templates), or of the vocabulary
        with its own templates when ``method`` is None; ``None`` without a vocabulary.

        Args:
            class_names: the names read from ``vocabulary.file`` at plan time (file vocabularies only).
        """
        if self.vocabulary is None:
            return None
        templates = None if method is None else self.templates(method)
        return self.vocabulary.vocabulary_id(class_names, templates=templates)

    def method_params_hash(self, method: str, class_names: Sequence[str] | None = None) -> str:
        """16 hex digits of a sha256 of everything that decides ``method``'s results: its hyper-parameters and
        templates, the input preprocessing, the model name, weights and precision, the vocabulary id and the
        background threshold. Pool sizes, batch sizes and output settings do not count.

        Args:
            class_names: the names read from ``vocabulary.file`` at plan time (file vocabularies only).
        """
        spec = self.method(method)
        labelled = ("gem", "maskclip")
        uses_vocabulary = method in labelled or (method == "legrad" and spec.prompts != "manifest")
        payload = {
            "method": method,
            "model": self.model.name,
            "weights": self.model.weights_id,
            "precision": self.model.precision,
            "params": _plain(self.method_params(method)),
            "input": self.preprocess_params(method),
            "vocabulary_id": self.vocabulary_id(method, class_names) if uses_vocabulary else None,
            "threshold": self.vocabulary.threshold if self.vocabulary is not None and method in labelled else None,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    # ------------------------------------------------------------------ serialisation

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The spec as plain data (lists, dicts, scalars; absent methods left out) that :func:`load_spec` reads
        back. With ``redact``, every value under a secret-looking key (key, secret, token, password,
        credential) inside any ``storage_options`` and credentials in URIs become ``"***"``."""
        data = _plain(self)
        return _redact(data) if redact else data

    def to_yaml(self, redact: bool = True) -> str:
        """:meth:`to_dict` as YAML."""
        return yaml.safe_dump(self.to_dict(redact=redact), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------------- loading


def _check_override_path(parts: Sequence[str], item: str) -> None:
    tp: Any = JobSpec
    for i, part in enumerate(parts):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = members[0] if len(members) == 1 else tp
        if typing.get_origin(tp) is dict or tp is dict:
            return  # free-form (storage_options)
        if not dataclasses.is_dataclass(tp):
            raise SpecError(
                parts[:i], f"--set {item!r}: {_format_path(parts[:i])} is a {_describe(tp)}, it has no keys"
            )
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in names:
            hint = _suggest(part, names) or f" (expected one of: {', '.join(names)})"
            raise SpecError(parts[:i], f"--set {item!r}: unknown key {part!r}{hint}")
        tp = _hints(tp)[part]


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a spec as plain data) with ``key.path=value`` overrides applied, as a new dict.

    The value is parsed as YAML (``5``, ``0.5``, ``true``, ``[cat, dog]``, ``{}``, ``s3://b/x``); ``null`` (or
    nothing after ``=``) removes the key, so its default applies (``methods.legrad=null`` stops LeGrad). Missing
    intermediate mappings are created (``methods.legrad.layers=3`` enables LeGrad). Paths are checked against the
    spec's fields, with suggestions for typos.
    """
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        if not sep or not all(parts):
            raise SpecError((), f"--set {item!r}: expected key.path=value, e.g. methods.gem.depth=5")
        _check_override_path(parts, item)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise SpecError(parts, f"--set {item!r}: cannot parse the value as YAML ({e})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                if value is None:
                    break  # removing under an absent parent: nothing to do
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise SpecError(parts[: i + 1], f"--set {item!r}: is a {_got(child)}, not a mapping")
            node = child
        else:
            if value is None:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
    return out


def load_spec(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> JobSpec:
    """Load and validate a job spec.

    Args:
        source: path of a YAML file (read with ``yaml.safe_load``), or the spec as a mapping.
        overrides: ``key.path=value`` strings (the CLI's ``--set``), applied before validation; see
            :func:`apply_overrides`.

    Raises:
        SpecError: the file cannot be read or parsed, or the spec is invalid; the message names the field.
    """
    if isinstance(source, Mapping):
        raw: Any = source
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError((), f"cannot read job spec {str(path)!r}: {e.strerror or e}") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError((), f"{path}: invalid YAML: {e}") from None
        if raw is None:
            raise SpecError((), f"{path}: the job spec is empty")
    if not isinstance(raw, Mapping):
        raise SpecError((), f"a job spec must be a mapping of sections (input, output, model, …), got {_got(raw)}")
    raw = apply_overrides(raw, overrides)
    return _from_mapping(JobSpec, raw, ())
