"""Benchmark worker for the UPSTREAM implementations; run it with the upstream venv's python
(``.venv-parity``: open_clip 2.24.0, gem-torch 1.0.1, legrad-torch 1.1, maskinversion-torch 1.1).

One method per process. Builds the seeded model (untimed), makes the shared deterministic inputs
(``bench_inputs``), warms up on one image (untimed), times the whole batch with upstream's own per-call
semantics, and prints one ``BENCH_RESULT {json}`` line. Calls upstream as documented (see
``tests/parity/reference_runner.py``):

* GEM: ``gem.GEMWrapper(seeded_model, tokenizer)`` (defaults depth=7, ss_attn_iter=1); both
  ``forward`` per image and ``batched_forward`` over the batch are timed (text encoded inside each call,
  as upstream does); the driver reports the faster one.
* LeGrad: ``legrad.LeWrapper(fresh_seeded_model, layer_index=-2)``; one ``compute_legrad(text_embedding,
  image)`` per image with its P prompts; text embeddings made before the timing.
* MaskInversion: ``maskinversion.MaskInversion(fresh_seeded_model, layer_index=-1, lr=0.5, iterations=10)``;
  one ``compute_maskinversion(image, masks)`` per image with its M masks.
* MaskCLIP: no package upstream; the reference re-implementation of the original algorithm
  (``tests/parity/maskclip_reference.py``), one image at a time, 85-template text embeddings computed once
  before the timing; logits upsampled bilinearly to the input size (the segmentor's first resize).

Imports only torch, numpy, open_clip and the upstream method packages (plus the reference module).
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecation chatter in the upstream venv

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inputs as bi  # noqa: E402


def run_gem(args, device, model, tokenizer, images, res):
    import gem

    w = gem.GEMWrapper(model, tokenizer, depth=7, ss_attn_iter=1, ss_attn_temp=None).eval()
    prompts = bi.class_prompts(args.images, args.prompts)
    with torch.no_grad():
        with bi.stopwatch(device, res, "warmup_seconds"):
            w(images[:1], prompts[0])
            w.batched_forward(images[:1], prompts[:1])
        with bi.stopwatch(device, res, "seconds_forward"):
            per_image = [w(images[i : i + 1], prompts[i]) for i in range(args.images)]
        with bi.stopwatch(device, res, "seconds_batched"):
            batched = w.batched_forward(images, prompts)
    heat = torch.cat(per_image)  # [B, P, S, S] min-max normalised
    res["seconds"] = min(res["seconds_forward"], res["seconds_batched"])
    res["mode"] = "forward" if res["seconds_forward"] <= res["seconds_batched"] else "batched_forward"
    res["batched_vs_forward_maxabs"] = float((torch.stack(batched) - heat).abs().max())
    res["items"] = args.images
    bi.save_outputs(args.save, heat=heat)


def run_legrad(args, device, model, tokenizer, images, res):
    import legrad

    w = legrad.LeWrapper(model, layer_index=-2)
    prompts = bi.legrad_prompts(args.images, args.prompts)
    with torch.no_grad():
        texts = [w.encode_text(tokenizer(p).to(device), normalize=True) for p in prompts]
    with bi.stopwatch(device, res, "warmup_seconds"):
        w.compute_legrad(text_embedding=texts[0], image=images[:1])
    with bi.stopwatch(device, res, "seconds"):
        heats = [
            w.compute_legrad(text_embedding=texts[i], image=images[i : i + 1]).detach() for i in range(args.images)
        ]
    res["mode"] = "compute_legrad per image"
    res["items"] = args.images
    bi.save_outputs(args.save, heat=torch.cat(heats))


def run_maskinversion(args, device, model, tokenizer, images, res):
    import maskinversion

    w = maskinversion.MaskInversion(
        model, layer_index=-1, alpha=0.0, lr=bi.MI_LR, iterations=bi.MI_ITERATIONS, wd=0.0, optimizer=torch.optim.AdamW
    )
    masks = [m.to(device) for m in bi.make_masks(args.images, args.masks, args.size)]
    with bi.stopwatch(device, res, "warmup_seconds"):
        w.compute_maskinversion(images[:1], masks[0])
    with bi.stopwatch(device, res, "seconds"):
        embs = [w.compute_maskinversion(images[i : i + 1], masks[i]).detach() for i in range(args.images)]
    res["mode"] = "compute_maskinversion per image"
    res["items"] = args.images * args.masks  # regions
    res["inputs_sha256"] = bi.inputs_sha256(images, masks)
    bi.save_outputs(args.save, emb=torch.cat(embs))


def run_maskclip(args, device, model, tokenizer, images, res):
    sys.path.insert(0, str(bi.REPO / "tests" / "parity"))
    import maskclip_reference as mcr

    classes = bi.maskclip_classes(args.classes)
    templates = mcr.maskclip_templates()
    with bi.stopwatch(device, res, "text_seconds_uncached"):
        text = mcr.class_text_embeddings(model, tokenizer, classes, templates)  # [K, D], the cached tensor
    res["text_classes"] = len(classes)
    res["text_templates"] = len(templates)
    visual = model.visual

    def one(x):
        v, _k, _grid = mcr.vit_dense_features(visual, x)
        logits = mcr.cosine_logits(mcr.vit_head_features(visual, v), text)
        return F.interpolate(logits, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)

    with torch.no_grad():
        with bi.stopwatch(device, res, "warmup_seconds"):
            one(images[:1])
        with bi.stopwatch(device, res, "seconds"):
            logits = [one(images[i : i + 1]) for i in range(args.images)]
    res["mode"] = "reference (original algorithm) per image, text cached"
    res["items"] = args.images
    bi.save_outputs(args.save, logits=torch.cat(logits))


RUNNERS = {"gem": run_gem, "legrad": run_legrad, "maskinversion": run_maskinversion, "maskclip": run_maskclip}


def main() -> None:
    args = bi.worker_args()
    device = bi.setup(args)
    res = {"side": "upstream", "method": args.method, "machine": bi.machine(device)}
    import importlib.metadata as md

    res["machine"]["packages"] = {d: md.version(d) for d in ("gem-torch", "legrad-torch", "maskinversion-torch")}
    try:
        t0 = time.perf_counter()
        model, tokenizer = bi.build_model(args.model)
        res["state_dict_sha256"] = bi.state_dict_sha256(model)
        model = model.to(device)
        images = bi.make_images(args.images, args.size)
        res["inputs_sha256"] = bi.inputs_sha256(images)
        images = images.to(device)
        res["setup_seconds"] = time.perf_counter() - t0
        RUNNERS[args.method](args, device, model, tokenizer, images, res)
        if device.type == "cuda":
            res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception:
        res["error"] = traceback.format_exc()
    bi.emit(res)


if __name__ == "__main__":
    main()
