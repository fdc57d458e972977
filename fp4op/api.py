"""The user-facing API: `fp4_quantize` (a drop-in for flashinfer.quantization.fp4_quantize) and the
helpers around it."""

from __future__ import annotations

import math
import operator

import torch

from . import layouts, ops

_BACKENDS = ("cuda", "cute-dsl")


def _is_column_major(input: torch.Tensor) -> bool:
    # SPEC.md: rank 2, not contiguous, and its transpose contiguous
    return input.dim() == 2 and not input.is_contiguous() and input.t().is_contiguous()


def _prepare_global_scale(global_scale, sf_use_ue8m0: bool, device: torch.device):
    if sf_use_ue8m0:
        return None
    if global_scale is None:
        return None  # the op raises the error
    if type(global_scale) is torch.Tensor and global_scale.dtype is torch.float32 and global_scale.device == device:
        return global_scale  # the common case, as the op takes it (its own checks follow)
    if not isinstance(global_scale, torch.Tensor):
        raise ValueError(f"fp4op: global_scale must be a torch.Tensor, got {type(global_scale).__name__}")
    ops.check_global_scale_dtype(global_scale)
    if global_scale.device != device and global_scale.device.type == "meta":
        # SPEC.md moves the scale to the input's device; a meta scale has no values to move
        raise ValueError(f"fp4op: global_scale must be on the input's device ({device}), got {global_scale.device}")
    # moved (SPEC.md) and converted, never reinterpreted (a bf16 scale read as fp32 gives all-zero scales)
    return global_scale.to(device=device, dtype=torch.float32)


def _check_sf_vec_size(sf_vec_size) -> int:
    """sf_vec_size as an int; anything but the integer 16 or 32 is NotImplementedError (SPEC.md)."""
    if type(sf_vec_size) is int and sf_vec_size in (16, 32):
        return sf_vec_size
    try:
        size = operator.index(sf_vec_size)  # ints and numpy integers, not floats or bools
    except TypeError:
        size = None
    if size not in (16, 32) or isinstance(sf_vec_size, bool):
        raise NotImplementedError(f"fp4op: sf_vec_size must be 16 (NVFP4) or 32 (MXFP4), got {sf_vec_size!r}")
    return size


def _check_flag(name: str, value) -> bool:
    """A boolean argument: Python/numpy booleans and the integers 0 and 1."""
    if value is True or value is False:
        return value
    if isinstance(value, (bool, int)) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        if value in (0, 1):
            return bool(value)
    raise ValueError(f"fp4op: {name} must be a bool, got {value!r}")


def _check_recipe_args(sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed):
    """The recipe and layout arguments of fp4_quantize/dequantize, checked, as (int, bool, bool, bool, bool)."""
    flags = (
        ("sf_use_ue8m0", sf_use_ue8m0),
        ("is_sf_swizzled_layout", is_sf_swizzled_layout),
        ("is_sf_8x4_layout", is_sf_8x4_layout),
        ("is_global_scale_inversed", is_global_scale_inversed),
    )
    return (_check_sf_vec_size(sf_vec_size), *(_check_flag(name, value) for name, value in flags))


def _check_dense_tensor(name: str, value) -> None:
    """A torch.Tensor with strided storage: sparse and nested tensors would otherwise fail deep in torch
    with messages that do not name the argument."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"fp4op: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_nested:
        kind = "nested" if value.is_nested else str(value.layout).replace("torch.", "")
        raise ValueError(f"fp4op: {name} must be a dense (strided) tensor, got a {kind} tensor; call .to_dense() first")


def fp4_quantize(
    input: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    sf_vec_size: int = 16,
    sf_use_ue8m0: bool = False,
    is_sf_swizzled_layout: bool = True,
    is_sf_8x4_layout: bool = False,
    is_global_scale_inversed: bool = False,
    enable_pdl: bool | None = None,
    backend: str = "cuda",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `input` [..., K] (fp16/bf16/fp8 e4m3) to NVFP4 or MXFP4.

    Same signature, outputs and errors as flashinfer.quantization.fp4_quantize (exact arithmetic
    mode, SPEC.md): returns ``(x_q, sf)`` with ``x_q`` uint8 ``[..., K/2]`` (two E2M1 codes a byte,
    view it as ``torch.float4_e2m1fn_x2`` if you like) and ``sf`` the 2-D uint8 scale factors in the
    requested layout. Works on CPU and CUDA tensors. A column-major 2-D input is quantized along its
    contiguous dimension and both outputs come back transposed (a per-row global scale then has one
    element per quantized row: per column of `input`). `global_scale` (1 or M elements, any
    floating dtype) is converted to float32 and moved to the input's device (a CPU scale for a CUDA input
    costs a host-to-device copy, which a CUDA graph capture does not allow: keep it on the GPU there).

    `enable_pdl`: launch the CUDA kernel with Programmatic Dependent Launch, so that its launch overlaps
    the end of the previous kernel on the stream (it waits for that kernel's results before reading
    memory). None: on wherever the GPU has it (sm_90+). Never changes results; ignored on the CPU.
    """
    sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed = _check_recipe_args(
        sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed
    )
    if backend not in _BACKENDS:
        raise ValueError(f"fp4op: unknown backend {backend!r}; must be 'cuda' or 'cute-dsl'")
    _check_dense_tensor("input", input)
    ops.check_input_dtype(input)
    if backend == "cute-dsl":
        # flashinfer's cute-dsl kernel serves NVFP4 (fp16/bf16/fp8) and MXFP4 (fp16/bf16); fp4op
        # serves it with its own kernel, same results
        if (sf_vec_size, sf_use_ue8m0) not in ((16, False), (32, True)) or (
            sf_use_ue8m0 and input.dtype == torch.float8_e4m3fn
        ):
            raise ValueError(
                "fp4op: backend='cute-dsl' supports sf_vec_size=16/sf_use_ue8m0=False (fp16, bf16, fp8) and "
                f"sf_vec_size=32/sf_use_ue8m0=True (fp16, bf16); got sf_vec_size={sf_vec_size}, "
                f"sf_use_ue8m0={sf_use_ue8m0}, input dtype {input.dtype}"
            )
    if input.dim() < 2:
        raise ValueError(f"fp4op: input must have rank >= 2 ([M, K] or [..., K]), got shape {tuple(input.shape)}")
    column_major = _is_column_major(input)
    x = input.t() if column_major else input
    # (dtype and sf_vec_size are checked above) the op's message would name K, the transposed problem's
    if column_major and x.size(-1) % sf_vec_size != 0:
        raise ValueError(
            f"fp4op: a column-major input (shape {tuple(input.shape)}) is quantized along its first dimension, "
            f"whose size {x.size(-1)} must be a multiple of sf_vec_size = {sf_vec_size}"
        )
    gs = _prepare_global_scale(global_scale, sf_use_ue8m0, input.device)
    if torch.compiler.is_compiling():  # eager: the op's own checks raise the same errors
        ops.check_quantize_shape_and_scale(x, "input", gs, sf_vec_size, sf_use_ue8m0, require=ops.require_now)
    flags = (sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed)
    # enable_pdl only when given: graphs then hold the plain call that the fusion rules match
    pdl = () if enable_pdl is None else (bool(enable_pdl),)
    x_q, sf = torch.ops.fp4op.quantize.default(x, gs, *flags, *pdl)
    if column_major:
        return x_q.t(), sf.t()
    return x_q, sf


def dequantize(
    x_q: torch.Tensor,
    sf: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    sf_vec_size: int = 16,
    sf_use_ue8m0: bool = False,
    is_sf_swizzled_layout: bool = True,
    is_sf_8x4_layout: bool = False,
    is_global_scale_inversed: bool = False,
    output_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of fp4_quantize: ``e2m1(q) * sf_dec / S`` (NVFP4) or ``e2m1(q) * 2^(sf - 127)`` (MXFP4),
    in `output_dtype`. `x_q` may also be float4_e2m1fn_x2, `sf` float8_e4m3fn / float8_e8m0fnu. `sf` has
    its layout's 2-D shape (or is flattened). The transposed pair that fp4_quantize returns for a
    column-major input is dequantized along its first dimension and comes back with that input's shape.
    Arguments are checked as in fp4_quantize."""
    sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed = _check_recipe_args(
        sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, is_global_scale_inversed
    )
    for name, value in (("x_q", x_q), ("sf", sf)):
        _check_dense_tensor(name, value)
    if x_q.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        x_q = x_q.view(torch.uint8)
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    if sf.dtype in (torch.float8_e4m3fn, e8m0):
        # a typed sf says which recipe wrote it: read as the other one, its bytes would mean other scales
        if (sf.dtype == e8m0) != sf_use_ue8m0:
            want = "float8_e8m0fnu (or uint8) for MXFP4" if sf_use_ue8m0 else "float8_e4m3fn (or uint8) for NVFP4"
            raise ValueError(f"fp4op: sf must be {want}, got {sf.dtype}")
        sf = sf.view(torch.uint8)
    column_major = _is_column_major(x_q)
    if column_major:
        x_q = x_q.t()
        if sf.dim() == 2:
            # fp4_quantize's sf.t(): told by its shape (strides say nothing where a dimension is 1)
            layout = layouts.layout_from_flags(is_sf_swizzled_layout, is_sf_8x4_layout)
            rows, cols = layouts.sf_shape(x_q.shape[0], 2 * x_q.shape[1] // sf_vec_size, layout)
            if tuple(sf.shape) != (rows, cols) or (rows == cols and _is_column_major(sf)):
                sf = sf.t()
    gs = _prepare_global_scale(global_scale, sf_use_ue8m0, x_q.device)
    if torch.compiler.is_compiling():  # as in fp4_quantize
        ops.check_dequantize_args(
            x_q, sf, gs, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout, output_dtype,
            require=ops.require_now,
        )
    out = torch.ops.fp4op.dequantize(
        x_q, sf, gs, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout,
        is_global_scale_inversed, output_dtype,
    )
    return out.t() if column_major else out


def nvfp4_global_scale(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """The usual NVFP4 global scale ``448 * 6 / amax(x)`` as float32: one element, or one per row
    ``[M]`` with `per_row`. All-zero input gives an infinite scale, whose blocks quantize to zero; so
    does an empty one (nothing to quantize)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("fp4op: nvfp4_global_scale needs a tensor [..., K] with at least 1 dimension")
    a = x.to(torch.float32).abs()  # widen first: float8 has no abs on every backend
    if per_row:
        rows = a.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (not -1: ambiguous when K = 0)
        amax = rows.amax(dim=-1) if rows.shape[-1] > 0 else rows.new_zeros(rows.shape[0])
    else:
        amax = a.amax().reshape(1) if a.numel() > 0 else a.new_zeros(1)
    return (448.0 * 6.0) / amax


def as_float4(x_q: torch.Tensor) -> torch.Tensor:
    """The packed codes as PyTorch's ``torch.float4_e2m1fn_x2`` dtype (same bytes)."""
    return x_q.view(torch.float4_e2m1fn_x2)


__all__ = ["fp4_quantize", "dequantize", "nvfp4_global_scale", "as_float4", "layouts"]
