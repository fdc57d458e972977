"""Property tests (hypothesis): for random shapes, dtypes, recipes, layouts, global scales and values
aimed at the rounding boundaries, the CPU kernel equals fp4op.reference byte for byte, and the CUDA
kernel equals the CPU kernel when a GPU is present.

Profiles (tests/conftest.py): 'ci' by default (bounded, derandomized); FP4OP_HYPOTHESIS_PROFILE=long
runs >= 100000 examples. The tests named *cuda* check CUDA against CPU only, lean enough for the long
profile on a GPU (scripts/gpu_check.sh stage fuzzlong runs them with -k cuda)."""

import pytest
import torch

import fp4op

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, settings, strategies as st  # noqa: E402

from conftest import HAS_CUDA, assert_same_bytes, op_dequantize, op_quantize, requires_cuda  # noqa: E402
from fp4op import layouts, reference  # noqa: E402
from test_fused_ops import ACTIVATIONS, NORMS, Tally, act_case, make_input, norm_case, quantize_kwargs  # noqa: E402

E2M1_GRID = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0]
E4M3_VALUES = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
# E4M3 midpoints (ties of the block-scale rounding) and the E4M3 values themselves
E4M3_POINTS = torch.cat([E4M3_VALUES, (E4M3_VALUES[1:] + E4M3_VALUES[:-1]) / 2])
SPECIALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 6e-8, -6e-8, 1e-40, -1e-39, 65504.0, 448.0,
            3e38, 2.0**-126, 2.0**-127, 2.0**-133]
ELEMENT_KINDS = ("wide", "grid", "scale_boundary", "denormal", "specials")

RECIPES = st.sampled_from([(16, False), (32, True)])
DTYPES = st.sampled_from([torch.float16, torch.bfloat16, torch.float8_e4m3fn])
MAX_ELEMENTS = 1 << 16  # keeps one example fast; M up to 3000 with short rows, long rows with few M


@st.composite
def problems(draw, max_elements=MAX_ELEMENTS):
    vec, ue8m0 = draw(RECIPES)
    dtype = draw(DTYPES)
    layout = draw(st.sampled_from(layouts.LAYOUTS))
    m = draw(st.one_of(st.integers(0, 10), st.integers(0, 3000)))
    max_blocks = max(0, min(64, max_elements // (max(m, 1) * vec)))
    nk = draw(st.integers(0, max_blocks))
    kind = draw(st.sampled_from(ELEMENT_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    n_special = draw(st.integers(0, 8))
    specials = draw(st.lists(st.sampled_from(SPECIALS), min_size=n_special, max_size=n_special))
    # whole blocks of one value: all-NaN, all -0.0, all-inf, ... blocks
    block_fills = draw(st.lists(st.sampled_from([float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-40, 6.0]),
                                max_size=3))
    scale_kind = draw(st.sampled_from(["usual", "one", "special", "random"]))
    per_row = draw(st.booleans())
    per_row_2d = draw(st.booleans())
    inversed = draw(st.booleans())
    special_scale = draw(st.sampled_from([0.0, -0.0, -3.0, float("inf"), float("nan"), 1e-30, 1e30]))
    return dict(vec=vec, ue8m0=ue8m0, dtype=dtype, layout=layout, m=m, k=nk * vec, kind=kind, seed=seed,
                specials=specials, block_fills=block_fills, scale_kind=scale_kind, per_row=per_row, per_row_2d=per_row_2d,
                inversed=inversed, special_scale=special_scale)


def build_input(p):
    g = torch.Generator().manual_seed(p["seed"])
    m, k, vec = p["m"], p["k"], p["vec"]
    n = m * k
    block_exp = torch.randint(-12, 8, (max(1, n // vec),), generator=g).repeat_interleave(vec)[:n].float()
    if p["kind"] == "wide":
        x = torch.randn(n, generator=g) * torch.pow(2.0, block_exp)
    elif p["kind"] == "grid":
        # values on the E2M1 grid and its midpoints, times each block's power of two; every block holds
        # 6 * 2^e so that (with S = 1) the elements land exactly on the grid after scaling
        grid = torch.tensor(E2M1_GRID)[torch.randint(0, len(E2M1_GRID), (n,), generator=g)]
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        x = grid * sign * torch.pow(2.0, block_exp)
        if n:
            x.view(-1, vec)[:, 0] = 6.0 * torch.pow(2.0, block_exp.view(-1, vec)[:, 0])
    elif p["kind"] == "scale_boundary":
        # block amax = 6 * (an E4M3 value or midpoint) * 2^e: the block-scale rounding boundaries
        idx = torch.randint(0, E4M3_POINTS.numel(), (max(1, n // vec),), generator=g)
        amax = (6.0 * E4M3_POINTS[idx] * torch.pow(2.0, torch.randint(-4, 2, idx.shape, generator=g).float()))
        x = (torch.rand(n, generator=g) * 2 - 1) * amax.repeat_interleave(vec)[:n]
        if n:
            x.view(-1, vec)[:, 1] = amax[: n // vec]
    elif p["kind"] == "denormal":
        x = torch.randn(n, generator=g) * 2.0**-20 * torch.pow(2.0, block_exp.clamp(max=0) * 8)
    else:
        x = torch.tensor(SPECIALS)[torch.randint(0, len(SPECIALS), (n,), generator=g)]
    if n and p["specials"]:
        pos = torch.randint(0, n, (len(p["specials"]),), generator=g)
        x[pos] = torch.tensor(p["specials"])
    if n and p["block_fills"]:
        blocks = x.view(-1, vec)
        for value, b in zip(p["block_fills"], torch.randint(0, blocks.shape[0], (len(p["block_fills"]),), generator=g)):
            blocks[b] = value
    if p["dtype"] == torch.float8_e4m3fn:
        x = x.clamp(-448, 448)  # keeps NaN; out-of-range values would become NaN in the cast
    return x.reshape(m, k).to(p["dtype"])


def build_global_scale(p, x):
    if p["ue8m0"]:
        return None
    rows = p["m"] if p["per_row"] else 1
    if p["scale_kind"] == "one" or p["kind"] == "grid":
        gs = torch.ones(rows)
    elif p["scale_kind"] == "special":
        gs = torch.full((rows,), p["special_scale"])
    elif p["scale_kind"] == "random":
        gs = torch.pow(2.0, torch.randn(rows) * 20)
    else:
        a = x.float().abs().nan_to_num(0.0, 0.0, 0.0)
        amax = a.amax(-1) if p["per_row"] and a.numel() else a.amax().reshape(1) if a.numel() else torch.ones(rows)
        gs = 2688.0 / amax
    if p["inversed"]:
        gs = 1.0 / gs
    return gs.reshape(-1, 1) if p["per_row"] and p["per_row_2d"] else gs


@given(problems())
def test_kernel_equals_reference(p):
    note(str({k: v for k, v in p.items()}))
    x = build_input(p)
    gs = build_global_scale(p, x)
    args = (p["vec"], p["ue8m0"], p["layout"], p["inversed"])
    got = op_quantize(x, gs, *args)
    want = reference.quantize(x, gs, *args)
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")
    deq = op_dequantize(got[0], got[1], gs, *args)
    assert_same_bytes(deq, reference.dequantize(got[0], got[1], gs, *args), "dequantize")
    if HAS_CUDA:
        gs_cuda = None if gs is None else gs.cuda()
        cuda = op_quantize(x.cuda(), gs_cuda, *args)
        assert_same_bytes(cuda[0], got[0], "x_q CUDA vs CPU")
        assert_same_bytes(cuda[1], got[1], "sf CUDA vs CPU")
        cuda_deq = op_dequantize(cuda[0], cuda[1], gs_cuda, *args)
        assert_same_bytes(cuda_deq, deq, "dequantize CUDA vs CPU")


@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=32,
             max_size=32),
    RECIPES,
    st.sampled_from([1.0, 2688.0, 0.5, 3.0e-5, 1.0e20]),
)
def test_single_block_any_float32_values(values, recipe, scale):
    # one row of arbitrary float32 values (hypothesis' float strategy favours the edge cases) in bf16
    vec, ue8m0 = recipe
    x = torch.tensor(values, dtype=torch.float32).to(torch.bfloat16).reshape(1, 32)
    gs = torch.tensor([scale])
    got = op_quantize(x, gs, vec, ue8m0, "linear")
    want = reference.quantize(x, gs, vec, ue8m0, "linear")
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")


# ---- CUDA == CPU, lean: no reference, one copy back per example (about 3 ms an example on an H100 host) ----

LEAN_MAX_ELEMENTS = 1 << 14


def _bytes(*tensors):
    """The tensors' bytes in one flat CPU tensor: one device-to-host copy (one sync) for all of them."""
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors]).cpu()


@requires_cuda
@given(problems(max_elements=LEAN_MAX_ELEMENTS))
def test_cuda_equals_cpu_quantize(p):
    note(str(p))
    x = build_input(p)
    gs = build_global_scale(p, x)
    args = (p["vec"], p["ue8m0"], p["layout"], p["inversed"])
    cpu = op_quantize(x, gs, *args)
    cuda = op_quantize(x.cuda(), None if gs is None else gs.cuda(), *args)
    assert cuda[0].shape == cpu[0].shape and cuda[1].shape == cpu[1].shape
    if not torch.equal(_bytes(*cuda), _bytes(*cpu)):
        assert_same_bytes(cuda[0], cpu[0], "x_q CUDA vs CPU")
        assert_same_bytes(cuda[1], cpu[1], "sf CUDA vs CPU")


# The fused ops: every norm/activation form of tests/test_fused_ops.py on contiguous, strided (a half of
# a wider tensor, read in place) and misaligned (copied by the CUDA kernels) rows, K up to 32768.
FUSED_MAX_ELEMENTS = 1 << 15
VIEWS = ("contiguous", "half_of_wider", "misaligned")


@st.composite
def fused_problems(draw):
    name = draw(st.sampled_from(NORMS + ACTIVATIONS))
    recipe = draw(st.sampled_from(["nvfp4", "mxfp4"]))
    vec = 16 if recipe == "nvfp4" else 32
    m = draw(st.one_of(st.integers(0, 8), st.integers(0, 600)))
    nk = draw(st.integers(0, FUSED_MAX_ELEMENTS // (max(m, 1) * vec)))
    return dict(name=name, recipe=recipe, dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
                layout=draw(st.sampled_from(layouts.LAYOUTS)), m=m, k=nk * vec, view=draw(st.sampled_from(VIEWS)),
                eps=draw(st.sampled_from([1e-6, 1e-5])), per_row=draw(st.booleans()), inversed=draw(st.booleans()),
                zero_rows=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def fused_input(p):
    m, k = p["m"], p["k"]
    wide = {"contiguous": k, "half_of_wider": 2 * k, "misaligned": k + 1}[p["view"]]
    x = make_input((m, wide), p["dtype"], seed=p["seed"])[:, wide - k :]
    if p["zero_rows"]:
        x[::3] = 0  # padding tokens
    return x


def _to_cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@requires_cuda
def test_cuda_equals_cpu_fused():
    # every element within one E2M1 step (Tally.add), >= 99.9% of all blocks over the run identical
    tally = Tally()

    @settings(max_examples=max(150, settings().max_examples // 10))  # a tenth of the long profile: 10,000
    @given(fused_problems())
    def run(p):
        note(str(p))
        x = fused_input(p)
        if p["name"] in NORMS:
            op, args, y, _ = norm_case(p["name"], x, p["eps"], "cpu")
        else:
            op, args, y = act_case(p["name"], x, "cpu")
        gs = fp4op.nvfp4_global_scale(y, per_row=p["per_row"]) if y.numel() else torch.ones(1)
        if p["inversed"]:
            gs = 1.0 / gs
        kw = quantize_kwargs(p["recipe"], p["layout"], gs)
        kw["is_global_scale_inversed"] = p["inversed"]
        cpu = op(*args, **kw)
        cuda = op(*_to_cuda(args), **{**kw, "global_scale": None if kw["global_scale"] is None else gs.cuda()})
        assert [t.shape for t in cuda] == [t.shape for t in cpu]
        if torch.equal(_bytes(*cuda), _bytes(*cpu)):
            tally.blocks += p["m"] * p["k"] // (16 if p["recipe"] == "nvfp4" else 32)
            return
        if len(cpu) == 3:
            assert_same_bytes(cuda[2], cpu[2], "x + residual CUDA vs CPU")
        tally.add([t.cpu() for t in cuda[:2]], cpu[:2], x.shape, p["recipe"], p["layout"], kw["global_scale"])

    run()
    tally.check()
