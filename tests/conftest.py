import os

import pytest
import torch

import fp4op  # noqa: F401  (registers the ops)
from fp4op import layouts

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    config.addinivalue_line("markers", "large: huge-shape GPU tests (select with -m large, skip with -m 'not large')")


# ---- hypothesis profiles: 'ci' (default, bounded and reproducible) and 'long' (nightly fuzzing) -----
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        max_examples=150,
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "long",
        # FP4OP_HYPOTHESIS_EXAMPLES lowers it where a run must fit a time budget (reports say how many ran)
        max_examples=int(os.environ.get("FP4OP_HYPOTHESIS_EXAMPLES", 100_000)),
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("FP4OP_HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is optional: only tests/test_fuzz.py needs it
    pass


# ---- the test matrix --------------------------------------------------------------------------------
DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
# (name, sf_vec_size, sf_use_ue8m0)
RECIPES = (("nvfp4", 16, False), ("mxfp4", 32, True))
LAYOUTS = layouts.LAYOUTS
# how the global scale is given: one element, [M] or [M, 1]
SCALE_KINDS = ("scalar", "per_row", "per_row_2d")


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def matrix_params():
    """The (dtype, vec, ue8m0, layout, scale kind, inversed) matrix shared by the CPU and CUDA tests."""
    for dtype in DTYPES:
        for name, vec, ue8m0 in RECIPES:
            for layout in LAYOUTS:
                # MXFP4 ignores the global scale, so one scale variant is enough for it
                scales = (("none", False),) if ue8m0 else [(k, inv) for k in SCALE_KINDS for inv in (False, True)]
                for kind, inversed in scales:
                    yield pytest.param(
                        dtype, vec, ue8m0, layout, kind, inversed,
                        id=f"{dtype_id(dtype)}-{name}-{layout}-{kind}{'-inv' if inversed else ''}",
                    )



def random_input(shape, dtype, device="cpu", generator=None):
    """Values over many binades: each 16-element block gets its own power-of-two magnitude, so that the
    blocks' scales differ, with a few exact zeros. Finite in every input dtype."""
    shape = tuple(shape)
    k = shape[-1] if shape else 1
    numel = 1
    for s in shape:
        numel *= s
    x = torch.randn(numel, generator=generator, dtype=torch.float32)
    if numel and k:
        blocks = (numel + 15) // 16
        exps = torch.randint(-10, 6, (blocks,), generator=generator).repeat_interleave(16)[:numel]
        x = x * torch.pow(2.0, exps.to(torch.float32))
        x[torch.rand(numel, generator=generator) < 0.02] = 0.0
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-448, 448)
    return x.reshape(shape).to(dtype).to(device)


def make_global_scale(x, kind, device=None):
    """A realistic global scale (448 * 6 / amax, per tensor or per row) given as `kind`."""
    device = x.device if device is None else device
    k = x.shape[-1]
    rows = x.reshape(-1, k).to(torch.float32).abs()
    if kind == "scalar":
        amax = rows.amax() if rows.numel() else torch.tensor(1.0)
        gs = (448.0 * 6.0 / amax.clamp(min=1e-30)).reshape(1)
    else:
        amax = rows.amax(dim=-1) if rows.numel() else torch.ones(rows.shape[0])
        gs = 448.0 * 6.0 / amax.clamp(min=1e-30)
        if kind == "per_row_2d":
            gs = gs.reshape(-1, 1)
    return gs.to(torch.float32).to(device)


def op_quantize(x, gs, vec, ue8m0, layout, inversed=False):
    """torch.ops.fp4op.quantize with a layout name."""
    swz, is8x4 = layouts.layout_flags(layout)
    return torch.ops.fp4op.quantize(x, gs, vec, ue8m0, swz, is8x4, inversed)


def op_dequantize(xq, sf, gs, vec, ue8m0, layout, inversed=False, output_dtype=torch.float32):
    swz, is8x4 = layouts.layout_flags(layout)
    return torch.ops.fp4op.dequantize(xq, sf, gs, vec, ue8m0, swz, is8x4, inversed, output_dtype)


def capture_cuda_graph(fn):
    """fn() run once on a side stream (the warm-up CUDA graphs need), then captured; returns (graph, the
    captured call's outputs), which graph.replay() rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def assert_same_bytes(actual, expected, what=""):
    """Bit-for-bit equality of two tensors, with the first mismatches in the message. For floating
    outputs (dequantize) a NaN matches any NaN: NaN payloads are not part of the contract (the CPU
    kernel makes 0x7FC00000, PyTorch's float8 cast 0x7FF00000, CUDA 0x7FFFFFFF)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.cpu(), expected.cpu()
    if a.dtype.is_floating_point:
        both_nan = torch.isnan(a) & torch.isnan(e)
        a, e = torch.where(both_nan, torch.nan, a), torch.where(both_nan, torch.nan, e)
        a = a.view(torch.uint8) if a.element_size() == 1 else a.view(torch.int16 if a.element_size() == 2 else torch.int32)
        e = e.view(a.dtype)
    diff = (a != e).nonzero()
    if diff.numel():
        first = diff[:5].tolist()
        vals = [(idx, a[tuple(idx)].item(), e[tuple(idx)].item()) for idx in first]
        raise AssertionError(f"{what}: {diff.shape[0]} of {a.numel()} elements differ; first (index, got, want): {vals}")
