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
# setuptools leaves its build metadata (clipmaps.egg-info) at the top level, which is fixed; the editable install
# reads its own copy in site-packages (clipmaps-0.1.0.dist-info), so the build leftover goes
rm -rf clipmaps.egg-info
# Debian's chromium for the report's browser test (the test skips, saying why, where it cannot be installed)
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || true
fi
.venv/bin/ruff check actors pipeline schemas jobs tests
.venv/bin/ruff format --check actors pipeline schemas jobs tests
.venv/bin/python -m pytest "$@"
