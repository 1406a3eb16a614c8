"""MethodActor without Ray: outputs per method, baseline maps, failure isolation, rows without masks."""

from __future__ import annotations

import numpy as np
import pytest

from clipmaps.actors.actor import ActorConfig, MethodActor
from clipmaps.actors.params import ModelSpec
from clipmaps.actors.predictors import OutputOptions, Vocabulary
from clipmaps.actors.registry import REGISTRY
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.decode.preprocess import Preprocess
from clipmaps.schemas import batches as cols
from clipmaps.schemas.encodings import decode_heatmap, decode_label_map

PRE = Preprocess(size=64)
PRE_MASKCLIP = Preprocess(size=64, mode="short_side")


def _objects(values):
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


@pytest.fixture(scope="module")
def batch():
    scenes = [make_scene(i) for i in range(3)]
    return {
        cols.IMAGE_ID: np.array(["a", "b", "c"]),
        cols.HEIGHT: np.array([240, 240, 240]),
        cols.WIDTH: np.array([320, 320, 320]),
        cols.ERROR_STAGE: _objects([None, "decode", None]),
        cols.PIXELS_SQUARE: _objects([PRE.image(s.image) for s in scenes]),
        cols.PIXELS_MASKCLIP: _objects([PRE_MASKCLIP.image(s.image) for s in scenes]),
        cols.MASKS_SQUARE: _objects(
            [
                np.stack([PRE.mask(m, (320, 240)) for m in scenes[0].masks]),
                np.zeros((0, 64, 64), np.float32),
                np.zeros((0, 64, 64), np.float32),
            ]
        ),
        cols.PROMPTS: _objects([None, None, ["red thing", "blue thing"]]),
    }


def _actor(method, write_expl_maps=False, **settings):
    entry = REGISTRY[method]
    return MethodActor(
        ActorConfig(
            method=method,
            model=ModelSpec(name="clipmaps-tiny-vit", seed=0),
            settings=entry.settings(size=64, **settings),
            templates="photo" if entry.encodes_text else None,
            vocabulary=Vocabulary(names=("cat", "dog"), background=("sky",)),
            options=OutputOptions(
                write_expl_maps=write_expl_maps, prompt_source="auto" if entry.settings().heatmaps else None
            ),
        )
    )


def _errors(out, method):
    return list(zip(out[cols.col(method, cols.ERROR_TYPE_OF)], out[cols.col(method, cols.ERROR_MESSAGE_OF)]))


def test_gem_writes_labels_heatmaps_and_the_baseline(batch):
    out = _actor("gem", original=True)(batch)
    for name in ("gem", "gem_original"):
        labels, maps = out[cols.col(name, cols.LABELS)], out[cols.col(name, cols.HEATMAPS)]
        assert labels[1] is None and maps[1] is None  # the failed row is skipped
        assert decode_label_map(labels[0]).shape == (240, 320)
        assert out[cols.col(name, cols.HEATMAP_PROMPTS)][2] == ["red thing", "blue thing"]  # the row's own prompts
        assert out[cols.col(name, cols.HEATMAP_PROMPTS)][0] == ["cat", "dog"]  # else the vocabulary
        assert decode_heatmap(maps[2][0], "png8", 240, 320).shape == (240, 320)
    assert out[cols.col("gem", cols.LABELS)][0] != out[cols.col("gem_original", cols.LABELS)][0]


def test_a_bad_row_fails_alone(batch):
    bad = dict(
        batch,
        **{
            cols.PIXELS_SQUARE: _objects(
                [batch[cols.PIXELS_SQUARE][0], np.zeros((3, 0, 0), np.float32), np.zeros((3, 60, 64), np.float32)]
            )
        },
    )
    out = _actor("legrad")(bad)
    errors = _errors(out, "legrad")
    assert errors[0] == (None, None) and errors[1] == (None, None)  # row 1 failed upstream: not this method's error
    assert errors[2][0] == "ValueError" and "multiple of the patch size" in errors[2][1]
    assert out[cols.col("legrad", cols.HEATMAPS)][0] is not None


def test_maskinversion_reports_rows_without_masks(batch):
    out = _actor("maskinversion")(batch)
    errors = _errors(out, "maskinversion")
    assert errors[0] == (None, None) and errors[2][0] == "NoMasks"
    emb = out[cols.col("maskinversion", cols.EMBEDDINGS)]
    assert emb[0].shape == (3, 32) and emb[2].shape == (0, 0)  # empty arrays, not None, for Ray's tensor columns
    np.testing.assert_allclose(np.linalg.norm(emb[0], axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "method, options",
    [("gem", {"original": True}), ("maskclip", {}), ("legrad", {}), ("maskinversion", {"write_expl_maps": True})],
)
def test_every_output_column_is_declared_and_always_written(batch, method, options):
    actor = _actor(method, **options)
    declared = set(actor.predictor.output_columns())
    error_columns = {actor.error_type, actor.error_message}
    out = actor(batch)
    assert set(out) - set(batch) - error_columns == declared
    # a column the predictor writes but the registry does not declare fails its rows loudly (KeyError)
    assert not any(isinstance(e, str) and "does not declare" in e for e in out[actor.error_message])
    assert cols.present(out[next(iter(declared))][0])  # the good row got real values, not the fill
    all_failed = dict(batch, **{cols.ERROR_STAGE: _objects(["read"] * 3)})
    assert set(actor(all_failed)) - set(batch) - error_columns == declared  # even when no row ran
    hw = actor(batch).get(cols.col(method, cols.HEATMAP_HW))
    if hw is not None:
        assert hw[1].tolist() == [0, 0] and hw[0].tolist() == [240, 320]  # zeros, never None, on a failed row
