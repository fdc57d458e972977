"""Checks that GCC vectorizes every CPU loop marked `// vectorized` (its -fopt-info-vec report), with
the extension's flags. Tests cannot see this: a float ternary that GCC does not if-convert under
-ftrapping-math kept the row kernel's E2M1 loop scalar for three sessions, 3-4x slower, every test
passing. Usage: python scripts/check_vectorized.py, with torch installed (CI runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "csrc" / "cpu"
MARKED_FILES = (CPU / "quantize_row.cpp", CPU / "quantize_row.h", CPU / "fused.cpp")
FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", f"-I{ROOT / 'csrc'}", "-fopt-info-vec-optimized"]
# the header's loops are compiled where they are called: a unit that calls each
HEADER_UNIT = """#include "cpu/quantize_row.h"
void widen(const void* src, fp4op::InputDtype dtype, int64_t k, float* dst) {
  fp4op::cpu::widen_row(src, dtype, k, dst);
}
"""
REPORT = re.compile(r"^(.*?):(\d+):\d+: optimized: loop vectorized", re.M)


def torch_flags() -> list[str]:
    """Include paths and language standard of a unit that includes torch's headers."""
    import sysconfig

    from torch.utils import cpp_extension

    return ["-std=c++20", "-fopenmp", f"-I{sysconfig.get_paths()['include']}"] + [
        f"-I{p}" for p in cpp_extension.include_paths()
    ]


def vectorized_lines(unit: Path, extra: list[str] = ()) -> set[tuple[Path, int]]:
    cmd = [os.environ.get("CXX", "g++"), *FLAGS, *extra, "-c", str(unit), "-o", os.devnull]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"check_vectorized: {' '.join(cmd)} failed:\n{result.stderr}")
    return {(Path(f).resolve(), int(line)) for f, line in REPORT.findall(result.stderr)}


def main() -> int:
    marked = {
        (path.resolve(), n)
        for path in MARKED_FILES
        for n, text in enumerate(path.read_text().splitlines(), start=1)
        if "// vectorized" in text
    }
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / "header_loops.cpp"
        unit.write_text(HEADER_UNIT)
        done = vectorized_lines(CPU / "quantize_row.cpp") | vectorized_lines(unit)
        done |= vectorized_lines(CPU / "fused.cpp", torch_flags())  # the later -std wins
    missing = sorted(marked - done)
    for path, n in missing:
        print(f"{path.relative_to(ROOT)}:{n}: marked `// vectorized` but GCC did not vectorize it")
    print(f"check_vectorized: {len(marked) - len(missing)}/{len(marked)} marked loops vectorized")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
