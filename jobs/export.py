"""Exports of a finished job's outputs to the formats review and training tools read.

``clipmaps export coco OUTPUT --method maskclip -o annotations.json`` turns one method's label maps into a COCO
results/instances file (the layout of https://cocodataset.org/#format-data): ``images``, ``categories`` and one
``annotations`` entry per (image, class present in its label map) with the class's pixels as compressed RLE
(``segmentation``), ``area`` (pixels), ``bbox`` (``[x, y, width, height]``), ``iscrowd`` 0 and a ``score``.
``pycocotools.coco.COCO`` loads the file, and ``COCO.loadRes`` takes its ``annotations`` list.

Which ids:

* images: when every ``image_id`` is a decimal integer (a job made from a COCO manifest: the adapter keeps COCO's
  ids), those integers; otherwise 1, 2, … in ``image_id`` order, each image entry keeping the original under
  ``clipmaps_image_id``. ``file_name`` is the image's URI (credentials redacted).
* categories: label ``c`` of the label map is category ``c`` (label 0, background, is not exported); with
  ``categories_from`` (a COCO instances JSON, e.g. the source's), each class takes the id of the source's category
  of the same name, so results line up with the source's ground truth for ``COCOeval``.
* score: the mean over the region of the label map's ``confidence`` (the winning class's probability) when the
  labels dataset has that column; otherwise 1.0 (the label maps carry no confidence).

The file is written as it is built (images, then annotations, one label map in memory at a time), so an output of
any size exports in bounded memory; ``pycocotools`` itself then needs the whole file in memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np
import pyarrow.compute as pc

from clipmaps.schemas.encodings import decode_label_map, mask_bbox, rle_encode
from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import redact_uri

from .outputs import JobOutputs

logger = logging.getLogger(__name__)

#: Columns of ``labels/`` the export reads (``image_uri`` and ``confidence`` are used when present).
LABEL_COLUMNS = ("image_id", "method", "height", "width", "label_map", "vocabulary_id")
#: How many label-map rows are read at a time.
READ_BATCH_ROWS = 64


def export_coco(
    outputs: JobOutputs,
    method: str | None,
    out: TextIO,
    *,
    categories_from: dict | None = None,
    description: str | None = None,
) -> dict[str, int]:
    """Write ``method``'s label maps under ``outputs`` to ``out`` as a COCO JSON document.

    Args:
        outputs: the job's outputs.
        method: the ``method`` value of the label maps to export (``maskclip``, ``gem``, ``gem_original``); None:
            the only method the output has label maps of.
        out: a text stream the JSON is written to.
        categories_from: a loaded COCO instances document whose ``categories`` give the ids by name.
        description: ``info.description`` (default: names the output and method).

    Returns:
        counts: ``images``, ``annotations``, ``categories``.

    Raises:
        ConfigError: the output has no label maps of ``method`` (naming the methods it has), its vocabulary is
            missing, or a class is not among ``categories_from``'s names.
    """
    labels = outputs.dataset("labels")
    if labels is None:
        raise ConfigError(f"{outputs.shown()} has no labels/ dataset (is it a clipmaps output?)", stage="export")
    names = set(labels.schema.names)
    columns = [c for c in (*LABEL_COLUMNS, "image_uri", "confidence") if c in names]
    methods = pc.unique(labels.to_table(columns=["method"])["method"]).to_pylist()
    if method is None and len(methods) == 1:
        method = methods[0]
    if method not in methods:
        has = ", ".join(sorted(methods)) or "none"
        if method is None:
            text = f"{outputs.shown('labels')} has label maps of {has}: say which with --method"
        else:
            text = f"{outputs.shown('labels')} has no label maps of method {method!r}; it has: {has}"
            if method in ("legrad", "maskinversion"):
                text += " (LeGrad writes heatmaps and MaskInversion regions, not label maps)"
        raise ConfigError(text, stage="export")
    row_filter = pc.field("method") == method
    ids = sorted(pc.unique(labels.to_table(columns=["image_id"], filter=row_filter)["image_id"]).to_pylist())
    vocab_ids = pc.unique(labels.to_table(columns=["vocabulary_id"], filter=row_filter)["vocabulary_id"]).to_pylist()
    categories = _categories(outputs, vocab_ids, categories_from)
    coco_id = _image_ids(ids)
    uris = None if "image_uri" in names else _manifest_uris(outputs)
    if outputs.job and not (outputs.spec.get("output") or {}).get("label_confidence"):
        logger.warning(
            "every annotation's score is 1.0: the job ran without output.label_confidence, so its label maps carry "
            "no class probabilities (re-run with it for scores that rank the regions)"
        )

    out.write("{")
    info = {"description": description or f"clipmaps {method} label maps from {outputs.shown()}", "version": "1.0"}
    out.write(f'"info": {json.dumps(info)},\n"licenses": [],\n')
    out.write('"categories": ' + json.dumps(list(categories.values())) + ",\n")
    out.write('"images": [')
    first = True
    for row in _rows(labels, row_filter, [c for c in columns if c not in ("label_map", "confidence")]):
        uri = row.get("image_uri") or (uris or {}).get(row["image_id"])
        image = {
            "id": coco_id[row["image_id"]],
            "file_name": redact_uri(uri) if uri else row["image_id"],
            "height": int(row["height"]),
            "width": int(row["width"]),
        }
        if not _all_int(ids):
            image["clipmaps_image_id"] = row["image_id"]
        out.write(("" if first else ",") + "\n  " + json.dumps(image))
        first = False
    out.write("\n],\n")
    out.write('"annotations": [')
    n = 0
    for row in _rows(labels, row_filter, columns):
        for ann in _annotations(row, coco_id[row["image_id"]], categories):
            n += 1
            ann["id"] = n
            out.write(("" if n == 1 else ",") + "\n  " + json.dumps(ann))
    out.write("\n]}\n")
    counts = {"images": len(ids), "annotations": n, "categories": len(categories)}
    logger.info("exported %s", counts)
    return counts


def _rows(labels, row_filter, columns: Sequence[str]) -> Iterator[dict]:
    """The rows of ``labels`` matching ``row_filter``, as dicts, in ``image_id`` order within each batch read."""
    for batch in labels.to_batches(columns=list(columns), filter=row_filter, batch_size=READ_BATCH_ROWS):
        yield from batch.to_pylist()


def _all_int(ids: Sequence[str]) -> bool:
    return bool(ids) and all(s.isdecimal() and len(s) < 19 for s in ids)


def _image_ids(ids: Sequence[str]) -> dict[str, int]:
    """``image_id`` → the COCO image id: the id itself when every id is a decimal integer, else 1, 2, …"""
    if _all_int(ids):
        return {s: int(s) for s in ids}
    return {s: i + 1 for i, s in enumerate(ids)}


def _manifest_uris(outputs: JobOutputs) -> dict[str, str]:
    """``image_id → image_uri`` from the job's manifest, for outputs written before rows carried ``image_uri``."""
    try:
        return outputs.image_uri_map()
    except Exception as e:  # noqa: BLE001 - the file names are a convenience: the export goes on without them
        logger.warning("image URIs unavailable (%s); file_name is the image_id", e)
        return {}


def _categories(outputs: JobOutputs, vocab_ids: Sequence[str], source: dict | None) -> dict[int, dict]:
    """Label value → COCO category (``id``, ``name``, ``supercategory``); background (label 0) is left out."""
    vocabulary = outputs.table("vocabulary")
    if vocabulary is None:
        raise ConfigError(f"{outputs.shown('vocabulary')} holds no classes; cannot name categories", stage="export")
    if len(vocab_ids) > 1:
        raise ConfigError(f"label maps of one method name several vocabularies: {vocab_ids}", stage="export")
    rows = vocabulary.filter(pc.field("vocabulary_id") == vocab_ids[0]) if vocab_ids else vocabulary.slice(0, 0)
    by_name = None
    if source is not None:
        by_name = {c.get("name"): c for c in source.get("categories") or []}
    out = {}
    for r in sorted(rows.to_pylist(), key=lambda r: r["class_index"]):
        if r["is_background"]:
            continue
        category = {"id": int(r["class_index"]), "name": r["name"], "supercategory": ""}
        if by_name is not None:
            found = by_name.get(r["name"])
            if found is None:
                raise ConfigError(
                    f"class {r['name']!r} is not a category of the source file (its names: "
                    f"{', '.join(sorted(map(str, by_name))[:10])}…)",
                    stage="export",
                )
            category = {"id": int(found["id"]), "name": r["name"], "supercategory": found.get("supercategory", "")}
        out[int(r["class_index"])] = category
    return out


def _annotations(row: dict, image_id: int, categories: dict[int, dict]) -> Iterator[dict[str, Any]]:
    """One COCO annotation per class present in the row's label map (background left out)."""
    labels = decode_label_map(row["label_map"])
    confidence = row.get("confidence")
    conf = decode_label_map(confidence).astype(np.float32) / 255.0 if confidence else None
    for value in np.unique(labels):
        category = categories.get(int(value))
        if category is None:  # background, or a label the vocabulary does not name (never written by clipmaps)
            continue
        mask = labels == value
        area = int(mask.sum())
        x, y, w, h = mask_bbox(mask)
        score = float(conf[mask].mean()) if conf is not None else 1.0
        yield {
            "image_id": image_id,
            "category_id": category["id"],
            "segmentation": rle_encode(mask),
            "area": area,
            "bbox": [float(x), float(y), float(w), float(h)],
            "iscrowd": 0,
            "score": round(score, 6),
        }


def run_export_cli(args) -> int:
    """``clipmaps export coco``: exit 0 written, 2 the output cannot be exported as asked."""
    import os
    import sys

    from clipmaps.schemas.storage import filesystem

    from .cli import printer
    from .outputs import parse_storage_options

    outputs = JobOutputs(args.output, parse_storage_options(args.storage_option))
    source = None
    try:
        if args.categories_from:
            fs, path = filesystem(args.categories_from, {})
            with fs.open(path, "rb") as f:
                source = json.loads(f.read())
        # written under a temporary name and renamed: a failed export leaves no half file that looks finished
        tmp = f"{args.out}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                counts = export_coco(outputs, args.method, f, categories_from=source)
            os.replace(tmp, args.out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except ConfigError as e:
        print(f"clipmaps export: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"clipmaps export: {redact_uri(str(e))}", file=sys.stderr)
        return 2
    printer(args)(
        f"wrote {args.out}: {counts['images']} images, {counts['annotations']} annotations, "
        f"{counts['categories']} categories"
    )
    return 0


__all__ = ["export_coco", "run_export_cli"]
