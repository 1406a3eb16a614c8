"""Manifest adapters behind ``clipmaps manifest {coco,sa1b,folder} … -o OUT`` (the command itself:
:mod:`clipmaps.jobs.manifest_cli`).

Each adapter returns a ``pa.Table`` in the ``MANIFEST`` schema (``schemas.datasets``); :func:`write_manifest`
writes it as Parquet (``.parquet``), JSONL (``.jsonl``/``.ndjson``) or CSV (``.csv``), readable back with
``pipeline.sources.read_manifest_table``. Adapters read whole annotation files / listings on the driver: they are
for preparing a manifest once, not for the job's hot path.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from clipmaps.pipeline.sources import compress_rle_counts, manifest_from_rows
from clipmaps.schemas.batches import MASKS_URI
from clipmaps.schemas.datasets import MANIFEST
from clipmaps.schemas.encodings import polygon_part_problem
from clipmaps.schemas.errors import ManifestError
from clipmaps.schemas.storage import (
    GLOB_CHARACTERS,
    exists,
    filesystem,
    has_glob_characters,
    join_uri,
    redact_uri,
)

log = logging.getLogger(__name__)

#: Image file extensions the folder adapter lists (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _finish(rows: Iterable[dict]) -> pa.Table:
    """Adapter rows → a table in the manifest schema; ``masks_uri`` (masks by reference) is carried beside the rows
    and joined as a string column (present when the schema declares it or some row has one)."""
    refs: list[str | None] = []

    def without_refs() -> Iterable[dict]:
        for r in rows:
            refs.append(r.pop(MASKS_URI, None))
            yield r

    table = manifest_from_rows(without_refs())
    if MASKS_URI in table.column_names:
        table = table.drop_columns([MASKS_URI])
    schema = MANIFEST
    if MASKS_URI not in MANIFEST.names and any(r is not None for r in refs):
        schema = pa.schema([*MANIFEST, pa.field(MASKS_URI, pa.string())])
    if MASKS_URI in schema.names:
        table = table.append_column(MASKS_URI, pa.array(refs, pa.string()))
    return table.select(schema.names).cast(schema)


def _load_json(uri: str, storage_options: dict | None) -> Any:
    try:
        with fsspec.open(uri, "rt", compression="infer", encoding="utf-8", **(storage_options or {})) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"{redact_uri(uri)}: file not found") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{redact_uri(uri)}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _segmentation_to_mask(seg: Any, region_id: str | None, where: str) -> dict:
    """A COCO ``segmentation`` (polygons, compressed or uncompressed RLE) → a ``MASK`` dict.

    Polygon parts are copied as they are, degenerate ones included: the decode stage drops those with a warning
    naming the region and the part (as pycocotools and detectron2 skip them) and fails the region only when no part
    is usable. Uncompressed (``iscrowd``) counts are converted to COCO's compressed string.

    Raises:
        ManifestError: a segmentation that is neither, or values of the wrong type, naming ``where``.
    """
    if isinstance(seg, list):  # polygons, original coordinates; several lists = a multi-part object
        if seg and all(_is_number(v) for v in seg):
            seg = [seg]  # one flat polygon, as some exporters write
        if not all(isinstance(p, list) and all(_is_number(v) for v in p) for p in seg):
            raise ManifestError(f"{where}: polygon segmentation must be lists of numbers, got {str(seg)[:80]!r}")
        return {"region_id": region_id, "polygon": [[float(v) for v in poly] for poly in seg]}
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        counts, size = seg["counts"], seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise ManifestError(f"{where}: RLE 'size' must be [height, width] integers, got {str(size)[:40]!r}")
        if isinstance(counts, list):  # uncompressed (iscrowd) → COCO's compressed string
            if not all(_is_int(c) for c in counts):
                raise ManifestError(f"{where}: uncompressed RLE 'counts' must be integers")
            counts = compress_rle_counts(counts)
        elif isinstance(counts, bytes):
            counts = counts.decode("ascii")
        elif not isinstance(counts, str):
            raise ManifestError(f"{where}: RLE 'counts' must be a string or a list of integers")
        return {"region_id": region_id, "rle": {"size": [int(s) for s in size], "counts": counts}}
    raise ManifestError(f"{where}: unrecognised segmentation {str(seg)[:80]!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class AnnotationReport:
    """What an adapter found wrong with annotation ids (``region_id`` in the manifest) and polygon parts, for its
    summary.

    Ids are never renumbered: a repeated id stays on every mask that has it (the decode stage keeps the first mask
    of an image with that id and reports each later one as a ``DuplicateRegionId`` error row with the id), and an
    annotation without an id gets a null ``region_id``, which the decode stage replaces by the mask's position in
    the image's list (``"0"``, ``"1"``…).

    Attributes:
        duplicates: number of annotations whose id an earlier annotation of the same image already has.
        duplicate_examples: up to :attr:`MAX_EXAMPLES` ``(image_id, annotation_id)`` of those.
        missing: number of annotations without an ``id``.
        missing_examples: up to :attr:`MAX_EXAMPLES` ``(image_id, position in the image's masks)``.
        masks: number of masks seen (inline or by reference).
        degenerate_parts: number of polygon parts the job will drop (``schemas.encodings.polygon_part_problem``;
            they stay in the manifest, so what the job does with them is decided in one place).
        degenerate_examples: up to :attr:`MAX_EXAMPLES` ``(image_id, region_id, part index, reason)``.
    """

    MAX_EXAMPLES: ClassVar[int] = 5
    duplicates: int = 0
    duplicate_examples: list[tuple[str, str]] = field(default_factory=list)
    missing: int = 0
    missing_examples: list[tuple[str, int]] = field(default_factory=list)
    degenerate_parts: int = 0
    degenerate_examples: list[tuple[str, str | None, int, str]] = field(default_factory=list)
    masks: int = 0

    def add_image(self, image_id: str, masks: list[dict]) -> None:
        """Count one image's masks (``MASK`` dicts, in order), the clashes and missing ids among them, and their
        degenerate polygon parts."""
        self.masks += len(masks)
        seen: set[str] = set()
        for m in masks:
            for part, poly in enumerate(m.get("polygon") or []):
                why = polygon_part_problem(poly)
                if why is not None:
                    self.degenerate_parts += 1
                    if len(self.degenerate_examples) < self.MAX_EXAMPLES:
                        self.degenerate_examples.append((image_id, m.get("region_id"), part, why))
        for k, rid in enumerate(m.get("region_id") for m in masks):
            if rid is None:
                self.missing += 1
                if len(self.missing_examples) < self.MAX_EXAMPLES:
                    self.missing_examples.append((image_id, k))
            elif rid in seen:
                self.duplicates += 1
                if len(self.duplicate_examples) < self.MAX_EXAMPLES:
                    self.duplicate_examples.append((image_id, rid))
            else:
                seen.add(rid)

    def lines(self) -> list[str]:
        """Human-readable summary lines (none when every id is present and unique within its image)."""
        out = []
        if self.duplicates:
            shown = ", ".join(f"image {i} annotation {a}" for i, a in self.duplicate_examples)
            more = ", …" if self.duplicates > len(self.duplicate_examples) else ""
            out.append(
                f"{self.duplicates} annotation(s) repeat an id already used in their image (kept as they are; each "
                f"later one becomes a DuplicateRegionId error row when the job runs): {shown}{more}"
            )
        if self.missing:
            shown = ", ".join(f"image {i} mask {k}" for i, k in self.missing_examples)
            more = ", …" if self.missing > len(self.missing_examples) else ""
            out.append(
                f"{self.missing} annotation(s) have no id (region_id left empty: the job names such a region by its "
                f"position in the image's masks): {shown}{more}"
            )
        if self.degenerate_parts:
            shown = ", ".join(f"image {i} annotation {a} part {k} ({why})" for i, a, k, why in self.degenerate_examples)
            more = ", …" if self.degenerate_parts > len(self.degenerate_examples) else ""
            out.append(
                f"{self.degenerate_parts} polygon part(s) are degenerate and will be dropped when the job runs (the "
                f"annotation keeps its other parts; one with none left becomes a MalformedPolygon error row): "
                f"{shown}{more}"
            )
        return out


def _region_id(ann: dict) -> str | None:
    rid = ann.get("id")
    return None if rid is None or rid == "" else str(rid)


# ---------------------------------------------------------------------------------------------- COCO
def from_coco(
    instances_json_uri: str,
    images_root_uri: str,
    *,
    storage_options: dict | None = None,
    report: AnnotationReport | None = None,
) -> pa.Table:
    """COCO instances JSON → manifest: one row per entry of ``images`` (in file order, also without annotations),
    its annotations as masks (``region_id`` = annotation id; polygons kept in original coordinates; RLE counts as
    COCO's compressed string, uncompressed crowd RLE converted). ``image_uri`` = ``images_root_uri``/``file_name``;
    ``width``/``height`` = the image's declared size (the frame its polygons are drawn in; null when absent), which
    the decode stage compares with the image as decoded (``pipeline.decode.masks``).

    Annotation ids are kept as they are (see :class:`AnnotationReport`): repeated ids within an image and annotations
    without an id are counted into ``report`` when given, and logged as a warning.

    Raises:
        ManifestError: unreadable file, not a COCO instances file, an unrecognised segmentation (naming the
            annotation), a ``width``/``height`` that is not an integer.
    """
    data = _load_json(instances_json_uri, storage_options)
    shown = redact_uri(instances_json_uri)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ManifestError(f"{shown}: not a COCO instances file (no 'images' list)")
    by_image: dict[Any, list[dict]] = {}
    for ann in data.get("annotations") or []:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    known = {img.get("id") for img in data["images"]}
    orphans = sum(len(v) for k, v in by_image.items() if k not in known)
    if orphans:
        log.warning("%s: %d annotation(s) refer to images not in 'images'; skipped", shown, orphans)
    ids = report if report is not None else AnnotationReport()

    def rows():
        for img in data["images"]:
            masks = []
            for ann in by_image.get(img.get("id"), []):
                seg = ann.get("segmentation")
                if seg is None or seg == []:
                    log.warning("%s: annotation %s has no segmentation; skipped", shown, ann.get("id"))
                    continue
                where = f"{shown} image {img.get('id')} annotation {ann.get('id')}"
                masks.append(_segmentation_to_mask(seg, _region_id(ann), where))
            ids.add_image(str(img["id"]), masks)
            yield {
                "image_id": str(img["id"]),
                "image_uri": join_uri(images_root_uri, img["file_name"]),
                "masks": masks,
                "width": img.get("width"),
                "height": img.get("height"),
            }

    table = _finish(rows())
    for line in ids.lines():
        log.warning("%s: %s", shown, line)
    return table


# ---------------------------------------------------------------------------------------------- SA-1B
def _expand(uris: str | Sequence[str], storage_options: dict | None) -> list[str]:
    """URIs and globs → a sorted list of URIs (globs expanded with fsspec, keeping each URI's scheme). A URI that
    exists as written is taken literally even when it holds glob characters (``scans[1]/a.json``)."""
    if isinstance(uris, str):
        uris = [uris]
    out: list[str] = []
    for uri in uris:
        if has_glob_characters(uri):
            fs, path = filesystem(uri, storage_options)
            out.extend([uri] if exists(fs, path) else (_full_uri(fs, p) for p in sorted(fs.glob(path))))
        else:
            out.append(uri)
    return out


def _full_uri(fs, path: str) -> str:
    """A path from ``fs`` back to a URI: plain absolute path for local files, ``scheme://…`` otherwise."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    return fs.unstrip_protocol(path)


def from_sa1b(
    json_uris: str | Sequence[str],
    *,
    storage_options: dict | None = None,
    report: AnnotationReport | None = None,
    inline_masks: bool = False,
) -> pa.Table:
    """SA-1B per-image JSON files (URIs or globs, e.g. ``s3://sa1b/sa_000000/*.json``) → manifest.

    Each file is ``{"image": {"image_id", "file_name", …}, "annotations": [{"id", "segmentation": {"size",
    "counts"}}, …]}``; the image lies next to its JSON (same folder, ``file_name``). By default a row points to its
    masks (``masks_uri`` = the JSON's URI, read by the decode stage on the worker: ``pipeline.decode.mask_refs``),
    so the manifest holds no RLE and stays small; ``inline_masks`` copies every annotation into ``masks`` instead.
    ``region_id`` = annotation id, kept as it is; clashes and missing ids are counted into ``report`` as
    :func:`from_coco` does. ``width``/``height`` = ``image.width``/``image.height`` (null when absent).

    Raises:
        ManifestError: no file matches, a file is unreadable or not SA-1B, or (inline) an unrecognised segmentation.
    """
    uris = _expand(json_uris, storage_options)
    if not uris:
        raise ManifestError(f"no SA-1B JSON files match {json_uris!r}")
    ids = report if report is not None else AnnotationReport()

    def rows():
        for uri in uris:
            data = _load_json(uri, storage_options)
            shown = redact_uri(uri)
            image = data.get("image") if isinstance(data, dict) else None
            if not isinstance(image, dict) or "file_name" not in image:
                raise ManifestError(f"{shown}: not an SA-1B file (no 'image' with 'file_name')")
            image_id = image.get("image_id", posixpath.splitext(image["file_name"])[0])
            folder = uri.rsplit("/", 1)[0] if "/" in uri else ""
            masks = []
            for ann in data.get("annotations") or []:
                rid = _region_id(ann)
                if inline_masks:
                    masks.append(_segmentation_to_mask(ann.get("segmentation"), rid, f"{shown} annotation {rid}"))
                else:  # checked when the job decodes it; here only what the id report needs
                    seg = ann.get("segmentation")
                    masks.append({"region_id": rid, "polygon": seg if isinstance(seg, list) else None})
            ids.add_image(str(image_id), masks)
            yield {
                "image_id": str(image_id),
                "image_uri": join_uri(folder, image["file_name"]),
                "masks": masks if inline_masks else None,
                MASKS_URI: None if inline_masks else uri,
                "width": image.get("width"),
                "height": image.get("height"),
            }

    table = _finish(rows())
    for line in ids.lines():
        log.warning("SA-1B files %s: %s", redact_uri(str(json_uris)), line)
    return table


# ---------------------------------------------------------------------------------------------- folder
def _mask_regex(mask_pattern: str) -> re.Pattern:
    """``"{stem}_mask_*.png"`` → a regex with groups ``stem`` and ``rid`` over a file's base name."""
    if mask_pattern.count("{stem}") != 1 or mask_pattern.count("*") != 1:
        raise ValueError(f"mask_pattern needs exactly one {{stem}} and one *, got {mask_pattern!r}")
    out = ""
    for part in re.split(r"(\{stem\}|\*)", mask_pattern):
        out += "(?P<stem>.+?)" if part == "{stem}" else "(?P<rid>[^/]+?)" if part == "*" else re.escape(part)
    return re.compile(out + "$", re.IGNORECASE)


def _natural_key(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def from_folder(
    glob_or_dir: str,
    *,
    mask_pattern: str = "{stem}_mask_*.png",
    recursive: bool = False,
    storage_options: dict | None = None,
    mask_folders: str | None = None,
) -> pa.Table:
    """A folder or glob of images (local or any fsspec URI, e.g. ``s3://bucket/photos/*.jpg``) → manifest.

    This adapter lists files, so it is meant for small and medium folders (up to some hundred thousand files);
    for larger collections write a manifest from an existing index instead.

    Images are the files with an extension in :data:`IMAGE_EXTENSIONS`; a directory means its files (all levels
    below with ``recursive``). Per-instance masks follow ``mask_pattern`` in the image's folder: with the default,
    ``cat.jpg`` has masks ``cat_mask_0.png``, ``cat_mask_1.png`` (``region_id`` = the part matched by ``*``,
    naturally sorted). Files matching the mask pattern are never listed as images. ``image_id`` = the path
    relative to the folder (or the glob's fixed prefix), extension included, so ``a/cat.jpg`` and ``cat.png``
    stay distinct.

    With ``mask_folders`` (a path relative to the image's folder holding ``{stem}``, e.g. ``"{stem}/"`` or
    ``"masks/{stem}/"``) an image's masks are instead the PNGs of that folder, written by reference (``masks_uri`` =
    the folder's URI, ending in ``/``; the decode stage lists and reads it on the worker: one mask per PNG,
    ``region_id`` = its stem, in name order); an image without such a folder gets no masks. Files inside mask
    folders are never listed as images.

    Raises:
        ManifestError: no such folder or file, or no image found.
        ValueError: a ``mask_pattern`` without exactly one ``{stem}`` and one ``*``, or a ``mask_folders`` without
            ``{stem}``.
    """
    so = storage_options or {}
    regex = _mask_regex(mask_pattern)
    if mask_folders is not None and mask_folders.count("{stem}") != 1:
        raise ValueError(f"mask_folders needs exactly one {{stem}}, got {mask_folders!r}")
    fs, path = filesystem(glob_or_dir, so)
    if has_glob_characters(path) and not exists(fs, path):  # a literal existing path wins over a pattern
        root = path[: min(path.find(c) for c in GLOB_CHARACTERS if c in path)].rsplit("/", 1)[0]
        files = [p for p in fs.glob(path) if not fs.isdir(p)]
    elif fs.isdir(path):
        root = path.rstrip("/")
        files = fs.find(root) if recursive else [p for p in fs.ls(root, detail=False) if not fs.isdir(p)]
    elif fs.exists(path):
        root, files = path.rsplit("/", 1)[0], [path]
    else:
        raise ManifestError(f"{redact_uri(glob_or_dir)}: no such folder or file")

    listings: dict[str, list[str]] = {}

    def folder_files(folder: str) -> list[str]:
        if folder not in listings:
            listings[folder] = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
        return listings[folder]

    def mask_folder(p: str) -> str:
        """The folder of image ``p``'s masks with ``mask_folders`` (a path in ``fs``, no trailing slash)."""
        folder, name = p.rsplit("/", 1)
        return posixpath.normpath(f"{folder}/{mask_folders.format(stem=name.rsplit('.', 1)[0])}")

    images = []
    for p in sorted(files):
        name = p.rsplit("/", 1)[-1]
        if not name.lower().endswith(IMAGE_EXTENSIONS) or (mask_folders is None and regex.match(name)):
            continue
        images.append(p)
    if mask_folders is not None:  # a mask PNG inside an image's mask folder is not an image
        folders = {mask_folder(p) for p in images}
        images = [p for p in images if p.rsplit("/", 1)[0] not in folders]
    if not images:
        raise ManifestError(f"{redact_uri(glob_or_dir)}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    def has_folder(folder: str) -> bool:
        parent, leaf = folder.rsplit("/", 1)
        if parent not in listings:
            listings[parent] = (
                [q.rstrip("/").rsplit("/", 1)[-1] for q in fs.ls(parent, detail=False)] if fs.isdir(parent) else []
            )
        return leaf in listings[parent]

    def rows():
        for p in images:
            folder, name = p.rsplit("/", 1)
            stem = name.rsplit(".", 1)[0]
            rel = p[len(root) + 1 :] if root and p.startswith(root + "/") else name
            if mask_folders is not None:
                masks_folder = mask_folder(p)
                ref = _full_uri(fs, masks_folder) + "/" if has_folder(masks_folder) else None
                yield {"image_id": rel, "image_uri": _full_uri(fs, p), "masks": None, MASKS_URI: ref}
                continue
            masks = []
            for other in folder_files(folder):
                m = regex.match(other)
                if m and m.group("stem") == stem:
                    masks.append((m.group("rid"), _full_uri(fs, folder + "/" + other)))
            masks.sort(key=lambda rm: _natural_key(rm[0]))
            yield {
                "image_id": rel,
                "image_uri": _full_uri(fs, p),
                "masks": [{"region_id": rid, "uri": uri} for rid, uri in masks],
            }

    return _finish(rows())


# ---------------------------------------------------------------------------------------------- writing
#: Rows per Parquet row group of a written manifest: a job's read task decodes the row groups its shard's rows lie
#: in, so groups near the default ``output.shard_rows`` (1,000) keep each read to about its own rows.
MANIFEST_ROW_GROUP_ROWS = 1024


def write_manifest(table: pa.Table, uri: str, storage_options: dict | None = None) -> None:
    """Write a manifest table: Parquet (``.parquet``/``.pq``, row groups of :data:`MANIFEST_ROW_GROUP_ROWS`), JSONL
    (``.jsonl``/``.ndjson``; null fields omitted) or CSV (``.csv``; ``masks`` and ``prompts`` as JSON strings)."""
    so = storage_options or {}
    lower = uri.lower()
    if lower.endswith((".parquet", ".pq")):
        with fsspec.open(uri, "wb", **so) as f:
            pq.write_table(table, f, row_group_size=MANIFEST_ROW_GROUP_ROWS)
        return
    if lower.endswith((".jsonl", ".ndjson", ".csv")):
        csv_out = lower.endswith(".csv")
        with fsspec.open(uri, "wt", encoding="utf-8", newline="", **so) as f:
            if csv_out:
                import csv

                writer = csv.writer(f)
                writer.writerow(table.column_names)
            for batch in table.to_batches(max_chunksize=8192):
                for row in batch.to_pylist():
                    row = {k: _drop_nulls(v) for k, v in row.items()}
                    if csv_out:
                        writer.writerow(
                            ["" if v is None else json.dumps(v) if isinstance(v, list) else v for v in row.values()]
                        )
                    else:
                        f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        return
    raise ManifestError(f"cannot write manifest {redact_uri(uri)}: use a .parquet, .jsonl, .ndjson or .csv name")


def _drop_nulls(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_nulls(x) for x in v]
    return v


__all__ = [
    "IMAGE_EXTENSIONS",
    "AnnotationReport",
    "from_coco",
    "from_folder",
    "from_sa1b",
    "write_manifest",
]
