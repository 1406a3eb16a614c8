"""The one callable class Ray Data runs in every method pool (``map_batches(MethodActor, …)``).

It owns the Ray-facing bookkeeping so the method modules stay pure torch: load the model once per worker, pick the
device and autocast, skip rows that already failed upstream, isolate failures (a batch that raises is retried row
by row, and only the rows that fail again get an error), write the method's output columns and drop input columns
no later stage needs. This module imports no Ray: Ray only instantiates and calls it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from clipmaps.schemas import batches as cols

from .models import load_model
from .runners import RUNNERS, OutputOptions, Vocabulary, build_params
from .text import TextEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Which model to load, and how to run it."""

    name: str
    pretrained: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int | None = None
    storage_options: dict = field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA)


@dataclass(frozen=True)
class ActorConfig:
    """Everything one method pool needs; plain data so it pickles to every worker."""

    method: str
    model: ModelSource
    params: dict
    vocabulary: Vocabulary | None
    options: OutputOptions
    drop_columns: tuple[str, ...] = ()
    torch_threads: int | None = None


class MethodActor:
    """Runs one method on numpy batches (see ``schemas.batches`` for the columns)."""

    def __init__(self, config: ActorConfig):
        started = time.time()
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        m = config.model
        device = m.device if m.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.lm = load_model(
            m.name,
            pretrained=m.pretrained,
            weights=m.weights,
            seed=m.seed,
            device=device,
            storage_options=m.storage_options or None,
            weights_sha256=m.weights_sha256,
        )
        self.autocast = m.precision == "bf16" and device.startswith("cuda")
        text = TextEncoder(self.lm.model, self.lm.tokenizer)
        params = build_params(config.method, config.params)
        self.runner = RUNNERS[config.method](self.lm, params, config.vocabulary, config.options, text)
        self.autocast = self.autocast and self.runner.autocast_ok
        self.output_columns = self.runner.output_columns()
        self.error_column = cols.col(config.method, cols.ERROR)
        logger.info("%s actor ready on %s in %.1f s", config.method, device, time.time() - started)

    def _context(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[cols.IMAGE_ID])
        failed = cols.failed_rows(batch)
        valid = [i for i in range(n) if not failed[i]]
        outputs: dict[str, list] = {}
        row_errors: list[str | None] = [None] * n
        if cols.MASKS_SQUARE in self.runner.inputs:  # a row without usable masks is reported, not dropped
            masks = batch.get(cols.MASKS_SQUARE)
            for i in valid:
                if masks is None or not cols.present(masks[i]) or len(masks[i]) == 0:
                    row_errors[i] = "NoMasks: the row has no usable region masks"
            valid = [i for i in valid if row_errors[i] is None]
        if valid:
            self._run(batch, valid, outputs, row_errors)
        out = cols.restore_nulls({k: v for k, v in batch.items() if k not in self.config.drop_columns})
        for name, missing in self.output_columns.items():
            values = outputs.get(name) or [None] * n
            out[name] = _object_array([missing if v is None else v for v in values])
        out[self.error_column] = _object_array(row_errors)
        return out

    def _run(self, batch: dict, valid: list[int], outputs: dict[str, list], row_errors: list) -> None:
        n = len(batch[cols.IMAGE_ID])
        try:
            self._run_rows(batch, valid, outputs, n)
        except Exception:  # isolate: one bad row must not fail its whole batch
            logger.warning(
                "%s batch failed; retrying %d rows one by one", self.config.method, len(valid), exc_info=True
            )
            for i in valid:
                try:
                    self._run_rows(batch, [i], outputs, n)
                except Exception as e:  # noqa: BLE001 - recorded as an error row
                    row_errors[i] = f"{type(e).__name__}: {str(e)[:500]}"

    def _run_rows(self, batch: dict, rows: list[int], outputs: dict[str, list], n: int) -> None:
        sub = {k: [v[i] for i in rows] for k, v in batch.items()}
        with self._context():  # methods manage autograd themselves (MaskInversion needs it)
            result = self.runner.run(sub)
        for name, values in result.columns.items():
            if name not in self.output_columns:  # a runner bug; it would otherwise vanish from the outputs
                raise KeyError(f"{type(self.runner).__name__} wrote {name!r}, which its output_columns() omits")
            column = outputs.setdefault(name, [None] * n)
            for i, value in zip(rows, values):
                column[i] = value


def _object_array(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr
