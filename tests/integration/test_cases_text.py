"""Text the model cannot represent or cannot tell apart, through the real CLI (``clipmaps run`` in a subprocess, local
Ray, the shipped ``clipmaps-synth-vit`` whose text tower holds 24 tokens):

* field case ``long-prompt-truncation``: two manifest prompts that differ only past the context are never written as
  two identical heatmaps; each is an error row (stage ``text``, ``PromptTooLong``) naming its own end, its token
  count and the limit; the Python API (``api_check.py``) refuses them too;
* field case ``duplicate-prompts``: a prompt listed twice, or spelled twice in ways the tokenizer makes identical,
  gives one heatmap row per (image, method, prompt); the summary and ``_job.json`` count the collapsed prompts; a
  too-long prompt beside a good one costs only its own heatmap;
* a vocabulary with two names the tokenizer makes identical, or a name too long for GEM's template, is refused
  before any work (exit 2), naming the field.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.helpers.cases import BIN, CASES, make_case, needs_cases, run

HEAD = "a small shape drawn on a grey textured background next to another small shape near the corner, namely a"

pytestmark = needs_cases


def rows(out: Path, dataset: str) -> list[dict]:
    return pads.dataset(out / dataset, format="parquet").to_table().to_pylist()


@pytest.mark.slow  # CLI run, ~24 s; the per-prompt refusal also in tests/unit/test_text.py
def test_long_prompts_are_refused_per_prompt_never_cut(tmp_path):
    work = make_case("long-prompt-truncation", tmp_path)
    done = run(str(BIN / "clipmaps"), "run", "job.yaml", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    check = run(sys.executable, str(CASES / "long-prompt-truncation" / "check.py"), "out", cwd=work)
    assert check.returncode == 0 and "PASS" in check.stdout, check.stdout
    assert rows(work / "out", "heatmaps") == []  # no map from cut text
    errors = rows(work / "out", "errors")
    assert sorted((e["method"], e["stage"], e["error_type"]) for e in errors) == [
        ("gem", "text", "PromptTooLong"),
        ("gem", "text", "PromptTooLong"),
        ("legrad", "text", "PromptTooLong"),
        ("legrad", "text", "PromptTooLong"),
    ]
    for e in errors:  # each message tells its prompt apart (by its end), with the count and the limit
        assert "30 tokens in template 'a photo of a {}.'" in e["message"] and "holds 24" in e["message"]
    ends = sorted(e["message"].split("'")[1][-11:] for e in errors if e["method"] == "gem")
    assert ends == [" red square", "blue circle"]
    assert len(rows(work / "out", "labels")) == 1  # the vocabulary's label map is unaffected

    api = run(sys.executable, str(CASES / "long-prompt-truncation" / "api_check.py"), cwd=work)
    assert api.returncode != 0 and "PromptTooLong" in api.stderr and "holds 24" in api.stderr


@pytest.mark.slow  # ~18 s; unit tests cover prompt collapse and its count
def test_duplicate_prompts_give_one_row_each(tmp_path):
    work = make_case("duplicate-prompts", tmp_path)
    manifest = work / "manifest.jsonl"
    extra = [  # spellings the tokenizer makes identical, and a too-long prompt beside a good one
        {"image_id": "spelled", "image_uri": "a.png", "prompts": ["Red  Square", "red square", "ＢＬＵＥ circle"]},
        {"image_id": "mixed", "image_uri": "a.png", "prompts": ["blue circle", HEAD + " red square"]},
    ]
    manifest.write_text(manifest.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    done = run(str(BIN / "clipmaps"), "run", "job.yaml", cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    check = run(sys.executable, str(CASES / "duplicate-prompts" / "check.py"), "out", cwd=work)
    assert check.returncode == 0 and "PASS" in check.stdout, check.stdout
    heat = {(r["image_id"], r["method"], r["prompt"]) for r in rows(work / "out", "heatmaps")}
    assert heat == {
        *((i, m, p) for i in ("dup",) for m in ("gem", "legrad") for p in ("red square", "blue circle")),
        *(("spelled", m, p) for m in ("gem", "legrad") for p in ("Red  Square", "ＢＬＵＥ circle")),  # first spelling
        *(("mixed", m, "blue circle") for m in ("gem", "legrad")),
    }
    errors = rows(work / "out", "errors")
    assert sorted((e["image_id"], e["method"], e["stage"], e["error_type"]) for e in errors) == [
        ("mixed", "gem", "text", "PromptTooLong"),
        ("mixed", "legrad", "text", "PromptTooLong"),
    ]
    assert "2 duplicate prompt(s) collapsed" in done.stdout  # 1 in 'dup', 1 in 'spelled'
    job = json.loads((work / "out" / "_job.json").read_text())
    assert job["counts"]["prompts_collapsed"] == 2


@pytest.mark.slow  # 2 CLI runs, ~16 s; also tests/unit/test_text.py
def test_vocabularies_the_tokenizer_cannot_tell_apart_are_refused(tmp_path):
    work = make_case("duplicate-prompts", tmp_path)
    done = run(
        str(BIN / "clipmaps"), "run", "job.yaml", "--set", "vocabulary.names=[red square, Red  Square]", cwd=work
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "vocabulary.names[1]: 'Red  Square' is the same text to the model as 'red square'" in done.stderr
    long_name = " ".join(["cat"] * 22)  # 24 tokens raw: fits; 29 in GEM's "a photo of a {}."
    done = run(
        str(BIN / "clipmaps"), "run", "job.yaml", "--dry-run", "--set", f"vocabulary.names=[{long_name}]", cwd=work
    )
    assert done.returncode == 2 and "vocabulary.names[0]" in done.stderr and "29 tokens" in done.stderr
    assert not (work / "out").exists()
