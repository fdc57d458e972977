"""GPU benchmark of fp4op quantization against a device-to-device copy and the peers a user would
pick instead (issue 5). One command on the GPU machine:

    python benchmarks/bench_quantize.py --suite full --out-dir $OUT

Measured in one process, per problem (M x K, input dtype, recipe, scale layout):
* copy     -- a device-to-device copy of a uint8 tensor of effective_bytes / 2 bytes: it reads and
              writes effective_bytes in total, the least traffic the quantization itself can do
              (effective_bytes = input + x_q + sf, padding included; the same for every row);
* fp4op    -- torch.ops.fp4op.quantize;
* torchao  -- torchao.prototype.mx_formats under torch.compile: NVFP4Tensor.to_nvfp4 (per-tensor
              scale, swizzled scales) and MXTensor.to_mx (FP4, RCEIL scales, swizzled), bf16 input,
              128x4 layout (the only one torchao writes);
* inductor_reference -- torch.compile of fp4op.reference.quantize: what Inductor alone generates
              for the same numerics (bf16, 128x4).
Eager timings use CUDA events around one call, after an L2 flush (a 256 MiB write) before every
iteration; the median over an adaptive number of iterations is reported. Small M (<= 16) is also timed
under CUDA-graph replay against an empty kernel captured the same way. Results: JSON, a markdown
table, a PNG plot (benchmarks/plot.py) and a PASS/FAIL summary of issue 5's targets
(benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import types

import torch

import common
import report

SUITES = {
    # fp4op on everything; the peers on bf16 128x4 for every shape
    "full": {
        "ms": (1, 16, 128, 1024, 8192, 32768),
        "ks": (2048, 4096, 8192, 16384),
        "dtypes": ("bfloat16", "float16", "float8_e4m3fn"),
        "recipes": ("nvfp4", "mxfp4"),
        "layouts": common.LAYOUTS,
        "static_shapes": "32768x16384,16x4096",
    },
    # every code path and every check, on a few shapes (8192 x 4096 bf16 is 64 MiB)
    "quick": {
        "ms": (1, 16, 8192),
        "ks": (4096, 16384),
        "dtypes": ("bfloat16", "float16", "float8_e4m3fn"),
        "recipes": ("nvfp4", "mxfp4"),
        "layouts": common.LAYOUTS,
        "static_shapes": "8192x16384",
    },
    # a CPU dry run of the whole script (tiny shapes, host clock): checks the script, not a device
    "cpu-dry-run": {
        "ms": (1, 16, 256),
        "ks": (256,),
        "dtypes": ("bfloat16", "float8_e4m3fn"),
        "recipes": ("nvfp4", "mxfp4"),
        "layouts": common.LAYOUTS,
        "static_shapes": "256x256",
    },
}
SMALL_M = 16  # M <= SMALL_M is also timed under CUDA-graph replay
PEER_DTYPE = "bfloat16"
PEER_LAYOUT = "128x4"
PEER_NAMES = ("torchao", "inductor_reference")


# ---------------------------------------------------------------------------------------------
# timing


class CudaTimer:
    """Median device time of one call, CUDA events around it, L2 flushed before each iteration."""

    # A spin of the GPU after each flush, so that the device is still busy when the host enqueues the
    # start event and the call: otherwise a host slower than the device (a busy CPU, e.g. the peers'
    # compile workers) puts the call's dispatch time between the events (seen: a 22 us case timed at 65 us).
    BACKLOG_CYCLES = 200_000  # ~100 us

    def __init__(self, target_s: float, min_iters: int, max_iters: int, flush_bytes: int):
        self.target_s, self.min_iters, self.max_iters = target_s, min_iters, max_iters
        self.flush_buf = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
        self.flush_s = common.median(self._timed(self._flush, 20, flush=False)) * 1e-6

    def _flush(self) -> None:
        self.flush_buf.zero_()  # evicts the previous iteration's data from L2 (> L2 size)
        torch.cuda._sleep(self.BACKLOG_CYCLES)

    def _timed(self, fn, n: int, flush: bool = True) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if flush:
                self._flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]

    def measure(self, fn, target_s: float | None = None) -> dict:
        fn()  # warm-up: compiles, loads modules, fills the allocator's cache
        torch.cuda.synchronize()
        estimate_s = common.median(self._timed(fn, 3)) * 1e-6
        target_s = self.target_s if target_s is None else target_s
        n = int(target_s / (estimate_s + self.flush_s))
        n = max(self.min_iters, min(self.max_iters, n))
        times = self._timed(fn, n)
        return {
            "time_us": common.median(times),
            "time_us_p10": common.percentile(times, 10),
            "time_us_p90": common.percentile(times, 90),
            "iters": n,
        }

    def graph_replay(self, fn, calls: int, replays: int) -> dict:
        """Time per call of `fn` captured `calls` times in one CUDA graph (no L2 flush: back-to-back
        kernels on L2-resident data, as inside a model's decode step)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
        for i in range(replays):
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        per_call = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends)]
        del graph
        return {"time_us": common.median(per_call), "iters": replays, "calls_per_graph": calls}


class HostTimer:
    """The CPU dry run's stand-in for CudaTimer (host clock, no flush, no graphs)."""

    def __init__(self, target_s: float, min_iters: int, max_iters: int):
        self.target_s, self.min_iters, self.max_iters = target_s, min_iters, max_iters
        self.flush_s = 0.0

    def measure(self, fn, target_s: float | None = None) -> dict:
        fn()
        t0 = time.perf_counter()
        fn()
        estimate_s = time.perf_counter() - t0
        target_s = self.target_s if target_s is None else target_s
        n = max(self.min_iters, min(self.max_iters, int(target_s / max(estimate_s, 1e-6))))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return {
            "time_us": common.median(times),
            "time_us_p10": common.percentile(times, 10),
            "time_us_p90": common.percentile(times, 90),
            "iters": n,
        }


# ---------------------------------------------------------------------------------------------
# the peers


def torchao_nvfp4(x, per_tensor_scale):
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    t = NVFP4Tensor.to_nvfp4(x, block_size=16, per_tensor_scale=per_tensor_scale, is_swizzled_scales=True)
    return t.qdata, t.scale


def torchao_mxfp4(x):
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    # RCEIL: the scale is the power of two at or above amax / 6, fp4op's (and cuBLAS's) MXFP4 recipe
    t = MXTensor.to_mx(
        x, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.RCEIL, is_swizzled_scales=True
    )
    return t.qdata, t.scale


def reference_nvfp4(x, global_scale):
    from fp4op import reference

    return reference.quantize(x, global_scale, 16, False, PEER_LAYOUT)


def reference_mxfp4(x):
    from fp4op import reference

    return reference.quantize(x, None, 32, True, PEER_LAYOUT)


# (peer, recipe) -> (function, its arguments from (x, fp4op's global scale))
PEERS = {
    # torchao divides by its per-tensor scale, and wants it 0-d
    ("torchao", "nvfp4"): (torchao_nvfp4, lambda x, gs: (x, torch.reciprocal(gs).reshape(()))),
    ("torchao", "mxfp4"): (torchao_mxfp4, lambda x, gs: (x,)),
    ("inductor_reference", "nvfp4"): (reference_nvfp4, lambda x, gs: (x, gs)),
    ("inductor_reference", "mxfp4"): (reference_mxfp4, lambda x, gs: (x,)),
}


def _fresh_code(fn, suffix: str):
    """A copy of `fn` with its own code object: Dynamo keeps its compiled graphs per code object, so
    a second torch.compile of the copy with other shape settings does not reuse the first's graphs."""
    return types.FunctionType(fn.__code__.replace(co_name=fn.__name__ + suffix), fn.__globals__, fn.__name__ + suffix)


class CompiledPeers:
    """torch.compile'd peers, one per (peer, recipe, shape mode). Shape modes:
    "all": M and K dynamic (the fewest compiles: graphs for M = 1, which Dynamo always specializes,
           for 2 <= M <= 128 and for M > 128, see _graph_key);
    "m": M dynamic, K static (the same graphs per K) -- a model's layers have fixed K while the token
         count M varies;
    "static": dynamic=False, one graph per shape (the slowest to compile; used for the static
           cross-check rows "<peer>_static")."""

    def __init__(self, compile_budget_s: float):
        self.budget_s = compile_budget_s
        self.spent_s = 0.0
        self.compiled = {}
        self.graphs_seen = set()
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 512))
        cfg.automatic_dynamic_shapes = False  # only the dims we mark are dynamic

    @staticmethod
    def _graph_key(peer, recipe, mode, m, k):
        """Which compiled graph serves M x K. With dynamic M, Dynamo still splits M = 1, 2..128 and
        > 128: the swizzle's reshape of the padded scales specializes a row-tile count of 1."""
        if mode == "static":
            return (peer, recipe, mode, m, k)
        m_range = 1 if m == 1 else (128 if m <= 128 else None)
        return (peer, recipe, mode, m_range) if mode == "all" else (peer, recipe, mode, m_range, k)

    def needs_compile(self, peer, recipe, mode, m, k) -> bool:
        return self._graph_key(peer, recipe, mode, m, k) not in self.graphs_seen

    def over_budget(self) -> bool:
        return self.spent_s > self.budget_s

    @staticmethod
    def prepare(x, mode):
        """The input as the compiled function of `mode` gets it: a fresh view carrying that mode's
        dynamic-dimension marks (marks live on the tensor object)."""
        x = x.view(x.shape)
        if mode != "static":
            if x.shape[0] >= 2:  # Dynamo specializes a size of 1 anyway
                torch._dynamo.maybe_mark_dynamic(x, 0)
            if mode == "all":
                torch._dynamo.maybe_mark_dynamic(x, 1)
        return x

    def function(self, peer, recipe, mode):
        key = (peer, recipe, mode)
        if key not in self.compiled:
            fn = _fresh_code(PEERS[(peer, recipe)][0], "_" + mode)
            self.compiled[key] = torch.compile(fn, dynamic=False if mode == "static" else None)
        return self.compiled[key]

    def first_call(self, peer, recipe, mode, m, k, args) -> float:
        """Runs the first call of a shape, compiling if Dynamo needs to (also where a graph was
        expected to be reused but a guard failed); returns its seconds, counted against the budget."""
        fn = self.function(peer, recipe, mode)
        t0 = time.perf_counter()
        try:
            fn(*args)
            if args[0].is_cuda:
                torch.cuda.synchronize()
            self.graphs_seen.add(self._graph_key(peer, recipe, mode, m, k))
        finally:  # a failed compile spends the budget too
            elapsed = time.perf_counter() - t0
            self.spent_s += elapsed
        return elapsed


# ---------------------------------------------------------------------------------------------
# inputs and checks


def make_input(m: int, k: int, dtype: str, device: str) -> torch.Tensor:
    """Random normal data (never zeros: they can run faster and hide unwritten outputs), scaled so
    that fp8 inputs use a good part of their range."""
    if dtype == "float8_e4m3fn":
        return (torch.randn(m, k, device=device, dtype=torch.bfloat16) * 32).to(torch.float8_e4m3fn)
    return torch.randn(m, k, device=device, dtype=common.DTYPES[dtype]) * 3


def global_scale_of(x: torch.Tensor) -> torch.Tensor:
    """fp4op.nvfp4_global_scale of x; fp8 inputs are widened (exactly) to bf16 first, as some float8
    element-wise kernels (abs) may be missing on CUDA."""
    from fp4op import nvfp4_global_scale

    return nvfp4_global_scale(x.to(torch.bfloat16) if x.dtype == torch.float8_e4m3fn else x)


def verify_fp4op(x, gs, recipe, layout, x_q, sf, rows: int = 128) -> bool:
    """fp4op's outputs of the timed run against fp4op.reference on the first `rows` rows."""
    from fp4op import layouts, reference

    vec, ue8m0 = common.RECIPES[recipe]
    m, k = x.shape
    r = min(m, rows)
    ref_q, ref_sf = reference.quantize(x[:r], None if ue8m0 else gs, vec, ue8m0, layouts.LINEAR)
    got_sf = layouts.unswizzle(sf, m, k // vec, layout)[:r]
    return bool(torch.equal(x_q[:r], ref_q) and torch.equal(got_sf, ref_sf))


def match_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of equal bytes of two outputs with the same bytes in possibly different views."""
    a = a.contiguous().view(torch.uint8).reshape(-1)
    b = b.contiguous().view(torch.uint8).reshape(-1)
    if a.numel() != b.numel():
        return 0.0
    return (a == b).double().mean().item()


def short_error(e: BaseException) -> str:
    """The error's type and the first line of its message (Dynamo appends pages of advice)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) < 400 else text[:400] + " ..."


# ---------------------------------------------------------------------------------------------
# the suite


class Bench:
    def __init__(self, args, device: str):
        self.args = args
        self.device = device
        self.suite = SUITES[args.suite]
        if device == "cuda":
            self.timer = CudaTimer(args.target_ms / 1e3, args.min_iters, args.max_iters, args.flush_mib * common.MiB)
        else:
            self.timer = HostTimer(args.target_ms / 1e3, args.min_iters, args.max_iters)
        self.rows: list[dict] = []
        self.copy_cache: dict[int, dict] = {}
        self.errors: list[str] = []
        self.peers = None if args.skip_peers else CompiledPeers(args.compile_budget_s)
        shapes = self.suite["static_shapes"] if args.static_shapes is None else args.static_shapes
        self.static_shapes = {tuple(int(v) for v in s.split("x")) for s in shapes.split(",") if s}
        self.peer_import_error = None
        self.dynamic_failures: dict[tuple, str] = {}  # (peer, recipe, mode) -> the compile error
        if self.peers is not None:
            try:
                import torchao.prototype.mx_formats  # noqa: F401
            except Exception as e:  # torchao missing or broken: the inductor peer still runs
                self.peer_import_error = short_error(e)
                print(f"torchao unavailable, its rows are skipped: {self.peer_import_error}", flush=True)

    def log(self, msg: str):
        print(msg, flush=True)

    # the reference copy ------------------------------------------------------------------
    def copy(self, effective_bytes: int) -> dict:
        n = max(1, effective_bytes // 2)
        if n not in self.copy_cache:
            src = torch.empty(n, dtype=torch.uint8, device=self.device).random_(0, 256)
            dst = torch.empty_like(src)
            t = self.timer.measure(lambda: dst.copy_(src), target_s=self.args.target_ms / 2e3)
            t["bytes"] = 2 * n
            t["gbps"] = 2 * n / t["time_us"] / 1e3
            self.copy_cache[n] = t
            del src, dst
        return self.copy_cache[n]

    def peak_copy(self) -> dict:
        """The device's copy bandwidth: 1 GiB read + 1 GiB written (16 MiB each on the CPU dry run)."""
        nbytes = (1 << 30) if self.device == "cuda" else (16 << 20)
        t = self.copy(2 * nbytes)
        return {"bytes_moved": t["bytes"], "time_us": t["time_us"], "GBps": t["gbps"]}

    def add_row(self, base: dict, timing: dict | None, error: str | None = None, **extra) -> dict:
        row = dict(base)
        row.update(extra)
        row["error"] = error
        if timing is not None:
            row.update(timing)
            copy = self.copy(row["effective_bytes"])
            row["gbps"] = row["effective_bytes"] / row["time_us"] / 1e3
            row["copy_time_us"] = copy["time_us"]
            row["copy_gbps"] = copy["gbps"]
            row["pct_of_copy"] = 100.0 * copy["time_us"] / row["time_us"]
        self.rows.append(row)
        return row

    # eager --------------------------------------------------------------------------------
    def run_fp4op(self, x, gs, m, k, dtype):
        for recipe in self.suite["recipes"]:
            vec, ue8m0 = common.RECIPES[recipe]
            for layout in self.suite["layouts"]:
                base = {"section": "eager", "impl": "fp4op", "m": m, "k": k, "dtype": dtype, "recipe": recipe,
                        "layout": layout, **common.byte_counts(m, k, dtype, recipe, layout)}
                swizzled, is_8x4 = layout != "linear", layout == "8x4"
                g = None if ue8m0 else gs

                def call():
                    return torch.ops.fp4op.quantize(x, g, vec, ue8m0, swizzled, is_8x4, False)

                try:
                    x_q, sf = call()
                    verified = verify_fp4op(x, gs, recipe, layout, x_q, sf)
                    del x_q, sf
                    timing = self.timer.measure(call)
                    row = self.add_row(base, timing, verified=verified)
                    if not verified:
                        self.errors.append(f"fp4op {m}x{k} {dtype} {recipe} {layout}: output differs from reference")
                    self.log(f"  fp4op {recipe:5s} {layout:6s} {row['time_us']:10.2f} us "
                             f"{row['gbps']:8.1f} GB/s {row['pct_of_copy']:6.1f}% of copy"
                             + ("" if verified else "  MISMATCH"))
                except Exception as e:
                    self.add_row(base, None, short_error(e))
                    self.errors.append(f"fp4op {m}x{k} {dtype} {recipe} {layout}: {short_error(e)}")
                    self.log(f"  fp4op {recipe} {layout} FAILED: {short_error(e)}")

    def peer_variants(self, m, k):
        """(peer, compile shape mode, row name) of the peers timed at M x K."""
        variants = [(peer, self.args.peer_dynamic, peer) for peer in PEER_NAMES]
        if (m, k) in self.static_shapes and self.args.peer_dynamic != "static":
            variants.append(("torchao", "static", "torchao_static"))
        return variants

    def peer_mode(self, peer, recipe, mode) -> str:
        """`mode`, or "static" once a dynamic-shape compile of this peer has failed."""
        return "static" if (peer, recipe, mode) in self.dynamic_failures else mode

    def run_peers(self, x, gs, m, k):
        for recipe in self.suite["recipes"]:
            vec, ue8m0 = common.RECIPES[recipe]
            fp4op_out = torch.ops.fp4op.quantize(x, None if ue8m0 else gs, vec, ue8m0, True, False, False)
            for peer, asked_mode, impl in self.peer_variants(m, k):
                base = {"section": "eager", "impl": impl, "m": m, "k": k, "dtype": PEER_DTYPE, "recipe": recipe,
                        "layout": PEER_LAYOUT, **common.byte_counts(m, k, PEER_DTYPE, recipe, PEER_LAYOUT)}
                if peer == "torchao" and self.peer_import_error:
                    self.add_row(base, None, self.peer_import_error)
                    continue
                mode = self.peer_mode(peer, recipe, asked_mode)
                try:
                    self._time_peer(base, peer, recipe, mode, x, gs, fp4op_out)
                except Exception as e:
                    if mode == "static":
                        self._peer_failed(base, e)
                        continue
                    # a dynamic-shape compile that fails (an Inductor limitation) falls back to dynamic=False
                    self.dynamic_failures[(peer, recipe, mode)] = short_error(e)
                    self.log(f"  {impl} {recipe}: compile with dynamic shapes ({mode}) failed, using dynamic=False: "
                             f"{short_error(e)}")
                    try:
                        self._time_peer(base, peer, recipe, "static", x, gs, fp4op_out)
                    except Exception as e2:
                        self._peer_failed(base, e2)
            del fp4op_out

    def _time_peer(self, base, peer, recipe, mode, x, gs, fp4op_out):
        m, k, impl = base["m"], base["k"], base["impl"]
        if self.peers.needs_compile(peer, recipe, mode, m, k) and self.peers.over_budget():
            self.add_row(base, None, f"skipped: compile budget of {self.args.compile_budget_s:.0f} s spent")
            self.log(f"  {impl} {recipe}: skipped, compile budget spent")
            return
        args = PEERS[(peer, recipe)][1](self.peers.prepare(x, mode), gs)
        first_s = self.peers.first_call(peer, recipe, mode, m, k, args)
        fn = self.peers.function(peer, recipe, mode)
        q, s = fn(*args)
        same = {"x_q_match": match_fraction(q, fp4op_out[0]), "sf_match": match_fraction(s, fp4op_out[1])}
        del q, s
        timing = self.timer.measure(lambda: fn(*args))
        fallback = self.dynamic_failures.get((peer, recipe, self.args.peer_dynamic)) if mode == "static" else None
        row = self.add_row(base, timing, compile_mode=mode, first_call_s=round(first_s, 2),
                           dynamic_compile_error=fallback, **same)
        self.log(f"  {impl:18s} {recipe:5s} {row['time_us']:10.2f} us {row['gbps']:8.1f} GB/s "
                 f"{row['pct_of_copy']:6.1f}% of copy (first call, compile {mode}: {first_s:.1f} s, "
                 f"x_q match {same['x_q_match']:.4f})")

    def _peer_failed(self, base, e):
        self.add_row(base, None, short_error(e))
        self.errors.append(f"{base['impl']} {base['m']}x{base['k']} {base['recipe']}: {short_error(e)}")
        self.log(f"  {base['impl']} {base['recipe']} FAILED: {short_error(e)}")
        if self.args.verbose:
            traceback.print_exc()

    # CUDA graphs ---------------------------------------------------------------------------
    def run_graphs(self, inputs):
        calls, replays = self.args.graph_calls, self.args.graph_replays
        tiny = torch.zeros(1, device=self.device)
        empty = self.timer.graph_replay(lambda: tiny.add_(1), calls, replays)
        self.graph_empty_us = empty["time_us"]
        self.log(f"graph replay: empty kernel (1-element add_) {empty['time_us']:.2f} us per call")
        for (m, k, dtype), (x, gs) in inputs.items():
            for recipe in self.suite["recipes"]:
                vec, ue8m0 = common.RECIPES[recipe]
                g = None if ue8m0 else gs
                for layout in self.suite["layouts"]:
                    base = {"section": "graph", "impl": "fp4op", "m": m, "k": k, "dtype": dtype, "recipe": recipe,
                            "layout": layout, **common.byte_counts(m, k, dtype, recipe, layout)}
                    swizzled, is_8x4 = layout != "linear", layout == "8x4"
                    # default: Programmatic Dependent Launch (sm_90+); without it too, for bf16, to show its share
                    variants = [("fp4op", None)] + ([("fp4op (no PDL)", False)] if dtype == PEER_DTYPE else [])
                    for impl, pdl in variants:
                        row = dict(base, impl=impl)
                        flags = (vec, ue8m0, swizzled, is_8x4, False) + (() if pdl is None else (pdl,))
                        if not self._graph_row(row, lambda: torch.ops.fp4op.quantize(x, g, *flags)):
                            return
        if self.peers is None:
            return
        # the peers last: a capture that fails inside compiled code could leave the stream unusable
        for (m, k, dtype), (x, gs) in inputs.items():
            if dtype != PEER_DTYPE:
                continue
            for recipe in self.suite["recipes"]:
                for peer, asked_mode, impl in self.peer_variants(m, k):
                    mode = self.peer_mode(peer, recipe, asked_mode)
                    if (peer == "torchao" and self.peer_import_error) or self.peers.needs_compile(peer, recipe, mode, m, k):
                        continue  # not compiled in the eager section (error or budget): nothing to replay
                    base = {"section": "graph", "impl": impl, "m": m, "k": k, "dtype": dtype, "recipe": recipe,
                            "layout": PEER_LAYOUT, **common.byte_counts(m, k, dtype, recipe, PEER_LAYOUT)}
                    args = PEERS[(peer, recipe)][1](self.peers.prepare(x, mode), gs)
                    fn = self.peers.function(peer, recipe, mode)
                    if not self._graph_row(base, lambda: fn(*args)):
                        return

    def _graph_row(self, base, fn) -> bool:
        """Adds a graph-replay row; False when the device is no longer usable after a failure."""
        try:
            t = self.timer.graph_replay(fn, self.args.graph_calls, self.args.graph_replays)
        except Exception as e:
            row = dict(base)
            row["error"] = short_error(e)
            self.rows.append(row)
            self.errors.append(f"graph {base['impl']} {base['m']}x{base['k']} {base['recipe']}: {short_error(e)}")
            self.log(f"  graph {base['impl']} {base['m']}x{base['k']} {base['recipe']} FAILED: {short_error(e)}")
            try:
                torch.cuda.synchronize()
                return True
            except Exception as e2:
                self.errors.append(f"graph section stopped, device unusable: {short_error(e2)}")
                return False
        row = dict(base)
        row.update(t)
        row["error"] = None
        row["empty_kernel_us"] = self.graph_empty_us
        row["ratio_to_empty"] = t["time_us"] / self.graph_empty_us
        row["gbps"] = row["effective_bytes"] / t["time_us"] / 1e3
        self.rows.append(row)
        self.log(f"  graph {base['impl']:18s} {base['m']:3d}x{base['k']:<5d} {base['dtype']:13s} "
                 f"{base['recipe']:5s} {base['layout']:6s} {t['time_us']:8.2f} us "
                 f"({row['ratio_to_empty']:.2f}x empty)")
        return True

    # all ------------------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.perf_counter()
        peak = self.peak_copy()
        self.log(f"copy bandwidth: {peak['GBps']:.1f} GB/s ({peak['bytes_moved'] / common.MiB:.0f} MiB moved)")
        small_inputs = {}
        skipped = []
        for k in self.suite["ks"]:
            for m in self.suite["ms"]:
                for dtype in self.suite["dtypes"]:
                    if time.perf_counter() - t_start > 60 * self.args.max_minutes:
                        skipped.append(f"{m}x{k} {dtype}")
                        continue
                    x = make_input(m, k, dtype, self.device)
                    gs = global_scale_of(x)
                    self.log(f"{m} x {k} {dtype} ({x.numel() * x.element_size() / common.MiB:.2f} MiB)")
                    self.run_fp4op(x, gs, m, k, dtype)
                    if dtype == PEER_DTYPE and self.peers is not None:
                        self.run_peers(x, gs, m, k)
                    if m <= SMALL_M and self.device == "cuda" and not self.args.skip_graph:
                        small_inputs[(m, k, dtype)] = (x, gs)
                    del x, gs
                if self.device == "cuda":
                    torch.cuda.empty_cache()
        eager_s = time.perf_counter() - t_start
        if skipped:
            self.errors.append(f"--max-minutes {self.args.max_minutes} reached: not measured: {', '.join(skipped)}")
            self.log(self.errors[-1])
        if small_inputs:
            self.run_graphs(small_inputs)
        return {
            "suite": self.args.suite,
            "environment": common.environment(self.device),
            "method": {
                "timer": "CUDA events around one call" if self.device == "cuda" else "host clock (dry run)",
                "l2_flush_MiB": self.args.flush_mib if self.device == "cuda" else 0,
                "l2_flush_us": self.timer.flush_s * 1e6,
                "target_ms_per_case": self.args.target_ms,
                "min_iters": self.args.min_iters,
                "max_iters": self.args.max_iters,
                "statistic": "median",
                "effective_bytes": "input + x_q + sf (sf padding included), the same for every row",
                "copy": "uint8 device-to-device copy of effective_bytes/2 bytes: reads + writes effective_bytes",
                "graph": (f"{self.args.graph_calls} calls captured in one CUDA graph, median of "
                          f"{self.args.graph_replays} replays, no L2 flush; empty kernel = add_ on a 1-element tensor"),
                "peer_compile": {"dynamic": self.args.peer_dynamic, "budget_s": self.args.compile_budget_s,
                                 "static_shapes": sorted(f"{m}x{k}" for m, k in self.static_shapes),
                                 "spent_s": round(self.peers.spent_s, 1) if self.peers else 0.0},
            },
            "copy_bandwidth": peak,
            "graph_empty_kernel_us": getattr(self, "graph_empty_us", None),
            "rows": self.rows,
            "errors": self.errors,
            "wall_s": {"eager": round(eager_s, 1), "total": round(time.perf_counter() - t_start, 1)},
        }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--out-dir", default=os.path.join(common.REPO_ROOT, "benchmarks", "results"))
    p.add_argument("--name", default=None, help="file stem of the outputs (default: quantize_<suite>)")
    p.add_argument("--target-ms", type=float, default=100.0, help="wall time aimed at per case")
    p.add_argument("--min-iters", type=int, default=10)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--flush-mib", type=int, default=256, help="bytes written between iterations to flush L2")
    p.add_argument("--peer-dynamic", choices=("all", "m", "static"), default="all",
                   help="dynamic shapes of the compiled peers (see CompiledPeers)")
    p.add_argument("--static-shapes", default=None,
                   help="MxK,... where torchao is also timed compiled with dynamic=False (default: per suite)")
    p.add_argument("--compile-budget-s", type=float, default=180.0,
                   help="peers needing a new compile after this many seconds of compiling are skipped")
    p.add_argument("--max-minutes", type=float, default=7.0,
                   help="after this long, the remaining eager cases are skipped (and listed), so that the "
                        "results are written within a 10-minute command")
    p.add_argument("--graph-calls", type=int, default=50, help="calls captured in one CUDA graph")
    p.add_argument("--graph-replays", type=int, default=20)
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-graph", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.suite == "cpu-dry-run":
        device = "cpu"
    elif not torch.cuda.is_available():
        print("bench_quantize.py: no CUDA device here, nothing to measure (the GPU benchmark needs one; "
              "`--suite cpu-dry-run` exercises the script on the CPU, benchmarks/bench_cpu.py times the "
              "CPU kernel).")
        return 0
    else:
        device = "cuda"
    import fp4op

    if device == "cuda" and not common.fp4op_build_info()["cuda_kernels"]:
        print("bench_quantize.py: fp4op was built without its CUDA kernels (FP4OP_CPU_ONLY?); rebuild it with CUDA.")
        return 1
    del fp4op
    results = Bench(args, device).run()
    report.attach_speedups(results)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.name or f"quantize_{args.suite}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report.markdown(results))
    written = [stem + ".json", stem + ".md"]
    if not args.no_plot:
        try:
            import plot

            plot.make_plot(results, stem + ".png")
            written.append(stem + ".png")
        except Exception as e:  # matplotlib missing: the JSON can be plotted elsewhere
            print(f"plot skipped: {short_error(e)}")
    print()
    print(report.summary_text(results))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
