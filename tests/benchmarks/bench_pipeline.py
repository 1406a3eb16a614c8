"""The Ray Data pipeline against a bare in-process loop doing the same work, on the same machine and inputs.

A benchmark, not a test (pytest does not collect ``bench_*.py``)::

    /work/main/.venv/bin/python tests/benchmarks/bench_pipeline.py                  # defaults (~10-15 min, 2 cores)
    .venv/bin/python tests/benchmarks/bench_pipeline.py --model clipmaps-tiny-vit --size 224 --images 8 \\
        --repeats 1 --memory-scale 2                                                # smoke run (~2 min)
    .venv/bin/python tests/benchmarks/bench_pipeline.py --json out.json --keep-server

It starts SeaweedFS (``tests/s3server.py``, 127.0.0.1:8333), uploads generated scenes (``jobs.synth.scenes.make_scene``,
distinct seeds, JPEG) and JSONL manifests to the bucket, then for every repeat runs, one after the other in fresh
processes (``pipeline_worker.py``; the order alternates between repeats):

* **pipeline**: ``clipmaps.pipeline.run.run(spec)`` on a fresh local Ray: S3 manifest → decode tasks → one GEM
  actor (``min_actors = max_actors = 1``) → Parquet sink tasks writing to S3; the driver streams per-batch counts.
* **loop**: the same ``run(spec)`` in one process without Ray (``pipeline_loop.py``): the stages
  ``plan.build_dataset`` builds (same callables and configs: ``decode_batch``, ``MethodActor``, ``sink_batch``)
  run one batch at a time, decode → GEM → Parquet on S3; manifest read, output bookkeeping and markers are
  ``run()``'s own code.

Reported (medians over repeats): steady-state images/s (from the first finished batch to the last, a batch being
finished when its sink has written it; so for the loop: after one warm-up batch), end-to-end wall time (pipeline:
``ray.init`` + ``run()``, whose start-up includes starting the actor process and loading the model; loop:
``run()``: manifest read + model load + all batches; neither counts interpreter/torch import time;
``ray.shutdown`` is shown apart), their ratios, where the time goes (per-stage seconds per image from thin timing
wrappers around the three stage callables, ``pipeline_trace.py``; start-up milestones; how busy the GEM actor is in
the steady window) and the driver's peak RSS. Both sides get the same torch thread count through
``OMP_NUM_THREADS`` (Ray leaves a set value alone, so the GEM actor inherits it; the actor reports what it got;
``--ray-default-threads`` shows what Ray gives it otherwise: 1 thread per whole reserved CPU).

Then the memory check: the pipeline on N and on ``--memory-scale`` × N images (by default with the small
``clipmaps-tiny-vit`` at 224 for both runs: the question is the driver's RSS, not speed), peak RSS of the driver
process (``VmHWM``) in a fresh process per run; the target is ≤ 1.1x.

Before starting it waits (polling every minute, ``--wait-minutes``) while another CPU benchmark
(``bench_methods.py`` or its workers) runs on this machine: two benchmarks on 2 cores corrupt each other's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # tests.s3server

CLASSES = (
    "red circle",
    "green square",
    "blue triangle",
    "yellow circle",
    "purple square",
    "orange triangle",
    "red square",
    "green triangle",
    "blue circle",
    "yellow square",
)
TARGET_RATIO = 0.85
TARGET_MEMORY = 1.1
OTHER_BENCHMARKS = ("bench_methods", "clipmaps_worker.py", "upstream_worker.py")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="images per throughput run (default 32)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model, seeded random weights (default ViT-B-16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=448, help="GEM input size (default 448)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch, both sides (default 8)")
    p.add_argument("--classes", type=int, default=5, help="vocabulary size for the label maps (default 5)")
    p.add_argument("--image-size", default="640x480", help="generated JPEG size WxH (default 640x480)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on both sides (OMP_NUM_THREADS; default: all usable cores)",
    )
    p.add_argument(
        "--actor-cpus",
        type=float,
        default=1.0,
        help="methods.gem.resources.num_cpus (default 1: leaves 1 CPU for decode and sink tasks)",
    )
    p.add_argument("--decode-cpus", type=float, default=0.5, help="resources.decode_cpus (default 0.5)")
    p.add_argument(
        "--ray-default-threads",
        action="store_true",
        help="do not set OMP_NUM_THREADS for the pipeline: see what Ray gives the actor on its own",
    )
    p.add_argument("--memory-scale", type=int, default=10, help="the memory check's large run is this x N (10)")
    p.add_argument("--memory-images", type=int, default=None, help="N of the memory check (default --images)")
    p.add_argument("--memory-model", default="clipmaps-tiny-vit", help="model of the memory runs ('same' = --model)")
    p.add_argument("--memory-size", type=int, default=224, help="GEM size of the memory runs (default 224)")
    p.add_argument("--memory-repeats", type=int, default=1, help="runs per memory size (default 1)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--no-trace", action="store_true", help="no per-stage timing wrappers in the pipeline")
    p.add_argument(
        "--wait-minutes",
        type=float,
        default=40.0,
        help="wait this long for other benchmarks on the machine to finish (default 40; 0 = don't)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.10,
        help="before each run, wait while other processes use more than this share of the cores (0.10)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-run a run during which other processes took > 2x --quiet-threshold of the cores (2)",
    )
    p.add_argument("--data-dir", default=None, help="SeaweedFS data folder (default: a temporary one)")
    p.add_argument("--keep-server", action="store_true", help="leave SeaweedFS running (and its data) at the end")
    p.add_argument("--json", default=None, help="write every raw result and the summary here")
    p.add_argument("--from-json", default=None, help="print the report of an earlier run's --json file; run nothing")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    w, _, h = args.image_size.lower().partition("x")
    args.image_wh = (int(w), int(h))
    if not 1 <= args.classes <= len(CLASSES):
        p.error(f"--classes must be in 1..{len(CLASSES)}")
    if args.memory_images is None:
        args.memory_images = args.images
    if args.memory_model == "same":
        args.memory_model, args.memory_size = args.model, args.size
    return args


# ------------------------------------------------------------------------------------------------ machine
from bench_methods import cpu_model  # noqa: E402  (same folder, run as a script)


def machine_info(args) -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("torch", "ray", "open_clip_torch", "pyarrow", "s3fs", "pillow"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    mem_gb = None
    with contextlib.suppress(ValueError, OSError):
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **versions,
    }


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark processes on this machine (not this process)."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(name in cmd for name in OTHER_BENCHMARKS):
            found.append(f"{entry.name}: {cmd[:160]}")
    return found


def wait_for_quiet_machine(minutes: float) -> dict:
    started = time.time()
    seen = []
    while True:
        others = other_benchmarks()
        if not others:
            return {"waited_s": round(time.time() - started, 1), "seen": seen}
        if not seen:
            seen = others
        waited = time.time() - started
        if waited >= minutes * 60:
            print(
                f"WARNING: other benchmarks still running after {waited / 60:.0f} min; numbers will be disturbed:\n  "
                + "\n  ".join(others),
                flush=True,
            )
            return {"waited_s": round(waited, 1), "seen": seen, "still_running": others}
        print(
            f"[{time.strftime('%H:%M:%S')}] waiting for another benchmark to finish "
            f"({waited / 60:.0f}/{minutes:.0f} min):\n  " + "\n  ".join(others),
            flush=True,
        )
        time.sleep(60)


def cpu_group(cmdline: str) -> str:
    """Which part of a run a process of this benchmark is, from its command line (Ray sets process titles)."""
    if "pipeline_worker.py" in cmdline:
        return "driver"
    if "MethodActor" in cmdline:
        return "GEM actor"
    if "weed" in cmdline:
        return "S3 server"
    for key, group in (("raylet", "raylet"), ("gcs_server", "gcs_server")):
        if key in cmdline:
            return group
    if cmdline.startswith("ray::MapBatches") or cmdline.startswith("ray::IDLE") or "ray::MapBatches" in cmdline:
        return "Ray task workers (decode, sink)"
    return "other Ray processes"


class ForeignCpu:
    """CPU seconds used during a run, sampled from ``/proc`` every ``interval`` s: by processes that are not this
    benchmark's (this process and its descendants) — a measure of how much something else competed for the cores
    — and by this benchmark's own processes, grouped with :func:`cpu_group` (``mine``; this process excluded)."""

    def __init__(self, interval: float = 1.0):
        import threading

        self.interval = interval
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.seconds = 0.0
        self.names: dict[str, float] = {}
        self.mine: dict[str, float] = {}
        self.series: list[tuple[float, str, float]] = []  # (sample time, group, CPU s since the last sample)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seen: dict[tuple[int, int], int] = {}
        self._titles: dict[tuple[int, int], str] = {}

    def _snapshot(self) -> dict[tuple[int, int], tuple[int, str, bool]]:
        procs = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            name = raw[raw.index("(") + 1 : raw.rindex(")")]
            f = raw[raw.rindex(")") + 2 :].split()
            procs[int(entry.name)] = (int(f[1]), int(f[11]) + int(f[12]), int(f[19]), name)  # ppid, cpu, start
        mine = {os.getpid()}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, *_rest) in procs.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        out = {}
        for pid, (_ppid, cpu, start, name) in procs.items():
            if pid == os.getpid():
                continue
            if pid in mine:
                with contextlib.suppress(OSError):
                    name = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace"
                    ).strip() or name
            out[(pid, start)] = (cpu, name, pid in mine)
        return out

    def _run(self) -> None:
        self._seen = {k: v[0] for k, v in self._snapshot().items()}  # baseline
        while not self._done.wait(self.interval):
            self._accumulate()
        self._accumulate()

    def _accumulate(self) -> None:
        now = time.time()
        for key, (cpu, name, is_mine) in self._snapshot().items():
            delta = (cpu - self._seen.get(key, 0)) / self.ticks
            self._seen[key] = cpu
            if delta <= 0:
                continue
            if is_mine:
                group = cpu_group(name)
                self.mine[group] = self.mine.get(group, 0.0) + delta
                self.series.append((now, group, delta))
            else:
                self.seconds += delta
                self.names[name] = self.names.get(name, 0.0) + delta

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def top(self, n: int = 3) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.names.items(), key=lambda kv: -kv[1])[:n] if v >= 0.5}


def foreign_share(seconds: float = 5.0) -> tuple[float, dict]:
    """Share of all cores that other processes used over ``seconds``, and the top users."""
    with ForeignCpu(interval=1.0) as f:
        time.sleep(seconds)
    return f.seconds / (seconds * (os.cpu_count() or 1)), f.top()


class QuietMachine:
    """Before each run: wait while other processes use more than ``threshold`` of the cores (others' tests or
    benchmarks), polling every 30 s; all waits together are bounded by the ``--wait-minutes`` budget."""

    def __init__(self, minutes: float, threshold: float):
        self.deadline = time.time() + minutes * 60
        self.threshold = threshold
        self.waited_s = 0.0

    def wait(self, label: str) -> float:
        while True:
            share, top = foreign_share()
            if share <= self.threshold or time.time() >= self.deadline:
                if share > self.threshold:
                    print(
                        f"WARNING: {label} starts on a busy machine: other processes use {100 * share:.0f}% of the "
                        f"cores {top}",
                        flush=True,
                    )
                return share
            print(
                f"[{time.strftime('%H:%M:%S')}] {label}: other processes use {100 * share:.0f}% of the cores "
                f"{top}; waiting",
                flush=True,
            )
            t = time.time()
            time.sleep(30)
            self.waited_s += time.time() - t


# ------------------------------------------------------------------------------------------------ data
def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def upload_inputs(server, count: int, wh: tuple[int, int], prefix: str) -> list[dict]:
    """``count`` distinct scenes as JPEG under ``prefix/images``; returns the manifest rows."""
    from clipmaps.jobs.synth.scenes import make_scene

    fs = server.filesystem()
    rows, files = [], {}
    for i in range(count):
        scene = make_scene(1000 + i, size=wh)
        buf = io.BytesIO()
        scene.image.save(buf, format="JPEG", quality=92)
        key = f"{server.bucket}/{prefix}/images/scene-{i:05d}.jpg"
        files[key] = buf.getvalue()
        rows.append({"image_id": f"scene-{i:05d}", "image_uri": f"s3://{key}", "prompts": scene.names})
        if len(files) >= 64:
            fs.pipe(files)
            files = {}
    if files:
        fs.pipe(files)
    return rows


def put_manifest(server, rows: list[dict], key: str) -> str:
    server.filesystem().pipe(f"{server.bucket}/{key}", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return f"s3://{server.bucket}/{key}"


def make_spec(args, server, manifest: str, out: str, model: str, size: int) -> dict:
    opts = server.storage_options
    return {
        "input": {"manifest": manifest, "storage_options": opts},
        "output": {"uri": out, "storage_options": opts},
        "model": {"name": model, "seed": args.seed},
        "vocabulary": {"names": list(CLASSES[: args.classes]), "background": ["background"]},
        "methods": {
            "gem": {
                "size": size,
                "resources": {
                    "batch_size": args.batch_size,
                    "num_cpus": args.actor_cpus,
                    "num_gpus": 0,
                    "min_actors": 1,
                    "max_actors": 1,
                },
            }
        },
        "resources": {"decode_cpus": args.decode_cpus},
        # "local": always a fresh in-process Ray; null would join any cluster another process on this machine
        # registered in /tmp/ray/ray_current_cluster (`ray start`, ray.cluster_utils in tests)
        "run": {"progress": True, "ray_address": "local"},
    }


# ------------------------------------------------------------------------------------------------ runs
def run_worker(args, side: str, spec: dict, label: str, images: int, workdir: Path, trace: bool) -> dict:
    cfg = {"side": side, "spec": spec, "label": label, "images": images}
    if trace:
        cfg["trace"] = str(workdir / f"trace-{label}.jsonl")
    path = workdir / f"config-{label}.json"
    path.write_text(json.dumps(cfg))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    if side == "pipeline" and args.ray_default_threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(k, None)
    else:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with ForeignCpu() as foreign:
        proc = subprocess.run(
            [sys.executable, str(HERE / "pipeline_worker.py"), str(path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-5000:]).strip()
        raise RuntimeError(f"{label}: worker exited {proc.returncode} without a result:\n{tail}")
    res = json.loads(lines[-1][len("BENCH_RESULT ") :])
    res["process_wall_s"] = wall
    res["foreign_cpu_s"] = foreign.seconds
    res["foreign_cpu_share"] = foreign.seconds / (wall * (os.cpu_count() or 1))
    res["foreign_top"] = foreign.top()
    res["cpu_s_by_part"] = {k: round(v, 2) for k, v in sorted(foreign.mine.items(), key=lambda kv: -kv[1])}
    res["cpu_series"] = [(round(t, 2), g, round(d, 3)) for t, g, d in foreign.series]
    res["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    res["output_uri"] = spec["output"]["uri"]
    res.update(analyse(res))
    return res


def _overlap(events: list[dict], lo: float, hi: float) -> float:
    return sum(max(0.0, min(e["t1"], hi) - max(e["t0"], lo)) for e in events)


def analyse(res: dict) -> dict:
    """Throughput and where the time went, from the progress points and the stage events of one run."""
    progress = res["progress"]
    events = res.get("events") or []
    t_start, t_end = res["t_start"], res["t_end"]
    n = res["processed"]
    out: dict = {"e2e_s": t_end - t_start, "e2e_ips": n / (t_end - t_start) if t_end > t_start else None}
    # a batch is finished when its sink task has written it (the trace's sink ends); the driver's progress lines
    # can lag behind that (see driver_lag_s), so they are only the fallback without a trace
    sinks = sorted((e for e in events if e["stage"] == "sink"), key=lambda e: e["t1"])
    finished, done = [], 0
    for e in sinks:
        done += e["rows"]
        finished.append((e["t1"], done))
    out["finished_from"] = "sink" if finished else "driver"
    finished = finished or [tuple(p) for p in progress]
    if finished and progress:
        lags = []
        for t, rows in progress:
            reached = [ft for ft, fr in finished if fr >= rows]
            if reached:
                lags.append(t - reached[0])
        out["driver_lag_s"] = statistics.median(lags) if lags else None
    if finished:
        t_first, n_first = finished[0]
        t_last, n_last = finished[-1]
        out["first_batch_s"] = t_first - t_start
        out["first_batch_rows"] = n_first
        out["batches_finished"] = len(finished)
        if t_last > t_first and n_last > n_first:
            out["steady_ips"] = (n_last - n_first) / (t_last - t_first)
            out["steady_window_s"] = t_last - t_first
            by = {}
            for e in events:
                by.setdefault(e["stage"], []).append(e)
            busy = {
                s: _overlap(v, t_first, t_last) / (t_last - t_first)
                for s, v in by.items()
                if s in ("decode", "actor", "sink")
            }
            out["busy_in_steady_window"] = busy
            # cores each part of the run used in the window (samples are 1 s apart: a sample at t covers (t-1, t])
            cores: dict = {}
            for t, group, delta in res.get("cpu_series") or []:
                if t_first + 1 <= t <= t_last:
                    cores[group] = cores.get(group, 0.0) + delta
            span = max(1e-9, (t_last - t_first) - 1)
            out["cores_in_steady_window"] = {g: v / span for g, v in cores.items()}
        if len(progress) >= 2 and progress[-1][0] > progress[0][0] and progress[-1][1] > progress[0][1]:
            out["steady_ips_driver"] = (progress[-1][1] - progress[0][1]) / (progress[-1][0] - progress[0][0])
    out["plan_ready_s"] = res.get("plan_said_s")
    decodes = [e for e in events if e["stage"] == "decode"]
    if decodes:
        out["first_decode_after_s"] = min(e["t0"] for e in decodes) - t_start
    stages: dict = {}
    for stage in ("decode", "actor", "sink"):
        evs = [e for e in events if e["stage"] == stage]
        if evs:
            per_image = [(e["t1"] - e["t0"]) / e["rows"] for e in evs if e["rows"]]
            stages[stage] = {
                "calls": len(evs),
                "rows": sum(e["rows"] for e in evs),
                "total_s": sum(e["t1"] - e["t0"] for e in evs),
                "median_s_per_image": statistics.median(per_image) if per_image else None,
                "rows_per_call": sorted({e["rows"] for e in evs}),
            }
            if all("cpu_s" in e for e in evs):
                stages[stage]["cores_used"] = sum(e["cpu_s"] for e in evs) / stages[stage]["total_s"]
    out["stages"] = stages
    inits = [e for e in events if e["stage"] == "actor_init"]
    if inits:
        e = inits[0]
        out["actor_init_s"] = e["t1"] - e["t0"]
        out["actor_ready_after_s"] = e["t1"] - t_start
        if e.get("process_started"):
            out["actor_process_started_after_s"] = e["process_started"] - t_start
        out["actor_torch_threads"] = e.get("torch_threads")
        out["actor_omp_env"] = e.get("omp_env")
        out["actor_pids"] = sorted({x["pid"] for x in events if x["stage"] in ("actor", "actor_init")})
    actor_calls = sorted((e for e in events if e["stage"] == "actor"), key=lambda e: e["t0"])
    if actor_calls:
        out["first_actor_call_after_s"] = actor_calls[0]["t0"] - t_start
        out["last_actor_end_to_done_s"] = t_end - actor_calls[-1]["t1"]
        gaps = [b["t0"] - a["t1"] for a, b in zip(actor_calls, actor_calls[1:])]
        out["actor_idle_between_calls_s"] = sum(max(0.0, g) for g in gaps)
    return out


def check_output(server, uri: str, images: int, prompts: int) -> dict:
    import pyarrow.dataset as pads

    fs = server.filesystem()
    root = uri.removeprefix("s3://")
    counts = {}
    for name in ("labels", "heatmaps", "errors"):
        path = f"{root}/{name}"
        counts[name] = pads.dataset(path, filesystem=fs, format="parquet").count_rows() if fs.exists(path) else 0
    counts["ok"] = counts["labels"] == images and counts["heatmaps"] == images * prompts and counts["errors"] == 0
    return counts


def compare_outputs(server, uri_a: str, uri_b: str) -> dict:
    """Whether two runs wrote the same label maps and heatmaps: byte-identical rows, and for the others the decoded
    difference (label pixels that differ; heatmap max abs difference and pixels that differ)."""
    import numpy as np
    import pyarrow.dataset as pads

    from clipmaps.schemas.encodings import decode_heatmap, decode_label_map

    fs = server.filesystem()

    def load(uri, name, key):
        t = pads.dataset(f"{uri.removeprefix('s3://')}/{name}", filesystem=fs, format="parquet").to_table()
        return {tuple(r[k] for k in key): r for r in t.to_pylist()}

    out = {}
    for name, key in (("labels", ("image_id",)), ("heatmaps", ("image_id", "prompt"))):
        a, b = load(uri_a, name, key), load(uri_b, name, key)
        field = "label_map" if name == "labels" else "heatmap"
        same = [k for k in a if k in b and a[k][field] == b[k][field]]
        res = {"rows": len(a), "same_keys": set(a) == set(b), "identical": len(same)}
        diff_px = total_px = 0
        max_abs = 0.0
        for k in a:
            if k not in b or k in same:
                continue
            if name == "labels":
                x, y = decode_label_map(a[k][field]), decode_label_map(b[k][field])
            else:
                x = decode_heatmap(a[k][field], a[k]["encoding"], a[k]["height"], a[k]["width"])
                y = decode_heatmap(b[k][field], b[k]["encoding"], b[k]["height"], b[k]["width"])
                max_abs = max(max_abs, float(np.abs(x - y).max()))
            diff_px += int((x != y).sum())
            total_px += x.size
        if total_px:
            res["differing_pixels"] = f"{diff_px}/{total_px} in the differing rows"
            if name == "heatmaps":
                res["max_abs_diff"] = round(max_abs, 5)
        out[name] = res
    return out


def batch_compositions(runs: list[dict]) -> dict:
    """Per side, the image ids of each sink batch (from the trace): do pipeline and loop batch the same images?"""
    by = {}
    for r in runs:
        ids = [tuple(sorted(e["ids"])) for e in r.get("events") or [] if e["stage"] == "sink" and "ids" in e]
        if ids:
            by.setdefault(r["side"], set()).add(tuple(sorted(ids)))
    if "pipeline" not in by or "loop" not in by:
        return {}
    return {
        "loop_runs_identical": len(by["loop"]) == 1,
        "pipeline_runs_identical": len(by["pipeline"]) == 1,
        "pipeline_batches_like_loop": by["pipeline"] == by["loop"],
    }


def attempt(args, quiet, server, side, label, stamp, workdir, trace, spec_for, images, prompts) -> dict:
    """One measured run; when other processes took more than twice ``--quiet-threshold`` of the cores during it,
    wait for a quiet machine and run it again (``--retries`` times at most; each attempt has its own output)."""
    tries = []
    for k in range(args.retries + 1):
        name = label if k == 0 else f"{label}-again{k}"
        before = quiet.wait(name)
        out = f"s3://{server.bucket}/bench/out-{stamp}/{name}"
        res = run_worker(args, side, spec_for(out), name, images, workdir, trace)
        res["foreign_share_before"] = before
        res["check"] = check_output(server, out, images, prompts)
        disturbed = res["foreign_cpu_share"] > 2 * args.quiet_threshold
        extra = (
            f"steady {fmt(res.get('steady_ips'))} images/s, e2e {res['e2e_s']:.1f} s "
            f"({fmt(res.get('e2e_ips'))} images/s), first batch after {fmt(res.get('first_batch_s'), '.1f')} s, "
            f"actor threads {res.get('actor_torch_threads')}, "
            if side == "pipeline" or trace
            else ""
        )
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: {extra}driver peak {res['rss_kb']['peak_hwm'] / 1024:.0f} MB, "
            f"outputs {res['check']}, other processes used {100 * res['foreign_cpu_share']:.0f}% of the cores "
            f"{res['foreign_top']}" + (" -> disturbed" if disturbed else ""),
            flush=True,
        )
        tries.append(res)
        if not disturbed:
            break
    best = min(tries, key=lambda r: r["foreign_cpu_share"])
    best["attempts"] = [{"label": r["label"], "foreign_cpu_share": r["foreign_cpu_share"]} for r in tries]
    return best


# ------------------------------------------------------------------------------------------------ report
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def summarise(args, runs: list[dict]) -> dict:
    by = {"pipeline": [r for r in runs if r["side"] == "pipeline"], "loop": [r for r in runs if r["side"] == "loop"]}
    s: dict = {}
    for side, rs in by.items():
        s[side] = {
            "steady_ips": median([r.get("steady_ips") for r in rs]),
            "e2e_s": median([r.get("e2e_s") for r in rs]),
            "e2e_ips": median([r.get("e2e_ips") for r in rs]),
            "first_batch_s": median([r.get("first_batch_s") for r in rs]),
            "actor_init_s": median([r.get("actor_init_s") for r in rs]),
            "plan_ready_s": median([r.get("plan_ready_s") for r in rs]),
            "first_decode_after_s": median([r.get("first_decode_after_s") for r in rs]),
            "peak_rss_mb": median([r["rss_kb"]["peak_hwm"] / 1024 for r in rs]),
            "per_image_s": {
                st: median([(r["stages"].get(st) or {}).get("median_s_per_image") for r in rs])
                for st in ("decode", "actor", "sink")
            },
            "actor_cores_used": median([(r["stages"].get("actor") or {}).get("cores_used") for r in rs]),
            "actor_cpu_s_per_image": median(
                [
                    sum(e.get("cpu_s", 0) for e in r["events"] if e["stage"] == "actor") / r["processed"]
                    for r in rs
                    if any("cpu_s" in e for e in r["events"]) and r["processed"]
                ]
            ),
            "cpu_s_per_image": median(
                [
                    sum(r["cpu_s_by_part"].values()) / r["processed"]
                    for r in rs
                    if r.get("cpu_s_by_part") and r["processed"]
                ]
            ),
            "steady_runs": [r.get("steady_ips") for r in rs],
            "e2e_runs": [r.get("e2e_s") for r in rs],
            "torch_threads": sorted({r.get("actor_torch_threads") for r in rs if r.get("actor_torch_threads")}),
            "foreign_cpu_share": [round(r.get("foreign_cpu_share", 0), 3) for r in rs],
            "cpu_s_by_part": {
                g: median([(r.get("cpu_s_by_part") or {}).get(g, 0.0) for r in rs])
                for g in sorted({g for r in rs for g in (r.get("cpu_s_by_part") or {})})
            },
            "cores_in_steady_window": {
                g: median([(r.get("cores_in_steady_window") or {}).get(g, 0.0) for r in rs])
                for g in sorted({g for r in rs for g in (r.get("cores_in_steady_window") or {})})
            },
        }
    p, lp = by["pipeline"], by["loop"]
    s["pipeline"].update(
        {
            "ray_init_s": median([r.get("ray_init_s") for r in p]),
            "shutdown_s": median([r.get("shutdown_s") for r in p]),
            "actor_ready_after_s": median([r.get("actor_ready_after_s") for r in p]),
            "actor_process_started_after_s": median([r.get("actor_process_started_after_s") for r in p]),
            "first_actor_call_after_s": median([r.get("first_actor_call_after_s") for r in p]),
            "actor_busy": median([(r.get("busy_in_steady_window") or {}).get("actor") for r in p]),
            "decode_busy": median([(r.get("busy_in_steady_window") or {}).get("decode") for r in p]),
            "sink_busy": median([(r.get("busy_in_steady_window") or {}).get("sink") for r in p]),
            "actor_idle_between_calls_s": median([r.get("actor_idle_between_calls_s") for r in p]),
            "last_actor_end_to_done_s": median([r.get("last_actor_end_to_done_s") for r in p]),
            "driver_lag_s": median([r.get("driver_lag_s") for r in p]),
            "steady_ips_driver": median([r.get("steady_ips_driver") for r in p]),
        }
    )
    s["loop"]["first_actor_call_after_s"] = median([r.get("first_actor_call_after_s") for r in lp])
    ps, ls = s["pipeline"], s["loop"]
    s["steady_ratio"] = ps["steady_ips"] / ls["steady_ips"] if ps["steady_ips"] and ls["steady_ips"] else None
    s["e2e_ratio"] = ps["e2e_ips"] / ls["e2e_ips"] if ps["e2e_ips"] and ls["e2e_ips"] else None
    # fixed cost per side: what end to end costs beyond N images at the steady rate; then the N where the
    # end-to-end ratio would reach the target (if the steady ratio allows it)
    for side in ("pipeline", "loop"):
        d = s[side]
        d["fixed_s"] = d["e2e_s"] - args.images / d["steady_ips"] if d["e2e_s"] and d["steady_ips"] else None
    s["images_for_e2e_target"] = None
    if ps.get("fixed_s") is not None and ls.get("fixed_s") is not None:
        slope = 1 / ls["steady_ips"] - TARGET_RATIO / ps["steady_ips"]
        need = TARGET_RATIO * ps["fixed_s"] - ls["fixed_s"]
        s["images_for_e2e_target"] = max(0.0, need / slope) if slope > 0 else float("inf")
    return s


def _ratio(a, b) -> str:
    return fmt(a / b, ".2f") if a and b else "-"


def print_report(args, info: dict, summary: dict | None, memory: dict | None, checks: dict) -> None:
    print()
    print(
        f"machine: {info['cpu']} | {info['cores']} cores ({info['cores_usable']} usable) | "
        f"{fmt(info['memory_gb'], '.0f')} GB | {info['platform']} | python {info['python']} | torch "
        f"{info['torch']} | ray {info['ray']} | pyarrow {info['pyarrow']} | s3fs {info['s3fs']}"
    )
    w, h = args.image_wh
    print(
        f"config: GEM on {args.model} (seeded random weights) at {args.size}, {args.images} images {w}x{h} JPEG "
        f"from SeaweedFS S3 on 127.0.0.1, batch {args.batch_size}, labels over {args.classes} classes + 1 "
        f"background and png8 heatmaps for 3 manifest prompts/image, Parquet to S3; pipeline: 1 GEM actor "
        f"(num_cpus {args.actor_cpus:g}), decode tasks num_cpus {args.decode_cpus:g}; torch threads "
        f"{'Ray default (pipeline) / ' if args.ray_default_threads else ''}{args.threads} (OMP_NUM_THREADS); "
        f"{args.repeats} repeats, alternating order, medians"
    )
    if summary:
        p, lp = summary["pipeline"], summary["loop"]
        print(f"torch threads seen in the GEM actor: pipeline {p['torch_threads']}, loop {lp['torch_threads']}")
        print()
        rows = [
            (
                "steady-state images/s  [target]",
                fmt(p["steady_ips"]),
                fmt(lp["steady_ips"]),
                fmt(summary["steady_ratio"], ".2f"),
                f">= {TARGET_RATIO}",
            ),
            (
                "end-to-end images/s",
                fmt(p["e2e_ips"]),
                fmt(lp["e2e_ips"]),
                fmt(summary["e2e_ratio"], ".2f"),
                f"(at N={args.images})",
            ),
            ("end-to-end s", fmt(p["e2e_s"], ".1f"), fmt(lp["e2e_s"], ".1f"), "", ""),
            ("  fixed cost s (e2e - N/steady)", fmt(p.get("fixed_s"), ".1f"), fmt(lp.get("fixed_s"), ".1f"), "", ""),
            ("  first batch done after s", fmt(p["first_batch_s"], ".1f"), fmt(lp["first_batch_s"], ".1f"), "", ""),
            ("  ray.init s", fmt(p["ray_init_s"], ".1f"), "-", "", ""),
            (
                "  manifest read, output prepared after s",
                fmt(p["plan_ready_s"], ".1f"),
                fmt(lp["plan_ready_s"], ".1f"),
                "",
                "",
            ),
            (
                "  first decode started after s",
                fmt(p["first_decode_after_s"], ".1f"),
                fmt(lp["first_decode_after_s"], ".1f"),
                "",
                "",
            ),
            ("  GEM actor process started after s", fmt(p["actor_process_started_after_s"], ".1f"), "-", "", ""),
            ("  model load (actor __init__) s", fmt(p["actor_init_s"], ".1f"), fmt(lp["actor_init_s"], ".1f"), "", ""),
            ("  actor ready after s", fmt(p["actor_ready_after_s"], ".1f"), "-", "", ""),
            (
                "  first GEM call after s",
                fmt(p["first_actor_call_after_s"], ".1f"),
                fmt(lp["first_actor_call_after_s"], ".1f"),
                "",
                "",
            ),
            ("  ray.shutdown s (not in e2e)", fmt(p["shutdown_s"], ".1f"), "-", "", ""),
            (
                "decode s/image (fetch+decode+resize)",
                fmt(p["per_image_s"]["decode"]),
                fmt(lp["per_image_s"]["decode"]),
                "",
                "",
            ),
            ("GEM actor call s/image", fmt(p["per_image_s"]["actor"]), fmt(lp["per_image_s"]["actor"]), "", ""),
            (
                "  cores used by the GEM process in its calls",
                fmt(p["actor_cores_used"], ".2f"),
                fmt(lp["actor_cores_used"], ".2f"),
                "",
                "",
            ),
            (
                "  CPU s per image in GEM calls",
                fmt(p["actor_cpu_s_per_image"], ".2f"),
                fmt(lp["actor_cpu_s_per_image"], ".2f"),
                _ratio(lp["actor_cpu_s_per_image"], p["actor_cpu_s_per_image"]),
                "",
            ),
            ("sink s/image (encode+Parquet+S3)", fmt(p["per_image_s"]["sink"]), fmt(lp["per_image_s"]["sink"]), "", ""),
            (
                "CPU s per image, all processes of the run",
                fmt(p["cpu_s_per_image"], ".2f"),
                fmt(lp["cpu_s_per_image"], ".2f"),
                _ratio(lp["cpu_s_per_image"], p["cpu_s_per_image"]),
                "",
            ),
            ("driver peak RSS MB (VmHWM)", fmt(p["peak_rss_mb"], ".0f"), fmt(lp["peak_rss_mb"], ".0f"), "", ""),
        ]
        widths = [max(len(r[i]) for r in rows + [("", "pipeline", "loop", "ratio", "target")]) for i in range(5)]
        head = ("", "pipeline", "loop", "ratio", "target")
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(head)))
        for r in rows:
            print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        print()
        print(
            f"CPU share taken by other processes during each run: pipeline {p['foreign_cpu_share']}, loop "
            f"{lp['foreign_cpu_share']} (of all cores; > 0.05 means the numbers were disturbed)"
        )
        for side, d in (("pipeline", p), ("loop", lp)):
            parts = d["cpu_s_by_part"]
            if parts:
                total = sum(parts.values())
                ranked = sorted(parts.items(), key=lambda kv: -kv[1])
                print(
                    f"CPU seconds of the {side} run by process (median; sampled from /proc each second): total "
                    f"{total:.0f} = " + ", ".join(f"{g} {v:.1f}" for g, v in ranked)
                )
        for side, d in (("pipeline", p), ("loop", lp)):
            parts = d["cores_in_steady_window"]
            if parts:
                ranked = sorted(parts.items(), key=lambda kv: -kv[1])
                print(
                    f"cores used in the steady window by the {side} run's processes: total "
                    f"{sum(parts.values()):.2f} = " + ", ".join(f"{g} {v:.2f}" for g, v in ranked)
                )
        print(
            f"per repeat: pipeline steady {[fmt(x, '.3f') for x in p['steady_runs']]} e2e s "
            f"{[fmt(x, '.1f') for x in p['e2e_runs']]}; loop steady {[fmt(x, '.3f') for x in lp['steady_runs']]} "
            f"e2e s {[fmt(x, '.1f') for x in lp['e2e_runs']]}"
        )
        if p["actor_busy"] is not None:
            print(
                f"pipeline: the driver saw finished batches {fmt(p['driver_lag_s'], '.1f')} s (median) after their "
                f"sink task ended (steady images/s from the driver's progress lines: "
                f"{fmt(p['steady_ips_driver'])})"
            )
            print(
                f"pipeline steady window: GEM actor busy {100 * p['actor_busy']:.0f}%, decode tasks "
                f"{100 * (p['decode_busy'] or 0):.0f}%, sink tasks {100 * (p['sink_busy'] or 0):.0f}% of the "
                f"window (overlapping); actor idle between calls {fmt(p['actor_idle_between_calls_s'], '.1f')} s "
                f"in the whole run; last GEM call to job done {fmt(p['last_actor_end_to_done_s'], '.1f')} s"
            )
        n_target = summary.get("images_for_e2e_target")
        if n_target is not None:
            print(
                "end-to-end ratio reaches the target at N >= "
                + ("never (steady ratio below target)" if n_target == float("inf") else f"{n_target:.0f} images")
                + " (extrapolated from the fixed costs and steady rates above)"
            )
        print("the target compares the steady-state ratio (Ray's fixed costs amortised); end to end at this N is shown")
    if checks:
        print(
            f"outputs complete in every run: {checks.get('outputs_ok')}; pipeline vs loop outputs (repeat 1): "
            f"{checks.get('same_outputs')}; same images batched together: {checks.get('batches')}"
        )
    if memory:
        print()
        print(
            f"driver memory (pipeline, {memory['model']} at {memory['size']}, batch {args.batch_size}; "
            "fresh process per run, VmHWM):"
        )
        print(
            f"  {'images':>7}  {'peak MB':>8}  {'after imports MB':>16}  {'after ray.init MB':>17}  "
            f"{'after run MB':>12}  {'run s':>6}"
        )
        for n, rs in sorted(memory["runs"].items(), key=lambda kv: int(kv[0])):
            for r in rs:
                kb = r["rss_kb"]
                print(
                    f"  {n:>7}  {kb['peak_hwm'] / 1024:8.0f}  {kb.get('after_imports', 0) / 1024:16.0f}  "
                    f"{kb.get('after_ray_init', 0) / 1024:17.0f}  {kb.get('after_run', 0) / 1024:12.0f}  "
                    f"{r['e2e_s']:6.1f}"
                )
        ratio = memory.get("ratio")
        print(
            f"  peak RSS ratio {memory['large']} / {memory['small']} images: {fmt(ratio, '.3f')} "
            f"(target <= {TARGET_MEMORY}) -> {'PASS' if ratio is not None and ratio <= TARGET_MEMORY else 'FAIL'}"
        )


def report_from_json(path: str) -> int:
    """Re-analyse and print an earlier run's raw results (its own options)."""
    doc = json.loads(Path(path).read_text())
    args = argparse.Namespace(**doc["args"])
    runs = doc["runs"]
    for r in runs:
        r.update(analyse(r))
    summary = summarise(args, runs) if runs else None
    memory = doc.get("memory")
    if memory:
        memory["runs"] = {k: v for k, v in memory["runs"].items()}
    print_report(args, doc["machine"], summary, memory, doc.get("checks") or {})
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json)
    from tests.helpers import s3server

    info = machine_info(args)
    started = time.time()
    if args.wait_minutes > 0:
        info["waited_for_others"] = wait_for_quiet_machine(args.wait_minutes)
    quiet = QuietMachine(max(0.0, args.wait_minutes - (time.time() - started) / 60), args.quiet_threshold)
    deadline = started + args.wait_minutes * 60
    while port_in_use(s3server.S3_PORT):  # another S3 server (a test run's) holds the port: wait for it
        if time.time() >= deadline:
            print(
                f"port {s3server.S3_PORT} is in use on 127.0.0.1 (another S3 server / test run?); stop it first",
                file=sys.stderr,
            )
            return 2
        print(
            f"[{time.strftime('%H:%M:%S')}] port {s3server.S3_PORT} is in use (another S3 server); waiting", flush=True
        )
        time.sleep(15)
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="clipmaps-bench-s3-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="clipmaps-bench-pipeline-"))
    import signal

    runs: list[dict] = []

    def on_term(signum, frame):  # e.g. someone else's cleanup: stop the server and keep what has been measured
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    def save(summary=None, memory=None, checks=None) -> None:
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "args": dict(vars(args)),
                        "machine": info,
                        "summary": summary,
                        "memory": memory,
                        "checks": checks or {},
                        "runs": runs,
                    },
                    indent=1,
                    default=str,
                )
            )

    proc, server = s3server.start(data_dir)
    print(f"SeaweedFS S3 at {server.endpoint} (data {data_dir}), work files {workdir}", flush=True)
    memory = None
    summary = None
    checks: dict = {}
    try:
        total = max(
            args.images if not args.skip_throughput else 0,
            args.memory_images * args.memory_scale if not args.skip_memory else 0,
        )
        t0 = time.time()
        rows = upload_inputs(server, total, args.image_wh, "bench")
        print(f"uploaded {total} images in {time.time() - t0:.1f} s", flush=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        prompts = len(rows[0]["prompts"]) if rows else 0
        if not args.skip_throughput:
            manifest = put_manifest(server, rows[: args.images], f"bench/manifest-{args.images}.jsonl")
            outs_ok = []
            for rep in range(args.repeats):
                order = ("pipeline", "loop") if rep % 2 == 0 else ("loop", "pipeline")
                for side in order:
                    label = f"{side}-r{rep + 1}"
                    res = attempt(
                        args,
                        quiet,
                        server,
                        side,
                        label,
                        stamp,
                        workdir,
                        not args.no_trace,
                        lambda out: make_spec(args, server, manifest, out, args.model, args.size),
                        args.images,
                        prompts,
                    )
                    res["repeat"] = rep + 1
                    outs_ok.append(res["check"]["ok"])
                    runs.append(res)
                    save()
            checks["outputs_ok"] = all(outs_ok)
            first = {r["side"]: r["output_uri"] for r in runs if r["repeat"] == 1}
            checks["same_outputs"] = compare_outputs(server, first["pipeline"], first["loop"])
            checks["batches"] = batch_compositions(runs)
            summary = summarise(args, runs)
        if not args.skip_memory:
            small, large = args.memory_images, args.memory_images * args.memory_scale
            memory = {"model": args.memory_model, "size": args.memory_size, "small": small, "large": large, "runs": {}}
            manifests = {n: put_manifest(server, rows[:n], f"bench/manifest-{n}.jsonl") for n in (small, large)}
            order = []
            for rep in range(args.memory_repeats):
                order += [small, large] if rep % 2 == 0 else [large, small]
            for i, n in enumerate(order):
                label = f"memory-{n}-{i + 1}"
                res = attempt(
                    args,
                    quiet,
                    server,
                    "pipeline",
                    label,
                    stamp,
                    workdir,
                    False,
                    lambda out, n=n: make_spec(args, server, manifests[n], out, args.memory_model, args.memory_size),
                    n,
                    prompts,
                )
                memory["runs"].setdefault(str(n), []).append(res)
                save(summary, memory, checks)
            peak = {n: median([r["rss_kb"]["peak_hwm"] for r in memory["runs"][str(n)]]) for n in (small, large)}
            memory["peak_kb"] = peak
            memory["ratio"] = peak[large] / peak[small] if peak[small] else None
    finally:
        if args.keep_server:
            print(f"SeaweedFS left running (pid {proc.pid}, data {data_dir})")
        else:
            s3server.stop(proc)
            if not args.data_dir:
                shutil.rmtree(data_dir, ignore_errors=True)
        save(summary, memory, checks)  # also what an interrupted run had finished
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(args, info, summary, memory, checks)
    if args.json:
        print(f"\nraw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
