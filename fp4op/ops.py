"""Python side of the ops registered in csrc/fp4op.cpp: fake (meta) kernels for tracing and
torch.compile. (Autograd: csrc/autograd.cpp, in C++: quantize's codes carry no gradient; NVFP4
dequantize differentiates in its global scale.)"""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
from . import layouts

_SUPPORTED_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
# packed pairs: a floating dtype that holds no single value (nothing converts it to float32)
_FLOAT4 = getattr(torch, "float4_e2m1fn_x2", None)


def check_recipe(sf_vec_size: int, sf_use_ue8m0: bool) -> None:
    if sf_vec_size not in (16, 32):
        raise NotImplementedError(f"fp4op: sf_vec_size must be 16 (NVFP4) or 32 (MXFP4), got {sf_vec_size}")
    if sf_use_ue8m0 and sf_vec_size != 32:
        raise ValueError(f"fp4op: sf_use_ue8m0=True (MXFP4) requires sf_vec_size=32, got {sf_vec_size}")
    if not sf_use_ue8m0 and sf_vec_size != 16:
        raise ValueError(f"fp4op: sf_use_ue8m0=False (NVFP4) requires sf_vec_size=16, got {sf_vec_size}")


def check_defined(t, name: str) -> None:
    """A tensor argument given as None (the C++ check_defined)."""
    if t is None:
        raise ValueError(f"fp4op: {name} must be a tensor, got None")


def check_input_dtype(input: torch.Tensor, name: str = "input") -> None:
    check_defined(input, name)
    if input.dtype not in _SUPPORTED_INPUT_DTYPES:
        raise NotImplementedError(f"fp4op: {name} must be float16, bfloat16 or float8_e4m3fn, got {input.dtype}")


def check_global_scale_dtype(global_scale: torch.Tensor) -> None:
    if not global_scale.dtype.is_floating_point or global_scale.dtype == _FLOAT4:
        raise ValueError(f"fp4op: global_scale must have a floating dtype, got {global_scale.dtype}")


def check_global_scale(global_scale: torch.Tensor | None, sf_use_ue8m0: bool, m, device: torch.device) -> None:
    """The op's contract on global_scale (the Python API converts dtype and device before this)."""
    if sf_use_ue8m0:
        # ignored, but a CUDA scale with a CPU input would send the call to the CUDA kernel
        if global_scale is not None and global_scale.device != device and global_scale.device.type != "cpu":
            raise ValueError(f"fp4op: global_scale is on {global_scale.device} but the input is on {device}")
        return
    if global_scale is None:
        raise ValueError(
            "fp4op: global_scale is required for NVFP4 (sf_use_ue8m0=False); the usual value is "
            "448 * 6 / amax(input), see fp4op.nvfp4_global_scale"
        )
    check_global_scale_dtype(global_scale)
    n = global_scale.numel()
    if not (n == 1 or n == m):
        raise ValueError(f"fp4op: global_scale must have 1 element or one per row ({m}), got shape {tuple(global_scale.shape)}")
    if global_scale.device != device:
        raise ValueError(f"fp4op: global_scale is on {global_scale.device} but the input is on {device}")


def quantize_shapes(input_shape, sf_vec_size: int, layout: str):
    """(x_q shape, sf shape) of quantizing a row-major input of `input_shape` (SymInt-friendly)."""
    k = input_shape[-1]
    m = math.prod(input_shape[:-1])
    return (*input_shape[:-1], k // 2), layouts.sf_shape(m, k // sf_vec_size, layout)


def require_now(condition, message) -> None:
    """torch._check_value for code that Dynamo traces (the Python API): a plain test (a guard on symbolic
    sizes), since Dynamo does not trace torch._check_value's message closure."""
    if not condition:
        raise ValueError(message())


def check_quantize_shape_and_scale(x, name, global_scale, sf_vec_size, sf_use_ue8m0, require=torch._check_value):
    """The checks of a quantize that follow its recipe and dtype checks. Under torch.compile the Python API
    makes them before calling the op too, with `require=require_now`: an error raised by a fake kernel
    reaches the caller wrapped in Dynamo's TorchRuntimeError, one raised by the traced API as itself."""
    if x.dim() < 1:
        raise ValueError(f"fp4op: {name} must have at least 1 dimension, got a 0-d tensor")
    k = x.shape[-1]
    require(
        k % sf_vec_size == 0,
        lambda: f"fp4op: the last dimension of {name} (K = {k}) must be a multiple of sf_vec_size = {sf_vec_size}",
    )
    check_global_scale(global_scale, sf_use_ue8m0, math.prod(x.shape[:-1]), x.device)


def fake_quantize_outputs(x, name, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout):
    """check_quantize_shape_and_scale and the empty (x_q, sf) of a quantize: shared by the fake kernels
    of fp4op::quantize and of the fused ops."""
    check_quantize_shape_and_scale(x, name, global_scale, sf_vec_size, sf_use_ue8m0)
    layout = layouts.layout_from_flags(is_sf_swizzled_layout, is_sf_8x4_layout)
    xq_shape, sf_shape = quantize_shapes(x.shape, sf_vec_size, layout)
    return x.new_empty(xq_shape, dtype=torch.uint8), x.new_empty(sf_shape, dtype=torch.uint8)


@torch.library.register_fake("fp4op::quantize")
def _quantize_fake(
    input,
    global_scale,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
    enable_pdl=None,
):
    check_recipe(sf_vec_size, sf_use_ue8m0)
    check_input_dtype(input)
    return fake_quantize_outputs(
        input, "input", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )


@torch.library.register_fake("fp4op::dequantize")
def _dequantize_fake(
    x_q,
    sf,
    global_scale,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
    output_dtype=None,
):
    output_dtype = check_dequantize_args(
        x_q, sf, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, output_dtype
    )
    return x_q.new_empty((*x_q.shape[:-1], 2 * x_q.shape[-1]), dtype=output_dtype)


def check_dequantize_args(
    x_q, sf, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, output_dtype,
    require=torch._check_value,
) -> torch.dtype:
    """The checks of check_dequantize_args (csrc/op_args.h), in its order: dequantize's fake kernel and
    the Python API (see check_quantize_shape_and_scale). Returns the output dtype (None: float32)."""
    check_recipe(sf_vec_size, sf_use_ue8m0)
    check_defined(x_q, "x_q")
    check_defined(sf, "sf")
    if x_q.dtype != torch.uint8:
        raise ValueError(f"fp4op: x_q must be uint8 (two E2M1 codes a byte), got {x_q.dtype}")
    if sf.dtype != torch.uint8:
        raise ValueError(f"fp4op: sf must be uint8, got {sf.dtype}")
    if x_q.dim() < 1:
        raise ValueError("fp4op: x_q must have at least 1 dimension")
    if sf.device != x_q.device:
        raise ValueError(f"fp4op: sf is on {sf.device} but x_q is on {x_q.device}")
    k = 2 * x_q.shape[-1]
    require(
        k % sf_vec_size == 0,
        lambda: f"fp4op: 2 * x_q.size(-1) (K = {k}) must be a multiple of sf_vec_size = {sf_vec_size}",
    )
    m = math.prod(x_q.shape[:-1])
    rows, cols = layouts.sf_shape(m, k // sf_vec_size, layouts.layout_from_flags(is_sf_swizzled_layout, is_sf_8x4_layout))
    sf_shape_ok = (sf.shape[0] == rows and sf.shape[1] == cols) if sf.dim() == 2 else (
        sf.dim() == 1 and sf.shape[0] == rows * cols
    )
    require(
        sf_shape_ok,
        lambda: f"fp4op: sf must have shape [{rows}, {cols}] (or those elements flattened) for this x_q and "
        f"layout, got shape {tuple(sf.shape)}",
    )
    output_dtype = torch.float32 if output_dtype is None else output_dtype
    if output_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fp4op: output_dtype must be float32, bfloat16 or float16, got {output_dtype}")
    check_global_scale(global_scale, sf_use_ue8m0, m, x_q.device)
    return output_dtype
