"""The job spec: one YAML document, validated by pydantic v2 into frozen models.

The same spec drives ``clipmaps run JOB.yaml [--set key.path=value …]``, the Python API and the Kubernetes job::

    input:  {uri: s3://bucket/manifest.parquet, storage_options: {client_kwargs: {endpoint_url: …}}}
    output: {uri: s3://bucket/out}
    model:  {name: ViT-B-16, pretrained: openai}
    vocabulary: {preset: coco80, background: [background]}      # optional
    methods:                                                    # one section per method to run
      maskclip: {}
      gem: {depth: 7, resources: {num_gpus: 1, max_actors: 4}}
    resources: {decode_cpus: 1}
    run: {max_error_fraction: 0.01}

A method's section is its settings class from the method registry (``clipmaps.actors.registry``), so its bounds are
written once, beside the method. Bounds that depend on the model (layer counts, patch size, backbone family) are
checked here too, against the architecture's configuration read without loading weights.

:func:`load_spec` reads YAML (``yaml.safe_load``) or a dict, applies ``--set`` overrides and validates. Every problem
found is reported at once, as a :class:`~clipmaps.schemas.errors.SpecError` whose lines start with the field's path:
``methods.gem.depth: 40 is out of range for the 12-layer image tower of ViT-B-16: must be in [2, 13]``,
``methods.gem.dept: unknown key (did you mean 'depth'?)``. :func:`json_schema` is the spec's JSON Schema for editors.

Relative local paths are resolved against the working directory of the process that runs the job.
Imports pydantic, PyYAML and clipmaps' torch-free modules only.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, Strict, ValidationError, create_model, field_validator, model_validator

from clipmaps.actors.params import Bool, Int, ModelSpec, PoolSpec, Problems, Section, Str, check, template_problems
from clipmaps.actors.registry import METHODS, REGISTRY, UnknownModel
from clipmaps.actors.registry import entry as method_entry
from clipmaps.schemas.errors import SpecError
from clipmaps.schemas.storage import is_inside, redact_options, redact_uri, userinfo_error

from .uris import describe, entries_of, expand, first_expansion, fixed_prefix, has_braces, mixed_store_problem
from .vocabularies import PRESETS, check_names
from .vocabularies import vocabulary_id as _vocabulary_id
from .webdataset import DEFAULT_MASKS, DEFAULT_PROMPTS, json_field_problem, prompt_source_problem

__all__ = [
    "METHODS",
    "InputSpec",
    "JobSpec",
    "MethodsSpec",
    "ModelSpec",
    "OutputSpec",
    "PoolSpec",
    "ResourcesSpec",
    "RunSpec",
    "SpecError",
    "VocabularySpec",
    "WebDatasetSpec",
    "apply_overrides",
    "json_schema",
    "load_spec",
]

_SCHEME_NAME = re.compile(r"^[a-z][a-z0-9+.-]*$")


def _path(*parts: str) -> tuple[str, ...]:
    return tuple(p for part in parts for p in part.split(".") if p)


# ------------------------------------------------------------------------------------------------ sections


#: ``input.uri``: one path or URI, or a non-empty list of them.
_Location = (
    Annotated[str, Strict(), Field(min_length=1)]
    | Annotated[tuple[Annotated[str, Strict(), Field(min_length=1)], ...], Field(min_length=1)]
)


def _location_problem(value: Any) -> tuple[tuple[str, ...], str] | None:
    """Why ``value`` is not one path or URI or a non-empty list of them, as ``(path, reason)``, or None."""
    if isinstance(value, str):
        return ((), "is empty: give a path or URI") if not value else None
    if not isinstance(value, (list, tuple)):
        return (), f"must be a path or URI, or a list of them; got {type(value).__name__} {_got(value)}"
    if not value:
        return (), "is an empty list: give a path or URI, or a list of them"
    for i, v in enumerate(value):
        if not isinstance(v, str) or not v:
            return (f"[{i}]",), f"must be a non-empty path or URI, got {_got(v)}"
    return None


#: The extensions ``input.format: auto`` / ``manifest`` know (a name without one is a folder).
_KNOWN_EXTENSIONS = {
    "auto": ("parquet", "pq", "jsonl", "ndjson", "csv", "tar", "arrow"),
    "manifest": ("parquet", "pq", "jsonl", "ndjson", "csv"),
}


def _extension(entry: str) -> str:
    """The lower-case extension of an entry's (first expanded) name, compression suffixes looked through."""
    name = first_expansion(entry).split("?", 1)[0].rstrip("/").lower().rsplit("/", 1)[-1]
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    return name.rsplit(".", 1)[-1] if "." in name else ""


class WebDatasetSpec(Section):
    """Where a WebDataset sample's prompts and masks come from (``input.webdataset``; WebDataset tar inputs only:
    on an input without tar shards the section is refused when the job is planned, since it would have no effect).
    The defaults read ``{key}.json``'s ``prompts`` and ``masks`` fields; a changed setting is in the result
    fingerprint of each method that reads it (``clipmaps.pipeline.fingerprint``), so a resumed output refuses it.

    Attributes:
        prompts: ``json:<field>``: that field of ``{key}.json`` (a string is one prompt, a list of strings the
            prompts); ``caption``: the sample's caption, ``{key}.txt``, else ``{key}.json``'s ``caption`` field as
            img2dataset writes it (one prompt, whitespace stripped; an empty caption is no prompts); ``none``: no
            prompts from the input (heatmaps then need ``prompts: vocabulary``).
        masks: the ``{key}.json`` field holding the sample's region masks (a list of mask objects: COCO RLE,
            polygon, URI, as in a manifest's ``masks`` column).

    A field of the wrong type in a sample is an error row naming its shard and key (``clipmaps.pipeline.webdataset``).
    """

    prompts: Str = DEFAULT_PROMPTS
    masks: Str = DEFAULT_MASKS

    @field_validator("prompts", mode="before")
    @classmethod
    def _not_a_mapping(cls, v: Any) -> Any:
        if isinstance(v, dict) and list(v) == ["json"]:  # YAML reads `json: caption` as a mapping
            check([((), "is a mapping {json: ...}: write json:<field> with no space after the colon (in quotes in "
                    "YAML, e.g. 'json:caption')")])  # fmt: skip
        return v

    @field_validator("prompts")
    @classmethod
    def _prompt_source(cls, v: str) -> str:
        problem = prompt_source_problem(v)
        if problem is not None:
            check([((), problem + _suggest(v, ["caption", "none", DEFAULT_PROMPTS]))])
        return v

    @field_validator("masks")
    @classmethod
    def _masks_field(cls, v: str) -> str:
        problem = json_field_problem(v)
        if problem is not None:
            check([((), problem)])
        return v


class InputSpec(Section):
    """Where the images come from.

    Attributes:
        uri: where the input is: one path or URI, or a list of them, each a file, a folder or a glob pattern, and each
            may hold brace patterns (``s3://b/shards/shard-{0000..0099}.tar``, ``{train,val}``; expanded with
            ``braceexpand``: ``clipmaps.pipeline.uris``). By default a manifest (Parquet, JSON lines, CSV): one row
            per image with ``image_id``, ``image_uri`` and optional ``masks`` and ``prompts``
            (``clipmaps.schemas.datasets``). All entries live in one store (scheme and bucket).
        manifest: the older name of ``uri`` (give one of the two).
        format: ``auto`` (from the name: ``.jsonl``/``.ndjson``, ``.csv``, ``.tar``, ``.arrow``, else Parquet;
            ``.gz``/``.bz2``/``.xz``/``.zst`` looked through; a folder with ``state.json`` or ``dataset_dict.json`` is a
            ``datasets`` save_to_disk folder), ``manifest`` (Parquet, JSON lines or CSV by the extension), or
            ``parquet``, ``jsonl``, ``csv``, ``webdataset`` (tar shards of ``{key}.jpg|png|webp`` + ``{key}.json``:
            ``clipmaps.pipeline.webdataset``), ``arrow`` (Arrow stream files, a ``datasets`` save_to_disk folder:
            ``clipmaps.pipeline.hfdatasets``). Parquet and Arrow inputs may carry each image inside, in an ``image``
            column (encoded bytes, or the Hugging Face ``{bytes, path}`` struct that ``datasets`` writes) in place of
            ``image_uri`` (``clipmaps.pipeline.inputs``).
        split: the split to read of a ``datasets`` ``DatasetDict`` folder (``dataset_dict.json``); required there
            unless ``uri`` points at the split's folder.
        allowed_schemes: schemes image and mask URIs may use (bare paths are ``file``); others become error rows.
        storage_options: fsspec options for the manifest, images and masks. Redacted wherever the spec is written.
            Images and masks get them on the input's own scheme and the object stores among ``allowed_schemes``;
            ``http(s)`` ones only when the input itself is on the web (``clipmaps.pipeline.plan.option_schemes``).
        limit: process only the first ``limit`` rows of the manifest.
        annotation_frame: which frame region masks are drawn in when an image has an EXIF orientation: ``auto``
            (by each mask's size — an RLE's ``size``, a PNG mask's size, a polygon's declared ``width``/``height``:
            the oriented frame as is, else the stored frame mapped through the orientation; the oriented one when
            both have the same size), ``oriented`` (as displayed) or ``stored`` (the pixels as in the file, as tools
            that ignore EXIF show them). A mask that fits no frame allowed is a ``MaskSizeMismatch`` region error.
        webdataset: where WebDataset samples' prompts and masks come from (:class:`WebDatasetSpec`); null = the
            ``prompts`` and ``masks`` fields of ``{key}.json``.
    """

    # editors: exactly one of uri and its older name manifest
    model_config = {
        **Section.model_config,
        "json_schema_extra": {"oneOf": [{"required": [n]} for n in ("uri", "manifest")]},
    }

    uri: _Location | None = None
    manifest: _Location | None = Field(None, exclude=True, json_schema_extra={"deprecated": True})
    format: Literal["auto", "manifest", "parquet", "jsonl", "csv", "webdataset", "arrow"] = "auto"
    split: Str | None = Field(None, min_length=1)
    allowed_schemes: tuple[Str, ...] = Field(("file", "s3"), min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    limit: Int | None = Field(None, ge=1)
    annotation_frame: Literal["auto", "oriented", "stored"] = "auto"
    webdataset: WebDatasetSpec | None = None

    @property
    def uris(self) -> tuple[str, ...]:
        """The entries of ``uri`` as written (one string: one entry)."""
        return tuple(entries_of(self.uri)) if self.uri is not None else ()

    @property
    def shown(self) -> str:
        """``uri`` for messages, redacted: the pattern as written, or a list's first entry and how many more."""
        return describe(self.uri or ())

    @property
    def manifest_format(self) -> str:
        """``parquet``, ``jsonl``, ``csv``, ``webdataset`` or ``arrow``: ``format``, or what ``auto`` reads from the
        (first) entry's name (a folder: ``parquet``; listing tells it apart)."""
        if self.format not in ("auto", "manifest"):
            return self.format
        ext = _extension(self.uris[0])
        kinds = {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv"}
        if self.format == "auto":
            kinds.update(tar="webdataset", arrow="arrow")
        return kinds.get(ext, "parquet")

    @model_validator(mode="before")
    @classmethod
    def _one_location(cls, data: Any) -> Any:
        """``manifest`` is the older name of ``uri``: exactly one of the two, moved to ``uri``."""
        if not isinstance(data, Mapping):
            return data
        uri, manifest = data.get("uri"), data.get("manifest")
        if uri is not None and manifest is not None:
            check([(("uri",), "give input.uri or input.manifest (its older name), not both")])
        if uri is None and manifest is None:
            check([(("uri",), "required but missing (the input's path or URI; input.manifest is its older name)")])
        name, value = ("uri", uri) if uri is not None else ("manifest", manifest)
        problem = _location_problem(value)
        if problem is not None:
            check([((name, *problem[0]), problem[1])])
        if manifest is not None:
            data = {**{k: v for k, v in data.items() if k != "manifest"}, "uri": manifest}
        return data

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        check([((f"[{i}]",), f"{s!r} is not a lower-case URI scheme such as 'file', 's3' or 'gs'")
               for i, s in enumerate(v) if not _SCHEME_NAME.match(s)])  # fmt: skip
        return v

    @model_validator(mode="after")
    def _known_format(self) -> InputSpec:
        problems: list[tuple[tuple[str, ...], str]] = []
        many = not isinstance(self.uri, str)
        for i, entry in enumerate(self.uris):
            where = ("uri", f"[{i}]") if many else ("uri",)
            credentials = userinfo_error(entry)
            if credentials is not None:
                problems.append((where, credentials))
                continue
            try:
                expand(entry)
            except ValueError as e:
                problems.append((where, str(e)))
                continue
            ext = _extension(entry)
            if self.format in ("auto", "manifest") and ext and ext not in _KNOWN_EXTENSIONS[self.format]:
                shown = redact_uri(entry)
                why = (f"cannot tell the format of {shown!r} from its name" if self.format == "auto" else
                       f"'manifest' reads .parquet, .jsonl and .csv files, and {shown!r} is none")  # fmt: skip
                problems.append((("format",), f"{why}; set input.format to parquet, jsonl, csv, webdataset or arrow"))
        mixed = mixed_store_problem(self.uris)
        if mixed is not None:
            problems.append((("uri",), mixed))
        if self.split is not None and self.format not in ("auto", "arrow"):
            problems.append((("split",), f"selects a split of a datasets DatasetDict folder (input.format auto or "
                             f"arrow), but input.format is {self.format!r}"))  # fmt: skip
        check(problems)
        return self


class OutputSpec(Section):
    """Where and how results are written.

    Attributes:
        uri: folder or URI of the output datasets (``labels/``, ``heatmaps/``, ``regions/``, ``errors/``,
            ``vocabulary/``, ``_job.json``).
        storage_options: fsspec options for writing. Redacted wherever the spec is written.
        heatmap_encoding: ``png8`` (8-bit PNG of ``round(255·v)``) or ``float16`` (raw little-endian).
        heatmap_size: null = each image's original size; ``[h, w]`` = this size for every heatmap.
        write_expl_maps: also write MaskInversion's final explainability map per region.
        label_confidence: label maps also carry ``confidence``, an 8-bit PNG of the winning class's probability
            (softmax over the classes and background names at the model's logit scale), per pixel.
        overwrite: delete what is at ``uri`` first (otherwise a re-run resumes).
        shard_rows: manifest rows per shard, the unit of resume (see ``clipmaps.pipeline.resume``).
    """

    uri: Str = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    heatmap_encoding: Literal["png8", "float16"] = "png8"
    heatmap_size: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]] | None = None
    write_expl_maps: Bool = False
    label_confidence: Bool = False
    overwrite: Bool = False
    shard_rows: Int = Field(64, ge=1)

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        check([((), problem)] if (problem := userinfo_error(v)) is not None else [])
        return v


class VocabularySpec(Section):
    """The class names for segmentation (and prompts for heatmaps with ``prompts: vocabulary``).

    Exactly one of ``names``, ``preset`` and ``file``. Class ``c`` is label ``c + 1`` in label maps; label 0 is
    background: the ``background`` names are scored with the classes and a pixel whose best class is one of them is
    labelled 0 (``clipmaps.actors.methods.common.BackgroundRule``).

    Attributes:
        names: the class names, inline.
        preset: a built-in list: ``voc20``, ``context59``, ``coco80``, ``cocostuff171``, ``ade150``.
        file: path or URI of a text file, one name per line (read at plan time, with ``input.storage_options``).
        background: background names, rendered as label 0 (e.g. ``[background, ground, sky]``).
        templates: a template set (``photo``, ``raw``, ``ensemble85``) or a list of templates with one ``{}``;
            methods whose own ``templates`` is null use these.
        threshold: also label a pixel 0 when its best class's probability ``softmax(100·cos)`` is below this.
    """

    names: tuple[Str, ...] | None = None
    preset: Str | None = None
    file: Str | None = Field(None, min_length=1)
    background: tuple[Str, ...] = ()
    templates: Str | tuple[Str, ...] = "photo"
    threshold: float | None = Field(None, gt=0, lt=1)

    @field_validator("file")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        check([((), problem)] if (problem := userinfo_error(v)) is not None else [])
        return v

    @model_validator(mode="after")
    def _consistent(self) -> VocabularySpec:
        problems: list[tuple[tuple[str, ...], str]] = []
        given = [k for k in ("names", "preset", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            what = "none given" if not given else " and ".join(given) + " given"
            problems.append(((), f"give exactly one of names, preset or file; {what}"))
        if self.names is not None:
            problems += _name_problems(self.names, "names")
        if self.preset is not None and self.preset not in PRESETS:
            hint = _suggest(self.preset, list(PRESETS))
            problems.append((("preset",), f"unknown preset {self.preset!r}{hint}; presets: {', '.join(PRESETS)}"))
        if self.background:
            problems += _name_problems(self.background, "background")
            if self.file is None and not problems:
                problems += _overlap(self.class_names(), self.background)
        problems += [(("templates", *p), r) for p, r in template_problems(self.templates)]
        check(problems)
        return self

    def class_names(self, file_names: Sequence[str] | None = None) -> tuple[str, ...]:
        """The foreground class names in label order (without the background names).

        Args:
            file_names: for a ``file`` vocabulary, the names read from it at plan time (validated here).

        Raises:
            SpecError: a ``file`` vocabulary without ``file_names``, or bad names in the file.
        """
        if self.names is not None:
            return self.names
        if self.preset is not None:
            return PRESETS[self.preset]
        if file_names is None:
            raise SpecError("vocabulary.file", "the names of a vocabulary file are read at plan time")
        names = tuple(file_names)
        problems = _name_problems(names, "file") + _overlap(names, self.background)
        if problems:
            raise SpecError(problems=[(("vocabulary", *p), f"{r} (in {self.file})") for p, r in problems])
        return names

    def vocabulary_id(self, file_names: Sequence[str] | None = None, *, templates=None) -> str:
        """16 hex digits identifying (class names, background names, templates); ``templates`` overrides these
        vocabulary's own (a method's templates, see :meth:`JobSpec.vocabulary_id`)."""
        return _vocabulary_id(
            self.class_names(file_names), self.background, self.templates if templates is None else templates
        )


def _name_problems(names: Sequence[str], path: str) -> list[tuple[tuple[str, ...], str]]:
    problem = check_names(names)
    if problem is None:
        return []
    index, reason = problem
    return [((path,) if index is None else (path, f"[{index}]"), reason)]


def _overlap(names: Sequence[str], background: Sequence[str]) -> list[tuple[tuple[str, ...], str]]:
    both = sorted(set(names) & set(background))
    return [(("background",), f"{both[0]!r} is both a class name and a background name")] if both else []


class _Methods(Section):
    """Which methods run (an absent key does not run; ``{}`` runs one with its defaults). At least one.

    One optional field per method of the registry (``clipmaps.actors.registry.METHODS``), typed by its settings
    class, so a new method needs no change here."""

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            check([((name,), f"is empty (null): write '{name}: {{}}' to run it with its defaults, or remove the "
                    "key") for name, value in data.items() if value is None and name in METHODS])  # fmt: skip
        return data

    @model_validator(mode="after")
    def _at_least_one(self) -> _Methods:
        if not any(getattr(self, m) is not None for m in METHODS):
            raise ValueError(f"at least one method is required: {', '.join(METHODS)}")
        return self


MethodsSpec = create_model(
    "MethodsSpec",
    __base__=_Methods,
    __module__=__name__,
    **{
        m: (REGISTRY[m].settings | None, Field(None, description=REGISTRY[m].settings.__doc__.split("\n", 1)[0]))
        for m in METHODS
    },
)


class ResourcesSpec(Section):
    """The CPU fetch + decode stage and fault handling.

    Attributes:
        decode_cpus: CPUs per decode task.
        max_pixels: decompression-bomb limit (Pillow's default); larger images become error rows.
        read_timeout_s: timeout of one object-store request in seconds (null = the client's default).
        retries: retries of a failed image or mask read (after the client's own) before the row becomes an error.
        io_retries: attempts of one object-store request (botocore ``standard`` retry mode and s3fs), merged into the
            ``storage_options`` of every ``s3://`` input, output and weights URI that sets none.
        task_retries: how often Ray re-runs a decode or sink task that failed (worker or node lost; the sink also
            on I/O errors; its writes are idempotent).
    """

    decode_cpus: float = Field(0.5, gt=0)
    max_pixels: Int = Field(89_478_485, ge=1)
    read_timeout_s: float | None = Field(60.0, gt=0)
    retries: Int = Field(3, ge=0)
    io_retries: Int = Field(10, ge=1)
    task_retries: Int = Field(4, ge=0)


class RunSpec(Section):
    """How the job runs.

    Attributes:
        ray_address: Ray address (``ray://…`` or ``auto``); null = ``RAY_ADDRESS`` when set (KubeRay sets it), else
            a new local in-process Ray (never a Ray that happens to run on the host already).
        max_error_fraction: the job exits 3 when more than this fraction of input rows failed.
        progress: print a progress line (images done / total, images/s, ETA, errors) every ``progress_interval_s``
            seconds and at the end; in a terminal Ray Data's progress bars show too.
        progress_interval_s: seconds between progress lines.
        stall_timeout_s: fail the run when nothing progressed for this long (Ray Data's
            ``execution_no_progress_timeout_s``); null = Ray Data's default. A re-run resumes.
    """

    ray_address: Str | None = Field(None, min_length=1)
    max_error_fraction: float = Field(0.0, ge=0, le=1)
    progress: Bool = True
    progress_interval_s: float = Field(30.0, gt=0)
    stall_timeout_s: float | None = Field(None, gt=0)


# ------------------------------------------------------------------------------------------------ the job


class JobSpec(Section):
    """One clipmaps job. Build it with :func:`load_spec` (YAML or dict), which reports every problem at once."""

    input: InputSpec
    output: OutputSpec
    model: ModelSpec
    vocabulary: VocabularySpec | None = None
    methods: MethodsSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    @model_validator(mode="after")
    def _across_sections(self) -> JobSpec:
        check(self._problems())
        return self

    def _problems(self) -> list[tuple[tuple[str, ...], str]]:
        problems: list[tuple[tuple[str, ...], str]] = []

        def add(path: str, reason: str) -> None:
            problems.append((_path(path), reason))

        model = self.model
        credentials = userinfo_error(model.weights)
        if credentials is not None:
            add("model.weights", credentials)
        try:
            info = model.info
        except UnknownModel as e:
            add("model.name", str(e))
            info = None
        for m in self.enabled_methods():
            s, gpus = self.method(m), self.method(m).resources.num_gpus
            if info is not None:
                problems += [(_path(f"methods.{m}", f), r) for f, r in REGISTRY[m].model_problems(s, info)]
            if s.labels and self.vocabulary is None:
                add("vocabulary", f"required by methods.{m}.labels (segmentation needs class names): set "
                    "vocabulary.names, .preset or .file")  # fmt: skip
            if s.heatmaps and getattr(s, "prompts", None) == "vocabulary" and self.vocabulary is None:
                add("vocabulary", f"required by methods.{m}.prompts: vocabulary")
            if model.device == "cuda" and gpus == 0:
                add(f"methods.{m}.resources.num_gpus", "is 0 but model.device is 'cuda': Ray hides GPUs from actors "
                    "that reserve none (set num_gpus > 0, or device: auto)")  # fmt: skip
            if model.device == "cpu" and gpus > 0:
                add("model.device", f"is 'cpu' but methods.{m}.resources.num_gpus reserves {gpus:g} GPU(s) (set "
                    "device: auto, or num_gpus: 0)")  # fmt: skip
            if model.precision == "bf16" and gpus == 0:
                add(f"methods.{m}.resources.num_gpus", "is 0 but model.precision is bf16, which needs a GPU")
        square = [(m, self.method(m).size) for m in self.enabled_methods() if REGISTRY[m].square_input]
        for m, size in square[1:]:
            if size != square[0][1]:
                add(f"methods.{m}.size", f"{size} differs from methods.{square[0][0]}.size ({square[0][1]}): GEM, "
                    "LeGrad and MaskInversion share one square input")  # fmt: skip
        if self.output.write_expl_maps and self.methods.maskinversion is None:
            add("output.write_expl_maps", "only MaskInversion writes explainability maps, and methods.maskinversion "
                "is not set")  # fmt: skip
        out = self.output.uri
        for manifest in self.input.uris:
            # every expansion lies in the folder before the first brace: expand only when that folder overlaps
            folder = fixed_prefix(manifest).rsplit("/", 1)[0] if has_braces(manifest) else manifest
            near = is_inside(out, folder) or is_inside(folder, out)
            expanded = expand(manifest) if near and has_braces(manifest) else [manifest]
            clash = next((e for e in expanded if is_inside(out, e) or is_inside(e, out)), None)
            if clash is not None:
                add("output.uri", f"{redact_uri(out)!r} and the input manifest {redact_uri(clash)!r} overlap; "
                    "writing there (or overwrite) could clobber the input")  # fmt: skip
                break
        return problems

    # ------------------------------------------------------------------ what runs

    def enabled_methods(self) -> list[str]:
        """Names of the methods that run, in pipeline order: maskclip, gem, legrad, maskinversion."""
        return [m for m in METHODS if getattr(self.methods, m) is not None]

    def method(self, name: str):
        """The settings of an enabled method; ``KeyError`` if it is unknown or not enabled."""
        method_entry(name)
        settings = getattr(self.methods, name, None)
        if settings is None:
            raise KeyError(f"method {name!r} is not enabled in this job")
        return settings

    @property
    def requires_masks(self) -> bool:
        """Whether the manifest rows must carry region masks (MaskInversion runs)."""
        return self.methods.maskinversion is not None

    def prompt_source(self, method: str, *, manifest_has_prompts: bool) -> Literal["vocabulary", "manifest", "auto"]:
        """Where ``method``'s heatmap prompts come from, against the manifest's columns: ``manifest``, ``vocabulary``,
        or ``auto`` when both exist (each row's own prompts, the vocabulary's names for a row without).

        Raises:
            SpecError: the chosen source is missing (naming ``methods.<method>.prompts``)."""
        source = self.method(method).prompts
        if source == "auto":
            if not manifest_has_prompts:
                source = "vocabulary" if self.vocabulary is not None else "manifest"
            elif self.vocabulary is None:
                source = "manifest"
        if source == "manifest" and not manifest_has_prompts:
            fix = "set prompts: vocabulary" if self.vocabulary is not None else "set a vocabulary"
            raise SpecError(
                ("methods", method, "prompts"),
                f"{REGISTRY[method].display} heatmaps need prompts, but the manifest "
                f"{self.input.shown!r} has no 'prompts' column ({fix} to use class names as prompts)",
            )
        return source

    def check_manifest(self, *, has_masks: bool, has_prompts: bool) -> None:
        """Check the job against what the input provides (once the manifest's columns are known).

        Raises:
            SpecError: MaskInversion without masks, heatmaps without prompts; every problem at once."""
        problems: list[tuple[tuple[str, ...], str]] = []
        if self.requires_masks and not has_masks:
            shown = self.input.shown
            reason = f"needs region masks, but no row of the manifest {shown!r} has any (give a manifest with masks, "
            problems.append((_path("methods.maskinversion"), reason + "or remove methods.maskinversion)"))
        for m in self.enabled_methods():
            if self.method(m).heatmaps:
                try:
                    self.prompt_source(m, manifest_has_prompts=has_prompts)
                except SpecError as e:
                    problems += e.problems
        if problems:
            raise SpecError(problems=problems)

    def with_vocabulary_names(self, names: Sequence[str]) -> JobSpec:
        """This spec with the names read from ``vocabulary.file`` inlined as ``vocabulary.names`` (validated; errors
        name ``vocabulary.file``)."""
        v = self.vocabulary
        if v is None or v.file is None:
            raise SpecError("vocabulary.file", "this job has no vocabulary file to resolve")
        resolved = v.class_names(names)
        return self.model_copy(update={"vocabulary": v.model_copy(update={"names": resolved, "file": None})})

    # ------------------------------------------------------------------ what the actors get

    def templates(self, method: str) -> str | tuple[str, ...]:
        """The templates ``method`` encodes text with: its own, else the vocabulary's, else its default."""
        if not REGISTRY[method].encodes_text:
            raise SpecError(("methods", method), f"{REGISTRY[method].display} encodes no text")
        own = self.method(method).templates
        if own is not None:
            return own
        return self.vocabulary.templates if self.vocabulary is not None else REGISTRY[method].default_templates

    def method_params(self, method: str):
        """The method module's params (``clipmaps.actors.params.<Method>Params``), templates resolved."""
        e = REGISTRY[method]
        settings = self.method(method)
        values = {name: getattr(settings, name) for name in e.params.model_fields}
        if "templates" in values:
            values["templates"] = self.templates(method)
        return e.params(**values)

    def preprocess_params(self, method: str) -> dict[str, Any]:
        """How the decode stage resizes and normalises images for ``method`` (the registry's data)."""
        return REGISTRY[method].preprocess(self.method(method), self.model.info)

    def preprocess(self, method: str):
        """A ``clipmaps.pipeline.decode.preprocess.Preprocess`` for ``method`` (numpy and Pillow, no torch)."""
        from .decode.preprocess import Preprocess

        return Preprocess.from_params(self.preprocess_params(method))

    def vocabulary_id(self, method: str | None = None, class_names: Sequence[str] | None = None) -> str | None:
        """The id of the vocabulary as ``method`` encodes it (with its templates), or with the vocabulary's own
        templates when ``method`` is None; ``None`` without a vocabulary.

        Args:
            class_names: the names read from ``vocabulary.file`` at plan time (file vocabularies only).
        """
        if self.vocabulary is None:
            return None
        templates = None if method is None else self.templates(method)
        return self.vocabulary.vocabulary_id(class_names, templates=templates)

    # ------------------------------------------------------------------ serialisation

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """The spec as plain data that :func:`load_spec` reads back (absent methods left out). With ``redact``,
        storage-option values under secret-like keys and credentials in URIs become ``"***"``
        (``clipmaps.schemas.storage``)."""
        data = self.model_dump(mode="json")
        data["methods"] = {k: v for k, v in data["methods"].items() if v is not None}
        return _redacted(data) if redact else data

    def to_yaml(self, redact: bool = True) -> str:
        """:meth:`to_dict` as YAML."""
        return yaml.safe_dump(self.to_dict(redact=redact), sort_keys=False, allow_unicode=True)


def _redacted(value: Any, key: str | None = None) -> Any:
    if isinstance(value, dict):
        if key == "storage_options":
            return redact_options(value)
        return {k: _redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value


# ------------------------------------------------------------------------------------------------ errors


def _suggest(word: object, options: Sequence[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: Sequence[str]) -> type[BaseModel] | None:
    """The spec model class at ``path`` (field names), or None where the path leaves the models."""
    tp: Any = JobSpec
    for part in path:
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)) or part not in tp.model_fields:
            return None
        tp = _unwrap(tp.model_fields[part].annotation)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, …]`` → ``X``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _got(value: Any) -> str:
    text = repr(redact_uri(value) if isinstance(value, str) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problems_of(error: ValidationError) -> list[tuple[tuple[str, ...], str]]:
    """pydantic's errors as ``(path, reason)``: list indices as ``[i]``, union branches dropped, suggestions added."""
    out: list[tuple[tuple[str, ...], str]] = []
    for err in error.errors(include_url=False):
        loc = tuple(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
        # pydantic names the union member it tried ("function-after[...]", "tuple[str, ...]"): not a field
        loc = tuple(p for p in loc if not any(c in p for c in "[(") or p.startswith("["))
        kind, ctx = err["type"], err.get("ctx") or {}
        if isinstance(ctx.get("error"), Problems):
            out += [((*loc, *p), r) for p, r in ctx["error"].problems]
            continue
        if kind == "extra_forbidden":
            model = _model_at(loc[:-1])
            options = list(model.model_fields) if model is not None else []
            hint = _suggest(loc[-1], options) or (f" (expected one of: {', '.join(options)})" if options else "")
            out.append((loc, f"unknown key{hint}"))
            continue
        if kind == "missing":
            out.append((loc, "required but missing"))
            continue
        if kind == "too_short" and any(len(o["loc"]) > len(err["loc"]) and o["loc"][: len(err["loc"])] == err["loc"]
                                       for o in error.errors()):  # fmt: skip
            continue  # a list emptied by its own bad items: the items' errors say it
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and kind not in ("value_error", "assertion_error") and not isinstance(err["input"], dict):
            message += f", got {_got(err['input'])}"
            if isinstance(err["input"], (bool, int, float)) and "string" in err["msg"]:
                message += " (quote it in YAML to make it a string)"
        if kind == "literal_error":
            message += _suggest(err.get("input"), re.findall(r"'([^']*)'", ctx.get("expected", "")))
        if (loc, message) not in out:
            out.append((loc, message))
    return out


# ------------------------------------------------------------------------------------------------ loading


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a spec as plain data) with ``key.path=value`` overrides applied, as a new dict.

    The value is parsed as YAML (``5``, ``0.5``, ``true``, ``[cat, dog]``, ``{}``, ``s3://b/x``); ``null`` (or
    nothing after ``=``) removes the key, so its default applies (``methods.legrad=null`` stops LeGrad). Missing
    intermediate mappings are created (``methods.legrad.layers=3`` enables LeGrad). Paths are checked against the
    spec's fields, with suggestions for typos. ``input.uri`` and ``input.manifest`` name one thing: setting either
    replaces both.

    Raises:
        SpecError: a malformed override, an unknown key, or a value that is not YAML.
    """
    out = copy.deepcopy(dict(raw))
    problems: list[tuple[tuple[str, ...], str]] = []
    for item in overrides:
        try:
            _apply_override(out, item)
        except SpecError as e:  # report every bad override at once
            problems += e.problems
    if problems:
        raise SpecError(problems=problems)
    return out


def _apply_override(out: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise SpecError((), f"--set {item!r}: expected key.path=value, e.g. methods.gem.depth=5")
    for i, part in enumerate(parts):
        model = _model_at(parts[:i])
        if model is None:
            if i and _model_at(parts[: i - 1]) is not None and _is_mapping_field(parts[:i]):
                break  # free-form mapping (storage_options, custom_resources)
            raise SpecError(parts[:i], f"--set {item!r}: has no keys")
        if part not in model.model_fields:
            names = list(model.model_fields)
            hint = _suggest(part, names) or f" (expected one of: {', '.join(names)})"
            raise SpecError(parts[:i], f"--set {item!r}: unknown key {part!r}{hint}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise SpecError(parts, f"--set {item!r}: cannot parse the value as YAML ({e})") from None
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            if value is None:
                return  # removing under an absent parent: nothing to do
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise SpecError(parts[: i + 1], f"--set {item!r}: is {_got(child)}, not a mapping")
        node = child
    if parts[:-1] == ["input"] and parts[-1] in _INPUT_NAMES:  # one input, two names: the override replaces both
        for name in _INPUT_NAMES:
            node.pop(name, None)
    if value is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value


#: ``input.uri`` and its older name.
_INPUT_NAMES = ("uri", "manifest")


def _is_mapping_field(path: Sequence[str]) -> bool:
    model = _model_at(path[:-1])
    return model is not None and typing.get_origin(_unwrap(model.model_fields[path[-1]].annotation)) is dict


def load_spec(source: str | os.PathLike | Mapping[str, Any], overrides: Sequence[str] = ()) -> JobSpec:
    """Load and validate a job spec.

    Args:
        source: path of a YAML file (read with ``yaml.safe_load``), the spec as a mapping, or a :class:`JobSpec`.
        overrides: ``key.path=value`` strings (the CLI's ``--set``), applied before validation.

    Raises:
        SpecError: the file cannot be read or parsed, or the spec is invalid; every problem, each with its path.
    """
    if isinstance(source, JobSpec):
        raw: Any = source.to_dict(redact=False)
    elif isinstance(source, Mapping):
        raw = source
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
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(problems=_problems_of(e)) from None


def json_schema() -> dict[str, Any]:
    """The job spec's JSON Schema (draft 2020-12), for editors: ``# yaml-language-server: $schema=…``."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "clipmaps job spec"
    return schema
