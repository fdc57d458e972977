#!/usr/bin/env bash
# The extension must build against torch 2.11 (the GPU machine's) as well as the torch CI installs: the
# C++ sources are compiled (syntax and types, g++ -fsyntax-only) against torch 2.11.0's own headers,
# unpacked from its wheel (no install). Catches torch C++ API differences (e.g. autograd nodes held by
# std::shared_ptr in 2.11, c10::intrusive_ptr from 2.13) before a GPU session does. Without network
# access to the wheel it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${FP4OP_OLDEST_TORCH:-2.11.0}
CACHE=${FP4OP_TORCH_HEADERS_CACHE:-${TMPDIR:-/tmp}/fp4op_torch_$VERSION}
PY=${PY:-.venv/bin/python}
if [ ! -d "$CACHE/torch/include" ]; then
  mkdir -p "$CACHE"
  if ! "$PY" -m pip download -q "torch==$VERSION" --no-deps -d "$CACHE" 2>/dev/null; then
    echo "check_oldest_torch: SKIPPED, could not download the torch $VERSION wheel (no network?)"
    exit 0
  fi
  (cd "$CACHE" && unzip -q -o torch-"$VERSION"-*.whl 'torch/include/*' && rm -f torch-"$VERSION"-*.whl)
fi
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
status=0
for f in csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp; do
  g++ -std=c++17 -fsyntax-only -I"$CACHE/torch/include" -I"$CACHE/torch/include/torch/csrc/api/include" \
    -I"$PYINC" -I"$CUDA_INC" "$f" || { echo "check_oldest_torch: $f does not compile against torch $VERSION"; status=1; }
done
[ $status -eq 0 ] && echo "check_oldest_torch: every C++ source compiles against torch $VERSION's headers"
exit $status
