"""The driver holds nothing per row: its peak memory over big manifests, the time to the first finished batch, and
the files a job writes per dataset. Prints ``BENCH_FIGURES`` lines; not a timed test (pytest does not collect
``bench_*.py``).

    python tests/benchmarks/bench_driver.py memory --rows 10000 100000   # 50 RLE masks per row, every image missing
    python tests/benchmarks/bench_driver.py first-batch --rows 1000000    # no masks
    python tests/benchmarks/bench_driver.py files --images 1000 --shards 10
    python tests/benchmarks/bench_driver.py sa1b --images 200 --masks 100 --size 640x480   # MaskInversion, by reference

Each job runs as ``clipmaps run job.yaml`` in its own process (a fresh local Ray), as a user would; its peak RSS is
``VmHWM`` from ``/proc/<pid>/status``, read every 0.2 s while it runs (the kernel keeps the peak, so the last reading
before exit is the peak up to then).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # ``tests.helpers`` when run as a script


def _spec(manifest: Path, out: Path, *overrides: str) -> Path:
    from clipmaps.pipeline.spec import load_spec
    from tests.helpers.specs import JOB_SPEC

    spec = load_spec(
        JOB_SPEC,
        overrides=[
            f"input.manifest={manifest}",
            f"output.uri={out}",
            "methods.maskclip=null",
            "methods.legrad=null",
            "methods.gem.size=64",
            "methods.maskinversion.size=64",
            "methods.maskinversion.iterations=2",
            "run.max_error_fraction=1.0",
            *overrides,
        ],
    )
    path = out.parent / f"{out.name}.yaml"
    path.write_text(spec.to_yaml(redact=False))
    return path


def _vmhwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_cli(job: Path, *, watch: Path | None = None, timeout_s: float = 3600) -> dict:
    """Run ``clipmaps run job``; return wall seconds, the driver's peak RSS, the exit code and, with ``watch``, the
    seconds until a first staged or final result file appeared under that output folder."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    log = job.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clipmaps.jobs.cli", "run", str(job)], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    peak, first = 0, None
    while proc.poll() is None:
        peak = max(peak, _vmhwm(proc.pid) or 0)
        if watch is not None and first is None and _has_results(watch):
            first = time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            proc.kill()
            break
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    return {
        "dupes": next((line.split("ids", 1)[1].strip() for line in text.splitlines() if "for duplicates" in line), ""),
        "rc": proc.wait(),
        "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(peak / 2**20),
        "first_batch_s": None if first is None else round(first, 1),
        "log_tail": text[-600:],
    }


def _has_results(out: Path) -> bool:
    for sub in ("_staging", "errors", "labels"):
        folder = out / sub
        if folder.exists() and any(p.name.startswith("part-0") for p in folder.rglob("*.parquet")):
            return True
    return False


def _rles(count: int, seed: int = 0) -> list[dict]:
    """``count`` COCO RLEs of random blobs at 480x640 (SA-1B-like strings of a few hundred characters)."""
    from clipmaps.schemas.encodings import rle_encode

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:480, :640]
    out = []
    for _ in range(count):
        cy, cx, r = rng.integers(40, 440), rng.integers(40, 600), rng.integers(10, 60)
        wobble = 1 + 0.3 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(3, 9))
        out.append(rle_encode((yy - cy) ** 2 + (xx - cx) ** 2 < (r * wobble) ** 2))
    return out


def write_manifest(path: Path, rows: int, masks: int) -> None:
    """A JSONL manifest of ``rows`` rows whose images do not exist, each with ``masks`` RLE masks."""
    pool = _rles(max(masks, 1))
    with open(path, "w") as f:
        for i in range(rows):
            row = {"image_id": f"img{i:08d}", "image_uri": f"/nonexistent/img{i:08d}.jpg", "width": 640, "height": 480}
            if masks:
                row["masks"] = [{"region_id": str(k), "rle": pool[(i + k) % len(pool)]} for k in range(masks)]
            f.write(json.dumps(row) + "\n")


def bench_memory(args) -> None:
    figures = {}
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=args.tmp, ignore_cleanup_errors=True) as tmp:
            tmp = Path(tmp)
            manifest = tmp / "manifest.jsonl"
            write_manifest(manifest, rows, args.masks)
            job = _spec(manifest, tmp / "out", "methods.gem=null", f"output.shard_rows={args.shard_rows}")
            got = run_cli(job)
            size = manifest.stat().st_size
            figures[rows] = got
            print(
                f"BENCH_FIGURES driver-memory: {rows} rows x {args.masks} RLE masks (manifest {size / 2**20:.0f} MB, "
                f"shard_rows {args.shard_rows}): rc {got['rc']}, wall {got['wall_s']} s, driver VmHWM "
                f"{got['peak_rss_mb']} MB; duplicate-id pass: {got['dupes']}",
                flush=True,
            )
            if got["rc"] not in (0, 3):
                print(got["log_tail"])
    if len(figures) > 1:
        lo, hi = min(figures), max(figures)
        ratio = figures[hi]["peak_rss_mb"] / max(1, figures[lo]["peak_rss_mb"])
        print(f"BENCH_FIGURES driver-memory ratio {hi}/{lo} rows: {ratio:.2f}x")


def bench_first_batch(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp, ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.jsonl"
        t0 = time.monotonic()
        write_manifest(manifest, args.rows[0], 0)
        made = time.monotonic() - t0
        job = _spec(manifest, tmp / "out", "methods.maskinversion=null", f"output.shard_rows={args.shard_rows}")
        got = run_cli(job, watch=tmp / "out", timeout_s=args.stop_after)
        print(
            f"BENCH_FIGURES first-batch: {args.rows[0]} rows without masks (manifest "
            f"{manifest.stat().st_size / 2**20:.0f} MB, written in {made:.0f} s): first result file after "
            f"{got['first_batch_s']} s; driver VmHWM {got['peak_rss_mb']} MB (stopped after {got['wall_s']} s); "
            f"duplicate-id pass: {got['dupes']}",
            flush=True,
        )


def bench_files(args) -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory(dir=args.tmp, ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        rng = np.random.default_rng(0)
        with open(tmp / "manifest.jsonl", "w") as f:
            for i in range(args.images):
                path = tmp / "images" / f"i{i:05d}.png"
                Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
                f.write(json.dumps({"image_id": f"i{i:05d}", "image_uri": str(path), "prompts": ["a cat"]}) + "\n")
        rows = -(-args.images // args.shards)
        job = _spec(
            tmp / "manifest.jsonl",
            tmp / "out",
            "methods.maskinversion=null",
            f"output.shard_rows={rows}",
            "methods.gem.resources.batch_size=16",
        )
        got = run_cli(job)
        counts = {
            d: len([p for p in (tmp / "out" / d).glob("part-0*.parquet")])
            for d in ("labels", "heatmaps", "regions", "errors")
        }
        print(
            f"BENCH_FIGURES files: {args.images} images in {args.shards} shards (batch 16): rc {got['rc']}, wall "
            f"{got['wall_s']} s, result files per dataset {counts}",
            flush=True,
        )


def bench_sa1b(args) -> None:
    """An SA-1B-shaped MaskInversion job: per-image JSON masks by reference (``clipmaps manifest sa1b``'s layout, made
    by ``bench_mask_refs.generate``), few iterations on the tiny model; regions written = masks, driver peak RSS."""
    import pyarrow.dataset as pads

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_mask_refs import generate

    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(dir=args.tmp, ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        rows = generate(tmp / "in", args.images, args.masks, width, height)
        with open(tmp / "manifest.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        job = _spec(
            tmp / "manifest.jsonl",
            tmp / "out",
            "methods.gem=null",
            f"output.shard_rows={args.shard_rows}",
            "methods.maskinversion.resources.batch_size=4",
        )
        got = run_cli(job)
        regions = pads.dataset(tmp / "out" / "regions", format="parquet").count_rows()
        errors = pads.dataset(tmp / "out" / "errors", format="parquet").count_rows()
        print(
            f"BENCH_FIGURES sa1b: {args.images} images x {args.masks} masks by reference ({width}x{height}), "
            f"MaskInversion 2 iterations at 64 px on clipmaps-tiny-vit: rc {got['rc']}, wall {got['wall_s']} s, "
            f"regions {regions} (masks {args.images * args.masks}), error rows {errors}, driver VmHWM "
            f"{got['peak_rss_mb']} MB",
            flush=True,
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("memory", "first-batch", "files", "sa1b"))
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--masks", type=int, default=50)
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--stop-after", type=float, default=180, help="first-batch: stop the run after this many seconds")
    p.add_argument("--size", default="640x480", help="sa1b: WIDTHxHEIGHT of the generated images")
    p.add_argument("--tmp", default=None, help="folder for the generated manifests and outputs")
    args = p.parse_args(argv)
    benches = {"memory": bench_memory, "first-batch": bench_first_batch, "files": bench_files, "sa1b": bench_sa1b}
    benches[args.what](args)


if __name__ == "__main__":
    main()
