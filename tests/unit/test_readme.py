"""The README's job spec and example specs are valid (documentation that drifts from the code is a bug)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from clipmaps.pipeline.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


def test_readme_job_spec_is_valid():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks, "the README shows a job spec"
    for block in blocks:
        spec = load_spec(yaml.safe_load(block))
        assert spec.enabled_methods()


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_specs_are_valid(path):
    assert load_spec(path).enabled_methods()
