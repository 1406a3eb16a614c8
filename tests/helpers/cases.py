"""The shared field cases (``../shared/cases`` beside the checkout) run as their READMEs say: ``make_case.py`` writes
the input and job spec into a folder, the real ``clipmaps`` CLI runs in a new process (its own local Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parents[3] / "shared" / "cases"
BIN = Path(sys.executable).parent
#: Skips a module when the cases are not beside the checkout.
needs_cases = pytest.mark.skipif(not CASES.is_dir(), reason=f"the shared field cases are not at {CASES}")


def run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``args`` in ``cwd`` as a user runs them (a new process)."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def make_case(name: str, tmp_path: Path) -> Path:
    """The case's inputs and job spec written into ``tmp_path / "work"``; returns that folder."""
    work = tmp_path / "work"
    done = run(sys.executable, str(CASES / name / "make_case.py"), str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return work
