"""Job specs the tests run (paths; load with ``clipmaps.pipeline.spec.load_spec``)."""

from __future__ import annotations

from pathlib import Path

#: The four methods, clipmaps-tiny-vit with seed 0, 224 px: the pipeline-mechanics tests' job.
JOB_SPEC = Path(__file__).parent / "job.yaml"
