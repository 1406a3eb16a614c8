#!/usr/bin/env bash
# One GPU check, one table (tests/benchmarks/gpu_check.py says what it runs): parity on CUDA at fp32, bf16 gaps,
# per-method images/s and MFU at batch 32/64/128 and 448 px, the one-GPU pipeline against GEM alone.
#
#   bash tests/benchmarks/gpu_check.sh                      # on a machine with an NVIDIA GPU (about 8 minutes)
#   bash tests/benchmarks/gpu_check.sh --json gpu.json      # also every raw figure
#   bash tests/benchmarks/gpu_check.sh --cpu-smoke          # no GPU: the same sections, tiny model, on the CPU
#
# Without a GPU and without --cpu-smoke it stops at once with exit status 2. The whole run is bounded to 8 minutes
# (status 124 when the bound cuts it short).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ " $* " != *" --cpu-smoke "* ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU here (nvidia-smi finds none); --cpu-smoke checks the script on the CPU" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec timeout 490 "$PYTHON" tests/benchmarks/gpu_check.py "$@"
