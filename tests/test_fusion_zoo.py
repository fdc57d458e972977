"""The fusion on a zoo of models written the way their authors write them (in the spirit of Hugging Face
transformers, nanoGPT, diffusers, vLLM and the reference Llama/Mistral code), converted with
fp4op.nn.convert and calibrated: the rules that must fire do (per-rule match counts), the ones that must
not don't, and every activation quantize of the compiled model equals the uncompiled converted model's
under the fused ops' acceptance rule.

How the numerics are checked: every FP4Linear records the (x_q, sf) of its input (`TapLinear`: a second,
identical quantize, which the pass merges with the layer's own, so the recorded pair is the fused op's
output). Inductor's own code for what is not fused (attention, RoPE, residual adds) rounds like eager with
``emulate_precision_casts``, so each recorded quantize sees the same input as eager's and is compared with
`assert_fp4_close`; the model outputs are compared with a tolerance.

To keep CPU compile time low, each case compiles one container of several models (each on its own
input) and the expected match counts are the sums over its models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.torch_version import TorchVersion

import fp4op.fusion as fusion
import fp4op.nn as fnn
from fusion_helpers import LlamaRMSNorm, assert_fp4_close, fp4_ops, fresh_compile_config

from fp4op.fusion.rms_norm import FORMS as RMS_FORMS
from fp4op.fusion.rms_norm import rms_norm_forms

D, H, HEADS = 128, 256, 4  # hidden, intermediate, heads (head_dim 32)
TOKENS = (4, 32)  # (batch, seq): 128 rows, 1024 NVFP4 blocks a tap of width D

# ---- norms ---------------------------------------------------------------------------------------------


class GemmaRMSNorm(nn.Module):
    """transformers Gemma/Gemma2/Gemma3 RMSNorm (zero-initialised weight, 1 + weight in float32)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5LayerNorm(nn.Module):
    """transformers T5LayerNorm: the bf16/fp16 input times the float32 rsqrt."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class ReferenceRMSNorm(nn.Module):
    """The reference Llama / Mistral code (and torchtune): the weight multiplies on the right."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


class OlmoLayerNorm(nn.Module):
    """transformers OLMo: non-affine LayerNorm computed in float32."""

    def __init__(self, hidden_size):
        super().__init__()
        self.normalized_shape = (hidden_size,)

    def forward(self, hidden_states):
        orig_dtype = hidden_states.dtype
        return F.layer_norm(hidden_states.to(dtype=torch.float32), self.normalized_shape, None, None, eps=1e-5).to(
            orig_dtype
        )


class NanoGPTLayerNorm(nn.Module):
    """nanoGPT: LayerNorm with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


# ---- attention and MLPs --------------------------------------------------------------------------------


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, head_dim):
    t = q.shape[-2]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=q.device) / head_dim))
    freqs = torch.outer(torch.arange(t, dtype=torch.float32, device=q.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    """Llama-style attention: q/k/v projections (or one fused qkv), optional q_norm/k_norm on the head dim
    (Qwen3, Gemma3), optional RoPE, SDPA, o_proj."""

    def __init__(self, qk_norm=None, bias=False, fused_qkv=False, rope=False):
        super().__init__()
        self.head_dim = D // HEADS
        self.fused_qkv, self.rope = fused_qkv, rope
        if fused_qkv:
            self.qkv_proj = nn.Linear(D, 3 * D, bias=bias)
        else:
            self.q_proj = nn.Linear(D, D, bias=bias)
            self.k_proj = nn.Linear(D, D, bias=bias)
            self.v_proj = nn.Linear(D, D, bias=bias)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.q_norm = qk_norm(self.head_dim) if qk_norm else None
        self.k_norm = qk_norm(self.head_dim) if qk_norm else None

    def forward(self, hidden_states):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self.fused_qkv:
            q, k, v = self.qkv_proj(hidden_states).split(D, dim=-1)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rope:
            q, k = apply_rotary_pos_emb(q, k, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, act="silu"):
        super().__init__()
        self.gate_proj = nn.Linear(D, H, bias=False)
        self.up_proj = nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)
        self.act_fn = {"silu": nn.SiLU(), "gelu_tanh": nn.GELU(approximate="tanh")}[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Phi3MLP(nn.Module):
    """transformers Phi-3: one gate_up_proj, chunk, up * act(gate)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)
        self.activation_fn = nn.SiLU()

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)
        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)
        return self.down_proj(up_states)


class VllmMLP(nn.Module):
    """vLLM style: merged gate_up projection, SiluAndMul by slicing."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)

    def forward(self, x):
        x = self.gate_up_proj(x)
        d = x.shape[-1] // 2
        return self.down_proj(F.silu(x[..., :d]) * x[..., d:])


class VllmRMSNorm(nn.Module):
    """vLLM RMSNorm.forward_native: given the residual, the add in float32 (the next residual its rounding,
    the float32 sum normalized), the weight applied in the model dtype."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x, residual=None):
        orig_dtype = x.dtype
        x = x.to(torch.float32)
        if residual is not None:
            x = x + residual.to(torch.float32)
            residual = x.to(orig_dtype)
        variance = x.pow(2).mean(dim=-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        x = x.to(orig_dtype)
        x = x * self.weight
        return x if residual is None else (x, residual)


class VllmLlamaModel(nn.Module):
    """vLLM LlamaModel: the norms take and return the residual (the first input norm has none), the final
    norm's returned residual is dropped."""

    def __init__(self, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {"self_attn": Attention(), "mlp": VllmMLP(),
                 "input_layernorm": VllmRMSNorm(D), "post_attention_layernorm": VllmRMSNorm(D)}
            )
            for _ in range(layers)
        )
        self.norm = VllmRMSNorm(D)
        self.lm_head = nn.Linear(D, 96, bias=False)

    def forward(self, hidden_states):
        residual = None
        for layer in self.layers:
            if residual is None:
                residual = hidden_states
                hidden_states = layer["input_layernorm"](hidden_states)
            else:
                hidden_states, residual = layer["input_layernorm"](hidden_states, residual)
            hidden_states = layer["self_attn"](hidden_states)
            hidden_states, residual = layer["post_attention_layernorm"](hidden_states, residual)
            hidden_states = layer["mlp"](hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return self.lm_head(hidden_states)


class DecoderLayer(nn.Module):
    """transformers Llama/Mistral/Qwen2/Qwen3/Phi-3 decoder layer (pre-norm, residual sum reused)."""

    def __init__(self, norm=LlamaRMSNorm, mlp=LlamaMLP, eps=1e-6, **attention):
        super().__init__()
        self.self_attn = Attention(**attention)
        self.mlp = mlp()
        self.input_layernorm = norm(D, eps=eps)
        self.post_attention_layernorm = norm(D, eps=eps)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states


class Qwen3ForCausalLM(nn.Module):
    """One Llama-style decoder layer with Qwen3's q_norm/k_norm on the head dim and Qwen2's q/k/v biases,
    the final norm and the LM head (the final norm reads the last residual sum). The head reads the last
    token only, as transformers' causal LMs slice it (`logits_to_keep`, 1 in generate()'s prefill)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(eps=1e-5, qk_norm=LlamaRMSNorm, bias=True, rope=True)])
        self.norm = LlamaRMSNorm(D, eps=1e-5)
        self.lm_head = nn.Linear(D, 96, bias=False)

    def forward(self, x, logits_to_keep=1):
        for layer in self.layers:
            x = layer(x)
        hidden_states = self.norm(x)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.lm_head(hidden_states[:, slice_indices, :])


class Gemma2FeedForwardHalf(nn.Module):
    """transformers Gemma2/Gemma3 decoder layer, feed-forward half: sandwich norms (the post-feedforward
    norm feeds the residual add, not a quantize), gelu_pytorch_tanh gated MLP (Gemma3's q_norm/k_norm on the
    head dim: see Qwen3ForCausalLM)."""

    def __init__(self):
        super().__init__()
        self.mlp = LlamaMLP("gelu_tanh")
        self.pre_feedforward_layernorm = GemmaRMSNorm(D)
        self.post_feedforward_layernorm = GemmaRMSNorm(D)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states


class T5LayerFF(nn.Module):
    """transformers T5 v1.1 / Flan-T5 gated-GELU feed-forward layer (dense_act_fn "gelu_new")."""

    def __init__(self):
        super().__init__()
        self.layer_norm = T5LayerNorm(D)
        self.wi_0 = nn.Linear(D, H, bias=False)
        self.wi_1 = nn.Linear(D, H, bias=False)
        self.wo = nn.Linear(H, D, bias=False)
        self.act = NewGELUActivation()

    def forward(self, hidden_states):
        forwarded_states = self.layer_norm(hidden_states)
        hidden_gelu = self.act(self.wi_0(forwarded_states))
        hidden_linear = self.wi_1(forwarded_states)
        return hidden_states + self.wo(hidden_gelu * hidden_linear)


class ReferenceFeedForward(nn.Module):
    """The reference Llama/Mistral FeedForward (w2(silu(w1(x)) * w3(x)))."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(D, H, bias=False)
        self.w2 = nn.Linear(H, D, bias=False)
        self.w3 = nn.Linear(D, H, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PreNormMLPStack(nn.Module):
    """The MLP half of pre-norm decoder layers, twice: x = x + mlp(norm(x)) (the second norm reads the
    residual sum, which is also the next residual). Attention halves are left out to keep compiles short."""

    def __init__(self, norm, mlp, layers=2):
        super().__init__()
        self.norms = nn.ModuleList([norm() for _ in range(layers)])
        self.mlps = nn.ModuleList([mlp() for _ in range(layers)])

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return x


class GPTNeoXLayer(nn.Module):
    """transformers GPT-NeoX parallel residual: two LayerNorms of the same input, exact GELU MLP."""

    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(D, eps=1e-5)
        self.post_attention_layernorm = nn.LayerNorm(D, eps=1e-5)
        self.attention = Attention(bias=True, fused_qkv=True)
        self.dense_h_to_4h = nn.Linear(D, 4 * D)
        self.act = nn.GELU()
        self.dense_4h_to_h = nn.Linear(4 * D, D)

    def forward(self, hidden_states):
        attn_output = self.attention(self.input_layernorm(hidden_states))
        mlp_output = self.dense_4h_to_h(self.act(self.dense_h_to_4h(self.post_attention_layernorm(hidden_states))))
        return mlp_output + attn_output + hidden_states


class NanoGPTMLP(nn.Module):
    """nanoGPT MLP (bias=False): c_fc, exact GELU, c_proj; a Block is x = x + mlp(ln_2(x))."""

    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(D, 4 * D, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * D, D, bias=False)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class GEGLU(nn.Module):
    """diffusers GEGLU: hidden_states * gelu(gate), both halves of one projection."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states):
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class DiffusersFeedForwardBlock(nn.Module):
    """diffusers BasicTransformerBlock feed-forward part with norm_elementwise_affine=False (PixArt)."""

    def __init__(self):
        super().__init__()
        self.norm3 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ff = nn.ModuleList([GEGLU(D, H), nn.Dropout(0.0), nn.Linear(H, D)])

    def forward(self, hidden_states):
        ff_output = self.norm3(hidden_states)
        for module in self.ff:
            ff_output = module(ff_output)
        return ff_output + hidden_states


# ---- models whose norm/activation must NOT fuse -------------------------------------------------------


class Fp32NormWeight(nn.Module):
    """A bf16 model whose norm keeps float32 parameters (model.to(bf16) then norm.float()): the fused
    kernels take weights of the activation dtype only."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        h = self.norm(x)
        return self.q_proj(h) + self.k_proj(h)


class NormOutputReturned(nn.Module):
    """The norm output is also returned (e.g. as a hidden state): a second user."""

    def __init__(self):
        super().__init__()
        self.norm = LlamaRMSNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h), h


class QKVProjections(nn.Module):
    """One norm output read by q/k/v projections (attention left out)."""

    def __init__(self, norm=LlamaRMSNorm):
        super().__init__()
        self.input_layernorm = norm(D)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))

    def forward(self, x):
        h = self.input_layernorm(x)
        return self.q_proj(h) + self.k_proj(h) * self.v_proj(h)


class BertOutputLayer(nn.Module):
    """transformers BERT post-LN: LayerNorm(dense(h) + input) feeds the intermediate dense AND the next
    residual; GELU feeds the output dense."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(D, D)
        self.LayerNorm = nn.LayerNorm(D, eps=1e-12)
        self.intermediate = nn.Linear(D, 4 * D)
        self.output = nn.Linear(4 * D, D)

    def forward(self, hidden_states, input_tensor):
        attention_output = self.LayerNorm(self.dense(hidden_states) + input_tensor)
        return self.output(F.gelu(self.intermediate(attention_output))) + attention_output


class NewGELUActivation(nn.Module):
    """transformers gelu_new (GPT-2): computed op by op in the model dtype, not F.gelu(tanh);
    fp4op.gelu_new_quantize rounds as it does."""

    def forward(self, input):
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class GPT2NewGeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(D, 4 * D), NewGELUActivation(), nn.Linear(4 * D, D)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class QuickGELUActivation(nn.Module):
    """transformers' QuickGELUActivation (CLIP, as OpenAI's and OpenCLIP's QuickGELU write it)."""

    def forward(self, input):
        return input * torch.sigmoid(1.702 * input)


class CLIPMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.activation_fn, self.fc2 = nn.Linear(D, 4 * D), QuickGELUActivation(), nn.Linear(4 * D, D)

    def forward(self, hidden_states):
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class OPTFeedForward(nn.Module):
    """transformers OPTDecoderLayer's feed-forward after final_layer_norm: fc1, ReLU (ACT2FN["relu"]), fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.activation_fn, self.fc2 = nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class SpeedrunMLP(nn.Module):
    """modded-nanogpt's MLP: the squared ReLU (F.relu(x).square()); its blocks norm with F.rms_norm, no weight."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(D, 4 * D, bias=False), nn.Linear(4 * D, D, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class WeightlessRMSNorm(nn.Module):
    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


class ActivationReused(nn.Module):
    """The activation output also feeds something else (an auxiliary statistic)."""

    def __init__(self):
        super().__init__()
        self.mlp = LlamaMLP()

    def forward(self, x):
        act = self.mlp.act_fn(self.mlp.gate_proj(x))
        return self.mlp.down_proj(act * self.mlp.up_proj(x)), act.float().pow(2).mean()


# ---- the harness -----------------------------------------------------------------------------------------

TAPS: list = []


class TapLinear(fnn.FP4Linear):
    """FP4Linear that also records the FP4 pair of its input: the same quantize call as the layer's own
    (merged with it by the pass, so under torch.compile the recorded pair is what the layer consumed)."""

    def forward(self, x):
        out = super().forward(x)
        TAPS.append(torch.ops.fp4op.quantize(x, self._input_global_scale(x, x), self.sf_vec_size, self.sf_use_ue8m0))
        return out


class Zoo(nn.Module):
    """Several models in one compiled graph, each on its own input."""

    def __init__(self, models):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, *inputs):
        return [model(*x) for model, x in zip(self.models, inputs)]


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, (nn.Linear,)):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:  # norm weights around 1 (Gemma: around 0, it adds 1), biases around 0
                base = 1.0 if name.endswith("weight") and not isinstance(owner, GemmaRMSNorm) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model


def _inputs(n_args, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*TOKENS, D, generator=g).to(dtype) for _ in range(n_args))


def _n_args(model):
    return 2 if isinstance(model, BertOutputLayer) else 1


def build_zoo(makers, dtype, recipe, tie_siblings=True, fp32_norms=(), exclude=None, dynamic_scale=()):
    """The models converted (TapLinear) and calibrated; `fp32_norms`: indices of models whose `norm`
    goes back to float32; `exclude`: {index: names left as nn.Linear}; `dynamic_scale`: indices converted
    with activation_scale='dynamic'."""
    models = []
    for i, make in enumerate(makers):
        model = _randomize(make(), seed=i).to(dtype).eval()
        if i in fp32_norms:
            model.norm.float()
        scale = "dynamic" if i in dynamic_scale else "static"
        fnn.convert(model, recipe=recipe, exclude=(exclude or {}).get(i, ()), activation_scale=scale)
        for m in model.modules():
            if type(m) is fnn.FP4Linear:
                m.__class__ = TapLinear
        models.append(model)
    zoo = Zoo(models).eval()
    calibration = [_inputs(_n_args(m), dtype, 100 + i) for i, m in enumerate(models)]
    with torch.no_grad(), fnn.calibrate(zoo, tie_siblings=tie_siblings):
        zoo(*calibration)
    TAPS.clear()
    return zoo


def _grad_mode(mode):
    return {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]()


def run_zoo(zoo, dtype, mode="no_grad", dynamic=False, shapes=(TOKENS,)):
    """Compile `zoo` with the fusion, run it on each token shape next to the uncompiled zoo; returns the
    (compiled, eager) outputs and taps of each run."""
    fusion.reset()
    runs = []
    with fresh_compile_config(), torch._inductor.config.patch(emulate_precision_casts=True), _grad_mode(mode):
        compiled = torch.compile(zoo, dynamic=dynamic, options=fusion.compile_options())
        for k, shape in enumerate(shapes):
            g = torch.Generator().manual_seed(k)
            inputs = [
                tuple(torch.randn(*shape, D, generator=g).to(dtype) for _ in range(_n_args(m))) for m in zoo.models
            ]
            TAPS.clear()
            got = compiled(*inputs)
            got_taps = list(TAPS)
            TAPS.clear()
            want = zoo(*inputs)
            want_taps = list(TAPS)
            TAPS.clear()
            runs.append((got, want, got_taps, want_taps))
    return runs


# torch 2.11's Inductor does not round its own (unfused) code like eager even with emulate_precision_casts:
# there the unfused quantizes of test_zoo_never_fuses differ from eager in about 6% of blocks, and its
# joint-graph pass folds a float32 -> bf16 -> float32 cast chain into nothing (vllm_llama below). The
# per-quantize comparison needs torch 2.14; the fused ops themselves are compared with eager on every
# version (test_fused_ops.py, test_fusion_rules.py, test_fusion_models.py).
INDUCTOR_ROUNDS_LIKE_EAGER = TorchVersion(torch.__version__) >= (2, 14)


def check_numerics(runs, vec, min_identical=0.999):
    for got, want, got_taps, want_taps in runs:
        assert len(got_taps) == len(want_taps) > 0
        if not INDUCTOR_ROUNDS_LIKE_EAGER:
            continue
        for i, (a, e) in enumerate(zip(got_taps, want_taps)):
            try:
                assert_fp4_close(a, e, vec, min_identical=min_identical)
            except AssertionError as err:
                raise AssertionError(f"quantize #{i} of the run: {err}") from None
        for a, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            torch.testing.assert_close(a, e, rtol=0.05, atol=0.05)


def graph_ops():
    counts = {}
    for record in fusion.fusion_pass().records:
        for k, v in fp4_ops(record.after).items():
            counts[k] = counts.get(k, 0) + v
    return counts


def nonzero(counts):
    return {k: v for k, v in counts.items() if v}


# ---- models that fuse ------------------------------------------------------------------------------------

def _stack(norm, mlp, layers=2):
    return lambda: PreNormMLPStack(norm, mlp, layers)


# name: (models, dtype, recipe, grad mode, expected matches (summed over the models), quantizes left)
ZOOS = {
    # Qwen3-style Llama: input_layernorm (q/k/v merged; q_norm/k_norm feed attention, not a quantize),
    # post_attention_layernorm (residual sum reused), final norm (reads the last sum); Phi-3 MLP halves
    # (gate_up chunk, up * act(gate)); nanoGPT MLP halves (LayerNorm bias=False, exact GELU); diffusers
    # GEGLU after a non-affine LayerNorm. Left: the o_proj input (attention output).
    "qwen3_phi3_nanogpt_diffusers": (
        [
            Qwen3ForCausalLM,
            _stack(lambda: LlamaRMSNorm(D, eps=1e-5), Phi3MLP, layers=1),
            _stack(lambda: NanoGPTLayerNorm(D, bias=False), NanoGPTMLP),
            DiffusersFeedForwardBlock,
        ],
        torch.bfloat16, "nvfp4", "no_grad",
        {"rms_norm_quantize[hf]": 2, "add_rms_norm_quantize[hf]": 2, "silu_and_mul_quantize[silu]": 1,
         "silu_and_mul_quantize[silu,up*act]": 1, "layer_norm_quantize[weight]": 2, "gelu_quantize[gelu]": 2,
         "layer_norm_quantize[no_affine]": 1, "gelu_and_mul_quantize[gelu,up*act]": 1},
        1,
    ),
    # Gemma2/3 feed-forward halves (the second pre-feedforward norm reads the residual sum), T5 v1.1
    # gated-GELU FF layers, the reference Llama/Mistral RMSNorm (weight on the right) and FeedForward.
    "gemma2_t5_reference": (
        [
            lambda: nn.Sequential(Gemma2FeedForwardHalf(), Gemma2FeedForwardHalf()),
            lambda: nn.Sequential(T5LayerFF(), T5LayerFF()),
            _stack(lambda: ReferenceRMSNorm(D), ReferenceFeedForward),
        ],
        torch.bfloat16, "nvfp4", "inference_mode",
        {"rms_norm_quantize[gemma]": 1, "add_rms_norm_quantize[gemma]": 1, "gelu_and_mul_quantize[gelu_tanh]": 2,
         "gelu_new_and_mul_quantize[gelu_new]": 2,
         "rms_norm_quantize[t5]": 1, "add_rms_norm_quantize[t5]": 1,
         "rms_norm_quantize[meta]": 1, "add_rms_norm_quantize[meta]": 1, "silu_and_mul_quantize[silu]": 2},
        0,
    ),
    # float16 MXFP4, compiled with grad enabled (eval model with frozen parameters, no no_grad: nothing
    # requires grad, nothing is saved for a backward): GPT-NeoX parallel LayerNorms of one input (fused qkv), OLMo's
    # float32 non-affine LayerNorm, nn.RMSNorm(eps=None) with a vLLM-style sliced SiluAndMul.
    "neox_olmo_vllm_fp16_mxfp4": (
        [GPTNeoXLayer, _stack(lambda: OlmoLayerNorm(D), LlamaMLP), _stack(lambda: nn.RMSNorm(D), VllmMLP)],
        torch.float16, "mxfp4", "grad",
        {"layer_norm_quantize[weight,bias]": 2, "gelu_quantize[gelu]": 1, "layer_norm_quantize[no_affine]": 2,
         "silu_and_mul_quantize[silu]": 4, "rms_norm_quantize[torch]": 1, "add_rms_norm_quantize[torch]": 1},
        1,
    ),
    # GPT-2 MLP halves: nn.LayerNorm, then transformers' gelu_new written out (rounded op by op in
    # float16, as eager), both fused; nothing left.
    "gpt2_gelu_new_fp16": (
        [_stack(lambda: nn.LayerNorm(D), GPT2NewGeluMLP)],
        torch.float16, "nvfp4", "no_grad",
        {"layer_norm_quantize[weight,bias]": 2, "gelu_new_quantize[gelu_new]": 2},
        0,
    ),
    # CLIP encoder MLP halves: nn.LayerNorm, then QuickGELU (x * sigmoid(1.702 * x), rounded op by op in
    # bfloat16, as eager), both fused; nothing left.
    "clip_quick_gelu": (
        [_stack(lambda: nn.LayerNorm(D), CLIPMLP)],
        torch.bfloat16, "nvfp4", "no_grad",
        {"layer_norm_quantize[weight,bias]": 2, "sigmoid_mul_quantize[quick_gelu]": 2},
        0,
    ),
    # OPT feed-forward halves (LayerNorm, fc1, ReLU, fc2) and modded-nanogpt's (weightless F.rms_norm,
    # the second after the residual add, squared ReLU), all fused; nothing left.
    "opt_speedrun_relu": (
        [_stack(lambda: nn.LayerNorm(D), OPTFeedForward), _stack(WeightlessRMSNorm, SpeedrunMLP)],
        torch.bfloat16, "nvfp4", "no_grad",
        {"layer_norm_quantize[weight,bias]": 2, "relu_quantize[relu]": 2, "rms_norm_quantize[torch,no_weight]": 1,
         "add_rms_norm_quantize[torch,no_weight]": 1, "relu_quantize[relu2]": 2},
        0,
    ),
    # vLLM's Llama: the first input norm plain, the three norms after it add the residual in float32
    # (the next residual its rounding), the final one drops that residual; sliced SiluAndMul. Left: the
    # o_proj inputs. (torch 2.11's Inductor folds `s.to(bf16).to(float32)` into `s` in its joint-graph
    # pass `pointless_convert`, dropping the rounding that the residual carries from norm to norm: the
    # compiled model, fused or not, differs from eager there, and only the first norm and the MLPs fuse.)
    "vllm_llama": (
        [VllmLlamaModel],
        torch.bfloat16, "nvfp4", "no_grad",
        {"rms_norm_quantize[meta]": 1, "add_rms_norm_quantize[float32_sum,meta]": 3,
         "add_rms_norm_quantize[float32_sum,meta,sum_unused]": 1, "silu_and_mul_quantize[silu]": 2}
        if INDUCTOR_ROUNDS_LIKE_EAGER
        else {"rms_norm_quantize[meta]": 1, "silu_and_mul_quantize[silu]": 2},
        2 if INDUCTOR_ROUNDS_LIKE_EAGER else 6,
    ),
}


@pytest.mark.parametrize("name", list(ZOOS))
def test_zoo_fuses(name):
    makers, dtype, recipe, mode, expected, left = ZOOS[name]
    zoo = build_zoo(makers, dtype, recipe)
    if mode == "grad":
        # a serving loop without no_grad: grad mode on, nothing requires grad (frozen parameters). (With
        # trainable norm weights the norm outputs need their gradient, FP4Linear's input gradient passes
        # through the quantize, and those norms stay unfused: test_fusion_models.py's training test.)
        zoo.requires_grad_(False)
    runs = run_zoo(zoo, dtype, mode)
    assert nonzero(fusion.match_counts()) == expected
    ops = graph_ops()
    assert ops.get("fp4op.quantize.default", 0) == left, ops
    check_numerics(runs, 32 if recipe == "mxfp4" else 16)


DYNAMIC_SHAPES = ((4, 32), (3, 17), (2, 9))
LLAMA_MLP_STACK = _stack(lambda: LlamaRMSNorm(D), LlamaMLP, layers=1)
LLAMA_MLP_STACK_EXPECTED = {"rms_norm_quantize[hf]": 1, "silu_and_mul_quantize[silu]": 1}


def test_dynamic_shapes_with_specialized_floats():
    """dynamic=True, three batch/sequence shapes, one compile: with Dynamo's float specialization the
    Hugging Face norm's eps attribute stays a constant and the norm fuses with the float-eps op."""
    zoo = build_zoo([LLAMA_MLP_STACK], torch.bfloat16, "nvfp4")
    with torch._dynamo.config.patch(specialize_float=True):
        runs = run_zoo(zoo, torch.bfloat16, dynamic=True, shapes=DYNAMIC_SHAPES)
    assert len(fusion.fusion_pass().records) == 1
    assert nonzero(fusion.match_counts()) == LLAMA_MLP_STACK_EXPECTED
    check_numerics(runs, 16)


@pytest.fixture(scope="module")
def dynamic_default_config():
    zoo = build_zoo([LLAMA_MLP_STACK], torch.bfloat16, "nvfp4")
    runs = run_zoo(zoo, torch.bfloat16, dynamic=True, shapes=DYNAMIC_SHAPES)
    return runs, len(fusion.fusion_pass().records), nonzero(fusion.match_counts()), graph_ops()


def test_dynamic_shapes_float_eps_input_fuses(dynamic_default_config):
    """dynamic=True with Dynamo's defaults: LlamaRMSNorm's float eps becomes a graph input (a 0-d float64
    tensor), which the RMSNorm rules hand to the fused ops' *_eps_tensor variants: every rule fires, one
    graph serves every M, and the results equal eager."""
    runs, n_graphs, counts, ops = dynamic_default_config
    assert n_graphs == 1
    assert counts == LLAMA_MLP_STACK_EXPECTED
    assert "fp4op.rms_norm_quantize_eps_tensor.default" in ops or "fp4op.add_rms_norm_quantize_eps_tensor.default" in ops, ops
    check_numerics(runs, 16)


class EpsAttributeNorms(nn.Module):
    """Every RMSNorm source form, with and without a residual add, each reading its eps from a module
    float attribute (as the Hugging Face modules do), with distinct eps values."""

    def __init__(self):
        super().__init__()
        self.forms = [(form, residual) for form in RMS_FORMS for residual in (False, True)]
        for i in range(len(self.forms)):
            setattr(self, f"eps{i}", 1e-6 * (i + 1) + 3e-7)

    def forward(self, x, r, w):
        outs = []
        for i, (form, residual) in enumerate(self.forms):
            eps = getattr(self, f"eps{i}")
            if residual:
                s = x + r * (i + 1)
                outs.append((*_q(rms_norm_forms(s, w, eps, form)), s))
            else:
                outs.append(_q(rms_norm_forms(x * (i + 1), w, eps, form)))
        return outs


def test_dynamic_shapes_module_eps_every_rms_form():
    """dynamic=True: each form reading a module's float eps fuses (the tensor-eps ops where Dynamo makes eps
    a graph input), one graph for every M, results equal eager."""
    model = EpsAttributeNorms()
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        compiled = torch.compile(model, dynamic=True, options=fusion.compile_options())
        w = rand(K) * 0.2 + 1
        inputs = [(rand(m, K) * 3, rand(m, K), w) for m in (24, 40)]
        results = [(compiled(*args), model(*args)) for args in inputs]
    assert len(fusion.fusion_pass().records) == 1
    want = {}
    for form, residual in model.forms:
        name = f"{'add_' if residual else ''}rms_norm_quantize[{form}]"
        want[name] = want.get(name, 0) + 1
    assert nonzero(fusion.match_counts()) == want
    assert "fp4op.quantize.default" not in graph_ops()
    for got, expected in results:
        for g_out, e_out in zip(got, expected):
            assert_fp4_close(g_out[:2], e_out[:2])
            for a, e in zip(g_out[2:], e_out[2:]):
                assert torch.equal(a, e)


# ---- models that must not fuse -----------------------------------------------------------------------------


def test_zoo_never_fuses():
    """bf16 models with float32 norm parameters (nn.RMSNorm, nn.LayerNorm); an activation output reused;
    an FP4Linear with a dynamic activation scale (its amax reads the norm output, which the fused op
    would have to return before its own quantize could read the scale)."""
    makers = [
        lambda: Fp32NormWeight(nn.RMSNorm(D, eps=1e-6)),
        lambda: Fp32NormWeight(nn.LayerNorm(D)),
        ActivationReused,
        lambda: Fp32NormWeight(LlamaRMSNorm(D)),  # dynamic activation scale (bf16 weight)
    ]
    zoo = build_zoo(makers, torch.bfloat16, "nvfp4", tie_siblings=False, fp32_norms=(0, 1), dynamic_scale=(3,))
    runs = run_zoo(zoo, torch.bfloat16)
    assert nonzero(fusion.match_counts()) == {}
    (record,) = fusion.fusion_pass().records
    for norm_op in ("aten.rsqrt.default", "aten.var_mean.correction", "aten.mean.dim", "aten.pow.Tensor_Scalar"):
        assert record.after[norm_op] == record.before[norm_op], norm_op
    ops = graph_ops()
    assert set(ops) <= {"fp4op.quantize.default", "fp4op.dequantize.default"}, ops
    # the unfused chains are Inductor's own code (not the fused ops' contract): a looser block rule
    check_numerics(runs, 16, min_identical=0.99)


def test_zoo_norm_outputs_read_elsewhere():
    """Norm outputs the model also reads elsewhere come from the *_with_normed ops: a norm output also
    returned (as a hidden state); q/k/v with v_proj left unconverted (convert(exclude=...)) and q/k
    calibrated without tied scales (the plain v_proj reads the norm output; k_proj's quantize reads the
    op's output); BERT post-LN (the LayerNorm output is the next residual too), whose GELU -> output dense
    fuses as a plain activation."""
    makers = [NormOutputReturned, QKVProjections, BertOutputLayer]
    zoo = build_zoo(makers, torch.bfloat16, "nvfp4", tie_siblings=False, exclude={1: ["v_proj"]})
    runs = run_zoo(zoo, torch.bfloat16)
    assert nonzero(fusion.match_counts()) == {
        "rms_norm_quantize_with_normed[hf]": 2,
        "layer_norm_quantize_with_normed[weight,bias]": 1,
        "gelu_quantize[gelu]": 1,
    }
    assert nonzero(fusion.fusion_pass().copy_counts) == {}
    ops = graph_ops()
    assert ops.get("fp4op.quantize.default", 0) == 2, ops  # BERT's dense (its input is an input), k_proj
    for norm_op in ("aten.rsqrt.default", "aten.var_mean.correction", "aten.native_layer_norm.default"):
        assert norm_op not in fusion.fusion_pass().records[-1].after, norm_op
    check_numerics(runs, 16)


# ---- source forms written in other ways ------------------------------------------------------------------

K = D
GS = torch.tensor([448.0 * 6 / 8.0])


def _q(y):
    return torch.ops.fp4op.quantize(y, GS)


def _hf_body(x, variance=lambda h: h.pow(2).mean(-1, keepdim=True), eps=1e-6):
    h = x.float()
    return h * torch.rsqrt(variance(h) + eps)


def _res(norm):
    def chain(x, r, w):
        s = x + r
        return norm(s, w), s

    return chain


def _t5(x, w):
    return T5LayerNorm.forward(_Holder(w, 1e-6), x)


def _gpt_fast(x, w):
    # gpt-fast / torchtitan-style: the variance as a product, the weight on the right
    h = x.float()
    return (h * torch.rsqrt(torch.mean(h * h, dim=-1, keepdim=True) + 1e-5)).type_as(x) * w


def _litgpt(x, w):
    dtype = x.dtype
    x = x.float()
    norm_x = torch.mean(x * x, dim=-1, keepdim=True)
    x_normed = x * torch.rsqrt(norm_x + 1e-5)
    return (x_normed * w.float()).to(dtype=dtype)


def _diffusers(x, w):
    # diffusers' RMSNorm (elementwise_affine with a bf16 weight, or none)
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + 1e-6)
    if w is None:
        return h.to(input_dtype)
    return h.to(w.dtype) * w


def _chatglm(x, w):
    input_dtype = x.dtype
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + 1e-5)
    return (w * h).to(input_dtype)


def _scaled_residual(x, r, w):
    s = torch.add(x, r, alpha=0.5)
    return F.rms_norm(s, (K,), w, 1e-6), s


# (rule expected to fire or None, chain(x, r, w) -> tensor quantized or (tensor, extra outputs))
FORMS = [
    ("rms_norm_quantize[t5]", lambda x, r, w: _t5(x, w)),
    ("add_rms_norm_quantize[t5]", _res(_t5)),
    ("rms_norm_quantize[meta]", lambda x, r, w: _hf_body(x).type_as(x) * w),
    ("add_rms_norm_quantize[meta]", _res(lambda s, w: _hf_body(s).type_as(s) * w)),
    # transformers 4.38 Gemma: (1 + weight) added in the model dtype, after the cast (the "meta" rule with
    # the weight node 1 + w: the same roundings)
    ("rms_norm_quantize[meta]", lambda x, r, w: _hf_body(x).type_as(x) * (1 + w)),
    ("rms_norm_quantize[hf]", lambda x, r, w: w * _hf_body(x, lambda h: h.square().mean(-1, keepdim=True)).to(x.dtype)),
    # x converted twice (two identical conversion nodes, merged by the pass's second round)
    ("rms_norm_quantize[meta]", lambda x, r, w: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w),
    ("add_rms_norm_quantize[hf]", _res(lambda s, w: w * (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(s.dtype))),
    # the norm's conversion of x is private, another conversion of x feeds an extra output: fuses as before
    ("rms_norm_quantize[meta]", lambda x, r, w: (_hf_body(x).type_as(x) * w, x.float() * 2)),
    ("rms_norm_quantize[hf]", lambda x, r, w: w * _hf_body(x, lambda h: torch.mean(h**2, -1, keepdim=True)).to(x.dtype)),
    ("rms_norm_quantize[torch,no_weight]", lambda x, r, w: F.rms_norm(x.float(), (K,), None, 1e-6).to(x.dtype)),
    ("rms_norm_quantize[torch]", lambda x, r, w: F.rms_norm(x, (K,), w, None)),
    ("layer_norm_quantize[no_affine]", lambda x, r, w: F.layer_norm(x.float(), (K,), None, None, 1e-5).to(x.dtype)),
    ("layer_norm_quantize[weight,float32]", lambda x, r, w: F.layer_norm(x.float(), (K,), w.float(), None, 1e-6).to(x.dtype)),
    ("rms_norm_quantize[meta]", lambda x, r, w: _gpt_fast(x, w)),
    ("add_rms_norm_quantize[meta]", _res(_gpt_fast)),
    # the product of two conversions of x: a square once the pass has merged them
    ("rms_norm_quantize[meta]", lambda x, r, w: (x.float() * torch.rsqrt((x.float() * x.float()).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w),
    ("rms_norm_quantize[fp32_weight]", lambda x, r, w: _litgpt(x, w)),
    ("add_rms_norm_quantize[fp32_weight]", _res(_litgpt)),
    # google/gemma_pytorch without the unit offset; F.rms_norm in float32 with the weight converted
    ("rms_norm_quantize[fp32_weight]", lambda x, r, w: (_hf_body(x) * w.float()).type_as(x)),
    ("rms_norm_quantize[torch_fp32]", lambda x, r, w: F.rms_norm(x.float(), (K,), w.float(), 1e-6).type_as(x)),
    ("add_rms_norm_quantize[torch_fp32]", _res(lambda s, w: F.rms_norm(s.float(), (K,), w.float(), 1e-6).type_as(s))),
    ("rms_norm_quantize[t5_right]", lambda x, r, w: _diffusers(x, w)),
    ("add_rms_norm_quantize[t5_right]", _res(_diffusers)),
    ("rms_norm_quantize[t5,no_weight]", lambda x, r, w: _diffusers(x, None)),
    ("add_rms_norm_quantize[t5,no_weight]", _res(lambda s, w: _diffusers(s, None))),
    ("rms_norm_quantize[glm]", lambda x, r, w: _chatglm(x, w)),
    ("add_rms_norm_quantize[glm]", _res(_chatglm)),
    # a scaled residual: the add with alpha is not the rule's sum; the norm of it still fuses
    ("rms_norm_quantize[torch]", _scaled_residual),
    ("silu_and_mul_quantize[silu]", lambda x, r, w: F.silu(x * 2).mul_(r)),
    ("silu_and_mul_quantize[silu]", lambda x, r, w: (lambda h: F.silu(h) * h)(x + r)),
    ("layer_norm_quantize[weight]", lambda x, r, w: F.layer_norm(x.transpose(0, 1), (K,), w, None, 1e-5)),
    # the hidden dim of 3-D activations written as its index, 2 (the pass rewrites it as -1 after the
    # rules that decompose to the index, F.rms_norm's, had their turn)
    ("rms_norm_quantize[hf]", lambda x, r, w: w * _hf_body(x, lambda h: h.pow(2).mean(2, keepdim=True)).to(x.dtype)),
    ("add_rms_norm_quantize[hf]", _res(lambda s, w: w * _hf_body(s, lambda h: h.pow(2).mean(dim=2, keepdim=True)).to(s.dtype))),
    ("rms_norm_quantize[meta]", lambda x, r, w: _hf_body(x, lambda h: (h * h).mean(2, keepdim=True)).type_as(x) * (1 + w)),
    ("rms_norm_quantize[torch]", lambda x, r, w: F.rms_norm(x, (K,), w, 1e-5)),
    # never: the mean over the sequence, not the hidden dim; an offset other than Gemma's 1; a bf16 norm
    # whose output is cast to float16
    (None, lambda x, r, w: w * _hf_body(x, lambda h: h.pow(2).mean(1, keepdim=True)).to(x.dtype)),
    (None, lambda x, r, w: (_hf_body(x) * (2.0 + w.float())).type_as(x)),
    (None, lambda x, r, w: F.rms_norm(x.float(), (K,), None, 1e-6).to(torch.float16)),
]


class _Holder:
    def __init__(self, weight, eps):
        self.weight, self.variance_epsilon = weight, eps


def test_source_forms():
    """One compiled function with many independent chains (each on its own inputs)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)  # noqa: E731
    inputs = [(rand(*TOKENS, K) * 3, rand(*TOKENS, K), rand(K) * 0.2 + 1) for _ in FORMS]

    def fn(inputs):
        outs = []
        for (_, chain), (x, r, w) in zip(FORMS, inputs):
            y = chain(x, r, w)
            extra = ()
            if isinstance(y, tuple):
                y, *extra = y
            outs.append((*_q(y), *extra))
        return outs

    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        out = torch.compile(fn, options=fusion.compile_options())(inputs)
        expected = fn(inputs)
    want = {}
    for rule, _ in FORMS:
        if rule:
            want[rule] = want.get(rule, 0) + 1
    assert nonzero(fusion.match_counts()) == want
    assert fp4_ops(fusion.last_record().after).get("fp4op.quantize.default", 0) == sum(r is None for r, _ in FORMS)
    failures = []
    for (rule, _), got, ref in zip(FORMS, out, expected):
        try:
            if rule is not None:  # unfused chains: Inductor's own code, not the contract
                assert_fp4_close(got[:2], ref[:2])
            for a, e in zip(got[2:], ref[2:]):
                assert torch.equal(a, e)  # residual sums
        except AssertionError as e:
            failures.append(f"{rule}: {e}")
    assert not failures, "\n".join(failures)


def test_scaled_residual_add_is_not_the_residual_rule():
    """torch.add(x, r, alpha=...) before the norm: Inductor's matcher ignores the node's alpha keyword
    (the rule's x + r has none); fusing it as add_rms_norm_quantize gave a wrong sum and wrong codes."""
    w = torch.randn(K, dtype=torch.bfloat16)

    def block(x, r):
        s = torch.add(x, r, alpha=0.5)
        return (*_q(F.rms_norm(s, (K,), w, 1e-6)), s)

    x, r = torch.randn(8, K, dtype=torch.bfloat16), torch.randn(8, K, dtype=torch.bfloat16)
    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        got = torch.compile(block, options=fusion.compile_options())(x, r)
        want = block(x, r)
    assert "add_rms_norm_quantize[torch]" not in nonzero(fusion.match_counts())
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_dynamic_activation_forms():
    """dynamic=True with a symbolic hidden size: vLLM's SiluAndMul (x[..., :d] * ...), chunk, and a residual
    + F.rms_norm with the weight passed as an input."""

    def fn(a, b, x, r, w):
        d = a.shape[-1] // 2
        s = x + r
        return (
            _q(F.silu(a[..., :d]) * a[..., d:]),
            _q((lambda g, u: u * F.gelu(g, approximate="tanh"))(*b.chunk(2, -1))),
            (*_q(F.rms_norm(s, (x.shape[-1],), w, 1e-6)), s),
        )

    def args(m, k):
        return (*(torch.randn(m, 2 * k, dtype=torch.bfloat16) for _ in range(2)),
                *(torch.randn(m, k, dtype=torch.bfloat16) for _ in range(2)), torch.randn(k, dtype=torch.bfloat16) + 1)

    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        compiled = torch.compile(fn, dynamic=True, options=fusion.compile_options())
        results = [(compiled(*a), fn(*a)) for a in (args(64, 128), args(40, 96))]
    assert len(fusion.fusion_pass().records) == 1
    assert nonzero(fusion.match_counts()) == {
        "silu_and_mul_quantize[silu]": 1,
        "gelu_and_mul_quantize[gelu_tanh,up*act]": 1,
        "add_rms_norm_quantize[torch]": 1,
    }
    for got, want in results:
        for g, w in zip(got, want):
            assert_fp4_close(g[:2], w[:2])
            for a, e in zip(g[2:], w[2:]):
                assert torch.equal(a, e)


def test_dynamic_flattened_norm_whose_size_is_read():
    """dynamic=True, a norm output flattened to rows whose size the model also reads (``zeros_like(h)``, as
    MoE blocks write: a sym_size read of the view in the graph): the read is taken from the input sizes
    and the norm fuses, one graph for every M, the bytes equal eager's."""
    w = torch.randn(D, dtype=torch.bfloat16) + 1

    def fn(x):
        h = F.rms_norm(x, (D,), w, 1e-6).view(-1, D)
        x_q, sf = _q(h)
        return x_q, sf, torch.zeros_like(h), h.shape[0] * 2

    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        compiled = torch.compile(fn, dynamic=True, options=fusion.compile_options())
        results = [(compiled(x), fn(x)) for x in (torch.randn(b, 5, D, dtype=torch.bfloat16) for b in (4, 3))]
    assert len(fusion.fusion_pass().records) == 1
    assert nonzero(fusion.match_counts()) == {"rms_norm_quantize[torch]": 1}
    assert "fp4op.quantize.default" not in graph_ops()
    for got, want in results:
        assert_fp4_close(got[:2], want[:2])
        assert torch.equal(got[2], want[2]) and got[3] == want[3]


def test_dynamic_gelu_new_forms():
    """dynamic=True with Dynamo's defaults: transformers' gelu_new reads math.pi, which Dynamo (torch
    2.14; 2.11 keeps it a constant) lifts into a graph input, so its factor sqrt(2 / pi) is a 0-d tensor
    computed in the graph; the coef_tensor rules take it (the ops' sqrt_2_over_pi): GPT-2's MLP
    activation and T5 v1.1's gated one fuse, one graph for every M, the bytes equal eager's."""
    act = NewGELUActivation()

    def fn(x, g, u):
        return _q(act(x)), _q(act(g) * u)

    def args(m):
        return tuple(torch.randn(m, 256, dtype=torch.bfloat16) * 3 for _ in range(3))

    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        compiled = torch.compile(fn, dynamic=True, options=fusion.compile_options())
        results = [(compiled(*a), fn(*a)) for a in (args(64), args(40), args(7))]
    assert len(fusion.fusion_pass().records) == 1
    counts = nonzero(fusion.match_counts())
    tag = ",coef_tensor" if any("coef_tensor" in name for name in counts) else ""
    assert counts == {f"gelu_new_quantize[gelu_new{tag}]": 1, f"gelu_new_and_mul_quantize[gelu_new{tag}]": 1}
    assert "fp4op.quantize.default" not in graph_ops()
    for got, want in results:
        for g, w in zip(got, want):
            assert torch.equal(g[0], w[0]) and torch.equal(g[1], w[1])


# ---- one norm output read by several quantizes that do not merge ----------------------------------------


def _loaded_copy(source, *makers):
    """Fresh models (other random weights) converted with TapLinear, loaded from `source`'s state_dict: each
    layer gets its own copy of the static activation scale (a checkpoint does not tie tensors)."""
    models = []
    for i, make in enumerate(makers):
        model = fnn.convert(_randomize(make(), seed=50 + i).to(torch.bfloat16).eval())
        for m in model.modules():
            if type(m) is fnn.FP4Linear:
                m.__class__ = TapLinear
        models.append(model)
    loaded = Zoo(models).eval()
    loaded.load_state_dict(source.state_dict())
    return loaded


def test_scales_loaded_from_state_dict_still_fuse():
    """Static scales loaded from a state_dict are equal but separate tensors: the q/k/v quantizes of one norm
    output have different global-scale inputs and are not merged. The pass gives each quantize a private
    copy of the norm, so the norm fuses into one rms_norm_quantize per projection."""
    source = build_zoo([QKVProjections], torch.bfloat16, "nvfp4")
    loaded = _loaded_copy(source, QKVProjections)
    scales = [m.input_global_scale for m in loaded.modules() if isinstance(m, fnn.FP4Linear)]
    assert len({s.data_ptr() for s in scales}) == 3 and all(torch.equal(s, scales[0]) for s in scales)
    runs = run_zoo(loaded, torch.bfloat16)
    assert nonzero(fusion.match_counts()) == {"rms_norm_quantize[hf]": 3}
    (record,) = fusion.fusion_pass().records
    assert record.producer_copies == 2
    assert nonzero(fp4_ops(record.after)) == {"fp4op.rms_norm_quantize.default": 3, "fp4op.dequantize.default": 6}
    norm_ops = ("aten.rsqrt.default", "aten.pow.Tensor_Scalar", "aten.mean.dim", "prims.convert_element_type.default")
    for norm_op in norm_ops:
        assert norm_op not in record.after, norm_op
    check_numerics(runs, 16)


def test_zoo_untied_scales_fuse():
    """calibrate(tie_siblings=False): every projection has its own static scale tensor, so no quantizes merge.
    A Llama decoder layer: input_layernorm -> q/k/v (3 rms_norm_quantize), post_attention_layernorm after the
    residual add (its sum is the next residual) -> gate/up (one add_rms_norm_quantize, which returns the sum,
    and one rms_norm_quantize of that sum); and a LayerNorm read by q/k/v projections."""
    zoo = build_zoo([DecoderLayer, lambda: QKVProjections(lambda d: nn.LayerNorm(d))], torch.bfloat16, "nvfp4",
                    tie_siblings=False)
    runs = run_zoo(zoo, torch.bfloat16)
    assert nonzero(fusion.match_counts()) == {
        "rms_norm_quantize[hf]": 4, "add_rms_norm_quantize[hf]": 1, "silu_and_mul_quantize[silu]": 1,
        "layer_norm_quantize[weight,bias]": 3,
    }
    (record,) = fusion.fusion_pass().records
    assert record.producer_copies == 2 + 1 + 2
    ops = graph_ops()
    assert ops.get("fp4op.quantize.default", 0) == 1, ops  # o_proj: its input is the attention output
    assert "aten.rsqrt.default" not in record.after and "aten.var_mean.correction" not in record.after
    check_numerics(runs, 16)


# ---- known gaps (not fixed in fusion/) ----------------------------------------------------------------------


@pytest.mark.xfail(
    strict=False,
    reason="F.gelu(x.float()).to(x.dtype) has the post-grad graph of a bf16 F.gelu(x), so gelu_quantize fires; "
    "the fused op reproduces the bf16 kernel (-0.0 for x below about -5.5) while eager's vectorized float32 "
    "kernel gives +0.0 on some CPUs (AVX2; the GPU machine's AVX512 CPU gives -0.0 and passes): equal values, "
    "FP4 codes differing in the sign of zero in most blocks",
)
def test_gelu_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(128, K, generator=g) * 4).to(torch.bfloat16)

    def act(x):
        return _q(F.gelu(x.float()).to(x.dtype))

    fusion.reset()
    with fresh_compile_config(), torch.no_grad():
        got = torch.compile(act, options=fusion.compile_options())(x)
        want = act(x)
    assert nonzero(fusion.match_counts()) == {"gelu_quantize[gelu]": 1}
    assert_fp4_close(got, want)
