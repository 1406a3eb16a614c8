"""Upstream LeGrad / MaskInversion on the attention-pooling families (SigLIP, CoCa): writes ``pooled.npz`` and the
``pooled`` section of ``manifest.json``. Runs inside ``.venv-parity`` (open_clip 2.24.0, legrad-torch 1.1,
maskinversion-torch 1.1); called by ``reference_runner.main`` or alone with ``make_fixtures.py --pooled-only``.

Text enters as embeddings: SigLIP's real tokenizer comes from the model hub, so prompt embeddings are
``normalize(encode_text(ids))`` of fixed token ids, and upstream's empty-text embedding (normally
``ViT-B-16-SigLIP``'s tokenizer on ``"a photo of a"``) is set on the wrapper from ``seed_models.EMPTY_TEXT_IDS``
before any call, so upstream never asks the hub.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import seed_models
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("pooled_reference")

SIGLIP = seed_models.TINY_SIGLIP
COCA = seed_models.TINY_COCA
#: working sizes: SigLIP tiny (ViT-B/32 trunk, native 256 = 8x8) at 192 (6x6, resampled position embedding),
#: CoCa tiny (patch 8, native 32 = 4x4) at 64 (8x8, resampled)
SIZES = {SIGLIP: 192, COCA: 64}
PROMPTS = {"sq0": ["a red square", "a blue ellipse", "a small square"], "sq1": ["a large ellipse", "a corner"]}
#: (label, layer_index, settings). On the random tiny SigLIP the last layer's map of the starting embedding is all
#: ReLU-cut (a constant map: upstream's min-max gives NaN, the gradient is zero and the embedding stays put), so
#: the cases with layer_index=-2 are the ones that move.
MI_SETTINGS = [
    ("a", -1, dict(alpha=0.0, lr=0.1, iterations=8, wd=0.0)),
    ("b", -2, dict(alpha=0.5, lr=0.05, iterations=5, wd=0.01)),
    ("c", -2, dict(alpha=0.0, lr=0.1, iterations=8, wd=0.0)),
]


def f32(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def f16(t) -> np.ndarray:
    """Min-max-normalised maps in [0, 1] (compared at 1e-3): float16 keeps them within 4.9e-4 at half the bytes."""
    return f32(t).astype(np.float16)


@contextmanager
def recording(module, name: str, *, keep: str = "output"):
    """Swap ``module.<name>`` for a recorder that calls the original and keeps every result (``keep="output"``) or
    first argument (``"input"``); upstream's files are untouched."""
    original = getattr(module, name)
    seen: list[torch.Tensor] = []

    def rec(*a, **k):
        if keep == "input":
            seen.append(a[0].detach().clone())
        out = original(*a, **k)
        if keep == "output":
            seen.append(out.detach().clone())
        return out

    setattr(module, name, rec)
    try:
        yield seen
    finally:
        setattr(module, name, original)


class _FunctionalProxy:
    """Stands in for ``legrad.wrapper.F``: records ``interpolate`` outputs, delegates everything else."""

    def __init__(self, seen: list):
        self._seen = seen

    def __getattr__(self, name):
        return getattr(F, name)

    def interpolate(self, *a, **k):
        out = F.interpolate(*a, **k)
        self._seen.append(out.detach().clone())
        return out


@contextmanager
def recording_interpolate():
    import legrad.wrapper as lw

    seen: list[torch.Tensor] = []
    lw.F = _FunctionalProxy(seen)
    try:
        yield seen
    finally:
        lw.F = F


def text_embeddings(model, tokenizer, prompts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)


def empty_embedding(model):
    ids = torch.tensor([seed_models.EMPTY_TEXT_IDS])
    with torch.no_grad():
        return F.normalize(model.encode_text(ids), dim=-1)  # [1, D]


def new_wrapper(cls, name, **kwargs):
    """A fresh seeded model wrapped by upstream (the wrapper hooks blocks in place), with the empty embedding set."""
    model = seed_models.build_model(name)
    w = cls(model, **kwargs)
    if name == SIGLIP:
        w.empty_embedding = empty_embedding(model).t()  # what _init_empty_embedding would store: [D, 1]
    return w


def legrad_call(w, name, image, t):
    """One upstream call; returns (map, pre-min-max accumulation, empty-text accumulation or None)."""
    import legrad.wrapper as lw

    if name == SIGLIP:
        with recording(lw, "min_max", keep="input") as seen:
            heat = w.compute_legrad(image=image, text_embedding=t)
        assert len(seen) == 2, len(seen)  # empty-text map, then the corrected prompt map
        return heat, seen[1], seen[0]
    with recording_interpolate() as seen:
        heat = w.compute_legrad(image=image, text_embedding=t)
    accum = 0
    for m in seen:  # the same additions in the same order as upstream's accumulation
        accum = accum + m
    return heat, accum, None


def run(legrad, maskinversion, synth, shape_mask, image_specs, mask_specs, writer) -> dict:
    """Every pooled-family case; returns the manifest section. ``synth``/``shape_mask``: reference_runner's."""
    import open_clip

    wr = writer("pooled.npz")
    section: dict = {"models": {}, "cases": [], "empty_text_ids": seed_models.EMPTY_TEXT_IDS}
    inputs = {}
    for name in (SIGLIP, COCA):
        m = seed_models.build_model(name)
        s = SIZES[name]
        section["models"][name] = {
            "config": f"actors/model_configs/{name}.json",
            "seed": seed_models.MODEL_SEED,
            "visual_sha256": seed_models.visual_sha256(m),
            "state_dict_sha256": seed_models.state_dict_sha256(m) if name == SIGLIP else None,
            "size": s,
        }
        torch.manual_seed(0)
        _, _, pp_val = open_clip.create_model_and_transforms(seed_models.TINY_VIT, pretrained=None)
        pre = legrad.LePreprocess(preprocess=pp_val, image_size=s)
        tok = open_clip.get_tokenizer(name)
        per = {}
        for key in ("sq0", "sq1"):
            pil = Image.fromarray(synth(image_specs[key]), mode="RGB")
            x = pre(pil).unsqueeze(0)
            shapes = image_specs[key]["shapes"]
            masks = torch.from_numpy(
                np.stack([shape_mask(*shapes[i], s, s) for i in mask_specs[key]]).astype(np.float32)
            )
            t = text_embeddings(m, tok, PROMPTS[key])
            per[key] = (x, masks, t)
            section["models"][name][key] = {
                "image": wr.add(f"{name}_{key}_image", f32(x)),
                "masks": wr.add(f"{name}_{key}_masks", f32(masks)),
                "text_emb": wr.add(f"{name}_{key}_text_emb", f32(t)),
                "prompts": PROMPTS[key],
            }
        if name == SIGLIP:
            section["models"][name]["empty_emb"] = wr.add(f"{name}_empty_emb", f32(empty_embedding(m)))
        inputs[name] = per

    # ---------------------------------------------------------------- LeGrad: one call per prompt, and one with all
    for name in (SIGLIP, COCA):
        for layer_index in (-2, -1):
            tag = f"{name}_legrad_l{-layer_index}"
            w = new_wrapper(legrad.LeWrapper, name, layer_index=layer_index)
            images = {}
            for key, (x, _, t) in inputs[name].items():
                heats, accums, empties = [], [], []
                for p in range(t.shape[0]):
                    heat, accum, empty = legrad_call(w, name, x, t[p : p + 1])
                    heats.append(heat[0, 0])
                    accums.append(accum[0, 0])
                    if empty is not None:
                        empties.append(empty[0, 0])
                out = {
                    "heat": wr.add(f"{tag}_{key}_heat", f16(torch.stack(heats))),
                    "accum": wr.add(f"{tag}_{key}_accum", f32(torch.stack(accums))),
                }
                if empties:
                    out["empty_accum"] = wr.add(f"{tag}_{key}_empty_accum", f32(torch.stack(empties)))
                heat_all, accum_all, _ = legrad_call(w, name, x, t)  # upstream's one map for all prompts
                out["all_prompts_heat"] = wr.add(f"{tag}_{key}_all_heat", f16(heat_all[0, 0]))
                out["all_prompts_accum"] = wr.add(f"{tag}_{key}_all_accum", f32(accum_all[0, 0]))
                images[key] = out
            section["cases"].append(
                {
                    "id": tag,
                    "method": "legrad",
                    "model": name,
                    "params": {"layer_index": layer_index},
                    "upstream_call": "w = legrad.LeWrapper(fresh_seeded_model, layer_index); "
                    + ("w.empty_embedding = normalize(encode_text(EMPTY_TEXT_IDS)).t(); " if name == SIGLIP else "")
                    + "w.compute_legrad(image=x, text_embedding=t[p:p+1]) per prompt p, and once with all of t",
                    "images": images,
                    "output_descriptions": {
                        "heat": "[P, S, S] one upstream call per prompt (float16)",
                        "accum": "[P, gh, gw] (SigLIP: grid, correction applied) or [P, S, S] (CoCa): the map "
                        "before min-max",
                        "empty_accum": "SigLIP: [P, gh, gw] the empty-text map before its min-max (equal rows)",
                        "all_prompts_heat": "[S, S] upstream's single map for all prompts of the image in one call",
                        "all_prompts_accum": "the latter before min-max",
                    },
                }
            )

    # ---------------------------------------------------------------- MaskInversion: one upstream call per mask
    import maskinversion.maskinversion as mim

    for name in (SIGLIP, COCA):
        for label, layer_index, p in MI_SETTINGS:
            tag = f"{name}_mi_{label}"
            w = new_wrapper(
                maskinversion.MaskInversion, name, layer_index=layer_index, optimizer=torch.optim.AdamW, **p
            )
            images = {}
            for key, (x, masks, _) in inputs[name].items():
                embs, maps, e0s = [], [], []
                for i in range(masks.shape[0]):
                    with recording(w, "encode_image") as e0:
                        emb, expl = w.compute_maskinversion(x, masks[i : i + 1], return_expl_map=True)
                    embs.append(emb[0])
                    maps.append(expl[0, 0])
                    e0s.append(e0[0][0])
                images[key] = {
                    "e0": wr.add(f"{tag}_{key}_e0", f32(torch.stack(e0s))),
                    "emb": wr.add(f"{tag}_{key}_emb", f32(torch.stack(embs))),
                    "expl_map": wr.add(f"{tag}_{key}_expl_map", f16(torch.stack(maps))),
                }
            assert mim.MaskInversion is type(w)
            section["cases"].append(
                {
                    "id": tag,
                    "method": "maskinversion",
                    "model": name,
                    "params": {"layer_index": layer_index, **p, "optimizer": "torch.optim.AdamW"},
                    "upstream_call": "w = maskinversion.MaskInversion(fresh_seeded_model, layer_index, alpha, lr, "
                    "iterations, wd, optimizer=torch.optim.AdamW); w.compute_maskinversion(x, masks[i:i+1], "
                    "return_expl_map=True) per mask i (upstream couples the masks of one call)",
                    "images": images,
                    "output_descriptions": {
                        "e0": "[M, D] encode_image inside the call (SigLIP raw, CoCa normalised)",
                        "emb": "[M, D] embeddings after the last step",
                        "expl_map": "[M, S, S] float16, map of the last iteration (before its step); NaN where the map "
                        "is constant (upstream's min-max divides by zero)",
                    },
                }
            )
    log.info("pooled: %d cases", len(section["cases"]))
    return section
