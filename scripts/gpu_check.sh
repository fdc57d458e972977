#!/usr/bin/env bash
# Everything the GPU machine does in one call: build, GPU tests, sanitizers, benchmarks.
# Usage (on the device machine, from the repo root): bash scripts/gpu_check.sh [stage ...]
# Stages: build smoke tests sanitize bench quickbench fused host demo dequant ncu lab fuzzlong (default: build smoke tests sanitize
# bench fused demo). Logs and results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fp4op_out}
LOGS=${LOGS:-/tmp/fp4op_logs}  # everything lands here and comes back as one archive, $OUT/gpu_logs.tgz
mkdir -p "$OUT" "$LOGS"
PY=${PY:-python3}
stages=${*:-build smoke tests sanitize bench fused demo}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
run() {  # run NAME CMD...: log to $OUT/NAME.log, remember failures
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$(date +%s)
  "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "--- $name rc=$rc ($(( $(date +%s) - t0 ))s)"; tail -n ${TAIL:-15} "$LOGS/$name.log"
  [ $rc -eq 0 ] || status=1
}
for s in $stages; do
  case $s in
    build)
      run build env FP4OP_CUDA_GENCODE="${FP4OP_CUDA_GENCODE:--gencode=arch=compute_90a,code=sm_90a}" MAX_JOBS=16 \
        $PY -m pip install --no-build-isolation --no-deps -e . ;;
    smoke) run smoke $PY scripts/gpu_smoke.py ;;
    tests) run tests timeout ${TESTS_TIMEOUT:-360} $PY -m pytest ${TESTS:-tests} -q -p no:cacheprovider ;;  # TESTS: a subset
    sanitize)
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
        run "sanitize_$tool" timeout 120 compute-sanitizer --tool $tool --error-exitcode 1 $PY scripts/memcheck_cases.py
        run "sanitize_fused_$tool" timeout 120 compute-sanitizer --tool $tool --error-exitcode 1 $PY scripts/memcheck_fused_cases.py
      done ;;
    bench) run bench $PY benchmarks/bench_quantize.py --suite full --out-dir "$LOGS" ;;
    quickbench) run quickbench $PY benchmarks/bench_quantize.py --suite quick --skip-peers --out-dir "$LOGS" ;;
    fused) run fused $PY scripts/bench_fused.py --out "$LOGS/bench_fused.json" ;;
    host) run host $PY benchmarks/bench_host.py --out-dir "$LOGS" ;;
    demo) run demo timeout 180 $PY examples/demo.py ;;
    dequant)  # benchmarks/bench_dequantize.py; DEQ_REF=DIR: first the same with another commit's build, DIR a whole
              # tree inside the working tree (mkdir .deq_ref && git archive REF | tar -x -C .deq_ref), built in place,
              # DEQ_REF_COMMIT=REF its name in the table
      if [ -n "${DEQ_REF:-}" ]; then
        run dequant_ref_build bash -c "cd $DEQ_REF && FP4OP_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a \
          MAX_JOBS=16 $PY setup.py build_ext --inplace"
        run dequant_ref env PYTHONPATH="$DEQ_REF:${PYTHONPATH:-}" FP4OP_COMMIT="${DEQ_REF_COMMIT:-unknown}" \
          $PY benchmarks/bench_dequantize.py \
          --label "fp4op ${DEQ_REF_COMMIT:-(ref)}" --skip-inductor --out "$LOGS/dequantize_ref.json"
      fi
      run dequant $PY benchmarks/bench_dequantize.py --out "$LOGS/dequantize.json" \
        ${DEQ_REF:+--ref-json "$LOGS/dequantize_ref.json"} ;;
    ncu)
      run ncu timeout 300 ncu --clock-control none --kernel-name-base mangled -k regex:fp4op --launch-skip-before-match 0 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section InstructionStats --section Occupancy --section WarpStateStats --print-summary none \
        $PY scripts/ncu_cases.py ;;
    lab)  # scripts/kernel_lab.cu; LAB_REF=DIR: also the lab built against the kernels of another commit, DIR
          # inside the working tree so that it travels, e.g. mkdir .lab_ref && git archive REF csrc | tar -x -C
          # .lab_ref && mkdir .lab_ref/scripts && cp scripts/kernel_lab.cu .lab_ref/scripts/;
          # LAB_EXTRA="flags|flags...": variants of the working tree built with those nvcc flags.
          # The builds run in parallel (nvcc takes a minute), then the labs one after another.
      labs=()
      for dir in . ${LAB_REF:-}; do
        name=$([ "$dir" = . ] && echo lab || echo lab_ref)
        (cd "$dir" && $CUDA_HOME/bin/nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
          -DLAB_SETTINGS="\"$dir\"" -o /tmp/kernel_$name scripts/kernel_lab.cu > "$LOGS/${name}_build.log" 2>&1) &
        labs+=("$name")
      done
      i=0
      IFS='|' read -ra variants <<< "${LAB_EXTRA:-}"
      for flags in "${variants[@]}"; do
        i=$((i + 1))
        $CUDA_HOME/bin/nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a $flags \
          -DLAB_SETTINGS="\"$flags\"" -o /tmp/kernel_lab_x$i scripts/kernel_lab.cu > "$LOGS/lab_x${i}_build.log" 2>&1 &
        labs+=("lab_x$i")
      done
      wait
      for name in "${labs[@]}"; do TAIL=100 run "$name" timeout ${LAB_TIMEOUT:-300} /tmp/kernel_$name ${LAB_ARGS:-}; done ;;
    fuzzlong)  # issue 6's long profile on the GPU: CUDA == CPU, 100,000 quantize and 10,000 fused examples
      run fuzzlong env FP4OP_HYPOTHESIS_PROFILE=long timeout ${FUZZ_TIMEOUT:-540} $PY -m pytest tests/test_fuzz.py -q \
        -p no:cacheprovider -k cuda ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$LOGS/device.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$LOGS/device.txt" 2>&1
echo "commit ${FP4OP_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}" >> "$LOGS/device.txt"
tar -czf "$OUT/gpu_logs.tgz" -C "$LOGS" .
exit $status
