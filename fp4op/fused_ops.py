"""Python side of the fused "norm/activation + FP4 quantize" ops of csrc/fused.cpp: fake (meta) kernels
for tracing and torch.compile. (Autograd, csrc/autograd.cpp: the codes carry no gradient;
add_rms_norm_quantize's next residual differentiates as the add x + residual, the *_with_normed norm
outputs as the eager norms below, recomputed in the backward.)

Each op returns ``(x_q, sf)`` exactly as ``torch.ops.fp4op.quantize`` of the norm/activation output
computed in the input's dtype (float16/bfloat16) the way eager PyTorch computes it;
``add_rms_norm_quantize`` also returns ``x + residual`` in the input dtype (the next residual), and the
``*_with_normed`` norms (``rms_norm_quantize_with_normed``, ``layer_norm_quantize_with_normed``,
``add_rms_norm_quantize_with_normed``, and the ``_eps_tensor`` forms of the RMSNorm ones) also the norm
output itself, last (what they quantize, in the input dtype, contiguous): for a norm output the model also
reads elsewhere (post-LN residual streams, MoE routers). ``rms_norm_add_quantize`` (and its
``_eps_tensor`` form) quantizes ``round(residual + rms_norm(x))`` and returns that sum too: a post-norm
residual stream (OLMo2's ``h = residual + post_attention_layernorm(attn)``, which the next projections
quantize and the next residual add reads).

The eager forms reproduced (float32 opmath, ``round`` = rounding to the input dtype; the shared C++
math is csrc/fused_math.h):

* ``rms_norm_quantize``: ``r = rsqrt(mean(x^2) + eps)``; no weight: ``round(x * r)``;
  ``weight_in_input_dtype=False``: ``round(x * r * (weight_offset + w))`` (F.rms_norm for
  ``weight_offset=0``, Hugging Face Gemma for ``weight_offset=1``); ``weight_in_input_dtype=True``:
  ``round(round(weight_offset + w) * round(x * r))`` (Hugging Face Llama). ``weight_offset`` only
  applies with a weight; ``weight_offset=0`` uses ``w`` itself (a -0 weight stays -0). ``add_rms_norm_quantize`` normalizes ``round(x + residual)``, or with
  ``sum_in_float32=True`` the float32 sum itself (vLLM's RMSNorm: ``x.float() + residual.float()``, the
  next residual its rounding).
* ``rms_norm_quantize_eps_tensor`` / ``add_rms_norm_quantize_eps_tensor``: the same with eps a
  one-element floating-point tensor (on the CPU, or on x's device where the kernel reads it), used as
  its float32 rounding: ``torch.compile(dynamic=True)`` passes a module's float eps attribute as a 0-d
  tensor graph input.
* ``rms_norm_add_quantize``: ``round(residual + y)`` with ``y`` the rounded output of
  ``rms_norm_quantize``'s norm (same weight forms).
* ``layer_norm_quantize``: F.layer_norm with biased variance, in the form of the device's torch
  kernel: CUDA ``round(w * ((x - mean) * rstd) + b)``; CPU ``round((x * rstd + (-rstd * mean)) * w + b)``
  with ``w = 1`` / ``b = 0`` where absent (both multiply-adds fused in torch's AVX2/AVX512 builds,
  rounded per step in its DEFAULT build).
* ``layer_norm_modulate_quantize``: ``round(round(y * multiplier) + shift)`` with ``y`` the rounded output
  of ``layer_norm_quantize``'s norm: the adaLN modulation of diffusion transformers (DiT, PixArt, SD3,
  FLUX: ``norm(x) * (1 + scale[:, None]) + shift[:, None]``, multiplier = ``1 + scale``). multiplier and
  shift broadcast to x per sample: shape ``[*x.shape[:j], 1, ..., 1, K]`` for some j (``[B, 1, K]`` for x
  ``[B, T, K]``; ``[K]`` for every row).
* ``silu_quantize`` / ``gelu_quantize``: ``round(act(x))``; ``*_and_mul_quantize``:
  ``round(round(act(gate)) * up)`` (eager ``F.silu(gate) * up``). On CUDA with torch's silu/gelu
  formulas (CUDA's ``expf``/``erff``/``tanhf``); on CPU ``act`` is torch's own kernel (``at::silu`` /
  ``at::gelu`` of the view passed in): its vectorized builds (AVX2, AVX512) and their scalar tails
  compute exp/erf/tanh differently, and calling it is the only way to match every one bit for bit.
* ``relu_quantize``: ``F.relu(x)`` (exact; -0 becomes +0 on CUDA and stays -0 on CPU, as torch's
  kernels do), with ``squared=True``
  ``round(relu(x) * relu(x))`` (eager ``F.relu(x) ** 2`` / ``torch.square``; on CPU torch's ops).
* ``gelu_new_quantize``: Hugging Face's ``gelu_new`` (GPT-2, minGPT's NewGELU), the tanh GELU written
  out, ``0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))``,
  with every op rounded to the input dtype as eager rounds it (not ``gelu_quantize(x, "tanh")``, which
  rounds once): on CUDA torch's kernels' steps (csrc/fused_math.h, ``gelu_new_rounded``), on CPU the
  same ATen ops. ``sqrt_2_over_pi`` (last): that factor as a one-element tensor (on the CPU or on x's
  device; its float32 rounding), for ``torch.compile(dynamic=True)``, where Dynamo lifts ``math.pi``
  into a graph input and computes the factor in the graph; None: the constant.
* ``sigmoid_mul_quantize``: ``x * torch.sigmoid(alpha * x)`` with each op rounded as eager rounds it,
  ``round(x * round(sigmoid(round(alpha * x))))``: QuickGELU (CLIP, OpenCLIP, Hugging Face's
  ``quick_gelu``; alpha = 1.702) and SiLU written out (``x * torch.sigmoid(x)``, alpha = 1: its
  ``alpha * x`` is exact), which differs from ``silu_quantize`` (F.silu rounds once); sigmoid on CUDA
  as torch's kernel, ``1 / (1 + exp(-x))``, on CPU torch's ops.
* ``gelu_new_and_mul_quantize`` / ``relu_and_mul_quantize``: ``round(gelu_new(gate) * up)`` (T5 v1.1 /
  Flan-T5's gated-gelu) and ``round(relu(gate) * up)`` (with ``squared=True``
  ``round(round(relu(gate) ** 2) * up)``), the activation as in the plain ops above.

As in eager PyTorch, the CUDA kernels use ``rsqrtf`` and FMA where torch's CUDA kernels do, the CPU
kernels an IEEE ``1 / sqrt``; only reduction order differs from eager. The row statistics are plain
float32 sums in one order on CPU and CUDA (so both give the same bits): a sum of each thread's blocks,
then a tree over the threads; LayerNorm's mean first, then the centred squares (two passes). Where
eager's own statistics are inexact the fused bytes follow the exact ones, not eager's: torch's CPU
LayerNorm (Welford moments) misses the mean of rows with a large common offset (mean / std of 100 or
more: bf16 ``1000 + randn`` rows, 96% of blocks identical) and returns NaN rows where the squared mean
overflows float32 (bf16 rows of |mean| > 1.8e19), where the fused op's two passes stay exact and
finite; at K of 2^20 the one-order sum of squares drifts (99.7-99.9% of RMSNorm blocks identical; 99.97%
and more up to K = 32768). The fused ops compute with subnormals whatever ``torch.set_flush_denormal``
says (eager flushes the norm's and the activation's subnormal results under it).
"""

from __future__ import annotations

import operator

import torch

from . import _C  # noqa: F401  (loading the library registers the schemas and kernels)
from .ops import check_defined, check_recipe, fake_quantize_outputs

_MODEL_DTYPES = (torch.float16, torch.bfloat16)


def _check_model_dtype(t: torch.Tensor, name: str) -> None:
    check_defined(t, name)
    if t.dtype not in _MODEL_DTYPES:
        raise NotImplementedError(
            f"fp4op: {name} of a fused norm/activation + quantize op must be float16 or bfloat16 (the model "
            f"dtype the norm/activation is computed in), got {t.dtype}; quantize other dtypes with fp4op.quantize"
        )


def _check_like(t: torch.Tensor, name: str, x: torch.Tensor, x_name: str) -> None:
    check_defined(t, name)
    if t.dtype != x.dtype:
        raise ValueError(f"fp4op: {name} must have the dtype of {x_name} ({x.dtype}), got {t.dtype}")
    if t.shape != x.shape:
        raise ValueError(f"fp4op: {name} must have the shape of {x_name} {list(x.shape)}, got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"fp4op: {name} is on {t.device} but {x_name} is on {x.device}")


def _check_affine(p: torch.Tensor | None, name: str, x: torch.Tensor) -> None:
    if p is None:
        return
    k = x.shape[-1] if x.dim() >= 1 else 0
    if p.dim() != 1 or p.shape[0] != k:
        raise ValueError(f"fp4op: {name} must have shape [K] = [{k}], got {list(p.shape)}")
    if p.dtype != x.dtype:
        raise ValueError(f"fp4op: {name} must have the dtype of x ({x.dtype}), got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"fp4op: {name} is on {p.device} but x is on {x.device}")


def _check_scalar_tensor(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    """A float argument given as a one-element tensor (eps, sqrt_2_over_pi), as the C++ check_scalar_tensor."""
    if t.numel() != 1:
        raise ValueError(f"fp4op: {name} must have one element, got shape {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"fp4op: {name} must be a floating-point tensor, got {t.dtype}")
    if t.device.type != "cpu" and t.device != x.device:
        raise ValueError(
            f"fp4op: {name} is on {t.device} but x is on {x.device} ({name} must be on the CPU or on x's device)"
        )


def _check_eps_tensor(eps: torch.Tensor, x: torch.Tensor) -> None:
    _check_scalar_tensor(eps, "eps", x)


def _check_approximate(approximate: str) -> None:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fp4op: approximate must be 'none' or 'tanh', got {approximate!r}")


def _fake_quantize_outputs(
    x, name, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
):
    """Checks of the quantize half (as the C++ prepare_fused) and the empty (x_q, sf)."""
    check_recipe(sf_vec_size, sf_use_ue8m0)
    _check_model_dtype(x, name)
    return fake_quantize_outputs(
        x, name, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )


@torch.library.register_fake("fp4op::rms_norm_quantize")
def _rms_norm_quantize_fake(
    x,
    weight,
    eps,
    weight_offset=0.0,
    weight_in_input_dtype=False,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    out = _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )
    _check_affine(weight, "weight", x)
    return out


@torch.library.register_fake("fp4op::add_rms_norm_quantize")
def _add_rms_norm_quantize_fake(
    x,
    residual,
    weight,
    eps,
    weight_offset=0.0,
    weight_in_input_dtype=False,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
    sum_in_float32=False,
):
    x_q, sf = _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )
    _check_like(residual, "residual", x, "x")
    _check_affine(weight, "weight", x)
    return x_q, sf, _empty_rows_like(x)


def _empty_rows_like(x: torch.Tensor) -> torch.Tensor:
    """An output shaped like x, contiguous: the next residual, the norm output."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# The *_eps_tensor ops take eps as a one-element tensor on the CPU or on x's device (Dynamo passes a
# module's float eps as a 0-d tensor under dynamic=True); its value is its float32 rounding.


@torch.library.register_fake("fp4op::rms_norm_quantize_eps_tensor")
def _rms_norm_quantize_eps_tensor_fake(x, weight, eps, *args, **kwargs):
    _check_eps_tensor(eps, x)
    return _rms_norm_quantize_fake(x, weight, 0.0, *args, **kwargs)


@torch.library.register_fake("fp4op::add_rms_norm_quantize_eps_tensor")
def _add_rms_norm_quantize_eps_tensor_fake(x, residual, weight, eps, *args, **kwargs):
    _check_eps_tensor(eps, x)
    return _add_rms_norm_quantize_fake(x, residual, weight, 0.0, *args, **kwargs)


@torch.library.register_fake("fp4op::rms_norm_quantize_with_normed")
def _rms_norm_quantize_with_normed_fake(x, weight, eps, *args, **kwargs):
    return (*_rms_norm_quantize_fake(x, weight, eps, *args, **kwargs), _empty_rows_like(x))


@torch.library.register_fake("fp4op::rms_norm_quantize_with_normed_eps_tensor")
def _rms_norm_quantize_with_normed_eps_tensor_fake(x, weight, eps, *args, **kwargs):
    _check_eps_tensor(eps, x)
    return _rms_norm_quantize_with_normed_fake(x, weight, 0.0, *args, **kwargs)


@torch.library.register_fake("fp4op::add_rms_norm_quantize_with_normed")
def _add_rms_norm_quantize_with_normed_fake(x, residual, weight, eps, *args, **kwargs):
    return (*_add_rms_norm_quantize_fake(x, residual, weight, eps, *args, **kwargs), _empty_rows_like(x))


@torch.library.register_fake("fp4op::add_rms_norm_quantize_with_normed_eps_tensor")
def _add_rms_norm_quantize_with_normed_eps_tensor_fake(x, residual, weight, eps, *args, **kwargs):
    _check_eps_tensor(eps, x)
    return _add_rms_norm_quantize_with_normed_fake(x, residual, weight, 0.0, *args, **kwargs)


@torch.library.register_fake("fp4op::rms_norm_add_quantize")
def _rms_norm_add_quantize_fake(x, residual, weight, eps, *args, **kwargs):
    x_q, sf = _rms_norm_quantize_fake(x, weight, eps, *args, **kwargs)
    _check_like(residual, "residual", x, "x")
    return x_q, sf, _empty_rows_like(x)


@torch.library.register_fake("fp4op::rms_norm_add_quantize_eps_tensor")
def _rms_norm_add_quantize_eps_tensor_fake(x, residual, weight, eps, *args, **kwargs):
    _check_eps_tensor(eps, x)
    return _rms_norm_add_quantize_fake(x, residual, weight, 0.0, *args, **kwargs)


@torch.library.register_fake("fp4op::layer_norm_quantize")
def _layer_norm_quantize_fake(
    x,
    weight,
    bias,
    eps,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    out = _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )
    _check_affine(weight, "weight", x)
    _check_affine(bias, "bias", x)
    return out


@torch.library.register_fake("fp4op::layer_norm_quantize_with_normed")
def _layer_norm_quantize_with_normed_fake(x, weight, bias, eps, *args, **kwargs):
    return (*_layer_norm_quantize_fake(x, weight, bias, eps, *args, **kwargs), _empty_rows_like(x))


def broadcasts_per_sample(t_shape, x_shape, equal=operator.eq) -> bool:
    """Whether a layer_norm_modulate_quantize multiplier/shift of shape `t_shape` fits x of `x_shape`, as the
    C++ sample_rows_of: [*x.shape[:j], 1, ..., 1, K] for some j once padded with leading ones. `equal`
    compares two sizes (the fusion rules pass one that adds no guard on symbolic sizes)."""
    n, t_dim = len(x_shape), len(t_shape)
    if not (1 <= t_dim <= n and equal(t_shape[-1], x_shape[-1])):
        return False
    sizes = [1] * (n - t_dim) + list(t_shape)
    j = max((d + 1 for d in range(n - 1) if not equal(sizes[d], 1)), default=0)
    return all(equal(a, b) for a, b in zip(sizes[:j], x_shape[:j]))


def _check_sample_operand(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    """A layer_norm_modulate_quantize multiplier/shift, as the C++ sample_rows_of: x's dtype and device and
    a per-sample shape (broadcasts_per_sample)."""
    check_defined(t, name)
    if t.dtype != x.dtype:
        raise ValueError(f"fp4op: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"fp4op: {name} is on {t.device} but x is on {x.device}")
    if not broadcasts_per_sample(t.shape, x.shape):
        raise ValueError(
            f"fp4op: {name} must broadcast to x {list(x.shape)} per sample: shape [*x.shape[:j], 1, ..., 1, K] "
            f"for some j (e.g. [B, 1, K] for x [B, T, K]), got {list(t.shape)}"
        )


@torch.library.register_fake("fp4op::layer_norm_modulate_quantize")
def _layer_norm_modulate_quantize_fake(x, weight, bias, eps, multiplier, shift, *args, **kwargs):
    out = _layer_norm_quantize_fake(x, weight, bias, eps, *args, **kwargs)
    _check_sample_operand(multiplier, "multiplier", x)
    _check_sample_operand(shift, "shift", x)
    return out


def _gated_fake(gate, up, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout):
    out = _fake_quantize_outputs(
        gate, "gate", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )
    _check_like(up, "up", gate, "gate")
    return out


@torch.library.register_fake("fp4op::silu_and_mul_quantize")
def _silu_and_mul_quantize_fake(
    gate,
    up,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    return _gated_fake(gate, up, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout)


@torch.library.register_fake("fp4op::gelu_and_mul_quantize")
def _gelu_and_mul_quantize_fake(
    gate,
    up,
    approximate="none",
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    out = _gated_fake(gate, up, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout)
    _check_approximate(approximate)
    return out


@torch.library.register_fake("fp4op::gelu_new_and_mul_quantize")
def _gelu_new_and_mul_quantize_fake(
    gate,
    up,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
    sqrt_2_over_pi=None,
):
    out = _gated_fake(gate, up, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout)
    if sqrt_2_over_pi is not None:
        _check_scalar_tensor(sqrt_2_over_pi, "sqrt_2_over_pi", gate)
    return out


@torch.library.register_fake("fp4op::relu_and_mul_quantize")
def _relu_and_mul_quantize_fake(
    gate,
    up,
    squared=False,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    return _gated_fake(gate, up, global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout)


@torch.library.register_fake("fp4op::silu_quantize")
def _silu_quantize_fake(
    x,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    return _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )


@torch.library.register_fake("fp4op::gelu_new_quantize")
def _gelu_new_quantize_fake(
    x,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
    sqrt_2_over_pi=None,
):
    out = _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )
    if sqrt_2_over_pi is not None:
        _check_scalar_tensor(sqrt_2_over_pi, "sqrt_2_over_pi", x)
    return out


@torch.library.register_fake("fp4op::sigmoid_mul_quantize")
def _sigmoid_mul_quantize_fake(
    x,
    alpha=1.0,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    return _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )


@torch.library.register_fake("fp4op::relu_quantize")
def _relu_quantize_fake(
    x,
    squared=False,
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    return _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )


@torch.library.register_fake("fp4op::gelu_quantize")
def _gelu_quantize_fake(
    x,
    approximate="none",
    global_scale=None,
    sf_vec_size=16,
    sf_use_ue8m0=False,
    is_sf_swizzled_layout=True,
    is_sf_8x4_layout=False,
    is_global_scale_inversed=False,
):
    out = _fake_quantize_outputs(
        x, "x", global_scale, sf_vec_size, sf_use_ue8m0, is_sf_swizzled_layout, is_sf_8x4_layout
    )
    _check_approximate(approximate)
    return out
