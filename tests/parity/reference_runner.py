"""Runs the upstream GEM / LeGrad / MaskInversion packages (and the MaskCLIP reference in
``maskclip_reference.py``) on seeded random-init tiny open_clip models and writes
``tests/parity/fixtures/*.npz`` + ``manifest.json``.

Must run inside ``.venv-parity`` (open_clip_torch 2.24.0, gem-torch 1.0.1, legrad-torch 1.1,
maskinversion-torch 1.1); use ``make_fixtures.py``, which sets that up.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import io
import json
import logging
import platform
import subprocess
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import maskclip_reference as mcr
import numpy as np
import seed_models
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger("reference_runner")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FIXTURES = HERE / "fixtures"
MAIN_VENV_PY = REPO / ".venv" / "bin" / "python"

VIT = seed_models.TINY_VIT
RN = seed_models.TINY_RN
S = 64  # square working size (tiny ViT native image 32 -> grid 8 exercises pos-emb interpolation)
RECT_HW = (64, 96)  # non-square working size (H, W)


# ==============================================================================================
# small utilities
# ==============================================================================================
@contextmanager
def timed(what: str):
    t0 = time.perf_counter()
    yield
    log.info("%-34s %7.2f s", what, time.perf_counter() - t0)


def f32(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


class NpzWriter:
    """Collects arrays for one .npz file and writes it reproducibly (fixed zip timestamps)."""

    def __init__(self, name: str):
        self.name = name
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, key: str, arr) -> dict:
        if key in self.arrays:
            raise KeyError(f"duplicate array {key} in {self.name}")
        arr = np.ascontiguousarray(arr)
        self.arrays[key] = arr
        return {"file": self.name, "array": key, "shape": list(arr.shape), "dtype": str(arr.dtype)}

    def write(self, directory: Path) -> str:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for key in sorted(self.arrays):
                payload = io.BytesIO()
                np.lib.format.write_array(payload, self.arrays[key], allow_pickle=False)
                info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, payload.getvalue(), compresslevel=9)
        data = buf.getvalue()
        path = directory / self.name
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        return hashlib.sha256(data).hexdigest()


def versions() -> dict:
    def v(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": v("torchvision"),
        "open_clip_torch": v("open_clip_torch"),
        "timm": v("timm"),
        "numpy": np.__version__,
        "pillow": v("pillow"),
        "einops": v("einops"),
        "gem-torch": v("gem-torch"),
        "legrad-torch": v("legrad-torch"),
        "maskinversion-torch": v("maskinversion-torch"),
    }


# ==============================================================================================
# deterministic synthetic inputs
# ==============================================================================================
# Shapes in normalised coordinates (y, x in [0, 1]); colours drawn from the image's own RNG.
# rect: (y0, x0, y1, x1); ellipse: (cy, cx, ry, rx)
IMAGE_SPECS = {
    "sq0": {
        "seed": 1000,
        "raw_hw": (100, 100),
        "shapes": [
            ("rect", (0.10, 0.10, 0.45, 0.50)),
            ("ellipse", (0.65, 0.65, 0.20, 0.28)),
            ("rect", (0.75, 0.10, 0.86, 0.21)),
        ],
    },
    "sq1": {
        "seed": 1001,
        "raw_hw": (100, 100),
        "shapes": [
            ("ellipse", (0.52, 0.42, 0.40, 0.38)),
            ("rect", (0.05, 0.62, 0.32, 0.95)),
        ],
    },
    "rect0": {
        "seed": 1002,
        "raw_hw": (90, 140),
        "shapes": [
            ("rect", (0.15, 0.05, 0.60, 0.35)),
            ("ellipse", (0.55, 0.70, 0.30, 0.18)),
            ("ellipse", (0.85, 0.30, 0.10, 0.12)),
        ],
    },
}
# MaskInversion target masks = the shapes of the image (binary, rasterised at S x S)
MASK_SPECS = {
    "sq0": [0, 1, 2],  # rectangle (medium), ellipse, small rectangle (~1% of the image)
    "sq1": [0, 1],  # large ellipse (~48%), rectangle
}


def _shape_mask(kind: str, params, h: int, w: int) -> np.ndarray:
    yy = (np.arange(h, dtype=np.float64)[:, None] + 0.5) / h
    xx = (np.arange(w, dtype=np.float64)[None, :] + 0.5) / w
    if kind == "rect":
        y0, x0, y1, x1 = params
        m = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
    elif kind == "ellipse":
        cy, cx, ry, rx = params
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    else:
        raise ValueError(kind)
    return m


def synth_image(spec) -> np.ndarray:
    """Smooth per-channel gradients + a low-frequency wave + coloured shapes + mild noise; uint8 HWC."""
    rng = np.random.default_rng(spec["seed"])
    h, w = spec["raw_hw"]
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, h), np.linspace(0.0, 1.0, w), indexing="ij")
    img = np.empty((h, w, 3), dtype=np.float64)
    for c in range(3):
        a, b = rng.uniform(-0.4, 0.4, size=2)
        base = rng.uniform(0.3, 0.7)
        freq, phase = rng.uniform(0.5, 2.0), rng.uniform(0.0, 2 * np.pi)
        img[..., c] = base + a * (xx - 0.5) + b * (yy - 0.5) + 0.08 * np.sin(2 * np.pi * freq * (xx + 0.7 * yy) + phase)
    for kind, params in spec["shapes"]:
        m = _shape_mask(kind, params, h, w)
        colour = rng.uniform(0.0, 1.0, size=3)
        shade = 1.0 + 0.15 * (yy - 0.5)  # slight shading inside the shape
        img[m] = colour[None, :] * shade[m][:, None]
    img += rng.normal(0.0, 0.015, size=img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


UPSTREAM_QUIRKS = [
    "gem.create_model_and_transforms is broken (passes precision/device positionally into ss_attn_iter/...); "
    "fixtures wrap the seeded model with gem.GEMWrapper; gem.create_gem_model under the same seed gives "
    "bit-identical output (checked, gem_a.create_gem_model_gives_identical_output)",
    "GEMWrapper.forward names (W, H) = image.shape[-2:] (swapped) but uses them consistently: output is "
    "[1, P, H, W], patch tokens row-major over (gh, gw) (checked on the 64x96 case)",
    "GEMWrapper.batched_forward multiplies the cosine by 100 before upsampling; forward does not",
    "LeGrad's vit_dynamic_size_forward overwrites visual.positional_embedding.data with the resampled "
    "[1, N, C] tensor on the first call (mutates the wrapped open_clip model): fresh seeded model per "
    "wrapper, one image size per wrapper",
    "LeGrad's pre-min-max map is captured by temporarily rebinding the name legrad.wrapper.min_max to a "
    "recorder that calls the original (upstream files untouched; min_max(accum) == heat verified bitwise)",
    "LeGrad compute_legrad_clip assumes a square grid (w = h = sqrt(N-1)): no non-square LeGrad case",
    "MaskInversion returns the embedding AFTER the last optimizer step but the explainability map computed "
    "BEFORE it (last iteration); e0 captured by wrapping the wrapper's encode_image attribute",
    "legrad.LePreprocess (Resize((S,S), bicubic) -> _convert_to_rgb -> ToTensor -> Normalize) and "
    "gem.get_gem_img_transform((S,S)) give byte-identical tensors for RGB PIL input",
]


# ==============================================================================================
# main
# ==============================================================================================
def main() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    FIXTURES.mkdir(parents=True, exist_ok=True)

    import gem
    import legrad
    import maskinversion
    import open_clip

    assert md.version("open_clip_torch") == "2.24.0", md.version("open_clip_torch")
    seed_models.register_configs()
    tok_vit = open_clip.get_tokenizer(VIT)
    tok_rn = open_clip.get_tokenizer(RN)

    manifest: dict = {
        "format_version": 1,
        "generator": "tests/parity/make_fixtures.py (tests/parity/reference_runner.py, maskclip_reference.py)",
        "environment": {**versions(), "device": "cpu", "dtype": "float32", "torch_num_threads": 1},
        "conventions": {
            "model_build": "torch.manual_seed(seed); model = open_clip.create_model(name, pretrained=None); "
            "model.eval() (fp32, CPU); a FRESH model for every upstream wrapper",
            "state_dict_sha256": "sha256 over state_dict tensors in sorted key order, each "
            ".detach().contiguous().float().numpy().tobytes() (see seed_models.py)",
            "image_layout": "raw images uint8 [H, W, 3] RGB; preprocessed float32 [1, 3, H, W]",
            "array_refs": "every output array is given as {file, array, shape, dtype}; case inputs are "
            "'file:array' strings; files are .npz in this directory (np.load)",
        },
        "upstream_quirks": UPSTREAM_QUIRKS,
    }

    # ------------------------------------------------------------------ models + seed identity
    models_info = {}
    for name in (VIT, RN):
        m = seed_models.build_model(name)
        models_info[name] = {
            "config": f"actors/model_configs/{name}.json",
            "seed": seed_models.MODEL_SEED,
            "state_dict_sha256": seed_models.state_dict_sha256(m),
            "state_dict_keys_sha256": seed_models.state_dict_keys_sha256(m),
            "num_tensors": len(m.state_dict()),
            "image_size": list(m.visual.image_size)
            if isinstance(m.visual.image_size, (tuple, list))
            else [m.visual.image_size] * 2,
            "embed_dim": int(m.text_projection.shape[1]),
        }
    vit_probe = seed_models.build_model(VIT)
    models_info[VIT].update(
        {
            "patch_size": list(vit_probe.visual.patch_size),
            "grid_size": list(vit_probe.visual.grid_size),
            "width": int(vit_probe.visual.conv1.out_channels),
            "layers": len(vit_probe.visual.transformer.resblocks),
            "heads": int(vit_probe.visual.transformer.resblocks[0].attn.num_heads),
            "ln_eps": float(vit_probe.visual.ln_post.eps),
            "act": type(vit_probe.visual.transformer.resblocks[0].mlp.gelu).__name__,
        }
    )
    del vit_probe
    manifest["models"] = models_info
    manifest["seed_identity_open_clip_3"] = cross_check_main_venv(models_info)

    # ------------------------------------------------------------------ inputs
    inputs = writer("inputs.npz")
    from open_clip.transform import image_transform  # noqa: F401  (documentation of what LePreprocess wraps)

    torch.manual_seed(seed_models.MODEL_SEED)
    _m_unused, _pp_train, pp_val = open_clip.create_model_and_transforms(VIT, pretrained=None)
    del _m_unused, _pp_train
    le_pre = legrad.LePreprocess(preprocess=pp_val, image_size=S)
    le_pre_steps = [getattr(t, "__name__", type(t).__name__) for t in le_pre.transform.transforms]

    raw, gem_in, le_in = {}, {}, {}
    image_refs = {}
    for key, spec in IMAGE_SPECS.items():
        raw[key] = synth_image(spec)
        pil = Image.fromarray(raw[key], mode="RGB")
        hw = (S, S) if key.startswith("sq") else RECT_HW
        gem_in[key] = gem.get_gem_img_transform(img_size=hw)(pil).unsqueeze(0)
        ref = {
            "raw": inputs.add(f"{key}_raw", raw[key]),
            "gem_preprocessed": inputs.add(f"{key}_gem_{hw[0]}x{hw[1]}", f32(gem_in[key])),
            "working_hw": list(hw),
            "raw_hw": list(spec["raw_hw"]),
            "shapes": [{"kind": k, "params": list(p)} for k, p in spec["shapes"]],
        }
        if key.startswith("sq"):
            le_in[key] = le_pre(pil).unsqueeze(0)
            diff = float((le_in[key] - gem_in[key]).abs().max())
            ref["legrad_preprocessed_equals_gem"] = diff == 0.0
            ref["legrad_preprocessed"] = (
                ref["gem_preprocessed"] if diff == 0.0 else inputs.add(f"{key}_legrad_{S}x{S}", f32(le_in[key]))
            )
        image_refs[key] = ref
    masks = {}
    for key, idxs in MASK_SPECS.items():
        shapes = IMAGE_SPECS[key]["shapes"]
        masks[key] = torch.from_numpy(np.stack([_shape_mask(*shapes[i], S, S) for i in idxs]).astype(np.float32))
        image_refs[key]["maskinversion_masks"] = inputs.add(f"{key}_masks_{S}x{S}", f32(masks[key]))
        image_refs[key]["mask_shape_indices"] = idxs
        image_refs[key]["mask_areas"] = [int(a) for a in masks[key].sum(dim=(1, 2)).tolist()]
    manifest["inputs"] = {
        "images": image_refs,
        "gem_transform": "gem.get_gem_img_transform(img_size=(H, W)) on the PIL image: Resize((H, W), BICUBIC) "
        "-> ToTensor -> Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)",
        "legrad_transform": "legrad.LePreprocess(preprocess=<open_clip.create_model_and_transforms(...)[2]>, "
        f"image_size={S}) on the PIL image",
        "legrad_transform_steps": le_pre_steps,
        "synthesis": "see reference_runner.synth_image / IMAGE_SPECS (numpy default_rng per image seed)",
    }

    cases = []
    with timed("GEM"):
        cases += run_gem(gem, tok_vit, gem_in, models_info)
    with timed("LeGrad"):
        cases += run_legrad(legrad, tok_vit, le_in, models_info)
    with timed("MaskInversion"):
        cases += run_maskinversion(maskinversion, le_in, masks, models_info)
    with timed("MaskCLIP"):
        cases += run_maskclip(tok_vit, tok_rn, gem_in, models_info, manifest)

    with timed("LeGrad/MaskInversion on SigLIP and CoCa"):
        manifest["pooled"] = run_pooled(legrad, maskinversion)

    writers = [_WRITERS[k] for k in sorted(_WRITERS)]
    manifest["files"] = {}
    total = 0
    for wr in writers:
        manifest["files"][wr.name] = {"sha256": wr.write(FIXTURES), "num_arrays": len(wr.arrays)}
        total += (FIXTURES / wr.name).stat().st_size
    manifest["cases"] = cases
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    mpath = FIXTURES / "manifest.json"
    if not mpath.exists() or mpath.read_text() != text:
        mpath.write_text(text)
    total += mpath.stat().st_size
    log.info("wrote %d files, %.1f KiB total, in %.1f s", len(writers) + 1, total / 1024, time.perf_counter() - t_start)


def run_pooled(legrad, maskinversion) -> dict:
    import pooled_reference

    return pooled_reference.run(legrad, maskinversion, synth_image, _shape_mask, IMAGE_SPECS, MASK_SPECS, writer)


def main_pooled_only() -> None:
    """Regenerate only ``pooled.npz`` and the manifest's ``pooled`` section (the other fixtures are left as they
    are; their generation takes minutes)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    import legrad
    import maskinversion

    assert md.version("open_clip_torch") == "2.24.0", md.version("open_clip_torch")
    seed_models.register_configs()
    mpath = FIXTURES / "manifest.json"
    manifest = json.loads(mpath.read_text())
    with timed("LeGrad/MaskInversion on SigLIP and CoCa"):
        manifest["pooled"] = run_pooled(legrad, maskinversion)
    wr = _WRITERS["pooled.npz"]
    manifest["files"]["pooled.npz"] = {"sha256": wr.write(FIXTURES), "num_arrays": len(wr.arrays)}
    manifest["environment"]["timm"] = md.version("timm")
    mpath.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")


_WRITERS: dict[str, NpzWriter] = {}


def writer(name: str) -> NpzWriter:
    if name not in _WRITERS:
        _WRITERS[name] = NpzWriter(name)
    return _WRITERS[name]


def cross_check_main_venv(models_info: dict) -> dict:
    """Hash the same seeded models under the main venv's open_clip (3.x) and compare."""
    if not MAIN_VENV_PY.exists():
        return {"checked": False, "reason": f"{MAIN_VENV_PY} not found"}
    r = subprocess.run([str(MAIN_VENV_PY), str(HERE / "seed_models.py")], capture_output=True, text=True)
    if r.returncode != 0:
        return {"checked": False, "reason": (r.stderr.strip().splitlines() or ["?"])[-1]}
    other = json.loads(r.stdout)
    res = {"checked": True, "open_clip": other["open_clip"], "torch": other["torch"], "models": {}}
    for name, info in models_info.items():
        o = other["models"][name]
        res["models"][name] = {
            "state_dict_identical": o["state_dict_sha256"] == info["state_dict_sha256"],
            "keys_identical": o["state_dict_keys_sha256"] == info["state_dict_keys_sha256"],
        }
        log.info(
            "seed identity %s: open_clip %s vs %s -> state_dict identical: %s",
            name,
            other["open_clip"],
            "2.24.0",
            res["models"][name]["state_dict_identical"],
        )
    return res


# ==============================================================================================
# GEM
# ==============================================================================================
GEM_PROMPTS = {"sq0": ["cat", "dog", "sky"], "sq1": ["red car", "tree"], "rect0": ["sky", "tree", "red car"]}


def run_gem(gem, tokenizer, imgs, models_info):
    wr = writer("gem.npz")
    cases = []

    def new_wrapper(depth, it, temp):
        model = seed_models.build_model(VIT)
        return gem.GEMWrapper(model, tokenizer, depth=depth, ss_attn_iter=it, ss_attn_temp=temp)

    def one_image(w, tag, key, full=True):
        img = imgs[key]
        prompts = GEM_PROMPTS[key]
        out = {}
        with torch.no_grad():
            feat_gem, feat_ori = w.model.visual(img)
            out["feat_gem"] = wr.add(f"{tag}_{key}_feat_gem", f32(feat_gem))
            out["feat_ori"] = wr.add(f"{tag}_{key}_feat_ori", f32(feat_ori))
            out["text_emb"] = wr.add(f"{tag}_{key}_text_emb", f32(w.encode_text(prompts)))
            out["heat_norm"] = wr.add(f"{tag}_{key}_heat_norm", f32(w(img, prompts, normalize=True)))
            out["heat_raw"] = wr.add(f"{tag}_{key}_heat_raw", f32(w(img, prompts, normalize=False)))
            if full:
                out["heat_ori_norm"] = wr.add(
                    f"{tag}_{key}_heat_ori_norm", f32(w(img, prompts, normalize=True, return_ori=True))
                )
                out["heat_ori_raw"] = wr.add(
                    f"{tag}_{key}_heat_ori_raw", f32(w(img, prompts, normalize=False, return_ori=True))
                )
        return out

    desc = {
        "feat_gem, feat_ori": "model.visual(image) -> [feat_gem, feat_ori], each [1, 1+gh*gw, D], un-normalised "
        "(ln_post + proj on all tokens)",
        "text_emb": "GEMWrapper.encode_text(prompts): 'a photo of a {}.', L2-normalised, [1, P, D]",
        "heat_norm": "GEMWrapper.forward(image, prompts, normalize=True): [1, P, H, W] min-max per prompt",
        "heat_raw": "forward(..., normalize=False): bilinear-upsampled cosine, [1, P, H, W]",
        "heat_ori_*": "same with return_ori=True (original CLIP path features)",
    }

    # (a) defaults, two square images, one wrapper
    params = {"depth": 7, "ss_attn_iter": 1, "ss_attn_temp": None}
    w = new_wrapper(7, 1, None)
    per_img = {}
    for key in ("sq0", "sq1"):
        per_img[key] = one_image(w, "gem_a", key)
    with torch.no_grad():
        batched = w.batched_forward(
            torch.cat([imgs["sq0"], imgs["sq1"]]), [GEM_PROMPTS["sq0"], GEM_PROMPTS["sq1"]], normalize=False
        )
    for key, arr in zip(("sq0", "sq1"), batched):
        per_img[key]["batched_heat_raw"] = wr.add(f"gem_a_{key}_batched_heat_raw", f32(arr))
    # equivalence check: gem.create_gem_model under the same seed == wrapping the seeded model
    torch.manual_seed(seed_models.MODEL_SEED)
    w2 = gem.create_gem_model(VIT, pretrained=None, gem_depth=7, ss_attn_iter=1, ss_attn_temp=None)
    w2.eval()
    with torch.no_grad():
        same = torch.equal(
            w2(imgs["sq0"], GEM_PROMPTS["sq0"], normalize=False), w(imgs["sq0"], GEM_PROMPTS["sq0"], normalize=False)
        )
    cases.append(
        {
            "id": "gem_a",
            "method": "gem",
            "model": VIT,
            "state_dict_sha256": models_info[VIT]["state_dict_sha256"],
            "upstream_call": "gem.GEMWrapper(seeded_model, open_clip.get_tokenizer(model), depth, ss_attn_iter, "
            "ss_attn_temp); one wrapper for both images",
            "create_gem_model_gives_identical_output": bool(same),
            "params": params,
            "prompt_template": "a photo of a {}.",
            "images": {
                k: {"input": f"inputs.npz:{k}_gem_{S}x{S}", "prompts": GEM_PROMPTS[k], "outputs": per_img[k]}
                for k in ("sq0", "sq1")
            },
            "batched_forward": "gem_a_<img>_batched_heat_raw = GEMWrapper.batched_forward(cat(sq0, sq1), "
            "[prompts_sq0, prompts_sq1], normalize=False)[i]: 100 * cosine, [P_i, H, W]",
            "output_descriptions": desc,
        }
    )

    # (b) depth 4, 2 refinement iterations, fixed inverse temperature 0.5
    params = {"depth": 4, "ss_attn_iter": 2, "ss_attn_temp": 0.5}
    w = new_wrapper(4, 2, 0.5)
    cases.append(
        {
            "id": "gem_b",
            "method": "gem",
            "model": VIT,
            "state_dict_sha256": models_info[VIT]["state_dict_sha256"],
            "upstream_call": "gem.GEMWrapper(seeded_model, tokenizer, depth=4, ss_attn_iter=2, ss_attn_temp=0.5)",
            "params": params,
            "prompt_template": "a photo of a {}.",
            "images": {
                "sq0": {
                    "input": f"inputs.npz:sq0_gem_{S}x{S}",
                    "prompts": GEM_PROMPTS["sq0"],
                    "outputs": one_image(w, "gem_b", "sq0", full=False),
                }
            },
            "output_descriptions": desc,
        }
    )

    # (c) non-square 64x96 (H x W), defaults
    params = {"depth": 7, "ss_attn_iter": 1, "ss_attn_temp": None}
    w = new_wrapper(7, 1, None)
    out = one_image(w, "gem_c", "rect0", full=False)
    with torch.no_grad():
        out["heat_ori_raw"] = wr.add(
            "gem_c_rect0_heat_ori_raw", f32(w(imgs["rect0"], GEM_PROMPTS["rect0"], normalize=False, return_ori=True))
        )
    cases.append(
        {
            "id": "gem_c",
            "method": "gem",
            "model": VIT,
            "state_dict_sha256": models_info[VIT]["state_dict_sha256"],
            "upstream_call": "gem.GEMWrapper(seeded_model, tokenizer, depth=7, ss_attn_iter=1, ss_attn_temp=None)",
            "params": params,
            "prompt_template": "a photo of a {}.",
            "images": {
                "rect0": {
                    "input": f"inputs.npz:rect0_gem_{RECT_HW[0]}x{RECT_HW[1]}",
                    "prompts": GEM_PROMPTS["rect0"],
                    "outputs": out,
                }
            },
            "notes": "input [1,3,64,96] (H x W); tokens row-major over the 8 x 12 grid; heatmaps [1, P, 64, 96] "
            "(upstream names W,H = image.shape[-2:] swapped but consistent: orientation is correct)",
            "output_descriptions": desc,
        }
    )
    return cases


# ==============================================================================================
# LeGrad
# ==============================================================================================
LEGRAD_PROMPTS = {
    "sq0": ["a photo of a cat", "a photo of a dog", "a photo of the sky"],
    "sq1": ["a photo of a red car", "a photo of a tree"],
}


@contextmanager
def capture_legrad_min_max():
    """Records the accumulated map handed to ``legrad.wrapper.min_max`` (i.e. BEFORE min-max), while
    still returning upstream's min_max result.  Only the name looked up by legrad.wrapper is swapped."""
    import legrad.wrapper as lw

    original = lw.min_max
    seen: list[torch.Tensor] = []

    def recording_min_max(x):
        seen.append(x.detach().clone())
        return original(x)

    lw.min_max = recording_min_max
    try:
        yield seen
    finally:
        lw.min_max = original


def run_legrad(legrad, tokenizer, imgs, models_info):
    wr = writer("legrad.npz")
    cases = []
    for layer_index in (-2, -1, -4):
        tag = f"legrad_l{abs(layer_index)}"
        model = seed_models.build_model(VIT)  # fresh: LeWrapper overwrites positional_embedding.data
        w = legrad.LeWrapper(model, layer_index=layer_index)
        per_img = {}
        for key in ("sq0", "sq1"):  # same size for every call of this wrapper
            prompts = LEGRAD_PROMPTS[key]
            text_emb = w.encode_text(tokenizer(prompts), normalize=True)
            with capture_legrad_min_max() as seen:
                heat = w.compute_legrad_clip(image=imgs[key], text_embedding=text_emb)
            assert len(seen) == 1
            per_img[key] = {
                "input": f"inputs.npz:{key}_gem_{S}x{S}",
                "prompts": prompts,
                "outputs": {
                    "text_emb": wr.add(f"{tag}_{key}_text_emb", f32(text_emb)),
                    "heat": wr.add(f"{tag}_{key}_heat", f32(heat)),
                    "accum": wr.add(f"{tag}_{key}_accum", f32(seen[0])),
                },
            }
        pos_shape = list(w.visual.positional_embedding.shape)
        cases.append(
            {
                "id": tag,
                "method": "legrad",
                "model": VIT,
                "state_dict_sha256": models_info[VIT]["state_dict_sha256"],
                "upstream_call": f"w = legrad.LeWrapper(fresh_seeded_model, layer_index={layer_index}); "
                "t = w.encode_text(tokenizer(prompts), normalize=True); "
                "w.compute_legrad_clip(image=image, text_embedding=t)",
                "params": {"layer_index": layer_index, "starting_depth": models_info[VIT]["layers"] + layer_index},
                "images": per_img,
                "output_descriptions": {
                    "text_emb": "[P, D] unit-norm text embeddings passed to LeGrad (raw prompts, no template)",
                    "heat": "compute_legrad_clip output: [1, P, S, S], min-max per prompt",
                    "accum": "the accumulated map just BEFORE min-max (captured by swapping the name "
                    "legrad.wrapper.min_max for a recorder that calls the original): [1, P, S, S]",
                },
                "notes": "input = LePreprocess tensor (identical to the GEM transform's, see inputs); one wrapper "
                "per layer_index, used for sq0 then sq1; after the first call upstream has overwritten "
                f"visual.positional_embedding.data with the resampled [1, N, C] tensor (now {pos_shape})",
            }
        )
    return cases


# ==============================================================================================
# MaskInversion
# ==============================================================================================
def run_maskinversion(maskinversion, imgs, masks, models_info):
    import maskinversion.maskinversion as mim

    wr = writer("maskinversion.npz")
    cases = []
    settings = [
        ("mi_a", dict(alpha=0.0, lr=0.5, iterations=10, wd=0.0)),
        ("mi_b", dict(alpha=0.5, lr=0.1, iterations=5, wd=0.01)),
    ]
    for tag, p in settings:
        model = seed_models.build_model(VIT)
        w = maskinversion.MaskInversion(
            model,
            layer_index=-1,
            alpha=p["alpha"],
            lr=p["lr"],
            iterations=p["iterations"],
            wd=p["wd"],
            optimizer=torch.optim.AdamW,
        )
        per_img = {}
        for key in ("sq0", "sq1"):
            e0_seen, dice_seen = [], []
            enc_orig = w.encode_image

            def enc_rec(x, *a, _orig=enc_orig, _seen=e0_seen, **k):
                out = _orig(x, *a, **k)
                _seen.append(out.detach().clone())
                return out

            dice_orig = mim.batched_dice_loss

            def dice_rec(input, target, _orig=dice_orig, _seen=dice_seen):  # noqa: A002 (upstream kwarg name)
                val = _orig(input=input, target=target)
                _seen.append(float(val.detach()))
                return val

            w.encode_image = enc_rec
            mim.batched_dice_loss = dice_rec
            try:
                emb, expl = w.compute_maskinversion(imgs[key], masks[key], return_expl_map=True)
            finally:
                w.encode_image = enc_orig
                mim.batched_dice_loss = dice_orig
            assert len(e0_seen) == 1 and len(dice_seen) == p["iterations"]
            per_img[key] = {
                "input": f"inputs.npz:{key}_gem_{S}x{S}",
                "masks": f"inputs.npz:{key}_masks_{S}x{S}",
                "num_masks": int(masks[key].shape[0]),
                "outputs": {
                    "e0": wr.add(f"{tag}_{key}_e0", f32(e0_seen[0])),
                    "emb": wr.add(f"{tag}_{key}_emb", f32(emb)),
                    "expl_map": wr.add(f"{tag}_{key}_expl_map", f32(expl)),
                    "dice_loss": wr.add(f"{tag}_{key}_dice_loss", np.asarray(dice_seen, dtype=np.float32)),
                },
            }
        cases.append(
            {
                "id": tag,
                "method": "maskinversion",
                "model": VIT,
                "state_dict_sha256": models_info[VIT]["state_dict_sha256"],
                "upstream_call": "w = maskinversion.MaskInversion(fresh_seeded_model, layer_index=-1, alpha, lr, "
                "iterations, wd, optimizer=torch.optim.AdamW); "
                "emb, expl_map = w.compute_maskinversion(image, masks, return_expl_map=True)",
                "params": {"layer_index": -1, **p, "optimizer": "torch.optim.AdamW (torch defaults otherwise)"},
                "images": per_img,
                "output_descriptions": {
                    "e0": "encode_image(image.repeat(N)) inside compute_maskinversion (init of the learned "
                    "embeddings; CLS-pooled, ln_post, proj; NOT normalised): [N, D]",
                    "emb": "returned localized embeddings after the last optimizer step, un-normalised: [N, D]",
                    "expl_map": "returned explainability map of the LAST iteration (before that step): [1, N, S, S]",
                    "dice_loss": "soft-Dice term per iteration (captured via a recorder around "
                    "maskinversion.maskinversion.batched_dice_loss): [iterations]",
                },
                "notes": "one wrapper per case, used for sq0 then sq1 (same size)",
            }
        )
    return cases


# ==============================================================================================
# MaskCLIP (own faithful re-implementation of the original)
# ==============================================================================================
MASKCLIP_CLASSES = ["cat", "dog", "sky", "red car", "tree"]
MC_ORI_HW = {"sq0": (48, 48), "sq1": (48, 48), "rect0": (40, 60)}  # 'ori_shape' for the segmentor rescale
RN_RECT_HW = (96, 128)
PD_THRESH, KS_THRESH = 0.5, 1.0
PD_THRESH_LO = 0.27  # extra variant: with the random tiny RN every class falls below 0.5


def run_maskclip(tok_vit, tok_rn, imgs, models_info, manifest):
    import gem

    wr = writer("maskclip.npz")
    cases = []
    templates = mcr.maskclip_templates()
    manifest["maskclip_templates"] = {
        "templates_85": templates,
        "single_template": list(mcr.SINGLE_TEMPLATE),
        "note": "85 = open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES (80, formatted with '{}') + 5 scene "
        "templates; identical strings and order to tools/maskclip_utils/prompt_engineering.py "
        "prompt_templates (checked against chongzhou96/MaskCLIP@245d31f)",
    }
    refine_variants = {
        "pd": (PD_THRESH, 0.0),
        "ks": (0.0, KS_THRESH),
        "kspd": (PD_THRESH, KS_THRESH),
        "pdlo": (PD_THRESH_LO, 0.0),
        "kspdlo": (PD_THRESH_LO, KS_THRESH),
    }

    # RN needs its own non-square input: grid = H/32 x W/32
    rn_rect = gem.get_gem_img_transform(img_size=RN_RECT_HW)(
        Image.fromarray(synth_image(IMAGE_SPECS["rect0"]), mode="RGB")
    ).unsqueeze(0)
    rn_rect_ref = writer("inputs.npz").add(f"rect0_gem_{RN_RECT_HW[0]}x{RN_RECT_HW[1]}", f32(rn_rect))
    manifest["inputs"]["images"]["rect0"]["gem_preprocessed_rn"] = rn_rect_ref

    for arch, name, tok in (("vit", VIT, tok_vit), ("rn", RN, tok_rn)):
        model = seed_models.build_model(name)
        visual = model.visual
        tag = f"mc_{arch}"
        with torch.no_grad():
            text85 = mcr.class_text_embeddings(model, tok, MASKCLIP_CLASSES, templates)
            text1 = mcr.class_text_embeddings(model, tok, MASKCLIP_CLASSES, mcr.SINGLE_TEMPLATE)
        text_refs = {
            "text_emb_85": wr.add(f"{tag}_text_emb_85", f32(text85)),
            "text_emb_single": wr.add(f"{tag}_text_emb_single", f32(text1)),
        }
        groups = {"sq": ["sq0", "sq1"], "rect": ["rect0"]}
        per_group = {}
        for gname, keys in groups.items():
            if arch == "vit":
                x = torch.cat([imgs[k] for k in keys])
                in_ref = [f"inputs.npz:{k}_gem_{imgs[k].shape[2]}x{imgs[k].shape[3]}" for k in keys]
            else:
                x = torch.cat([imgs[k] for k in keys]) if gname == "sq" else rn_rect
                in_ref = (
                    [f"inputs.npz:{k}_gem_{S}x{S}" for k in keys]
                    if gname == "sq"
                    else [f"{rn_rect_ref['file']}:{rn_rect_ref['array']}"]
                )
            input_hw = tuple(x.shape[-2:])
            ori_hw = MC_ORI_HW[keys[0]]
            g = f"{tag}_{gname}"
            outs = {}
            with torch.no_grad():
                if arch == "vit":
                    v, k, grid = mcr.vit_dense_features(visual, x)
                    feat = mcr.vit_head_features(visual, v)
                    v6, k6, _ = mcr.vit_dense_features(visual, x, ln_eps=1e-6)
                    feat6 = mcr.vit_head_features(visual, v6)
                    outs["logits_85_eps1e-6"] = wr.add(f"{g}_logits_85_eps1e-6", f32(mcr.cosine_logits(feat6, text85)))
                    outs["v_dense"] = wr.add(f"{g}_v_dense", f32(v))
                else:
                    feat, k, grid = mcr.resnet_dense_features(visual, x)
                outs["feat"] = wr.add(f"{g}_feat", f32(feat))
                outs["keys"] = wr.add(f"{g}_keys", f32(k))
                logits85 = mcr.cosine_logits(feat, text85)
                logits1 = mcr.cosine_logits(feat, text1)
                outs["logits_85"] = wr.add(f"{g}_logits_85", f32(logits85))
                outs["logits_single"] = wr.add(f"{g}_logits_single", f32(logits1))
                stats = {}
                for rname, (pd, ks) in refine_variants.items():
                    ref = mcr.refine_output(logits85, k, pd_thresh=pd, ks_thresh=ks)
                    outs[f"refined_{rname}_85"] = wr.add(f"{g}_refined_{rname}_85", f32(ref))
                    if pd > 0:
                        pmax = F.softmax(logits85 * 100, dim=1).flatten(2).max(-1)[0]
                        stats[f"{rname}_classes_dropped_per_image"] = (pmax < pd).sum(1).tolist()
                        stats[f"{rname}_pd_min_abs_margin"] = round(float((pmax - pd).abs().min()), 6)
                    if ks > 0:
                        base = logits85 if pd == 0 else mcr.refine_output(logits85, None, pd_thresh=pd)
                        pm = F.softmax(base * 100, dim=1).max(1)[0]
                        stats[f"{rname}_pixels_smoothed_per_image"] = (pm < ks).flatten(1).sum(1).tolist()
                        stats[f"{rname}_ks_min_abs_margin"] = round(float((pm - ks).abs().min()), 6)
                kspd = mcr.refine_output(logits85, k, PD_THRESH, KS_THRESH)
                for sname, src in (("raw_85", logits85), ("kspd_85", kspd)):
                    probs, seg = mcr.segmentor_postprocess(src, input_hw, ori_hw)
                    outs[f"seg_probs_{sname}"] = wr.add(f"{g}_seg_probs_{sname}", f32(probs))
                    outs[f"seg_{sname}"] = wr.add(f"{g}_seg_{sname}", seg.to(torch.int16).numpy())
            per_group[gname] = {
                "images": keys,
                "inputs": in_ref,
                "input_hw": list(input_hw),
                "grid_hw": list(grid),
                "ori_hw": list(ori_hw),
                "refine_stats": stats,
                "outputs": outs,
            }
        case = {
            "id": tag,
            "method": "maskclip_original",
            "model": name,
            "state_dict_sha256": models_info[name]["state_dict_sha256"],
            "reference": "tests/parity/maskclip_reference.py: own re-implementation of chongzhou96/MaskCLIP@245d31f "
            "(mmseg/models/backbones/vit.py, resnet.py ResNetClip, decode_heads/maskclip_head.py, "
            "segmentors/encoder_decoder.py, tools/maskclip_utils/prompt_engineering.py)",
            "classes": MASKCLIP_CLASSES,
            "text": {
                "templates": "manifest.maskclip_templates",
                **text_refs,
                "how": "per class: encode every template, L2-normalise each, mean, L2-normalise -> [K, D]",
            },
            "params": {
                "pd_thresh": PD_THRESH,
                "ks_thresh": KS_THRESH,
                "refine_variants": {n: {"pd_thresh": a, "ks_thresh": b} for n, (a, b) in refine_variants.items()},
                "logit_scale": None,
                "test_cfg_mode": "whole",
            },
            "batches": per_group,
            "input_normalisation": "inputs are the GEM-transform tensors (CLIP mean/std); the original mmseg "
            "pipeline used ImageNet mean/std and keep-ratio resize -- irrelevant here since "
            "the same tensor is fed to both sides",
            "refine_stats_note": "classes dropped / pixels smoothed per image and the smallest |value - threshold| "
            "margin (probability units) seen by each threshold test",
        }
        if arch == "vit":
            case["details"] = {
                "ln_eps": f"model's own LayerNorm eps ({models_info[VIT]['ln_eps']}); the original config uses "
                "LN eps=1e-6 -> logits_85_eps1e-6 is the same pipeline with eps 1e-6 in every LN",
                "pos_embed": "bicubic, align_corners=False, NO antialias, patch part only, CLS position kept",
                "last_block": "y=ln_1(x); q,k,v = chunks of in_proj(y); k,v = out_proj(k), out_proj(v) (with bias); "
                "v = v + x (block input); v = v + mlp(ln_2(v)); v = ln_post(v); drop CLS",
                "head": "feat = conv1x1(v, proj^T) [B,D,gh,gw]; feat / ||feat||_2 over channels (no eps); "
                "logits = conv1x1(feat, text_emb) = cosine, no logit scale",
                "keys": "k [B, gh*gw, width] = out_proj(k) of the last block, CLS dropped, before ln_post",
                "v_dense": "[B, width, gh, gw] value path after ln_post (before proj)",
            }
        else:
            case["details"] = {
                "backbone": "open_clip ModifiedResNet stem + layer1..4 (== mmseg ResNetClip: deep stem, avg-down, "
                "clip-style bottleneck), output stride 32; any H, W multiple of 32 (no pos-emb used)",
                "head": "feat = c_proj(v_proj(x)) as 1x1 convs with the attnpool Linear weights (+bias); no "
                "positional embedding, no mean token, no attention; keys = k_proj(x) flattened "
                "[B, gh*gw, C]",
                "rect_input": f"{RN_RECT_HW[0]}x{RN_RECT_HW[1]} (grid 3x4) from rect0 via the GEM transform",
                "random_init_note": "open_clip zero-inits every bottleneck bn3.weight, so the random tiny RN's "
                "features are nearly constant over space and all 5 classes fall below "
                "pd_thresh=0.5 (refined_pd/kspd: every class -100); the *lo variants "
                "(pd_thresh=0.27) keep 2 of 5",
            }
        case["output_descriptions"] = {
            "feat": "head features before normalisation [B, D, gh, gw]",
            "keys": "k used by key smoothing [B, gh*gw, C]",
            "logits_85 / logits_single": "patch logits (cosine) before any upsampling [B, K, gh, gw] with the "
            "85-template / single-template text embeddings",
            "refined_<v>_85": "refine_output(logits_85, k) with the variant's thresholds [B, K, gh, gw]; "
            "after pd: dropped classes = -100; after ks: softmax(100*.) probabilities, "
            "pixels with max prob < ks_thresh replaced by W @ p, W = kn kn^T, "
            "kn = F.normalize(k, p=2) (dim=1 = token axis)",
            "seg_probs_<src>": "segmentor: bilinear (align_corners=False) to input_hw, bilinear to ori_hw, "
            "softmax over classes [B, K, oh, ow]",
            "seg_<src>": "argmax of seg_probs_<src> [B, oh, ow] int16",
        }
        cases.append(case)
    return cases
