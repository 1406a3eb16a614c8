"""Benchmark worker for the CLIPMAPS implementations; run it with the main venv's python (open_clip 3.x).

One method per process. Builds the same seeded model as the upstream worker (untimed), makes the same
deterministic inputs (``bench_inputs``), warms up on one image (untimed), then times ONE call for the whole
batch and prints one ``BENCH_RESULT {json}`` line:

* GEM: ``GEM.heatmaps(images, prompts)``; a fresh ``GEM`` (empty text cache) for the timed call, so the
  prompts are encoded inside the timing as upstream's ``forward`` does (once per distinct prompt here).
* LeGrad: ``LeGrad.heatmaps(images, text_embeddings=...)``; text embedded before the timing (as upstream).
* MaskInversion: ``MaskInversion.embed(images, masks)``, lr=0.5, 10 iterations (upstream's README example).
* MaskCLIP: ``MaskCLIP.class_logits(images, classes)`` with the 85-template text embeddings already cached
  (filled before the warm-up); with ``--text-cost`` that 85-template encoding is timed, uncached and cached.

With ``--bf16`` (CUDA) the same calls are timed again under ``torch.autocast('cuda', dtype=torch.bfloat16)``
and the gap to this worker's own fp32 output on the same inputs is reported (GEM, MaskCLIP: max-abs of the
cosine logits; LeGrad: rel-L2 of the raw maps; MaskInversion: min cosine of the embeddings). A failure under
autocast is reported with its traceback, not fixed.

Imports only torch, numpy, open_clip and clipmaps.
"""

from __future__ import annotations

import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inputs as bi  # noqa: E402

from clipmaps.actors.methods.gem import GEM  # noqa: E402
from clipmaps.actors.methods.legrad import LeGrad  # noqa: E402
from clipmaps.actors.methods.maskclip import MaskCLIP  # noqa: E402
from clipmaps.actors.methods.maskinversion import MaskInversion  # noqa: E402
from clipmaps.actors.params import MaskInversionParams  # noqa: E402
from clipmaps.actors.text import ENSEMBLE_85, RAW_TEMPLATE, TextEncoder  # noqa: E402


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Method:
    """``prepare`` (untimed, may differ per precision), ``call`` (timed), ``gap`` (bf16 vs fp32)."""

    def __init__(self, args, device, model, tokenizer, images):
        self.args, self.device, self.model, self.tokenizer, self.images = args, device, model, tokenizer, images

    def warm(self):
        raise NotImplementedError

    def prepare(self):
        """Untimed state for the timed call (fresh objects, text embeddings)."""

    def call(self):
        raise NotImplementedError

    def outputs(self, out) -> dict:
        raise NotImplementedError

    def gap_outputs(self, out) -> torch.Tensor:
        """What the bf16 gap is measured on (may run extra untimed calls)."""
        raise NotImplementedError

    def gap(self, ref: torch.Tensor, low: torch.Tensor) -> dict:
        raise NotImplementedError


class GemBench(Method):
    mode = "GEM.heatmaps, one call per batch (text encoded inside the timing, once per distinct prompt)"

    def __init__(self, *a):
        super().__init__(*a)
        self.prompts = bi.class_prompts(self.args.images, self.args.prompts)

    def warm(self):
        GEM(self.model, self.tokenizer).heatmaps(self.images[:1], self.prompts[:1])

    def prepare(self):
        self.gem = GEM(self.model, self.tokenizer)  # empty text cache, as upstream re-encodes per call

    def call(self):
        return self.gem.heatmaps(self.images, self.prompts)

    def outputs(self, out):
        return {"heat": torch.stack(out)}

    def gap_outputs(self, out):
        return torch.stack(self.gem.logits(self.images, self.prompts)).float()  # cosines

    def gap(self, ref, low):
        return {"bf16_gap_maxabs_cosine": float((ref - low).abs().max())}


class LeGradBench(Method):
    mode = "LeGrad.heatmaps, one call per batch (text embedded before the timing)"

    def __init__(self, *a):
        super().__init__(*a)
        enc = TextEncoder(self.model, self.tokenizer)
        self.texts = [enc.encode(p, RAW_TEMPLATE) for p in bi.legrad_prompts(self.args.images, self.args.prompts)]
        self.legrad = LeGrad(self.model, self.tokenizer)

    def warm(self):
        self.legrad.heatmaps(self.images[:1], text_embeddings=self.texts[:1])

    def call(self):
        return self.legrad.heatmaps(self.images, text_embeddings=self.texts)

    def outputs(self, out):
        return {"heat": torch.stack(out)}

    def gap_outputs(self, out):
        return torch.stack(self.legrad.heatmaps(self.images, text_embeddings=self.texts, normalize=False)).float()

    def gap(self, ref, low):
        per_map = [_rel_l2(low[b, p], ref[b, p]) for b in range(ref.shape[0]) for p in range(ref.shape[1])]
        return {"bf16_gap_rel_l2_raw": _rel_l2(low, ref), "bf16_gap_rel_l2_raw_worst_map": max(per_map)}


class MaskInversionBench(Method):
    mode = "MaskInversion.embed, one call per batch"

    def __init__(self, *a):
        super().__init__(*a)
        self.masks = [m.to(self.device) for m in bi.make_masks(self.args.images, self.args.masks, self.args.size)]
        self.mi = MaskInversion(self.model, MaskInversionParams(iterations=bi.MI_ITERATIONS, lr=bi.MI_LR))

    def warm(self):
        self.mi.embed(self.images[:1], self.masks[:1])

    def call(self):
        return self.mi.embed(self.images, self.masks)

    def outputs(self, out):
        return {"emb": torch.cat([r.embeddings for r in out])}

    def gap_outputs(self, out):
        return torch.cat([r.embeddings for r in out]).float()

    def gap(self, ref, low):
        cos = F.cosine_similarity(ref, low, dim=-1)
        return {"bf16_gap_min_cosine": float(cos.min()), "bf16_gap_rel_l2": _rel_l2(low, ref)}


class MaskCLIPBench(Method):
    mode = "MaskCLIP.class_logits, one call per batch (85-template text cached)"

    def __init__(self, *a):
        super().__init__(*a)
        self.classes = bi.maskclip_classes(self.args.classes)
        self.text_res: dict = {}
        enc = TextEncoder(self.model, self.tokenizer)
        if self.args.text_cost:  # 85-template encoding of the vocabulary: uncached, then from the cache
            with bi.stopwatch(self.device, self.text_res, "text_seconds_uncached"):
                enc.encode(self.classes, ENSEMBLE_85)
            with bi.stopwatch(self.device, self.text_res, "text_seconds_cached"):
                enc.encode(self.classes, ENSEMBLE_85)
            self.text_res.update(text_classes=len(self.classes), text_templates=len(ENSEMBLE_85))
        self.mc = MaskCLIP(self.model, self.tokenizer, text_encoder=enc)

    def warm(self):
        self.mc.class_logits(self.images[:1], self.classes)  # also fills the text cache

    def call(self):
        return self.mc.class_logits(self.images, self.classes)

    def outputs(self, out):
        return {"logits": out}

    def gap_outputs(self, out):
        return out.float()

    def gap(self, ref, low):
        return {"bf16_gap_maxabs_cosine": float((ref - low).abs().max())}


BENCHES = {"gem": GemBench, "legrad": LeGradBench, "maskinversion": MaskInversionBench, "maskclip": MaskCLIPBench}


def run(bench: Method, res: dict, prefix: str, autocast, want_gap: bool):
    """Warm up, time one batch call; return the output and (if asked) what the bf16 gap is measured on."""
    with autocast():
        with bi.stopwatch(bench.device, res, prefix + "warmup_seconds"):
            bench.warm()
        bench.prepare()
        with bi.stopwatch(bench.device, res, prefix + "seconds"):
            out = bench.call()
        gap_out = bench.gap_outputs(out) if want_gap else None
    return out, gap_out


def main() -> None:
    args = bi.worker_args()
    device = bi.setup(args)
    res = {"side": "clipmaps", "method": args.method, "machine": bi.machine(device)}
    try:
        t0 = time.perf_counter()
        model, tokenizer = bi.build_model(args.model)
        res["state_dict_sha256"] = bi.state_dict_sha256(model)
        model = model.to(device)
        images = bi.make_images(args.images, args.size)
        res["inputs_sha256"] = bi.inputs_sha256(images)
        images = images.to(device)
        bench = BENCHES[args.method](args, device, model, tokenizer, images)
        if args.method == "maskinversion":
            res["inputs_sha256"] = bi.inputs_sha256(images, bench.masks)
        res["setup_seconds"] = time.perf_counter() - t0
        res["mode"] = bench.mode
        res["items"] = args.images * (args.masks if args.method == "maskinversion" else 1)

        want_gap = bool(args.bf16 and device.type == "cuda")
        out, ref = run(bench, res, "", nullcontext, want_gap)
        bi.save_outputs(args.save, **bench.outputs(out))
        del out
        res.update(getattr(bench, "text_res", {}))
        if device.type == "cuda":
            res["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.bf16:
            if device.type != "cuda":
                res["bf16_error"] = "--bf16 needs --device cuda"
            else:
                try:
                    torch.cuda.reset_peak_memory_stats(device)
                    _, low = run(bench, res, "bf16_", lambda: torch.autocast("cuda", dtype=torch.bfloat16), True)
                    res.update(bench.gap(ref, low))
                    res["bf16_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                except Exception:
                    res["bf16_error"] = traceback.format_exc()
    except Exception:
        res["error"] = traceback.format_exc()
    bi.emit(res)


if __name__ == "__main__":
    main()
