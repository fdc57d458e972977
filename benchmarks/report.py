"""Speedups, issue 5's target checks and the markdown report of a bench_quantize.py results JSON.

    python benchmarks/report.py results.json [out.md]

prints the PASS/FAIL summary and (re)writes the markdown table.
"""

from __future__ import annotations

import json
import sys

MiB = 1 << 20
LARGE_INPUT_BYTES = 64 * MiB  # "inputs >= 64 MiB"
PEERS = ("torchao", "torchao_static", "inductor_reference")
PEER_TITLES = {
    "torchao": "torchao (compiled)",
    "torchao_static": "torchao (compiled, dynamic=False)",
    "inductor_reference": "Inductor (compiled reference)",
}

TARGET_NVFP4_PCT = 90.0
TARGET_ALL_PCT = 85.0
TARGET_LARGE_SPEEDUP = 3.5
TARGET_GRAPH_RATIO = 1.2


def _ok(row) -> bool:
    return row.get("error") is None and row.get("time_us") is not None


def _shape(row) -> str:
    return f"{row['m']}x{row['k']}"


def attach_speedups(results: dict) -> None:
    """speedup[peer] = peer time / fp4op time, on each fp4op row that has a peer row of the same
    section, shape, dtype, recipe and layout."""
    peer_time = {}
    for r in results["rows"]:
        if r["impl"] in PEERS and _ok(r):
            peer_time[(r["impl"], r["section"], r["m"], r["k"], r["dtype"], r["recipe"], r["layout"])] = r["time_us"]
    for r in results["rows"]:
        if r["impl"] != "fp4op" or not _ok(r):
            continue
        speedup = {}
        for peer in PEERS:
            t = peer_time.get((peer, r["section"], r["m"], r["k"], r["dtype"], r["recipe"], r["layout"]))
            if t is not None:
                speedup[peer] = t / r["time_us"]
        if speedup:
            r["speedup"] = speedup


def torchao_speedup(row):
    """fp4op's speedup over the fastest torchao compile measured at its shape (dynamic or static)."""
    values = [v for peer, v in row.get("speedup", {}).items() if peer.startswith("torchao")]
    return min(values) if values else None


def _rows(results, section="eager", impl="fp4op", **match):
    return [r for r in results["rows"] if r["section"] == section and r["impl"] == impl
            and all(r.get(key) == value for key, value in match.items())]


def _describe(row) -> str:
    return f"{_shape(row)} {row['dtype']} {row['recipe']} {row['layout']}"


def _check(name: str, rows, value, passes, fmt, worst=min, missing=()) -> dict:
    """PASS when `passes(value(row))` for every row; the detail names the worst row."""
    failed_runs = [r for r in rows if not _ok(r)]
    good = [r for r in rows if _ok(r) and value(r) is not None]
    if not good:
        return {"name": name, "status": "NO DATA", "detail": "no measured rows"}
    w = worst(good, key=value)
    status = "PASS" if all(passes(value(r)) for r in good) and not failed_runs and not missing else "FAIL"
    detail = f"worst {fmt(value(w))} at {_describe(w)} ({len(good)} rows)"
    if failed_runs:
        detail += f"; {len(failed_runs)} rows failed to run"
    if missing:
        detail += f"; {len(missing)} rows without a peer measurement"
    return {"name": name, "status": status, "detail": detail}


def checks(results: dict) -> list[dict]:
    out = []
    large = [r for r in _rows(results) if r["input_bytes"] >= LARGE_INPUT_BYTES]
    nvfp4_bf16 = [r for r in large if r["recipe"] == "nvfp4" and r["dtype"] == "bfloat16" and r["layout"] == "128x4"]
    pct = lambda r: r.get("pct_of_copy")  # noqa: E731
    out.append(_check(f"NVFP4 bf16 128x4, inputs >= 64 MiB: >= {TARGET_NVFP4_PCT:.0f}% of copy", nvfp4_bf16, pct,
                      lambda v: v >= TARGET_NVFP4_PCT, lambda v: f"{v:.1f}%"))
    out.append(_check(f"every dtype/recipe/layout, inputs >= 64 MiB: >= {TARGET_ALL_PCT:.0f}% of copy", large, pct,
                      lambda v: v >= TARGET_ALL_PCT, lambda v: f"{v:.1f}%"))

    # fp4op rows that have a torchao counterpart (bf16, 128x4, both recipes)
    bf16_128x4 = _rows(results, dtype="bfloat16", layout="128x4")
    torchao_rows = {(r["m"], r["k"], r["recipe"]) for r in _rows(results, impl="torchao") if _ok(r)}
    with_peer = [r for r in bf16_128x4 if (r["m"], r["k"], r["recipe"]) in torchao_rows]
    missing = [r for r in bf16_128x4 if (r["m"], r["k"], r["recipe"]) not in torchao_rows]
    speedup = torchao_speedup
    large_missing = [r for r in missing if r["input_bytes"] >= LARGE_INPUT_BYTES]
    out.append(_check(f"vs torchao (compiled), inputs >= 64 MiB: >= {TARGET_LARGE_SPEEDUP}x faster",
                      [r for r in with_peer if r["input_bytes"] >= LARGE_INPUT_BYTES], speedup,
                      lambda v: v >= TARGET_LARGE_SPEEDUP, lambda v: f"{v:.2f}x", missing=large_missing))
    out.append(_check("vs torchao (compiled): faster at every shape", with_peer, speedup,
                      lambda v: v > 1.0, lambda v: f"{v:.2f}x", missing=missing))

    graph = _rows(results, section="graph")
    ratio = lambda r: r.get("ratio_to_empty")  # noqa: E731
    out.append(_check(f"M <= 16 under CUDA-graph replay: within {TARGET_GRAPH_RATIO}x of the empty kernel", graph,
                      ratio, lambda v: v <= TARGET_GRAPH_RATIO, lambda v: f"{v:.2f}x", worst=max))
    return out


def summary_text(results: dict) -> str:
    lines = ["Targets (issue 5):"]
    for c in checks(results):
        lines.append(f"  {c['status']:7s} {c['name']}  [{c['detail']}]")
    inductor = [r["speedup"]["inductor_reference"] for r in _rows(results) if "inductor_reference" in r.get("speedup", {})]
    if inductor:
        lines.append(f"  INFO    vs Inductor-compiled reference: {min(inductor):.2f}x .. {max(inductor):.2f}x faster")
    if results.get("errors"):
        lines.append(f"  {len(results['errors'])} errors (see the JSON's 'errors')")
    return "\n".join(lines)


def _fmt_time(row) -> str:
    if row is None:
        return "-"
    if not _ok(row):
        return "error"
    return f"{row['time_us']:.1f} ({row['pct_of_copy']:.0f}%)" if "pct_of_copy" in row else f"{row['time_us']:.2f}"


def _mib(nbytes) -> str:
    return f"{nbytes / MiB:.3g}"


def markdown(results: dict) -> str:
    env = results["environment"]
    method = results["method"]
    copy = results["copy_bandwidth"]
    fp4op = env.get("fp4op", {})
    out = [f"# fp4op quantize benchmark ({results['suite']} suite)", ""]
    out.append(f"- device: {env.get('device')} (CUDA {env.get('torch_cuda')}), CPU: {env.get('cpu')}")
    out.append(f"- torch {env.get('torch')}, torchao {env.get('torchao')}, python {env.get('python')}")
    out.append(f"- fp4op {fp4op.get('version')} at commit {env.get('git_commit')}, CUDA kernels: "
               f"{fp4op.get('cuda_kernels')}, gencode: {fp4op.get('FP4OP_CUDA_GENCODE') or 'default'}")
    out.append(f"- copy bandwidth: **{copy['GBps']:.0f} GB/s** (device-to-device copy, "
               f"{copy['bytes_moved'] / MiB:.0f} MiB read + written)")
    out.append(f"- method: {method['timer']}, L2 flush of {method['l2_flush_MiB']} MiB before each iteration, "
               "then a ~100 µs GPU spin (so that the host's dispatch is never inside the timed span), "
               f"{method['statistic']} of an adaptive number of iterations (~{method['target_ms_per_case']:.0f} ms "
               f"a case, {method['min_iters']}..{method['max_iters']}); effective bytes = {method['effective_bytes']}; "
               f"% = time of a copy of the same effective bytes ({method['copy']}) / time")
    pc = method.get("peer_compile", {})
    out.append(f"- peers: torch.compile, dynamic shapes `{pc.get('dynamic')}`, {pc.get('spent_s')} s compiling; "
               f"wall time {results.get('wall_s', {}).get('total')} s")
    out.append("")
    out.append("## Targets")
    out.append("")
    out.append("| status | target | detail |")
    out.append("| --- | --- | --- |")
    for c in checks(results):
        out.append(f"| {c['status']} | {c['name']} | {c['detail']} |")
    out.append("")

    # fp4op against the peers
    out.append("## fp4op vs peers (bf16 input, 128x4 scales)")
    out.append("")
    out.append("Time in µs (% of copy bandwidth); speedup = peer time / fp4op time.")
    out.append("")
    by_key = {(r["impl"], r["section"], r["m"], r["k"], r["dtype"], r["recipe"], r["layout"]): r
              for r in results["rows"]}
    eager_fp4op = _rows(results, dtype="bfloat16", layout="128x4")
    peers_present = [p for p in PEERS if any(r["impl"] == p for r in results["rows"])]
    out.append("| recipe | M | K | input MiB | copy GB/s | fp4op | " + " | ".join(PEER_TITLES[p] for p in peers_present)
               + " | " + " | ".join(f"speedup vs {p}" for p in peers_present) + " |")
    out.append("| --- " * (6 + 2 * len(peers_present)) + "|")
    for r in sorted(eager_fp4op, key=lambda r: (r["recipe"], r["input_bytes"], r["m"])):
        peers = [by_key.get((p, "eager", r["m"], r["k"], r["dtype"], r["recipe"], r["layout"])) for p in peers_present]
        speedups = [f"{r['speedup'][p]:.2f}x" if p in r.get("speedup", {}) else "-" for p in peers_present]
        copy_gbps = f"{r['copy_gbps']:.0f}" if _ok(r) else "-"
        out.append(f"| {r['recipe']} | {r['m']} | {r['k']} | {_mib(r['input_bytes'])} | {copy_gbps} | {_fmt_time(r)} | "
                   + " | ".join(_fmt_time(p) for p in peers) + " | " + " | ".join(speedups) + " |")
    out.append("")

    # fp4op everywhere
    layouts = sorted({r["layout"] for r in _rows(results)}, key=["128x4", "8x4", "linear"].index)
    out.append("## fp4op, every dtype, recipe and layout")
    out.append("")
    out.append("Time in µs (% of copy bandwidth of the same effective bytes).")
    out.append("")
    out.append("| M | K | dtype | recipe | input MiB | " + " | ".join(layouts) + " |")
    out.append("| --- " * (5 + len(layouts)) + "|")
    groups = {}
    for r in _rows(results):
        groups.setdefault((r["m"], r["k"], r["dtype"], r["recipe"]), {})[r["layout"]] = r
    for (m, k, dtype, recipe), by_layout in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][0] * kv[0][1], kv[0][0])):
        any_row = next(iter(by_layout.values()))
        out.append(f"| {m} | {k} | {dtype} | {recipe} | {_mib(any_row['input_bytes'])} | "
                   + " | ".join(_fmt_time(by_layout.get(lay)) for lay in layouts) + " |")
    out.append("")

    graph = [r for r in results["rows"] if r["section"] == "graph"]
    if graph:
        out.append("## Small M under CUDA-graph replay")
        out.append("")
        out.append(f"µs per call, {method['graph']}; empty kernel: "
                   f"{results.get('graph_empty_kernel_us') or 0:.2f} µs per call.")
        out.append("")
        out.append("| impl | M | K | dtype | recipe | layout | µs per call | x empty kernel |")
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in sorted(graph, key=lambda r: (r["impl"] != "fp4op", r["impl"], r["dtype"], r["recipe"], r["layout"], r["m"], r["k"])):
            if _ok(r):
                out.append(f"| {r['impl']} | {r['m']} | {r['k']} | {r['dtype']} | {r['recipe']} | {r['layout']} | "
                           f"{r['time_us']:.2f} | {r['ratio_to_empty']:.2f} |")
            else:
                out.append(f"| {r['impl']} | {r['m']} | {r['k']} | {r['dtype']} | {r['recipe']} | {r['layout']} | error | - |")
        out.append("")

    failed = [r for r in results["rows"] if r.get("error")]
    if failed or results.get("errors"):
        out.append("## Errors and skipped cases")
        out.append("")
        seen = set()
        for r in failed:
            line = f"- {r['section']} {r['impl']} {_describe(r)}: {r['error']}"
            if line not in seen:
                seen.add(line)
                out.append(line)
        for e in results.get("errors", []):
            if not any(e in s for s in seen):
                out.append(f"- {e}")
        out.append("")
    return "\n".join(out)


def main(argv) -> int:
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    with open(argv[1]) as f:
        results = json.load(f)
    attach_speedups(results)
    print(summary_text(results))
    if len(argv) == 3:
        with open(argv[2], "w") as f:
            f.write(markdown(results))
        print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
