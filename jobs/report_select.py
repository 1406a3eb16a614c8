"""Which images a report shows: a random sample, or the ones a reviewer looks for first.

``clipmaps report OUTPUT --select KIND`` (``--sample N`` images at most):

=====================  =============================================================================================
``random`` (default)   ``N`` images drawn with ``--seed`` from every image of the job.
``errors``             images with at least one error row (any stage or method), most error rows first.
``class:NAME``         images whose label maps contain class ``NAME`` (a ``vocabulary/`` name), largest share of
                       the image first; scans the label maps (decodes each PNG once).
``high-loss``          images holding MaskInversion's worst regions (highest final loss) first: the regions whose
                       embedding matches its mask least.
``low-confidence``     images whose label maps are least confident first (mean of the ``confidence`` column, the
                       winning class's probability); only for outputs whose label maps carry it.
=====================  =============================================================================================

Ties are broken by ``image_id``; the result is sorted by rank, not by id, so the page shows the worst first. Each
selector reads only the columns it needs, batch by batch, and keeps at most one number per image.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from clipmaps.schemas.encodings import decode_label_map
from clipmaps.schemas.errors import ConfigError

#: The ``--select`` kinds (``class:NAME`` takes a name).
KINDS = ("random", "errors", "class:NAME", "high-loss", "low-confidence")
READ_ROWS = 256


class SelectionError(ConfigError):
    """A selection that cannot be made on this output (unknown kind, unknown class, a column it lacks)."""


def select_images(
    how: str,
    *,
    ids: Sequence[str],
    datasets: dict[str, pads.Dataset | None],
    vocabularies: dict[str, dict],
    sample: int,
    seed: int = 0,
) -> tuple[list[str], str]:
    """The ``image_id`` s to show, in display order, and a phrase saying how they were chosen.

    Args:
        how: one of :data:`KINDS` (``class:NAME`` with a class name).
        ids: every image of the job (the ``random`` population).
        datasets: the output's datasets by name (``None`` where missing).
        vocabularies: ``vocabulary_id → {"classes": {label: name}, …}`` (``clipmaps.jobs.report.vocabularies``).
        sample: at most this many images.
        seed: the ``random`` draw's seed.

    Raises:
        SelectionError: an unknown kind, a class no vocabulary names, or an output without what the kind reads.
    """
    if how == "random":
        return sorted(random.Random(seed).sample(list(ids), min(sample, len(ids)))), "drawn at random"
    if how == "errors":
        counts = _count(datasets.get("errors"))
        return _top(counts.items(), sample), "with error rows, most first"
    if how.startswith("class:"):
        name = how.partition(":")[2]
        return _top(_class_shares(datasets.get("labels"), vocabularies, name).items(), sample), (
            f"showing class {name!r}, largest share first"
        )
    if how == "high-loss":
        return _top(_max_by_image(datasets.get("regions"), "loss", "regions", "loss").items(), sample), (
            "holding the regions of highest MaskInversion loss first"
        )
    if how == "low-confidence":
        means = _mean_confidence(datasets.get("labels"))
        return _top(((k, -v) for k, v in means.items()), sample), "least confident label maps first"
    raise SelectionError(f"--select {how!r}: expected one of {', '.join(KINDS)}")


def _top(scores: Iterable[tuple[str, float]], n: int) -> list[str]:
    """The ``n`` ids of highest score (ties by id), highest first."""
    return [k for k, _ in heapq.nsmallest(n, scores, key=lambda kv: (-kv[1], kv[0]))]


def _need(ds: pads.Dataset | None, dataset: str, column: str) -> pads.Dataset:
    if ds is None or column not in ds.schema.names:
        raise SelectionError(f"this output's {dataset}/ dataset has no {column!r} column to select by")
    return ds


def _count(ds: pads.Dataset | None) -> Counter:
    out: Counter = Counter()
    if ds is None:
        return out
    for batch in ds.to_batches(columns=["image_id"], batch_size=65_536):
        out.update(v for v in batch.column(0).to_pylist() if v is not None)
    return out


def _max_by_image(ds: pads.Dataset | None, column: str, dataset: str, what: str) -> dict[str, float]:
    ds = _need(ds, dataset, column)
    out: dict[str, float] = {}
    for batch in ds.to_batches(columns=["image_id", column], batch_size=65_536):
        for image_id, v in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            if v is not None and (image_id not in out or v > out[image_id]):
                out[image_id] = float(v)
    return out


def _class_shares(ds: pads.Dataset | None, vocabularies: dict[str, dict], name: str) -> dict[str, float]:
    """``image_id →`` the largest share of its pixels labelled ``name`` over its label maps."""
    ds = _need(ds, "labels", "label_map")
    labels = {vid: [k for k, v in vocab["classes"].items() if v == name] for vid, vocab in vocabularies.items()}
    labels = {vid: ks[0] for vid, ks in labels.items() if ks}
    if not labels:
        known = sorted({v for vocab in vocabularies.values() for v in vocab["classes"].values()})
        raise SelectionError(f"--select class:{name}: no vocabulary has that class; classes: {', '.join(known[:20])}")
    out: dict[str, float] = {}
    row_filter = pc.field("vocabulary_id").isin(list(labels))
    for batch in ds.to_batches(
        columns=["image_id", "vocabulary_id", "label_map"], filter=row_filter, batch_size=READ_ROWS
    ):
        for r in batch.to_pylist():
            share = float(np.mean(decode_label_map(r["label_map"]) == labels[r["vocabulary_id"]]))
            if share > 0 and share > out.get(r["image_id"], 0.0):
                out[r["image_id"]] = share
    return out


def _mean_confidence(ds: pads.Dataset | None) -> dict[str, float]:
    """``image_id →`` the lowest mean confidence over its label maps."""
    ds = _need(ds, "labels", "confidence")
    out: dict[str, float] = {}
    for batch in ds.to_batches(columns=["image_id", "confidence"], batch_size=READ_ROWS):
        for r in batch.to_pylist():
            if r["confidence"]:
                mean = float(decode_label_map(r["confidence"]).mean() / 255.0)
                out[r["image_id"]] = min(mean, out.get(r["image_id"], 1.0))
    if not out and ds.count_rows():  # the column exists in every output, filled only with output.label_confidence
        raise SelectionError("this output's label maps carry no confidence: run the job with output.label_confidence")
    return out


__all__ = ["KINDS", "SelectionError", "select_images"]
