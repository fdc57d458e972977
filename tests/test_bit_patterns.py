"""Every fp16 / bf16 / e4m3 bit pattern (NaN with any payload, +-inf, subnormals, +-0) through the
CPU kernel and the reference, in blocks anchored so that most values are scaled by 1, 1.5 or
2^-7: the two agree byte for byte. Signaling-NaN payloads once made libm's fmaxf (and torch.fmax)
return NaN for the block maximum; the GPU ignores them, and so must every backend."""

import os
import subprocess
import sys

import pytest
import torch

from fp4op import layouts, reference


def _all_values(dtype):
    if dtype == torch.float8_e4m3fn:
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)


def anchored_blocks(dtype, anchor, vec):
    values = _all_values(dtype)
    n = vec - 1
    v = torch.cat([values, values[: (-values.numel()) % n]]).view(-1, n)
    return torch.cat([torch.full((v.shape[0], 1), anchor).to(dtype), v], 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("anchor", [6.0, -4.0, 448.0])
@pytest.mark.parametrize("vec,ue8m0", [(16, False), (32, True)])
@pytest.mark.parametrize("global_scale", [1.0, 2688.0 / 7.0, -3.0])
def test_every_bit_pattern_matches_reference(dtype, anchor, vec, ue8m0, global_scale):
    x = anchored_blocks(dtype, anchor, vec)
    gs = torch.tensor([global_scale])
    q, sf = torch.ops.fp4op.quantize(x, gs, vec, ue8m0, False, False, False)
    rq, rsf = reference.quantize(x, gs, vec, ue8m0, layouts.LINEAR)
    assert torch.equal(sf, rsf)
    assert torch.equal(q, rq)


def test_signaling_nan_does_not_poison_block_scale():
    # bf16 0x7F81 widens to a signaling float NaN; the block maximum must ignore it
    x = torch.tensor([0x40C0, 0x7F81] + [0] * 14, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    q, sf = torch.ops.fp4op.quantize(x.view(1, 16), torch.tensor([1.0]), 16, False, False, False, False)
    assert sf.item() == 0x38  # e4m3(6 * RN(1/6) = 1.0)
    assert q[0, 0].item() == 0x77  # 6 -> 0x7, NaN -> +6 (0x7)


# The CPU row kernel is compiled for the baseline x86-64 and for AVX2, picked at run time
# (fp4op._C.cpu_isa). FP4OP_CPU_BASELINE=1 forces the baseline build, which an AVX2 machine otherwise
# never runs: a child process checks it against the reference.
BASELINE_CHILD = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
from conftest import LAYOUTS, assert_same_bytes, make_global_scale, op_quantize, random_input
from test_bit_patterns import anchored_blocks
from fp4op import _C, layouts, reference

assert _C.cpu_isa == "baseline", _C.cpu_isa
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
    for vec, ue8m0 in ((16, False), (32, True)):
        for global_scale in (2688.0 / 7.0, -3.0):
            x = anchored_blocks(dtype, 6.0, vec)
            gs = torch.tensor([global_scale])
            got = op_quantize(x, gs, vec, ue8m0, layouts.LINEAR)
            want = reference.quantize(x, gs, vec, ue8m0, layouts.LINEAR)
            assert_same_bytes(got[0], want[0], f"{dtype} {vec} {global_scale} x_q")
            assert_same_bytes(got[1], want[1], f"{dtype} {vec} {global_scale} sf")
        # rows longer than a tile and not a whole number of tiles, per-row scales, every layout
        for (m, k), layout in zip(((7, 2048), (129, 1056), (3, 96)), LAYOUTS):
            x = random_input((m, k), dtype)
            gs = None if ue8m0 else make_global_scale(x, "per_row" if m == 129 else "scalar")
            got = op_quantize(x, gs, vec, ue8m0, layout)
            want = reference.quantize(x, gs, vec, ue8m0, layout)
            assert_same_bytes(got[0], want[0], f"{dtype} {vec} {m}x{k} {layout} x_q")
            assert_same_bytes(got[1], want[1], f"{dtype} {vec} {m}x{k} {layout} sf")
"""


def test_baseline_build_matches_reference():
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", BASELINE_CHILD, here], capture_output=True, text=True,
                          env={**os.environ, "FP4OP_CPU_BASELINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
