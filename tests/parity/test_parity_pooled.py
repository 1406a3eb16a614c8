"""Parity of LeGrad and MaskInversion on the attention-pooling families (SigLIP, CoCa) with upstream legrad-torch 1.1
and maskinversion-torch 1.1 (open_clip 2.24.0), against ``fixtures/pooled.npz`` made by
``make_fixtures.py --pooled-only`` (``pooled_reference.py``) on identical seeded weights (hashes checked).

Text enters as embeddings. SigLIP's tokenizer is downloaded from the model hub by open_clip, which is not reachable
where fixtures are made or tests run, so: prompt embeddings are stored by the reference side
(``normalize(encode_text(token ids))`` of the tiny model) and fed to both implementations; the empty-text
correction's embedding is ``normalize(encode_text(EMPTY_TEXT_IDS))`` on both sides, where
``seed_models.EMPTY_TEXT_IDS`` is a fixed token sequence built offline (open_clip's bundled SimpleTokenizer on
upstream's text "a photo of a", padded to the context). The reference sets it on the wrapper before any call;
here it is recomputed from the ids with the seeded model, and the tiny model's own tokenizer is checked to give
the same ids, so the production path (tokenize "a photo of a") is the tested one.

Tolerances as for the ViT cases: maps before min-max rel-L2 <= 1e-4, MaskInversion embeddings cosine >= 0.9999.
Upstream scores all prompts of a call together (one map); the per-prompt maps are one upstream call per prompt,
and upstream's all-prompt map is shown to be ours for the summed embedding.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipmaps.actors.methods.pooled import (
    EMPTY_PROMPT,
    PooledLeGrad,
    empty_text_embedding,
    final_maps,
    pooled_family,
)
from clipmaps.actors.methods.pooled_maskinversion import PooledMaskInversion
from clipmaps.actors.models import load_model, save_weights, state_dict_sha256
from clipmaps.actors.params import LeGradParams, MaskInversionParams
from tests.parity import seed_models

FIXTURES = Path(__file__).parent / "fixtures"
SECTION = json.loads((FIXTURES / "manifest.json").read_text())["pooled"]
CASES = {c["id"]: c for c in SECTION["cases"]}
FAMILY = {seed_models.TINY_SIGLIP: "siglip", seed_models.TINY_COCA: "coca"}
#: measured figures, reported by test_report_figures (pytest -s)
FIGURES: dict[str, list[float]] = {}


@cache
def _npz():
    return np.load(FIXTURES / "pooled.npz")


def arr(ref) -> torch.Tensor:
    return torch.from_numpy(np.array(_npz()[ref["array"]], dtype=np.float32))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@cache
def model(name: str):
    lm = load_model(name, seed=seed_models.MODEL_SEED)
    info = SECTION["models"][name]
    assert seed_models.visual_sha256(lm.model) == info["visual_sha256"], "seeded init differs from the fixtures'"
    if info["state_dict_sha256"] is not None:
        assert state_dict_sha256(lm.model) == info["state_dict_sha256"]
    return lm


def inputs(name: str, key: str):
    ref = SECTION["models"][name][key]
    return arr(ref["image"]), arr(ref["masks"]), arr(ref["text_emb"])


def empty(name: str) -> torch.Tensor | None:
    if FAMILY[name] != "siglip":
        return None
    ids = torch.tensor([SECTION["empty_text_ids"]])
    with torch.no_grad():
        return F.normalize(model(name).model.encode_text(ids), dim=-1)[0]


@pytest.mark.parametrize("name", list(FAMILY))
def test_family_and_empty_text(name):
    lm = model(name)
    assert pooled_family(lm.model) == FAMILY[name]
    if FAMILY[name] == "siglip":
        assert lm.tokenizer([EMPTY_PROMPT])[0].tolist() == SECTION["empty_text_ids"]
        ours = empty_text_embedding(lm.model, lm.tokenizer)
        ref = arr(SECTION["models"][name]["empty_emb"])[0]
        assert (ours - ref).abs().max() <= 1e-6  # the text tower agrees across open_clip versions


def test_coca_weights_through_the_loading_path(tmp_path):
    """The seeded CoCa saved to safetensors and read back by ``load_model(weights=...)`` is the fixtures' tower (the
    SigLIP tower, ~390 MB, is checked by hash of the seeded model only)."""
    path = save_weights(model(seed_models.TINY_COCA).model, tmp_path / "coca.safetensors")
    loaded = load_model(seed_models.TINY_COCA, weights=str(path))
    assert seed_models.visual_sha256(loaded.model) == SECTION["models"][seed_models.TINY_COCA]["visual_sha256"]


@pytest.mark.parametrize("case_id", [c for c in CASES if CASES[c]["method"] == "legrad"])
def test_legrad(case_id):
    case = CASES[case_id]
    name = case["model"]
    lm = model(name)
    layers = -case["params"]["layer_index"]
    legrad = PooledLeGrad(lm.model, lm.tokenizer, LeGradParams(layers=layers), empty_embedding=empty(name))
    keys = list(case["images"])
    x = torch.cat([inputs(name, k)[0] for k in keys])  # both images in one batch
    texts = [inputs(name, k)[2] for k in keys]
    # each image's prompts and, as one more row, their sum: rows are independent, so one trace serves both
    both = legrad.raw_maps(x, text_embeddings=[torch.cat([t, t.sum(0, keepdim=True)]) for t in texts])
    raw, summed = [r[:-1] for r in both], [r[-1:] for r in both]
    heat = [final_maps(r, FAMILY[name], tuple(x.shape[-2:]), normalize=True) for r in raw]
    for b, key in enumerate(keys):
        out = case["images"][key]
        ref_accum = arr(out["accum"])
        errs = [rel_l2(raw[b][p], ref_accum[p]) for p in range(ref_accum.shape[0])]
        FIGURES.setdefault(f"{FAMILY[name]} legrad rel-L2", []).extend(errs)
        assert max(errs) <= 1e-4, errs
        assert (heat[b] - arr(out["heat"])).abs().max() <= 1e-3
        # upstream's single map for all prompts of a call is the map of their summed embedding
        assert rel_l2(summed[b][0], arr(out["all_prompts_accum"])) <= 1e-4
        if len(texts[b]) > 1:  # and it is not any one prompt's map
            assert min(rel_l2(raw[b][p], arr(out["all_prompts_accum"])) for p in range(len(texts[b]))) > 1e-2


@pytest.mark.parametrize("case_id", [c for c in CASES if CASES[c]["method"] == "maskinversion"])
def test_maskinversion(case_id):
    case = CASES[case_id]
    name = case["model"]
    lm = model(name)
    p = case["params"]
    mi = PooledMaskInversion(
        lm.model,
        MaskInversionParams(
            iterations=p["iterations"], lr=p["lr"], alpha=p["alpha"], wd=p["wd"], layers=-p["layer_index"]
        ),
        empty_embedding=empty(name),
    )
    keys = list(case["images"])
    x = torch.cat([inputs(name, k)[0] for k in keys])
    masks = [inputs(name, k)[1] for k in keys]
    results = mi.embed(x, masks, return_maps=True)  # every mask of both images in one call
    for b, key in enumerate(keys):
        out = case["images"][key]
        ref = arr(out["emb"])
        cos = F.cosine_similarity(results[b].embeddings, ref, dim=-1)
        FIGURES.setdefault(f"{FAMILY[name]} maskinversion cosine", []).extend(cos.tolist())
        assert cos.min() >= 0.9999, cos
        assert rel_l2(results[b].embeddings, ref) <= 1e-3
        ref_maps = arr(out["expl_map"])
        constant = ref_maps.isnan().flatten(1).all(1)  # upstream's 0/0 min-max of a constant map: ours gives zeros
        assert (results[b].maps[constant] == 0).all()
        if (~constant).any():
            assert (results[b].maps[~constant] - ref_maps[~constant]).abs().max() <= 1e-3
        moved = (ref - arr(out["e0"])).norm(dim=-1)
        FIGURES.setdefault(f"{FAMILY[name]} maskinversion moved (L2 from e0)", []).extend(moved.tolist())


def test_report_figures():
    """Prints the measured agreement (run after the cases above: ``pytest -s``)."""
    for key, values in sorted(FIGURES.items()):
        worst = min(values) if "cosine" in key else max(values)
        shown = f"1 - cos = {1 - worst:.3g}" if "cosine" in key else f"{worst:.3g}"
        print(f"{key}: worst {shown} over {len(values)}")
