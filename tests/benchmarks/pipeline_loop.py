"""The bare loop of ``bench_pipeline.py``: ``clipmaps.pipeline.run.run(spec)`` executed in one process, no Ray.

Inside :func:`in_process`, ``import ray`` gives a small stand-in: ``ray.data.from_arrow`` and ``map_batches``
only *record* the stages ``plan.build_dataset`` builds (the very callables, ``fn_kwargs``,
``fn_constructor_kwargs`` and batch sizes the pipeline hands to Ray Data), and ``iter_batches`` runs them one
batch at a time in this process: callable classes (``MethodActor``) are constructed once, then every batch of
``batch_size`` manifest rows goes through decode → actor → sink before the next one starts. Everything else is
``run()``'s own code — manifest read and validation, output preparation, vocabulary, shard markers, ``_job.json``
and the progress lines — so the loop does the same work as the pipeline, minus Ray (no ``ray.init``, no object
store, no scheduling, no overlap between stages).

The stand-in refuses any Ray API it does not know, so a change in how the driver uses Ray shows up as an error here,
not as a silently different loop.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types

import pyarrow as pa


class _Stage:
    def __init__(self, fn, fn_kwargs, fn_constructor_kwargs, batch_size, options):
        self.fn = fn
        self.fn_kwargs = dict(fn_kwargs or {})
        self.fn_constructor_kwargs = dict(fn_constructor_kwargs or {})
        self.batch_size = batch_size
        self.options = options
        self.instance = None

    def callable(self):
        if inspect.isclass(self.fn):
            if self.instance is None:
                self.instance = self.fn(**self.fn_constructor_kwargs)
            return self.instance
        return self.fn

    def __call__(self, batch):
        return self.callable()(batch, **self.fn_kwargs)


def _rows(batch) -> int:
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        return batch.num_rows
    return len(next(iter(batch.values()))) if batch else 0


def _split(batch, size: int) -> list:
    n = _rows(batch)
    if size is None or n <= size:
        return [batch]
    if isinstance(batch, pa.Table):
        return [batch.slice(i, size) for i in range(0, n, size)]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


class LocalDataset:
    """What ``ray.data.from_arrow(...).map_batches(...)...`` records; ``iter_batches`` runs it in process."""

    def __init__(self, tables):
        tables = list(tables) if isinstance(tables, (list, tuple)) else [tables]
        self.table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.stages: list[_Stage] = []

    def map_batches(self, fn, *, fn_kwargs=None, fn_constructor_kwargs=None, batch_size="default", **options):
        self.stages.append(_Stage(fn, fn_kwargs, fn_constructor_kwargs, batch_size, options))
        return self

    def iter_batches(self, *, batch_format="numpy", batch_size=None, **_):
        if batch_format != "numpy" or batch_size is not None:
            raise NotImplementedError(
                "the in-process loop only serves iter_batches(batch_format='numpy', batch_size=None)"
            )
        first = self.stages[0].batch_size
        first = first if isinstance(first, int) else 4096
        for stage in self.stages:  # build every callable class before the first batch (as the pool starts first)
            stage.callable()
        for start in range(0, self.table.num_rows, first):
            pending = [self.table.slice(start, first)]
            for stage in self.stages:
                size = stage.batch_size if isinstance(stage.batch_size, int) else None
                pending = [stage(part) for batch in pending for part in _split(batch, size)]
            yield from pending


class _Settings(types.SimpleNamespace):
    """Ray Data settings the driver may read and set: unset ones read as None (nothing here uses them)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class _DataContext:
    _current = None

    @classmethod
    def get_current(cls):
        if cls._current is None:
            cls._current = _Settings(enable_progress_bars=False)
        return cls._current


class ActorPoolStrategy:
    def __init__(self, min_size=None, max_size=None, **kwargs):
        self.min_size, self.max_size = min_size, max_size


class _Strict(types.ModuleType):
    def __getattr__(self, name):
        raise AttributeError(
            f"the in-process loop's stand-in for Ray has no {self.__name__}.{name}; "
            "update tests/benchmarks/pipeline_loop.py to the driver's new use of Ray"
        )


class _Exceptions(types.ModuleType):
    """``ray.exceptions.<Name>``: a distinct exception class per name (nothing raises them in process)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (Exception,), {"__module__": "ray.exceptions"})
        setattr(self, name, cls)
        return cls


def _stand_in(cpus: float):
    ray = _Strict("ray")
    ray.exceptions = _Exceptions("ray.exceptions")
    data = _Strict("ray.data")
    data.from_arrow = LocalDataset
    data.ActorPoolStrategy = ActorPoolStrategy
    data.DataContext = _DataContext
    ray.data = data
    ray.is_initialized = lambda: True  # run() then neither starts nor stops Ray
    ray.cluster_resources = lambda: {"CPU": float(cpus), "GPU": 0.0}
    ray.__version__ = "in-process stand-in"
    return ray, data


@contextlib.contextmanager
def in_process(cpus: float | None = None):
    """While active, ``import ray`` / ``import ray.data`` give the recording stand-in (Ray must not be loaded)."""
    if any(name == "ray" or name.startswith("ray.") for name in sys.modules):
        raise RuntimeError("ray is already imported in this process; the in-process loop needs a fresh process")
    cpus = cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ray, data = _stand_in(cpus)
    stand_ins = {"ray": ray, "ray.data": data, "ray.exceptions": ray.exceptions}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
