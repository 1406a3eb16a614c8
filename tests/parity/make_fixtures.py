#!/usr/bin/env python3
"""Generate the upstream-parity fixtures for clipmaps.

Run from the repository root:

    python3 tests/parity/make_fixtures.py            # create venv if needed, then generate
    python3 tests/parity/make_fixtures.py --setup-only
    python3 tests/parity/make_fixtures.py --pooled-only  # only the SigLIP/CoCa fixtures (pooled.npz)

Stage 1 (any interpreter): make sure the isolated reference venv ``.venv-parity`` exists with the
upstream stack (torch 2.14.1, open_clip_torch 2.24.0, gem-torch 1.0.1, legrad-torch 1.1,
maskinversion-torch 1.1), then re-exec this script inside it.
Stage 2 (inside the venv): run ``reference_runner.main`` which writes ``tests/parity/fixtures/``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV = REPO / ".venv-parity"
VENV_PY = VENV / "bin" / "python"

BASE_REQS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==2.24.0",
    "timm",
    "einops",
    "pillow",
    "numpy",
    "opencv-python-headless",
    "matplotlib",
]
# they pin open-clip-torch<=2.23.0 and opencv-python; 2.24.0 (same transformer.py) and headless
# OpenCV are equivalent, hence --no-deps.
UPSTREAM_REQS = ["gem-torch==1.0.1", "legrad-torch==1.1", "maskinversion-torch==1.1"]

log = logging.getLogger("make_fixtures")


def _run(cmd: list[str]) -> None:
    log.info("$ %s", " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    log.info("  done in %.1f s", time.time() - t0)


def _venv_ready() -> bool:
    if not VENV_PY.exists():
        return False
    probe = (
        "import importlib.metadata as m;"
        "assert m.version('open_clip_torch')=='2.24.0';"
        "assert m.version('torch').split('+')[0]=='2.14.1';"
        "[m.version(p) for p in ('gem-torch','legrad-torch','maskinversion-torch','timm','einops')];"
        "import gem, legrad, maskinversion"
    )
    r = subprocess.run([str(VENV_PY), "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        log.info("existing venv %s incomplete: %s", VENV, (r.stderr.strip().splitlines() or ["?"])[-1])
    return r.returncode == 0


def ensure_venv() -> None:
    if _venv_ready():
        log.info("reference venv %s is ready", VENV)
        return
    if not VENV_PY.exists():
        log.info("creating reference venv %s", VENV)
        _run([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(VENV_PY), "-m", "pip", "install", "--disable-pip-version-check"]
    log.info("installing the upstream stack into %s (takes a few minutes)", VENV)
    _run(pip + BASE_REQS)
    _run(pip + ["--no-deps"] + UPSTREAM_REQS)
    if not _venv_ready():
        raise SystemExit(f"reference venv {VENV} still incomplete after installation")


def _inside_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = sys.argv[1:]
    if not _inside_venv():
        ensure_venv()
        if "--setup-only" in args:
            return
        log.info("re-executing inside %s", VENV)
        os.execv(str(VENV_PY), [str(VENV_PY), str(Path(__file__).resolve()), *args])
    if "--setup-only" in args:
        return
    sys.path.insert(0, str(HERE))
    import reference_runner  # noqa: E402  (only importable inside the reference venv)

    if "--pooled-only" in args:
        reference_runner.main_pooled_only()  # SigLIP/CoCa cases only (pooled.npz, manifest "pooled")
    else:
        reference_runner.main()


if __name__ == "__main__":
    main()
