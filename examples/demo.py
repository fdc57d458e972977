"""fp4op demo: FP4 linear layers and norm/activation + quantize fusion under torch.compile.

Builds five small models with random weights -- a Llama-style decoder block (RMSNorm, attention,
SiLU-and-mul MLP), a GPT-2-style MLP (LayerNorm, GELU-tanh), a post-LN encoder's feed-forward half
(BERT: the LayerNorm output is quantized and is the residual too, which layer_norm_quantize_with_normed
returns), OLMo2's post-norm residual stream around its MLP (residual + RMSNorm(attention output),
quantized and the next residual: rms_norm_add_quantize) and a diffusion transformer block (DiT's adaLN:
LayerNorm(x) * (1 + scale) + shift per sample, layer_norm_modulate_quantize) --, converts their nn.Linear layers to fp4op.nn.FP4Linear, calibrates the activation scales,
compiles them with fp4op.fusion, and prints the rewrites per rule, the fp4op ops of the compiled graph,
and the output error against the bf16 model. (The post-LN, post-norm and DiT blocks' compiled outputs
differ slightly from eager FP4 where Inductor's own kernels (their last norm and add; the DiT block's
conditioning mean and gated residual adds) keep an intermediate in float32 that eager rounds to bf16;
with torch._inductor.config.emulate_precision_casts they are bit-equal, as are the others.)
On a GPU it also times the compiled bf16 model and the FP4 model with and without the fusion, in
alternating rounds of back-to-back calls.

    python examples/demo.py [--recipe nvfp4|mxfp4] [--device cpu|cuda] [--tokens N] [--hidden D]
                            [--rounds R] [--no-timing]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4op
import fp4op.fusion
import fp4op.nn


class LlamaRMSNorm(nn.Module):
    """The Hugging Face form: float32 statistics, weight applied in the model dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.input_layernorm = LlamaRMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_attention_layernorm = LlamaRMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(attn)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class GPT2MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.c_proj(self.act(self.c_fc(self.ln_2(x))))


class PostLNFeedForward(nn.Module):
    """The feed-forward half of a post-LN encoder layer (BERT, nn.TransformerEncoderLayer's default): the
    LayerNorm closing the attention half feeds the intermediate layer and is also the residual around it."""

    def __init__(self, dim: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-12)
        self.intermediate = nn.Linear(dim, 4 * dim)
        self.output = nn.Linear(4 * dim, dim)
        self.output_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x):
        h = self.attention_norm(x)
        return self.output_norm(h + self.output(F.gelu(self.intermediate(h))))


class Olmo2RMSNorm(LlamaRMSNorm):
    """OLMo2's form: the weight multiplies the float32 norm, rounded once."""

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class PostNormMLP(nn.Module):
    """OLMo2's post-norm residual stream around its MLP: the attention half's normalized output (o_proj
    standing in for attention) is added to the residual; that sum feeds the gate/up projections and is
    the residual around the MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_attention_norm = Olmo2RMSNorm(dim, eps=1e-6)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.post_feedforward_norm = Olmo2RMSNorm(dim, eps=1e-6)

    def forward(self, x):
        h = x + self.post_attention_norm(self.o_proj(x))
        return h + self.post_feedforward_norm(self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)))


class DiTBlock(nn.Module):
    """A diffusion transformer block as diffusers writes DiT / PixArt (adaLN-Zero): the conditioning (here
    the tokens' mean, standing in for the timestep embedding) through SiLU and a projection into six
    chunks, which modulate the norms before the attention and the GELU(tanh) feed-forward and gate their
    outputs."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln(x.mean(1)).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + gate_msa[:, None] * self.proj(attn)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


def randomize(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(fns: dict, x, rounds: int, calls: int = 10) -> dict:
    """Median milliseconds per call of each of `fns` (CUDA events around `calls` back-to-back calls, so
    that the host's dispatch overlaps the GPU's work), the functions taking turns round by round, so that
    a slower stretch of the machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(3):
            fn(x)  # compiles (first call), then warms up
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(x)
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / calls)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def compile_model(model: nn.Module, fused: bool):
    torch._dynamo.reset()
    options = fp4op.fusion.compile_options() if fused else None
    return torch.compile(model, options=options)


def run(name: str, bf16_model: nn.Module, x: torch.Tensor, args) -> dict:
    fp4_model = fp4op.nn.convert(copy.deepcopy(bf16_model), recipe=args.recipe)
    with fp4op.nn.calibrate(fp4_model):
        fp4_model(x)  # one representative batch sets the static activation scales
    fp4op.fusion.reset()
    start = time.perf_counter()
    fused = compile_model(fp4_model, fused=True)
    out = fused(x)
    compile_s = time.perf_counter() - start
    record = fp4op.fusion.last_record()

    print(f"\n== {name}  ({args.recipe}, {x.dtype}, input {list(x.shape)}, {x.device.type}; compiled in {compile_s:.1f} s)")
    print("  FP4Linear layers: " + ", ".join(n for n, m in fp4_model.named_modules() if isinstance(m, fp4op.nn.FP4Linear)))
    print("  rewrites per rule:")
    for rule, n in sorted(record.matches.items()):
        print(f"    {rule:45s} {n}")
    before = {k: v for k, v in record.before.items() if k.startswith("fp4op.")}
    after = {k: v for k, v in record.after.items() if k.startswith("fp4op.")}
    print(f"  fp4op ops before the pass: {before}")
    print(f"  fp4op ops in the final graph: {after}")
    reference = bf16_model(x)
    eager = fp4_model(x)
    print(f"  relative L2 error vs the bf16 model: fused compiled {rel_error(out, reference):.4f}, "
          f"eager FP4 {rel_error(eager, reference):.4f}; fused compiled vs eager FP4 {rel_error(out, eager):.2e}")

    row = {"model": name}
    if x.is_cuda and not args.no_timing:
        # each compiled on its first call in bench(); Dynamo keeps the fused and unfused graphs of the
        # same forward apart (a backend guard)
        torch._dynamo.reset()
        fns = {"bf16": torch.compile(bf16_model), "fp4 unfused": torch.compile(fp4_model),
               "fp4 fused": torch.compile(fp4_model, options=fp4op.fusion.compile_options())}
        row.update(bench(fns, x, args.rounds))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(fp4op.nn.RECIPES), default="nvfp4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="batch x sequence tokens (default: 64 CPU, 4096 GPU)")
    parser.add_argument("--hidden", type=int, default=None, help="model dim (default: 256 CPU, 2048 GPU)")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds (10 calls of each model a round)")
    parser.add_argument("--no-timing", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    tokens = args.tokens or (4096 if on_gpu else 64)
    dim = args.hidden or (2048 if on_gpu else 256)
    dtype = torch.bfloat16
    # the pass runs on every compile (a cache hit would skip it and its report)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)

    print(f"fp4op {fp4op.__version__}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""))
    matmul = "torch._scaled_mm (FP4 tensor cores)" if fp4op.nn.scaled_mm_supported(device) else "emulated (dequantize + bf16 matmul)"
    print(f"FP4Linear matmul on this device: {matmul}")
    rows = []
    with torch.no_grad():
        x = torch.randn(tokens // 16, 16, dim, device=device, dtype=dtype)
        llama = randomize(LlamaBlock(dim, heads=max(1, dim // 64), hidden=4 * dim)).to(device, dtype).eval()
        rows.append(run("Llama decoder block", llama, x, args))
        gpt2 = randomize(GPT2MLP(dim)).to(device, dtype).eval()
        rows.append(run("GPT-2 MLP", gpt2, x, args))
        bert = randomize(PostLNFeedForward(dim)).to(device, dtype).eval()
        rows.append(run("post-LN feed-forward", bert, x, args))
        olmo2 = randomize(PostNormMLP(dim, hidden=4 * dim)).to(device, dtype).eval()
        rows.append(run("post-norm MLP (OLMo2)", olmo2, x, args))
        dit = randomize(DiTBlock(dim, heads=max(1, dim // 64))).to(device, dtype).eval()
        dit.adaln[1].weight.mul_(0.1)  # a small modulation, as adaLN-Zero starts from none
        rows.append(run("DiT block (adaLN)", dit, x, args))

    if on_gpu and not args.no_timing:
        print(f"\nmedian ms per forward (torch.compile; {args.rounds} rounds of 10 calls, the models taking turns):")
        print(f"  {'model':22s} {'bf16':>8s} {'fp4 unfused':>12s} {'fp4 fused':>10s} {'fused speed-up':>15s}")
        for r in rows:
            print(f"  {r['model']:22s} {r['bf16']:8.3f} {r['fp4 unfused']:12.3f} {r['fp4 fused']:10.3f} "
                  f"{r['fp4 unfused'] / r['fp4 fused']:14.2f}x")
    elif not on_gpu:
        print("\n(timing table: run on a CUDA GPU)")


if __name__ == "__main__":
    main()
