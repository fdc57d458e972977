"""CPU benchmark (issue 5): fp4op's CPU kernel against torchao's eager NVFP4 and MX quantization, the
same recipe and 128x4 scale layout, bf16 input, at 1 and 2 threads. Runs anywhere:

    python benchmarks/bench_cpu.py [--out-dir benchmarks/results] [--name cpu]

Host clock around one call; fp4op and torchao are called alternately (so both see the same load on a
shared machine) for about --target-s a case and at least --min-iters pairs; medians, and the speedup
is the median of the paired ratios. Target: fp4op >= 10x faster than torchao eager. The load average
is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import common

SHAPES = ((1024, 4096), (4096, 4096))
THREADS = (1, 2)
TARGET_SPEEDUP = 10.0


def torchao_eager(recipe: str):
    """torchao's eager quantization of `recipe` with swizzled (128x4) scales, as a function of
    (x, fp4op global scale) returning (qdata, scale)."""
    if recipe == "nvfp4":
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

        def quantize(x, gs):
            # torchao divides by its per-tensor scale (0-d): the inverse of fp4op's global scale
            t = NVFP4Tensor.to_nvfp4(x, block_size=16, per_tensor_scale=torch.reciprocal(gs).reshape(()),
                                     is_swizzled_scales=True)
            return t.qdata, t.scale
    else:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        def quantize(x, gs):
            t = MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.RCEIL,
                               is_swizzled_scales=True)
            return t.qdata, t.scale
    return quantize


def fp4op_quantize(recipe: str):
    vec, ue8m0 = common.RECIPES[recipe]

    def quantize(x, gs):
        return torch.ops.fp4op.quantize(x, None if ue8m0 else gs, vec, ue8m0, True, False, False)

    return quantize


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - t0) * 1e6, (time.process_time() - c0) * 1e6


def time_pair(ours, theirs, target_s: float, min_iters: int) -> tuple[dict, dict, float]:
    """Calls the two functions alternately, so that both see the same machine load (a shared machine's
    load drifts), until about `target_s` has passed and each ran at least `min_iters` times. Returns
    each one's wall and process CPU time per call (medians; CPU time, summed over threads, is not
    inflated by waiting for a core) and the median of the paired ratios theirs / ours."""
    ours()
    theirs()  # warm-up
    samples = {"ours": ([], []), "theirs": ([], [])}
    ratios = []
    start = time.perf_counter()
    while len(ratios) < min_iters or time.perf_counter() - start < target_s:
        pair = {}
        for name, fn in (("ours", ours), ("theirs", theirs)):
            wall, cpu = _timed(fn)
            samples[name][0].append(wall)
            samples[name][1].append(cpu)
            pair[name] = wall
        ratios.append(pair["theirs"] / pair["ours"])

    def stats(wall, cpu):
        return {"time_us": common.median(wall), "time_us_p10": common.percentile(wall, 10),
                "time_us_p90": common.percentile(wall, 90), "cpu_time_us": common.median(cpu), "iters": len(wall)}

    return stats(*samples["ours"]), stats(*samples["theirs"]), common.median(ratios)


def match_fraction(a, b) -> float:
    a = a.contiguous().view(torch.uint8).reshape(-1)
    b = b.contiguous().view(torch.uint8).reshape(-1)
    return (a == b).double().mean().item() if a.numel() == b.numel() else 0.0


def run(args) -> dict:
    from fp4op import nvfp4_global_scale

    rows = []
    load_before = os.getloadavg()
    for threads in THREADS:
        torch.set_num_threads(threads)
        for m, k in SHAPES:
            x = torch.randn(m, k, dtype=torch.bfloat16) * 3
            gs = nvfp4_global_scale(x)
            for recipe in common.RECIPES:
                base = {"m": m, "k": k, "dtype": "bfloat16", "recipe": recipe, "layout": "128x4", "threads": threads,
                        **common.byte_counts(m, k, "bfloat16", recipe, "128x4")}
                ours = fp4op_quantize(recipe)
                theirs = torchao_eager(recipe)
                q_ours, sf_ours = ours(x, gs)
                q_theirs, sf_theirs = theirs(x, gs)
                agreement = {"x_q_match": match_fraction(q_ours, q_theirs), "sf_match": match_fraction(sf_ours, sf_theirs)}
                t_ours, t_theirs, paired = time_pair(lambda: ours(x, gs), lambda: theirs(x, gs), args.target_s,
                                                     args.min_iters)
                row_ours = {**base, "impl": "fp4op", **t_ours}
                row_theirs = {**base, "impl": "torchao_eager", **agreement, **t_theirs}
                for r in (row_ours, row_theirs):
                    r["gbps"] = r["effective_bytes"] / r["time_us"] / 1e3
                row_ours["speedup_vs_torchao_eager"] = paired
                row_ours["cpu_time_speedup_vs_torchao_eager"] = row_theirs["cpu_time_us"] / row_ours["cpu_time_us"]
                rows += [row_ours, row_theirs]
                print(f"{threads} thr {m:5d}x{k:<5d} {recipe}: fp4op {row_ours['time_us'] / 1e3:9.3f} ms "
                      f"({row_ours['gbps']:.2f} GB/s), torchao eager {row_theirs['time_us'] / 1e3:9.3f} ms, "
                      f"{row_ours['speedup_vs_torchao_eager']:.1f}x (CPU time "
                      f"{row_ours['cpu_time_speedup_vs_torchao_eager']:.1f}x; x_q agreement {agreement['x_q_match']:.4f})",
                      flush=True)
    return {
        "environment": common.environment("cpu"),
        "method": {"timer": "host clock around one call, fp4op and torchao called alternately",
                   "statistic": "median; speedup = median of the paired ratios", "target_s_per_case": args.target_s,
                   "min_iters": args.min_iters, "input": "torch.randn * 3, bf16; NVFP4 global scale 448*6/amax",
                   "torchao": "NVFP4Tensor.to_nvfp4 (per-tensor scale) and MXTensor.to_mx (FP4, RCEIL), eager, "
                              "is_swizzled_scales=True"},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
    }


def checks(results) -> list[dict]:
    ours = [r for r in results["rows"] if r["impl"] == "fp4op"]
    worst = min(ours, key=lambda r: r["speedup_vs_torchao_eager"])
    ok = all(r["speedup_vs_torchao_eager"] >= TARGET_SPEEDUP for r in ours)
    return [{"name": f"fp4op CPU >= {TARGET_SPEEDUP:.0f}x faster than torchao eager", "status": "PASS" if ok else "FAIL",
             "detail": f"worst {worst['speedup_vs_torchao_eager']:.1f}x at {worst['m']}x{worst['k']} {worst['recipe']} "
                       f"{worst['threads']} thread(s)"}]


def markdown(results) -> str:
    env = results["environment"]
    out = ["# fp4op CPU quantize vs torchao eager", ""]
    out.append(f"- CPU: {env['cpu']}; torch {env['torch']}, torchao {env['torchao']}, python {env['python']}")
    out.append(f"- fp4op {env['fp4op']['version']} at commit {env['git_commit']}; CPU row kernel: "
               f"{env['fp4op'].get('cpu_isa')} build")
    out.append(f"- method: {results['method']['timer']}; {results['method']['statistic']}; >= "
               f"{results['method']['min_iters']} pairs, ~{results['method']['target_s_per_case']} s a case; "
               f"bf16 input, 128x4 scales; torchao: {results['method']['torchao']}")
    out.append(f"- load average before/after: {', '.join(f'{v:.2f}' for v in results['load_average_before'])} / "
               f"{', '.join(f'{v:.2f}' for v in results['load_average_after'])} on {os.cpu_count()} CPUs: a shared "
               "machine, so absolute times and thread scaling are noisy; the paired speedups are the robust figure")
    out.append("")
    for c in checks(results):
        out.append(f"**{c['status']}** {c['name']} ({c['detail']})")
    out.append("")
    out.append("| threads | M | K | recipe | fp4op ms | fp4op GB/s | torchao eager ms | speedup | "
               "fp4op CPU ms | torchao CPU ms | CPU-time speedup | x_q agreement |")
    out.append("| --- " * 12 + "|")
    theirs = {(r["threads"], r["m"], r["k"], r["recipe"]): r for r in results["rows"] if r["impl"] == "torchao_eager"}
    for r in (r for r in results["rows"] if r["impl"] == "fp4op"):
        t = theirs[(r["threads"], r["m"], r["k"], r["recipe"])]
        out.append(f"| {r['threads']} | {r['m']} | {r['k']} | {r['recipe']} | {r['time_us'] / 1e3:.3f} | {r['gbps']:.2f} | "
                   f"{t['time_us'] / 1e3:.3f} | {r['speedup_vs_torchao_eager']:.1f}x | {r['cpu_time_us'] / 1e3:.3f} | "
                   f"{t['cpu_time_us'] / 1e3:.3f} | {r['cpu_time_speedup_vs_torchao_eager']:.1f}x | {t['x_q_match']:.4f} |")
    out.append("")
    out.append("ms: median wall time of one call; CPU ms: median process CPU time of one call (all threads), which "
               "waiting for a busy core does not inflate. x_q agreement: fraction of x_q bytes equal to torchao's (the recipes agree except where torchao's "
               "scale arithmetic rounds differently).")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(common.REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="cpu")
    p.add_argument("--target-s", type=float, default=3.0)
    p.add_argument("--min-iters", type=int, default=5)
    args = p.parse_args(argv)
    try:
        import torchao.prototype.mx_formats  # noqa: F401
    except Exception as e:
        print(f"bench_cpu.py needs torchao ({type(e).__name__}: {e})")
        return 1
    results = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.name)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(results))
    print()
    for c in checks(results):
        print(f"{c['status']}  {c['name']}  [{c['detail']}]")
    print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
