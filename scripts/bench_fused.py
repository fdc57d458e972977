"""GPU benchmark of the fused "norm/activation + FP4 quantize" ops (issue 4).

For each op and shape, times with CUDA events (warm-up, L2 flushed before every iteration, median):
  fused     the fused op (torch.ops.fp4op.*_quantize)
  unfused   torch.compile of the norm/activation followed by torch.ops.fp4op.quantize
  inductor  torch.compile of the norm/activation followed by fp4op.reference.quantize (Inductor alone)
  copy      a device copy moving the same number of bytes as the fused op reads and writes
and prints a markdown table; --out writes the results as JSON (device, torch version, git commit).

    python scripts/bench_fused.py --out bench_fused.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fp4op
from fp4op import reference
from fp4op.fusion.activation import gelu_new  # transformers' NewGELUActivation, as the rule matches it

OPS = torch.ops.fp4op
DEFAULT_SHAPES = ((8192, 8192), (8192, 16384), (4096, 4096), (16384, 2048), (128, 8192))
EPS = 1e-6
BACKLOG_CYCLES = 200_000  # ~100 us of GPU spin after each flush


def git_commit() -> str:
    """$FP4OP_COMMIT (set by scripts/gpu_check.sh: the GPU machine's copy has no usable .git), else HEAD."""
    if os.environ.get("FP4OP_COMMIT"):
        return os.environ["FP4OP_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ms(fn, iters: int, warmup: int, flush: torch.Tensor) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()  # evict the inputs from L2
        # keep the GPU busy while the host enqueues the call (see bench_quantize.CudaTimer): otherwise the
        # compiled graphs' host time (guards, launches) lands between the events (seen: 4096x4096 RMSNorm's
        # unfused graph at 54 us in one run, 148 us in another)
        torch.cuda._sleep(BACKLOG_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hf_llama_rms_norm(x, w):
    """Hugging Face LlamaRMSNorm: float32 statistic, the weight product in the model dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def vllm_add_rms_norm(x, r, w):
    """vLLM RMSNorm.forward_native with a residual: the add in float32, the float32 sum normalized."""
    s = x.to(torch.float32) + r.to(torch.float32)
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS)
    return h.to(x.dtype) * w


def also_returned(norm):
    """`norm` whose output is also read elsewhere (post-LN: the next residual): the model returns it, so the
    unfused graph writes it, as the *_with_normed op does."""

    def model(*t):
        y = norm(*t)
        return y, y

    return model


def add_rms_norm_read_elsewhere(k: int):
    """x + r, then F.rms_norm whose output is also read elsewhere (an MoE router's experts): the model
    returns the norm output and the sum (the next residual), as add_rms_norm_quantize_with_normed does."""

    def model(x, r, w):
        s = x + r
        y = F.rms_norm(s, (k,), w, EPS)
        return y, s, y

    return model


def olmo2_post_norm(k: int):
    """OLMo2's post-norm residual stream: residual + Olmo2RMSNorm(x) (the weight times the float32 norm,
    rounded once), quantized and returned (the next residual), as rms_norm_add_quantize does."""

    def model(x, r, w):
        h = x.float()
        h = r + (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS))).to(x.dtype)
        return h, h

    return model


def cases(m: int, k: int, dtype: torch.dtype, gs: torch.Tensor):
    """(name, fused call, model-dtype computation (the tensor quantized, or it and outputs also returned),
    its inputs, bytes read + written by the fused op)."""
    dev = "cuda"
    x = torch.randn(m, k, dtype=dtype, device=dev)
    residual = torch.randn(m, k, dtype=dtype, device=dev)
    w = torch.randn(k, dtype=dtype, device=dev)
    b = torch.randn(k, dtype=dtype, device=dev)
    gate_up = torch.randn(m, 2 * k, dtype=dtype, device=dev)
    gate, up = gate_up[:, :k], gate_up[:, k:]
    q_bytes = m * k // 2 + m * k // 16  # x_q and the scales
    e = x.element_size()
    yield ("rms_norm", lambda: OPS.rms_norm_quantize(x, w, EPS, global_scale=gs),
           lambda x, w: F.rms_norm(x, (k,), w, EPS), (x, w), m * k * e + q_bytes)
    yield ("rms_norm_llama", lambda: OPS.rms_norm_quantize(x, w, EPS, 0.0, True, global_scale=gs),
           hf_llama_rms_norm, (x, w), m * k * e + q_bytes)
    yield ("add_rms_norm", lambda: OPS.add_rms_norm_quantize(x, residual, w, EPS, global_scale=gs),
           lambda x, r, w: F.rms_norm(x + r, (k,), w, EPS), (x, residual, w), 3 * m * k * e + q_bytes)
    yield ("add_rms_norm_vllm", lambda: OPS.add_rms_norm_quantize(x, residual, w, EPS, 0.0, True, global_scale=gs,
                                                               sum_in_float32=True),
           vllm_add_rms_norm, (x, residual, w), 3 * m * k * e + q_bytes)
    yield ("layer_norm", lambda: OPS.layer_norm_quantize(x, w, b, EPS, global_scale=gs),
           lambda x, w, b: F.layer_norm(x, (k,), w, b, EPS), (x, w, b), m * k * e + q_bytes)
    # adaLN (DiT / FLUX): two samples' rows, each with its [K] multiplier (1 + scale) and shift
    xs = x.view(2, m // 2, k)
    multiplier, shift = 1 + 0.1 * torch.randn(2, 1, k, dtype=dtype, device=dev), torch.randn(2, 1, k, dtype=dtype, device=dev)
    yield ("layer_norm_modulate", lambda: OPS.layer_norm_modulate_quantize(xs, None, None, EPS, multiplier, shift, global_scale=gs),
           lambda x, mul, add: F.layer_norm(x, (k,), None, None, EPS) * mul + add, (xs, multiplier, shift),
           m * k * e + q_bytes)
    yield ("rms_norm_with_normed", lambda: OPS.rms_norm_quantize_with_normed(x, w, EPS, global_scale=gs),
           also_returned(lambda x, w: F.rms_norm(x, (k,), w, EPS)), (x, w), 2 * m * k * e + q_bytes)
    yield ("layer_norm_with_normed", lambda: OPS.layer_norm_quantize_with_normed(x, w, b, EPS, global_scale=gs),
           also_returned(lambda x, w, b: F.layer_norm(x, (k,), w, b, EPS)), (x, w, b), 2 * m * k * e + q_bytes)
    yield ("add_rms_norm_with_normed",
           lambda: OPS.add_rms_norm_quantize_with_normed(x, residual, w, EPS, global_scale=gs),
           add_rms_norm_read_elsewhere(k), (x, residual, w), 4 * m * k * e + q_bytes)
    yield ("rms_norm_add_olmo2", lambda: OPS.rms_norm_add_quantize(x, residual, w, EPS, global_scale=gs),
           olmo2_post_norm(k), (x, residual, w), 3 * m * k * e + q_bytes)
    yield ("silu_and_mul", lambda: OPS.silu_and_mul_quantize(gate, up, global_scale=gs),
           lambda t: F.silu(t[:, :k]) * t[:, k:], (gate_up,), 2 * m * k * e + q_bytes)
    yield ("gelu_tanh_and_mul", lambda: OPS.gelu_and_mul_quantize(gate, up, "tanh", global_scale=gs),
           lambda t: F.gelu(t[:, :k], approximate="tanh") * t[:, k:], (gate_up,), 2 * m * k * e + q_bytes)
    yield ("gelu_new_and_mul", lambda: OPS.gelu_new_and_mul_quantize(gate, up, global_scale=gs),
           lambda t: gelu_new(t[:, :k]) * t[:, k:], (gate_up,), 2 * m * k * e + q_bytes)
    yield ("silu", lambda: OPS.silu_quantize(x, global_scale=gs), lambda x: F.silu(x), (x,), m * k * e + q_bytes)
    yield ("gelu_new", lambda: OPS.gelu_new_quantize(x, global_scale=gs), gelu_new, (x,), m * k * e + q_bytes)
    yield ("quick_gelu", lambda: OPS.sigmoid_mul_quantize(x, 1.702, global_scale=gs),
           lambda x: x * torch.sigmoid(1.702 * x), (x,), m * k * e + q_bytes)


def compiled_pair(model, gs: torch.Tensor):
    """torch.compile of `model` followed by the fp4op.quantize op, and by the reference (Inductor alone)."""

    def then(quantize, *t):
        out = model(*t)
        y, *also = out if isinstance(out, tuple) else (out,)
        return (*quantize(y, gs), *also)

    def with_op(*t):
        return then(torch.ops.fp4op.quantize, *t)

    def with_reference(*t):
        return then(reference.quantize, *t)

    return torch.compile(with_op, dynamic=False), torch.compile(with_reference, dynamic=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--shapes", type=str, default=None, help="e.g. 8192x8192,4096x4096")
    parser.add_argument("--ops", type=str, default=None, help="comma-separated subset of the op names")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fused: needs a CUDA GPU", file=sys.stderr)
        return 1
    shapes = DEFAULT_SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    wanted = set(args.ops.split(",")) if args.ops else None
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    gs = torch.tensor([448.0 * 6.0 / 8.0], device="cuda")

    results = []
    for m, k in shapes:
        for name, fused, model, inputs, nbytes in cases(m, k, torch.bfloat16, gs):
            if wanted and name not in wanted:
                continue
            # fresh Dynamo caches: with_op / with_reference are one code object for every case, and past
            # its cache size limit Dynamo would run them eagerly instead of compiling
            torch._dynamo.reset()
            unfused, inductor = compiled_pair(model, gs)
            copy_src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
            copy_dst = torch.empty_like(copy_src)
            # the fused result must agree with the unfused composition (reduction order aside)
            got, want = fused()[:2], unfused(*inputs)
            same = (got[1] == want[1]).float().mean().item()
            row = {
                "op": name,
                "m": m,
                "k": k,
                "dtype": "bfloat16",
                "bytes": nbytes,
                "sf_identical_fraction": same,
                "fused_ms": time_ms(fused, args.iters, args.warmup, flush),
                "unfused_ms": time_ms(lambda: unfused(*inputs), args.iters, args.warmup, flush),
                "inductor_ms": time_ms(lambda: inductor(*inputs), args.iters, args.warmup, flush),
                "copy_ms": time_ms(lambda: copy_dst.copy_(copy_src), args.iters, args.warmup, flush),
            }
            row["fused_GBps"] = nbytes / row["fused_ms"] / 1e6
            row["speedup_vs_unfused"] = row["unfused_ms"] / row["fused_ms"]
            row["speedup_vs_inductor"] = row["inductor_ms"] / row["fused_ms"]
            results.append(row)
            print(f"{name} {m}x{k}: fused {row['fused_ms']:.4f} ms, unfused {row['unfused_ms']:.4f} ms, "
                  f"inductor {row['inductor_ms']:.4f} ms, copy {row['copy_ms']:.4f} ms", file=sys.stderr)

    header = ("| op | M x K | fused ms | unfused ms | inductor ms | copy ms | fused GB/s | x unfused | x inductor |"
              "\n|---|---|---|---|---|---|---|---|---|")
    print(header)
    for r in results:
        print(f"| {r['op']} | {r['m']}x{r['k']} | {r['fused_ms']:.4f} | {r['unfused_ms']:.4f} | "
              f"{r['inductor_ms']:.4f} | {r['copy_ms']:.4f} | {r['fused_GBps']:.0f} | "
              f"{r['speedup_vs_unfused']:.2f} | {r['speedup_vs_inductor']:.2f} |")
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "git_commit": git_commit(),
            "fp4op": fp4op.__version__,
            "iters": args.iters,
            "l2_flush": True,
            "timing": "CUDA events, median",
            "results": results,
        }
        args.out.write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
