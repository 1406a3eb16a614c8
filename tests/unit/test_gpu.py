"""GPU checks (marker ``gpu``; skipped without CUDA): the methods on CUDA agree with the upstream fixtures at fp32,
and stay close to fp32 under bf16 autocast. ``CLIPMAPS_GPU_REPORT=path.json`` writes the measured gaps."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from clipmaps.actors.methods.gem import GEM
from clipmaps.actors.methods.legrad import LeGrad, LeGradParams
from clipmaps.actors.methods.maskclip import MaskCLIP
from clipmaps.actors.methods.maskinversion import MaskInversion, MaskInversionParams
from clipmaps.actors.models import load_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GAPS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module")
def setup():
    from tests.parity.test_parity import CASES, MANIFEST, arr, image_input

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lm = load_model("clipmaps-tiny-vit", seed=0, device="cuda")
    yield lm, CASES, MANIFEST, arr, image_input
    report = os.environ.get("CLIPMAPS_GPU_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gaps": GAPS}, f, indent=2)


def _both(fn):
    """Run ``fn`` at fp32 and under bf16 autocast."""
    fp32 = fn()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = fn()
    return fp32, bf16


def test_gem_on_gpu(setup):
    lm, cases, _, arr, image_input = setup
    case = cases["gem_a"]
    ids = list(case["images"])
    x = torch.cat([image_input(i) for i in ids]).cuda()
    prompts = [case["images"][i]["prompts"] for i in ids]
    gem = GEM(lm.model, lm.tokenizer)
    fp32, bf16 = _both(lambda: gem.logits(x, prompts))
    for b, i in enumerate(ids):
        ref = arr(case["images"][i]["outputs"]["heat_raw"])[0]
        assert (fp32[b].cpu() - ref).abs().max() <= 1e-4
    gap = max(float((a.float() - c).abs().max()) for a, c in zip(bf16, fp32))
    GAPS["gem_cosine_max_abs"] = {"bf16_vs_fp32": gap}
    assert gap < 0.1


def test_legrad_on_gpu(setup):
    lm, cases, _, arr, image_input = setup
    case = cases["legrad_l2"]
    ids = list(case["images"])
    x = torch.cat([image_input(i) for i in ids]).cuda()
    texts = [arr(case["images"][i]["outputs"]["text_emb"]).cuda() for i in ids]
    legrad = LeGrad(lm.model, lm.tokenizer, LeGradParams(layers=2))
    fp32, bf16 = _both(lambda: legrad.heatmaps(x, text_embeddings=texts, normalize=False))
    rels = []
    for b, i in enumerate(ids):
        ref = arr(case["images"][i]["outputs"]["accum"])[0]
        assert (fp32[b].cpu() - ref).norm() / ref.norm() <= 1e-4
        rels.append(float((bf16[b].float() - fp32[b]).norm() / fp32[b].norm()))
    GAPS["legrad_raw_map_rel_l2"] = {"bf16_vs_fp32": max(rels)}
    assert max(rels) < 0.1


def test_maskinversion_on_gpu(setup):
    lm, cases, manifest, arr, image_input = setup
    case = cases["mi_a"]
    ids = list(case["images"])
    x = torch.cat([image_input(i) for i in ids]).cuda()
    masks = [arr(manifest["inputs"]["images"][i]["maskinversion_masks"]).cuda() for i in ids]
    mi = MaskInversion(lm.model, MaskInversionParams(lr=0.5, iterations=10))
    fp32, bf16 = _both(lambda: mi.embed(x, masks))
    coses = []
    for b, i in enumerate(ids):
        ref = arr(case["images"][i]["outputs"]["emb"])
        assert F.cosine_similarity(fp32[b].embeddings.cpu(), ref, dim=-1).min() >= 0.9999
        coses.append(float(F.cosine_similarity(bf16[b].embeddings.float(), fp32[b].embeddings, dim=-1).min()))
    GAPS["maskinversion_embedding_min_cos"] = {"bf16_vs_fp32": min(coses)}
    assert min(coses) > 0.9


def test_maskclip_on_gpu(setup):
    lm, cases, _, arr, _ = setup
    case = cases["mc_vit"]
    batch = case["batches"]["sq"]
    x = torch.cat([arr(r) for r in batch["inputs"]]).cuda()
    mc = MaskCLIP(lm.model, lm.tokenizer)
    fp32, bf16 = _both(lambda: mc.patch_logits(x, case["classes"]))
    assert (fp32.cpu() - arr(batch["outputs"]["logits_85"])).abs().max() <= 1e-4
    gap = float((bf16.float() - fp32).abs().max())
    GAPS["maskclip_cosine_max_abs"] = {"bf16_vs_fp32": gap}
    assert gap < 0.1
