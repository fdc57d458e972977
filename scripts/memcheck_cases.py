"""Small CUDA quantize + dequantize cases for compute-sanitizer (memcheck, racecheck, initcheck):

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/memcheck_cases.py

Covers every input dtype, recipe and layout, odd M (M = 1 included), odd numbers of scale blocks,
empty inputs, per-row global scales, non-contiguous and unaligned inputs; dequantize also from an
unaligned x_q and into every output dtype. Each result is compared with the CPU kernel; exits 1 on a
mismatch, 2 without a GPU."""

import math
import sys

import torch

import fp4op  # noqa: F401  (registers the ops)
from fp4op import layouts

DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)
RECIPES = ((16, False), (32, True))
# (8500, 512): more 16-byte loads than the split kernel takes on a 132-SM GPU for every dtype/recipe
# (block_quantize.cuh), so the elementwise kernel (sector tiles included) runs too; (5300, 4096): enough
# 8-row groups for the sector-walk kernel (1 row a tile for NVFP4, 2 for MXFP4)
SHAPES = ((1, 32), (7, 96), (129, 160), (300, 64), (0, 64), (5, 0), (2, 3, 224), (8500, 512), (5300, 4096))


def make_input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 4
    if x.numel():
        x.view(-1)[:: 97] = 0.0
        x.view(-1)[5 :: 211] = float("nan")
        if dtype != torch.float8_e4m3fn:
            x.view(-1)[7 :: 401] = float("inf")
    return x.clamp(-448, 448).to(dtype) if dtype == torch.float8_e4m3fn else x.to(dtype)


def check(name, x_cpu, x_cuda, gs, vec, ue8m0, layout, failures):
    swz, is8x4 = layouts.layout_flags(layout)
    gs_cuda = None if gs is None else gs.cuda()
    got = torch.ops.fp4op.quantize(x_cuda, gs_cuda, vec, ue8m0, swz, is8x4, False)
    deq = torch.ops.fp4op.dequantize(*got, gs_cuda, vec, ue8m0, swz, is8x4, False, torch.bfloat16)
    torch.cuda.synchronize()
    want = torch.ops.fp4op.quantize(x_cpu, gs, vec, ue8m0, swz, is8x4, False)
    want_deq = torch.ops.fp4op.dequantize(*want, gs, vec, ue8m0, swz, is8x4, False, torch.bfloat16)
    same_deq = same_values(deq.cpu(), want_deq)
    if not (torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]) and same_deq):
        failures.append(name)


def same_values(a, b):
    """Equal bits, any NaN matching any NaN."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    zero = torch.zeros((), dtype=a.dtype)
    return torch.equal(torch.where(nan, zero, a).view(bits), torch.where(nan, zero, b).view(bits))


def check_dequantize(name, shape, vec, ue8m0, layout, offset, failures):
    """x_q at `offset` bytes into its storage (the kernel loads 4 bytes a lane, 2 for float32 output: offset 1
    takes its unaligned path), every output dtype."""
    swz, is8x4 = layouts.layout_flags(layout)
    x = make_input(shape, torch.bfloat16, 11)
    gs = None if ue8m0 else torch.rand(shape[0]) * 100 + 1
    x_q, sf = torch.ops.fp4op.quantize(x, gs, vec, ue8m0, swz, is8x4, False)
    buf = torch.zeros(x_q.numel() + 16, dtype=torch.uint8)
    buf[offset : offset + x_q.numel()] = x_q.view(-1)
    q_cuda = buf.cuda()[offset : offset + x_q.numel()].view(x_q.shape)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = torch.ops.fp4op.dequantize(q_cuda, sf.cuda(), None if gs is None else gs.cuda(), vec, ue8m0, swz,
                                         is8x4, False, out_dtype)
        want = torch.ops.fp4op.dequantize(x_q, sf, gs, vec, ue8m0, swz, is8x4, False, out_dtype)
        if not same_values(got.cpu(), want):
            failures.append(f"{name} {out_dtype}")


def main():
    if not torch.cuda.is_available():
        print("memcheck_cases: no CUDA device")
        return 2
    failures = []
    count = 0
    for dtype in DTYPES:
        for vec, ue8m0 in RECIPES:
            for layout in layouts.LAYOUTS:
                for i, shape in enumerate(SHAPES):
                    if shape[-1] % vec:
                        continue
                    x = make_input(shape, dtype, i)
                    m = math.prod(shape[:-1])
                    gs = None if ue8m0 else (torch.rand(m) * 100 + 1 if i % 2 else torch.tensor([37.0]))
                    name = f"{dtype} vec={vec} {layout} {shape}"
                    check(name, x, x.cuda(), gs, vec, ue8m0, layout, failures)
                    count += 1
                # non-contiguous and unaligned inputs
                base = make_input((33, 256), dtype, 99)
                gs = None if ue8m0 else torch.tensor([5.0])
                check(f"{dtype} vec={vec} {layout} strided", base[:, ::2], base.cuda()[:, ::2], gs, vec, ue8m0,
                      layout, failures)
                flat = make_input((40 * 96 + 16,), dtype, 7)
                unaligned = flat[3 : 3 + 40 * 96].view(40, 96)
                check(f"{dtype} vec={vec} {layout} unaligned", unaligned, flat.cuda()[3 : 3 + 40 * 96].view(40, 96),
                      gs, vec, ue8m0, layout, failures)
                count += 2
    for vec, ue8m0 in RECIPES:
        for layout in layouts.LAYOUTS:
            for offset in (0, 1, 4):
                for shape in ((7, 96), (129, 512)):
                    check_dequantize(f"dequantize vec={vec} {layout} {shape} offset={offset}", shape, vec, ue8m0,
                                     layout, offset, failures)
                    count += 1
    for f in failures:
        print("MISMATCH", f)
    print(f"memcheck_cases: {count - len(failures)}/{count} cases match the CPU kernel")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
