"""Checks that the CUDA quantize kernels keep their arrays in registers: no stack frame and no spills
(ptxas -v, sm_90a) in the elementwise and split kernels of the plain quantize and the gated
activations, and in the norm kernels. Tests cannot see this: a `#pragma unroll` loop over the block
maximum's step width stayed rolled for 32-value blocks and put its array in local memory, 10-25%
slower MXFP4 kernels with every test passing. The plain activations (expf, erff and IEEE division slow
paths) and dequantize may use a little stack. Usage: python scripts/check_kernel_resources.py (CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "csrc" / "cuda" / "quantize.cu", ROOT / "csrc" / "cuda" / "fused.cu")
# kernels allowed a stack frame or spills (calls into the libdevice slow paths)
ALLOWED = re.compile(r"dequantize_kernel|ActivationSource")
FUNCTION = re.compile(r"Function properties for (\S+)")
RESOURCES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(source: Path, nvcc: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c",
               str(source), "-o", os.path.join(tmp, "unit.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{done.stderr}")
    return done.stderr


def main() -> int:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    failures, checked = [], 0
    for source in SOURCES:
        name = None
        for line in ptxas_report(source, nvcc).splitlines():
            if m := FUNCTION.search(line):
                name = m.group(1)
            elif (m := RESOURCES.search(line)) and name:
                if ALLOWED.search(name) is None:
                    checked += 1
                    if any(int(v) for v in m.groups()):
                        failures.append(f"{source.name}: {name}: {m.group(0)}")
                name = None
    for f in failures:
        print("LOCAL MEMORY", f)
    print(f"check_kernel_resources: {checked} kernels checked, {len(failures)} with a stack frame or spills")
    return 1 if failures or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
