"""Hostile inputs for the fused norm/activation + quantize ops, each case in a child process (the harness
of tests/test_hostile.py), so that a crash is a test failure: every case must raise the named exception
with a message naming the argument, or give the right answer.

A rejection must also come from the fake kernel (what torch.compile traces with), with the same class
and argument. A right answer is bit for bit the op's answer on contiguous copies of the inputs, within
the fused acceptance rule of the eager composition "norm/activation in the input dtype, then
fp4op.quantize" (fusion_helpers.assert_fp4_close), and shaped as the fake kernel says."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fp4op
from conftest import requires_cuda
from fp4op import layouts
from fusion_helpers import assert_fp4_close
from test_fused_ops import RECIPES, eager_act, eager_layer_norm, eager_rms_norm, post_norm_sums_close, quantize_kwargs
from test_hostile import DEVICES, NIE, VE, _freed, _x, child_main, verdict_cache

OPS = torch.ops.fp4op
EPS = 1e-6
# *_with_normed: the norm op of that name that also returns its output; rms_norm_add: residual + RMSNorm(x)
# layer_norm_modulate: LayerNorm(x) * multiplier + shift per sample (adaLN)
NORMS = ("rms_norm", "add_rms_norm", "layer_norm", "rms_norm_with_normed", "layer_norm_with_normed",
         "add_rms_norm_with_normed", "rms_norm_add", "layer_norm_modulate")
WITH_NORMED = "_with_normed"
GATED = ("silu_and_mul", "gelu_and_mul", "gelu_new_and_mul", "relu2_and_mul")
FUSED = (*NORMS, *GATED, "silu", "gelu", "gelu_new", "relu2", "quick_gelu")
# A small input has few blocks, so one block off by a rounding of the norm's reduction order moves the
# identical-block fraction a lot: the per-element rule of assert_fp4_close is the check that matters here.
MIN_IDENTICAL_SMALL = 0.9


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def primary(op):
    return "gate" if op in GATED else "x"


def companions(op, x):
    """The op's other tensor arguments, made to fit x: weight/bias [K], residual/up shaped like x."""
    op = op.removesuffix(WITH_NORMED)
    k = x.shape[-1] if x.dim() else 1

    def affine(seed, mean):
        return (mean + 0.5 * torch.randn(k, generator=_gen(seed))).to(x.dtype).to(x.device)

    def like(seed):
        return torch.randn(x.shape, generator=_gen(seed)).to(x.dtype).to(x.device)

    if op == "rms_norm":
        return {"weight": affine(1, 1.0)}
    if op in ("add_rms_norm", "rms_norm_add"):
        return {"residual": like(2), "weight": affine(1, 1.0)}
    if op == "layer_norm":
        return {"weight": affine(1, 1.0), "bias": affine(3, 0.0)}
    if op == "layer_norm_modulate":
        # a multiplier a sample (x's first dim; [K] for a row) and one shift for every row
        samples = [x.shape[0], *[1] * (x.dim() - 2)] if x.dim() >= 2 else []
        multiplier = (1 + 0.5 * torch.randn(*samples, k, generator=_gen(5))).to(x.dtype).to(x.device)
        return {"weight": affine(1, 1.0), "bias": affine(3, 0.0), "multiplier": multiplier, "shift": affine(6, 0.0)}
    if op in GATED:
        return {"up": like(4)}
    return {}


def fused(op, x, c, eps=EPS, **q):
    """The fused op on x and its companions `c`, with the quantize arguments `q` (the norms: eps)."""
    if op == "rms_norm":
        return OPS.rms_norm_quantize(x, c["weight"], eps, **q)
    if op == "rms_norm_with_normed":
        return OPS.rms_norm_quantize_with_normed(x, c["weight"], eps, **q)
    if op == "layer_norm_with_normed":
        return OPS.layer_norm_quantize_with_normed(x, c["weight"], c["bias"], eps, **q)
    if op == "add_rms_norm_with_normed":
        return OPS.add_rms_norm_quantize_with_normed(x, c["residual"], c["weight"], eps, **q)
    if op == "add_rms_norm":
        return OPS.add_rms_norm_quantize(x, c["residual"], c["weight"], eps, **q)
    if op == "rms_norm_add":
        return OPS.rms_norm_add_quantize(x, c["residual"], c["weight"], eps, **q)
    if op == "layer_norm":
        return OPS.layer_norm_quantize(x, c["weight"], c["bias"], eps, **q)
    if op == "layer_norm_modulate":
        return OPS.layer_norm_modulate_quantize(x, c["weight"], c["bias"], eps, c["multiplier"], c["shift"], **q)
    if op == "silu_and_mul":
        return OPS.silu_and_mul_quantize(x, c["up"], **q)
    if op == "gelu_and_mul":
        return OPS.gelu_and_mul_quantize(x, c["up"], "none", **q)
    if op == "gelu_new_and_mul":
        return OPS.gelu_new_and_mul_quantize(x, c["up"], **q)
    if op == "relu2_and_mul":
        return OPS.relu_and_mul_quantize(x, c["up"], True, **q)
    if op == "silu":
        return OPS.silu_quantize(x, **q)
    if op == "gelu_new":
        return OPS.gelu_new_quantize(x, **q)
    if op == "relu2":
        return OPS.relu_quantize(x, True, **q)
    if op == "quick_gelu":
        return OPS.sigmoid_mul_quantize(x, 1.702, **q)
    return OPS.gelu_quantize(x, "tanh", **q)


def eager(op, x, c):
    """(the norm/activation output in the input dtype, x + residual or None), as eager PyTorch computes them."""
    op = op.removesuffix(WITH_NORMED)
    if op == "rms_norm":
        return eager_rms_norm(x, c["weight"], EPS), None
    if op == "add_rms_norm":
        total = x + c["residual"]
        return eager_rms_norm(total, c["weight"], EPS), total
    if op == "rms_norm_add":
        return c["residual"] + eager_rms_norm(x, c["weight"], EPS), None
    if op == "layer_norm":
        return eager_layer_norm(x, c["weight"], c["bias"], EPS), None
    if op == "layer_norm_modulate":
        return eager_layer_norm(x, c["weight"], c["bias"], EPS) * c["multiplier"] + c["shift"], None
    if op in GATED:
        return eager_act(op[: -len("_and_mul")], x) * c["up"], None
    return eager_act(op if op in ("silu", "gelu_new", "relu2", "quick_gelu") else "gelu_tanh", x), None


def assert_equal(a, b):
    """Bit for bit, except that NaN payloads may differ."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_answer(op, x, c=None, recipe="nvfp4", layout=layouts.SWIZZLED_128x4, gs=None, per_row=False):
    """The fused op on x is right (see the module docstring); returns its outputs."""
    c = companions(op, x) if c is None else c
    y, total = eager(op, x, c)
    if gs is None:
        gs = fp4op.nvfp4_global_scale(y, per_row=per_row).to(x.device)
    kw = quantize_kwargs(recipe, layout, gs)
    got = fused(op, x, c, **kw)
    dense = fused(op, x.contiguous(), {k: v if v is None else v.contiguous() for k, v in c.items()}, **kw)
    for a, b in zip(got, dense, strict=True):
        assert_equal(a, b)  # the answer on contiguous inputs
    assert_fp4_close(got[:2], OPS.quantize(y, **kw), RECIPES[recipe][0], layout, MIN_IDENTICAL_SMALL)
    if total is not None:
        assert_equal(got[2], total)
    if op.endswith(WITH_NORMED) or op == "rms_norm_add":
        # the norm output (rms_norm_add: residual + it): what the codes quantize, and eager's up to
        # reduction order
        for a, b in zip(OPS.quantize(got[-1], **kw), got[:2], strict=True):
            assert_equal(a, b)
        if op == "rms_norm_add":
            assert post_norm_sums_close(got[-1], y, c["residual"])
        else:
            torch.testing.assert_close(got[-1], y, rtol=2.0**-6, atol=1e-6, equal_nan=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = fused(op, x, c, **kw)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in got]
    return got


def check_same_as_quantize_shapes(op, shapes, d):
    """Empty problems: outputs shaped (and sf padding zeroed) exactly as fp4op.quantize's, every layout."""
    for shape in shapes:
        x = torch.empty(shape, dtype=torch.bfloat16, device=d)
        for recipe in RECIPES:
            for layout in layouts.LAYOUTS:
                kw = quantize_kwargs(recipe, layout, torch.ones(1, device=d))
                got = fused(op, x, companions(op, x), **kw)
                want = OPS.quantize(x, **kw)
                assert got[0].shape == want[0].shape and got[0].dtype == torch.uint8, (shape, layout, got[0].shape)
                assert torch.equal(got[1], want[1]), (shape, layout, got[1].shape, want[1].shape)
                for extra in got[2:]:  # the next residual, the norm output
                    assert extra.shape == x.shape and extra.dtype == x.dtype


# ---- the cases of every op: name -> (function of (op, device), expected of op), expected as in
# tests/test_hostile.py: "ok" or (exception class name, text the message must contain) ----------------------


def _call(op, x, d, gs=None, **q):
    """The fused op on x with fitting companions, NVFP4 with a unit global scale unless given."""
    gs = torch.ones(1, device=d) if gs is None else gs
    return fused(op, x, companions(op, x), global_scale=gs, **q)


def _dtype_case(dtype):
    return lambda op, d: _call(op, _x(d).to(dtype), d)


def case_freed_x(op, d):
    _call(op, _freed(_x(d)), d)


def case_zero_dim(op, d):
    _call(op, torch.tensor(1.0, dtype=torch.bfloat16, device=d), d)


def case_one_dim_is_one_row(op, d):
    got = check_answer(op, _x(d)[2])
    assert got[0].shape == (32,)


def case_k_not_multiple(op, d):
    _call(op, _x(d, k=40), d)


def case_k_odd(op, d):
    _call(op, _x(d, k=17), d)


def case_k_not_multiple_mxfp4(op, d):
    _call(op, _x(d, k=48), d, sf_vec_size=32, sf_use_ue8m0=True)


def case_sf_vec_size_zero(op, d):
    _call(op, _x(d), d, sf_vec_size=0)


def case_ue8m0_with_16(op, d):
    _call(op, _x(d), d, sf_use_ue8m0=True)


def case_k_zero(op, d):
    check_same_as_quantize_shapes(op, ((7, 0), (2, 3, 0)), d)


def case_m_zero(op, d):
    check_same_as_quantize_shapes(op, ((0, 64), (4, 0, 64)), d)


def case_sliced_rows(op, d):
    check_answer(op, _x(d, m=40)[1::3])


def case_strided_columns(op, d):
    check_answer(op, _x(d, k=128)[:, ::2])


def case_column_window(op, d):
    check_answer(op, _x(d, m=9, k=256)[:, 32:96])


def case_expanded(op, d):
    check_answer(op, _x(d, m=1).expand(130, 64))


def case_odd_storage_offset(op, d):
    flat = _x(d, m=9, k=64).reshape(-1)
    check_answer(op, flat[1 : 1 + 8 * 48].view(8, 48))


def case_column_major(op, d):
    x = _x(d, m=64, k=32).t()  # [32, 64] with stride (1, 32): normalized along its strided rows
    assert x.stride() == (1, 32)
    check_answer(op, x)


def case_permuted_rank3(op, d):
    check_answer(op, _x(d, m=20, k=64).view(4, 5, 64).transpose(0, 1))


def case_all_layouts_both_recipes(op, d):
    for recipe in RECIPES:
        for layout in layouts.LAYOUTS:
            check_answer(op, _x(d, m=9, k=96), recipe=recipe, layout=layout)


def case_zero_rows(op, d):
    # padding tokens: all-zero rows next to ordinary ones
    x = _x(d, m=9)
    x[::2] = 0
    check_answer(op, x)


def case_non_finite(op, d):
    # inf and NaN inputs give NaN/inf rows in eager PyTorch; the fused op must quantize the same values
    x = _x(d, m=9)
    x[1, 3], x[4, 60], x[7, 0] = float("inf"), float("nan"), float("-inf")
    check_answer(op, x, gs=torch.tensor([2.0], device=d))


def case_float16_overflow(op, d):
    # float16 values near its maximum: x + residual and silu(gate) * up overflow to inf in eager float16
    x = _x(d, dtype=torch.float16) * 12000
    c = companions(op, x)
    c.update({k: x for k in ("residual", "up") if k in c})
    check_answer(op, x, c, gs=torch.tensor([2.0], device=d))


def case_global_scale_int(op, d):
    _call(op, _x(d), d, torch.ones(1, dtype=torch.int32, device=d))


def case_global_scale_size(op, d):
    _call(op, _x(d), d, torch.ones(5, device=d))


def case_global_scale_2d_wrong(op, d):
    _call(op, _x(d), d, torch.ones(7, 2, device=d))


def case_global_scale_missing(op, d):
    x = _x(d)
    fused(op, x, companions(op, x), global_scale=None)


def case_global_scale_zero_dim_float64_bf16(op, d):
    # a 0-d scale is one element; other floating dtypes are converted, not reinterpreted
    x = _x(d)
    want = _call(op, x, d, torch.tensor([3.0], device=d))
    for gs in (torch.tensor(3.0, device=d), torch.tensor([3.0], dtype=torch.float64, device=d),
               torch.tensor([3.0], dtype=torch.bfloat16, device=d)):
        for a, b in zip(_call(op, x, d, gs), want, strict=True):
            assert_equal(a, b)


def case_global_scale_per_row(op, d):
    x = _x(d, m=9)
    got = check_answer(op, x, per_row=True)
    gs = fp4op.nvfp4_global_scale(eager(op, x, companions(op, x))[0], per_row=True).to(d)
    for a, b in zip(_call(op, x, d, gs.reshape(-1, 1)), got, strict=True):  # [M, 1] is [M]
        assert_equal(a, b)


def case_mxfp4_ignores_global_scale(op, d):
    x = _x(d)
    q = dict(sf_vec_size=32, sf_use_ue8m0=True)
    for a, b in zip(_call(op, x, d, torch.tensor([-7.0], device=d), **q), fused(op, x, companions(op, x), **q),
                    strict=True):
        assert_equal(a, b)


GENERIC = {
    "float32": (_dtype_case(torch.float32), lambda op: (NIE, f"{primary(op)} of a fused")),
    "float64": (_dtype_case(torch.float64), lambda op: (NIE, f"{primary(op)} of a fused")),
    "int32": (_dtype_case(torch.int32), lambda op: (NIE, f"{primary(op)} of a fused")),
    "bool": (lambda op, d: _call(op, _x(d) > 0, d), lambda op: (NIE, f"{primary(op)} of a fused")),
    "float8": (_dtype_case(torch.float8_e4m3fn), lambda op: (NIE, f"{primary(op)} of a fused")),
    "zero_dim": (case_zero_dim, lambda op: (VE, f"{primary(op)} must have at least 1 dimension")),
    "one_dim_is_one_row": (case_one_dim_is_one_row, lambda op: "ok"),
    "k_not_multiple": (case_k_not_multiple, lambda op: (VE, f"last dimension of {primary(op)} (K = 40)")),
    "k_odd": (case_k_odd, lambda op: (VE, f"last dimension of {primary(op)} (K = 17)")),
    "k_not_multiple_mxfp4": (case_k_not_multiple_mxfp4, lambda op: (VE, f"last dimension of {primary(op)} (K = 48)")),
    "sf_vec_size_zero": (case_sf_vec_size_zero, lambda op: (NIE, "sf_vec_size")),
    "ue8m0_with_16": (case_ue8m0_with_16, lambda op: (VE, "sf_use_ue8m0")),
    "k_zero": (case_k_zero, lambda op: "ok"),
    "m_zero": (case_m_zero, lambda op: "ok"),
    "sliced_rows": (case_sliced_rows, lambda op: "ok"),
    "strided_columns": (case_strided_columns, lambda op: "ok"),
    "column_window": (case_column_window, lambda op: "ok"),
    "expanded": (case_expanded, lambda op: "ok"),
    "odd_storage_offset": (case_odd_storage_offset, lambda op: "ok"),
    "freed_x": (case_freed_x, lambda op: (VE, f"{primary(op)} has 448 elements but its storage holds 0")),
    "column_major": (case_column_major, lambda op: "ok"),
    "permuted_rank3": (case_permuted_rank3, lambda op: "ok"),
    "all_layouts_both_recipes": (case_all_layouts_both_recipes, lambda op: "ok"),
    "zero_rows": (case_zero_rows, lambda op: "ok"),
    "non_finite": (case_non_finite, lambda op: "ok"),
    "float16_overflow": (case_float16_overflow, lambda op: "ok"),
    "global_scale_int": (case_global_scale_int, lambda op: (VE, "global_scale must have a floating dtype")),
    "global_scale_size": (case_global_scale_size, lambda op: (VE, "global_scale must have 1 element")),
    "global_scale_2d_wrong": (case_global_scale_2d_wrong, lambda op: (VE, "global_scale must have 1 element")),
    "global_scale_missing": (case_global_scale_missing, lambda op: (VE, "global_scale is required")),
    "global_scale_zero_dim_float64_bf16": (case_global_scale_zero_dim_float64_bf16, lambda op: "ok"),
    "global_scale_per_row": (case_global_scale_per_row, lambda op: "ok"),
    "mxfp4_ignores_global_scale": (case_mxfp4_ignores_global_scale, lambda op: "ok"),
}


# ---- cases of some ops: their other arguments ----------------------------------------------------------------


def _with(op, d, x=None, **changes):
    """The op on x (default _x(d)) with some companions replaced by functions of the default ones."""
    x = _x(d) if x is None else x
    c = companions(op, x)
    c.update({k: f(c[k]) for k, f in changes.items()})
    return fused(op, x, c, global_scale=torch.ones(1, device=d))


def _answer_with(op, d, x=None, **changes):
    x = _x(d) if x is None else x
    c = companions(op, x)
    c.update({k: f(c[k]) for k, f in changes.items()})
    check_answer(op, x, c)


def _affine_cases(arg):
    return {
        f"{arg}_freed": (lambda op, d: _with(op, d, **{arg: lambda w: _freed(w.clone())}),
                         (VE, f"{arg} has 64 elements but its storage holds 0")),
        f"{arg}_long": (lambda op, d: _with(op, d, **{arg: lambda w: torch.cat([w, w[:16]])}),
                        (VE, f"{arg} must have shape [K] = [64]")),
        f"{arg}_2d": (lambda op, d: _with(op, d, **{arg: lambda w: w[None]}), (VE, f"{arg} must have shape [K]")),
        f"{arg}_zero_dim": (lambda op, d: _with(op, d, **{arg: lambda w: w[0]}), (VE, f"{arg} must have shape [K]")),
        f"{arg}_float32": (lambda op, d: _with(op, d, **{arg: lambda w: w.float()}), (VE, f"{arg} must have the dtype")),
        f"{arg}_int": (lambda op, d: _with(op, d, **{arg: lambda w: w.to(torch.int32)}), (VE, f"{arg} must have the dtype")),
        f"{arg}_strided": (lambda op, d: _answer_with(op, d, **{arg: lambda w: torch.stack([w, -w], -1)[:, 0]}), "ok"),
        f"{arg}_none": (lambda op, d: _answer_with(op, d, **{arg: lambda w: None}), "ok"),
    }


def _like_x_cases(arg):
    """residual / up: the shape, dtype and device of x (gate)."""
    x_name = "x" if arg == "residual" else "gate"
    return {
        f"{arg}_freed": (lambda op, d: _with(op, d, **{arg: lambda t: _freed(t.clone())}),
                         (VE, f"{arg} has 448 elements but its storage holds 0")),
        f"{arg}_none": (lambda op, d: _with(op, d, **{arg: lambda t: None}), (VE, f"{arg} must be a tensor, got None")),
        f"{arg}_more_rows": (lambda op, d: _with(op, d, **{arg: lambda t: torch.cat([t, t[:1]])}),
                             (VE, f"{arg} must have the shape of {x_name}")),
        f"{arg}_broadcastable": (lambda op, d: _with(op, d, **{arg: lambda t: t[0]}),
                                 (VE, f"{arg} must have the shape of {x_name}")),
        f"{arg}_zero_dim": (lambda op, d: _with(op, d, **{arg: lambda t: t[0, 0]}),
                            (VE, f"{arg} must have the shape of {x_name}")),
        f"{arg}_float16": (lambda op, d: _with(op, d, **{arg: lambda t: t.half()}),
                           (VE, f"{arg} must have the dtype of {x_name}")),
        f"{arg}_float32": (lambda op, d: _with(op, d, **{arg: lambda t: t.float()}),
                           (VE, f"{arg} must have the dtype of {x_name}")),
        f"{arg}_strided": (lambda op, d: _answer_with(op, d, **{arg: lambda t: torch.stack([t, -t], -1)[..., 1]}),
                           "ok"),
        f"{arg}_is_{x_name}": (lambda op, d: (lambda x: check_answer(op, x, {**companions(op, x), arg: x}))(_x(d)),
                               "ok"),
    }


def _modulation_cases(arg):
    """layer_norm_modulate's multiplier / shift: x's dtype and device, one row a sample, any row layout."""
    rank3 = lambda d: _x(d, m=8).view(2, 4, 64)  # noqa: E731
    return {
        f"{arg}_freed": (lambda op, d: _with(op, d, **{arg: lambda t: _freed(t.clone())}),
                         (VE, f"{arg} has {448 if arg == 'multiplier' else 64} elements but its storage holds 0")),
        f"{arg}_none": (lambda op, d: _with(op, d, **{arg: lambda t: None}), (VE, f"{arg} must be a tensor, got None")),
        f"{arg}_float32": (lambda op, d: _with(op, d, **{arg: lambda t: t.float()}),
                           (VE, f"{arg} must have the dtype of x")),
        f"{arg}_float16": (lambda op, d: _with(op, d, **{arg: lambda t: t.half()}), (VE, f"{arg} must have the dtype of x")),
        f"{arg}_long": (lambda op, d: _with(op, d, **{arg: lambda t: torch.cat([t, t[..., :16]], -1)}),
                        (VE, f"{arg} must broadcast to x")),
        f"{arg}_zero_dim": (lambda op, d: _with(op, d, **{arg: lambda t: t.reshape(-1)[0]}), (VE, f"{arg} must broadcast to x")),
        f"{arg}_more_dims": (lambda op, d: _with(op, d, **{arg: lambda t: t[None, None]}), (VE, f"{arg} must broadcast to x")),
        # a row a position [1, T, K] broadcast over the samples: not a sample's row
        f"{arg}_per_position": (lambda op, d: _with(op, d, rank3(d), **{arg: lambda t: rank3(d)[:1]}),
                                (VE, f"{arg} must broadcast to x")),
        f"{arg}_per_row": (lambda op, d: _answer_with(op, d, rank3(d), **{arg: lambda t: rank3(d) * 0.5}), "ok"),
        f"{arg}_per_sample": (lambda op, d: _answer_with(op, d, rank3(d), **{arg: lambda t: rank3(d)[:, 1:2]}), "ok"),
        f"{arg}_one_vector_2d": (lambda op, d: _answer_with(op, d, rank3(d), **{arg: lambda t: rank3(d)[0, :1]}), "ok"),
        # a chunk of a [B, 6K] conditioning projection: rows strided by 6K
        f"{arg}_chunk": (lambda op, d: _answer_with(op, d, rank3(d), **{arg: lambda t: _x(d, m=2, k=384).chunk(6, 1)[3][:, None]}), "ok"),
        f"{arg}_expanded": (lambda op, d: _answer_with(op, d, rank3(d), **{arg: lambda t: rank3(d)[:1, :1].expand(2, 1, 64)}), "ok"),
        f"{arg}_odd_storage_offset": (lambda op, d: _answer_with(op, d, **{arg: lambda t: _x(d, m=8).reshape(-1)[1:449].view(7, 64)}), "ok"),
        f"{arg}_is_x": (lambda op, d: (lambda x: check_answer(op, x, {**companions(op, x), arg: x}))(_x(d)), "ok"),
    }


def case_gate_up_halves(op, d):
    # vLLM: one [M, 2H] gate_up projection, split in two strided views (read in place by the kernels)
    t = _x(d, m=9, k=256)
    check_answer(op, t[:, :128], {"up": t[:, 128:]})
    t3 = _x(d, m=12, k=192).view(2, 6, 192)
    check_answer(op, t3[..., 96:], {"up": t3[..., :96]})


def case_gate_up_interleaved(op, d):
    t = _x(d, m=9, k=128).view(9, 64, 2)
    check_answer(op, t[..., 0], {"up": t[..., 1]})


def case_gate_one_dim_up_two_dim(op, d):
    x = _x(d)
    fused(op, x[0], {"up": x[:1]}, global_scale=torch.ones(1, device=d))


def case_approximate(op, d):
    x = _x(d)
    args = (x, companions(op, x)["up"]) if op in GATED else (x,)
    getattr(OPS, f"{op}_quantize")(*args, "erf", torch.ones(1, device=d))


def _eps_tensor_op(op, x, c, eps, gs):
    if op == "rms_norm":
        return OPS.rms_norm_quantize_eps_tensor(x, c["weight"], eps, global_scale=gs)
    if op == "rms_norm_add":
        return OPS.rms_norm_add_quantize_eps_tensor(x, c["residual"], c["weight"], eps, global_scale=gs)
    return OPS.add_rms_norm_quantize_eps_tensor(x, c["residual"], c["weight"], eps, global_scale=gs)


def _eps_tensor_call(op, d, eps, x_device=None):
    """The *_eps_tensor op with eps = eps(d) on an input on x_device (default d)."""
    x = _x(x_device or d)
    return _eps_tensor_op(op, x, companions(op, x), eps(d), torch.ones(1, device=x.device))


def _eps_tensor_answer(op, d, eps, x_device=None):
    """Equal, bit for bit, to the float-eps op with eps's float32 value."""
    x = _x(x_device or d)
    c, gs, e = companions(op, x), torch.ones(1, device=x.device), eps(d)
    value = float(e.to(torch.float32).cpu().reshape(()))
    for a, b in zip(_eps_tensor_op(op, x, c, e, gs), fused(op, x, c, global_scale=gs, eps=value), strict=True):
        assert_equal(a, b)


EPS_TENSOR_CASES = {
    "eps_tensor_two": (lambda op, d: _eps_tensor_call(op, d, lambda d: torch.full((2,), EPS, device=d)),
                       (VE, "eps must have one element")),
    "eps_tensor_empty": (lambda op, d: _eps_tensor_call(op, d, lambda d: torch.empty(0, device=d)),
                         (VE, "eps must have one element")),
    "eps_tensor_int": (lambda op, d: _eps_tensor_call(op, d, lambda d: torch.tensor(1, device=d)),
                       (VE, "eps must be a floating-point")),
    "eps_tensor_meta": (lambda op, d: _eps_tensor_call(op, d, lambda d: torch.tensor(EPS, device="meta")),
                        (VE, "eps is on meta")),
    "eps_tensor_float64": (lambda op, d: _eps_tensor_answer(op, d, lambda d: torch.tensor(0.1, dtype=torch.float64)), "ok"),
    "eps_tensor_bf16_1x1": (lambda op, d: _eps_tensor_answer(op, d, lambda d: torch.full((1, 1), EPS, dtype=torch.bfloat16, device=d)), "ok"),
    "eps_tensor_nan": (lambda op, d: _eps_tensor_answer(op, d, lambda d: torch.tensor(float("nan"), device=d)), "ok"),
    "eps_tensor_inf": (lambda op, d: _eps_tensor_answer(op, d, lambda d: torch.tensor(float("inf"), device=d)), "ok"),
    "eps_tensor_strided": (lambda op, d: _eps_tensor_answer(op, d, lambda d: torch.tensor([1.0, EPS], device=d)[1]), "ok"),
}

def _coef_call(op, d, coef):
    """gelu_new's op (plain or gated) on a good input with sqrt_2_over_pi = coef(d)."""
    x = _x(d)
    return fused(op, x, companions(op, x), global_scale=torch.ones(1, device=d), sqrt_2_over_pi=coef(d))


COEF_TENSOR_CASES = {
    "coef_two": (lambda op, d: _coef_call(op, d, lambda d: torch.full((2,), 0.8, device=d)),
                 (VE, "sqrt_2_over_pi must have one element")),
    "coef_int": (lambda op, d: _coef_call(op, d, lambda d: torch.tensor(1, device=d)),
                 (VE, "sqrt_2_over_pi must be a floating-point")),
    "coef_meta": (lambda op, d: _coef_call(op, d, lambda d: torch.tensor(0.8, device="meta")),
                  (VE, "sqrt_2_over_pi is on meta")),
    "coef_nan": (lambda op, d: _coef_call(op, d, lambda d: torch.tensor(float("nan"), device=d)), "ok"),
}

SPECIFIC = {
    "rms_norm": {**_affine_cases("weight"), **EPS_TENSOR_CASES},
    "rms_norm_with_normed": _affine_cases("weight"),
    "layer_norm_with_normed": {**_affine_cases("weight"), **_affine_cases("bias")},
    "add_rms_norm_with_normed": {**_affine_cases("weight"), **_like_x_cases("residual")},
    "add_rms_norm": {**_affine_cases("weight"), **_like_x_cases("residual"), **EPS_TENSOR_CASES},
    "rms_norm_add": {**_affine_cases("weight"), **_like_x_cases("residual"), **EPS_TENSOR_CASES},
    "layer_norm": {**_affine_cases("weight"), **_affine_cases("bias")},
    "layer_norm_modulate": {**_affine_cases("weight"), **_affine_cases("bias"), **_modulation_cases("multiplier"),
                            **_modulation_cases("shift")},

    "gelu": {"approximate": (case_approximate, (VE, "approximate must be 'none' or 'tanh'"))},
    "gelu_new": dict(COEF_TENSOR_CASES),
    "relu2": {},
    "quick_gelu": {},
}
for _op in GATED:
    SPECIFIC[_op] = {
        **_like_x_cases("up"),
        "gate_up_halves": (case_gate_up_halves, "ok"),
        "gate_up_interleaved": (case_gate_up_interleaved, "ok"),
        "gate_one_dim_up_two_dim": (case_gate_one_dim_up_two_dim, (VE, "up must have the shape of gate")),
    }
SPECIFIC["gelu_and_mul"]["approximate"] = SPECIFIC["gelu"]["approximate"]
SPECIFIC["gelu_new_and_mul"].update(COEF_TENSOR_CASES)


# ---- GPU only: tensors on different devices. A CUDA tensor anywhere in the arguments sends the call to
# the CUDA kernel, also with x on the CPU ------------------------------------------------------------------------


def case_x_cuda_scale_cpu(op, d):
    _call(op, _x("cuda"), d, torch.ones(1))


def case_x_cpu_scale_cuda(op, d):
    _call(op, _x("cpu"), d, torch.ones(1, device="cuda"))


def case_x_cpu_scale_cuda_mxfp4(op, d):
    _call(op, _x("cpu"), d, torch.ones(1, device="cuda"), sf_vec_size=32, sf_use_ue8m0=True)


def case_x_cuda_scale_cpu_mxfp4(op, d):
    # MXFP4 ignores the scale; a CPU scale does not move the call off the CUDA kernel
    x, q = _x("cuda"), dict(sf_vec_size=32, sf_use_ue8m0=True)
    for a, b in zip(_call(op, x, d, torch.ones(1), **q), fused(op, x, companions(op, x), **q), strict=True):
        assert_equal(a, b)


def _other_device_cases(arg):
    return {
        f"{arg}_on_cpu": (lambda op, d: _with(op, "cuda", **{arg: lambda t: t.cpu()}), (VE, f"{arg} is on cpu")),
        f"{arg}_on_cuda": (lambda op, d: _with(op, "cpu", **{arg: lambda t: t.cuda()}), (VE, f"{arg} is on cuda")),
    }


def cuda_only_cases(op):
    cases = {
        "x_cuda_scale_cpu": (case_x_cuda_scale_cpu, (VE, "global_scale is on cpu")),
        "x_cpu_scale_cuda": (case_x_cpu_scale_cuda, (VE, "global_scale is on cuda")),
        "x_cpu_scale_cuda_mxfp4": (case_x_cpu_scale_cuda_mxfp4, (VE, "global_scale is on cuda")),
        "x_cuda_scale_cpu_mxfp4": (case_x_cuda_scale_cpu_mxfp4, "ok"),
    }
    for arg in companions(op, _x("cpu")):
        cases.update(_other_device_cases(arg))
    if op in ("rms_norm", "add_rms_norm", "rms_norm_add"):
        # eps on the CPU (what Dynamo passes) or on x's device; nowhere else
        cases["eps_tensor_cuda_x_cpu"] = (
            lambda op, d: _eps_tensor_call(op, d, lambda d: torch.tensor(EPS, device="cuda"), x_device="cpu"),
            (VE, "eps is on cuda"))
        cases["eps_tensor_cpu_x_cuda"] = (
            lambda op, d: _eps_tensor_answer(op, d, lambda d: torch.tensor(EPS), x_device="cuda"), "ok")
    return cases


def rejected_by_fake_too(fn, expected):
    """A rejecting case that also runs fn under FakeTensorMode: the fake kernel must raise the same class
    naming the same argument."""

    def case(d):
        try:
            fn(d)
        except Exception as real:  # noqa: BLE001 (judged by the harness)
            try:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    fn(d)
            except Exception as fake:  # noqa: BLE001
                if type(fake) is not type(real) or expected[1] not in str(fake):
                    raise AssertionError(f"the fake kernel raises {type(fake).__name__}: {fake}") from None
                raise real from None
            raise AssertionError(f"the fake kernel accepts what the kernel rejects: {real}") from None

    return case


def _table(per_op):
    """{"op-case": (fn(device), expected)} over the ops; per_op(op) gives {case: (fn(op, d), expected)}."""
    table = {}
    for op in FUSED:
        for name, (fn, expected) in per_op(op).items():
            case = functools.partial(fn, op)
            # a freed storage is a fact about data, which fake tensors do not have: the kernels alone check it
            fake_too = expected != "ok" and "freed" not in name
            table[f"{op}-{name}"] = (rejected_by_fake_too(case, expected) if fake_too else case, expected)
    return table


CASES = _table(lambda op: {**{n: (fn, exp(op)) for n, (fn, exp) in GENERIC.items()}, **SPECIFIC.get(op, {})})
CUDA_ONLY = _table(cuda_only_cases)

verdict, _verdicts = verdict_cache(__file__, lambda device: list(CASES) + (list(CUDA_ONLY) if device == "cuda" else []))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_fused_input(name, device):
    v = verdict(name, device)
    assert v["ok"], v["why"]


@requires_cuda
@pytest.mark.parametrize("name", list(CUDA_ONLY))
def test_hostile_fused_cross_device(name):
    v = verdict(name, "cuda")
    assert v["ok"], v["why"]


if __name__ == "__main__":
    child_main({**CASES, **CUDA_ONLY})
