"""``clipmaps report --select``: the images a reviewer looks for first, in rank order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from clipmaps.jobs.report_select import SelectionError, select_images
from clipmaps.schemas.datasets import ERRORS, LABELS
from clipmaps.schemas.encodings import encode_label_map

VOCABS = {"v": {"classes": {1: "cat", 2: "dog"}, "background": ["background"]}}


def _ds(rows: list[dict], schema: pa.Schema) -> pads.Dataset:
    return pads.dataset(pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema))


def _labels(shares: dict[str, float], confidence: dict[str, int] | None = None) -> pads.Dataset:
    rows = []
    for image_id, share in shares.items():
        m = np.zeros((10, 10), np.uint8)
        m.flat[: int(share * 100)] = 2  # "dog" pixels
        rows.append({"image_id": image_id, "method": "maskclip", "height": 10, "width": 10,
                     "label_map": encode_label_map(m), "vocabulary_id": "v"})  # fmt: skip
    for r in rows if confidence is not None else []:
        r["confidence"] = encode_label_map(np.full((10, 10), confidence[r["image_id"]], np.uint8))
    return pads.dataset(pa.Table.from_pylist([{f.name: r.get(f.name) for f in LABELS} for r in rows], schema=LABELS))


def test_each_kind_ranks_worst_or_largest_first():
    ids = [f"i{k}" for k in range(6)]
    labels = _labels(
        {"i0": 0.1, "i1": 0.5, "i2": 0.0, "i3": 0.3}, confidence={"i0": 250, "i1": 40, "i2": 90, "i3": 200}
    )
    errors = _ds(
        [{"image_id": i, "stage": "read", "error_type": "E", "message": "m"} for i in ["i4", "i5", "i5"]], ERRORS
    )
    regions = pads.dataset(
        pa.table({"image_id": ["i0", "i1", "i1", "i3"], "loss": pa.array([0.2, 0.1, 0.9, 0.5], pa.float32())})
    )
    datasets = {"labels": labels, "errors": errors, "regions": regions}
    pick = lambda how, n=3: select_images(how, ids=ids, datasets=datasets, vocabularies=VOCABS, sample=n)[0]  # noqa: E731
    assert pick("errors") == ["i5", "i4"]
    assert pick("class:dog") == ["i1", "i3", "i0"]  # i2 has no dog pixel: not shown
    assert pick("high-loss", 2) == ["i1", "i3"]
    assert pick("low-confidence", 2) == ["i1", "i2"]
    drawn = pick("random", 4)
    assert len(drawn) == 4 and set(drawn) <= set(ids)
    assert drawn == pick("random", 4)  # seeded


def test_refusals_name_what_is_missing():
    datasets = {"labels": _labels({"i0": 0.2}), "errors": None, "regions": None}
    kw = {"ids": ["i0"], "datasets": datasets, "vocabularies": VOCABS, "sample": 3}
    with pytest.raises(SelectionError, match="no vocabulary has that class; classes: cat, dog"):
        select_images("class:horse", **kw)
    with pytest.raises(SelectionError, match="carry no confidence: run the job with output.label_confidence"):
        select_images("low-confidence", **kw)
    with pytest.raises(SelectionError, match="regions/ dataset has no 'loss'"):
        select_images("high-loss", **kw)
    with pytest.raises(SelectionError, match="expected one of random, errors"):
        select_images("worst", **kw)
    assert select_images("errors", **kw)[0] == []  # no errors dataset: nothing to show, not a failure
