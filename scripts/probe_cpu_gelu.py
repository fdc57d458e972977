"""Probe: eager CPU GELU forms on this host vs fp4op's CPU fused GELU (issue 4, AVX512 hosts)."""
import torch, torch.nn.functional as F, fp4op
print("capability", torch.backends.cpu.get_cpu_capability(), "torch", torch.__version__)
inf = float("inf")
for dt in (torch.float32, torch.float16, torch.bfloat16):
    x = torch.tensor([inf, -inf, float("nan"), 0.0, -0.0, 10.0, -10.0, -5.07, 3.0], dtype=dt)
    for ap in ("none", "tanh"):
        print(dt, ap, F.gelu(x, approximate=ap).tolist(), "silu", F.silu(x).tolist() if ap == "none" else "")
# big vector (vectorized path) containing inf at several offsets
for dt in (torch.float16, torch.bfloat16):
    x = torch.zeros(64, dtype=dt); x[3] = inf; x[17] = -inf; x[40] = float("nan"); x[63] = -inf
    for ap in ("none", "tanh"):
        y = F.gelu(x, approximate=ap)
        print("vec", dt, ap, y[3].item(), y[17].item(), y[40].item(), y[63].item())
        gs = torch.tensor([2.0])
        q, sf = torch.ops.fp4op.gelu_quantize(x.reshape(1, 64), ap, global_scale=gs)
        qe, sfe = torch.ops.fp4op.quantize(y.reshape(1, 64), gs)
        print("   fused sf", sf.flatten()[:4].tolist(), "eager sf", sfe.flatten()[:4].tolist())
# erf of every fp16 value: where eager differs from std::erf (float32) form
x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
x = x[torch.isfinite(x)]
y = F.gelu(x)
ref = (x.float() * 0.5 * (1 + torch.erf(x.float() * 0.7071067811865476))).half()
d = (y != ref) & ~(y.isnan() & ref.isnan())
print("fp16 gelu erf: eager vs torch.erf-float32 form differ at", int(d.sum()), "of", x.numel(), x[d][:10].tolist())
