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


def _actor(method, write_expl_maps=False, label_confidence=False, **settings):
    entry = REGISTRY[method]
    return MethodActor(
        ActorConfig(
            method=method,
            model=ModelSpec(name="clipmaps-tiny-vit", seed=0),
            settings=entry.settings(size=64, **settings),
            templates="photo" if entry.encodes_text else None,
            vocabulary=Vocabulary(names=("cat", "dog"), background=("sky",)),
            options=OutputOptions(
                write_expl_maps=write_expl_maps,
                prompt_source="auto" if entry.settings().heatmaps else None,
                label_confidence=label_confidence,
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
    [
        ("gem", {"original": True}),
        ("gem", {"label_confidence": True}),
        ("maskclip", {}),
        ("maskclip", {"label_confidence": True}),
        ("legrad", {}),
        ("maskinversion", {"write_expl_maps": True}),
    ],
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


def _prompt_batch(batch, prompts):
    """``batch`` with row 0 carrying ``prompts`` and row 2 all-too-long prompts (tiny-vit holds 32 tokens)."""
    too_long = [" ".join(["cat"] * 40) + " one", " ".join(["cat"] * 40) + " two"]
    return dict(batch, **{cols.PROMPTS: _objects([prompts, None, too_long])})


@pytest.mark.parametrize("method", ["gem", "legrad"])
def test_prompts_too_long_or_repeated_cost_only_themselves(batch, method):
    long_prompt = " ".join(["cat"] * 40)  # 42 tokens raw, more than tiny-vit's 32
    prompts = ["red thing", "Red  Thing", long_prompt, "blue thing", "red thing"]
    out = _actor(method)(_prompt_batch(batch, prompts))
    assert _errors(out, method)[0] == (None, None) and _errors(out, method)[2] == (None, None)  # no row fails
    # one heatmap per distinct text, first spelling kept; the too-long prompt is an error entry, never a cut map
    assert out[cols.col(method, cols.HEATMAP_PROMPTS)][0] == ["red thing", "blue thing"]
    assert len(out[cols.col(method, cols.HEATMAPS)][0]) == 2
    assert out[cols.col(method, cols.PROMPTS_COLLAPSED)][0] == 2
    (err,) = out[cols.col(method, cols.PROMPT_ERRORS)][0]
    assert err["prompt"] == long_prompt and err["error_type"] == "PromptTooLong"
    assert "holds 32" in err["message"] and "tokens" in err["message"]
    # a row whose every prompt is too long: no maps, two error entries, and the batch's other rows are unaffected
    assert out[cols.col(method, cols.HEATMAPS)][2] == [] and len(out[cols.col(method, cols.PROMPT_ERRORS)][2]) == 2
    assert out[cols.col(method, cols.HEATMAP_HW)][2].tolist() == [240, 320]
    alone = _actor(method)(_prompt_batch(batch, ["red thing", "blue thing"]))
    assert alone[cols.col(method, cols.HEATMAPS)][0] == out[cols.col(method, cols.HEATMAPS)][0]


def test_the_sink_writes_prompt_errors_and_counts_collapsed_prompts(batch, tmp_path):
    from clipmaps.pipeline.sinks import Provenance, SinkConfig, SinkStage

    long_prompt = " ".join(["cat"] * 40)
    out = _actor("gem", original=True)(_prompt_batch(batch, ["red thing", "RED thing", long_prompt]))
    out = _actor("legrad")(out)
    names = ("gem", "gem_original", "legrad")
    sink = SinkStage(SinkConfig(str(tmp_path), {n: Provenance(n, "m", "w", "h") for n in names}))
    out.update(
        {
            cols.IMAGE_URI: _objects(["a.png", "b.png", "c.png"]),
            cols.ERROR_TYPE: _objects([None, "DecodeError", None]),  # row b failed upstream (the fixture's stage)
            cols.ERROR_MESSAGE: _objects([None, "bad bytes", None]),
        }
    )
    tables = sink.tables(out)
    heat = tables["heatmaps"].to_pylist()
    keys = [(r["image_id"], r["method"], r["prompt"]) for r in heat]
    assert len(keys) == len(set(keys))  # one row per (image, method, prompt)
    assert {k for k in keys if k[0] == "a"} == {("a", n, p) for n in names for p in ("red thing",)}
    text_errors = [e for e in tables["errors"].to_pylist() if e["stage"] == "text"]
    # the long prompt of row a and both of row c, once per output, each message naming its prompt
    assert len(text_errors) == 3 * len(names) and {e["error_type"] for e in text_errors} == {"PromptTooLong"}
    assert sorted({e["image_id"] for e in text_errors}) == ["a", "c"]
    assert {e["method"] for e in text_errors} == set(names)
    assert sink.prompts_collapsed(out) == 1  # per image the most any output dropped, not once per output
    counts = sink({**out, cols.SHARD: np.zeros(3, np.int64)})
    assert counts["prompts_collapsed"].tolist() == [1]


@pytest.mark.parametrize("method", ["gem", "maskclip"])
def test_label_confidence_is_the_winning_probability_beside_each_label_map(batch, tmp_path, method):
    """With ``output.label_confidence`` each label map has a same-size 8-bit confidence: the winning class's softmax
    probability over the 2 classes and 1 background name, so never below 1/3; the label maps themselves do not
    change; the sink writes it into ``labels/``."""
    from clipmaps.pipeline.sinks import Provenance, SinkConfig, SinkStage

    plain, with_conf = _actor(method)(batch), _actor(method, label_confidence=True)(batch)
    assert cols.col(method, cols.CONFIDENCE) not in plain
    assert list(plain[cols.col(method, cols.LABELS)]) == list(with_conf[cols.col(method, cols.LABELS)])
    conf = with_conf[cols.col(method, cols.CONFIDENCE)]
    assert conf[1] is None  # the failed row
    for i in (0, 2):
        c = decode_label_map(conf[i])
        assert c.shape == (240, 320) and c.dtype == np.uint8
        assert c.min() >= np.floor(255 / 3) and c.max() <= 255
    sink = SinkStage(SinkConfig(str(tmp_path), {method: Provenance(method, "m", "w", "h", "v")}))
    with_conf.update(
        {
            cols.IMAGE_URI: _objects(["a.png", "b.png", "c.png"]),
            cols.ERROR_TYPE: _objects([None, "DecodeError", None]),  # row b failed upstream (the fixture's stage)
            cols.ERROR_MESSAGE: _objects([None, "bad bytes", None]),
        }
    )
    rows = sink.tables(with_conf)["labels"].to_pylist()
    assert [r["confidence"] for r in rows] == [conf[0], conf[2]]
