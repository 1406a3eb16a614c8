"""WebDataset tar shards as input (``input.format: webdataset``, or ``auto`` for ``.tar`` names): each sample is the
tar members sharing a key (``{key}.jpg|jpeg|png|webp`` beside ``{key}.json`` / ``{key}.txt``, as img2dataset and NeMo
Curator write them), one manifest row per sample, read on the workers like a manifest file's rows.

* ``image_id``: ``<tar file's path relative to the manifest root, without .tar>/<key>`` (``<tar name>/<key>`` for
  one file), so an id names its shard and key and is unique across shards;
* the image: the first member with an image extension, carried as bytes (``clipmaps.pipeline.inputs``);
* from ``{key}.json`` when present: ``prompts`` (a list of strings, or one string), ``masks`` (the manifest's mask
  objects: COCO RLE, polygon, URI), ``masks_uri``, ``width``/``height``; other fields are ignored.

The count task (one per tar, :func:`count_tar`) records the byte offset of every ``shard_rows``-th sample's first
member header, so a shard's read seeks there and streams only its samples. A sample with an unreadable JSON member is
an error row (``MalformedRow``) naming the shard and key; a sample without an image member is refused as
``MissingImage``; a corrupt image fails at decode (``image bytes of <shard>/<key>``); the other samples go on. Each
image's SHA-256 is in the shard's digest, so resume refuses a shard whose images changed.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: Member extensions read as the sample's image (lower case, the part after the key's first dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Fields of ``{key}.json`` copied into the row.
JSON_FIELDS = ("prompts", "masks", "masks_uri", "width", "height")
FLAG_FIELDS = ("masks", "prompts", "masks_uri")


def split_member(name: str) -> tuple[str, str]:
    """``("dir/000123", "jpg")`` for ``dir/000123.jpg``: WebDataset's rule, the key ends at the basename's first
    dot."""
    folder, base = posixpath.split(name)
    key, _, ext = base.partition(".")
    return posixpath.join(folder, key) if folder else key, ext.lower()


def _samples(f, offset: int | None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield ``(header offset of its first member, key, {extension: bytes})`` per sample, in order, from byte
    ``offset`` (a member header) or the start."""
    base = 0
    if offset is not None:
        f.seek(offset)
        base = offset
    current: tuple[int, str, dict[str, bytes]] | None = None
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if current is None or key != current[1]:
                if current is not None:
                    yield current
                current = (base + member.offset, key, {})
            data = tar.extractfile(member)
            current[2][ext] = data.read() if data is not None else b""
    if current is not None:
        yield current


def count_tar(f, shard_rows: int) -> tuple[int, list[int], dict[str, bool]]:
    """``(samples, offsets of samples 0, k, 2k…, flags)`` of one tar (``flags``: whether some sample's JSON sets
    ``masks``/``prompts``/``masks_uri``).

    Raises:
        tarfile.ReadError: the file is not a tar archive (the caller names the file)."""
    rows, offsets = 0, []
    flags = dict.fromkeys(FLAG_FIELDS, False)
    for offset, _, members in _samples(f, None):
        if rows % shard_rows == 0:
            offsets.append(offset)
        rows += 1
        meta = members.get("json")
        if meta is not None and not all(flags.values()):
            try:
                obj = json.loads(meta)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                for c in FLAG_FIELDS:
                    flags[c] = flags[c] or obj.get(c) not in (None, "", [])
    return rows, offsets, flags


def shard_name(rel: str, uri: str) -> str:
    """The ``image_id`` prefix of a tar's samples: its relative path (its name for a one-file manifest) without
    ``.tar``."""
    name = rel or posixpath.basename(uri.split("?", 1)[0].rstrip("/"))
    return name[: -len(".tar")] if name.lower().endswith(".tar") else name


def tar_records(f, offset: int | None, skip: int, rows: int, prefix: str) -> Iterator[tuple[Any, Any, bytes | None]]:
    """Yield ``(row dict or exception, raw, image bytes)`` for ``rows`` samples after skipping ``skip`` from
    ``offset``; ``None`` once the archive ends early (the caller reports a changed file)."""
    samples = _samples(f, offset)
    for _ in range(skip):
        next(samples, None)
    for _ in range(rows):
        got = next(samples, None)
        if got is None:
            yield None
            return
        _, key, members = got
        image_id = f"{prefix}/{key}"
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members and members[e]), None)
        row: dict[str, Any] = {"image_id": image_id, "image_uri": None}
        raw = json.dumps({"image_id": image_id, "members": sorted(members)})
        meta = members.get("json")
        if meta is not None:
            try:
                obj = json.loads(meta)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as e:
                yield ValueError(f"sample {image_id}: {key}.json is not valid JSON ({e})"), raw, image
                continue
            row.update({c: obj[c] for c in JSON_FIELDS if c in obj})
        yield row, raw, image


__all__ = ["IMAGE_EXTENSIONS", "count_tar", "shard_name", "split_member", "tar_records"]
