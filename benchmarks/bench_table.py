"""SampleTable throughput (DESIGN.md §5: >= 20 M sample-updates/s on a 10 M-sample table with
random indices, <= 32 B/sample), against the vectorised numpy oracle measured in the same run.

    python -m pytest benchmarks/bench_table.py --benchmark-only -q

GEKO_BENCH_SAMPLES / GEKO_BENCH_BATCH shrink the shapes (defaults 10 M and 1 M). The numpy
baseline is ``geko_core.reference_table.ReferenceTable``: the same rule, vectorised, applying
duplicate indices in order rank by rank. No timing is asserted.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from geko_core.reference_table import ReferenceTable
from geko_core.table import SampleTable

NUM_SAMPLES = int(os.environ.get("GEKO_BENCH_SAMPLES", 10_000_000))
BATCH = int(os.environ.get("GEKO_BENCH_BATCH", 1_000_000))
NUM_BATCHES = 4


def _batch(rng: np.random.Generator):
    return (
        rng.integers(0, NUM_SAMPLES, BATCH, dtype=np.int64),
        rng.exponential(1.0, BATCH).astype(np.float32),
        rng.random(BATCH, dtype=np.float32),
        (rng.random(BATCH) < 0.7).astype(np.float32),
    )


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [_batch(rng) for _ in range(NUM_BATCHES)]


@pytest.fixture(scope="module")
def tables(batches):
    table, reference = SampleTable(NUM_SAMPLES), ReferenceTable(NUM_SAMPLES)
    for step, batch in enumerate(batches):  # every bucket populated, pages touched
        table.update(*batch, step=step)
        reference.update(*batch, step=step)
    return table, reference


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print("\n" + text)


@pytest.mark.parametrize("num_threads", [1, 2])
def test_update_random_indices(benchmark, tables, batches, capsys, num_threads):
    table, reference = tables
    table.num_threads = num_threads
    steps = iter(range(10, 10**9))

    def numpy_update():
        reference.update(*batches[0], step=next(steps))

    numpy_seconds = _best_seconds(numpy_update, repeats=3)
    cycle = iter(range(10**9))

    def compiled_update():
        table.update(*batches[next(cycle) % NUM_BATCHES], step=next(steps))

    benchmark.pedantic(compiled_update, rounds=12, iterations=1, warmup_rounds=1)
    compiled_seconds = benchmark.stats.stats.median
    rate = BATCH / compiled_seconds / 1e6
    numpy_rate = BATCH / numpy_seconds / 1e6
    bytes_per_sample = table.nbytes / NUM_SAMPLES
    benchmark.extra_info.update(
        {
            "M_updates_per_s": rate,
            "numpy_M_updates_per_s": numpy_rate,
            "speedup_vs_numpy": rate / numpy_rate,
            "bytes_per_sample": bytes_per_sample,
            "num_samples": NUM_SAMPLES,
            "batch": BATCH,
            "num_threads": num_threads,
        }
    )
    _report(
        capsys,
        f"SampleTable.update, {num_threads} thread(s): {rate:.1f} M sample-updates/s (median) on {NUM_SAMPLES:,} samples, batches of "
        f"{BATCH:,} random int64 indices; numpy reference {numpy_rate:.2f} M/s (best of 3) -> "
        f"{rate / numpy_rate:.1f}x; {bytes_per_sample:.0f} B/sample (goal >= 20 M/s, <= 32 B)",
    )


@pytest.mark.parametrize("num_threads", [1, 2])
def test_bucket_counts_full_scan(benchmark, tables, capsys, num_threads):
    table, _ = tables
    table.num_threads = num_threads
    view = table.records()["bucket"]  # the same 32-byte records, read by numpy

    numpy_seconds = _best_seconds(lambda: np.bincount(view.astype(np.int64), minlength=5), repeats=3)
    counts = benchmark.pedantic(table.bucket_counts_array, rounds=20, iterations=1, warmup_rounds=1)
    assert counts.sum() == NUM_SAMPLES  # correctness, not timing
    seconds = benchmark.stats.stats.median
    gbytes = table.nbytes / seconds / 1e9
    benchmark.extra_info.update({"GB_per_s": gbytes, "speedup_vs_numpy_bincount": numpy_seconds / seconds})
    _report(
        capsys,
        f"SampleTable.bucket_counts, {num_threads} thread(s): {seconds * 1e3:.1f} ms for {NUM_SAMPLES:,} samples ({gbytes:.1f} GB/s of records); "
        f"numpy bincount over the same records {numpy_seconds * 1e3:.1f} ms -> {numpy_seconds / seconds:.1f}x",
    )
