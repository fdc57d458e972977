"""Concurrent calls from several Python threads give the same bytes as sequential calls."""

import threading

import pytest
import torch

from conftest import LAYOUTS, make_global_scale, op_dequantize, op_quantize, random_input

N_THREADS = 6
ITERATIONS = 8


def _problems(device):
    """A mix of recipes, layouts, dtypes and shapes (big enough for the CPU kernel's parallel_for)."""
    problems = []
    dtypes = (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
    for i in range(N_THREADS):
        vec, ue8m0 = ((16, False), (32, True))[i % 2]
        layout = LAYOUTS[i % 3]
        x = random_input((129 + 97 * i, 512), dtypes[i % 3]).to(device)
        gs = None if ue8m0 else make_global_scale(x, ("scalar", "per_row")[i % 2])
        problems.append((x, gs, vec, ue8m0, layout))
    return problems


def _run_concurrently(problems, device, flush_denormal_threads=()):
    expected = []
    for x, gs, vec, ue8m0, layout in problems:
        x_q, sf = op_quantize(x, gs, vec, ue8m0, layout)
        expected.append((x_q, sf, op_dequantize(x_q, sf, gs, vec, ue8m0, layout)))
    errors = []
    barrier = threading.Barrier(len(problems))

    def work(i):
        x, gs, vec, ue8m0, layout = problems[i]
        try:
            # a caller with flush-to-zero on must not change the result (nor other threads' results)
            torch.set_flush_denormal(i in flush_denormal_threads)
            stream = torch.cuda.Stream() if device == "cuda" else None
            barrier.wait()
            for _ in range(ITERATIONS):
                if stream is not None:
                    with torch.cuda.stream(stream):
                        got = op_quantize(x, gs, vec, ue8m0, layout)
                        deq = op_dequantize(*got, gs, vec, ue8m0, layout)
                    stream.synchronize()
                else:
                    got = op_quantize(x, gs, vec, ue8m0, layout)
                    deq = op_dequantize(*got, gs, vec, ue8m0, layout)
                want = expected[i]
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                        and torch.equal(deq.view(torch.int32), want[2].view(torch.int32))):
                    errors.append(f"thread {i}: result differs from the sequential one")
                    return
        except Exception as e:  # noqa: BLE001 (reported to the main thread)
            errors.append(f"thread {i}: {type(e).__name__}: {e}")
        finally:
            torch.set_flush_denormal(False)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_concurrent_cpu_calls():
    _run_concurrently(_problems("cpu"), "cpu", flush_denormal_threads=(1, 4))


def test_concurrent_cpu_calls_on_denormal_inputs():
    # bf16 denormals (float32 denormals once widened), where flush-to-zero in a thread would change
    # the results if it reached the kernel
    problems = []
    for i in range(N_THREADS):
        bits = torch.randint(1, 0x7F, (300, 256), dtype=torch.int16)
        x = bits.view(torch.bfloat16)
        x[::5, :16] = 2.0**-100  # some blocks with normal values, which MXFP4 scales above byte 0
        vec, ue8m0 = ((16, False), (32, True))[i % 2]
        problems.append((x, torch.tensor([3e38]), vec, ue8m0, LAYOUTS[i % 3]))
    _run_concurrently(problems, "cpu", flush_denormal_threads=(0, 2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_concurrent_cuda_calls_on_own_streams():
    _run_concurrently(_problems("cuda"), "cuda")
