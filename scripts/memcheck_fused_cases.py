"""Small CUDA cases of the fused norm/activation + quantize ops for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/memcheck_fused_cases.py

Every fused op, both recipes, every layout, odd M (1 included), rows held in registers (K = 2048, 6144,
16384), a row re-read from memory (K = 20480), the activations' two kernels and gate/up as the two halves of one tensor. Each result is
compared with the CPU kernel under the fused ops' acceptance (>= 99.9% of bytes identical, reduction
order only; the *_with_normed norm outputs and rms_norm_add's residual + norm within an ulp); exits 1 on a failure, 2 without a GPU."""

import sys

import torch

import fp4op  # noqa: F401  (registers the ops)
from fp4op import layouts

OPS = ("rms_norm", "add_rms_norm", "add_rms_norm_float32_sum", "layer_norm", "rms_norm_with_normed",
       "layer_norm_with_normed", "add_rms_norm_with_normed", "rms_norm_add", "layer_norm_modulate", "silu_and_mul", "gelu_and_mul",
       "gelu_new_and_mul", "relu2_and_mul", "silu", "gelu", "gelu_new", "relu", "relu2", "quick_gelu")


def run(op, x, w, gs, q):
    ops = torch.ops.fp4op
    if op == "rms_norm":
        return ops.rms_norm_quantize(x, w, 1e-6, **q)
    if op == "add_rms_norm":
        return ops.add_rms_norm_quantize(x, x.flip(0), w, 1e-5, **q)
    if op == "rms_norm_add":
        return ops.rms_norm_add_quantize(x, x.flip(0), w, 1e-5, **q)
    if op == "add_rms_norm_float32_sum":
        return ops.add_rms_norm_quantize(x, x.flip(0) * 0.01, w, 1e-5, 0.0, True, **q, sum_in_float32=True)
    if op == "layer_norm":
        return ops.layer_norm_quantize(x, w, w, 1e-5, **q)
    if op == "layer_norm_modulate":  # one multiplier for every row, a shift a row
        return ops.layer_norm_modulate_quantize(x, w, None, 1e-5, x[:1] * 0.25 + 1, x.flip(0), **q)
    if op == "rms_norm_with_normed":
        return ops.rms_norm_quantize_with_normed(x, w, 1e-6, 0.0, True, **q)
    if op == "layer_norm_with_normed":
        return ops.layer_norm_quantize_with_normed(x, w, w, 1e-5, **q)
    if op == "add_rms_norm_with_normed":
        return ops.add_rms_norm_quantize_with_normed(x, x.flip(0), w, 1e-5, **q)
    half = x.shape[-1] // 2
    gate, up = x[..., :half], x[..., half:]  # strided halves of one tensor
    if op == "silu_and_mul":
        return ops.silu_and_mul_quantize(gate, up, **q)
    if op == "gelu_and_mul":
        return ops.gelu_and_mul_quantize(gate, up, "tanh", **q)
    if op == "gelu_new_and_mul":
        return ops.gelu_new_and_mul_quantize(gate, up, **q)
    if op == "relu2_and_mul":
        return ops.relu_and_mul_quantize(gate, up, True, **q)
    if op == "silu":
        return ops.silu_quantize(x, **q)
    if op == "gelu_new":
        return ops.gelu_new_quantize(x, **q)
    if op.startswith("relu"):
        return ops.relu_quantize(x, op == "relu2", **q)
    if op == "quick_gelu":
        return ops.sigmoid_mul_quantize(x, 1.702, **q)
    return ops.gelu_quantize(x, "none", **q)


def main():
    if not torch.cuda.is_available():
        print("memcheck_fused_cases: no CUDA device")
        return 2
    failures, count = [], 0
    g = torch.Generator().manual_seed(0)
    for op in OPS:
        for vec, ue8m0 in ((16, False), (32, True)):
            for layout in layouts.LAYOUTS:
                # (4500, 512): the activations take the elementwise kernel, the rest the split kernel
                for m, k in ((1, 2048), (7, 128), (129, 64 * 3), (3, 6144), (2, 16384), (2, 20480), (4500, 512)):
                    kk = 2 * k if op.endswith("_and_mul") else k
                    x = torch.randn(m, kk, generator=g).to(torch.bfloat16)
                    w = torch.randn(k, generator=g).to(torch.bfloat16)
                    gs = None if ue8m0 else torch.tensor([3.0])
                    swz, is8x4 = layouts.layout_flags(layout)
                    q = dict(sf_vec_size=vec, sf_use_ue8m0=ue8m0, is_sf_swizzled_layout=swz, is_sf_8x4_layout=is8x4)
                    want = run(op, x, w, gs, dict(q, global_scale=gs))
                    got = run(op, x.cuda(), w.cuda(), None if gs is None else gs.cuda(),
                              dict(q, global_scale=None if gs is None else gs.cuda()))
                    torch.cuda.synchronize()
                    count += 1
                    for i, (a, b) in enumerate(zip(got, want)):
                        a = a.cpu()
                        if (op.endswith("_with_normed") or op == "rms_norm_add") and i == len(got) - 1:
                            # the norm output follows each device's torch kernel (CUDA's rsqrtf, the CPU's
                            # 1 / sqrt): a row's statistic an ulp apart moves its elements by an ulp or two
                            # (rms_norm_add: of the norm output in residual + it, which the sum may cancel)
                            scale = b.float().abs() + (x.flip(0).float().abs() if op == "rms_norm_add" else 0.0)
                            close = ((a.float() - b.float()).abs() <= 2**-6 * scale + 1e-6).all()
                            if a.shape != b.shape or not close:
                                failures.append(f"{op} vec={vec} {layout} {m}x{k}: norm outputs apart")
                            continue
                        same = (a == b).float().mean().item() if a.numel() else 1.0
                        if a.shape != b.shape or same < 0.999:
                            failures.append(f"{op} vec={vec} {layout} {m}x{k}: {same:.4f} identical")
    for f in failures:
        print("MISMATCH", f)
    print(f"memcheck_fused_cases: {count - len(failures)}/{count} cases match the CPU kernels")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
