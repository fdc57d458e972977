"""Host time of one call: what a decode step pays per quantize when it does not replay a CUDA graph.

A small-M quantize runs for a few microseconds on the GPU, less than the host takes to issue it, so
back-to-back calls run at the host's pace: the wall time of N calls (the device synchronized once, at
the end) over N is the host time of a call. Measured for the op (grad mode on, under no_grad, under
inference_mode), the API (`fp4op.fp4_quantize`), a fused op, and, for scale, one ATen op with an
output (`x.clone()`). Last, the op with a Python autograd kernel registered over the C++ one, as
fp4op registered it before csrc/autograd.cpp (torch.library.register_autograd), to show what that
kernel costs.

    python benchmarks/bench_host.py --out-dir $OUT     # writes host_overhead.json / .md

Without CUDA it runs on CPU tensors (the kernels then run inline, so the figures include them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fp4op  # noqa: E402
import fp4op.fused_ops  # noqa: E402,F401  (registers the fused ops' fakes)


def host_us_per_call(fn, calls: int, repeats: int, device: str) -> float:
    """Median over `repeats` of (wall time of `calls` back-to-back calls) / calls, in microseconds."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(20):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return common.median(samples)


def cases(m: int, k: int, device: str):
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    w = torch.randn(k, device=device).to(torch.bfloat16)
    gs = fp4op.nvfp4_global_scale(x)
    quantize = torch.ops.fp4op.quantize
    return [
        ("x.clone() (one ATen op, for scale)", lambda: x.clone(), contextlib.nullcontext),
        ("torch.ops.fp4op.quantize", lambda: quantize(x, gs), contextlib.nullcontext),
        ("torch.ops.fp4op.quantize under no_grad", lambda: quantize(x, gs), torch.no_grad),
        ("torch.ops.fp4op.quantize under inference_mode", lambda: quantize(x, gs), torch.inference_mode),
        ("fp4op.fp4_quantize", lambda: fp4op.fp4_quantize(x, gs), contextlib.nullcontext),
        ("torch.ops.fp4op.rms_norm_quantize", lambda: torch.ops.fp4op.rms_norm_quantize(x, w, 1e-6, global_scale=gs),
         contextlib.nullcontext),
    ], (lambda: quantize(x, gs))


def register_python_autograd() -> None:
    """What fp4op did before csrc/autograd.cpp: a Python autograd kernel (it overrides the C++ one for
    the rest of this process)."""

    def backward(ctx, *grads):
        raise RuntimeError("fp4op.quantize is not differentiable")

    torch.library.register_autograd("fp4op::quantize", backward, setup_context=lambda ctx, inputs, output: None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=".")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    rows = []
    python_autograd = []
    for m in args.m:
        named, plain_op = cases(m, args.k, device)
        for name, fn, context in named:
            with context():
                rows.append({"case": name, "m": m, "k": args.k, "host_us": host_us_per_call(fn, args.calls, args.repeats, device)})
        python_autograd.append((m, plain_op))
    register_python_autograd()  # last: it stays for the rest of the process
    for m, fn in python_autograd:
        rows.append({"case": "torch.ops.fp4op.quantize, Python autograd kernel (before csrc/autograd.cpp)", "m": m,
                     "k": args.k, "host_us": host_us_per_call(fn, args.calls, args.repeats, device)})

    env = common.environment(device)
    result = {"environment": env, "method": "wall time of back-to-back calls / calls (median of repeats); "
              "bfloat16 input, NVFP4, 128x4", "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "host_overhead.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        f"# Host time per call ({env.get('device') or device}, torch {torch.__version__}, "
        f"commit {(env.get('git_commit') or 'unknown')[:7]})",
        "",
        "| case | M | K | host µs / call |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['case']} | {r['m']} | {r['k']} | {r['host_us']:.1f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out_dir, "host_overhead.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
