"""The one callable class Ray Data runs in every method pool (``map_batches(MethodActor, …)``).

It owns the Ray-facing bookkeeping so the method modules stay pure torch: load the model once per worker, pick the
device and autocast, build the method's predictor from its registry entry, skip rows that already failed upstream,
isolate failures (a batch that raises is retried row by row, and only the rows that fail again get an error), write
every output column the registry declares on every batch, and drop input columns no later stage needs. Errors leave
as the structured columns ``{method}__error_type`` / ``{method}__error_message`` (``schemas.batches``). This module
imports no Ray: Ray only instantiates and calls it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipmaps.schemas import batches as cols
from clipmaps.schemas.errors import ConfigError, short
from clipmaps.schemas.storage import redact_text

from .models import load_model
from .params import MethodParams, ModelSpec
from .predictors import OutputOptions, Vocabulary
from .registry import REGISTRY
from .text import TextEncoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorConfig:
    """Everything one method pool needs; plain data and pydantic models, so it pickles to every worker.

    Attributes:
        method: the registry key.
        model: the job's ``model`` section.
        settings: the method's section of the job spec.
        templates: its resolved prompt templates (None for methods without text).
        vocabulary: the resolved vocabulary, or None.
        options: output encoding and the resolved prompt source.
        drop_columns: input columns no later stage reads (dropped from the batch after this method).
    """

    method: str
    model: ModelSpec
    settings: MethodParams
    templates: Any = None
    vocabulary: Vocabulary | None = None
    options: OutputOptions = OutputOptions()
    drop_columns: tuple[str, ...] = ()


class MethodActor:
    """Runs one method on numpy batches (see ``schemas.batches`` for the columns)."""

    def __init__(self, config: ActorConfig):
        started = time.time()
        self.config = config
        threads = config.settings.resources.torch_threads
        if threads:
            torch.set_num_threads(threads)
        m = config.model
        device = m.device if m.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.lm = load_model(
                m.name,
                pretrained=m.pretrained,
                weights=m.weights,
                seed=m.seed,
                device=device,
                storage_options=m.storage_options or None,
                weights_sha256=m.weights_sha256,
            )
        except ConfigError as e:  # any of the family (WeightsChecksumError…): the driver reads its name from Ray's text
            raise ConfigError(e.message, stage="model") from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            # the weights named by the job are not there: a re-run cannot fix that (the driver maps it to exit 2)
            text = redact_text(str(e), storage_options=m.storage_options, uris=[m.weights])
            raise ConfigError(f"model.weights: {text}", stage="model") from None
        entry = REGISTRY[config.method]
        self.predictor = entry.load_predictor()(
            self.lm,
            config.settings,
            templates=config.templates,
            vocabulary=config.vocabulary,
            options=config.options,
            text=TextEncoder(self.lm.model, self.lm.tokenizer),
        )
        if m.compile:
            # not fullgraph: a graph break falls back to eager for that part instead of failing the batch (the
            # parity tests compile with fullgraph=True to show there are none on the supported models)
            self.predictor.compile()
        self.inputs = entry.inputs
        self.autocast = m.precision == "bf16" and device.startswith("cuda") and self.predictor.autocast_ok
        self.output_columns = self.predictor.output_columns()
        self.error_type = cols.col(config.method, cols.ERROR_TYPE_OF)
        self.error_message = cols.col(config.method, cols.ERROR_MESSAGE_OF)
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
        row_errors: list[tuple[str, str] | None] = [None] * n
        if cols.MASKS_SQUARE in self.inputs:  # a row without usable masks is reported, not dropped
            masks = batch.get(cols.MASKS_SQUARE)
            for i in valid:
                if masks is None or not cols.present(masks[i]) or len(masks[i]) == 0:
                    row_errors[i] = ("NoMasks", "the row has no usable region masks")
            valid = [i for i in valid if row_errors[i] is None]
        if valid:
            self._run(batch, valid, outputs, row_errors)
        out = {k: v for k, v in batch.items() if k not in self.config.drop_columns}
        for name in self.output_columns:
            out[name] = cols.objects(outputs.get(name) or [None] * n)
        out[self.error_type] = cols.objects(e[0] if e else None for e in row_errors)
        out[self.error_message] = cols.objects(e[1] if e else None for e in row_errors)
        return cols.conform(out)

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
                    row_errors[i] = (getattr(e, "error_type", type(e).__name__), short(e))

    def _run_rows(self, batch: dict, rows: list[int], outputs: dict[str, list], n: int) -> None:
        sub = {k: [v[i] for i in rows] for k, v in batch.items()}
        with self._context():  # methods manage autograd themselves (MaskInversion needs it)
            result = self.predictor.run(sub)
        for name, values in result.columns.items():
            if name not in self.output_columns:  # a predictor bug; it would otherwise vanish from the outputs
                raise KeyError(f"{type(self.predictor).__name__} wrote {name!r}, which the registry does not declare")
            column = outputs.setdefault(name, [None] * n)
            for i, value in zip(rows, values):
                column[i] = value
