"""One timed run for ``bench_pipeline.py``, in its own process (so peak memory and Ray state never carry over).

    python tests/benchmarks/pipeline_worker.py CONFIG.json      # prints one ``BENCH_RESULT {json}`` line

``side: pipeline`` — ``ray.init`` with the arguments ``run()`` uses, then ``clipmaps.pipeline.run.run(spec)``
(which, finding Ray started, leaves it running), then ``ray.shutdown`` (timed apart). Per finished batch the
driver's progress callback records (time, images done).

``side: loop`` — the same work in one process without Ray: ``run.make_plan`` (manifest read and validation), the
same output preparation (``prepare_output``, ``write_vocabulary``, the errors part), then per ``batch_size``
manifest rows ``decode_batch`` → ``MethodActor`` (constructed once, the same ``ActorConfig``) → ``SinkStage``,
then ``write_job_json``. The stage configs are built exactly as ``plan.build_dataset`` builds them.

Both sides: the driver's RSS is sampled every 20 ms from ``/proc/self/status`` and its kernel peak (``VmHWM``) is
read at the end. Torch threads come from ``OMP_NUM_THREADS`` in the environment the orchestrator sets.
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

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.max_kb = 0
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.marks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = _status_kb("VmRSS")

    def run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            kb = _status_kb("VmRSS")
            self.max_kb = max(self.max_kb, kb)
            now = time.time()
            if now - last >= 0.5:
                self.series.append((round(now, 3), kb))
                last = now
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self.join()
        self.max_kb = max(self.max_kb, _status_kb("VmRSS"))


def make_configs(plan):
    """The decode, actor and sink configs of ``plan``'s single method, built as ``plan.build_dataset`` does."""
    import dataclasses

    from clipmaps.actors.actor import ActorConfig, ModelSource
    from clipmaps.actors.runners import ORIGINAL_GEM, OutputOptions, Vocabulary
    from clipmaps.pipeline.decode import DecodeConfig
    from clipmaps.pipeline.plan import METHOD_INPUTS, method_vocabulary_id
    from clipmaps.pipeline.sinks import Provenance, SinkConfig

    spec = plan.spec
    decode_cfg = DecodeConfig(
        square_size=plan.square_size,
        maskclip=spec.preprocess("maskclip") if "maskclip" in plan.methods else None,
        need_masks="maskinversion" in plan.methods,
        max_pixels=spec.resources.max_pixels,
        storage_options=dict(spec.input.storage_options),
        allowed_schemes=tuple(spec.input.allowed_schemes),
        retries=spec.resources.retries,
    )
    m = spec.model
    model = ModelSource(name=m.name, pretrained=m.pretrained, weights=m.weights, seed=m.seed,
                        storage_options=dict(m.storage_options), device=m.device, precision=m.precision)
    vocab = None
    if plan.vocabulary is not None:
        v = spec.vocabulary
        vocab = Vocabulary(names=tuple(plan.vocabulary), background=tuple(v.background), threshold=v.threshold)
    actor_cfgs = []
    for index, name in enumerate(plan.methods):
        later = {c for other in plan.methods[index + 1:] for c in METHOD_INPUTS[other]}
        drop = tuple(c for c in METHOD_INPUTS[name] if c not in later)
        actor_cfgs.append(ActorConfig(method=name, model=model, params=spec.method_params(name), vocabulary=vocab,
                                      options=OutputOptions(**spec.output_options(name)), drop_columns=drop))
    provenance = {name: Provenance(method=name, model=m.name, weights=m.weights_id,
                                   params_hash=spec.method_params_hash(name),
                                   vocabulary_id=method_vocabulary_id(spec, name))
                  for name in plan.methods}
    if "gem" in plan.methods and spec.method("gem").original:
        provenance[ORIGINAL_GEM] = dataclasses.replace(provenance["gem"], method=ORIGINAL_GEM)
    sink_cfg = SinkConfig(output_uri=spec.output.uri, methods=provenance, heatmap_encoding=spec.output.heatmap_encoding,
                          storage_options=dict(spec.output.storage_options))
    return decode_cfg, actor_cfgs, sink_cfg


def run_loop(spec, cfg: dict, sampler: RssSampler) -> dict:
    import posixpath

    import pyarrow as pa
    from pipeline_trace import Events, torch_threads

    from clipmaps.actors.actor import MethodActor
    from clipmaps.pipeline.decode import decode_batch
    from clipmaps.pipeline.run import RunResult, _refused_row, make_plan, prepare_output, write_job_json, \
        write_vocabulary
    from clipmaps.pipeline.sinks import SinkStage, filesystem, write_table
    from clipmaps.schemas import batches as cols
    from clipmaps.schemas.datasets import ERRORS

    ev = Events()
    started = time.time()
    with ev.span("plan"):
        plan = make_plan(spec)
        fs, root = filesystem(spec.output.uri, dict(spec.output.storage_options))
        prepare_output(spec, fs, root)
        write_vocabulary(plan, fs, root)
        write_table(pa.Table.from_pylist([_refused_row(r) for r in plan.refused], schema=ERRORS), fs,
                    posixpath.join(root, "errors", "part-manifest.parquet"))
    decode_cfg, actor_cfgs, sink_cfg = make_configs(plan)
    with ev.span("actor_init") as rec:
        actors = [MethodActor(c) for c in actor_cfgs]
        rec.update(torch_threads())
    sink = SinkStage(sink_cfg)
    counts = {name: 0 for name in cols.STATS}
    counts["errors"] = len(plan.refused)
    table = plan.manifest
    bs = spec.method(plan.methods[0]).resources.batch_size
    done = []
    t0 = time.time()
    for start in range(0, table.num_rows, bs):
        rows = table.slice(start, bs)
        with ev.span("decode", rows.num_rows):
            batch = decode_batch(rows, decode_cfg)
        for actor in actors:
            with ev.span("actor", rows.num_rows):
                batch = actor(batch)
        with ev.span("sink", rows.num_rows):
            out = sink(batch)
        for name in cols.STATS:
            counts[name] += int(out[name].sum())
        done.append((time.time(), counts["rows"]))
        sampler.mark(f"batch{len(done)}")
    seconds = time.time() - started
    result = RunResult(spec.output.uri, plan.total, counts["rows"], 0, counts, seconds, ok=True,
                       timings={"execute_s": time.time() - t0})
    write_job_json(spec, result, fs, root)
    return {"events": ev.items, "progress": done, "processed": counts["rows"], "counts": counts,
            "t_start": started, "t_end": time.time()}


def run_pipeline(spec, cfg: dict, sampler: RssSampler) -> dict:
    import contextlib

    import ray

    from clipmaps.pipeline.run import run

    trace = cfg.get("trace")
    tracer = contextlib.nullcontext()
    if trace:
        os.environ["CLIPMAPS_BENCH_TRACE"] = trace
        from pipeline_trace import traced_build

        tracer = traced_build()
    progress = []

    def on_progress(line: str) -> None:
        if line.startswith("progress"):
            done = int(line.split()[1].split("/")[0])
            progress.append((time.time(), done))
            sampler.mark(f"batch{len(progress)}")

    started = time.time()
    ray.init(address=spec.run.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_init = time.time()
    sampler.mark("after_ray_init")
    res = {"cluster_cpus": ray.cluster_resources().get("CPU")}
    with tracer:
        result = run(spec, progress=on_progress)
    t_run = time.time()
    sampler.mark("after_run")
    ray.shutdown()
    t_end = time.time()
    events = []
    if trace:
        from pipeline_trace import read_events

        events = read_events(trace)
    res.update({"events": events, "progress": progress, "processed": result.processed,
                "counts": result.counts, "errors": result.errors, "ok": result.ok, "t_start": started,
                "t_end": t_run, "ray_init_s": t_init - started, "run_s": t_run - t_init,
                "shutdown_s": t_end - t_run, "plan_text": result.plan_text})
    return res


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    sampler = RssSampler()
    sampler.start()
    import torch  # both sides' drivers hold torch (plan.build_dataset imports the actor module); import untimed

    from clipmaps.pipeline.spec import load_spec

    spec = load_spec(cfg["spec"])
    sampler.mark("after_imports")
    t_ready = time.time()
    res = (run_pipeline if cfg["side"] == "pipeline" else run_loop)(spec, cfg, sampler)
    sampler.stop()
    res.update({
        "side": cfg["side"], "label": cfg.get("label"), "images": cfg.get("images"),
        "driver_torch_threads": torch.get_num_threads(),
        "imports_s": t_ready - T_PROCESS,
        "rss_kb": {"peak_hwm": _status_kb("VmHWM"), "peak_sampled": sampler.max_kb, **sampler.marks},
        "rss_series": sampler.series,
    })
    print("BENCH_RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
