"""One timed run for ``bench_pipeline.py``, in its own process (so peak memory and Ray state never carry over).

    python tests/benchmarks/pipeline_worker.py CONFIG.json      # prints one ``BENCH_RESULT {json}`` line

``side: pipeline`` — ``ray.init`` with the arguments ``run()`` uses, then ``clipmaps.pipeline.run.run(spec)``
(which, finding Ray started, leaves it running), then ``ray.shutdown`` (timed apart). Per finished batch the
driver's progress callback records (time, images done).

``side: loop`` — the same ``run(spec)`` in this process without Ray (``pipeline_loop.in_process``): the stages
``plan.build_dataset`` builds run one batch at a time, decode → GEM actor → sink, in this process.

Both sides: the driver's RSS is sampled every 100 ms from ``/proc/self/status`` and its kernel peak (``VmHWM``) is
read at the end (VmHWM is exact; the sampled max is a cross-check). Torch threads come from ``OMP_NUM_THREADS`` in
the environment the orchestrator sets.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

T_PROCESS = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Samples this process's RSS (``VmRSS``) every ``interval`` s; keeps the max and a coarse time series."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval = interval
        self.max_kb = 0
        self.series: list[tuple[float, int]] = []
        self._done = threading.Event()
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = _status_kb("VmRSS")

    def run(self) -> None:
        last = 0.0
        while not self._done.is_set():
            kb = _status_kb("VmRSS")
            self.max_kb = max(self.max_kb, kb)
            now = time.time()
            if now - last >= 0.5:
                self.series.append((round(now, 3), kb))
                last = now
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.max_kb = max(self.max_kb, _status_kb("VmRSS"))


def run_side(spec, cfg: dict, sampler: RssSampler) -> dict:
    """``run(spec)`` on Ray (``pipeline``) or in process through the recording stand-in (``loop``)."""
    import contextlib

    side = cfg["side"]
    trace = cfg.get("trace")
    if trace:
        os.environ["CLIPMAPS_BENCH_TRACE"] = trace
    stack = contextlib.ExitStack()
    if side == "loop":
        from pipeline_loop import in_process

        stack.enter_context(in_process())
    from clipmaps.pipeline.run import run

    if trace:
        from pipeline_trace import traced_build

        stack.enter_context(traced_build())
    progress = []
    said = []

    def on_progress(line: str) -> None:
        said.append(time.time())
        if line.startswith("progress"):
            done = int(line.split()[1].split("/")[0].replace(",", ""))
            progress.append((time.time(), done))
            sampler.mark(f"batch{len(progress)}")

    res: dict = {}
    with stack:
        started = time.time()
        if side == "pipeline":
            import ray

            # the arguments run() would use; started here so that its cost shows apart (run() then keeps it)
            ray.init(
                address=spec.run.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False
            )
            res["ray_init_s"] = time.time() - started
            res["cluster_cpus"] = ray.cluster_resources().get("CPU")
            sampler.mark("after_ray_init")
        result = run(spec, progress=on_progress)
        t_run = time.time()
        sampler.mark("after_run")
        if side == "pipeline":
            ray.shutdown()
            res["shutdown_s"] = time.time() - t_run
    events = []
    if trace:
        from pipeline_trace import read_events

        events = read_events(trace)
    res.update(
        {
            "events": events,
            "progress": progress,
            "processed": result.processed,
            "counts": result.counts,
            "errors": result.errors,
            "ok": result.ok,
            "t_start": started,
            "t_end": t_run,
            "plan_said_s": said[0] - started if said else None,
            "plan_text": result.plan_text,
        }
    )
    return res


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    sampler = RssSampler()
    sampler.start()
    import torch  # both sides' drivers hold torch (plan.build_dataset imports the actor module); import untimed

    from clipmaps.pipeline.spec import load_spec

    # a progress line per finished batch (the default prints one every 30 s): the benchmark times batches
    spec = load_spec(cfg["spec"], overrides=["run.progress_interval_s=1e-9"])
    sampler.mark("after_imports")
    t_ready = time.time()
    res = run_side(spec, cfg, sampler)
    sampler.stop()
    res.update(
        {
            "side": cfg["side"],
            "label": cfg.get("label"),
            "images": cfg.get("images"),
            "driver_torch_threads": torch.get_num_threads(),
            "imports_s": t_ready - T_PROCESS,
            "rss_kb": {"peak_hwm": _status_kb("VmHWM"), "peak_sampled": sampler.max_kb, **sampler.marks},
            "rss_series": sampler.series,
        }
    )
    print("BENCH_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
