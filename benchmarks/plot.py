"""Achieved bandwidth (% of the copy bandwidth of the same effective bytes) against input size, one
panel per recipe, for fp4op and each peer, from a bench_quantize.py results JSON.

    python benchmarks/plot.py results.json out.png
"""

from __future__ import annotations

import json
import sys

MiB = 1 << 20

# (label, row filter, style): fp4op on every input dtype with 128x4 scales, the peers on bf16
SERIES = (
    ("fp4op bf16", lambda r: r["impl"] == "fp4op" and r["dtype"] == "bfloat16", {"color": "C0", "marker": "o", "lw": 2}),
    ("fp4op fp16", lambda r: r["impl"] == "fp4op" and r["dtype"] == "float16", {"color": "C4", "marker": "^", "ls": ":"}),
    ("fp4op fp8", lambda r: r["impl"] == "fp4op" and r["dtype"] == "float8_e4m3fn", {"color": "C2", "marker": "s", "ls": ":"}),
    ("torchao bf16 (compiled)", lambda r: r["impl"] == "torchao", {"color": "C3", "marker": "x", "ls": "--"}),
    ("torchao bf16 (compiled, dynamic=False)", lambda r: r["impl"] == "torchao_static",
     {"color": "C3", "marker": "X", "ls": "none", "ms": 8}),
    ("Inductor reference bf16", lambda r: r["impl"] == "inductor_reference", {"color": "C1", "marker": "d", "ls": "--"}),
)


def _points(rows):
    """(input MiB, mean % of copy over the shapes of that input size), sorted by size."""
    by_size = {}
    for r in rows:
        by_size.setdefault(r["input_bytes"], []).append(r["pct_of_copy"])
    return [(size / MiB, sum(v) / len(v)) for size, v in sorted(by_size.items())]


def make_plot(results: dict, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["section"] == "eager" and r.get("error") is None
            and r.get("pct_of_copy") is not None and r["layout"] == "128x4"]
    recipes = [rec for rec in ("nvfp4", "mxfp4") if any(r["recipe"] == rec for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(recipes)), figsize=(6.5 * max(1, len(recipes)), 4.8), squeeze=False)
    env = results["environment"]
    copy = results["copy_bandwidth"]
    for ax, recipe in zip(axes[0], recipes):
        for label, keep, style in SERIES:
            pts = _points([r for r in rows if r["recipe"] == recipe and keep(r)])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **{"ms": 5, **style})
        ax.set_xscale("log")
        ax.set_xlabel("input size (MiB)")
        ax.set_ylabel("% of copy bandwidth (same bytes)")
        ax.set_title(f"{recipe.upper()} quantize, 128x4 scales")
        ax.axhline(100, color="gray", lw=0.8)
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{env.get('device')}: copy {copy['GBps']:.0f} GB/s; torch {env.get('torch')}, "
                 f"commit {(env.get('git_commit') or '?')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def main(argv) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    with open(argv[1]) as f:
        results = json.load(f)
    make_plot(results, argv[2])
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
