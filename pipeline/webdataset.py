"""WebDataset tar shards as input (``input.format: webdataset``, or ``auto`` for ``.tar`` names): each sample is the
tar members sharing a key (``{key}.jpg|jpeg|png|webp`` beside ``{key}.json`` / ``{key}.txt``, as img2dataset and NeMo
Curator write them), one manifest row per sample, read on the workers like a manifest file's rows.

* ``image_id``: ``<tar file's path relative to the manifest root, without .tar>/<key>`` (``<tar name>/<key>`` for
  one file), so an id names its shard and key and is unique across shards;
* the image: the first member with an image extension, carried as bytes (``clipmaps.pipeline.inputs``);
* from ``{key}.json`` when present: ``masks_uri``, ``width``/``height``; other fields are ignored unless named below;
* prompts and masks from where :class:`SampleFields` says (``input.webdataset``; the defaults read the ``prompts``
  and ``masks`` fields of ``{key}.json``):

  - prompts ``json:<field>``: that field of ``{key}.json``: a string is one prompt, a list of strings the prompts,
    null or absent none;
  - prompts ``caption``: the sample's caption, ``{key}.txt`` (UTF-8), else the ``caption`` field of ``{key}.json``
    (img2dataset writes both): one prompt, surrounding whitespace stripped; an empty caption is no prompts;
  - prompts ``none``: no prompts from the input;
  - masks ``<field>``: that field of ``{key}.json``, a list of the manifest's mask objects (COCO RLE, polygon, URI).

The count task (one per tar, :func:`count_tar`) records the byte offset of every ``shard_rows``-th sample's first
member header, so a shard's read seeks there and streams only its samples. A sample with an unreadable JSON member, a
caption that is not UTF-8, or a prompts/masks field of the wrong type is an error row (``MalformedRow``) naming the
shard, key and field; a sample without an image member is refused as ``MissingImage``; a corrupt image fails at
decode (``image bytes of <shard>/<key>``); the other samples go on. A tar cut off (no end-of-archive marker where
its members end, or its data ending inside a member) is one error row (``TruncatedTar``) in place of the sample being
read there (which may be incomplete), naming the file, the byte and that sample; the samples before it are read.
Each image's SHA-256 is in the shard's digest, so resume refuses a shard whose images changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from clipmaps.schemas.errors import SpecError, short
from clipmaps.schemas.storage import redact_uri

logger = logging.getLogger(__name__)

#: Member extensions read as the sample's image (lower case, the part after the key's first dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Fields of ``{key}.json`` copied into the row as they are (prompts and masks: :class:`SampleFields`).
JSON_FIELDS = ("masks_uri", "width", "height")
FLAG_FIELDS = ("masks", "prompts", "masks_uri")
#: ``input.webdataset.prompts`` by default: the ``prompts`` field of ``{key}.json``.
DEFAULT_PROMPTS = "json:prompts"
#: ``input.webdataset.masks`` by default: the ``masks`` field of ``{key}.json``.
DEFAULT_MASKS = "masks"
#: The ``{key}.json`` field ``prompts: caption`` reads when a sample has no ``{key}.txt`` (img2dataset's).
CAPTION_FIELD = "caption"


def prompt_source_problem(source: str) -> str | None:
    """Why ``source`` is not a prompt source (``json:<field>``, ``caption`` or ``none``); None when it is one."""
    if source in ("caption", "none"):
        return None
    kind, sep, name = source.partition(":")
    if kind != "json" or not sep:
        return f"{source!r} is not a prompt source: use json:<field> (a field of {{key}}.json), caption or none"
    if not name:
        return "'json:' names no field: write json:<field>, e.g. json:prompts"
    return json_field_problem(name)


def json_field_problem(name: str) -> str | None:
    """Why ``name`` cannot be a ``{key}.json`` field name (empty, or whitespace around it); None when it can."""
    if not name:
        return "is empty: name a field of {key}.json"
    if name != name.strip():
        return f"field name {name!r} has whitespace around it (JSON field names match exactly)"
    return None


@dataclass(frozen=True)
class SampleFields:
    """Where a sample's prompts and masks come from (``input.webdataset``, see the module docstring).

    Attributes:
        prompts: ``json:<field>``, ``caption`` or ``none``.
        masks: the ``{key}.json`` field holding the sample's mask objects.

    Raises:
        ValueError: ``prompts`` is not a prompt source, or ``masks`` not a field name.
    """

    prompts: str = DEFAULT_PROMPTS
    masks: str = DEFAULT_MASKS

    def __post_init__(self) -> None:
        problem = prompt_source_problem(self.prompts)
        if problem is None:
            problem = json_field_problem(self.masks)
        if problem is not None:
            raise ValueError(problem)

    @property
    def prompts_field(self) -> str | None:
        """The ``{key}.json`` field prompts are read from with ``json:<field>``; None for ``caption``/``none``."""
        kind, _, name = self.prompts.partition(":")
        return name if kind == "json" else None


DEFAULT_FIELDS = SampleFields()


def split_member(name: str) -> tuple[str, str]:
    """``("dir/000123", "jpg")`` for ``dir/000123.jpg``: WebDataset's rule, the key ends at the basename's first
    dot."""
    folder, base = posixpath.split(name)
    key, _, ext = base.partition(".")
    return posixpath.join(folder, key) if folder else key, ext.lower()


@dataclass(frozen=True)
class Truncation:
    """Where a tar stops before its end-of-archive marker (cut off, or garbage where a header should be).

    Attributes:
        offset: header offset of the sample being read when the archive stopped (it may be incomplete, so it is
            not yielded as a sample), or where the read started when no sample was being read: the byte a read seeks
            to so that it meets this truncation at the same position as the count.
        key: that sample's key; None when no sample was being read.
        members: the extensions of its members that were read whole.
        at: the file's size (where it was cut).
        reason: what was found there.
    """

    offset: int
    key: str | None
    members: tuple[str, ...]
    at: int
    reason: str

    def message(self, prefix: str) -> str:
        """The error row's message, naming the shard's samples as ``<prefix>/<key>``."""
        if self.key is None:
            return (
                f"the tar is truncated at byte {self.at} ({self.reason}): its members after byte {self.offset} are lost"
            )
        read = ", ".join(self.members) or "none"
        return (
            f"the tar is truncated at byte {self.at} ({self.reason}): sample {prefix}/{self.key} (header at byte "
            f"{self.offset}, members read whole: {read}) may be incomplete, and the samples after it are lost"
        )


class TruncatedTar(ValueError):
    """A tar's truncation as its one error row (``error_type`` ``TruncatedTar``), in :func:`tar_records`."""


#: The end-of-archive marker's first block (a well-formed tar ends with at least two).
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _samples(f, offset: int | None) -> Iterator[tuple[int, str, dict[str, bytes]] | Truncation]:
    """Yield ``(header offset of its first member, key, {extension: bytes})`` per sample, in order, from byte
    ``offset`` (a member header) or the start; a :class:`Truncation` last, instead of the sample being read, when the
    archive is cut off (no end-of-archive marker where the members end, or its data ends inside a member).

    Raises:
        tarfile.ReadError: the file is not a tar archive (nothing could be read from its start).
    """
    base = 0
    if offset is not None:
        f.seek(offset)
        base = offset
    current: tuple[int, str, dict[str, bytes]] | None = None
    reason = ""
    seen = False
    member: tarfile.TarInfo | None = None
    with tarfile.open(fileobj=f, mode="r|") as tar:
        try:
            for member in tar:
                seen = True
                if not member.isfile():
                    continue
                key, ext = split_member(member.name)
                if current is None or key != current[1]:
                    if current is not None:
                        yield current
                    current = (base + member.offset, key, {})
                data = tar.extractfile(member)
                current[2][ext] = data.read() if data is not None else b""
            end = base + tar.offset
            f.seek(end)
            if f.read(tarfile.BLOCKSIZE) != _ZERO_BLOCK:
                reason = f"no end-of-archive marker at byte {end}, where its members end"
        except tarfile.ReadError as e:
            if not seen and base == 0:
                raise
            cut = f" in member {member.name!r} (header at byte {base + member.offset})" if member else ""
            reason = f"{type(e).__name__}: {e}{cut}"
    if reason:
        f.seek(0, 2)
        yield Truncation(
            offset=current[0] if current is not None else base,
            key=current[1] if current is not None else None,
            members=tuple(sorted(current[2])) if current is not None else (),
            at=f.tell(),
            reason=reason,
        )
    elif current is not None:
        yield current


def _filled(value: Any) -> bool:
    return value not in (None, "", [])


def _caption(members: dict[str, bytes], obj: dict | None, key: str) -> str | None:
    """The sample's caption: ``{key}.txt`` decoded, else ``{key}.json``'s ``caption`` (None when neither is there).

    Raises:
        ValueError: the text is not UTF-8, or the JSON field is not a string (naming the member or field)."""
    text = members.get("txt")
    if text is not None:
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{key}.txt is not UTF-8 text ({e.reason} at byte {e.start})") from None
    value = obj.get(CAPTION_FIELD) if obj is not None else None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}.json field {CAPTION_FIELD!r} (the caption) must be a string, got {_got(value)}")
    return value


def _got(value: Any) -> str:
    return f"{type(value).__name__} {short(repr(value), 60)}"


def sample_prompts(fields: SampleFields, members: dict[str, bytes], obj: dict | None, key: str) -> Any:
    """The sample's prompts as the row carries them: a ``json:<field>`` value as stored (a string or a list of
    strings; the manifest reader makes a string one prompt), a caption as ``[caption]`` (stripped; None when empty),
    None when there are none.

    Raises:
        ValueError: the field holds another type, or the caption cannot be read (naming the member and field)."""
    name = fields.prompts_field
    if name is not None:
        value = obj.get(name) if obj is not None else None
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, str) for p in value):
            return value
        raise ValueError(f"{key}.json field {name!r} (the prompts) must be a string or a list of strings, "
                         f"got {_got(value)}")  # fmt: skip
    if fields.prompts == "caption":
        caption = _caption(members, obj, key)
        caption = caption.strip() if caption is not None else ""
        return [caption] if caption else None
    return None


def sample_masks(fields: SampleFields, obj: dict | None, key: str) -> list | None:
    """The sample's masks field as stored (a list of mask objects, each checked when the row is normalised), or None.

    Raises:
        ValueError: the field holds something other than a list (naming the member and field)."""
    value = obj.get(fields.masks) if obj is not None else None
    if value is not None and not isinstance(value, list):
        raise ValueError(f"{key}.json field {fields.masks!r} (the masks) must be a list of mask objects, "
                         f"got {_got(value)}")  # fmt: skip
    return value


def _json_object(members: dict[str, bytes]) -> Any:
    meta = members.get("json")
    return json.loads(meta) if meta is not None else None


def count_tar(f, shard_rows: int, fields: SampleFields | None = None) -> tuple[int, list[int], dict[str, bool]]:
    """``(samples, offsets of samples 0, k, 2k…, flags)`` of one tar. ``flags``: whether some sample has prompts
    (a ``json:<field>`` value other than null, ``""``, ``[]``; a non-empty caption), masks (the masks field, the same
    way) or ``masks_uri``, as ``fields`` says (None: the defaults); a sample that cannot be read sets no flag.

    A truncated tar (:class:`Truncation`) counts its samples read whole and one row for the truncation, the error
    row :func:`tar_records` yields in its place.

    Raises:
        tarfile.ReadError: the file is not a tar archive (the caller names the file)."""
    fields = fields or DEFAULT_FIELDS
    rows, offsets = 0, []
    flags = dict.fromkeys(FLAG_FIELDS, False)
    for got in _samples(f, None):
        if rows % shard_rows == 0:
            offsets.append(got.offset if isinstance(got, Truncation) else got[0])
        rows += 1
        if isinstance(got, Truncation):  # one error row, where the read meets it too
            logger.warning("WebDataset tar truncated at byte %d: %s", got.at, got.reason)
            break
        _, key, members = got
        if all(flags.values()):
            continue
        try:
            obj = _json_object(members)
        except ValueError:
            continue  # an error row when read
        if obj is not None and not isinstance(obj, dict):
            continue
        if fields.prompts == "caption":
            with contextlib.suppress(ValueError):  # an unreadable caption: an error row when read
                flags["prompts"] = flags["prompts"] or sample_prompts(fields, members, obj, key) is not None
        elif obj is not None and fields.prompts_field is not None:
            flags["prompts"] = flags["prompts"] or _filled(obj.get(fields.prompts_field))
        if obj is not None:
            flags["masks"] = flags["masks"] or _filled(obj.get(fields.masks))
            flags["masks_uri"] = flags["masks_uri"] or _filled(obj.get("masks_uri"))
    return rows, offsets, flags


def shard_name(rel: str, uri: str) -> str:
    """The ``image_id`` prefix of a tar's samples: its relative path (its name for a one-file manifest) without
    ``.tar``."""
    name = rel or posixpath.basename(uri.split("?", 1)[0].rstrip("/"))
    return name[: -len(".tar")] if name.lower().endswith(".tar") else name


def tar_records(
    f, offset: int | None, skip: int, rows: int, prefix: str, fields: SampleFields | None = None
) -> Iterator[tuple[Any, Any, bytes | None] | None]:
    """Yield ``(row dict or exception, raw, image bytes)`` for ``rows`` samples after skipping ``skip`` from
    ``offset``, prompts and masks read as ``fields`` says (None: the defaults); ``None`` once the archive ends early
    (the caller reports a changed file). An exception (``ValueError``) names the sample (``<prefix>/<key>``) and what
    is wrong with it; a :class:`TruncatedTar` the tar's truncation, in the place :func:`count_tar` counted it."""
    fields = fields or DEFAULT_FIELDS
    samples = _samples(f, offset)
    for _ in range(skip):
        next(samples, None)
    for _ in range(rows):
        got = next(samples, None)
        if got is None:
            yield None
            return
        if isinstance(got, Truncation):
            image_id = f"{prefix}/{got.key}" if got.key is not None else f"{prefix}/#truncated"
            raw = json.dumps({"image_id": image_id, "members": list(got.members), "truncated_at": got.at})
            yield TruncatedTar(got.message(prefix)), raw, None
            continue
        _, key, members = got
        image_id = f"{prefix}/{key}"
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members and members[e]), None)
        row: dict[str, Any] = {"image_id": image_id, "image_uri": None}
        raw = json.dumps({"image_id": image_id, "members": sorted(members)})
        try:
            obj = _json_object(members)
            if obj is not None and not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        except ValueError as e:
            yield ValueError(f"sample {image_id}: {key}.json is not valid JSON ({e})"), raw, image
            continue
        try:
            prompts = sample_prompts(fields, members, obj, key)
            masks = sample_masks(fields, obj, key)
        except ValueError as e:
            yield ValueError(f"sample {image_id}: {e}"), raw, image
            continue
        if obj is not None:
            row.update({c: obj[c] for c in JSON_FIELDS if c in obj})
        if prompts is not None:
            row["prompts"] = prompts
        if masks is not None:
            row["masks"] = masks
        yield row, raw, image


class _FieldsSection(Protocol):
    """What :func:`with_sample_fields` reads of ``input.webdataset`` (``clipmaps.pipeline.spec.WebDatasetSpec``)."""

    prompts: str
    masks: str


class _File(Protocol):
    """What :func:`with_sample_fields` reads of a manifest file (``clipmaps.pipeline.manifests.ManifestFile``)."""

    uri: str
    format: str


F = TypeVar("F", bound=_File)


def with_sample_fields(files: Sequence[F], section: _FieldsSection | None) -> list[F]:
    """``files`` with the WebDataset ones reading their samples as ``section`` (``input.webdataset``) says; the files
    as they are when ``section`` is None.

    The section is refused, not ignored, when no file is a tar shard: it would have no effect, and a job whose author
    expects prompts from captions must not silently run on other prompts.

    Args:
        files: the listed input files (dataclasses with ``uri``, ``format`` and ``webdataset`` fields).
        section: ``input.webdataset``, or None.

    Raises:
        SpecError: ``section`` is set but no file is a WebDataset tar (naming ``input.webdataset``)."""
    if section is None:
        return list(files)
    if not any(f.format == "webdataset" for f in files):
        formats = ", ".join(sorted({f.format for f in files}))
        first = f", e.g. {redact_uri(files[0].uri)!r}" if files else ""
        raise SpecError(
            ("input", "webdataset"),
            f"is set, but the input holds no WebDataset tar shards ({len(files)} file(s) read as {formats}{first}): "
            "the section says where a tar sample's prompts and masks come from; remove it, or give .tar shards "
            "(input.format: webdataset)",
        )
    fields = SampleFields(prompts=section.prompts, masks=section.masks)
    return [replace(f, webdataset=fields) if f.format == "webdataset" else f for f in files]


__all__ = [
    "DEFAULT_FIELDS",
    "DEFAULT_MASKS",
    "DEFAULT_PROMPTS",
    "IMAGE_EXTENSIONS",
    "SampleFields",
    "TruncatedTar",
    "Truncation",
    "count_tar",
    "json_field_problem",
    "prompt_source_problem",
    "sample_masks",
    "sample_prompts",
    "shard_name",
    "split_member",
    "tar_records",
    "with_sample_fields",
]
