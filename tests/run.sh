#!/usr/bin/env bash
# The project's test command: creates .venv if missing, installs clipmaps with its test extras, lints, runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check actors pipeline schemas jobs tests
.venv/bin/python -m pytest "$@"
