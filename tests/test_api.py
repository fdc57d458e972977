"""fp4op.fp4_quantize as a drop-in for flashinfer.quantization.fp4_quantize (SPEC.md), the helpers of
fp4op.api, and the error contract of the API and of the raw ops."""

import numpy as np
import pytest
import torch

import fp4op
from conftest import (
    DTYPES,
    LAYOUTS,
    assert_same_bytes,
    dtype_id,
    make_global_scale,
    op_quantize,
    random_input,
    requires_cuda,
)
from fp4op import layouts, reference

RECIPE_PARAMS = [pytest.param(16, False, id="nvfp4"), pytest.param(32, True, id="mxfp4")]


def api(x, gs, vec, ue8m0, layout, **kw):
    swz, is8x4 = layouts.layout_flags(layout)
    return fp4op.fp4_quantize(x, gs, vec, ue8m0, swz, is8x4, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_match_reference(dtype, vec, ue8m0, layout):
    x = random_input((129, 192), dtype)
    gs = make_global_scale(x, "scalar")
    x_q, sf = api(x, gs, vec, ue8m0, layout)
    assert x_q.dtype == torch.uint8 and x_q.shape == (129, 96)
    assert sf.dtype == torch.uint8 and sf.shape == layouts.sf_shape(129, 192 // vec, layout)
    want = reference.quantize(x, gs, vec, ue8m0, layout)
    assert_same_bytes(x_q, want[0], "x_q")
    assert_same_bytes(sf, want[1], "sf")


def test_defaults_are_nvfp4_128x4():
    x = random_input((7, 64), torch.bfloat16)
    gs = make_global_scale(x, "scalar")
    x_q, sf = fp4op.fp4_quantize(x, gs)
    want = op_quantize(x, gs, 16, False, "128x4")
    assert torch.equal(x_q, want[0]) and torch.equal(sf, want[1]) and sf.shape == (128, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_column_major_input(dtype, vec, ue8m0, layout):
    # [M, K] with stride (1, M): quantized along M (the contiguous dimension), outputs transposed back
    storage = random_input((96, 64), dtype)  # [K, M] row-major
    x = storage.t()
    assert x.stride() == (1, 64) and not x.is_contiguous()
    gs = make_global_scale(storage, "scalar")
    x_q, sf = api(x, gs, vec, ue8m0, layout)
    want_q, want_sf = op_quantize(x.t().contiguous(), gs, vec, ue8m0, layout)
    assert x_q.shape == (want_q.shape[1], want_q.shape[0]) == (32, 96)
    assert_same_bytes(x_q, want_q.t(), "x_q")
    assert_same_bytes(sf, want_sf.t(), "sf")


def test_column_major_per_row_scale_is_per_quantized_row():
    # the per-row scale follows the transposed problem: one scale per row of input.t()
    storage = random_input((64, 32), torch.bfloat16)
    gs = make_global_scale(storage, "per_row")  # 64 scales
    x_q, sf = api(storage.t(), gs, 16, False, "linear")
    want_q, want_sf = op_quantize(storage, gs, 16, False, "linear")
    assert torch.equal(x_q, want_q.t()) and torch.equal(sf, want_sf.t())


@pytest.mark.parametrize("vec, ue8m0", [(16, False), (32, True)])
def test_column_major_block_dimension_error_names_it(vec, ue8m0):
    # a column-major [24, 64] input is quantized along its 24 rows: the message must not call 24 "K"
    x = random_input((64, 24), torch.float16).t()
    with pytest.raises(ValueError, match=r"column-major input \(shape \(24, 64\)\).*size 24 must be a multiple"):
        fp4op.fp4_quantize(x, torch.tensor([1.0]), sf_vec_size=vec, sf_use_ue8m0=ue8m0)
    with pytest.raises(NotImplementedError):  # an unsupported dtype is still the first error
        fp4op.fp4_quantize(x.float(), torch.tensor([1.0]), sf_vec_size=vec, sf_use_ue8m0=ue8m0)


@pytest.mark.parametrize("shape", [(1, 64), (64, 1)])
def test_contiguous_single_row_or_column_is_row_major(shape):
    # a [1, K] view of a column is contiguous: SPEC.md treats it as row-major
    x = random_input(shape[::-1], torch.float16).t()
    assert x.is_contiguous()
    if shape[1] % 16:
        with pytest.raises(ValueError, match="sf_vec_size"):
            fp4op.fp4_quantize(x, torch.ones(1))
        return
    x_q, sf = fp4op.fp4_quantize(x, torch.ones(1))
    want = op_quantize(x.contiguous(), torch.ones(1), 16, False, "128x4")
    assert torch.equal(x_q, want[0]) and torch.equal(sf, want[1])


@pytest.mark.parametrize("kind", ["per_row", "per_row_2d"])
def test_per_row_global_scale(kind):
    x = random_input((129, 64), torch.bfloat16)
    gs = make_global_scale(x, kind)
    x_q, sf = fp4op.fp4_quantize(x, gs, is_sf_swizzled_layout=False)
    rows = [op_quantize(x[i : i + 1], gs.reshape(-1)[i : i + 1], 16, False, "linear") for i in (0, 77, 128)]
    for i, (q, s) in zip((0, 77, 128), rows):
        assert torch.equal(x_q[i], q[0]) and torch.equal(sf[i], s[0])


@pytest.mark.parametrize("gs_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_global_scale_dtype_converted_not_reinterpreted(gs_dtype):
    x = random_input((32, 64), torch.bfloat16)
    gs = make_global_scale(x, "scalar").to(gs_dtype)
    x_q, sf = fp4op.fp4_quantize(x, gs)
    want = fp4op.fp4_quantize(x, gs.to(torch.float32))
    assert torch.equal(x_q, want[0]) and torch.equal(sf, want[1])
    assert (sf != 0).any(), "a reinterpreted bf16 scale gives all-zero scales"


def test_meta_global_scale_is_value_error():
    # SPEC.md: the API moves global_scale to the input's device; a meta scale cannot be moved: a device
    # mismatch, ValueError naming the argument
    x = random_input((32, 64), torch.bfloat16)
    gs = torch.ones(1, device="meta")
    with pytest.raises(ValueError, match="global_scale"):
        fp4op.fp4_quantize(x, gs)
    with pytest.raises(ValueError, match="global_scale"):
        fp4op.dequantize(*fp4op.fp4_quantize(x, torch.ones(1)), gs)


@requires_cuda
@pytest.mark.parametrize("x_device,gs_device", [("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize("kind", ["scalar", "per_row"])
def test_global_scale_on_another_device_is_moved(x_device, gs_device, kind):
    # SPEC.md: "Moved to the input's device by the Python API"
    x = random_input((32, 64), torch.bfloat16, device=x_device)
    gs = make_global_scale(x, kind).to(x_device)
    want = fp4op.fp4_quantize(x, gs)
    got = fp4op.fp4_quantize(x, gs.to(gs_device))
    assert got[0].device == x.device and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(fp4op.dequantize(*want, gs.to(gs_device)), fp4op.dequantize(*want, gs))


@pytest.mark.parametrize("size", [16.0, "16", True, None, 24])
def test_sf_vec_size_not_an_integer_16_or_32_is_not_implemented(size):
    with pytest.raises(NotImplementedError, match="sf_vec_size"):
        fp4op.fp4_quantize(random_input((4, 32), torch.bfloat16), torch.ones(1), sf_vec_size=size)


def test_sf_vec_size_numpy_integer_accepted():
    x = random_input((4, 32), torch.bfloat16)
    got = fp4op.fp4_quantize(x, torch.ones(1), sf_vec_size=np.int64(16))
    want = fp4op.fp4_quantize(x, torch.ones(1))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("flag", ["sf_use_ue8m0", "is_sf_swizzled_layout", "is_sf_8x4_layout", "is_global_scale_inversed"])
@pytest.mark.parametrize("value", ["no", 2, 0.5, None])
def test_flag_not_a_bool_is_value_error(flag, value):
    with pytest.raises(ValueError, match=flag):
        fp4op.fp4_quantize(random_input((4, 32), torch.bfloat16), torch.ones(1), **{flag: value})


@pytest.mark.parametrize("value", [np.False_, 0, 1, np.True_])
def test_flag_numpy_bool_and_int_accepted(value):
    x = random_input((4, 32), torch.bfloat16)
    got = fp4op.fp4_quantize(x, torch.ones(1), is_sf_swizzled_layout=value)
    want = fp4op.fp4_quantize(x, torch.ones(1), is_sf_swizzled_layout=bool(value))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("enable_pdl", [None, True, False])
def test_enable_pdl_accepted(enable_pdl):
    x = random_input((7, 64), torch.bfloat16)
    gs = make_global_scale(x, "scalar")
    got = fp4op.fp4_quantize(x, gs, enable_pdl=enable_pdl)
    want = fp4op.fp4_quantize(x, gs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "dtype,vec,ue8m0",
    [(d, 16, False) for d in DTYPES] + [(torch.float16, 32, True), (torch.bfloat16, 32, True)],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cute_dsl_backend_supported_combinations(dtype, vec, ue8m0, layout):
    x = random_input((7, 64), dtype)
    gs = make_global_scale(x, "scalar")
    got = api(x, gs, vec, ue8m0, layout, backend="cute-dsl")
    want = api(x, gs, vec, ue8m0, layout, backend="cuda")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cute_dsl_backend_rejects_mxfp4_fp8():
    x = random_input((7, 64), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="cute-dsl"):
        fp4op.fp4_quantize(x, None, 32, True, backend="cute-dsl")
    fp4op.fp4_quantize(x, None, 32, True, backend="cuda")  # the cuda backend serves it


@pytest.mark.parametrize("vec,ue8m0", [(16, True), (32, False)])
def test_cute_dsl_backend_rejects_mismatched_recipe(vec, ue8m0):
    with pytest.raises(ValueError, match="cute-dsl"):
        fp4op.fp4_quantize(random_input((7, 64), torch.bfloat16), torch.ones(1), vec, ue8m0, backend="cute-dsl")


# ---- errors: exception class and a message naming the argument ---------------------------------------

X = random_input((7, 64), torch.bfloat16)
GS = torch.ones(1)

API_ERRORS = {
    "sf_vec_size_8": (lambda: fp4op.fp4_quantize(X, GS, 8), NotImplementedError, "sf_vec_size"),
    "sf_vec_size_64_ue8m0": (lambda: fp4op.fp4_quantize(X, GS, 64, True), NotImplementedError, "sf_vec_size"),
    "float32_input": (lambda: fp4op.fp4_quantize(X.float(), GS), NotImplementedError, "input"),
    "float64_input": (lambda: fp4op.fp4_quantize(X.double(), GS), NotImplementedError, "input"),
    "int32_input": (lambda: fp4op.fp4_quantize(X.int(), GS), NotImplementedError, "input"),
    "uint8_input": (lambda: fp4op.fp4_quantize(X.to(torch.uint8), GS), NotImplementedError, "input"),
    "bool_input": (lambda: fp4op.fp4_quantize(X > 0, GS), NotImplementedError, "input"),
    "e5m2_input": (lambda: fp4op.fp4_quantize(X.to(torch.float8_e5m2), GS), NotImplementedError, "input"),
    "unknown_backend": (lambda: fp4op.fp4_quantize(X, GS, backend="triton"), ValueError, "backend"),
    "missing_global_scale": (lambda: fp4op.fp4_quantize(X, None), ValueError, "global_scale"),
    "global_scale_size": (lambda: fp4op.fp4_quantize(X, torch.ones(3)), ValueError, "global_scale"),
    "global_scale_size_m_plus_1": (lambda: fp4op.fp4_quantize(X, torch.ones(8)), ValueError, "global_scale"),
    "global_scale_empty": (lambda: fp4op.fp4_quantize(X, torch.ones(0)), ValueError, "global_scale"),
    "global_scale_int": (lambda: fp4op.fp4_quantize(X, torch.ones(1, dtype=torch.int32)), ValueError, "global_scale"),
    "global_scale_bool": (lambda: fp4op.fp4_quantize(X, torch.ones(1, dtype=torch.bool)), ValueError, "global_scale"),
    "global_scale_float": (lambda: fp4op.fp4_quantize(X, 1.0), ValueError, "global_scale"),
    "k_not_multiple_nvfp4": (lambda: fp4op.fp4_quantize(X[:, :40], GS), ValueError, "sf_vec_size"),
    "k_not_multiple_mxfp4": (lambda: fp4op.fp4_quantize(X[:, :48], None, 32, True), ValueError, "sf_vec_size"),
    "rank_1": (lambda: fp4op.fp4_quantize(X[0], GS), ValueError, "rank"),
    "rank_0": (lambda: fp4op.fp4_quantize(X[0, 0], GS), ValueError, "rank"),
    "ue8m0_with_16": (lambda: fp4op.fp4_quantize(X, GS, 16, True), ValueError, "sf_use_ue8m0"),
    "e4m3_with_32": (lambda: fp4op.fp4_quantize(X, GS, 32, False), ValueError, "sf_use_ue8m0"),
    "not_a_tensor": (lambda: fp4op.fp4_quantize([[1.0] * 16], GS), ValueError, "input"),
    "sparse_coo_input": (lambda: fp4op.fp4_quantize(X.to_sparse(), GS), ValueError, "input must be a dense"),
    "sparse_csr_input": (lambda: fp4op.fp4_quantize(X.to_sparse_csr(), GS), ValueError, "input must be a dense"),
    "nested_input": (
        lambda: fp4op.fp4_quantize(torch.nested.nested_tensor([X[:2], X[:3]]), GS),
        ValueError,
        "input must be a dense",
    ),
    "sparse_dequantize_x_q": (
        lambda: fp4op.dequantize(fp4op.fp4_quantize(X, GS)[0].to_sparse(), fp4op.fp4_quantize(X, GS)[1], GS),
        ValueError,
        "x_q must be a dense",
    ),
}


# (torch warns that its sparse CSR and nested tensors are beta / prototype when the cases build them)
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning", "ignore:The PyTorch API of nested:UserWarning")
@pytest.mark.parametrize("case", list(API_ERRORS))
def test_api_errors(case):
    fn, exc, name = API_ERRORS[case]
    with pytest.raises(exc, match=name) as info:
        fn()
    assert type(info.value) is exc or issubclass(type(info.value), exc)


# Inside a compiled function the API's errors keep their class: an error raised by a fake kernel would
# reach the caller as Dynamo's TorchRuntimeError, so the API checks before calling the op.
COMPILED_API_ERRORS = {
    "k_not_multiple_nvfp4": ((X[:, :40], GS), {}, ValueError, "sf_vec_size"),
    "k_not_multiple_mxfp4": ((X[:, :48], None), {"sf_vec_size": 32, "sf_use_ue8m0": True}, ValueError, "sf_vec_size"),
    "global_scale_size": ((X, torch.ones(3)), {}, ValueError, "global_scale"),
    "missing_global_scale": ((X, None), {}, ValueError, "global_scale"),
    "rank_1": ((X[0], GS), {}, ValueError, "rank"),
    "float32_input": ((X.float(), GS), {}, NotImplementedError, "input"),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(COMPILED_API_ERRORS))
def test_api_errors_keep_their_class_under_compile(case, dynamic):
    args, kwargs, exc, name = COMPILED_API_ERRORS[case]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, g: fp4op.fp4_quantize(x, g, **kwargs), backend="eager", dynamic=dynamic)
    with pytest.raises(exc, match=name) as info:
        compiled(*args)
    assert type(info.value) is exc


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_api_dequantize_error_keeps_its_class_under_compile(dynamic):
    x_q, sf = fp4op.fp4_quantize(X, GS)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, s: fp4op.dequantize(q, s, GS), backend="eager", dynamic=dynamic)
    with pytest.raises(ValueError, match="sf must have shape") as info:
        compiled(x_q, sf[:, :2])
    assert type(info.value) is ValueError


def q(*args):
    return torch.ops.fp4op.quantize(*args)


OP_ERRORS = {
    "sf_vec_size_8": (lambda: q(X, GS, 8, False), NotImplementedError, "sf_vec_size"),
    "float32_input": (lambda: q(X.float(), GS), NotImplementedError, "input"),
    "int_input": (lambda: q(X.int(), GS), NotImplementedError, "input"),
    "bool_input": (lambda: q(X > 0, GS), NotImplementedError, "input"),
    "missing_global_scale": (lambda: q(X, None), ValueError, "global_scale"),
    "global_scale_size": (lambda: q(X, torch.ones(2)), ValueError, "global_scale"),
    "global_scale_int": (lambda: q(X, torch.ones(1, dtype=torch.int64)), ValueError, "global_scale"),
    "k_not_multiple": (lambda: q(X[:, :24], GS), ValueError, "sf_vec_size"),
    "rank_0": (lambda: q(X[0, 0], GS), ValueError, "0-d"),
    "ue8m0_with_16": (lambda: q(X, GS, 16, True), ValueError, "sf_use_ue8m0"),
    "e4m3_with_32": (lambda: q(X, GS, 32, False), ValueError, "sf_use_ue8m0"),
}


@pytest.mark.parametrize("case", list(OP_ERRORS))
def test_op_errors(case):
    fn, exc, name = OP_ERRORS[case]
    with pytest.raises(exc, match=name):
        fn()


def _dq_args():
    x_q, sf = op_quantize(X, GS, 16, False, "128x4")
    return x_q, sf


DEQUANTIZE_ERRORS = {
    "x_q_not_uint8": (lambda q, s: torch.ops.fp4op.dequantize(q.to(torch.int8), s, GS), ValueError, "x_q"),
    "sf_not_uint8": (lambda q, s: torch.ops.fp4op.dequantize(q, s.to(torch.int32), GS), ValueError, "sf"),
    "sf_wrong_size": (lambda q, s: torch.ops.fp4op.dequantize(q, s[:64], GS), ValueError, "sf"),
    "sf_wrong_layout": (
        lambda q, s: torch.ops.fp4op.dequantize(q, s, GS, 16, False, False), ValueError, "sf"),
    "missing_global_scale": (lambda q, s: torch.ops.fp4op.dequantize(q, s, None), ValueError, "global_scale"),
    "output_dtype": (
        lambda q, s: torch.ops.fp4op.dequantize(q, s, GS, output_dtype=torch.int32), ValueError, "output_dtype"),
    "sf_vec_size": (lambda q, s: torch.ops.fp4op.dequantize(q, s, GS, 64), NotImplementedError, "sf_vec_size"),
}


@pytest.mark.parametrize("case", list(DEQUANTIZE_ERRORS))
def test_dequantize_errors(case):
    fn, exc, name = DEQUANTIZE_ERRORS[case]
    x_q, sf = _dq_args()
    with pytest.raises(exc, match=name):
        fn(x_q, sf)


# ---- helpers ----------------------------------------------------------------------------------------

def test_nvfp4_global_scale():
    x = random_input((9, 64), torch.bfloat16)
    amax = x.float().abs().amax()
    gs = fp4op.nvfp4_global_scale(x)
    assert gs.dtype == torch.float32 and gs.shape == (1,)
    assert gs.item() == pytest.approx(2688.0 / amax.item(), rel=1e-6)
    per_row = fp4op.nvfp4_global_scale(x, per_row=True)
    assert per_row.shape == (9,)
    assert torch.allclose(per_row, 2688.0 / x.float().abs().amax(-1))
    # the block that holds the tensor's amax gets the largest E4M3 scale, 448
    _, sf = fp4op.fp4_quantize(x, gs, is_sf_swizzled_layout=False)
    row, col = divmod(int(x.float().abs().argmax()), 64)
    assert sf[row, col // 16].item() == 0x7E


def test_as_float4_view():
    x = random_input((7, 64), torch.bfloat16)
    x_q, sf = fp4op.fp4_quantize(x, torch.ones(1))
    f4 = fp4op.as_float4(x_q)
    assert f4.dtype == torch.float4_e2m1fn_x2 and f4.shape == x_q.shape
    assert f4.data_ptr() == x_q.data_ptr()
    assert torch.equal(f4.view(torch.uint8), x_q)


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_api_dequantize(vec, ue8m0, layout):
    x = random_input((129, 128), torch.bfloat16)
    gs = make_global_scale(x, "per_row")
    swz, is8x4 = layouts.layout_flags(layout)
    x_q, sf = fp4op.fp4_quantize(x, gs, vec, ue8m0, swz, is8x4)
    want = reference.dequantize(x_q, sf, gs, vec, ue8m0, layout, output_dtype=torch.bfloat16)
    got = fp4op.dequantize(x_q, sf, gs, vec, ue8m0, swz, is8x4, output_dtype=torch.bfloat16)
    assert_same_bytes(got, want, "dequantize")
    # the same bytes given as PyTorch's fp4 / fp8 scale dtypes
    sf_typed = sf.view(torch.float8_e8m0fnu if ue8m0 else torch.float8_e4m3fn)
    got_typed = fp4op.dequantize(fp4op.as_float4(x_q), sf_typed, gs, vec, ue8m0, swz,
                                 is8x4, output_dtype=torch.bfloat16)
    assert_same_bytes(got_typed, want, "dequantize of typed views")
    # the other recipe's scale dtype would read the bytes as other scales
    other = sf.view(torch.float8_e4m3fn if ue8m0 else torch.float8_e8m0fnu)
    with pytest.raises(ValueError, match="sf must be float8_e8m0fnu" if ue8m0 else "sf must be float8_e4m3fn"):
        fp4op.dequantize(x_q, other, gs, vec, ue8m0, swz, is8x4)
