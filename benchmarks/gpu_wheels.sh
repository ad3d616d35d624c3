#!/usr/bin/env bash
# Wheels the GPU check needs beside what a lent H200 machine already has (torch, transformers, accelerate,
# numpy, safetensors, tqdm, scipy are there; diffusers and cache-dit are not, and it cannot download).
# Run here, where pip reaches the registry; it fills .whl/ (git-ignored) for the device's Python 3.12:
#   benchmarks/gpu_wheels.sh
# then, through the device tool, with carry [".whl"] (one command, well under its 10-minute limit):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && benchmarks/gpu_check.sh --out-dir $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p .whl
# pure-Python wheels (py3-none-any): the platform flags only satisfy pip's --python-version rule
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 cache-dit==1.5.3 importlib_metadata==8.7.0
ls -l .whl
