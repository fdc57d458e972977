"""The CUDA kernels against the CPU kernels (which equal fp4op.reference, tests/test_quantize.py), bit
for bit, and their behaviour as CUDA code: big and >2^31-element inputs, unaligned inputs, CUDA graphs,
streams, determinism, the sf padding, torch.compile(mode="reduce-overhead").

The huge-shape tests carry the `large` marker (run by default; `-m "not large"` skips them)."""

import pytest
import torch

import fp4op
from conftest import (
    matrix_params,
    DTYPES,
    HAS_CUDA,
    LAYOUTS,
    assert_same_bytes,
    capture_cuda_graph,
    dtype_id,
    make_global_scale,
    op_dequantize,
    op_quantize,
    random_input,
)
from fp4op import layouts

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

MS = (1, 7, 128, 129, 300, 1000)
KS = (16, 32, 48, 80, 208, 2048)  # 80 and 208 give odd numbers of scale blocks
RECIPE_PARAMS = [pytest.param(16, False, id="nvfp4"), pytest.param(32, True, id="mxfp4")]


def cuda_equals_cpu(x, gs, vec, ue8m0, layout, inversed=False, dequantize=True):
    """Quantizes (and dequantizes) on both devices; asserts equal bytes; returns the CUDA outputs."""
    gs_cpu = None if gs is None else gs.cpu()
    gs_cuda = None if gs is None else gs.cuda()
    want = op_quantize(x.cpu(), gs_cpu, vec, ue8m0, layout, inversed)
    got = op_quantize(x.cuda(), gs_cuda, vec, ue8m0, layout, inversed)
    assert got[0].is_cuda and got[1].is_cuda
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")
    if dequantize:
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            d_cuda = op_dequantize(*got, gs_cuda, vec, ue8m0, layout, inversed, out_dtype)
            d_cpu = op_dequantize(*want, gs_cpu, vec, ue8m0, layout, inversed, out_dtype)
            assert_same_bytes(d_cuda, d_cpu, f"dequantize {out_dtype}")
    return got


@pytest.mark.parametrize("dtype,vec,ue8m0,layout,kind,inversed", list(matrix_params()))
def test_matrix_cuda_equals_cpu(dtype, vec, ue8m0, layout, kind, inversed):
    for m in MS:
        for k in KS:
            if k % vec:
                continue
            x = random_input((m, k), dtype)
            gs = None if ue8m0 else make_global_scale(x, kind)
            if gs is not None and inversed:
                gs = 1.0 / gs
            try:
                cuda_equals_cpu(x, gs, vec, ue8m0, layout, inversed)
            except AssertionError as e:
                raise AssertionError(f"M={m} K={k}: {e}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_elementwise_kernel_cuda_equals_cpu(dtype, vec, ue8m0, layout):
    # The matrix above is small enough for the split kernel (at most 2048 16-byte loads an SM, see
    # block_quantize.cuh); these rows are more than that for every dtype/recipe at K = 512, so they take
    # the prefetching elementwise kernel (and sector tiles for the swizzled layouts), M % 128 != 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m = sms * 2048 // 32 + 101
    x = random_input((m, 512), dtype)
    gs = None if ue8m0 else make_global_scale(x, "per_row")
    cuda_equals_cpu(x, gs, vec, ue8m0, layout, dequantize=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", ["128x4", "8x4"])
@pytest.mark.parametrize("k_blocks", [4, 32, 64, 128, 256, 260])
def test_sector_walk_cuda_equals_cpu(dtype, vec, ue8m0, layout, k_blocks):
    # Enough rows for the sector-walk kernel (a CTA walks 8 rows a 32-byte scale sector, see
    # block_quantize.cuh) wherever it takes row tiles: at least as many 8-row groups as 8 CTAs an SM,
    # M % 128 != 0 (padding rows inside the walk). 32-256 blocks a row: 8, 4, 2 or 1 rows a row tile;
    # 260: a second column tile with 4 of its 256 columns; 4: too few columns for a walk (16-row tiles).
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m = sms * 8 * 8 + 77
    x = random_input((m, k_blocks * vec), dtype)
    x[m // 2, :vec] = float("nan")
    x[m - 1, vec: 2 * vec] = 0.0
    gs = None if ue8m0 else make_global_scale(x, "per_row")
    cuda_equals_cpu(x, gs, vec, ue8m0, layout, dequantize=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_values_cuda_equals_cpu(dtype, vec, ue8m0, layout):
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-7, -3e-8, 2.0**-133, 448.0,
                             0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 65504.0])
    x = random_input((129, 256), torch.float32)
    gs_rows = make_global_scale(x, "per_row")
    idx = torch.randint(0, x.numel(), (2000,))
    x.view(-1)[idx] = specials[torch.randint(0, specials.numel(), (2000,))]
    x[5, :vec] = float("nan")  # an all-NaN block
    x[6, :vec] = -0.0
    x[7, :vec] = 1e-30  # an underflowing block
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-448, 448)
    x = x.to(dtype)
    for gs in (torch.ones(1), gs_rows,
               torch.tensor([0.0]), torch.tensor([float("inf")]), torch.tensor([float("nan")]), torch.tensor([-2.0])):
        cuda_equals_cpu(x, gs, vec, ue8m0, layout)


@pytest.mark.parametrize("shape", [(3, 43, 128), (2, 1, 64), (0, 64), (5, 0), (4, 0, 32)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rank3_and_empty_cuda_equals_cpu(shape, layout):
    x = random_input(shape, torch.bfloat16)
    cuda_equals_cpu(x, torch.ones(1), 16, False, layout)
    cuda_equals_cpu(x, None, 32, True, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset", [1, 3, 8, 13])
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_unaligned_input(dtype, offset, vec, ue8m0):
    m, k = 37, 96
    buf = random_input((m * k + 64,), dtype).cuda()
    x = buf[offset : offset + m * k].view(m, k)
    assert x.data_ptr() % 16 != 0 or offset * x.element_size() % 16 == 0
    gs = torch.tensor([7.0])
    cuda_equals_cpu(x, gs, vec, ue8m0, "128x4")


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_non_contiguous_cuda(vec, ue8m0):
    base = random_input((64, 512), torch.bfloat16).cuda()
    for x in (base[1::3], base[:, ::2], base[:, 64:320], base[:1].expand(130, 512)):
        got = op_quantize(x, torch.ones(1, device="cuda"), vec, ue8m0, "128x4")
        want = op_quantize(x.cpu(), torch.ones(1), vec, ue8m0, "128x4")
        assert_same_bytes(got[0], want[0], "x_q")
        assert_same_bytes(got[1], want[1], "sf")


def test_column_major_api_cuda():
    storage = random_input((64, 96), torch.bfloat16)
    got = fp4op.fp4_quantize(storage.cuda().t(), torch.ones(1, device="cuda"))
    want = fp4op.fp4_quantize(storage.t(), torch.ones(1))
    assert_same_bytes(got[0], want[0], "x_q")
    assert_same_bytes(got[1], want[1], "sf")


DEQUANTIZE_SCALES = {
    "one": [1.0],
    "odd": [0.3],
    "tiny": [1e-30],
    "huge": [3e38],  # quotients on both sides of 2^-124 and subnormal (the kernel's exact-scaling range)
    "very_tiny": [1e-36],  # quotients on both sides of 2^124, and inf
    "subnormal": [1e-40],
    "negative": [-2.5],
    "zero": [0.0],
    "inf": [float("inf")],
    "nan": [float("nan")],
    "per_row": [0.3, 7.0, -1.0, 0.0, float("inf"), 1e-3, 448.0 * 6.0, float("nan")],
}


DEQUANTIZE_CASES = [pytest.param(32, True, None, False, id="mxfp4")] + [
    pytest.param(16, False, scale, inversed, id=f"nvfp4-{scale}{'-inversed' if inversed else ''}")
    for scale in DEQUANTIZE_SCALES
    for inversed in (False, True)
]


@pytest.mark.parametrize("vec,ue8m0,scale,inversed", DEQUANTIZE_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [0, 1, 2, 5], ids=lambda o: f"offset{o}")  # 2: aligned for float32's 2-byte loads only
def test_dequantize_every_code_and_scale_byte(vec, ue8m0, scale, inversed, layout, offset):
    """Every code under every scale byte, the global scales whose quotients are special (0, inf, NaN,
    negative, subnormal results), x_q at unaligned addresses: CUDA == CPU in every output dtype."""
    m, nk = 16, 16  # 256 blocks: one for each scale byte
    k = nk * vec
    generator = torch.Generator().manual_seed(0)
    # every code in every block: each 16 codes of a block a permutation of 0..15
    codes = torch.stack([torch.randperm(16, generator=generator) for _ in range(m * k // 16)]).view(-1)
    packed = (codes[0::2] | (codes[1::2] << 4)).to(torch.uint8)
    buf = torch.zeros(m * k // 2 + 16, dtype=torch.uint8)
    buf[offset : offset + m * k // 2] = packed
    x_q = buf[offset : offset + m * k // 2].view(m, k // 2)
    sf_bytes = torch.randperm(256, generator=generator).to(torch.uint8).view(m, nk)
    sf = layouts.swizzle(sf_bytes, layout)
    gs = None
    if not ue8m0:
        values = DEQUANTIZE_SCALES[scale]
        gs = torch.tensor(values if len(values) == 1 else (values * m)[:m], dtype=torch.float32)
    # the unaligned view itself on the GPU (x_q.cuda() would copy it to an aligned allocation)
    q_cuda = buf.cuda()[offset : offset + m * k // 2].view(m, k // 2)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        want = op_dequantize(x_q, sf, gs, vec, ue8m0, layout, inversed, out_dtype)
        got = op_dequantize(q_cuda, sf.cuda(), None if gs is None else gs.cuda(), vec, ue8m0, layout, inversed,
                            out_dtype)
        assert_same_bytes(got, want, f"dequantize {out_dtype}")


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_dequantize_grid_stride(vec, ue8m0, out_dtype):
    """More lanes than a wave of CTAs holds, an odd number of blocks a row (the kernel's row and column
    steps wrap), per-row scales: CUDA == CPU."""
    m, k = 4099, 65 * 32
    x = random_input((m, k), torch.bfloat16)
    gs = None if ue8m0 else make_global_scale(x, "per_row")
    x_q, sf = op_quantize(x, gs, vec, ue8m0, "128x4")
    want = op_dequantize(x_q, sf, gs, vec, ue8m0, "128x4", False, out_dtype)
    got = op_dequantize(x_q.cuda(), sf.cuda(), None if gs is None else gs.cuda(), vec, ue8m0, "128x4", False,
                        out_dtype)
    assert_same_bytes(got, want, f"dequantize {out_dtype}")


# ---- CUDA behaviour ---------------------------------------------------------------------------------

@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_capture_and_replay(vec, ue8m0, layout):
    static_x = random_input((129, 256), torch.bfloat16).cuda()
    static_gs = make_global_scale(static_x, "per_row")

    def fn():
        return op_quantize(static_x, static_gs, vec, ue8m0, layout)

    graph, (graph_xq, graph_sf) = capture_cuda_graph(fn)
    for step in range(3):
        new = random_input((129, 256), torch.bfloat16)
        static_x.copy_(new)
        static_gs.copy_(make_global_scale(new, "per_row"))
        graph.replay()
        torch.cuda.synchronize()
        want = op_quantize(new, static_gs.cpu(), vec, ue8m0, layout)
        assert_same_bytes(graph_xq, want[0], f"x_q after replay {step}")
        assert_same_bytes(graph_sf, want[1], f"sf after replay {step}")


def _dependent_chain(x, gs, rounds, enable_pdl):
    """Kernels that each read what the previous one wrote: quantize (PDL as asked), dequantize (PDL
    where the GPU has it), the fused RMSNorm + quantize; returns every intermediate."""
    outs = []
    for _ in range(rounds):
        x_q, sf = fp4op.fp4_quantize(x, gs, enable_pdl=enable_pdl)
        x = fp4op.dequantize(x_q, sf, gs, output_dtype=torch.bfloat16)
        n_q, n_sf = torch.ops.fp4op.rms_norm_quantize(x, None, 1e-6, global_scale=gs)
        outs += [x_q, sf, x, n_q, n_sf]
        x = x + fp4op.dequantize(n_q, n_sf, gs, output_dtype=torch.bfloat16)
    return outs


@pytest.mark.parametrize("enable_pdl", [None, True, False])
@pytest.mark.parametrize("in_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("shape", [(2048, 4096), (16, 4096)], ids=["elementwise", "split"])
def test_pdl_dependent_kernels(enable_pdl, in_graph, shape):
    """With Programmatic Dependent Launch a kernel starts before the previous one ends: each must still
    see the previous kernel's complete output (griddepcontrol.wait before any memory access; the split
    kernel computes its indices before the wait, which is predicated on them). Inputs big enough that a
    missing wait would read stale data, and a decode-size one for the split kernel; the CPU runs the
    same chain."""
    x = random_input(shape, torch.bfloat16)
    gs = torch.tensor([448.0 * 6.0 / 4.0])
    want = _dependent_chain(x, gs, 4, enable_pdl)
    static_x, static_gs = x.cuda(), gs.cuda()
    if in_graph:
        graph, got = capture_cuda_graph(lambda: _dependent_chain(static_x, static_gs, 4, enable_pdl))
        graph.replay()
    else:
        got = _dependent_chain(static_x, static_gs, 4, enable_pdl)
    torch.cuda.synchronize()
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same_bytes(g.cpu(), w, f"output {i} of the chain")


def test_cuda_graph_capture_dequantize():
    x = random_input((129, 256), torch.bfloat16).cuda()
    gs = make_global_scale(x, "scalar")
    x_q, sf = op_quantize(x, gs, 16, False, "128x4")
    static_q, static_sf = x_q.clone(), sf.clone()
    op_dequantize(static_q, static_sf, gs, 16, False, "128x4")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op_dequantize(static_q, static_sf, gs, 16, False, "128x4")
    x2 = random_input((129, 256), torch.bfloat16).cuda()
    q2, sf2 = op_quantize(x2, gs, 16, False, "128x4")
    static_q.copy_(q2)
    static_sf.copy_(sf2)
    graph.replay()
    torch.cuda.synchronize()
    assert_same_bytes(out, op_dequantize(q2.cpu(), sf2.cpu(), gs.cpu(), 16, False, "128x4"), "dequantize replay")


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_runs_on_the_current_stream(vec, ue8m0):
    # On a side stream: a long sleep, then the write of the input, then the op. If the op launched on
    # any other stream, it would read the input before the write lands.
    x = torch.zeros(4096, 1024, dtype=torch.bfloat16, device="cuda")
    new = random_input((4096, 1024), torch.bfloat16).cuda()
    gs = torch.ones(1, device="cuda")
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        x.copy_(new)
        x_q, sf = op_quantize(x, gs, vec, ue8m0, "128x4")
        deq = op_dequantize(x_q, sf, gs, vec, ue8m0, "128x4")
    stream.synchronize()
    want = op_quantize(new.cpu(), gs.cpu(), vec, ue8m0, "128x4")
    assert_same_bytes(x_q, want[0], "x_q")
    assert_same_bytes(sf, want[1], "sf")
    assert_same_bytes(deq, op_dequantize(*want, gs.cpu(), vec, ue8m0, "128x4"), "dequantize")


def test_capture_on_side_stream_uses_that_stream():
    # stream capture fails if the op launches on a stream other than the capturing (current) one
    x = random_input((300, 512), torch.float16).cuda()
    gs = torch.ones(1, device="cuda")
    op_quantize(x, gs, 16, False, "8x4")
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = op_quantize(x, gs, 16, False, "8x4")
    graph.replay()
    torch.cuda.synchronize()
    want = op_quantize(x.cpu(), gs.cpu(), 16, False, "8x4")
    assert_same_bytes(out[0], want[0], "x_q")
    assert_same_bytes(out[1], want[1], "sf")


@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_deterministic(vec, ue8m0):
    x = random_input((1000, 2048), torch.bfloat16).cuda()
    gs = make_global_scale(x, "per_row")
    first = op_quantize(x, gs, vec, ue8m0, "128x4")
    for _ in range(5):
        again = op_quantize(x, gs, vec, ue8m0, "128x4")
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m,k", [(1, 64), (7, 48), (129, 80), (300, 208), (0, 64), (9, 0)])
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
def test_sf_padding_written_by_kernel(layout, m, k, vec, ue8m0):
    if k % vec:
        pytest.skip("K must be a multiple of the block")
    x = random_input((m, k), torch.bfloat16).cuda()
    gs = torch.ones(1, device="cuda")
    rows, cols = layouts.sf_shape(m, k // vec, layout)
    # Hand the op memory full of 0xFF: blocks of the outputs' sizes freed to the caching allocator just
    # before the call. The allocator picks the best-fitting free blocks, which may be others; the
    # outputs of such a call stay alive (taking those blocks) and the next try gets the garbage.
    keep = []
    for _ in range(64):
        torch.cuda.synchronize()
        garbage = [torch.full((max(n, 1),), 0xFF, dtype=torch.uint8, device="cuda") for n in (m * k // 2, rows * cols)]
        ranges = [(g.data_ptr(), g.data_ptr() + g.numel()) for g in garbage]
        del garbage
        x_q, sf = op_quantize(x, gs, vec, ue8m0, layout)
        if sf.numel() == 0 or any(lo <= sf.data_ptr() < hi for lo, hi in ranges):
            break
        keep.append((x_q, sf))
    else:
        pytest.fail("test set-up: sf never got the 0xFF memory")
    want = op_quantize(x.cpu(), gs.cpu(), vec, ue8m0, layout)
    assert_same_bytes(x_q, want[0], "x_q")
    assert_same_bytes(sf, want[1], "sf (padding included)")


def test_compile_reduce_overhead():
    torch._dynamo.reset()

    def quantize_and_back(x, gs):
        x_q, sf = fp4op.fp4_quantize(x, gs)
        return x_q, sf, fp4op.dequantize(x_q, sf, gs, output_dtype=torch.bfloat16)

    compiled = torch.compile(quantize_and_back, mode="reduce-overhead")
    gs = torch.tensor([100.0], device="cuda")
    for step in range(4):
        x = random_input((129, 256), torch.bfloat16).cuda()
        # cudagraph outputs are overwritten by the next replay: clone before the next call
        got = [t.clone() for t in compiled(x, gs)]
        want = quantize_and_back(x, gs)
        for g, w, name in zip(got, want, ("x_q", "sf", "dequantized")):
            assert_same_bytes(g, w, f"{name} at step {step}")
    torch._dynamo.reset()


# ---- large shapes -------------------------------------------------------------------------------------

@pytest.mark.large
@pytest.mark.parametrize("vec,ue8m0", RECIPE_PARAMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_8192x16384_bf16(vec, ue8m0, layout):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8192, 16384, dtype=torch.bfloat16, device="cuda", generator=g)
    gs = make_global_scale(x, "per_row")
    cuda_equals_cpu(x, gs, vec, ue8m0, layout, dequantize=False)


@pytest.mark.large
def test_large_sf_fp8_nvfp4_128x4():
    # 16384 x 16384 e4m3: a 16 MiB sf tensor, from which fp8 NVFP4 128x4 takes sector tiles
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(16384, 16384, device="cuda", generator=g).clamp(-448, 448).to(torch.float8_e4m3fn)
    gs = make_global_scale(x, "per_row")
    cuda_equals_cpu(x, gs, 16, False, "128x4", dequantize=False)


@pytest.mark.large
def test_more_than_2_pow_31_elements():
    # [2^31 / 8192 + 1, 8192] bf16: 2^31 + 8192 elements (4.3 GB); compare sampled rows, the last ones
    # included, against the CPU kernel on those rows, and the last rows' scales in every layout
    k = 8192
    m = 2**31 // k + 1
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs about 12 GB of GPU memory")
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda", generator=g)
    assert x.numel() > 2**31
    rows = torch.tensor([0, 1, 4095, 131071, 131072, 262000] + list(range(m - 130, m)), device="cuda")
    x_rows = x[rows].cpu()
    gs = 2688.0 / x.abs().amax(dim=-1).float()  # one scale a row: the per-row index is 64-bit too
    for vec, ue8m0 in ((16, False), (32, True)):
        for layout in LAYOUTS:
            x_q, sf = op_quantize(x, gs, vec, ue8m0, layout)
            want_q, want_sf = op_quantize(x_rows, gs[rows].cpu(), vec, ue8m0, "linear")
            assert_same_bytes(x_q[rows], want_q, f"x_q rows, {layout}")
            scales = layouts.unswizzle(sf, m, k // vec, layout)
            assert_same_bytes(scales[rows], want_sf, f"sf rows, {layout}")
            # the padding rows after the last row are 0 (K / vec is a multiple of 4: no padding
            # columns); in the swizzled layouts they are found through the layout, not sf[m:]
            padded = layouts.unswizzle(sf, sf.shape[0], sf.shape[1], layout)
            assert (padded[m:] == 0).all(), f"padding rows must be 0, {layout}"
            if layout == "128x4":
                # dequantize with more than 2^31 output elements (byte offsets past 2^32)
                deq = op_dequantize(x_q, sf, gs, vec, ue8m0, layout, False, torch.bfloat16)
                want_deq = op_dequantize(want_q, layouts.swizzle(want_sf, layout), gs[rows].cpu(), vec, ue8m0,
                                         layout, False, torch.bfloat16)
                assert_same_bytes(deq[rows], want_deq, "dequantized rows")
                del deq
            del x_q, sf, scales
        torch.cuda.empty_cache()
