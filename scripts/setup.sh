#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with torch and the test tools, and fp4op
# built in place (editable). Builds the CUDA kernels when a CUDA toolkit is present (CUDA_HOME, or
# /usr/local/cuda); FP4OP_CPU_ONLY=1 builds the CPU backend alone. Idempotent: reruns only rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && [ "${FP4OP_CPU_ONLY:-0}" != 1 ]; then
  # torch guesses the CUDA root from the nvcc on the PATH, which can be the wrong one
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import fp4op, torch; print('fp4op', fp4op.__version__, '| torch', torch.__version__, '| CUDA kernels built:', torch._C._dispatch_has_kernel_for_dispatch_key('fp4op::quantize', 'CUDA'))"
