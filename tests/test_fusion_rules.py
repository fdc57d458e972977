"""Every source form of issue 4 is rewritten into its fused op (and the norm/activation and quantize are
gone from the post-grad graph), with the eager results; the "never fuse" cases are left alone.

To keep CPU compile time low, one compiled function holds many independent chains (each on its own
inputs, so no intermediate is shared) and the per-rule match counts say which chain fused how."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.torch_version import TorchVersion

import fp4op
import fp4op.fusion as fusion
from fp4op import layouts
from conftest import requires_cuda
from fusion_helpers import assert_fp4_close, assert_same_outputs, compile_fused, fp4_ops, fresh_compile_config

M, K = 64, 256  # 1024 NVFP4 blocks a chain: the 99.9% rule allows one differing block


def hf_rms(x, w, eps):
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return h.to(x.dtype) if w is None else w * h.to(x.dtype)


def olmo2_rms(x, w, eps):
    # transformers' Olmo2RMSNorm / HeliumRMSNorm: the weight multiplies the float32 norm, one rounding
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (w * h).to(x.dtype)


def gemma_rms(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


# (rule that must fire, chain) -- each chain maps its inputs to the tensor that is quantized; chains
# with a residual also return the sum, which must stay correct
def _norm_chains(rms_module):
    return [
        ("rms_norm_quantize[torch]", lambda x, r, w, b: F.rms_norm(x, (K,), w, 1e-5)),
        ("rms_norm_quantize[torch]", lambda x, r, w, b: rms_module(x)),  # nn.RMSNorm, eps 1e-6
        ("rms_norm_quantize[torch,no_weight]", lambda x, r, w, b: F.rms_norm(x, (K,), None, 3e-4)),
        ("rms_norm_quantize[hf]", lambda x, r, w, b: hf_rms(x, w, 1e-6)),
        ("rms_norm_quantize[hf,no_weight]", lambda x, r, w, b: hf_rms(x, None, 0.1)),
        ("rms_norm_quantize[gemma]", lambda x, r, w, b: gemma_rms(x, w, 1e-6)),
        ("rms_norm_quantize[olmo2]", lambda x, r, w, b: olmo2_rms(x, w, 1e-6)),
        ("add_rms_norm_quantize[torch]", lambda x, r, w, b: _res(x, r, lambda s: F.rms_norm(s, (K,), w, 1e-5))),
        ("add_rms_norm_quantize[torch,no_weight]", lambda x, r, w, b: _res(x, r, lambda s: F.rms_norm(s, (K,), None, 2e-3))),
        ("add_rms_norm_quantize[hf]", lambda x, r, w, b: _res(x, r, lambda s: hf_rms(s, w, 1e-6))),
        ("add_rms_norm_quantize[hf,no_weight]", lambda x, r, w, b: _res(x, r, lambda s: hf_rms(s, None, 1e-5))),
        ("add_rms_norm_quantize[gemma]", lambda x, r, w, b: _res(x, r, lambda s: gemma_rms(s, w, 1e-6))),
        ("add_rms_norm_quantize[olmo2]", lambda x, r, w, b: _res(x, r, lambda s: olmo2_rms(s, w, 1e-5))),
        ("layer_norm_quantize[weight,bias]", lambda x, r, w, b: F.layer_norm(x, (K,), w, b, 1e-5)),
        ("layer_norm_quantize[weight]", lambda x, r, w, b: F.layer_norm(x, (K,), w, None, 1e-6)),
        ("layer_norm_quantize[no_affine]", lambda x, r, w, b: F.layer_norm(x, (K,), None, None, 1e-5)),
        # fairseq / open_clip: in float32 from the model-dtype input and parameters, converted back
        (
            "layer_norm_quantize[weight,bias,float32]",
            lambda x, r, w, b: F.layer_norm(x.float(), (K,), w.float(), b.float(), 1e-5).type_as(x),
        ),
        ("add_rms_norm_quantize[float32_sum,meta]", lambda x, r, w, b: _res32(x, r, lambda h: h.to(x.dtype) * w)),
        ("add_rms_norm_quantize[float32_sum,hf]", lambda x, r, w, b: _res32(x, r, lambda h: w * h.to(x.dtype))),
        ("add_rms_norm_quantize[float32_sum,olmo2]", lambda x, r, w, b: _res32(x, r, lambda h: (w * h).to(x.dtype))),
        ("add_rms_norm_quantize[float32_sum,hf,no_weight]", lambda x, r, w, b: _res32(x, r, lambda h: h.to(x.dtype))),
        ("rms_norm_quantize[hf]", lambda x, r, w, b: _rsqrt_on_the_left(x, w)),
        (
            "add_rms_norm_quantize[float32_sum,promoted,meta]",
            lambda x, r, w, b: _res32(x, r, lambda h: h.to(x.dtype) * w, promoted=True),
        ),
        (
            "add_rms_norm_quantize[float32_sum,promoted,hf,no_weight,sum_unused]",
            lambda x, r, w, b: _res32(x, r, lambda h: h.to(x.dtype), promoted=True)[0],
        ),
        (
            "add_rms_norm_quantize[float32_sum,meta,sum_unused]",
            lambda x, r, w, b: _res32(x, r, lambda h: h.to(x.dtype) * w, eps=3e-5)[0],
        ),
    ]


def _res(x, r, norm):
    s = x + r
    return norm(s), s * 2  # the sum is reused (the next residual)


def _rsqrt_on_the_left(x, w):
    """The Hugging Face form with the product written `rsqrt(var + eps) * h`."""
    h = x.to(torch.float32)
    return w * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * h).to(x.dtype)


def _res32(x, r, weighted, eps=1e-6, promoted=False):
    """vLLM's RMSNorm with a residual: the sum in float32 (promoted: `x.float() + residual`, as later vLLM
    versions write it), its rounding the next residual (reused)."""
    s = x.to(torch.float32) + (r if promoted else r.to(torch.float32))
    residual = s.to(x.dtype)
    h = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weighted(h), residual * 2


def gelu_new(x):
    # transformers' NewGELUActivation / minGPT's NewGELU
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _activation_chains():
    gelu_tanh = nn.GELU(approximate="tanh")
    return [
        ("silu_and_mul_quantize[silu]", lambda g, u: F.silu(g) * u),
        ("silu_and_mul_quantize[silu,up*act]", lambda g, u: u * nn.SiLU()(g)),
        ("silu_and_mul_quantize[silu]", lambda g, u: (lambda a, b: F.silu(a) * b)(*torch.cat([g, u], -1).chunk(2, -1))),
        ("silu_and_mul_quantize[silu]", lambda g, u: (lambda a, b: F.silu(a) * b)(*torch.cat([g, u], -1).split(K, -1))),
        ("silu_and_mul_quantize[silu]", lambda g, u: (lambda t: F.silu(t[..., :K]) * t[..., K:])(torch.cat([g, u], -1))),
        ("gelu_and_mul_quantize[gelu]", lambda g, u: F.gelu(g) * u),
        ("gelu_and_mul_quantize[gelu_tanh]", lambda g, u: F.gelu(g, approximate="tanh") * u),
        ("gelu_and_mul_quantize[gelu_tanh,up*act]", lambda g, u: u * gelu_tanh(g)),
        # T5 v1.1 / Flan-T5's gated-gelu (T5DenseGatedActDense: act(wi_0(h)) * wi_1(h))
        ("gelu_new_and_mul_quantize[gelu_new]", lambda g, u: gelu_new(g) * u),
        ("gelu_new_and_mul_quantize[gelu_new,up*act]", lambda g, u: u * gelu_new(g)),
        ("relu_and_mul_quantize[relu]", lambda g, u: F.relu(g) * u),
        ("relu_and_mul_quantize[relu2]", lambda g, u: torch.square(F.relu(g)) * u),
        ("relu_and_mul_quantize[relu2_mul,up*act]", lambda g, u: u * (lambda r: r * r)(torch.relu(g))),
        ("silu_quantize[silu]", lambda g, u: F.silu(g)),
        ("gelu_quantize[gelu]", lambda g, u: nn.GELU()(g)),
        ("gelu_quantize[gelu_tanh]", lambda g, u: gelu_tanh(g)),
        ("gelu_new_quantize[gelu_new]", lambda g, u: gelu_new(g)),
        ("gelu_new_quantize[gelu_new]", lambda g, u: 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))),
        # QuickGELU (CLIP / OpenCLIP / transformers' QuickGELUActivation) and SiLU written out
        ("sigmoid_mul_quantize[quick_gelu]", lambda g, u: g * torch.sigmoid(1.702 * g)),
        ("sigmoid_mul_quantize[quick_gelu_sigmoid_first]", lambda g, u: torch.sigmoid(g * 1.702) * g),
        ("sigmoid_mul_quantize[silu_written]", lambda g, u: g * torch.sigmoid(g)),
        ("sigmoid_mul_quantize[silu_written_sigmoid_first]", lambda g, u: g.sigmoid() * g),
        ("relu_quantize[relu]", lambda g, u: nn.ReLU(inplace=True)(g * 1)),
        ("relu_quantize[relu2]", lambda g, u: torch.square(F.relu(g))),
        ("relu_quantize[relu2]", lambda g, u: F.relu(g).pow(2)),
        ("relu_quantize[relu2_mul]", lambda g, u: (lambda r: r * r)(torch.relu(g))),
    ]


def _run_chains(norm_chains, act_chains, inputs, quantize):
    outs = []
    for (_, chain), (x, r, w, b) in zip(norm_chains, inputs["norm"]):
        y = chain(x, r, w, b)
        extra = ()
        if isinstance(y, tuple):
            y, *extra = y
        outs.append((*quantize(y), *extra))
    for (_, chain), (g, u) in zip(act_chains, inputs["act"]):
        outs.append(tuple(quantize(chain(g, u))))
    return outs


def _inputs(n_norm, n_act, dtype, device):
    rand = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    norm = [(rand(M, K) * 3, rand(M, K), rand(K) * 0.5 + 1, rand(K) * 0.1) for _ in range(n_norm)]
    act = [(rand(M, K) * 2, rand(M, K)) for _ in range(n_act)]
    return {"norm": norm, "act": act}


def _expected_counts(chains):
    counts = {}
    for name, _ in chains:
        counts[name] = counts.get(name, 0) + 1
    return counts


# (sf_vec_size, sf_use_ue8m0, global scale kind, sf layout, quantize entry point, every chain or a few)
CONFIGS = {
    "nvfp4-op": (16, False, "tensor", layouts.SWIZZLED_128x4, "op", True),
    "mxfp4-api": (32, True, None, layouts.SWIZZLED_128x4, "api", True),
    # the rules are registered per quantize-argument set: a few chains show this one works too
    "nvfp4-linear-inversed-api": (16, False, "inversed", layouts.LINEAR, "api", False),
}


@pytest.mark.parametrize(
    "dtype,config,device",
    [
        (torch.bfloat16, "nvfp4-op", "cpu"),
        (torch.float16, "mxfp4-api", "cpu"),
        (torch.bfloat16, "nvfp4-linear-inversed-api", "cpu"),
        pytest.param(torch.bfloat16, "nvfp4-op", "cuda", marks=requires_cuda),
        pytest.param(torch.float16, "mxfp4-api", "cuda", marks=requires_cuda),
    ],
)
def test_every_source_form_fuses(dtype, config, device):
    vec, ue8m0, gs_kind, layout, entry, every_chain = CONFIGS[config]
    swizzled, is_8x4 = layouts.layout_flags(layout)
    gs = None if gs_kind is None else torch.tensor([448.0 * 6 / 8.0], device=device)
    inversed = gs_kind == "inversed"
    if inversed:
        gs = torch.reciprocal(gs)

    def quantize(y):
        if entry == "op":
            return torch.ops.fp4op.quantize(y, gs, vec, ue8m0, swizzled, is_8x4, inversed)
        return fp4op.fp4_quantize(y, gs, vec, ue8m0, swizzled, is_8x4, inversed)

    rms_module = nn.RMSNorm(K, eps=1e-6, dtype=dtype, device=device)
    with torch.no_grad():
        rms_module.weight.copy_(torch.randn(K) * 0.3 + 1)
    norm_chains, act_chains = _norm_chains(rms_module), _activation_chains()
    if not every_chain:
        norm_chains, act_chains = norm_chains[5:8], act_chains[:1]
    inputs = _inputs(len(norm_chains), len(act_chains), dtype, device)

    def fn(inputs):
        return _run_chains(norm_chains, act_chains, inputs, quantize)

    out, record = compile_fused(fn, inputs)
    assert dict(record.matches) == _expected_counts(norm_chains + act_chains)
    ops = fp4_ops(record.after)
    assert "fp4op.quantize.default" not in ops, ops
    assert ops["fp4op.add_rms_norm_quantize.default"] == sum(name.startswith("add_") for name, _ in norm_chains)
    # the norms and activations are gone with the quantizes
    for decomposed in ("aten.rsqrt.default", "aten.var_mean.correction", "aten.exp.default", "aten.erf.default", "aten.tanh.default"):
        assert decomposed not in record.after, decomposed
    with torch.no_grad():
        expected = fn(inputs)
    failures = []
    for (name, _), got, want in zip(norm_chains + act_chains, out, expected):
        try:
            assert_fp4_close(got, want, vec, layout)
            assert_same_outputs(got[2:], want[2:])  # residual sums: bit-exact
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_never_fuse(device):
    """Chains the rules must leave alone; the compiled results still equal eager."""
    dtype = torch.bfloat16
    gs = torch.tensor([100.0], device=device)
    q = lambda y: torch.ops.fp4op.quantize(y, gs)  # noqa: E731
    x = [torch.randn(4, 16, K, dtype=dtype, device=device) for _ in range(8)]
    w = torch.randn(K, dtype=dtype, device=device)
    w32 = torch.randn(K, device=device)
    g, u1 = torch.randn(M, K, dtype=dtype, device=device), torch.randn(1, K, dtype=dtype, device=device)

    def fn(x, x32, w, w32, g, u1):
        outs = []
        outs.append(q(F.rms_norm(x[1], (16, K), None, 1e-5)))  # normalized over two dims
        outs.append(q(F.layer_norm(x[2], (16, K), None, None, 1e-5)))  # normalized over two dims
        n3 = F.rms_norm(x[3], (K,), w, 1e-5)
        outs.append(q(n3 * 2))  # the quantized tensor is not the norm output
        if device == "cpu":  # eager CUDA layer_norm rejects an fp32 weight with bf16 activations
            outs.append(q(F.layer_norm(x[4], (K,), w32, w32, 1e-5)))  # fp32 weight, bf16 activations (mixed)
        outs.append(q(F.rms_norm(x32[0], (K,), w32, 1e-5).to(dtype)))  # fp32 activations
        outs.append(q(F.layer_norm(x[4].float(), (K,), w32, w32, 1e-5).to(dtype)))  # in float32, fp32 weight
        outs.append(q(F.silu(g) * u1))  # broadcasting multiply
        outs.append(q(F.silu(x32[1]).to(dtype)))  # fp32 activation (a bf16 input upcast would be fine)
        outs.append(q(gelu_new(x32[1]).to(dtype)))  # gelu_new written out in float32 (one rounding)
        a = F.gelu(x[7])
        outs.append((*q(a), a.sum()))  # the activation output has another user
        outs.append(q(x[7] * torch.sigmoid(1.702 * x[6])))  # x * sigmoid(alpha * y): not QuickGELU of one tensor
        s = x[5].float() + x[6].float()  # vLLM's Gemma form in float16: the float32 sum is the next residual
        h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
        outs.append((*q(h.to(dtype) * w), s))
        return outs

    x32 = [torch.randn(M, K, device=device) for _ in range(2)]
    args = (x, x32, w, w32, g, u1)
    out, record = compile_fused(fn, *args)
    assert dict(record.matches) == {}
    assert fp4_ops(record.after) == {"fp4op.quantize.default": 12 if device == "cpu" else 11}
    with torch.no_grad():
        expected = fn(*args)
    for got, want in zip(out, expected):
        # Inductor's own code for these chains rounds a little differently from eager (reduction
        # order), so blocks may differ by a scale step; values stay within one E2M1 step
        assert_fp4_close(got, want, 16, min_identical=0.5)


def _normed_chains():
    """(rule, norm of (x, r, w, b)) pairs whose output the model also reads elsewhere; the residual forms
    return (output, next residual)."""
    return [
        ("rms_norm_quantize_with_normed[torch]", lambda x, r, w, b: F.rms_norm(x, (K,), w, 1e-5)),
        ("rms_norm_quantize_with_normed[torch,no_weight]", lambda x, r, w, b: F.rms_norm(x, (K,), None, 1e-6)),
        ("rms_norm_quantize_with_normed[hf]", lambda x, r, w, b: hf_rms(x, w, 1e-6)),
        ("rms_norm_quantize_with_normed[gemma]", lambda x, r, w, b: gemma_rms(x, w, 1e-6)),
        ("layer_norm_quantize_with_normed[weight,bias]", lambda x, r, w, b: F.layer_norm(x, (K,), w, b, 1e-5)),
        ("layer_norm_quantize_with_normed[no_affine]", lambda x, r, w, b: F.layer_norm(x, (K,), None, None, 1e-12)),
        (
            "layer_norm_quantize_with_normed[weight,bias,float32]",
            lambda x, r, w, b: F.layer_norm(x.float(), (K,), w.float(), b.float(), 1e-5).type_as(x),
        ),
        ("add_rms_norm_quantize_with_normed[hf]", lambda x, r, w, b: _res(x, r, lambda s: hf_rms(s, w, 1e-6))),
        ("add_rms_norm_quantize_with_normed[torch]", lambda x, r, w, b: _res(x, r, lambda s: F.rms_norm(s, (K,), w, 1e-5))),
    ]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_norm_output_read_elsewhere_comes_from_the_fused_op(device, dynamic):
    """A norm output that is quantized and also read elsewhere (post-LN: it is the next residual too; after
    a residual add, as MoE blocks read it) is computed by the *_with_normed op, which returns it: the norm
    and the quantize are gone, the other reader takes the op's last output."""
    dtype = torch.bfloat16
    chains = _normed_chains()
    xs = [torch.randn(M, K, dtype=dtype, device=device) * 2 for _ in chains]
    rs = [torch.randn(M, K, dtype=dtype, device=device) for _ in chains]
    w = torch.randn(K, dtype=dtype, device=device) * 0.5 + 1
    b = torch.randn(K, dtype=dtype, device=device) * 0.1
    gs = torch.tensor([200.0], device=device)

    def fn(xs, rs, w, b):
        outs = []
        for i, ((_, chain), x, r) in enumerate(zip(chains, xs, rs)):
            y = chain(x, r, w, b)
            n, *total = y if isinstance(y, tuple) else (y,)
            # the other reader before or after the quantize in the graph (the fused op must precede both)
            other = n + x if i % 2 else None
            q = torch.ops.fp4op.quantize(n, gs)
            outs.append((*q, n + x if other is None else other, *total))
        return outs

    out, record = compile_fused(fn, xs, rs, w, b, dynamic=dynamic)
    assert dict(record.matches) == _expected_counts(chains)
    ops = fp4_ops(record.after)
    assert "fp4op.quantize.default" not in ops, ops
    assert sum(v for k, v in ops.items() if "_with_normed" in k) == len(chains), ops
    for decomposed in ("aten.rsqrt.default", "aten.var_mean.correction", "aten.native_layer_norm.default"):
        assert decomposed not in record.after, decomposed
    with torch.no_grad():
        expected = fn(xs, rs, w, b)
    for (name, _), got, want in zip(chains, out, expected):
        assert_fp4_close(got[:2], want[:2], 16)
        # the reader's values: the norm output up to reduction order, then the same add
        torch.testing.assert_close(got[2], want[2], rtol=2.0**-6, atol=1e-5, msg=name)
        assert_same_outputs(got[3:], want[3:])  # the next residual, bit-exact


def _post_norm_chains():
    """(rule, residual + norm of (x, r, w)) pairs: the post-norm residual stream (OLMo2), either add order."""
    return [
        ("rms_norm_add_quantize[olmo2]", lambda x, r, w: r + olmo2_rms(x, w, 1e-6)),
        ("rms_norm_add_quantize[torch]", lambda x, r, w: r + F.rms_norm(x, (K,), w, 1e-5)),
        ("rms_norm_add_quantize[torch,no_weight]", lambda x, r, w: r + F.rms_norm(x, (K,), None, 3e-4)),
        ("rms_norm_add_quantize[hf,residual_right]", lambda x, r, w: hf_rms(x, w, 1e-6) + r),
        ("rms_norm_add_quantize[gemma]", lambda x, r, w: r + gemma_rms(x, w, 1e-6)),
    ]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_residual_added_after_the_norm_fuses(device, dynamic):
    """`residual + norm(x)` quantized and read again (the next residual add) becomes rms_norm_add_quantize,
    whose sum the other reader takes; a norm output plus a broadcast [K] vector (not a residual) stays."""
    dtype = torch.bfloat16
    chains = _post_norm_chains()
    xs = [torch.randn(M, K, dtype=dtype, device=device) * 2 for _ in chains]
    rs = [torch.randn(M, K, dtype=dtype, device=device) for _ in chains]
    w = torch.randn(K, dtype=dtype, device=device) * 0.5 + 1
    gs = torch.tensor([200.0], device=device)

    def fn(xs, rs, w):
        outs = []
        for (_, chain), x, r in zip(chains, xs, rs):
            h = chain(x, r, w)
            outs.append((*torch.ops.fp4op.quantize(h, gs), h + x))
        broadcast = F.rms_norm(xs[0], (K,), w, 1e-5) + w  # a [K] vector, not a residual
        outs.append((*torch.ops.fp4op.quantize(broadcast, gs), broadcast))
        return outs

    out, record = compile_fused(fn, xs, rs, w, dynamic=dynamic)
    assert dict(record.matches) == _expected_counts(chains)
    ops = fp4_ops(record.after)
    assert ops["fp4op.rms_norm_add_quantize.default"] == len(chains), ops
    assert ops["fp4op.quantize.default"] == 1, ops  # the broadcast chain's
    with torch.no_grad():
        expected = fn(xs, rs, w)
    for (name, _), got, want in zip(chains, out, expected):
        assert_fp4_close(got[:2], want[:2], 16)
        # the sum: the norm output up to reduction order, plus the residual
        torch.testing.assert_close(got[2], want[2], rtol=2.0**-6, atol=1e-5, msg=name)


B, T = 2, 32  # adaLN chains: x [B, T, K], B * T = M


def _modulate_chains(norm_affine):
    """(rule, adaLN of (x, emb)) pairs as diffusion transformers write it, emb [B, 6K] the conditioning
    projection whose chunks are shift and scale (non-contiguous [B, K] views)."""
    norm = lambda x: F.layer_norm(x, (K,), None, None, 1e-6)  # noqa: E731
    w, b = norm_affine

    def chunks(emb):
        return emb.chunk(6, dim=1)

    def dit(x, emb):  # DiT's modulate(norm(x), shift, scale)
        shift, scale = chunks(emb)[:2]
        return norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def flux(x, emb):  # FLUX: the chunks of emb[:, None, :], (1 + scale) on the left
        shift, scale = emb[:, None, :].chunk(6, dim=-1)[:2]
        return (1 + scale) * norm(x) + shift

    def sd3_continuous(x, emb):  # diffusers' AdaLayerNormContinuous: an affine norm, (1 + scale)[:, None, :]
        scale, shift = chunks(emb)[2:4]
        return F.layer_norm(x, (K,), w, b, 1e-6) * (1 + scale)[:, None, :] + shift[:, None, :]

    def shift_first(x, emb):
        shift, scale = chunks(emb)[4:6]
        return shift[:, None] + norm(x) * (scale[:, None] + 1)

    def one_vector(x, emb):  # FiLM-style [K] vectors for every row, an eps of 1e-5
        return F.layer_norm(x, (K,), w, None, 1e-5) * emb[0, :K] + emb[1, K : 2 * K]

    def pixart(x, emb):  # diffusers' BasicTransformerBlock (ada_norm_single): [B, 1, K] chunks, then squeeze(1)
        shift, scale = emb.reshape(B, 6, -1).chunk(6, dim=1)[:2]
        return (norm(x) * (1 + scale) + shift).squeeze(1)

    return [
        ("layer_norm_modulate_quantize[no_affine,norm*multiplier+shift]", dit),
        ("layer_norm_modulate_quantize[no_affine,multiplier*norm+shift]", flux),
        ("layer_norm_modulate_quantize[weight,bias,norm*multiplier+shift]", sd3_continuous),
        ("layer_norm_modulate_quantize[no_affine,shift+norm*multiplier]", shift_first),
        ("layer_norm_modulate_quantize[weight,norm*multiplier+shift]", one_vector),
        ("layer_norm_modulate_quantize[no_affine,norm*multiplier+shift]", pixart),
    ]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_adaln_modulation_fuses(device, dynamic):
    """LayerNorm then the per-sample scale and shift of diffusion transformers becomes
    layer_norm_modulate_quantize; a per-position multiplier, a float32 one, and a modulated value read
    elsewhere are left alone."""
    dtype = torch.bfloat16
    rand = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    norm_affine = (rand(K) * 0.3 + 1, rand(K) * 0.1)
    chains = _modulate_chains(norm_affine)
    xs = [rand(B, T, K) * 2 for _ in chains]
    embs = [rand(B, 6 * K) * 0.5 for _ in chains]
    gs = torch.tensor([100.0], device=device)

    others = [rand(B, T, K) for _ in range(3)]  # the unfused chains' own inputs (no shared norm output)
    position = rand(1, T, K) * 0.5

    def fn(xs, embs, others, position):
        outs = [torch.ops.fp4op.quantize(chain(x, emb), gs) for (_, chain), x, emb in zip(chains, xs, embs)]
        shift, scale = embs[0][:, None, :K], embs[0][:, None, K : 2 * K]
        norm = lambda x: F.layer_norm(x, (K,), None, None, 1e-6)  # noqa: E731
        per_position = norm(others[0]) * (1 + position) + shift
        float32 = (norm(others[1]) * (1 + scale.float()) + shift).to(dtype)
        read_elsewhere = norm(others[2]) * (1 + scale) + shift
        outs += [torch.ops.fp4op.quantize(v, gs) for v in (per_position, float32, read_elsewhere)]
        return outs, read_elsewhere

    (out, _), record = compile_fused(fn, xs, embs, others, position, dynamic=dynamic)
    assert dict(record.matches) == _expected_counts(chains)
    ops = fp4_ops(record.after)
    assert ops["fp4op.layer_norm_modulate_quantize.default"] == len(chains), ops
    assert ops["fp4op.quantize.default"] == 3, ops
    with torch.no_grad():
        expected, _ = fn(xs, embs, others, position)
    for (name, _), got, want in zip(chains, out, expected):
        assert_fp4_close(got, want, 16)
    # (the unfused chains are Inductor's, which rounds the norm and the modulation once, not as eager)


def test_norm_output_read_only_by_its_quantize_takes_the_plain_op():
    """Where the quantize is the norm output's only reader, the plain fused op (which stores no norm output)
    is used, not the *_with_normed one."""
    x, w = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(K, dtype=torch.bfloat16)
    _, record = compile_fused(lambda x, w: _nvfp4(0)(hf_rms(x, w, 1e-6)), x, w)
    assert dict(record.matches) == {"rms_norm_quantize[hf]": 1}
    assert fp4_ops(record.after) == {"fp4op.rms_norm_quantize.default": 1}


@pytest.mark.parametrize(
    "eps_shape, fuses",
    [((), True), ((1,), True), ((1, 1), False), ((1, 1, 1), False)],
    ids=["0d", "1d", "2d", "3d"],
)
def test_eps_tensor_rank(eps_shape, fuses):
    """A one-element float32 eps buffer fuses where it acts as a scalar; of more dimensions it would
    broadcast 2-D activations to more (a [1, 1, 1] eps makes the norm output 3-D), which the fused op
    does not return: left alone (it once fused and crashed Inductor), the compiled result equals eager."""
    eps = torch.full(eps_shape, 1e-6)
    gs = torch.tensor([100.0])

    def fn(x, w):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return torch.ops.fp4op.quantize(w * h.to(x.dtype), gs)

    x, w = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(K, dtype=torch.bfloat16)
    out, record = compile_fused(fn, x, w)
    assert sum(record.matches.values()) == (1 if fuses else 0), dict(record.matches)
    with torch.no_grad():
        expected = fn(x, w)
    assert out[0].shape == expected[0].shape
    # (unfused, Inductor's own kernel keeps h.to(dtype) in float32: blocks may differ by a scale step)
    assert_fp4_close(out, expected, 16, min_identical=0.999 if fuses else 0.5)


def test_rms_norm_of_non_contiguous_inputs():
    """F.rms_norm / nn.RMSNorm of a transposed or permuted activation (ConvNeXt-style channels-last):
    its decomposition makes the output contiguous with a clone that the contiguous-input rules lack;
    the strided rules fuse it, with eager's results."""
    dtype = torch.bfloat16
    gs = torch.tensor([100.0])
    q = lambda y: torch.ops.fp4op.quantize(y, gs)  # noqa: E731
    rms = nn.RMSNorm(K, eps=1e-6, dtype=dtype)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(K) * 0.3 + 1)
    w = torch.randn(K, dtype=dtype) * 0.5 + 1
    xt = (torch.randn(K, M) * 3).to(dtype).t()  # [M, K], transposed
    x3 = (torch.randn(16, 4, K) * 3).to(dtype).transpose(0, 1)  # [4, 16, K]
    x4 = (torch.randn(2, K, 4, 8) * 3).to(dtype).permute(0, 2, 3, 1)  # [2, 4, 8, K], channels last

    def fn(xt, x3, x4, w):
        return [
            q(F.rms_norm(xt, (K,), w, 1e-5)),
            q(rms(x3)),
            q(F.rms_norm(x4, (K,), None, 1e-6)),
            q(F.rms_norm(x3.float(), (K,), w.float(), 1e-6).to(dtype)),
        ]

    out, record = compile_fused(fn, xt, x3, x4, w)
    assert dict(record.matches) == {
        "rms_norm_quantize[torch,strided]": 2,
        "rms_norm_quantize[torch,no_weight,strided]": 1,
        "rms_norm_quantize[torch_fp32,strided]": 1,
    }
    assert "fp4op.quantize.default" not in fp4_ops(record.after)
    with torch.no_grad():
        expected = fn(xt, x3, x4, w)
    for got, want in zip(out, expected):
        assert_fp4_close(got, want, 16)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_row_views_between_norm_and_quantize(dynamic):
    """A norm/activation output flattened to tokens before its quantize (``h.view(-1, K)``, as MoE
    blocks feed their router) fuses, as does one that adds or drops a size-1 dim: the quantize moves before
    the view and its codes are viewed, the same bytes. A view that splits the last dim quantizes other rows and stays unfused; a viewed output
    that is also read elsewhere fuses into the op that returns the norm output too."""
    dtype = torch.bfloat16
    gs = torch.tensor([100.0])
    q = lambda y: torch.ops.fp4op.quantize(y, gs)  # noqa: E731
    x, y, z, g, u = ((torch.randn(4, 16, K) * 3).to(dtype) for _ in range(5))
    w = (torch.randn(K) * 0.5 + 1).to(dtype)

    def fn(x, y, z, g, u, w):
        kept = F.rms_norm(z, (K,), w, 1e-6).reshape(-1, K)
        return [
            q(hf_rms(x, w, 1e-6).view(-1, K)),
            q(F.layer_norm(y, (K,), w, None, 1e-5).reshape(64, K)),
            q((F.silu(g) * u).view(64, K)),
            q(F.rms_norm(x, (K,), None, 1e-5).view(4, 16, 2, K // 2)),  # rows of K / 2
            q(kept),
            kept,
            # a size-1 dim added or dropped (diffusers' PixArt block squeezes its modulated norm output)
            q(F.gelu(g).unsqueeze(1)),
            q(F.relu(u.view(4, 1, 16, K)).squeeze(1)),
        ]

    out, record = compile_fused(fn, x, y, z, g, u, w, dynamic=dynamic)
    assert dict(record.matches) == {
        "rms_norm_quantize[hf]": 1,
        "layer_norm_quantize[weight]": 1,
        "silu_and_mul_quantize[silu]": 1,
        "rms_norm_quantize_with_normed[torch]": 1,
        "gelu_quantize[gelu]": 1,
        "relu_quantize[relu]": 1,
    }, dict(record.matches)
    assert fp4_ops(record.after).get("fp4op.quantize.default") == 1
    with torch.no_grad():
        expected = fn(x, y, z, g, u, w)
    for got, want in zip(out[:5], expected[:5]):
        assert got[0].shape == want[0].shape
        assert_fp4_close(got, want, 16)
    # unfused: the same op on the same values
    assert torch.equal(out[3][0], expected[3][0]) and torch.equal(out[3][1], expected[3][1])
    assert out[5].shape == expected[5].shape
    torch.testing.assert_close(out[5], expected[5], rtol=2.0**-6, atol=1e-6)  # the fused op's norm output
    for got, want in zip(out[6:], expected[6:]):
        assert got[0].shape == want[0].shape
        assert_fp4_close(got, want, 16)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_row_slices_between_norm_and_quantize(dynamic):
    """A norm/activation output sliced to some rows before its quantize (Hugging Face causal LMs feed
    lm_head ``hidden_states[:, -logits_to_keep:, :]``) fuses on those rows: the slice moves to the
    producer's inputs that have rows (not the weights), so the norm is computed on the kept rows only.
    A slice of the last dim and a sliced output also read elsewhere stay unfused; a statistic over the
    sliced dim stays computed over all rows."""
    dtype = torch.bfloat16
    gs = torch.tensor([100.0])
    q = lambda y: torch.ops.fp4op.quantize(y, gs)  # noqa: E731
    x, r, y, g, u, z = ((torch.randn(3, 16, K) * 3).to(dtype) for _ in range(6))
    w = (torch.randn(K) * 0.5 + 1).to(dtype)

    n = torch.randint(-4, 5, (3, 16, K)).to(dtype)  # small integers: sums exact in any order

    def fn(x, r, y, g, u, z, n, w):
        kept = F.rms_norm(z, (K,), w, 1e-6)
        h = x + r
        return [
            q(hf_rms(x, w, 1e-6)[:, -1:, :]),  # the last token
            q(F.layer_norm(y, (K,), w, None, 1e-5)[:, 4:12]),
            q((F.silu(g) * u)[1:, ::2]),  # batch rows, every other token
            q((F.relu(g) ** 2)[:, -2:]),
            q(hf_rms(h, w, 1e-5)[:, -3:]),  # the input a residual sum, read again below
            h,
            q(F.rms_norm(x, (K,), None, 1e-5)[..., : K // 2]),  # half of each row: other blocks
            q(kept[:, -1:]),
            kept,
            q((z - z.amax(1, keepdim=True))[:, -1:]),  # statistics over the sliced dim (exact ones)
            q((n - n.float().sum(1, keepdim=True).to(dtype))[:, -2:]),
        ]

    out, record = compile_fused(fn, x, r, y, g, u, z, n, w, dynamic=dynamic)
    assert dict(record.matches) == {
        "rms_norm_quantize[hf]": 2,
        "layer_norm_quantize[weight]": 1,
        "silu_and_mul_quantize[silu]": 1,
        "relu_quantize[relu2]": 1,
    }, dict(record.matches)
    assert fp4_ops(record.after).get("fp4op.quantize.default") == 4  # the last four
    with torch.no_grad():
        expected = fn(x, r, y, g, u, z, n, w)
    for i, (got, want) in enumerate(zip(out, expected)):
        if isinstance(want, torch.Tensor):
            assert torch.equal(got, want), i
        else:
            assert got[0].shape == want[0].shape, i
            assert_fp4_close(got, want, 16)


@pytest.mark.skipif(TorchVersion(torch.__version__) < (2, 14), reason="torch 2.11's Inductor rounds unlike eager")
def test_row_slices_keep_the_producers_roundings():
    """The rows' copies of the producer keep the originals' node metadata and take the values their ops
    make: with emulate_precision_casts an unfused sliced chain still rounds like eager (Inductor's
    rounding barriers travel with the nodes), and the final LayerNorm of a residual sum (pre-LN models'
    head input) fuses, its copies' values contiguous tensors as the ops make them, not views."""
    dtype = torch.bfloat16
    gs = torch.tensor([100.0])
    q = lambda y: torch.ops.fp4op.quantize(y, gs)  # noqa: E731
    x, r = ((torch.randn(2, 32, K) * 2).to(dtype) for _ in range(2))
    shift = (torch.randn(2, 1, K) * 2).to(dtype)
    w, b = (torch.randn(K) * 0.1 + 1).to(dtype), (torch.randn(K) * 0.1).to(dtype)

    def fn(x, r, shift, w, b):
        return [q((hf_rms(x, w, 1e-6) + shift)[-1:]), q(F.layer_norm(x + r, (K,), w, b, 1e-5)[:, -1:])]

    with torch._inductor.config.patch(emulate_precision_casts=True):
        out, record = compile_fused(fn, x, r, shift, w, b)
    assert dict(record.matches) == {"layer_norm_quantize[weight,bias]": 1}, dict(record.matches)
    with torch.no_grad():
        expected = fn(x, r, shift, w, b)
    for got, want in zip(out, expected):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_row_slices_left_as_they_were_when_rows_cannot_be_computed(monkeypatch):
    """Where the fake execution of a row copy fails midway, the copies made so far are removed and the
    sliced chain compiles as it was written (unfused, the same results)."""
    from fp4op.fusion import pass_manager

    run_on_vals, calls = pass_manager._run_on_vals, []

    def fail_on_the_third(node):
        calls.append(node)
        if len(calls) == 3:
            raise RuntimeError("no value")
        return run_on_vals(node)

    monkeypatch.setattr(pass_manager, "_run_on_vals", fail_on_the_third)
    gs = torch.tensor([100.0])
    x = (torch.randn(3, 16, K) * 3).to(torch.bfloat16)
    w = (torch.randn(K) * 0.5 + 1).to(torch.bfloat16)

    def fn(x, w):
        return torch.ops.fp4op.quantize(hf_rms(x, w, 1e-6)[:, -1:], gs)

    out, record = compile_fused(fn, x, w)
    assert len(calls) == 3
    assert dict(record.matches) == {}
    assert fp4_ops(record.after) == {"fp4op.quantize.default": 1}
    assert record.after["aten.slice.Tensor"] == record.before["aten.slice.Tensor"] == 1
    with torch.no_grad():
        expected = fn(x, w)
    assert_fp4_close(out, expected, 16, min_identical=0.5)  # Inductor's own norm: its rounding


class _ActivationQuantizer(nn.Module):
    """An FP4 activation quantizer as checkpoints carry it: a stored input_scale, its inverse the global scale
    (computed in forward, i.e. after the residual add in program order)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("input_scale", torch.tensor([8.0 / 2688.0]))

    def forward(self, x):
        return torch.ops.fp4op.quantize(x, 1.0 / self.input_scale, 16, False)


class _MasterWeightRMSNorm(nn.Module):
    """fp32 master weight cast to the activation dtype in forward (mixed-precision training code)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(K) * 0.3 + 1)

    def forward(self, x):
        return F.rms_norm(x, (K,), self.weight.to(x.dtype), 1e-6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_residual_norm_inputs_computed_after_the_add(dynamic):
    """The fused add+RMSNorm op replaces the add (its sum is read before the quantize), so a global scale
    or weight computed after the add in program order is moved up for it; a global scale computed from
    the sum itself cannot be (the fused op would produce its own input): that chain fuses as the norm
    alone, the add stays. Each compiles (no "used before defined") and equals eager."""
    torch.manual_seed(0)
    quantizer, norm, rms = _ActivationQuantizer(), _MasterWeightRMSNorm(), nn.RMSNorm(K, eps=1e-6, dtype=torch.bfloat16)

    def fn(x, r):
        s0 = x[0] + r[0]
        s1 = x[1] + r[1]
        s2 = x[2] + r[2]
        dynamic_scale = 2688.0 / s2.abs().amax().float().reshape(1)  # from the norm's own input
        return (
            (*quantizer(rms(s0)), s0 * 2),
            (*torch.ops.fp4op.quantize(norm(s1), torch.tensor([336.0]), 16, False), s1 * 2),
            (*torch.ops.fp4op.quantize(F.rms_norm(s2, (K,), None, 1e-6), dynamic_scale, 16, False), s2 * 2),
        )

    x = [torch.randn(M, K, dtype=torch.bfloat16) * 3 for _ in range(3)]
    r = [torch.randn(M, K, dtype=torch.bfloat16) for _ in range(3)]
    out, record = compile_fused(fn, x, r, dynamic=dynamic)
    assert dict(record.matches) == {"add_rms_norm_quantize[torch]": 2, "rms_norm_quantize[torch,no_weight]": 1}
    assert "fp4op.quantize.default" not in record.after
    with torch.no_grad():
        expected = fn(x, r)
    for got, want in zip(out, expected):
        assert_fp4_close(got, want)
        assert_same_outputs(got[2:], want[2:])


# ---- one producer output read by several quantizes that do not merge ----------------------------------------

# three static global scales: separate tensors (as loaded from a checkpoint), so the quantizes do not merge
SCALES = [torch.tensor([448.0 * 6 / amax]) for amax in (6.0, 8.0, 12.0)]


def _nvfp4(i):
    return lambda y: torch.ops.fp4op.quantize(y, SCALES[i])


def _mxfp4(y):
    return torch.ops.fp4op.quantize(y, None, 32, True)


def _compile_linted(fn, *args):
    """compile_fused with graph.lint() run on the graph the fusion pass leaves."""

    def lint(graph):
        graph.lint()

    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        passes = fusion.ComposedPass([fusion.fusion_pass(), lint])
        out = torch.compile(fn, options={"post_grad_custom_post_pass": passes})(*args)
    return out, fusion.last_record()


def test_producer_read_by_several_quantizes_fuses_per_quantize():
    """A norm / gated activation output read by 2-3 quantizes with different global-scale tensors (or different
    recipes) cannot be merged into one quantize; each quantize gets a private copy of the producer and fuses
    with it (one fused op per quantize, each recomputing the norm from its input). With a residual add the
    first match takes the add (add_rms_norm_quantize returns the sum) and the others normalize that sum."""
    dtype = torch.bfloat16
    rand = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x, r, g, u = [rand(M, K) * 3 for _ in range(4)], rand(M, K), rand(M, K) * 2, rand(M, K)
    w, b = rand(K) * 0.5 + 1, rand(K) * 0.1

    def fn(x, r, g, u, w, b):
        n = hf_rms(x[0], w, 1e-6)  # q/k/v projections of Llama's input_layernorm
        qkv = [_nvfp4(i)(n) for i in range(3)]
        s = x[1] + r  # post_attention_layernorm: the residual sum is also the next residual
        n = F.rms_norm(s, (K,), w, 1e-5)
        gate_up_down = [*(_nvfp4(i)(n) for i in range(3)), s * 2]
        n = F.layer_norm(x[2], (K,), w, b, 1e-5)
        ln = [_nvfp4(0)(n), _nvfp4(1)(n)]
        a = F.silu(g) * u
        act = [_nvfp4(0)(a), _nvfp4(2)(a)]
        n = gemma_rms(x[3], w, 1e-6)
        recipes = [_nvfp4(1)(n), _mxfp4(n)]
        return qkv, gate_up_down, ln, act, recipes

    args = (x, r, g, u, w, b)
    out, record = _compile_linted(fn, *args)
    assert dict(record.matches) == {
        "rms_norm_quantize[hf]": 3, "add_rms_norm_quantize[torch]": 1, "rms_norm_quantize[torch]": 2,
        "layer_norm_quantize[weight,bias]": 2, "silu_and_mul_quantize[silu]": 2, "rms_norm_quantize[gemma]": 2,
    }
    assert record.producer_copies == 2 + 2 + 1 + 1 + 1
    assert dict(fusion.fusion_pass().copy_counts) == {"fused": 7, "undone": 0}
    assert "fp4op.quantize.default" not in record.after
    for decomposed in ("aten.rsqrt.default", "aten.var_mean.correction", "aten.pow.Tensor_Scalar", "aten.exp.default"):
        assert decomposed not in record.after, decomposed
    # the sum is computed once, by the add_rms_norm_quantize (the rms_norm_quantizes read its output)
    assert "aten.add.Tensor" not in record.after
    with torch.no_grad():
        expected = fn(*args)
        # each copy is the fused op on the same input: bit-identical to calling that op eagerly
        for i, got in enumerate(out[0]):
            fused = torch.ops.fp4op.rms_norm_quantize(x[0], w, 1e-6, 0.0, True, SCALES[i], 16, False, True, False,
                                                      False)
            assert all(torch.equal(a, e) for a, e in zip(got, fused))
    vecs = [[16] * 3, [16] * 3, [16] * 2, [16] * 2, [16, 32]]
    for name, got, want, vec in zip(("qkv", "residual", "layer_norm", "silu_and_mul", "recipes"), out, expected, vecs):
        for i, (a, e) in enumerate(zip(got, want)):
            if isinstance(a, torch.Tensor):  # the residual sum: bit-exact
                assert torch.equal(a, e), name
            else:
                assert_fp4_close(a, e, vec[i])


@pytest.mark.parametrize(
    "mean, dims, changed",
    [
        (lambda h: h.mean(2, keepdim=True), [-1], 1),  # the last dim by its index
        (lambda h: h.mean(dim=[2]), [-1], 1),
        (lambda h: h.mean(-1, keepdim=True), [-1], 0),  # already as the patterns write it
        (lambda h: h.mean(1, keepdim=True), [1], 0),  # the sequence: kept, never fused
        (lambda h: h.mean([1, 2], keepdim=True), [1, 2], 0),  # more than the last dim: kept
        (lambda h: h.mean(-2, keepdim=True), [-2], 0),
    ],
)
def test_canonicalize_mean_dims(mean, dims, changed):
    """Only a mean over exactly the last dim is rewritten (as -1); the graph computes the same after."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fp4op.fusion.pass_manager import canonicalize_mean_dims

    x = torch.randn(2, 3, 8)
    gm = make_fx(lambda h: mean(h.pow(2)))(x)
    want = gm(x)
    assert canonicalize_mean_dims(gm.graph) == changed
    (node,) = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.mean.dim)
    assert list(node.args[1]) == dims
    gm.recompile()
    assert torch.equal(gm(x), want)


@pytest.mark.parametrize(
    "norm, restored",
    [
        (lambda h: torch.rsqrt(h.pow(2).mean(-1, keepdim=True)), 1),  # RMSNorm, eps 0
        (lambda h: torch.rsqrt(torch.var_mean(h, -1, correction=0, keepdim=True)[0]), 1),  # LayerNorm, eps 0
        (lambda h: torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), 0),  # an eps: nothing to restore
        (lambda h: torch.rsqrt(h.mean(-1, keepdim=True)), 0),  # not squares: may be -0, rsqrt(-0) = -inf
        (lambda h: torch.rsqrt(h.pow(3).mean(-1, keepdim=True)), 0),
    ],
)
def test_restore_zero_eps(norm, restored):
    """Inductor drops `+ 0.0`; the pass puts it back only after a mean of squares or a variance (never
    -0), so the graph computes the same, -0 inputs included."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fp4op.fusion.pass_manager import restore_zero_eps

    x = torch.randn(2, 3, 8)
    x[0, 0] = -0.0
    gm = make_fx(norm)(x)
    want = gm(x)
    assert restore_zero_eps(gm.graph) == restored
    gm.recompile()
    assert torch.equal(gm(x).view(torch.int32), want.view(torch.int32))  # bits: NaNs, the sign of inf


def test_zero_eps_norms_fuse():
    """"Any eps" includes 0.0: the hand-written RMSNorm (alone and after a residual add, the variance as
    pow or a product), F.rms_norm and F.layer_norm with eps 0 fuse, with eager's results."""
    dtype = torch.bfloat16
    gs = torch.tensor([100.0])
    q = lambda y: torch.ops.fp4op.quantize(y, gs)  # noqa: E731
    x = [(torch.randn(M, K) * 3).to(dtype) for _ in range(7)]

    def gpt_fast_zero_eps(x, w):
        h = x.float()
        return (h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 0.0)).to(dtype) * w
    r, w, b = torch.randn(M, K).to(dtype), torch.randn(K).to(dtype) * 0.5 + 1, torch.randn(K).to(dtype) * 0.1

    def fn(x, r, w, b):
        s = x[1] + r
        return [
            q(hf_rms(x[0], w, 0.0)),
            (*q(hf_rms(s, w, 0.0)), s * 2),
            q(w * (x[2].float() * torch.rsqrt((x[2].float() * x[2].float()).mean(-1, keepdim=True) + 0.0)).to(dtype)),
            q(gpt_fast_zero_eps(x[6], w)),
            q(F.rms_norm(x[3], (K,), w, 0.0)),
            q(F.layer_norm(x[4], (K,), w, b, 0.0)),
            q(F.layer_norm(x[5], (K,), None, None, 0.0)),
        ]

    out, record = compile_fused(fn, x, r, w, b)
    assert dict(record.matches) == {
        "rms_norm_quantize[hf]": 2,
        "rms_norm_quantize[meta]": 1,
        "add_rms_norm_quantize[hf]": 1,
        "rms_norm_quantize[torch]": 1,
        "layer_norm_quantize[weight,bias]": 1,
        "layer_norm_quantize[no_affine]": 1,
    }
    with torch.no_grad():
        expected = fn(x, r, w, b)
    for got, want in zip(out, expected):
        assert_fp4_close(got, want, 16)
        assert_same_outputs(got[2:], want[2:])


def test_producer_copies_with_the_mean_written_as_the_last_index():
    """3-D activations whose norm takes its mean over dim 2 (the last, written as its index), read by the
    q/k/v quantizes with different global scales: the copies fuse in the pass's last round, where the
    mean is written as -1; each fused op equals the op called eagerly on the same input."""
    x, w = torch.randn(2, M // 2, K, dtype=torch.bfloat16) * 3, torch.randn(K, dtype=torch.bfloat16) * 0.5 + 1

    def fn(x, w):
        h = x.float()
        n = w * (h * torch.rsqrt(h.pow(2).mean(2, keepdim=True) + 1e-6)).to(x.dtype)
        return [_nvfp4(i)(n) for i in range(3)]

    out, record = _compile_linted(fn, x, w)
    assert dict(record.matches) == {"rms_norm_quantize[hf]": 3}
    assert dict(fusion.fusion_pass().copy_counts) == {"fused": 2, "undone": 0}
    assert "fp4op.quantize.default" not in record.after
    for i, got in enumerate(out):
        fused = torch.ops.fp4op.rms_norm_quantize(x, w, 1e-6, 0.0, True, SCALES[i], 16, False, True, False, False)
        assert all(torch.equal(a, e) for a, e in zip(got, fused))
    with torch.no_grad():
        for got, want in zip(out, fn(x, w)):
            assert_fp4_close(got, want, 16)


def test_gated_activation_read_by_many_quantizes_is_not_copied():
    """A gated activation read by 4 quantizes: 4 copies would read gate and up 4 times (8 reads of its size),
    more than the activation computed once (2 reads, 1 write, 4 reads of its output); it is left unfused.
    With 3 readers the copies break even and are made."""
    g, u = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(M, K, dtype=torch.bfloat16)
    scales = [*SCALES, torch.tensor([448.0 * 6 / 16.0])]

    def fn(g, u, readers):
        a = F.silu(g) * u
        return [torch.ops.fp4op.quantize(a, scales[i]) for i in range(readers)]

    for readers, fused in ((4, 0), (3, 3)):
        out, record = _compile_linted(lambda g, u: fn(g, u, readers), g, u)
        assert record.matches.get("silu_and_mul_quantize[silu]", 0) == fused, readers
        assert record.producer_copies == (fused - 1 if fused else 0)
        if not fused:
            assert record.after == record.before  # (its numerics are Inductor's own silu * mul)
            continue
        with torch.no_grad():
            for got, want in zip(out, fn(g, u, readers)):
                assert_fp4_close(got, want, 16)


def test_producer_with_another_user_is_not_copied():
    """The norm output is also returned: it has a user that is not a quantize, so nothing is copied (the
    output must be written anyway); the norm fuses with one quantize into the op that also returns its
    output, which the other quantize and the graph's output read."""
    x, w = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(K, dtype=torch.bfloat16)

    def fn(x, w):
        n = hf_rms(x, w, 1e-6)
        return _nvfp4(0)(n), _nvfp4(1)(n), n

    out, record = _compile_linted(fn, x, w)
    assert dict(record.matches) == {"rms_norm_quantize_with_normed[hf]": 1} and record.producer_copies == 0
    assert not fusion.fusion_pass().copy_counts
    assert fp4_ops(record.after) == {"fp4op.rms_norm_quantize_with_normed.default": 1, "fp4op.quantize.default": 1}
    with torch.no_grad():
        expected = fn(x, w)
    for got, want in zip(out[:2], expected[:2]):
        assert_fp4_close(got, want, 16)
    torch.testing.assert_close(out[2], expected[2], rtol=2.0**-6, atol=1e-6)


def test_unfused_copies_are_undone():
    """bf16 activations with float32 norm weights, read by several quantizes: each quantize gets a private copy
    of the norm, the rules refuse every one (the fused kernels take weights of the activation dtype), and the
    copies are folded back: the graph after the pass has exactly the ops it had before."""
    dtype = torch.bfloat16
    x = [torch.randn(M, K, dtype=dtype) for _ in range(3)]
    w32, b32 = torch.randn(K) * 0.5 + 1, torch.randn(K) * 0.1

    def fn(x, w32, b32):
        n = F.rms_norm(x[0], (K,), w32, 1e-5)
        rms = [_nvfp4(i)(n) for i in range(3)]
        n = F.layer_norm(x[1], (K,), w32, b32, 1e-5)
        ln = [_nvfp4(0)(n), _nvfp4(1)(n)]
        n = (w32 * hf_rms(x[2], None, 1e-6)).to(dtype)  # the weight multiplies in float32
        hf = [_nvfp4(1)(n), _nvfp4(2)(n)]
        return rms, ln, hf

    args = (x, w32, b32)
    out, record = _compile_linted(fn, *args)
    assert dict(record.matches) == {} and record.producer_copies == 0
    assert dict(fusion.fusion_pass().copy_counts) == {"fused": 0, "undone": 2 + 1 + 1}
    assert record.after == record.before
    with torch.no_grad():
        expected = fn(*args)
    for got, want in zip(out, expected):
        for a, e in zip(got, want):
            assert_fp4_close(a, e, 16, min_identical=0.5)


def _variance_graph(square_other_user: bool, other_factor: bool) -> torch.fx.Graph:
    aten = torch.ops.aten

    def fn(h, g):
        sq = aten.mul.Tensor(h, g if other_factor else h)
        mean = aten.mean.dim(sq, [-1], True)
        return (mean, sq) if square_other_user else mean

    return torch.fx.symbolic_trace(fn).graph


@pytest.mark.parametrize(
    "square_other_user,other_factor,rewritten",
    [(False, False, True), (True, False, False), (False, True, False)],
    ids=["variance", "square_read_elsewhere", "product_of_two"],
)
def test_canonicalize_variances_rewrites_only_a_square_read_by_means(square_other_user, other_factor, rewritten):
    """h * h read only by a mean becomes pow(h, 2) (the patterns' form, the same bits); a product of two
    tensors, or a square with another reader, is left as written."""
    from fp4op.fusion.pass_manager import canonicalize_variances

    graph = _variance_graph(square_other_user, other_factor)
    assert canonicalize_variances(graph) == int(rewritten)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert (torch.ops.aten.pow.Tensor_Scalar in targets) == rewritten
    assert (torch.ops.aten.mul.Tensor in targets) == (not rewritten)
    if rewritten:
        pow_node = next(n for n in graph.nodes if n.target is torch.ops.aten.pow.Tensor_Scalar)
        assert pow_node.args[1] == 2 and pow_node.args[0].op == "placeholder"
