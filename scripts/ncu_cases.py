"""The kernels Nsight Compute profiles for the README's performance section (issue 5): quantize at the
benchmark's large shape per dtype/recipe, and the fused norm/activation ops. Each runs twice (the
profile takes the second launch of each kernel, see gpu_check.sh's `ncu` stage).

    ncu --clock-control none --kernel-name-base mangled -k regex:fp4op python scripts/ncu_cases.py"""

import torch

import fp4op  # noqa: F401  (registers the ops)

M, K = 8192, 8192
ops = torch.ops.fp4op
torch.manual_seed(0)
gs = torch.tensor([448.0 * 6 / 8.0], device="cuda")
cases = []
for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
    x = torch.randn(M, K, device="cuda").to(dtype)
    cases.append((f"quantize nvfp4 {dtype}", lambda x=x: ops.quantize(x, gs, 16, False, True, False, False)))
# decode-size inputs: how long the kernel itself runs where launch latency dominates
for m, k in ((1, 4096), (16, 16384)):
    xs = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cases.append((f"quantize nvfp4 bf16 {m}x{k}", lambda x=xs: ops.quantize(x, gs, 16, False, True, False, False)))
xb = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
cases.append(("quantize mxfp4 bf16", lambda: ops.quantize(xb, None, 32, True, True, False, False)))
w = torch.randn(K, device="cuda", dtype=torch.bfloat16)
up = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
q = dict(global_scale=gs, sf_vec_size=16, sf_use_ue8m0=False, is_sf_swizzled_layout=True, is_sf_8x4_layout=False,
         is_global_scale_inversed=False)
cases.append(("rms_norm_quantize", lambda: ops.rms_norm_quantize(xb, w, 1e-6, **q)))
cases.append(("silu_and_mul_quantize", lambda: ops.silu_and_mul_quantize(xb, up, **q)))
cases.append(("silu_quantize", lambda: ops.silu_quantize(xb, **q)))
for name, fn in cases:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    print(name, "ok", flush=True)
