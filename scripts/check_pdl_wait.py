"""Checks that every CUDA kernel waits for the previous kernel before it touches global memory.

fp4op launches its kernels with Programmatic Dependent Launch: a kernel starts while the previous one
on the stream is still running, so any global load or store ahead of `griddepcontrol.wait` may read
stale inputs or overwrite outputs still being read (see wait_for_previous_kernel in
csrc/cuda/block_quantize.cuh). Tests catch such a race only when its timing happens to show. This
reads the PTX of each kernel (nvcc -ptx, sm_90a) in program order and fails on a memory instruction
other than kernel-parameter, shared or local accesses before the first `griddepcontrol.wait`, or on a
kernel without one. Usage: python scripts/check_pdl_wait.py (CI)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "csrc" / "cuda" / "quantize.cu", ROOT / "csrc" / "cuda" / "fused.cu")
ENTRY = re.compile(r"^\.visible \.entry (\S+)\(|^\.entry (\S+)\(")
WAIT = re.compile(r"\bgriddepcontrol\.wait\b")
# ld/st/atom/red/prefetch/cp.async in any state space but the harmless ones (generic addresses count)
MEMORY = re.compile(r"^\s*(@!?%\w+\s+)?(ld|st|atom|red|prefetch|prefetchu|cp\.async|cp\.reduce\.async)\.(\S+)")
HARMLESS = re.compile(r"^(param|shared|local|const)\b")


def ptx_of(source: Path, nvcc: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "unit.ptx")
        cmd = [nvcc, "-O3", "-std=c++17", "-arch=sm_90a", "-ptx", str(source), "-o", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"nvcc failed on {source}:\n{done.stderr}")
        return Path(out).read_text()


def check(ptx: str, source: str) -> tuple[int, list[str]]:
    """(kernels seen, problems) for one PTX module."""
    kernels, problems = 0, []
    name, waited = None, False

    def close():
        if name is not None and not waited:
            problems.append(f"{source}: {name}: no griddepcontrol.wait")

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
            problems.append(f"{source}: {name}: `{line.strip()}` before griddepcontrol.wait")
            waited = True  # one report a kernel
    close()
    return kernels, problems


def main() -> int:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    total, problems = 0, []
    for source in SOURCES:
        kernels, found = check(ptx_of(source, nvcc), source.name)
        total += kernels
        problems += found
    for p in problems:
        print("PDL", p)
    print(f"check_pdl_wait: {total} kernels checked, {len(problems)} touching global memory before the wait")
    return 1 if problems or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
