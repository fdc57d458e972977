"""The custom ops as PyTorch ops: torch.library.opcheck over the matrix, fake tensors, torch.compile
with dynamic shapes, autograd."""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fp4op
from conftest import DTYPES, LAYOUTS, RECIPES, SCALE_KINDS, dtype_id, make_global_scale, op_quantize, random_input
from fp4op import layouts

# (M, K) pairs cycled through the matrix so that every M and every K appears (K = 48 is NVFP4-only)
SHAPES_NVFP4 = [(1, 16), (7, 48), (128, 32), (129, 2048), (300, 48), (7, 16), (129, 32)]
SHAPES_MXFP4 = [(1, 32), (7, 2048), (128, 64), (129, 32), (300, 96)]


def _opcheck_utils(dtype):
    # opcheck's test_schema compares inputs before and after the call for mutation with arithmetic
    # (SchemaCheckMode.bitwise_equal) that PyTorch's CPU backend lacks for float8:
    # 'NotImplementedError: "mul_cpu_reduced_float" not implemented for Float8_e4m3fn'. Only that check
    # is dropped for float8 inputs; test_fp8_input_not_mutated checks mutation of those by hand.
    if dtype == torch.float8_e4m3fn:
        return ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _quantize_cases():
    counter = itertools.count()
    for dtype in DTYPES:
        for name, vec, ue8m0 in RECIPES:
            for layout in LAYOUTS:
                scales = (("none", False),) if ue8m0 else [(k, inv) for k in SCALE_KINDS for inv in (False, True)]
                for kind, inversed in scales:
                    shapes = SHAPES_MXFP4 if ue8m0 else SHAPES_NVFP4
                    m, k = shapes[next(counter) % len(shapes)]
                    yield pytest.param(
                        dtype, vec, ue8m0, layout, kind, inversed, m, k,
                        id=f"{dtype_id(dtype)}-{name}-{layout}-{kind}{'-inv' if inversed else ''}-{m}x{k}",
                    )


def _args(x, gs, vec, ue8m0, layout, inversed):
    swz, is8x4 = layouts.layout_flags(layout)
    return (x, gs, vec, ue8m0, swz, is8x4, inversed)


@pytest.mark.parametrize("dtype,vec,ue8m0,layout,kind,inversed,m,k", list(_quantize_cases()))
def test_opcheck_quantize(dtype, vec, ue8m0, layout, kind, inversed, m, k):
    x = random_input((m, k), dtype)
    gs = None if ue8m0 else make_global_scale(x, kind)
    torch.library.opcheck(
        torch.ops.fp4op.quantize.default, _args(x, gs, vec, ue8m0, layout, inversed), test_utils=_opcheck_utils(dtype)
    )


def test_opcheck_quantize_mxfp4_with_ignored_global_scale():
    x = random_input((7, 64), torch.bfloat16)
    torch.library.opcheck(torch.ops.fp4op.quantize.default, _args(x, torch.ones(1), 32, True, "128x4", False))


@pytest.mark.parametrize("name,vec,ue8m0", RECIPES, ids=[r[0] for r in RECIPES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind,inversed", [("scalar", False), ("per_row", True), ("per_row_2d", False)])
@pytest.mark.parametrize("output_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_opcheck_dequantize(name, vec, ue8m0, layout, kind, inversed, output_dtype):
    x = random_input((129, 64), torch.bfloat16)
    gs = make_global_scale(x, kind)
    x_q, sf = op_quantize(x, gs, vec, ue8m0, layout, inversed)
    swz, is8x4 = layouts.layout_flags(layout)
    torch.library.opcheck(
        torch.ops.fp4op.dequantize.default, (x_q, sf, gs, vec, ue8m0, swz, is8x4, inversed, output_dtype)
    )


@pytest.mark.parametrize("vec,ue8m0", [(16, False), (32, True)], ids=["nvfp4", "mxfp4"])
def test_fp8_input_not_mutated(vec, ue8m0):
    x = random_input((129, 64), torch.float8_e4m3fn)
    before = x.view(torch.uint8).clone()
    gs = make_global_scale(x, "per_row")
    gs_before = gs.clone()
    op_quantize(x, gs, vec, ue8m0, "128x4")
    assert torch.equal(x.view(torch.uint8), before) and torch.equal(gs, gs_before)


# ---- fake tensors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", [(16, False), (32, True)], ids=["nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(1, 64), (129, 96 * 2), (3, 5, 64), (0, 64), (300, 0)])
def test_fake_shapes_dtypes_devices(layout, dtype, vec, ue8m0, shape):
    real = torch.zeros(shape, dtype=dtype)
    want_xq, want_sf = op_quantize(real, torch.ones(1), vec, ue8m0, layout)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(real)
        x_q, sf = op_quantize(x, mode.from_tensor(torch.ones(1)), vec, ue8m0, layout)
        deq = fp4op.dequantize(x_q, sf, mode.from_tensor(torch.ones(1)), vec, ue8m0, *layouts.layout_flags(layout),
                               output_dtype=torch.bfloat16)
    assert (x_q.shape, x_q.dtype, x_q.device) == (want_xq.shape, torch.uint8, real.device)
    assert (sf.shape, sf.dtype, sf.device) == (want_sf.shape, torch.uint8, real.device)
    assert (deq.shape, deq.dtype) == (shape, torch.bfloat16)
    # the meta device goes through the same fake kernels
    meta_xq, meta_sf = op_quantize(real.to("meta"), torch.ones(1, device="meta"), vec, ue8m0, layout)
    assert meta_xq.shape == want_xq.shape and meta_sf.shape == want_sf.shape and meta_sf.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for fake CUDA tensors")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_cuda_device(layout):
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(129, 64, dtype=torch.bfloat16, device="cuda"))
        gs = mode.from_tensor(torch.ones(1, device="cuda"))
        x_q, sf = op_quantize(x, gs, 16, False, layout)
    assert x_q.device.type == "cuda" and sf.device.type == "cuda"
    assert sf.shape == layouts.sf_shape(129, 4, layout)


# ---- torch.compile ----------------------------------------------------------------------------------

def test_compile_dynamic_no_recompile_and_bit_identical():
    from torch._dynamo.testing import CompileCounterWithBackend

    def quantize_both(x, gs):
        # the API and the raw ops in one graph
        x_q, sf = fp4op.fp4_quantize(x, gs, 16, False, True, False)
        mx_q, mx_sf = torch.ops.fp4op.quantize(x, None, 32, True, False, False, False)
        deq = torch.ops.fp4op.dequantize(x_q, sf, gs, 16, False, True, False, False, torch.bfloat16)
        return x_q, sf, mx_q, mx_sf, deq

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(quantize_both, backend=counter, dynamic=True, fullgraph=True)
    for m in (7, 129, 300, 1000):
        x = random_input((m, 128), torch.bfloat16)
        gs = make_global_scale(x, "per_row")
        got = compiled(x, gs)
        want = quantize_both(x, gs)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.equal(g.view(torch.uint8) if g.dtype == torch.uint8 else g.view(torch.int16),
                               w.view(torch.uint8) if w.dtype == torch.uint8 else w.view(torch.int16))
    assert counter.frame_count == 1, f"recompiled when M changed: {counter.frame_count} compilations"
    torch._dynamo.reset()


# ---- autograd ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_input_requiring_grad(dtype):
    x = random_input((7, 64), dtype).requires_grad_()
    gs = make_global_scale(x.detach(), "scalar").requires_grad_()
    x_q, sf = torch.ops.fp4op.quantize(x, gs)
    api_q, api_sf = fp4op.fp4_quantize(x, gs)
    for t in (x_q, sf, api_q, api_sf):
        assert not t.requires_grad and t.grad_fn is None
    want = torch.ops.fp4op.quantize(x.detach(), gs.detach())
    assert torch.equal(x_q, want[0]) and torch.equal(sf, want[1])


def test_every_op_has_a_cpp_autograd_kernel():
    # A Python autograd kernel (torch.library.register_autograd) would run on every call, under no_grad
    # too, and add about 10 us of host time to each quantize: every op's is csrc/autograd.cpp's.
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fp4op::"))
    assert "fp4op::quantize" in names and "fp4op::add_rms_norm_quantize" in names
    for name in names:
        autograd = [line for line in torch._C._dispatch_dump(name).splitlines() if line.startswith("Autograd")]
        assert len(autograd) == 1 and "csrc/autograd.cpp" in autograd[0], (name, autograd)


def test_no_grad_keeps_outputs_free_of_history():
    x = random_input((7, 64), torch.bfloat16).requires_grad_()
    r = random_input((7, 64), torch.bfloat16).requires_grad_()
    gs = make_global_scale(x.detach(), "scalar")
    with torch.no_grad():
        outs = torch.ops.fp4op.add_rms_norm_quantize(x, r, None, 1e-6, global_scale=gs)
    assert all(not t.requires_grad and t.grad_fn is None for t in outs)
    outs = torch.ops.fp4op.add_rms_norm_quantize(x, r, None, 1e-6, global_scale=gs)
    assert [t.requires_grad for t in outs] == [False, False, True]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("sum_in_float32", [False, True], ids=["rounded_sum", "float32_sum"])
def test_next_residual_differentiates_as_the_add(sum_in_float32, compiled):
    """add_rms_norm_quantize's next residual is x + residual: x and residual get the add's gradient (the
    codes none), as in the unfused graph; also compiled (AOTAutograd traces that backward), also where
    only one of them requires grad."""
    w = random_input((64,), torch.bfloat16)
    gs = make_global_scale(w, "scalar")

    def fused(x, r):
        _, _, total = torch.ops.fp4op.add_rms_norm_quantize(
            x, r, w, 1e-6, global_scale=gs, sum_in_float32=sum_in_float32
        )
        return total * 3

    def unfused(x, r):
        total = (x.float() + r.float()).to(x.dtype) if sum_in_float32 else x + r
        return total * 3

    run = torch.compile(fused, dynamic=True) if compiled else fused
    grad = random_input((5, 64), torch.bfloat16)
    for needs in ((True, True), (False, True)):
        got, want = [], []
        for fn, out in ((run, got), (unfused, want)):
            x = random_input((5, 64), torch.bfloat16).requires_grad_(needs[0])
            r = random_input((5, 64), torch.bfloat16).requires_grad_(needs[1])
            fn(x, r).backward(grad)
            out.extend([x.grad, r.grad])
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b)
    torch._dynamo.reset()


def test_opcheck_with_inputs_requiring_grad():
    x = random_input((3, 64), torch.bfloat16).requires_grad_()
    r = random_input((3, 64), torch.bfloat16).requires_grad_()
    gs = make_global_scale(x.detach(), "scalar")
    # opcheck's AOT test sums every output into one accumulator, the uint8 codes' integer sum first, and
    # cannot add the bfloat16 next residual to it (a limit of the test, not of the op: its compiled
    # backward is test_next_residual_differentiates_as_the_add's)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for kwargs in ({"global_scale": gs}, {"global_scale": gs, "sum_in_float32": True}):
        torch.library.opcheck(torch.ops.fp4op.add_rms_norm_quantize, (x, r, None, 1e-6), kwargs, test_utils=utils)
    torch.library.opcheck(torch.ops.fp4op.rms_norm_quantize, (x, None, 1e-6), {"global_scale": gs})
    # dequantize in a global scale requiring grad: every test, the AOT backward's included
    x_q, sf = torch.ops.fp4op.quantize(x.detach(), gs)
    for inversed in (False, True):
        scale = gs.clone().requires_grad_()
        torch.library.opcheck(torch.ops.fp4op.dequantize, (x_q, sf, scale), {"is_global_scale_inversed": inversed})


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("kind,inversed", [("scalar", False), ("per_row", False), ("scalar", True), ("per_row_2d", True)])
def test_dequantize_differentiates_in_the_global_scale(kind, inversed, compiled):
    """NVFP4 dequantize is e2m1(q) * sf_dec / S, S the global scale (its reciprocal when inversed): its
    gradient in the scale is -out / gs (out / gs inversed) summed over the scale's values, which a
    central difference confirms (the codes and scales are fixed inputs, so out is c / S exactly up to
    rounding); also compiled, where AOTAutograd traces that backward. MXFP4 values do not depend on it."""
    x = random_input((7, 64), torch.bfloat16)
    gs = make_global_scale(x, kind)
    x_q, sf = torch.ops.fp4op.quantize(x, gs, 16, False, True, False, False)
    if inversed:
        gs = torch.reciprocal(gs)
    weights = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))

    def loss(scale):
        out = torch.ops.fp4op.dequantize(x_q, sf, scale, 16, False, True, False, inversed)
        return (out * weights).sum()

    run = torch.compile(loss, dynamic=True) if compiled else loss
    scale = gs.clone().requires_grad_()
    run(scale).backward()
    with torch.no_grad():
        out = torch.ops.fp4op.dequantize(x_q, sf, gs, 16, False, True, False, inversed)
        rows = (out * weights).sum(-1)
        per_scale = rows.sum().reshape(1) if gs.numel() == 1 else rows
        want = (per_scale / gs.reshape(-1) * (1.0 if inversed else -1.0)).reshape(gs.shape)
    torch.testing.assert_close(scale.grad, want, rtol=1e-5, atol=0)
    h = 1e-3  # out is linear in 1 / S: the central difference is exact up to float32 rounding
    with torch.no_grad():
        for i in range(gs.numel()):
            up, down = gs.clone(), gs.clone()
            up.view(-1)[i] *= 1 + h
            down.view(-1)[i] *= 1 - h
            numeric = (loss(up) - loss(down)) / (2 * h * gs.view(-1)[i])
            torch.testing.assert_close(scale.grad.view(-1)[i], numeric, rtol=2e-2, atol=1e-6)
    mx_q, mx_sf = torch.ops.fp4op.quantize(x, None, 32, True)
    assert not torch.ops.fp4op.dequantize(mx_q, mx_sf, scale, 32, True).requires_grad
    torch._dynamo.reset()


def test_dequantize_backward_of_no_rows():
    x = torch.zeros(0, 64, dtype=torch.bfloat16)
    for gs in (torch.ones(1), torch.ones(0)):
        x_q, sf = torch.ops.fp4op.quantize(x, gs)
        scale = gs.clone().requires_grad_()
        torch.ops.fp4op.dequantize(x_q, sf, scale).sum().backward()
        assert torch.equal(scale.grad, torch.zeros_like(gs))


def test_dequantize_backward_sees_in_place_changes():
    x = random_input((7, 64), torch.bfloat16)
    gs = make_global_scale(x, "scalar")
    x_q, sf = torch.ops.fp4op.quantize(x, gs)
    out = torch.ops.fp4op.dequantize(x_q, sf, gs.clone().requires_grad_())
    loss = out.sum()
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()
