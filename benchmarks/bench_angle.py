"""CPU benchmark of angle_concentration: the C++ path against the torch reference (O(T·d))
and against the explicit O(T²) form (batched Gram matrix), measured side by side.

    pytest benchmarks/bench_angle.py -q -s

Also prints a plain sum over the same bytes (one read of the hidden states, the floor of any
pass over them). Shared, noisy machines: read the ratios, not the absolute times. On a CUDA
machine (TRITON_INTERPRET unset) the Triton path is timed against the reference too.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from geko_core._backend import compiled_core_error
from geko_core.angle import angle_concentration, angle_concentration_reference

if compiled_core_error() is not None:
    pytest.skip(f"geko_core._C is not built: {compiled_core_error()}", allow_module_level=True)

SHAPES = {
    "8x512x1024_fp32": ((8, 512, 1024), torch.float32),
    "8x512x1024_bf16": ((8, 512, 1024), torch.bfloat16),
    "2x2048x4096_bf16": ((2, 2048, 4096), torch.bfloat16),
}


def median_ms(fn, *, warmup: int = 2, iters: int = 7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gram_concentration(hidden: torch.Tensor, mask: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The O(T²·d) form: the full cosine matrix of the valid tokens, averaged over pairs."""
    valid = (mask != 0).unsqueeze(-1)
    x_hat = torch.where(valid, F.normalize(hidden.float(), dim=-1), 0.0)
    cosines = x_hat @ x_hat.transpose(1, 2)  # [B, T, T]
    n = valid.sum(dim=(1, 2)).float()
    nonzero = (x_hat.abs().sum(-1) > 0).sum(-1).float()
    concentration = (cosines.sum(dim=(1, 2)) - nonzero) / (n * (n - 1))
    cross = cosines[:, :prefix_len, prefix_len:].sum(dim=(1, 2))
    n_prefix = valid[:, :prefix_len].sum(dim=(1, 2)).float()
    return concentration, cross / (n_prefix * (n - n_prefix))


@pytest.mark.parametrize("name", list(SHAPES))
def test_bench_angle_cpu(benchmark, name):
    (batch, tokens, dim), dtype = SHAPES[name]
    hidden = (torch.randn(batch, tokens, dim) + 0.3 * torch.randn(dim)).to(dtype)
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    mask[::2, -tokens // 4 :] = 0  # right padding on half the batch
    prefix = tokens // 8

    def cpp():
        return angle_concentration(hidden, mask, prefix, backend="cpp")

    # the three agree before anything is timed
    got = cpp()
    ref = angle_concentration_reference(hidden, mask, prefix)
    gram, gram_cross = gram_concentration(hidden, mask, prefix)
    torch.testing.assert_close(got.concentration, ref.concentration, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.concentration, gram, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got.cross, gram_cross, atol=1e-4, rtol=1e-3)

    cpp_ms = median_ms(cpp)
    reference_ms = median_ms(lambda: angle_concentration_reference(hidden, mask, prefix), iters=5)
    gram_ms = median_ms(lambda: gram_concentration(hidden, mask, prefix), iters=3)
    # a pure read of the same bytes: torch's bf16/fp16 and int32 sums are slow on CPU, so
    # 16-bit pairs are summed as float32 (the values are meaningless, the traffic is the same)
    raw = hidden if dtype == torch.float32 else hidden.view(torch.float32)
    read_ms = median_ms(lambda: raw.sum())
    gbytes = hidden.numel() * hidden.element_size() / 1e9
    print(
        f"\n{name}: cpp {cpp_ms:.2f} ms ({gbytes / cpp_ms * 1e3:.1f} GB/s, {torch.get_num_threads()} threads) | "
        f"torch reference O(T·d) {reference_ms:.2f} ms -> {reference_ms / cpp_ms:.1f}x | "
        f"O(T²) Gram {gram_ms:.2f} ms -> {gram_ms / cpp_ms:.1f}x | "
        f"one read (sum) {read_ms:.2f} ms -> cpp at {read_ms / cpp_ms:.0%} of its speed"
    )
    benchmark.pedantic(cpp, rounds=5, warmup_rounds=1)


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    reason="the Triton benchmark needs CUDA and TRITON_INTERPRET unset",
)
@pytest.mark.parametrize("shape", [(8, 512, 1024), (8, 4096, 4096), (2, 32768, 4096)])
def test_bench_angle_triton(benchmark, shape):
    hidden = (torch.randn(shape, device="cuda") + 0.3 * torch.randn(shape[-1], device="cuda")).to(torch.bfloat16)
    mask = torch.ones(shape[:2], dtype=torch.int64, device="cuda")
    prefix = shape[1] // 8

    def timed(fn, iters=20):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    def kernel():
        return angle_concentration(hidden, mask, prefix, backend="triton")

    torch.testing.assert_close(
        kernel().concentration, angle_concentration_reference(hidden, mask, prefix).concentration, atol=1e-5, rtol=1e-4
    )
    kernel_ms = timed(kernel)
    reference_ms = timed(lambda: angle_concentration_reference(hidden, mask, prefix), iters=5)
    read_ms = timed(lambda: hidden.view(torch.float32).sum())
    gbytes = hidden.numel() * hidden.element_size() / 1e9
    print(
        f"\n{shape} bf16: triton {kernel_ms:.3f} ms ({gbytes / kernel_ms * 1e3:.0f} GB/s of hidden states) | "
        f"torch reference {reference_ms:.3f} ms -> {reference_ms / kernel_ms:.1f}x | "
        f"one read {read_ms:.3f} ms -> {read_ms / kernel_ms:.0%} (two reads: 50% is the floor)"
    )
    benchmark.pedantic(lambda: (kernel(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
