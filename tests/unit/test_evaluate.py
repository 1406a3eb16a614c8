"""Evaluation metrics on hand-made cases (the end-to-end quality test is tests/test_quality.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipmaps.jobs.evaluate import Confusion, centre_prior, pointing, vocabulary_lut
from clipmaps.jobs.synth.scenes import CLASSES
from clipmaps.jobs.synth.truth import Truth


def _truth() -> Truth:
    inst = np.zeros((10, 20), np.uint8)
    inst[2:6, 2:6] = 1  # red circle
    inst[4:8, 12:18] = 2  # blue square
    return Truth(inst, ["red circle", "blue square"], ["red-circle", "blue-square"])


def test_a_perfect_label_map_scores_one_and_a_transposed_one_does_not():
    t = _truth().classes()
    perfect = Confusion()
    perfect.add(t, t)
    assert perfect.miou() == 1.0 and perfect.fg_iou() == 1.0
    flipped = Confusion()
    flipped.add(t, t[:, ::-1])
    assert flipped.miou() < 0.5 and flipped.fg_iou() < 0.5


def test_miou_counts_each_truth_class_once():
    t = _truth().classes()
    pred = t.copy()
    pred[t == CLASSES.index("blue square") + 1] = 0  # misses the square entirely
    c = Confusion()
    c.add(t, pred)
    # background IoU = 160 / (160 + 24), red circle 1, blue square 0
    assert c.miou() == pytest.approx((160 / 184 + 1 + 0) / 3)
    assert c.fg_iou() == pytest.approx(16 / 40)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="shape"):
        Confusion().add(np.zeros((4, 4), int), np.zeros((4, 5), int))


def test_pointing_hits_misses_and_binding_errors():
    truth = _truth()
    heat = np.zeros((10, 20), np.float32)
    heat[3, 3] = 1
    assert pointing(truth, "red circle", heat) == (True, False)
    assert pointing(truth, "blue square", heat) == (False, True)  # on the other object
    heat2 = np.zeros((5, 10), np.float32)  # a heatmap at half size is compared at its own size
    heat2[3, 7] = 1
    assert pointing(truth, "blue square", heat2) == (True, False)
    assert pointing(truth, "green triangle", heat) is None  # not in the image: not scored


def test_centre_prior_covers_the_asked_share():
    assert centre_prior((240, 320), 0.2).mean() == pytest.approx(0.2, abs=0.01)


def test_vocabulary_lut_maps_background_and_unknown_names():
    vocab = pa.Table.from_pylist(
        [
            {"vocabulary_id": "v", "class_index": 1, "name": "blue square", "is_background": False, "templates": []},
            {"vocabulary_id": "v", "class_index": 2, "name": "zebra", "is_background": False, "templates": []},
            {"vocabulary_id": "v", "class_index": 3, "name": "background", "is_background": True, "templates": []},
        ]
    )
    lut = vocabulary_lut(vocab)["v"]
    assert lut.tolist() == [0, CLASSES.index("blue square") + 1, -1, 0]
