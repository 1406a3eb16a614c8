"""Shared pieces of the upstream-vs-clipmaps benchmark workers: deterministic inputs, the seeded model,
timing and the JSON protocol.

Imported by ``upstream_worker.py`` (upstream venv: open_clip 2.24) and ``clipmaps_worker.py`` (main venv:
open_clip 3.x), so it imports only torch (and hashlib/json from the standard library). Both venvs run the
same torch build, so the generated tensors are bit-identical on both sides; each worker reports a sha256 of
its inputs and of the model's state_dict and the driver checks that both sides agree.

Not a test module: pytest does not collect ``bench_*.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
MODEL_SEED = 0
INPUT_SEED = 20241123

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# class names; GEM gets the bare names (its template adds "a photo of a {}."), LeGrad the raw prompt
# "a photo of a {name}", MaskCLIP the first K names as its vocabulary (85-template ensemble).
VOCAB = ("cat", "dog", "car", "tree", "sky", "person", "bird", "boat", "road", "building", "grass", "horse")

# MaskInversion settings of upstream's README example (example_maskinversion.py)
MI_ITERATIONS = 10
MI_LR = 0.5

METHODS = ("gem", "legrad", "maskinversion", "maskclip")


# ------------------------------------------------------------------------------------------------ CLI
def worker_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="one benchmark measurement; prints one JSON line")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="clipmaps only: also run under bf16 autocast (cuda)")
    p.add_argument("--text-cost", action="store_true", help="maskclip only: also time 85-template text encoding")
    p.add_argument("--save", default=None, help="write the outputs to this .npz file (side-by-side check)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ inputs
def make_images(n: int, size: int, seed: int = INPUT_SEED) -> torch.Tensor:
    """``[n, 3, size, size]`` CLIP-normalised float32: smooth random images (bicubic-upsampled noise at two
    scales, clamped to [0, 1]), like natural images at the frequency content a ViT sees."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        coarse = torch.rand(1, 3, 6, 6, generator=g)
        fine = torch.rand(1, 3, 24, 24, generator=g)
        x = 0.75 * F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        x = x + 0.25 * F.interpolate(fine, size=(size, size), mode="bicubic", align_corners=False)
        out.append(x.clamp(0.0, 1.0))
    x = torch.cat(out)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def make_masks(n_images: int, n_masks: int, size: int, seed: int = INPUT_SEED + 1) -> list[torch.Tensor]:
    """One ``[n_masks, size, size]`` float32 0/1 stack per image: alternating random rectangles and ellipses
    covering roughly 2–35 % of the image."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    yy, xx = coords[:, None], coords[None, :]
    stacks = []
    for _ in range(n_images):
        masks = []
        for j in range(n_masks):
            cy, cx, hy, hx = (
                torch.rand(4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 0.5, 0.25, 0.25])
                + torch.tensor([0.25, 0.25, 0.08, 0.08], dtype=torch.float64)
            ).tolist()
            if j % 2 == 0:
                m = ((yy - cy).abs() <= hy) & ((xx - cx).abs() <= hx)
            else:
                m = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 <= 1.0
            masks.append(m.float())
        stacks.append(torch.stack(masks))
    return stacks


def class_prompts(n_images: int, n_prompts: int) -> list[list[str]]:
    """Per image ``n_prompts`` class names, rotating through :data:`VOCAB` (images get different lists)."""
    return [[VOCAB[(i * n_prompts + j) % len(VOCAB)] for j in range(n_prompts)] for i in range(n_images)]


def legrad_prompts(n_images: int, n_prompts: int) -> list[list[str]]:
    return [[f"a photo of a {c}" for c in names] for names in class_prompts(n_images, n_prompts)]


def maskclip_classes(k: int) -> list[str]:
    return [VOCAB[i % len(VOCAB)] for i in range(k)]


def inputs_sha256(images: torch.Tensor, masks: list[torch.Tensor] | None = None) -> str:
    h = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes())
    for m in masks or []:
        h.update(m.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ model
def build_model(name: str):
    """``torch.manual_seed(0); open_clip.create_model(name, pretrained=None)``, fp32, eval, frozen, on CPU
    (bit-identical state_dict under open_clip 2.24 and 3.x)."""
    import open_clip

    torch.manual_seed(MODEL_SEED)
    model = open_clip.create_model(name, pretrained=None)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


def state_dict_sha256(model) -> str:
    h = hashlib.sha256()
    sd = model.state_dict()
    for key in sorted(sd):
        h.update(sd[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stopwatch(device: torch.device, sink: dict, key: str):
    """Wall time of the block, with ``torch.cuda.synchronize`` before and after on a GPU."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    sink[key] = time.perf_counter() - t0


def setup(args) -> torch.device:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # fp32 means fp32 on both sides (no TF32 in matmuls or convolutions)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def machine(device: torch.device) -> dict:
    import importlib.metadata as md

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "open_clip": md.version("open_clip_torch"),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def emit(result: dict) -> None:
    """The worker's one JSON line (last line of stdout; upstream packages print chatter before it)."""
    sys.stdout.flush()
    print("BENCH_RESULT " + json.dumps(result, sort_keys=True), flush=True)


def save_outputs(path: str | None, **arrays: torch.Tensor) -> None:
    """Outputs for the driver's side-by-side check (numpy .npz, fp32, CPU)."""
    if not path:
        return
    import numpy as np

    np.savez(path, **{k: v.detach().float().cpu().numpy() for k, v in arrays.items()})
