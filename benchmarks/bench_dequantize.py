"""GPU benchmark of fp4op dequantize (what FP4Linear's emulated matmul runs on GPUs without FP4
`torch._scaled_mm`, for the activation and the weight of every call).

For each shape, recipe and output dtype (128x4 scales), in one process: fp4op.dequantize, a device copy
moving the same bytes (x_q + sf read, the output written: the limit), and torch.compile of
fp4op.reference.dequantize (what Inductor alone makes of SPEC.md's formula). CUDA events around one call,
L2 flushed before each (bench_quantize.CudaTimer), median. Prints a markdown table; --out writes JSON with
the device, torch version and commit.

    python benchmarks/bench_dequantize.py --out dequantize_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_quantize import CudaTimer  # noqa: E402

import fp4op  # noqa: E402
from fp4op import reference  # noqa: E402

# activations (8192 tokens) and the weights of 4096/8192-wide models
SHAPES = ((8192, 4096), (8192, 8192), (4096, 4096), (14336, 4096), (4096, 14336), (128, 8192))
OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results file (and a markdown table beside it, .md)")
    p.add_argument("--ref-json", default=None,
                   help="another build's results (--label, --skip-inductor) to show beside these in the .md")
    p.add_argument("--label", default="fp4op", help="the name of fp4op's rows (e.g. the build timed)")
    p.add_argument("--skip-inductor", action="store_true")
    p.add_argument("--target-ms", type=float, default=60.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dequantize: needs a CUDA GPU")
        return 1
    timer = CudaTimer(args.target_ms / 1e3, min_iters=10, max_iters=500, flush_bytes=256 * common.MiB)
    rows = []
    print(f"| impl | M x K | recipe | output | time us | GB/s | copy us | % of copy |\n|---|---|---|---|---|---|---|---|")
    # fp4op (and the copy) for every case first, then the Inductor peer: its compile workers keep the CPU busy
    # and could put host time between the events of rows timed after them
    copies = {}
    for peer in (False, True):
        if peer and args.skip_inductor:
            break
        for m, k in SHAPES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(m + k))
            for recipe, (vec, ue8m0) in common.RECIPES.items():
                gs = None if ue8m0 else (448.0 * 6.0 / x.abs().amax().float()).reshape(1)
                x_q, sf = fp4op.fp4_quantize(x, gs, vec, ue8m0)
                for out_name, out_dtype in OUTPUT_DTYPES.items():
                    case = (m, k, recipe, out_name)
                    nbytes = x_q.numel() + sf.numel() + m * k * torch.empty(0, dtype=out_dtype).element_size()
                    if peer:
                        torch._dynamo.reset()  # a fresh compile per case: the recompile limit would fall back to eager
                        compiled = torch.compile(reference.dequantize, dynamic=False)
                        impl, fn = "inductor_reference", lambda: compiled(x_q, sf, gs, vec, ue8m0, "128x4", False, out_dtype)
                    else:
                        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
                        dst = torch.empty_like(src)
                        copies[case] = timer.measure(lambda: dst.copy_(src))["time_us"]
                        del src, dst
                        impl, fn = args.label, lambda: fp4op.dequantize(x_q, sf, gs, vec, ue8m0, output_dtype=out_dtype)
                    t = timer.measure(fn)
                    row = {"impl": impl, "m": m, "k": k, "recipe": recipe, "layout": "128x4", "output": out_name,
                           "effective_bytes": nbytes, "time_us": t["time_us"], "iters": t["iters"],
                           "gbps": nbytes / t["time_us"] / 1e3, "copy_time_us": copies[case],
                           "pct_of_copy": 100.0 * copies[case] / t["time_us"]}
                    rows.append(row)
                    print(f"| {impl} | {m}x{k} | {recipe} | {out_name} | {row['time_us']:.1f} | {row['gbps']:.0f} | "
                          f"{copies[case]:.1f} | {row['pct_of_copy']:.1f}% |", flush=True)
            del x
            torch.cuda.empty_cache()
    if args.out:
        result = {"environment": common.environment("cuda"), "method": {
            "timer": "CUDA events around one call, L2 flushed (256 MiB written) and a GPU spin before each, median",
            "effective_bytes": "x_q + sf + output", "copy": "uint8 device copy of effective_bytes / 2 bytes"},
            "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown(result, args.label, args.ref_json))
    return 0


def markdown(result: dict, label: str, ref_json: str | None) -> str:
    env = result["environment"]
    ref, ref_label = {}, None
    if ref_json:
        with open(ref_json) as f:
            ref_result = json.load(f)
        for r in ref_result["rows"]:
            ref[(r["m"], r["k"], r["recipe"], r["output"])] = r["time_us"]
            ref_label = r["impl"]
    by_case = {}
    for r in result["rows"]:
        by_case.setdefault((r["m"], r["k"], r["recipe"], r["output"]), {})[r["impl"]] = r
    lines = [
        "# fp4op dequantize (GPU)",
        "",
        f"- device: {env.get('device')}, torch {env['torch']}, fp4op commit {env['git_commit']}",
        f"- {result['method']['timer']}; bytes: {result['method']['effective_bytes']}; 128x4 scales; "
        "`python benchmarks/bench_dequantize.py` (`bash scripts/gpu_check.sh dequant`)",
        f"- inductor: torch.compile of fp4op.reference.dequantize (SPEC.md's formula in PyTorch)"
        + (f"; earlier: {ref_label}, run on the same machine just before" if ref_label else ""),
        "",
        "| M x K | recipe | output | fp4op us | % of copy | inductor us | x inductor |"
        + (" earlier us | x earlier |" if ref else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if ref else ""),
    ]
    for (m, k, recipe, output), impls in by_case.items():
        own = impls[label]
        ind = impls.get("inductor_reference")
        line = (f"| {m}x{k} | {recipe} | {output} | {own['time_us']:.1f} | {own['pct_of_copy']:.0f}% | "
                + (f"{ind['time_us']:.1f} | {ind['time_us'] / own['time_us']:.1f} |" if ind else "- | - |"))
        earlier = ref.get((m, k, recipe, output))
        if ref:
            line += f" {earlier:.1f} | {earlier / own['time_us']:.1f} |" if earlier else " - | - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
