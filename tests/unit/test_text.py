"""Text the text tower cannot represent (too many tokens) or cannot tell apart (equal token ids).

Real tokenizer and model throughout: ``clipmaps-synth-vit``, whose text tower holds 24 tokens (start and end
included), so the limits are reached with short strings.
"""

from __future__ import annotations

import open_clip
import pytest

from clipmaps.actors.models import load_model, register_model_configs
from clipmaps.actors.text import (
    PHOTO_TEMPLATE,
    PromptTooLong,
    TextEncoder,
    check_fits,
    context_length,
    dedupe,
    prompt_tokens,
    shorten,
    text_key,
)
from clipmaps.jobs.query import QueryError, text_embedding
from clipmaps.pipeline.plan import check_vocabulary_text
from clipmaps.pipeline.spec import SpecError, load_spec
from clipmaps.pipeline.vocabularies import text_problems

MODEL = "clipmaps-synth-vit"
LIMIT = 24
#: Spellings of "red square" the tokenizer makes identical: case, inner whitespace (tab, repeated, no-break space),
#: fullwidth letters (its Unicode clean-up), surrounding spaces.
SPELLINGS = ["red square", "Red  Square", "RED\tsquare", "red\u00a0square", "ｒｅｄ square", " red square "]


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL, pretrained="synth-shapes-v1")


def words(n: int) -> str:
    """``n`` words of one token each ("cat" is one BPE token)."""
    return " ".join(["cat"] * n)


def test_the_synthetic_model_holds_24_tokens(tokenizer):
    assert context_length(tokenizer) == LIMIT
    assert len(prompt_tokens(tokenizer, words(3))) == 5  # start + 3 + end


def test_spellings_the_tokenizer_makes_identical_share_one_key(tokenizer):
    keys = {text_key(tokenizer, s, PHOTO_TEMPLATE) for s in SPELLINGS}
    assert len(keys) == 1
    assert text_key(tokenizer, "red squares") != text_key(tokenizer, "red square")
    kept, dropped = dedupe(tokenizer, [*SPELLINGS, "blue circle", "Blue Circle"])
    assert kept == ["red square", "blue circle"] and dropped == 6  # 5 other spellings + "Blue Circle"; first kept


def test_the_exact_limit_fits_and_one_more_token_is_refused(tokenizer):
    check_fits(tokenizer, words(LIMIT - 2), ["{}"])  # 24 tokens with start and end: fits
    with pytest.raises(PromptTooLong) as e:
        check_fits(tokenizer, words(LIMIT - 1), ["{}"])
    assert (e.value.tokens, e.value.limit) == (LIMIT + 1, LIMIT)
    assert e.value.stage == "text" and e.value.error_type == "PromptTooLong"
    assert "25 tokens" in str(e.value) and "holds 24" in str(e.value)


def test_a_name_that_fits_raw_may_not_fit_its_template(tokenizer):
    name = words(LIMIT - 4)  # 22 tokens raw; "a photo of a {}." adds 5
    check_fits(tokenizer, name, ["{}"])
    with pytest.raises(PromptTooLong) as e:
        check_fits(tokenizer, name, ["{}", *PHOTO_TEMPLATE])
    assert e.value.tokens == 27 and e.value.template == "a photo of a {}."
    assert "in template 'a photo of a {}.'" in str(e.value)


def test_messages_keep_both_ends_of_a_long_prompt():
    a, b = words(30) + " red square", words(30) + " blue circle"
    assert shorten(a) != shorten(b) and len(shorten(a)) == 60 and shorten(a).endswith("red square")
    assert shorten("short") == "short"


def test_the_encoder_refuses_cut_text_before_any_forward(lm):
    # the field case: two prompts that differ only past the context would get one embedding (cosine 0.99999994)
    head = "a small shape drawn on a grey textured background next to another small shape near the corner, namely a"
    encoder = TextEncoder(lm.model, lm.tokenizer)
    with pytest.raises(ValueError, match=r"30 tokens in template 'a photo of a \{\}\.'.*holds 24") as e:
        encoder.encode([head + " red square", head + " blue circle"], "photo")
    assert isinstance(e.value, PromptTooLong) and e.value.prompt == head + " red square"
    assert encoder.forwards == 0
    raw = encoder.encode([words(LIMIT - 2)], "raw")  # the boundary encodes
    assert raw.shape[0] == 1 and encoder.forwards == 1


def test_query_refuses_long_text(lm):
    with pytest.raises(QueryError, match="25 tokens.*holds 24"):
        text_embedding(lm, words(LIMIT - 1))
    assert text_embedding(lm, words(LIMIT - 2)).shape == (128,)


def test_vocabulary_text_problems_name_each_field(tokenizer):
    found = text_problems(
        {
            "names": ["red square", "Red  Square", words(LIMIT - 4)],
            "background": ["background", "ＢＡＣＫＧＲＯＵＮＤ"],
        },
        ["{}", *PHOTO_TEMPLATE],
        lambda t: prompt_tokens(tokenizer, t),
        LIMIT,
        model=MODEL,
    )
    assert [(k, i) for k, i, _ in found] == [("names", 1), ("names", 2), ("background", 1)]
    assert "same text to the model as 'red square' (names[0])" in found[0][2]
    assert "27 tokens in template 'a photo of a {}.'" in found[1][2] and f"{MODEL} holds 24" in found[1][2]


def _spec(tmp_path, vocabulary: dict, methods: dict | None = None):
    return load_spec(
        {
            "input": {"manifest": str(tmp_path / "m.jsonl")},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"name": MODEL, "pretrained": "synth-shapes-v1"},
            "vocabulary": vocabulary,
            "methods": methods or {"gem": {"size": 64}},
        }
    )


def test_plan_refuses_vocabularies_by_field(tmp_path):
    spec = _spec(tmp_path, {"names": ["red square", "blue circle", "Blue  Circle"], "background": ["bg"]})
    with pytest.raises(SpecError) as e:
        check_vocabulary_text(spec)
    assert e.value.fields == ["vocabulary.names[2]"]
    spec = _spec(tmp_path, {"names": ["cat", words(LIMIT - 2)]})  # fits raw, not in GEM's "a photo of a {}."
    with pytest.raises(SpecError, match=r"29 tokens.*holds 24") as e:
        check_vocabulary_text(spec)
    assert e.value.fields == ["vocabulary.names[1]"]
    # LeGrad with raw templates: the same name fits
    check_vocabulary_text(
        _spec(tmp_path, {"names": ["cat", words(LIMIT - 2)]}, {"legrad": {"size": 64, "templates": "raw"}})
    )


def test_plan_names_the_vocabulary_file(tmp_path):
    from clipmaps.pipeline.plan import resolve_vocabulary

    (tmp_path / "names.txt").write_text("red square\nRED SQUARE\n")
    spec = _spec(tmp_path, {"file": str(tmp_path / "names.txt")})
    with pytest.raises(SpecError) as e:
        check_vocabulary_text(resolve_vocabulary(spec), spec.vocabulary)
    assert e.value.fields == ["vocabulary.file"] and "name [1] 'RED SQUARE'" in str(e.value)


def test_the_summary_notes_collapsed_prompts_only_when_there_were_any():
    from types import SimpleNamespace

    from clipmaps.jobs.cli import summary_table

    counts = {"rows": 2, "errors": 0, "labels": 2, "heatmaps": 4, "regions": 0}
    result = SimpleNamespace(total=2, processed=2, errors=0, seconds=1.0, output_uri="out", counts=counts)
    assert "collapsed" not in summary_table(result)
    result.counts = {**counts, "prompts_collapsed": 3}
    last = summary_table(result).splitlines()[-1]
    assert last.startswith("note") and "3 duplicate prompt(s) collapsed" in last
