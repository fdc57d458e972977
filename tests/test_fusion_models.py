"""The fusion on models written the way people write them, converted with fp4op.nn.convert; dynamic
shapes; enabling the pass twice or next to a user's own pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass

import fp4op
import fp4op.fusion as fusion
import fp4op.nn as fnn
from conftest import requires_cuda
from fusion_helpers import LlamaRMSNorm, assert_fp4_close, compile_fused, fp4_ops, fresh_compile_config

D, H = 64, 128


class LlamaMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(D, H, bias=False)
        self.up_proj = nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, heads=4):
        super().__init__()
        self.heads = heads
        self.input_layernorm = LlamaRMSNorm(D, eps=1e-5)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.post_attention_layernorm = LlamaRMSNorm(D, eps=1e-5)
        self.mlp = LlamaMLP()

    def forward(self, x):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.o_proj(attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT2MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.c_fc = nn.Linear(D, 4 * D)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * D, D)

    def forward(self, x):
        return x + self.c_proj(self.act(self.c_fc(self.ln(x))))


class FusedGateUpMLP(nn.Module):
    """vLLM style: one gate_up projection, then chunk."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(self.norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class PreLNAttention(nn.Module):
    """ViT / pre-LN encoder attention: one LayerNorm read by separate q, k and v projections."""

    def __init__(self, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D))


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "norm" not in name and "ln" not in name else 1) + ("weight" in name and ("norm" in name or "ln" in name)))
    return model


def _fp4_model(cls, recipe="nvfp4", dtype=torch.bfloat16, device="cpu"):
    model = _randomize(cls()).to(device, dtype).eval()
    reference = _randomize(cls()).to(device, dtype).eval()
    reference.load_state_dict(model.state_dict())
    fnn.convert(model, recipe=recipe)
    x = torch.randn(2, 8, D, dtype=dtype, device=device)
    with torch.no_grad(), fnn.calibrate(model):
        model(x)
    return model, reference


MODELS = {
    "llama_decoder": (LlamaDecoderLayer, {"rms_norm_quantize[hf]": 1, "add_rms_norm_quantize[hf]": 1, "silu_and_mul_quantize[silu]": 1}),
    "gpt2_mlp": (GPT2MLP, {"layer_norm_quantize[weight,bias]": 1, "gelu_quantize[gelu_tanh]": 1}),
    "fused_gate_up": (FusedGateUpMLP, {"rms_norm_quantize[torch]": 1, "silu_and_mul_quantize[silu]": 1}),
    "preln_attention": (PreLNAttention, {"layer_norm_quantize[weight,bias]": 1}),
}


@pytest.mark.parametrize(
    "name,recipe,dtype,device",
    [
        ("llama_decoder", "nvfp4", torch.bfloat16, "cpu"),
        ("gpt2_mlp", "nvfp4", torch.float16, "cpu"),
        ("fused_gate_up", "mxfp4", torch.bfloat16, "cpu"),
        pytest.param("llama_decoder", "nvfp4", torch.bfloat16, "cuda", marks=requires_cuda),
        pytest.param("gpt2_mlp", "mxfp4", torch.bfloat16, "cuda", marks=requires_cuda),
    ],
)
def test_model_fuses(name, recipe, dtype, device):
    cls, expected = MODELS[name]
    model, reference = _fp4_model(cls, recipe, dtype, device)
    x = torch.randn(3, 8, D, dtype=dtype, device=device)
    out, record = compile_fused(model, x)
    assert dict(record.matches) == expected
    assert "fp4op.quantize.default" not in record.after or name == "llama_decoder"
    if name == "llama_decoder":
        assert record.after["fp4op.quantize.default"] == 1  # o_proj: its input comes from attention
    with torch.no_grad():
        eager = model(x)
        full = reference(x)
    torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05)
    # FP4 model vs the bf16/fp16 model: the error of 4-bit weights and activations
    assert ((eager.float() - full.float()).norm() / full.float().norm()).item() < 0.25


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_dynamic_shapes_no_recompile(device):
    model, _ = _fp4_model(FusedGateUpMLP, device=device)
    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, dynamic=True, options=fusion.compile_options())
        for m in (5, 17, 40):
            x = torch.randn(m, D, dtype=torch.bfloat16, device=device)
            torch.testing.assert_close(compiled(x), model(x), rtol=0.05, atol=0.05)
        assert len(fusion.fusion_pass().records) == 1  # compiled once for every M
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        torch_counters = dict(torch._dynamo.utils.counters["fp4op_fusion"])
    assert frames == 1
    assert fusion.match_counts() == {"rms_norm_quantize[torch]": 1, "silu_and_mul_quantize[silu]": 1}
    assert torch_counters == fusion.match_counts()


class CountingPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass-v1"


def test_enable_twice_and_with_user_pass():
    model, _ = _fp4_model(GPT2MLP)
    user = CountingPass()
    x = torch.randn(4, D, dtype=torch.bfloat16)
    with torch._inductor.config.patch(post_grad_custom_post_pass=user):
        with fusion.enabled(), fusion.enabled():
            configured = torch._inductor.config.post_grad_custom_post_pass
            # one composed pass: the user's, then fp4op's once
            assert isinstance(configured, fusion.ComposedPass)
            assert configured.passes == (user, fusion.fusion_pass())
            assert configured.uuid() == ("fp4op.ComposedPass", "counting-pass-v1", fusion.fusion_pass().uuid())
            fusion.reset()
            with fresh_compile_config(), torch.no_grad():
                torch.compile(model)(x)
        assert torch._inductor.config.post_grad_custom_post_pass is user  # restored
        assert user.calls == 1
        assert sum(fusion.match_counts().values()) == 2
        # compile_options composes with the configured pass too (and with a list of passes)
        options = fusion.compile_options(existing_pass=[CountingPass()])
        assert len(options["post_grad_custom_post_pass"].passes) == 3
    # a plain function as user pass: the composition has no uuid, so Inductor will not cache
    assert fusion.post_grad_pass(lambda g: None).uuid() is None
    assert fusion.post_grad_pass(None) is fusion.fusion_pass()


def test_rules_registered_once():
    p = fusion.FusionPass()
    q = fusion.QuantizeArgs()
    count = lambda: sum(len(v) for v in p.patterns.patterns.values())  # noqa: E731
    # a graph whose quantized values have no other reader: the rules that keep the norm output wait
    p._ensure_registered(q, "cpu", read_elsewhere=False)
    assert count() == sum(not r.keep_normed for r in fusion.all_rules())
    p._ensure_registered(q, "cpu")
    n = count()
    p._ensure_registered(q, "cpu")
    assert count() == n == len(fusion.all_rules())


def test_identical_quantizes_merge_then_fuse():
    """Two layers quantizing one norm output with the same scale (q/k/v, gate/up with tied static scales)
    become one quantize, which then fuses with the norm."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def two_consumers(x, w, gs):
        h = F.rms_norm(x, (D,), w, 1e-6)
        a, sa = torch.ops.fp4op.quantize(h, gs, 16, False)
        b, sb = torch.ops.fp4op.quantize(h, gs)
        return a, sa, b, sb

    args = (torch.randn(8, D, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16), torch.tensor([50.0]))
    # a post-grad-like graph: decomposed, then functional
    decomposed = make_fx(two_consumers, select_decomp_table(), tracing_mode="fake")(*args)
    gm = make_fx(torch.func.functionalize(decomposed, remove="mutations"), tracing_mode="fake")(*args)
    p = fusion.FusionPass()
    p(gm.graph)
    gm.recompile()
    assert fp4_ops(p.records[-1].before) == {"fp4op.quantize.default": 2}
    assert fp4_ops(p.records[-1].after) == {"fp4op.rms_norm_quantize.default": 1}
    a, sa, b, sb = gm(*args)
    assert torch.equal(a, b) and torch.equal(sa, sb)


@pytest.mark.parametrize("enable_pdl", [True, False])
def test_enable_pdl_given_explicitly(enable_pdl):
    """fp4_quantize(..., enable_pdl=...) (vLLM passes it) still fuses after a norm; a quantize that does
    not fuse keeps its enable_pdl."""

    def block(x, w, gs):
        h = F.rms_norm(x, (D,), w, 1e-6)
        fused = fp4op.fp4_quantize(h, gs, enable_pdl=enable_pdl)
        plain = fp4op.fp4_quantize(x * 2, gs, enable_pdl=enable_pdl)
        return (*fused, *plain)

    args = (torch.randn(8, D, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16), torch.tensor([50.0]))
    out, record = compile_fused(block, *args)
    assert fp4_ops(record.before) == {"fp4op.quantize.default": 2}
    assert fp4_ops(record.after) == {"fp4op.rms_norm_quantize.default": 1, "fp4op.quantize.default": 1}
    assert sum(record.matches.values()) == 1
    for a, e in zip(out, block(*args)):
        assert torch.equal(a, e)


def test_restore_launch_options_keeps_enable_pdl():
    from torch.fx.experimental.proxy_tensor import make_fx

    def plain(x, gs):
        return torch.ops.fp4op.quantize(x, gs, 16, False, True, False, False, False)

    gm = make_fx(plain, tracing_mode="fake")(torch.randn(8, D, dtype=torch.bfloat16), torch.tensor([50.0]))
    fusion.FusionPass()(gm.graph)
    (node,) = gm.graph.find_nodes(op="call_function", target=torch.ops.fp4op.quantize.default)
    assert node.args[1:] == (node.args[1], 16, False, True, False, False, False) and not node.kwargs


def test_module_reload_keeps_one_fusion_pass():
    """After reloading fp4op.fusion, composing with a pass object of the old module replaces it."""
    import importlib

    old = fusion.fusion_pass()
    user = CountingPass()
    configured = fusion.post_grad_pass([user, old])
    importlib.reload(fusion.pass_manager)
    importlib.reload(fusion)
    new = fusion.post_grad_pass(configured)
    assert new.passes == (user, fusion.fusion_pass()) and fusion.fusion_pass() is not old


def test_fx_graph_cache_keys_on_the_pass():
    """With Inductor's FX graph cache on: a recompile with the fusion hits the cache (the pass does not
    run again, the cached code is the fused one); a compile without the fusion must not reuse it."""
    fresh_cache = getattr(torch._inductor.utils, "fresh_cache", None) or torch._inductor.utils.fresh_inductor_cache
    gs = torch.tensor([100.0])

    def fn(x, w):
        return torch.ops.fp4op.quantize(F.rms_norm(x, (D,), w, 1e-6), gs)

    args = (torch.randn(8, D, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16))
    counters = torch._dynamo.utils.counters
    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True), torch.no_grad():
        results = []
        for options in (fusion.compile_options(), fusion.compile_options(), None):
            torch._dynamo.reset()
            counters.clear()
            fusion.reset()
            results.append(torch.compile(fn, options=options)(*args))
            results[-1] = (results[-1], dict(counters["inductor"]), len(fusion.fusion_pass().records))
    (first, c1, r1), (second, c2, r2), (plain, c3, r3) = results
    assert c1.get("fxgraph_cache_miss") == 1 and r1 == 1
    assert c2.get("fxgraph_cache_hit") == 1 and r2 == 0  # cached fused code, pass not rerun
    assert c3.get("fxgraph_cache_miss") == 1 and r3 == 0  # another key: compiled without the pass
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    torch._dynamo.reset()


class BranchyBlock(nn.Module):
    """A data-dependent branch between two norm/activation + quantize chains: a graph break."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(D, eps=1e-5)

    def forward(self, x, gs):
        q_norm = fp4op.fp4_quantize(self.norm(x), gs)
        y = F.silu(x) if x.sum() > 0 else F.gelu(x, approximate="tanh")
        return q_norm, torch.ops.fp4op.quantize(y, gs, 16, False, True, False, False)


def _compile_both_branches(model, gs):
    """Compiles `model` (branching on the sign of its input's sum) with the fusion, runs both sides of the
    branch and checks them against eager under the fused acceptance rule."""
    x = torch.randn(8, D, dtype=torch.bfloat16)
    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        compiled = torch.compile(model, options=fusion.compile_options())
        for sample in (x.abs(), -x.abs()):  # both sides of the branch
            got, want = compiled(sample, gs), model(sample, gs)
            for g, w in zip(got, want):
                assert_fp4_close(g, w)


def test_graph_breaks_keep_fusion_and_results():
    model = BranchyBlock().to(torch.bfloat16)
    _compile_both_branches(model, torch.tensor([500.0]))
    counts = fusion.match_counts()
    assert any(k.startswith("rms_norm_quantize") and v for k, v in counts.items()), counts
    assert any(k.startswith(("silu_quantize", "gelu_quantize")) and v for k, v in counts.items()), counts


class NormBranchQuantize(nn.Module):
    """A data-dependent branch between a norm and the quantize of its output: the norm ends the first
    graph and its quantize starts the next one, so that chain cannot fuse; the activation chain after
    the break can."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, gs):
        h = self.norm(x)
        if x.sum() > 0:  # control flow on a tensor value: a graph break
            h = h * 0.5
        return fp4op.fp4_quantize(h, gs), fp4op.fp4_quantize(F.silu(h), gs)


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_branch_between_norm_and_quantize(norm):
    model = _randomize(NormBranchQuantize(nn.RMSNorm(D, eps=1e-6) if norm == "rms_norm" else nn.LayerNorm(D)))
    model = model.to(torch.bfloat16)
    _compile_both_branches(model, torch.tensor([300.0]))
    # three graphs: the norm and the condition, then one resumed graph per side of the branch; the norm
    # chain is cut, the silu chain fuses in each resumed graph
    assert len(fusion.fusion_pass().records) == 3
    assert {k: v for k, v in fusion.match_counts().items() if v} == {"silu_quantize[silu]": 2}


class BrokenMLPBlock(nn.Module):
    """A norm + gated MLP block with a print or an explicit graph break between the gate/up projection
    and the activation."""

    def __init__(self, brk, norm, act):
        super().__init__()
        self.brk, self.act = brk, act
        self.norm = LlamaRMSNorm(D, eps=1e-5) if norm == "hf_rms_norm" else nn.LayerNorm(D)
        self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(self.norm(x)).chunk(2, dim=-1)
        if self.brk == "print":
            print("fp4op test: a print in the middle of a block", tuple(x.shape))
        else:
            torch._dynamo.graph_break()
        act = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return x + self.down_proj(act * up)


@pytest.mark.parametrize(
    "brk,norm,act,expected",
    [
        ("graph_break", "hf_rms_norm", "silu", {"rms_norm_quantize[hf]": 1, "silu_and_mul_quantize[silu]": 1}),
        ("print", "layer_norm", "gelu_tanh",
         {"layer_norm_quantize[weight,bias]": 1, "gelu_and_mul_quantize[gelu_tanh]": 1}),
    ],
)
def test_graph_break_inside_block(brk, norm, act, expected):
    model, reference = _fp4_model(lambda: BrokenMLPBlock(brk, norm, act))
    x = torch.randn(3, 8, D, dtype=torch.bfloat16)
    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        out = torch.compile(model, options=fusion.compile_options())(x)
        eager, full = model(x), reference(x)
    assert len(fusion.fusion_pass().records) == 2  # one graph before the break, one after
    assert {k: v for k, v in fusion.match_counts().items() if v} == expected
    torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05)
    assert ((eager.float() - full.float()).norm() / full.float().norm()).item() < 0.25


def _fp4_model_calibrated_under_autocast(cls, model_dtype, device):
    model = _randomize(cls()).to(device, model_dtype).eval()
    fnn.convert(model, recipe="nvfp4")  # float32 weights quantized from bfloat16, the autocast dtype
    with torch.no_grad(), fnn.calibrate(model), torch.autocast(device, dtype=torch.bfloat16):
        model(torch.randn(2, 8, D, dtype=model_dtype, device=device))
    return model


# name, model dtype: (fused ops expected, quantizes left). A bfloat16 model under CUDA autocast runs
# LayerNorm in float32 (x, weight and bias upcast) and FP4Linear casts that output back to bfloat16 as
# nn.Linear would: the float32 LayerNorm rule fuses it (on CPU autocast LayerNorm stays in bfloat16).
# A float32 model's norms run in float32 on float32 activations, which no fused kernel takes: only the
# activation, on a bfloat16 FP4Linear output, fuses.
AUTOCAST_MODELS = {
    ("llama_decoder", torch.bfloat16): (3, 1),
    ("gpt2_mlp", torch.bfloat16): (2, 0),
    ("gpt2_mlp", torch.float32): (1, 1),
    # q, k and v cast the float32 LayerNorm output each: the casts merge, the tied scales make their
    # quantizes one, which fuses with the norm
    ("preln_attention", torch.bfloat16): (1, 1),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("name,model_dtype", list(AUTOCAST_MODELS))
def test_model_under_autocast(name, model_dtype, device):
    cls, _ = MODELS[name]
    fused, left = AUTOCAST_MODELS[(name, model_dtype)]
    model = _fp4_model_calibrated_under_autocast(cls, model_dtype, device)
    x = torch.randn(3, 8, D, dtype=model_dtype, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, record = compile_fused(model, x)
        with torch.no_grad():
            eager = model(x)
    assert sum(record.matches.values()) == fused, dict(record.matches)
    assert record.after.get("fp4op.quantize.default", 0) == left
    if device == "cuda" and name in ("gpt2_mlp", "preln_attention") and model_dtype == torch.bfloat16:
        assert record.matches["layer_norm_quantize[weight,bias,float32]"] == 1
    assert out.dtype == eager.dtype
    torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05)


@requires_cuda
def test_cuda_graphs_reduce_overhead():
    # mode="reduce-overhead" (CUDA graphs) takes no options: the fusion comes through fusion.enabled()
    model, _ = _fp4_model(LlamaDecoderLayer, device="cuda")
    fusion.reset()
    torch._dynamo.utils.counters.clear()
    with fresh_compile_config(), torch.no_grad(), fusion.enabled():
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(4):  # warm-up, recording, replays
            x = torch.randn(3, 8, D, dtype=torch.bfloat16, device="cuda")
            out = compiled(x).clone()
            torch.testing.assert_close(out, model(x), rtol=0.05, atol=0.05)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert fusion.match_counts() == MODELS["llama_decoder"][1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_training_graph_keeps_every_gradient(device):
    # Training through FP4 layers (trainable norm weights, or adapters): a norm output that needs its
    # gradient (FP4Linear passes x's gradient straight through its quantize) must stay in the graph, so
    # the compiled model's gradients are eager's; the activations after FP4 layers still fuse.
    torch.manual_seed(0)
    model, _ = _fp4_model(LlamaDecoderLayer, device=device)
    x = torch.randn(3, 8, D, dtype=torch.bfloat16, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params  # the norm weights

    def grads(fn):
        xg = x.clone().requires_grad_(True)
        out = fn(xg)
        return (out, *torch.autograd.grad(out.float().square().sum(), [xg, *params]))

    eager = grads(model)
    fusion.reset()
    # Inductor's unfused norms rounded as eager's (else a rounding apart flips FP4 codes)
    with fresh_compile_config(), torch._inductor.config.patch(emulate_precision_casts=True):
        compiled = grads(torch.compile(model, options=fusion.compile_options()))
    for got, want in zip(compiled, eager):
        # relative L2 distance: torch 2.11's Inductor rounds its unfused norms unlike eager even so, which
        # flips FP4 codes (0.08 apart there, 0 on torch 2.14); a lost gradient path leaves zeros or
        # unrelated values (1 or more apart)
        assert got.abs().sum() > 0
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 0.25
    counts = fusion.match_counts()
    assert not any(k.startswith(("rms_norm", "add_rms_norm")) for k in counts), counts
    assert counts.get("silu_and_mul_quantize[silu]") == 1


class Float32LayerNormQKV(nn.Module):
    """A LayerNorm computed in float32 from bf16 (fairseq / open_clip's form, or CUDA autocast's) whose
    float32 output q, k and v each receive: each FP4Linear casts it to bfloat16 itself."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x):
        h = F.layer_norm(x.float(), (D,), self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)
        return self.q(h) + self.k(h) * self.v(h)


def test_layers_casting_one_float32_norm_output_share_its_fused_quantize():
    # the three casts of one tensor count as one input: with their tied scales the three quantizes are
    # one, which the float32 LayerNorm rule fuses (instead of three quantizes and an unfused norm)
    model = _randomize(Float32LayerNormQKV()).to(torch.bfloat16).eval()
    fnn.convert(model)
    x = torch.randn(2, 8, D, dtype=torch.bfloat16)
    with torch.no_grad(), fnn.calibrate(model):
        model(x)
    assert model.q.input_global_scale is model.k.input_global_scale is model.v.input_global_scale
    out, record = compile_fused(model, x)
    assert dict(record.matches) == {"layer_norm_quantize[weight,bias,float32]": 1}
    assert "fp4op.quantize.default" not in record.after
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0.05, atol=0.05)


class BertLayerFFN(nn.Module):
    """transformers BertSelfOutput + BertIntermediate + BertOutput (post-LN): each LayerNorm output is read
    by the next dense layer and is the next residual."""

    def __init__(self):
        super().__init__()
        self.attention_dense = nn.Linear(D, D)
        self.attention_norm = nn.LayerNorm(D, eps=1e-12)
        self.intermediate = nn.Linear(D, 4 * D)
        self.output_dense = nn.Linear(4 * D, D)
        self.output_norm = nn.LayerNorm(D, eps=1e-12)

    def forward(self, hidden_states, input_tensor):
        attention_output = self.attention_norm(self.attention_dense(hidden_states) + input_tensor)
        intermediate = F.gelu(self.intermediate(attention_output))
        return self.output_norm(self.output_dense(intermediate) + attention_output)


def _post_ln_encoder():
    # PyTorch's default norm_first=False: norm1's output feeds linear1 and the second residual add
    return nn.TransformerEncoderLayer(D, 4, 2 * D, dropout=0.0, batch_first=True)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("bert", {"layer_norm_quantize_with_normed[weight,bias]": 1, "gelu_quantize[gelu]": 1}),
        ("encoder_layer", {"layer_norm_quantize_with_normed[weight,bias]": 1, "relu_quantize[relu]": 1}),
    ],
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_post_ln_models_fuse_their_norms(name, expected, device):
    """Post-LN blocks (BERT, nn.TransformerEncoderLayer's default): the LayerNorm read by the next FP4
    layer and by the next residual add fuses into layer_norm_quantize_with_normed; the compiled model
    equals the compiled model without the fusion bit for bit (both round as eager with
    emulate_precision_casts; the fused op's statistics are exact where Inductor's are too)."""
    torch.manual_seed(0)
    model = (BertLayerFFN() if name == "bert" else _post_ln_encoder()).to(device, torch.bfloat16).eval()
    fnn.convert(model)
    args = [torch.randn(2, 8, D, dtype=torch.bfloat16, device=device) for _ in range(2 if name == "bert" else 1)]
    with torch.no_grad(), fnn.calibrate(model):
        model(*args)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # MHA's native fast path is not its compiled form
    try:
        with torch._inductor.config.patch(emulate_precision_casts=True):
            out, record = compile_fused(model, *args)
            with fresh_compile_config(), torch.no_grad():
                plain = torch.compile(model)(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert dict(record.matches) == expected
    ops = fp4_ops(record.after)
    assert ops["fp4op.layer_norm_quantize_with_normed.default"] == 1, ops
    # one of the two LayerNorms is gone (the second one's output is the block's output only)
    assert record.after["aten.var_mean.correction"] == record.before["aten.var_mean.correction"] - 1
    assert torch.equal(out, plain)


class MoEBlock(nn.Module):
    """A transformers v5-style sparse MoE half-layer: residual add, post_attention_layernorm, the router gate
    (nn.Linear, converted) and experts held as 3-D parameters (fused gate_up / down, not nn.Linear: left as
    they are), computed for every token and weighted by the top-2 routing. The norm output is read by the
    gate's quantize and by the experts."""

    def __init__(self, experts=4, inter=32):
        super().__init__()
        self.post_attention_layernorm = LlamaRMSNorm(D)
        self.gate = nn.Linear(D, experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, D, 2 * inter) * 0.05)
        self.down_proj = nn.Parameter(torch.randn(experts, inter, D) * 0.05)

    def forward(self, hidden_states, attn_output):
        hidden_states = hidden_states + attn_output
        residual = hidden_states
        h = self.post_attention_layernorm(hidden_states)
        logits = self.gate(h)
        top_w, top_i = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), 2, dim=-1)
        routing = torch.zeros_like(logits, dtype=torch.float).scatter(-1, top_i, top_w).to(h.dtype)
        gate, up = torch.einsum("btd,edi->ebti", h, self.gate_up_proj).chunk(2, dim=-1)
        expert_out = torch.einsum("ebti,eid->ebtd", F.silu(gate) * up, self.down_proj)
        return residual + torch.einsum("ebtd,bte->btd", expert_out, routing)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_moe_router_norm_fuses_keeping_its_output(device):
    """The norm after the residual add, read by the router gate (quantized) and by the experts, fuses into
    add_rms_norm_quantize_with_normed; the experts read its norm output, the next residual its sum."""
    torch.manual_seed(0)
    model = MoEBlock().to(device, torch.bfloat16).eval()
    fnn.convert(model)
    args = [torch.randn(2, 8, D, dtype=torch.bfloat16, device=device) for _ in range(2)]
    with torch.no_grad(), fnn.calibrate(model):
        model(*args)
    out, record = compile_fused(model, *args)
    assert dict(record.matches) == {"add_rms_norm_quantize_with_normed[hf]": 1}
    ops = fp4_ops(record.after)
    assert ops["fp4op.add_rms_norm_quantize_with_normed.default"] == 1 and "fp4op.quantize.default" not in ops, ops
    with torch.no_grad():
        eager = model(*args)
    torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05)


class Olmo2RMSNorm(LlamaRMSNorm):
    """transformers' Olmo2RMSNorm: LlamaRMSNorm's statistic, the weight times the float32 norm (rounded once)."""

    def forward(self, hidden_states):
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(hidden_states.dtype)


class Olmo2DecoderLayer(nn.Module):
    """transformers' Olmo2DecoderLayer (without its q/k norms): post-norms, whose outputs are added to the
    residual stream; that sum feeds the MLP's projections and is the next residual."""

    def __init__(self, heads=4):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.post_attention_layernorm = Olmo2RMSNorm(D)
        self.mlp = LlamaMLP()
        self.post_feedforward_layernorm = Olmo2RMSNorm(D)

    def forward(self, hidden_states):
        b, t, _ = hidden_states.shape
        residual = hidden_states
        q, k, v = (p(hidden_states).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        hidden_states = self.post_attention_layernorm(self.o_proj(attn))
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_olmo2_post_norm_residual_fuses(device, dynamic):
    """OLMo2's `residual + post_attention_layernorm(attn)`, read by the MLP's gate/up projections and by the
    last residual add, fuses into rms_norm_add_quantize (its sum is the next residual)."""
    torch.manual_seed(0)
    model = Olmo2DecoderLayer().to(device, torch.bfloat16).eval()
    with torch.no_grad():
        for norm in (model.post_attention_layernorm, model.post_feedforward_layernorm):
            norm.weight.normal_(1.0, 0.2)
    fnn.convert(model)
    x = torch.randn(2, 8, D, dtype=torch.bfloat16, device=device)
    with torch.no_grad(), fnn.calibrate(model):
        model(x)
    out, record = compile_fused(model, x, dynamic=dynamic)
    matches = dict(record.matches)
    assert matches.pop("rms_norm_add_quantize[olmo2]") == 1, record.matches
    assert all(name.startswith("silu_and_mul_quantize") for name in matches), record.matches
    ops = fp4_ops(record.after)
    # under dynamic=True the module's float eps arrives as a 0-d tensor: the _eps_tensor op
    assert sum(v for k, v in ops.items() if k.startswith("fp4op.rms_norm_add_quantize")) == 1, ops
    with torch.no_grad():
        eager = model(x)
    torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05)



class AdaLayerNormZero(nn.Module):
    """diffusers' AdaLayerNormZero: the conditioning through SiLU and a projection into six [B, D] chunks, the
    norm (no affine) modulated by the first two."""

    def __init__(self, dim=D):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class DiTBlock(nn.Module):
    """A DiT / PixArt transformer block as diffusers writes it: adaLN-Zero, attention with separate q/k/v
    projections of the modulated norm, a GELU(tanh) feed-forward of the second modulated norm."""

    def __init__(self, dim=D, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1 = AdaLayerNormZero(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, hidden_states, emb):
        b, t, d = hidden_states.shape
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb)
        q, k, v = (proj(norm_hidden).view(b, t, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * self.to_out(attn)
        norm_hidden = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_hidden)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_dit_adaln_modulation_fuses(device, dynamic, tied):
    """A DiT block's two modulated norms fuse into layer_norm_modulate_quantize: the first once for q, k and
    v together where their scales are tied (one quantize), once for each where not; the second for the
    feed-forward; the SiLU of the conditioning and the feed-forward's GELU fuse with their quantizes."""
    torch.manual_seed(0)
    model = DiTBlock().to(device, torch.bfloat16).eval()  # nn.Linear's own init: outputs of order 1
    fnn.convert(model)
    x = torch.randn(2, 16, D, dtype=torch.bfloat16, device=device)
    emb = torch.randn(2, D, dtype=torch.bfloat16, device=device)
    with torch.no_grad(), fnn.calibrate(model, tie_siblings=tied):
        model(x, emb)
    out, record = compile_fused(model, x, emb, dynamic=dynamic)
    modulated = 2 if tied else 4
    assert dict(record.matches) == {
        "layer_norm_modulate_quantize[no_affine,norm*multiplier+shift]": modulated,
        "silu_quantize[silu]": 1,
        "gelu_quantize[gelu_tanh]": 1,
    }, record.matches
    ops = fp4_ops(record.after)
    assert ops["fp4op.layer_norm_modulate_quantize.default"] == modulated, ops
    assert ops["fp4op.quantize.default"] == 1, ops  # the attention output's, before to_out
    with torch.no_grad():
        eager = model(x, emb)
    torch.testing.assert_close(out, eager, rtol=0.05, atol=0.05)
