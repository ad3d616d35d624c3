#!/usr/bin/env bash
# GPU check of issue 12, one command (about 8 minutes at most on one H100/H200):
#   benchmarks/gpu_check.sh            # DiT-XL/2 geometry, bf16, DDIM-50, 8 labels x CFG: every method, eager and
#                                      # compiled, diffusers' peers; writes benchmarks/results/gpu_check/gpu_check.{json,md}
#   benchmarks/gpu_check.sh --tiny     # the same script on a tiny DiT: seconds on a CPU
# Extra options go to benchmarks/gpu_check.py (see its --help). PYTHON picks the interpreter (default: .venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# the script stops starting sections after --budget-s (420 s); the hard limit is a safety net
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
