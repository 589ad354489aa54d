"""GPU benchmarks of the Triton statistics and fused cross-entropy kernels.

Run on a CUDA machine, without the interpreter:

    pytest benchmarks/bench_triton_stats.py -q -s

Each benchmark times its baselines in the same run (CUDA events, medians) and prints the
ratios: against the torch reference (``geko_core.reference``), and against ``logits.sum()``,
a pure read of the logits, whose time is the floor of any one-pass kernel. Skipped without
CUDA or with TRITON_INTERPRET set.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need CUDA and TRITON_INTERPRET unset", allow_module_level=True)

from geko_core import GekoConfig  # noqa: E402
from geko_core._cross_entropy_kernels import cross_entropy_backward_triton, cross_entropy_forward_triton  # noqa: E402
from geko_core.stats import sample_stats_triton  # noqa: E402
from geko_core.reference import sample_stats_reference  # noqa: E402

SHAPES = {
    "lm_4x1024x32000_bf16": ((4, 1024, 32000), torch.bfloat16),
    "lm_2x512x128256_bf16": ((2, 512, 128256), torch.bfloat16),
    "cls_4096x1000_fp32": ((4096, 1, 1000), torch.float32),
}


def cuda_median_ms(fn, *, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_inputs(shape, dtype):
    num_samples, seq_len, vocab = shape
    logits = torch.randn(shape, device="cuda", dtype=torch.float32).mul_(3).to(dtype)
    labels = torch.randint(0, vocab, (num_samples, seq_len), device="cuda")
    labels[:, :8] = -100
    return logits, labels


@pytest.mark.parametrize("name", list(SHAPES))
def test_bench_sample_stats(benchmark, name):
    shape, dtype = SHAPES[name]
    logits, labels = make_inputs(shape, dtype)
    config = GekoConfig()

    def kernel():
        return sample_stats_triton(logits, labels, ignore_index=-100, config=config, per_token=False)

    kernel_ms = cuda_median_ms(kernel)
    read_ms = cuda_median_ms(lambda: logits.sum())
    reference_ms = cuda_median_ms(lambda: sample_stats_reference(logits, labels), iters=5)
    gbytes = logits.numel() * logits.element_size() / 1e9
    print(
        f"\n{name}: triton {kernel_ms:.3f} ms ({gbytes / kernel_ms * 1e3:.0f} GB/s), "
        f"torch reference {reference_ms:.3f} ms -> {reference_ms / kernel_ms:.1f}x faster, "
        f"logits.sum() {read_ms:.3f} ms -> {read_ms / kernel_ms:.0%} of its bandwidth"
    )
    benchmark.pedantic(lambda: (kernel(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("name", ["lm_4x1024x32000_bf16", "lm_2x512x128256_bf16"])
def test_bench_fused_cross_entropy(benchmark, name):
    shape, dtype = SHAPES[name]
    logits, labels = make_inputs(shape, dtype)
    config = GekoConfig()
    vocab = shape[2]

    def fused():
        _, token_loss, lse = cross_entropy_forward_triton(logits, labels, ignore_index=-100, config=config, per_token=False)
        token_scale = torch.full_like(lse, 1.0 / lse.numel())
        return cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=-100, inplace=False)

    def torch_loss_and_stats():
        x = logits.detach().requires_grad_(True)
        loss = F.cross_entropy(x.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        sample_stats_reference(logits, labels)

    fused_ms = cuda_median_ms(fused)
    torch_ms = cuda_median_ms(torch_loss_and_stats, iters=5)
    print(f"\n{name}: fused forward+backward+stats {fused_ms:.3f} ms, torch {torch_ms:.3f} ms -> {torch_ms / fused_ms:.1f}x")
    benchmark.pedantic(lambda: (fused(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
