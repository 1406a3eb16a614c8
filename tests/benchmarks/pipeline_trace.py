"""Per-stage timing for ``bench_pipeline.py``: thin wrappers around the pipeline's own stage callables.

:func:`traced_build` swaps, only while ``run()`` builds its dataset, the three callables ``plan.build_dataset``
hands to Ray Data (``decode_batch``, ``MethodActor``, ``sink_batch``) for wrappers that call the same code and
append one JSON line per call (start/end wall-clock time, rows, pid, and in the actor the torch thread count) to
the file named by ``$CLIPMAPS_BENCH_TRACE``. Ray workers inherit that variable from the driver. The wrappers add a
``time.time()`` pair and one small file append per batch. The loop side uses :class:`Events` with the same
record layout, in process.

Workers import this module by name (Ray puts the driver script's folder on the workers' ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

TRACE_ENV = "CLIPMAPS_BENCH_TRACE"


def _emit(event: dict) -> None:
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps(event) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _rows(batch) -> int:
    from clipmaps.schemas import batches as cols

    return len(batch[cols.IMAGE_ID])


def process_started() -> float | None:
    """When this process started (wall clock), or None without psutil."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return None


def torch_threads() -> dict:
    import torch

    return {
        "process_started": process_started(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_env": os.environ.get("OMP_NUM_THREADS"),
    }


def traced_decode_batch(batch, config):
    """``pipeline.decode.decode_batch`` (same body), timed."""
    from clipmaps.pipeline.decode import DecodeStage

    t0 = time.time()
    stage = DecodeStage(config)
    try:
        out = stage(batch)
    finally:
        stage.close()
    _emit({"stage": "decode", "pid": os.getpid(), "t0": t0, "t1": time.time(), "rows": _rows(out)})
    return out


def traced_sink_batch(batch, config):
    """``pipeline.sinks.sink_batch`` (same body), timed."""
    from clipmaps.pipeline.sinks import SinkStage
    from clipmaps.schemas import batches as cols

    t0 = time.time()
    out = SinkStage(config)(batch)
    _emit(
        {
            "stage": "sink",
            "pid": os.getpid(),
            "t0": t0,
            "t1": time.time(),
            "rows": int(sum(out["rows"])),
            "ids": [str(i) for i in batch[cols.IMAGE_ID]],
        }
    )
    return out


def _method_actor_base():
    from clipmaps.actors.actor import MethodActor

    return MethodActor


class TracedMethodActor(_method_actor_base()):
    """``MethodActor`` with its construction (model load) and every call timed."""

    def __init__(self, config):
        t0 = time.time()
        super().__init__(config)
        _emit({"stage": "actor_init", "pid": os.getpid(), "t0": t0, "t1": time.time(), "rows": 0, **torch_threads()})

    def __call__(self, batch):
        t0, c0 = time.time(), time.process_time()
        out = super().__call__(batch)
        _emit(
            {
                "stage": "actor",
                "pid": os.getpid(),
                "t0": t0,
                "t1": time.time(),
                "rows": _rows(out),
                "cpu_s": time.process_time() - c0,
            }
        )
        return out


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def traced_build():
    """While active, ``pipeline.run.run`` builds its dataset with the traced stage callables (the plan, the
    stages' arguments and Ray options are those of ``plan.build_dataset``, untouched)."""
    import clipmaps.actors.actor as actor_mod
    import clipmaps.pipeline.decode as decode_mod
    import clipmaps.pipeline.run as run_mod
    import clipmaps.pipeline.sinks as sinks_mod

    original = run_mod.build_dataset

    def build_dataset(*args, **kwargs):
        with (
            _patched(actor_mod, "MethodActor", TracedMethodActor),
            _patched(decode_mod, "decode_batch", traced_decode_batch),
            _patched(sinks_mod, "sink_batch", traced_sink_batch),
        ):
            return original(*args, **kwargs)

    with _patched(run_mod, "build_dataset", build_dataset):
        yield


def read_events(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class Events:
    """In-process event list with the trace file's record layout (the loop side)."""

    def __init__(self):
        self.items: list[dict] = []

    @contextlib.contextmanager
    def span(self, stage: str, rows: int = 0, **extra):
        t0 = time.time()
        rec = {"stage": stage, "pid": os.getpid(), "t0": t0, "rows": rows, **extra}
        try:
            yield rec
        finally:
            rec["t1"] = time.time()
            self.items.append(rec)
