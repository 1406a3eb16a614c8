"""Benchmark (prints figures; not a timed test): SA-1B-shaped masks by reference through the decode stage in Ray.

Generates ``--images`` JPEGs of ``--size`` with ``--masks`` RLE masks each, written as SA-1B per-image JSON files,
and a manifest whose rows point to them (``masks_uri``); then runs ``decode_batch`` over the rows in Ray tasks
(``ray.init(address="local", num_cpus=2)``, ``map_batches``) as the job's decode stage does (``need_masks``, the
square input of MaskInversion at ``--square`` px, ``mask_rle``), and prints:

* wall time from the first batch submitted to the last row back, and time per image;
* the decode time per image measured inside the workers (CPU seconds of the stage itself);
* the peak RSS of the worker processes (``ru_maxrss`` of each Ray worker that decoded, the largest), and the same
  for a pass that only reads the rows (the worker's own baseline);
* the driver's peak RSS.

Run: ``.venv/bin/python tests/benchmarks/bench_mask_refs.py [--images 200 --masks 100 --size 2250x1500]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipmaps.pipeline.decode import DecodeConfig, decode_batch
from clipmaps.schemas import batches as B
from clipmaps.schemas.encodings import rle_encode


def _rss_mb() -> float:
    """This process's peak RSS in MB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(root: Path, images: int, masks: int, width: int, height: int, seed: int = 0) -> list[dict]:
    """``images`` JPEGs and SA-1B JSONs under ``root``; returns the manifest rows (masks by reference).

    Masks are rectangles with a random hole drawn from a pool of ``3 × masks`` encoded once (encoding 20,000
    full-size masks would take longer than the benchmark), each image taking ``masks`` of them in its own order."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(3 * masks):
        m = np.zeros((height, width), bool)
        y, x = int(rng.integers(0, height - 40)), int(rng.integers(0, width - 40))
        dy, dx = int(rng.integers(20, height // 3)), int(rng.integers(20, width // 3))
        m[y : y + dy, x : x + dx] = True
        m[y + dy // 3 : y + dy // 2, x + dx // 3 : x + dx // 2] = False
        pool.append(rle_encode(m))
    noise = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    picture = Image.fromarray(noise).resize((width, height), Image.Resampling.BILINEAR)
    rows = []
    for k in range(images):
        name = f"sa_{k}"
        picture.save(root / f"{name}.jpg", quality=85)
        chosen = rng.choice(len(pool), size=masks, replace=False)
        doc = {
            "image": {"image_id": k, "file_name": f"{name}.jpg", "width": width, "height": height},
            "annotations": [
                {"id": 1000 * k + j, "segmentation": pool[int(c)], "area": 0, "bbox": [0, 0, 0, 0]}
                for j, c in enumerate(chosen)
            ],
        }
        (root / f"{name}.json").write_text(json.dumps(doc))
        rows.append(
            {"image_id": str(k), "image_uri": str(root / f"{name}.jpg"), "masks_uri": str(root / f"{name}.json")}
        )
    return rows


def decode_and_measure(batch: dict, config: DecodeConfig) -> dict:
    """``decode_batch`` on one batch; returns small columns only (ids, masks, the stage's time, the worker's peak RSS),
    so that the object store holds no pixels."""
    t0 = time.process_time()
    out = decode_batch(batch, config)
    seconds = time.process_time() - t0
    n = len(out[B.IMAGE_ID])
    return {
        "image_id": out[B.IMAGE_ID],
        "masks": np.array([len(v) if B.present(v) else -1 for v in out[B.MASK_IDS]]),
        "errors": np.array([B.present(v) for v in out[B.ERROR_STAGE]]),
        "cpu_s": np.full(n, seconds / max(n, 1)),
        "worker_rss_mb": np.full(n, _rss_mb()),
    }


def read_only(batch: dict) -> dict:
    n = len(batch["image_id"])
    return {"image_id": batch["image_id"], "worker_rss_mb": np.full(n, _rss_mb())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--masks", type=int, default=100)
    p.add_argument("--size", default="2250x1500", help="WIDTHxHEIGHT (SA-1B: 1500 px on the short side)")
    p.add_argument("--square", type=int, default=224, help="MaskInversion's input size (masks_square)")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    import ray

    with tempfile.TemporaryDirectory(prefix="clipmaps-bench-refs-") as tmp:
        t = time.perf_counter()
        rows = generate(Path(tmp), args.images, args.masks, width, height)
        print(
            f"FIGURES generated {args.images} images {width}x{height} with {args.masks} masks each "
            f"({sum(f.stat().st_size for f in Path(tmp).glob('*.json')) / 1e6:.1f} MB of JSON) in "
            f"{time.perf_counter() - t:.1f} s"
        )
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            config = DecodeConfig(square_size=args.square, need_masks=True, io_threads=4)
            base = ray.data.from_items(rows).map_batches(read_only, batch_size=args.batch_size, batch_format="numpy")
            baseline = max(r["worker_rss_mb"] for r in base.take_all())
            ds = ray.data.from_items(rows).map_batches(
                decode_and_measure, fn_kwargs={"config": config}, batch_size=args.batch_size, batch_format="numpy"
            )
            t = time.perf_counter()
            out = ds.take_all()
            wall = time.perf_counter() - t
        finally:
            ray.shutdown()
    n = len(out)
    masks = sum(int(r["masks"]) for r in out)
    errors = sum(bool(r["errors"]) for r in out)
    cpu = sum(float(r["cpu_s"]) for r in out)
    peak = max(float(r["worker_rss_mb"]) for r in out)
    print(f"FIGURES rows {n}, masks decoded {masks} ({masks / max(n, 1):.1f} per image), error rows {errors}")
    print(
        f"FIGURES wall {wall:.1f} s for {n} images: {wall / max(n, 1):.3f} s per image "
        f"(2 CPUs, batch {args.batch_size})"
    )
    print(
        f"FIGURES decode stage CPU time {cpu / max(n, 1):.3f} s per image "
        f"({cpu / max(masks, 1) * 1000:.1f} ms per mask)"
    )
    print(f"FIGURES worker peak RSS {peak:.0f} MB decoding (the same worker reading rows only: {baseline:.0f} MB)")
    print(f"FIGURES driver peak RSS {_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
