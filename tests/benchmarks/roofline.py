"""The methods against the machine's roofline: counted FLOPs, achieved FLOP/s, operator calls (one process).

    .venv/bin/python tests/benchmarks/roofline.py                               # CPU, ViT-B-16, 448 px, 8 images
    .venv/bin/python tests/benchmarks/roofline.py --images 2 --size 224 --repeats 2   # smoke run
    .venv/bin/python tests/benchmarks/roofline.py --device cuda --images 64 --dtype bf16

For each method it builds the seeded model and the benchmark inputs (``bench_inputs``), warms up (twice with
``--compile``, which also compiles), then times ``--repeats`` calls of the whole batch and takes the median. The
work of one call is counted once with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
convolutions, attention — CPU attention added here, torch's counter knows only the GPU kernels; elementwise work is
not counted) and its ATen operator calls with a dispatch mode. The ceiling is this device's own fp32 (or bf16)
matrix-product rate on the products the methods spend their time in (the ViT's MLP and q/k/v projections at this
batch's token count), sampled for 0.3 s before each timed call in the same process (median), so that on a shared
machine both see the same load; on CUDA the fraction of the
device's published dense peak (MFU) is printed too, where the device is known.

Prints one ``ROOFLINE {json}`` line per method (for ``bench_methods.py`` and ``gpu_check``) and, unless
``--quiet``, a table. Imports only torch, numpy, open_clip and clipmaps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # ``tests.helpers`` when run as a script
import bench_inputs as bi  # noqa: E402

import clipmaps.actors.models  # noqa: E402,F401  (registers clipmaps' small test architectures)
from clipmaps.actors.methods.gem import GEM  # noqa: E402
from clipmaps.actors.methods.legrad import LeGrad  # noqa: E402
from clipmaps.actors.methods.maskclip import MaskCLIP  # noqa: E402
from clipmaps.actors.methods.maskinversion import MaskInversion  # noqa: E402
from clipmaps.actors.params import MaskInversionParams  # noqa: E402
from clipmaps.actors.text import RAW_TEMPLATE, TextEncoder  # noqa: E402
from tests.helpers.opcount import OpCounter  # noqa: E402

METHODS = ("gem", "legrad", "maskinversion", "maskclip")
#: Published dense (no sparsity) peak TFLOP/s by device-name fragment: (bf16 tensor cores, fp32 without TF32).
DENSE_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 SXM": (989.0, 67.0),
    "H100 80GB HBM3": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100 NVL": (835.0, 60.0),
    "H100": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L4": (121.0, 30.3),
    "A10G": (70.0, 31.2),
}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of softmax(q kᵀ) v: two batched products (the softmax is not counted, as for the GPU kernels)."""
    b, h, n, d = query_shape
    m, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * n * m * d + 2 * b * h * n * m * dv


def flop_counter() -> FlopCounterMode:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_attention_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def dense_peak(device: torch.device) -> tuple[float, float] | None:
    """(bf16, fp32) dense peak TFLOP/s of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DENSE_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


class MatmulCeiling:
    """The device's matrix-product rate on the products a ViT of ``width`` spends its time in (MLP up and down,
    the fused q/k/v projection) at ``tokens`` rows, in ``dtype``: :meth:`sample` runs them round-robin for at least
    ``seconds`` and returns GFLOP/s. Sampled between the method's timed calls, so both see the same machine load."""

    def __init__(self, device: torch.device, dtype: torch.dtype, tokens: int, width: int, seconds: float = 0.3):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.device, self.seconds = device, seconds
        self.pairs = []
        for k, n in ((width, 4 * width), (4 * width, width), (width, 3 * width)):
            a = torch.randn(tokens, k, generator=g).to(device, dtype)
            b = torch.randn(n, k, generator=g).to(device, dtype)
            self.pairs.append((a, b, 2 * tokens * k * n))
        self.sample(0.0)  # warm

    def sample(self, seconds: float | None = None) -> float:
        seconds = self.seconds if seconds is None else seconds
        flops, t0 = 0, time.perf_counter()
        sync(self.device)
        while True:
            for a, b, f in self.pairs:
                torch.nn.functional.linear(a, b)
                flops += f
            sync(self.device)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return flops / elapsed / 1e9


class Case:
    """One method on the benchmark inputs: ``call()`` runs the whole batch once."""

    unit = "images"

    def __init__(self, args, model, tokenizer, images):
        self.args, self.model, self.tokenizer, self.images = args, model, tokenizer, images

    def items(self) -> int:
        return self.images.shape[0]


class GemCase(Case):
    def __init__(self, *a):
        super().__init__(*a)
        self.gem = GEM(self.model, self.tokenizer)
        self.prompts = bi.class_prompts(self.images.shape[0], self.args.prompts)
        if self.args.compile:
            self.gem.compile()

    def call(self):
        return self.gem.heatmaps(self.images, self.prompts)


class LeGradCase(Case):
    def __init__(self, *a):
        super().__init__(*a)
        enc = TextEncoder(self.model, self.tokenizer)
        prompts = bi.legrad_prompts(self.images.shape[0], self.args.prompts)
        self.texts = [enc.encode(p, RAW_TEMPLATE) for p in prompts]
        self.legrad = LeGrad(self.model, self.tokenizer)
        if self.args.compile:
            self.legrad.compile()

    def call(self):
        return self.legrad.heatmaps(self.images, text_embeddings=self.texts)


class MaskInversionCase(Case):
    unit = "regions"

    def __init__(self, *a):
        super().__init__(*a)
        masks = bi.make_masks(self.images.shape[0], self.args.masks, self.images.shape[-1])
        self.masks = [m.to(self.images.device) for m in masks]
        self.mi = MaskInversion(self.model, MaskInversionParams(iterations=bi.MI_ITERATIONS, lr=bi.MI_LR))
        if self.args.compile:
            self.mi.compile()

    def items(self) -> int:
        return sum(m.shape[0] for m in self.masks)

    def call(self):
        return self.mi.embed(self.images, self.masks)


class MaskCLIPCase(Case):
    def __init__(self, *a):
        super().__init__(*a)
        self.classes = bi.maskclip_classes(self.args.classes)
        self.mc = MaskCLIP(self.model, self.tokenizer)
        if self.args.compile:
            self.mc.compile()

    def call(self):
        return self.mc.class_logits(self.images, self.classes)


CASES = {"gem": GemCase, "legrad": LeGradCase, "maskinversion": MaskInversionCase, "maskclip": MaskCLIPCase}


def measure(args, method: str, model, tokenizer, images, device, ceiling: MatmulCeiling) -> dict:
    """Warm up, count FLOPs and operator calls of one call, time ``args.repeats`` calls with a ceiling sample
    before each."""
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.dtype == "bf16" and method != "maskinversion"
        else None
    )
    ctx = autocast if autocast is not None else nullcontext()
    case = CASES[method](args, model, tokenizer, images)
    with ctx:
        t0 = time.perf_counter()
        for _ in range(2 if args.compile else 1):
            case.call()
        sync(device)
        warm = time.perf_counter() - t0
        counter = flop_counter()
        with counter:
            case.call()
        ops = OpCounter()
        with ops:
            case.call()
        seconds, ceilings = [], []
        for _ in range(args.repeats):
            ceilings.append(ceiling.sample())
            seconds += timed(case.call, device, 1)
    flops = counter.get_total_flops()
    med = statistics.median(seconds)
    ceil = statistics.median(ceilings)
    items = case.items()
    res = {
        "method": method,
        "unit": case.unit,
        "items": items,
        "batch_images": images.shape[0],
        "dtype": "fp32" if autocast is None else "bf16",
        "compile": bool(args.compile),
        "warmup_seconds": warm,
        "seconds": seconds,
        "median_seconds": med,
        "items_per_second": items / med,
        "gflop_per_item": flops / items / 1e9,
        "achieved_gflops": flops / med / 1e9,
        "ceiling_gflops": ceil,
        "ceiling_samples_gflops": ceilings,
        "fraction_of_ceiling": flops / med / 1e9 / ceil,
        "best_fraction": flops / min(seconds) / 1e9 / max(ceilings),
        "operator_calls": ops.total,
    }
    peak = dense_peak(device)
    if peak is not None:
        tflops = flops / med / 1e12
        res["mfu_bf16_peak"] = tflops / peak[0]
        res["mfu_fp32_peak"] = tflops / peak[1]
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--images", type=int, default=8, help="images per call (the batch)")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--masks", type=int, default=4)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (not MaskInversion)")
    p.add_argument("--compile", action="store_true", help="the methods' hot paths through torch.compile")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {','.join(METHODS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("roofline: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = bi.build_model(args.model)
    model = model.to(device)
    images = bi.make_images(args.images, args.size).to(device)
    width = model.visual.conv1.out_channels
    tokens = args.images * (1 + (args.size // model.visual.conv1.kernel_size[0]) ** 2)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ceiling = MatmulCeiling(device, dtype, min(tokens, 16384), width)
    results = []
    for method in args.methods:
        res = measure(args, method, model, tokenizer, images, device, ceiling)
        res.update(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            loadavg_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            threads=torch.get_num_threads(),
            size=args.size,
        )
        results.append(res)
        print("ROOFLINE " + json.dumps(res), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.quiet:
        print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """The roofline columns as a text table."""
    if not results:
        return ""
    first = results[0]
    head = (
        f"roofline: {first['device']}, {first['threads']} threads, {first['size']} px, batch {first['batch_images']}, "
        "matmul ceiling measured around each method"
        + (f", 1-min load {first['loadavg_1min']:.1f}" if first.get("loadavg_1min") is not None else "")
    )
    cols = ["method", "dtype", "items/s", "GFLOP/item", "GFLOP/s", "ceiling", "of ceiling", "MFU bf16", "MFU fp32"]
    cols.append("op calls")
    rows = []
    for r in results:
        rows.append(
            [
                r["method"] + (" (compiled)" if r["compile"] else ""),
                r["dtype"],
                f"{r['items_per_second']:.3g} {r['unit']}",
                f"{r['gflop_per_item']:.1f}",
                f"{r['achieved_gflops']:.0f}",
                f"{r['ceiling_gflops']:.0f}",
                f"{100 * r['fraction_of_ceiling']:.0f} %",
                f"{100 * r['mfu_bf16_peak']:.1f} %" if "mfu_bf16_peak" in r else "-",
                f"{100 * r['mfu_fp32_peak']:.1f} %" if "mfu_fp32_peak" in r else "-",
                str(r["operator_calls"]),
            ]
        )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("-" * len(lines[-1]))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
