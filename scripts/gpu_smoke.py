"""Quick GPU check: CUDA kernel == CPU kernel bit for bit on a matrix of cases, plus a timing of
quantize vs a device copy at a few shapes. Usage: python scripts/gpu_smoke.py"""

import itertools
import sys

import torch

import fp4op
from fp4op import layouts

assert torch.cuda.is_available(), "needs a GPU"
torch.manual_seed(0)
failures = 0
cases = 0
for dtype, (vec, ue8m0), layout, (m, k), per_row, inv in itertools.product(
    [torch.float16, torch.bfloat16, torch.float8_e4m3fn],
    [(16, False), (32, True)],
    layouts.LAYOUTS,
    # (7001, 896): more row tiles than CTAs, an odd CTA count per column tile before rounding
    [(1, 32), (7, 64), (128, 4096), (129, 96), (300, 2048), (1000, 160), (3, 16384), (77, 8192), (7001, 896)],
    [False, True],
    [False, True],
):
    if k % vec:
        continue
    x = (torch.randn(m, k) * 4).to(dtype)
    x.view(torch.uint8 if dtype == torch.float8_e4m3fn else torch.int16).view(-1)[:: 97] = 0  # a few zeros
    gs = fp4op.nvfp4_global_scale(x, per_row=per_row)
    sw, e8 = layouts.layout_flags(layout)
    args = (vec, ue8m0, sw, e8, inv)
    q_cpu, s_cpu = torch.ops.fp4op.quantize(x, gs, *args)
    q_gpu, s_gpu = torch.ops.fp4op.quantize(x.cuda(), gs.cuda(), *args)
    cases += 1
    if not (torch.equal(q_cpu, q_gpu.cpu()) and torch.equal(s_cpu, s_gpu.cpu())):
        failures += 1
        print("MISMATCH", dtype, vec, layout, m, k, per_row, inv,
              (q_cpu != q_gpu.cpu()).sum().item(), (s_cpu != s_gpu.cpu()).sum().item())

# every fp16/bf16/e4m3 bit pattern (NaN, inf, subnormals, +-0 included), in blocks anchored by
# +-6 or +-4 so that most values are scaled by 1 or 1.5, under every recipe: CUDA == CPU
for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
    bits = torch.arange(0, 256 if dtype == torch.float8_e4m3fn else 65536, dtype=torch.int32)
    values = (bits.to(torch.uint8) if dtype == torch.float8_e4m3fn else bits.to(torch.int16)).view(dtype)
    for anchor in (6.0, -4.0, 448.0):
        for vec, ue8m0 in ((16, False), (32, True)):
            n = vec - 1
            v = torch.cat([values, values[: (-values.numel()) % n]]).view(-1, n)
            x = torch.cat([torch.full((v.shape[0], 1), anchor).to(dtype), v], 1)  # [blocks, vec]
            for gs in (torch.tensor([1.0]), torch.tensor([2688.0 / 7.0]), torch.tensor([-3.0])):
                for layout in layouts.LAYOUTS:
                    sw, e8 = layouts.layout_flags(layout)
                    args = (vec, ue8m0, sw, e8, False)
                    q_cpu, s_cpu = torch.ops.fp4op.quantize(x, gs, *args)
                    q_gpu, s_gpu = torch.ops.fp4op.quantize(x.cuda(), gs.cuda(), *args)
                    cases += 1
                    if not (torch.equal(q_cpu, q_gpu.cpu()) and torch.equal(s_cpu, s_gpu.cpu())):
                        failures += 1
                        print("EXHAUSTIVE MISMATCH", dtype, anchor, vec, gs.item(), layout,
                              (q_cpu != q_gpu.cpu()).sum().item(), (s_cpu != s_gpu.cpu()).sum().item())
                        if layout == "linear":
                            rows = ((q_cpu != q_gpu.cpu()).any(1) | (s_cpu != s_gpu.cpu()).any(1)).nonzero().flatten()
                            for r in rows[:2].tolist():
                                print("  x", [hex(b) for b in x[r].view(torch.int16 if x.element_size() == 2 else torch.uint8).tolist()])
                                print("  q cpu", q_cpu[r].tolist(), "gpu", q_gpu[r].tolist(), "sf", s_cpu[r].tolist(), s_gpu[r].tolist())
print(f"bit-exact cases: {cases - failures}/{cases}")


def bench(fn, iters=50):
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
print("| case | M | K | us | GB/s | % copy |")
for m, k in [(8192, 8192), (32768, 8192), (16, 16384), (1024, 4096)]:
    for dtype, (vec, ue8m0), layout in [
        (torch.bfloat16, (16, False), "128x4"),
        (torch.bfloat16, (32, True), "128x4"),
        (torch.float16, (16, False), "linear"),
        (torch.float8_e4m3fn, (16, False), "8x4"),
    ]:
        x = torch.randn(m, k, device="cuda").to(dtype)
        gs = fp4op.nvfp4_global_scale(x)
        sw, e8 = layouts.layout_flags(layout)
        q, s = torch.ops.fp4op.quantize(x, gs, vec, ue8m0, sw, e8, False)
        nbytes = x.numel() * x.element_size() + q.numel() + s.numel()
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_copy = bench(lambda: dst.copy_(src))
        t = bench(lambda: torch.ops.fp4op.quantize(x, gs, vec, ue8m0, sw, e8, False))
        print(f"| {dtype} vec{vec} {layout} | {m} | {k} | {t:.1f} | {nbytes / t / 1e3:.0f} | {100 * t_copy / t:.0f}% (copy {t_copy:.1f} us) |")
sys.exit(1 if failures else 0)
