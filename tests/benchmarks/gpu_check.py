"""One GPU check, one table: parity on CUDA, bf16 gaps, per-method throughput and MFU, the one-GPU pipeline.

Run through ``tests/benchmarks/gpu_check.sh`` (which checks for a GPU first). Sections, in order, each in its own
subprocess with a time bound so that the whole stays within about 8 minutes on an H100/H200:

1. **parity**: ``pytest -m gpu tests/unit/test_gpu.py``: the parity cases on CUDA at fp32 (TF32 off) against the
   upstream fixtures, and the bf16 autocast gaps against fp32 (written by the test to ``CLIPMAPS_GPU_REPORT``);
2. **methods**: ``roofline.py`` at 448 px (``--size``) and batches 32, 64 and 128: images (regions) per second,
   GFLOP per item, achieved TFLOP/s and MFU against the device's bf16 dense peak, operator calls per batch; GEM,
   LeGrad and MaskCLIP under bf16 autocast, MaskInversion in fp32 (its embeddings drift under bf16);
3. **pipeline**: ``clipmaps.pipeline.run.run`` on a fresh local Ray with one GPU: generated 640×480 JPEG scenes
   on local disk → decode tasks → one GEM actor (bf16, batch 64) → Parquet sink, images/s from the run's own
   summary, against GEM alone at the same batch (section 2).

``--cpu-smoke`` runs the same sections on the CPU with the tiny model at small sizes, to check the script itself
where no GPU is lent (the parity section is then skipped by the tests themselves). Prints one table at the end and
writes every raw result to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script, not a GPU")
    p.add_argument("--model", default=None, help="default ViT-B-16 (clipmaps-tiny-vit with --cpu-smoke)")
    p.add_argument("--size", type=int, default=None, help="default 448 (64 with --cpu-smoke)")
    p.add_argument("--batches", default=None, help="default 32,64,128 (2,4 with --cpu-smoke)")
    p.add_argument("--pipeline-images", type=int, default=None, help="default 1024 (16 with --cpu-smoke)")
    p.add_argument("--pipeline-batch", type=int, default=None, help="default 64 (4 with --cpu-smoke)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: parity, methods, pipeline")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    args.model = args.model or ("clipmaps-tiny-vit" if smoke else "ViT-B-16")
    args.size = args.size or (64 if smoke else 448)
    args.batches = [int(b) for b in (args.batches or ("2,4" if smoke else "32,64,128")).split(",")]
    args.pipeline_images = args.pipeline_images or (16 if smoke else 1024)
    args.pipeline_batch = args.pipeline_batch or (4 if smoke else 64)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.device = "cpu" if smoke else "cuda"
    return args


#: Whole-run bound (seconds); every section's own bound is cut to what is left, so the table always prints.
BUDGET = 460.0
DEADLINE = time.monotonic() + BUDGET


def sh(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, str]:
    timeout = min(timeout, DEADLINE - time.monotonic() - 5)
    if timeout <= 1:
        return 124, "", "skipped: the 8-minute budget is spent"
    full = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        return 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"


# ------------------------------------------------------------------------------------------------ sections
def parity(args, rows: list, raw: dict) -> None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    rc, out, err = sh(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/unit/test_gpu.py"],
        timeout=150,
        env={"CLIPMAPS_GPU_REPORT": report},
    )
    summary = (out.strip().splitlines() or ["(no output)"])[-1]
    raw["parity"] = {"rc": rc, "summary": summary, "tail": (out + err)[-3000:]}
    rows.append(("parity", "CUDA fp32 vs upstream fixtures (tests/unit/test_gpu.py)", summary, "all pass"))
    try:
        gaps = json.loads(Path(report).read_text())
        raw["parity"]["gaps"] = gaps
        for method, values in gaps.get("gaps", {}).items():
            text = ", ".join(f"{k} {v:.3g}" for k, v in values.items())
            rows.append(("bf16 gap", method, text, "cos >= 0.999 (MI)" if method == "maskinversion" else "-"))
    except (OSError, ValueError):
        pass
    finally:
        Path(report).unlink(missing_ok=True)


def methods(args, rows: list, raw: dict, batches: list[int]) -> dict:
    """Roofline per batch size; returns {(method, batch): result}."""
    found = {}
    for batch in batches:
        cmd = [
            sys.executable,
            str(HERE / "roofline.py"),
            "--model",
            args.model,
            "--size",
            str(args.size),
            "--images",
            str(batch),
            "--repeats",
            "2" if batch >= 128 else "3",
            "--device",
            args.device,
            "--dtype",
            "fp32" if args.cpu_smoke else "bf16",
            "--quiet",
        ]
        rc, out, err = sh(cmd, timeout=100 + batch)
        results = [json.loads(ln[9:]) for ln in out.splitlines() if ln.startswith("ROOFLINE ")]
        raw.setdefault("methods", []).append({"batch": batch, "rc": rc, "results": results, "stderr": err[-3000:]})
        if rc and not results:
            rows.append(("methods", f"batch {batch}", f"FAILED (exit {rc}): {err.strip().splitlines()[-1:]}", "-"))
            continue
        for r in results:
            found[(r["method"], batch)] = r
            mfu = f", MFU {100 * r['mfu_bf16_peak']:.1f} % of bf16 peak" if "mfu_bf16_peak" in r else ""
            rows.append(
                (
                    "methods",
                    f"{r['method']} {r['dtype']} batch {batch}",
                    f"{r['items_per_second']:.1f} {r['unit']}/s, {r['achieved_gflops'] / 1e3:.1f} TFLOP/s{mfu}, "
                    f"{100 * r['fraction_of_ceiling']:.0f} % of measured matmul, {r['operator_calls']} op calls",
                    {"gem": "MFU >= 40 %", "maskinversion": ">= 1000 regions/s"}.get(r["method"], "-"),
                )
            )
    return found


def pipeline(args, rows: list, raw: dict, alone: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="clipmaps-gpucheck-") as tmp:
        cfg = {
            "model": args.model,
            "size": args.size,
            "images": args.pipeline_images,
            "batch": args.pipeline_batch,
            "device": args.device,
            "dir": tmp,
        }
        rc, out, err = sh([sys.executable, str(HERE / "gpu_check.py"), "--pipeline-worker", json.dumps(cfg)], 200)
    lines = [ln for ln in out.splitlines() if ln.startswith("PIPELINE ")]
    if not lines:
        raw["pipeline"] = {"rc": rc, "stderr": err[-3000:]}
        rows.append(("pipeline", "one GPU, GEM", f"FAILED (exit {rc}): {err.strip().splitlines()[-1:]}", ">= 0.9x"))
        return
    res = json.loads(lines[-1][9:])
    raw["pipeline"] = res
    method = alone.get(("gem", args.pipeline_batch))
    ratio = ""
    if method and res.get("images_per_second"):
        ratio = f" = {res['images_per_second'] / method['items_per_second']:.2f}x GEM alone"
        ratio += f" ({method['items_per_second']:.1f} images/s)"
    rows.append(
        (
            "pipeline",
            f"decode -> GEM (batch {args.pipeline_batch}) -> sink, {args.pipeline_images} images",
            f"{res.get('images_per_second') or 0:.1f} images/s{ratio}, wall {res['wall_seconds']:.0f} s",
            ">= 0.9x",
        )
    )


def pipeline_worker(cfg: dict) -> None:
    """In its own process: write scenes and a manifest, run the job on a fresh local Ray, print its rate."""
    import ray

    from clipmaps.jobs.synth.scenes import CLASSES, make_scene
    from clipmaps.pipeline.run import run
    from clipmaps.pipeline.spec import JobSpec

    root = Path(cfg["dir"])
    (root / "images").mkdir()
    manifest = root / "manifest.jsonl"
    # 64 distinct scenes written once and copied to the other names (rendering costs ~0.1 s each; decoding a
    # copy costs what decoding an original does)
    distinct = []
    for i in range(min(64, cfg["images"])):
        path = root / "images" / f"scene-{i:05d}.jpg"
        make_scene(i, size=(640, 480)).image.save(path, quality=90)
        distinct.append(path.read_bytes())
    with manifest.open("w") as f:
        for i in range(cfg["images"]):
            path = root / "images" / f"scene-{i:05d}.jpg"
            if i >= len(distinct):
                path.write_bytes(distinct[i % len(distinct)])
            f.write(json.dumps({"image_id": f"scene-{i:05d}", "image_uri": str(path)}) + "\n")
    gpu = cfg["device"] == "cuda"
    spec = JobSpec.model_validate(
        {
            "input": {"manifest": str(manifest)},
            "output": {"uri": str(root / "out")},
            "model": {"name": cfg["model"], "seed": 0, "device": cfg["device"], "precision": "bf16" if gpu else "fp32"},
            "vocabulary": {"names": list(CLASSES[:5]), "background": ["background"]},
            "methods": {
                "gem": {
                    "size": cfg["size"],
                    "resources": {
                        "batch_size": cfg["batch"],
                        "num_gpus": 1 if gpu else 0,
                        "num_cpus": 1,
                        "min_actors": 1,
                        "max_actors": 1,
                    },
                }
            },
            "run": {"ray_address": "local"},
        }
    )
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    result = run(spec)
    wall = time.perf_counter() - t0
    ray.shutdown()
    out = {"images_per_second": result.images_per_second, "wall_seconds": wall, "images": cfg["images"], "cpus": cpus}
    print("PIPELINE " + json.dumps(out), flush=True)


def table(rows: list) -> str:
    cols = ("section", "what", "measured", "goal")
    widths = [min(70, max(len(c), *(len(str(r[i])) for r in rows))) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "-" * (sum(widths) + 6)]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pipeline-worker"]:
        pipeline_worker(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    started = time.perf_counter()
    rows: list = []
    raw: dict = {"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}}
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: no CUDA device here; run with --cpu-smoke to check the script on the CPU", file=sys.stderr
            )
            return 2
        raw["device"] = torch.cuda.get_device_name()
        rows.append(("device", raw["device"], f"torch {torch.__version__}", "-"))
    if "parity" not in args.skip:
        parity(args, rows, raw)
    # the largest batch last: the pipeline's comparison needs only the pipeline's own batch size
    first = [b for b in args.batches if b != max(args.batches)] or args.batches
    alone = methods(args, rows, raw, first) if "methods" not in args.skip else {}
    if "pipeline" not in args.skip:
        pipeline(args, rows, raw, alone)
    if "methods" not in args.skip and first != args.batches:
        methods(args, rows, raw, [max(args.batches)])
    rows.append(("total", "wall time", f"{time.perf_counter() - started:.0f} s", "<= 480 s"))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1) + "\n")
    failed = any("FAILED" in str(r[2]) for r in rows) or raw.get("parity", {}).get("rc") not in (0, 5, None)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
