"""Checks of the compiled CUDA kernels that tests cannot see; one nvcc run (sm_90a) a source serves both.

1. Registers: no stack frame and no spills (ptxas -v) in the elementwise and split kernels of the plain
   quantize and the gated activations, and in the norm kernels. A `#pragma unroll` loop over the block
   maximum's step width stayed rolled for 32-value blocks and put its array in local memory, 10-25%
   slower MXFP4 kernels with every test passing. The plain activations (expf, erff and IEEE division
   slow paths) and dequantize may use a little stack.
2. The PDL wait: fp4op launches its kernels with Programmatic Dependent Launch, so a kernel starts while
   the previous one on the stream still runs; a global load or store ahead of `griddepcontrol.wait` may
   read stale inputs or overwrite outputs still being read (wait_for_previous_kernel in
   csrc/cuda/block_quantize.cuh), a race tests catch only when its timing shows. Each kernel's PTX is
   read in program order: a memory instruction other than kernel-parameter, shared, local or constant
   accesses before the first `griddepcontrol.wait`, or a kernel without one, fails.

Usage: python scripts/check_kernel_resources.py (CI)."""

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
ENTRY = re.compile(r"^\.visible \.entry (\S+)\(|^\.entry (\S+)\(")
WAIT = re.compile(r"\bgriddepcontrol\.wait\b")
# ld/st/atom/red/prefetch/cp.async in any state space but the harmless ones (generic addresses count)
MEMORY = re.compile(r"^\s*(@!?%\w+\s+)?(ld|st|atom|red|prefetch|prefetchu|cp\.async|cp\.reduce\.async)\.(\S+)")
HARMLESS = re.compile(r"^(param|shared|local|const)\b")


def compile_unit(source: Path, nvcc: str) -> tuple[str, str]:
    """(ptxas -v report, PTX) of one source."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c",
               str(source), "-o", os.path.join(tmp, "unit.o"), "-keep", "-keep-dir", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"nvcc failed on {source}:\n{done.stderr}")
        return done.stderr, (Path(tmp) / f"{source.stem}.ptx").read_text()


def check_resources(report: str, source: str) -> tuple[int, list[str]]:
    """(kernels checked, those with a stack frame or spills) of one ptxas -v report."""
    checked, failures, name = 0, [], None
    for line in report.splitlines():
        if m := FUNCTION.search(line):
            name = m.group(1)
        elif (m := RESOURCES.search(line)) and name:
            if ALLOWED.search(name) is None:
                checked += 1
                if any(int(v) for v in m.groups()):
                    failures.append(f"LOCAL MEMORY {source}: {name}: {m.group(0)}")
            name = None
    return checked, failures


def check_pdl_wait(ptx: str, source: str) -> tuple[int, list[str]]:
    """(kernels seen, those touching global memory before their griddepcontrol.wait) of one PTX module."""
    kernels, problems = 0, []
    name, waited = None, False

    def close():
        if name is not None and not waited:
            problems.append(f"PDL {source}: {name}: no griddepcontrol.wait")

    for line in ptx.splitlines():
        if m := ENTRY.match(line):
            close()
            name, waited = m.group(1) or m.group(2), False
            kernels += 1
        elif name is None or waited:
            continue
        elif WAIT.search(line):
            waited = True
        elif (m := MEMORY.match(line)) and not HARMLESS.match(m.group(3)):
            problems.append(f"PDL {source}: {name}: `{line.strip()}` before griddepcontrol.wait")
            waited = True  # one report a kernel
    close()
    return kernels, problems


def main() -> int:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    checked = kernels = 0
    failures, problems = [], []
    for source in SOURCES:
        report, ptx = compile_unit(source, nvcc)
        n, found = check_resources(report, source.name)
        checked, failures = checked + n, failures + found
        n, found = check_pdl_wait(ptx, source.name)
        kernels, problems = kernels + n, problems + found
    for line in failures + problems:
        print(line)
    print(f"check_kernel_resources: {checked} kernels checked, {len(failures)} with a stack frame or spills; "
          f"{kernels} kernels checked, {len(problems)} touching global memory before the PDL wait")
    return 1 if failures or problems or checked == 0 or kernels == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
