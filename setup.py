"""Build of fp4op's extension fp4op._C.

The CUDA kernels are built when a CUDA toolkit is found (CUDA_HOME, or nvcc on the PATH) and
FP4OP_CPU_ONLY is not set to 1; otherwise a CPU-only extension is built. FP4OP_CUDA_GENCODE overrides
the CUDA targets (default: sm_80, sm_90a, sm_100a machine code and compute_80 PTX).
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GENCODE = (
    "-gencode=arch=compute_80,code=sm_80 "
    "-gencode=arch=compute_90a,code=sm_90a "
    "-gencode=arch=compute_100a,code=sm_100a "
    "-gencode=arch=compute_80,code=compute_80"
)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _with_cuda():
    if os.environ.get("FP4OP_CPU_ONLY", "0") == "1":
        return False
    return cpp_extension.CUDA_HOME is not None


def _extension():
    # IEEE float32 everywhere (SPEC.md): no contraction into FMA, no fast-math on the host.
    # -fopenmp: at::parallel_for is inline OpenMP code in torch's headers; without the flag the CPU
    # kernels run on one thread (the omp runtime symbols resolve to torch's own libgomp).
    cxx = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"]
    link = ["-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not _with_cuda():
        return cpp_extension.CppExtension("fp4op._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    gencode = os.environ.get("FP4OP_CUDA_GENCODE", DEFAULT_GENCODE).split()
    # no --use_fast_math: IEEE division and denormals are part of the numerics; the kernels pin
    # rounding with _rn intrinsics where it matters.
    nvcc = ["-O3", "-lineinfo", "-std=c++17", "--expt-relaxed-constexpr", *gencode]
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    return cpp_extension.CUDAExtension(
        "fp4op._C",
        sources,
        extra_compile_args={"cxx": cxx + ["-DFP4OP_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
