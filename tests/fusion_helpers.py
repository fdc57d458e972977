"""Shared helpers of the fusion tests: compile with the fusion pass (caches off, so the pass runs on
every compile), read what it did, and compare FP4 outputs with the fused ops' acceptance rule."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

import fp4op.fusion as fusion
from fp4op import layouts, reference

@contextlib.contextmanager
def fresh_compile_config():
    """No FX graph / autograd cache (a cache hit skips post-grad passes), fresh dynamo state."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ), torch._dynamo.config.patch(cache_size_limit=64):
        yield
    torch._dynamo.reset()


def compile_fused(fn, *args, dynamic=False, **kwargs):
    """Compile `fn` with the fusion enabled and run it once; returns (output, GraphRecord)."""
    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        compiled = torch.compile(fn, dynamic=dynamic, options=fusion.compile_options())
        out = compiled(*args, **kwargs)
    return out, fusion.last_record()


def fp4_ops(counts) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k.startswith("fp4op.")}


def _e2m1_index(codes: torch.Tensor) -> torch.Tensor:
    """Signed position of each E2M1 code on the number line (..., -1, 0, 1, ...)."""
    mag = (codes & 7).to(torch.int16)
    return torch.where((codes & 8) != 0, -mag, mag)


def assert_fp4_close(actual, expected, sf_vec_size=16, layout=layouts.SWIZZLED_128x4, min_identical=0.999):
    """The fused ops' acceptance rule: >= 99.9% of blocks (scale byte and codes) identical, and no
    element more than one E2M1 step off where the block scale agrees; with a different block scale the
    dequantized values differ by at most one step of the larger scale."""
    (aq, asf), (eq, esf) = actual[:2], expected[:2]
    assert aq.shape == eq.shape and asf.shape == esf.shape, (aq.shape, eq.shape, asf.shape, esf.shape)
    if aq.numel() == 0:  # no blocks (M = 0 or K = 0): only the sf padding, all zeros
        assert torch.equal(asf, esf)
        return
    k = aq.shape[-1] * 2
    m = aq.numel() * 2 // k
    nk = k // sf_vec_size
    a_scale = layouts.unswizzle(asf, m, nk, layout)
    e_scale = layouts.unswizzle(esf, m, nk, layout)
    unpack = lambda q: torch.stack((q & 0xF, q >> 4), -1).reshape(m, nk, sf_vec_size)  # noqa: E731
    a_codes, e_codes = unpack(aq.reshape(m, -1)), unpack(eq.reshape(m, -1))
    same_block = (a_scale == e_scale) & (a_codes == e_codes).all(-1)
    assert same_block.float().mean().item() >= min_identical, f"only {same_block.float().mean():.4%} blocks identical"
    step = (_e2m1_index(a_codes) - _e2m1_index(e_codes)).abs()
    assert step[a_scale == e_scale].max().item() <= 1 if (a_scale == e_scale).any() else True
    if not (a_scale == e_scale).all():
        fa = reference.e4m3_to_float(a_scale) if sf_vec_size == 16 else reference.pow2(a_scale.to(torch.int32) - 127)
        fe = reference.e4m3_to_float(e_scale) if sf_vec_size == 16 else reference.pow2(e_scale.to(torch.int32) - 127)
        da = reference.e2m1_to_float(a_codes) * fa.unsqueeze(-1)
        de = reference.e2m1_to_float(e_codes) * fe.unsqueeze(-1)
        bound = 2.0 * torch.maximum(fa, fe).unsqueeze(-1)  # the largest E2M1 step is 2
        assert ((da - de).abs() <= bound).all()


def assert_same_outputs(actual, expected):
    for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        if a.dtype == torch.uint8:
            continue  # FP4 pairs are compared with assert_fp4_close
        assert torch.equal(a, e)


class LlamaRMSNorm(nn.Module):
    """transformers LlamaRMSNorm (also Mistral, Qwen2, Qwen3 incl. q_norm/k_norm, Phi-3)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)
