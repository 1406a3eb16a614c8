"""``clipmaps manifest {coco,sa1b,folder} … -o OUT``: runs an adapter of :mod:`clipmaps.jobs.manifest` and writes the
manifest, with a one-line summary and the adapter's warnings."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from clipmaps.schemas.batches import MASKS_URI
from clipmaps.schemas.errors import ManifestError
from clipmaps.schemas.storage import redact_text, redact_uri

from .manifest import AnnotationReport, from_coco, from_folder, from_sa1b, write_manifest


def _storage_options(values: list[str] | None) -> dict:
    out: dict[str, Any] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ManifestError(f"--storage-option needs KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_manifest_cli(args: argparse.Namespace) -> int:
    """Run ``clipmaps manifest …`` from parsed arguments; prints a one-line summary, then one line per kind of
    annotation problem found (:class:`AnnotationReport`). Returns the exit code."""
    from .cli import printer

    so: dict = {}
    ids = AnnotationReport()
    try:
        so = _storage_options(args.storage_option)
        if args.source == "coco":
            table = from_coco(args.instances_json, args.images_root, storage_options=so, report=ids)
        elif args.source == "sa1b":
            inline = bool(getattr(args, "inline_masks", False))
            table = from_sa1b(args.json, storage_options=so, report=ids, inline_masks=inline)
        else:
            table = from_folder(
                args.path,
                mask_pattern=args.mask_pattern,
                recursive=args.recursive,
                storage_options=so,
                mask_folders=getattr(args, "mask_folders", None),
            )
        write_manifest(table, args.output, storage_options=so)
    except (ManifestError, ValueError, OSError) as e:
        uris = [getattr(args, a, None) for a in ("instances_json", "images_root", "json", "path", "output")]
        print(f"clipmaps manifest: error: {redact_text(str(e), storage_options=so, uris=uris)}", file=sys.stderr)
        return 2
    n_masks = sum(len(m) for m in table["masks"].to_pylist() if m)
    refs = table[MASKS_URI].null_count if MASKS_URI in table.column_names else table.num_rows
    refs = table.num_rows - refs
    if args.source == "sa1b" and refs:  # the adapter read each JSON: it knows their masks without holding them
        n_masks = ids.masks
    counted = f"{n_masks} masks" if args.source != "folder" or not refs else "masks in folders"
    by_ref = f" ({refs} image(s) with masks by reference, masks_uri)" if refs else ""
    say = printer(args)
    say(f"clipmaps manifest: {table.num_rows} images, {counted}{by_ref} -> {redact_uri(args.output)}")
    for line in ids.lines():
        say(f"clipmaps manifest: warning: {line}")
    return 0


__all__ = ["run_manifest_cli"]
