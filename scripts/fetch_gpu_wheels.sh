#!/usr/bin/env bash
# Downloads into .whl/ the wheels the benchmarks need on the GPU machine (python 3.12, x86_64,
# torch 2.11, no network) that its image lacks: torchao, for the peer quantizers of
# benchmarks/bench_quantize.py. torchao 0.18 supports torch >= 2.11; the benchmarks use only its
# pure-Python prototype.mx_formats, and torchao's __init__ only logs a warning if its C++ extension
# fails to load. torchao declares no required dependencies.
# Install there with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHAO_VERSION=${TORCHAO_VERSION:-0.18.0}
PYTHON=${PYTHON:-python3}
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "torchao==${TORCHAO_VERSION}"
ls -l .whl
du -sh .whl
