"""Hostile inputs, each run in a child process so that a crash (segfault, abort) is a test failure
instead of killing pytest: every case must raise the named exception with a message naming the
argument, or give the right answer.

The child runs a batch of cases and prints one JSON line per finished case; a case that kills the
child is reported as crashed, and the rest of the batch goes on in a fresh child."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fp4op

HERE = os.path.dirname(os.path.abspath(__file__))


def _x(device, m=7, k=64, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(m * 1000 + k)
    return (torch.randn(m, k, generator=g) * 3).to(dtype).to(device)


def _same(a, b):
    assert a[0].shape == b[0].shape and a[1].shape == b[1].shape, (a[0].shape, b[0].shape, a[1].shape, b[1].shape)
    assert torch.equal(a[0].cpu(), b[0].cpu()) and torch.equal(a[1].cpu(), b[1].cpu())


def _q(x, gs=None, *args, **kw):
    if gs is None and not (len(args) > 1 and args[1]):
        gs = torch.ones(1, device=x.device)
    return fp4op.fp4_quantize(x, gs, *args, **kw)


# ---- the cases: name -> (function of device, expected) where expected is "ok" (the function checks
# the answer itself) or (exception class name, text the message must contain) ---------------------------

def case_float32(d):
    _q(_x(d, dtype=torch.float32))


def case_float64(d):
    _q(_x(d, dtype=torch.float64))


def case_int32(d):
    _q(_x(d).to(torch.int32))


def case_bool(d):
    _q(_x(d) > 0)


def case_raw_op_float32(d):
    torch.ops.fp4op.quantize(_x(d, dtype=torch.float32), torch.ones(1, device=d))


def case_raw_op_int8(d):
    torch.ops.fp4op.quantize(_x(d).to(torch.int8), torch.ones(1, device=d))


def case_zero_dim(d):
    _q(torch.tensor(1.0, dtype=torch.bfloat16, device=d))


def case_raw_op_zero_dim(d):
    torch.ops.fp4op.quantize(torch.tensor(1.0, dtype=torch.bfloat16, device=d), torch.ones(1, device=d))


def case_one_dim(d):
    _q(_x(d)[0])


def case_raw_op_one_dim_is_one_row(d):
    x = _x(d)[2]
    got = torch.ops.fp4op.quantize(x, torch.ones(1, device=d))
    want = torch.ops.fp4op.quantize(x.reshape(1, -1), torch.ones(1, device=d))
    assert got[0].shape == (32,)
    _same((got[0].reshape(1, -1), got[1]), want)


def case_k_not_multiple_nvfp4(d):
    _q(_x(d, k=40))


def case_k_not_multiple_mxfp4(d):
    _q(_x(d, k=48), None, 32, True)


def case_k_odd(d):
    _q(_x(d, k=17))


def case_sf_vec_size_zero(d):
    _q(_x(d), None, 0)


def case_sf_vec_size_negative(d):
    torch.ops.fp4op.quantize(_x(d), torch.ones(1, device=d), -16)


def case_k_zero(d):
    for layout_flags in ((True, False), (True, True), (False, False)):
        x_q, sf = _q(torch.empty(7, 0, dtype=torch.bfloat16, device=d), None, 16, False, *layout_flags)
        assert x_q.shape == (7, 0) and x_q.dtype == torch.uint8
        rows = {(True, False): 128, (True, True): 8, (False, False): 7}[layout_flags]
        assert sf.shape == (rows, 0), sf.shape


def case_m_zero(d):
    for layout_flags, shape in (((True, False), (0, 4)), ((True, True), (0, 4)), ((False, False), (0, 4))):
        x_q, sf = _q(torch.empty(0, 64, dtype=torch.float16, device=d), None, 16, False, *layout_flags)
        assert x_q.shape == (0, 32) and sf.shape == shape, (x_q.shape, sf.shape)


def case_m_zero_rank3(d):
    x_q, sf = _q(torch.empty(4, 0, 64, dtype=torch.float16, device=d))
    assert x_q.shape == (4, 0, 32) and sf.shape == (0, 4)


def case_sliced_rows(d):
    x = _x(d, m=40)
    _same(_q(x[1::3]), _q(x[1::3].contiguous()))


def case_strided_columns(d):
    x = _x(d, k=128)
    _same(_q(x[:, ::2]), _q(x[:, ::2].contiguous()))


def case_column_window(d):
    x = _x(d, m=9, k=256)
    _same(_q(x[:, 32:96]), _q(x[:, 32:96].contiguous()))


def case_expanded(d):
    x = _x(d, m=1).expand(130, 64)
    _same(_q(x), _q(x.contiguous()))


def _freed(t, keep_bytes=0):
    """A view of t after its storage is resized in place to keep_bytes (FSDP frees parameters so)."""
    v = t.view(t.shape)
    t.untyped_storage().resize_(keep_bytes)
    return v


def case_raw_op_none_input(d):
    torch.ops.fp4op.quantize(None, torch.ones(1, device=d))


def case_raw_op_dequantize_none_sf(d):
    x_q, _ = _q(_x(d))
    torch.ops.fp4op.dequantize(x_q, None, torch.ones(1, device=d))


def case_freed_input(d):
    torch.ops.fp4op.quantize(_freed(_x(d)), torch.ones(1, device=d))


def case_shrunk_input_api(d):
    _q(_freed(_x(d), 64))  # 32 of its 448 elements left


def case_freed_global_scale(d):
    _q(_x(d), _freed(torch.ones(1, device=d)))


def case_freed_dequantize_sf(d):
    x_q, sf = _q(_x(d))
    fp4op.dequantize(x_q, _freed(sf.clone()), torch.ones(1, device=d))


def case_odd_storage_offset(d):
    flat = _x(d, m=9, k=64).reshape(-1)
    x = flat[1 : 1 + 8 * 48].view(8, 48)
    _same(_q(x), _q(x.contiguous()))


def case_column_major(d):
    x = _x(d, m=64, k=32).t()  # [32, 64] with stride (1, 32)
    x_q, sf = _q(x, None, 16, False, False)
    want = _q(x.t().contiguous(), None, 16, False, False)
    _same((x_q, sf), (want[0].t(), want[1].t()))


def case_global_scale_int(d):
    _q(_x(d), torch.ones(1, dtype=torch.int32, device=d))


def case_global_scale_size(d):
    _q(_x(d), torch.ones(5, device=d))


def case_global_scale_2d_wrong(d):
    _q(_x(d), torch.ones(7, 2, device=d))


def case_global_scale_zero_dim(d):
    _same(_q(_x(d), torch.tensor(3.0, device=d)), _q(_x(d), torch.tensor([3.0], device=d)))


def case_global_scale_python_float(d):
    _q(_x(d), 3.0)


def case_raw_op_global_scale_size(d):
    torch.ops.fp4op.quantize(_x(d), torch.ones(6, device=d))


def case_dequantize_bad_sf(d):
    x_q, sf = _q(_x(d))
    fp4op.dequantize(x_q, sf[:, :2].contiguous(), torch.ones(1, device=d))


def case_dequantize_bad_x_q_dtype(d):
    x_q, sf = _q(_x(d))
    torch.ops.fp4op.dequantize(x_q.to(torch.int16), sf, torch.ones(1, device=d))


def case_dequantize_zero_dim_x_q(d):
    torch.ops.fp4op.dequantize(torch.tensor(3, dtype=torch.uint8, device=d), torch.zeros(128, 4, dtype=torch.uint8,
                               device=d), torch.ones(1, device=d))


# GPU only: tensors on different devices
def case_cuda_input_cpu_scale_api(d):
    # SPEC.md: the Python API moves global_scale to the input's device; the op takes none from another
    x = _x("cuda")
    got, want = _q(x, torch.tensor([2.0])), _q(x, torch.tensor([2.0], device="cuda"))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def case_cpu_input_cuda_scale_api(d):
    x = _x("cpu")
    got, want = _q(x, torch.tensor([2.0], device="cuda")), _q(x, torch.tensor([2.0]))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def case_cuda_input_cpu_scale_raw_op(d):
    torch.ops.fp4op.quantize(_x("cuda"), torch.ones(1))


def case_cpu_input_cuda_scale_raw_op(d):
    torch.ops.fp4op.quantize(_x("cpu"), torch.ones(1, device="cuda"))


def case_cpu_input_cuda_scale_mxfp4_raw_op(d):
    # MXFP4 ignores the scale, but a CUDA scale sends a CPU input to the CUDA kernel
    torch.ops.fp4op.quantize(_x("cpu"), torch.ones(1, device="cuda"), 32, True)


def case_dequantize_meta_sf(d):
    # the meta sf sent the call to the fake kernel, which returned uninitialized memory
    x_q, sf = _q(_x(d))
    fp4op.dequantize(x_q, sf.to("meta"), torch.ones(1, device=d))


def case_raw_op_dequantize_meta_sf(d):
    x_q, sf = _q(_x(d))
    torch.ops.fp4op.dequantize(x_q, sf.to("meta"), torch.ones(1, device=d))


def case_dequantize_transposed_sf(d):
    # the right element count in the wrong shape: read as garbage before
    x_q, sf = _q(_x(d, m=9))
    fp4op.dequantize(x_q, sf.t(), torch.ones(1, device=d))


def case_dequantize_flat_sf(d):
    x = _x(d, m=9)
    x_q, sf = _q(x)
    want = fp4op.dequantize(x_q, sf, torch.ones(1, device=d))
    assert torch.equal(fp4op.dequantize(x_q, sf.flatten(), torch.ones(1, device=d)), want)


def case_dequantize_column_major_pair(d):
    # fp4_quantize's transposed outputs for a column-major input come back with the input's shape, in
    # every layout; (64, 16) linear: the transposed sf is [1, 64], contiguous as well
    gs = torch.ones(1, device=d)
    for rows, cols in ((32, 64), (64, 16), (128, 128)):
        x = _x(d, m=rows, k=cols).t()
        for flags in ((True, False), (True, True), (False, False)):
            x_q, sf = _q(x, gs, 16, False, *flags)
            got = fp4op.dequantize(x_q, sf, gs, 16, False, *flags)
            want = fp4op.dequantize(*_q(x.t().contiguous(), gs, 16, False, *flags), gs, 16, False, *flags)
            assert got.shape == x.shape and torch.equal(got, want.t()), (rows, cols, flags)


def case_dequantize_flag_not_bool(d):
    x_q, sf = _q(_x(d))
    fp4op.dequantize(x_q, sf, torch.ones(1, device=d), 16, 2)


def case_dequantize_x_q_not_tensor(d):
    fp4op.dequantize([1, 2], torch.zeros(128, 4, dtype=torch.uint8, device=d), torch.ones(1, device=d))


def case_fake_dequantize_bad_sf(d):
    # the fake kernel (FakeTensorMode, torch.compile) checks what the kernel checks
    from torch._subclasses.fake_tensor import FakeTensorMode

    x_q, sf = _q(_x(d))
    bad_sf, gs = sf[:, :2].contiguous(), torch.ones(1, device=d)
    mode = FakeTensorMode()
    args = [mode.from_tensor(t) for t in (x_q, bad_sf, gs)]
    with mode:
        torch.ops.fp4op.dequantize(*args)


def case_global_scale_float4(d):
    gs = torch.ones(1, dtype=torch.uint8, device=d).view(torch.float4_e2m1fn_x2)
    fp4op.fp4_quantize(_x(d), gs)


def case_raw_op_global_scale_float4(d):
    gs = torch.ones(1, dtype=torch.uint8, device=d).view(torch.float4_e2m1fn_x2)
    torch.ops.fp4op.quantize(_x(d), gs)


def case_global_scale_of_empty(d):
    # nothing to quantize: the all-zero scale (infinite), not amax()'s error
    assert fp4op.nvfp4_global_scale(torch.empty(0, 64, device=d)).isinf().all()
    assert fp4op.nvfp4_global_scale(torch.empty(0, 64, device=d), per_row=True).shape == (0,)
    assert fp4op.nvfp4_global_scale(torch.empty(3, 0, device=d), per_row=True).isinf().all()


def case_cuda_x_q_cpu_sf(d):
    x_q, sf = _q(_x("cuda"))
    torch.ops.fp4op.dequantize(x_q, sf.cpu(), torch.ones(1, device="cuda"))


NIE, VE = "NotImplementedError", "ValueError"
CASES = {
    "float32": (case_float32, (NIE, "input")),
    "float64": (case_float64, (NIE, "input")),
    "int32": (case_int32, (NIE, "input")),
    "bool": (case_bool, (NIE, "input")),
    "raw_op_float32": (case_raw_op_float32, (NIE, "input")),
    "raw_op_int8": (case_raw_op_int8, (NIE, "input")),
    "zero_dim": (case_zero_dim, (VE, "rank")),
    "raw_op_zero_dim": (case_raw_op_zero_dim, (VE, "0-d")),
    "one_dim": (case_one_dim, (VE, "rank")),
    "raw_op_one_dim_is_one_row": (case_raw_op_one_dim_is_one_row, "ok"),
    "k_not_multiple_nvfp4": (case_k_not_multiple_nvfp4, (VE, "sf_vec_size")),
    "k_not_multiple_mxfp4": (case_k_not_multiple_mxfp4, (VE, "sf_vec_size")),
    "k_odd": (case_k_odd, (VE, "sf_vec_size")),
    "sf_vec_size_zero": (case_sf_vec_size_zero, (NIE, "sf_vec_size")),
    "sf_vec_size_negative": (case_sf_vec_size_negative, (NIE, "sf_vec_size")),
    "k_zero": (case_k_zero, "ok"),
    "m_zero": (case_m_zero, "ok"),
    "m_zero_rank3": (case_m_zero_rank3, "ok"),
    "sliced_rows": (case_sliced_rows, "ok"),
    "strided_columns": (case_strided_columns, "ok"),
    "column_window": (case_column_window, "ok"),
    "expanded": (case_expanded, "ok"),
    "odd_storage_offset": (case_odd_storage_offset, "ok"),
    "raw_op_none_input": (case_raw_op_none_input, (VE, "input must be a tensor, got None")),
    "raw_op_dequantize_none_sf": (case_raw_op_dequantize_none_sf, (VE, "sf must be a tensor, got None")),
    "freed_input": (case_freed_input, (VE, "input has 448 elements but its storage holds 0")),
    "shrunk_input_api": (case_shrunk_input_api, (VE, "input has 448 elements but its storage holds 64")),
    "freed_global_scale": (case_freed_global_scale, (VE, "global_scale has 1 elements but its storage")),
    "freed_dequantize_sf": (case_freed_dequantize_sf, (VE, "sf has")),
    "column_major": (case_column_major, "ok"),
    "global_scale_int": (case_global_scale_int, (VE, "global_scale")),
    "global_scale_size": (case_global_scale_size, (VE, "global_scale")),
    "global_scale_2d_wrong": (case_global_scale_2d_wrong, (VE, "global_scale")),
    "global_scale_zero_dim": (case_global_scale_zero_dim, "ok"),
    "global_scale_python_float": (case_global_scale_python_float, (VE, "global_scale")),
    "raw_op_global_scale_size": (case_raw_op_global_scale_size, (VE, "global_scale")),
    "dequantize_bad_sf": (case_dequantize_bad_sf, (VE, "sf")),
    "dequantize_bad_x_q_dtype": (case_dequantize_bad_x_q_dtype, (VE, "x_q")),
    "dequantize_zero_dim_x_q": (case_dequantize_zero_dim_x_q, (VE, "x_q")),
    "dequantize_meta_sf": (case_dequantize_meta_sf, (VE, "sf is on meta")),
    "raw_op_dequantize_meta_sf": (case_raw_op_dequantize_meta_sf, (VE, "sf is on meta")),
    "dequantize_transposed_sf": (case_dequantize_transposed_sf, (VE, "sf must have shape")),
    "dequantize_flat_sf": (case_dequantize_flat_sf, "ok"),
    "dequantize_column_major_pair": (case_dequantize_column_major_pair, "ok"),
    "dequantize_flag_not_bool": (case_dequantize_flag_not_bool, (VE, "sf_use_ue8m0")),
    "dequantize_x_q_not_tensor": (case_dequantize_x_q_not_tensor, (VE, "x_q")),
    "fake_dequantize_bad_sf": (case_fake_dequantize_bad_sf, (VE, "sf must have shape")),
    "global_scale_float4": (case_global_scale_float4, (VE, "global_scale")),
    "raw_op_global_scale_float4": (case_raw_op_global_scale_float4, (VE, "global_scale")),
    "global_scale_of_empty": (case_global_scale_of_empty, "ok"),
}
CUDA_ONLY = {
    "cuda_input_cpu_scale_api": (case_cuda_input_cpu_scale_api, "ok"),
    "cpu_input_cuda_scale_api": (case_cpu_input_cuda_scale_api, "ok"),
    "cuda_input_cpu_scale_raw_op": (case_cuda_input_cpu_scale_raw_op, (VE, "global_scale")),
    "cpu_input_cuda_scale_raw_op": (case_cpu_input_cuda_scale_raw_op, (VE, "global_scale")),
    "cpu_input_cuda_scale_mxfp4_raw_op": (case_cpu_input_cuda_scale_mxfp4_raw_op, (VE, "global_scale")),
    "cuda_x_q_cpu_sf": (case_cuda_x_q_cpu_sf, (VE, "sf")),
}
ALL_CASES = {**CASES, **CUDA_ONLY}


def judge(fn, expected, device):
    """In the child: the verdict of one case, `fn` run on `device` against `expected`, as a dict."""
    try:
        fn(device)
        if device == "cuda":
            torch.cuda.synchronize()
    except BaseException as e:  # noqa: BLE001 (any exception is a verdict to report)
        got = (type(e).__name__, str(e).split("\n")[0][:500])
        if expected == "ok":
            return {"ok": False, "why": f"expected a result, got {got[0]}: {got[1]}"}
        cls, text = expected
        if got[0] != cls:
            return {"ok": False, "why": f"expected {cls} naming {text!r}, got {got[0]}: {got[1]}"}
        if text not in got[1]:
            return {"ok": False, "why": f"{cls} message does not name {text!r}: {got[1]}"}
        return {"ok": True}
    if expected != "ok":
        return {"ok": False, "why": f"expected {expected[0]} naming {expected[1]!r}, but it returned"}
    return {"ok": True}


def run_batch(script, names, device):
    """In the parent: run the cases `names` of `script` in child processes; {name: verdict}. A case that
    kills its child is reported as a crash and the remaining cases go on in a new child."""
    verdicts = {}
    pending = list(names)
    while pending:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(script), device, *pending],
            capture_output=True, text=True, timeout=600, cwd=HERE,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                verdicts[record.pop("name")] = record
        pending = [n for n in pending if n not in verdicts]
        if pending:
            crashed = pending.pop(0)
            verdicts[crashed] = {
                "ok": False,
                "why": f"the child process died (exit code {proc.returncode}) on this case: {proc.stderr[-2000:]}",
            }
    return verdicts


def verdict_cache(script, names_of):
    """(verdict(name, device), cache): each device's batch, the cases names_of(device), runs once."""
    cache = {}

    def verdict(name, device):
        if device not in cache:
            cache[device] = run_batch(script, names_of(device), device)
        return cache[device][name]

    return verdict, cache


def child_main(cases):
    """The child's entry point: `python script DEVICE NAME...` prints one JSON verdict line per case."""
    device, names = sys.argv[1], sys.argv[2:]
    for name in names:
        if name == CRASH:
            import ctypes

            sys.stdout.flush()
            ctypes.string_at(0)  # a segfault
        fn, expected = cases[name]
        print(json.dumps({"name": name, **judge(fn, expected, device)}), flush=True)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CRASH = "__crash__"  # a deliberate segfault in the middle of the CPU batch: checks the harness itself


def _names_of(device):
    names = list(CASES) + (list(CUDA_ONLY) if device == "cuda" else [])
    if device == "cpu":
        names.insert(len(names) // 2, CRASH)
    return names


verdict, _verdicts = verdict_cache(__file__, _names_of)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, device):
    v = verdict(name, device)
    assert v["ok"], v["why"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CUDA_ONLY))
def test_hostile_cross_device(name):
    v = verdict(name, "cuda")
    assert v["ok"], v["why"]


def test_crash_is_detected():
    # the harness itself: a child that dies by a signal is a failed case, not a lost one, and the
    # cases after it still get verdicts
    crash = verdict(CRASH, "cpu")
    assert not crash["ok"] and "died" in crash["why"]
    names = list(CASES)
    after = names[len(names) // 2 :]
    assert all(name in _verdicts["cpu"] for name in after)


if __name__ == "__main__":
    child_main(ALL_CASES)
