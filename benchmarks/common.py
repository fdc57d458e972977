"""Pieces shared by the benchmark scripts: problem sizes, the byte counts every row is measured
against, and a description of the machine and the build that produced a results file."""

from __future__ import annotations

import math
import os
import platform
import subprocess

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe name -> (sf_vec_size, sf_use_ue8m0)
RECIPES = {"nvfp4": (16, False), "mxfp4": (32, True)}
LAYOUTS = ("128x4", "8x4", "linear")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3fn": torch.float8_e4m3fn}
MiB = 1 << 20


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def sf_bytes(m: int, k: int, recipe: str, layout: str) -> int:
    """Bytes of the sf tensor fp4op writes, its zero padding included (SPEC.md's shapes)."""
    nk = k // RECIPES[recipe][0]
    if layout == "128x4":
        return round_up(m, 128) * round_up(nk, 4)
    if layout == "8x4":
        return round_up(m, 8) * round_up(nk, 4)
    return m * nk


def byte_counts(m: int, k: int, dtype: str, recipe: str, layout: str) -> dict:
    """The bytes one quantization must move: read the input once, write x_q and sf once.
    effective_bytes = input + x_q + sf is the figure every row's bandwidth is computed from."""
    input_bytes = m * k * torch.empty(0, dtype=DTYPES[dtype]).element_size()
    xq_bytes = m * k // 2
    sf = sf_bytes(m, k, recipe, layout)
    return {
        "input_bytes": input_bytes,
        "xq_bytes": xq_bytes,
        "sf_bytes": sf,
        "effective_bytes": input_bytes + xq_bytes + sf,
    }


def median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def percentile(values, q: float):
    """Nearest-rank percentile, q in [0, 100]."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def git_commit() -> str | None:
    """$FP4OP_COMMIT if set (the GPU machine gets a copy of the working tree without .git), else HEAD
    of the checkout the benchmark runs from."""
    if os.environ.get("FP4OP_COMMIT"):
        return os.environ["FP4OP_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cpu_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def fp4op_build_info() -> dict:
    import fp4op
    from fp4op import _C

    so_path = getattr(_C, "__file__", None)
    return {
        "version": fp4op.__version__,
        "extension": os.path.basename(so_path) if so_path else None,
        "cuda_kernels": torch._C._dispatch_has_kernel_for_dispatch_key("fp4op::quantize", "CUDA"),
        "cpu_kernels": torch._C._dispatch_has_kernel_for_dispatch_key("fp4op::quantize", "CPU"),
        "cpu_isa": getattr(_C, "cpu_isa", None),
        "FP4OP_CUDA_GENCODE": os.environ.get("FP4OP_CUDA_GENCODE"),
    }


def torchao_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("torchao")
    except Exception:  # not installed, or installed without metadata
        return None


def environment(device: str) -> dict:
    env = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torchao": torchao_version(),
        "cpu": cpu_description(),
        "fp4op": fp4op_build_info(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["device_memory_GiB"] = round(props.total_memory / (1 << 30), 1)
        env["sm_count"] = props.multi_processor_count
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["l2_cache_MiB"] = round(getattr(props, "L2_cache_size", 0) / MiB, 1)
    else:
        env["device"] = "cpu"
    return env
