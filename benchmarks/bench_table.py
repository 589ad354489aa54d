"""SampleTable throughput against numpy, measured in the same run (docs/design.md §5: >= 20 M
sample-updates/s on a 10 M-sample table with random indices, <= 32 B/sample; issue 15:
>= 20 M/s and >= 3x numpy at 4096 indices per call).

    python -m pytest benchmarks/bench_table.py -s

A training loop calls ``update`` once per step, so the figures that matter are at per-step
batch sizes (128, 1024, 4096 indices per call) on a large table whose pages are touched
but whose records are not in cache. There each batch holds distinct indices (a slice of a
permutation, as a sampler's batch), the compiled table is called through ``update_arrays``
(the Selector's path) and the baseline is a plain numpy gather-compute-scatter of the same
fields on one array per field (the oracle's storage): gather the seven fields the rule
reads, compute, scatter the eleven it writes. Calls of the two alternate, so both see the
same machine load; the figures are medians over the calls, and the baseline is checked to
produce the compiled table's exact bits. At 1 M indices per call (random, with duplicates)
the baseline is the oracle itself, ``geko_core.reference_table.ReferenceTable``.

GEKO_BENCH_SAMPLES / GEKO_BENCH_BATCH shrink the shapes (defaults 10 M samples and 1 M
indices for the large batch). No timing is asserted.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

from geko_core import GekoConfig
from geko_core.config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT
from geko_core.reference_table import FIELD_DTYPES, FLAG_SUSPECTED_NOISY, ReferenceTable
from geko_core.table import SampleTable

NUM_SAMPLES = int(os.environ.get("GEKO_BENCH_SAMPLES", 10_000_000))
BATCH = int(os.environ.get("GEKO_BENCH_BATCH", 1_000_000))
NUM_BATCHES = 4
STEP_BATCHES = (128, 1024, 4096)
STEP_CALLS = {128: 400, 1024: 200, 4096: 100}


def _batch(rng: np.random.Generator, size: int = BATCH):
    return (
        rng.integers(0, NUM_SAMPLES, size, dtype=np.int64),
        rng.exponential(1.0, size).astype(np.float32),
        rng.random(size, dtype=np.float32),
        (rng.random(size) < 0.7).astype(np.float32),
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


def numpy_update(fields: dict[str, np.ndarray], idx: np.ndarray, loss: np.ndarray, confidence: np.ndarray,
                 correct: np.ndarray, step: int, config: GekoConfig) -> None:
    """The table's update rule as plain numpy for distinct indices and finite statistics.

    The baseline a user would write, and no slower than it need be: one gather per field
    read, float64 only where the rule rounds, one scatter per field written.
    """
    f64 = np.float64
    # Gather.
    q_old, visits = fields["q"][idx], fields["visits"][idx]
    loss_ema, loss_diff_ema, last_loss = fields["loss_ema"][idx], fields["loss_diff_ema"][idx], fields["last_loss"][idx]
    hard_streak, flags = fields["hard_streak"][idx], fields["flags"][idx]
    # Compute (float32 coefficients, float64 sums of exact products, one rounding to float32).
    q_keep, q_take = f64(np.float32(1.0 - config.q_alpha)), f64(np.float32(config.q_alpha))
    ema_keep, ema_take = f64(np.float32(config.loss_ema_beta)), f64(np.float32(1.0 - config.loss_ema_beta))
    diff_keep, diff_take = f64(np.float32(config.loss_diff_ema_beta)), f64(np.float32(1.0 - config.loss_diff_ema_beta))
    big = f64(np.finfo(np.float32).max)
    loss64 = loss.astype(f64)
    reward = (1.0 - np.minimum(np.maximum(loss64, 0.0) / config.loss_scale, 1.0)).astype(np.float32)
    q = np.clip(q_keep * q_old + q_take * reward.astype(f64), 0.0, 1.0).astype(np.float32)
    diff = np.clip(loss64 - last_loss, -big, big).astype(np.float32)
    first = visits == 0
    new_diff_ema = np.clip(diff_keep * loss_diff_ema + diff_take * diff.astype(f64), -big, big).astype(np.float32)
    new_loss_ema = np.clip(ema_keep * loss_ema + ema_take * loss64, -big, big).astype(np.float32)
    is_correct = correct >= np.float32(config.correct_threshold)
    bucket = np.where(
        is_correct,
        np.where(confidence > np.float32(config.freeze_confidence), BUCKET_FREEZE, BUCKET_LIGHT),
        np.where(confidence > np.float32(config.hard_confidence), BUCKET_HARD, BUCKET_FOCUS),
    )
    hard = bucket == BUCKET_HARD
    streak = np.where(hard, np.minimum(hard_streak.astype(np.int32) + 1, 255), 0)
    noisy = hard & (config.noise_guard_visits > 0) & (streak >= config.noise_guard_visits)
    bucket[(bucket == BUCKET_FREEZE) & (q < np.float32(config.freeze_q))] = BUCKET_LIGHT
    bucket[noisy] = BUCKET_FOCUS
    # Scatter.
    fields["q"][idx] = q
    fields["loss_ema"][idx] = np.where(first, loss, new_loss_ema)
    fields["loss_diff_ema"][idx] = np.where(first, np.float32(0.0), new_diff_ema)
    fields["last_loss"][idx] = loss
    fields["last_confidence"][idx] = confidence
    fields["visits"][idx] = visits + (visits != np.iinfo(np.uint32).max)
    fields["last_step"][idx] = step
    fields["last_correct"][idx] = np.rint(correct.astype(f64) * 255.0).astype(np.uint8)
    fields["bucket"][idx] = bucket
    fields["hard_streak"][idx] = streak
    fields["flags"][idx] = (flags & ~np.uint8(FLAG_SUSPECTED_NOISY)) | np.where(noisy, FLAG_SUSPECTED_NOISY, 0).astype(np.uint8)


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


@pytest.mark.parametrize("size", STEP_BATCHES)
def test_update_per_step(benchmark, tables, capsys, size):
    table, reference = tables
    table.num_threads = 1
    calls = min(STEP_CALLS[size], NUM_SAMPLES // size - 2)  # every index at most once in the run
    if calls < 1:
        pytest.skip(f"GEKO_BENCH_SAMPLES={NUM_SAMPLES} is too small for batches of {size}")
    rng = np.random.default_rng(size)
    order = rng.permutation(NUM_SAMPLES)  # distinct indices in every batch, as a sampler's
    steps = [
        (order[j * size : (j + 1) * size].copy(),) + _batch(rng, size)[1:] for j in range(calls + 2)
    ]
    *steps, last = steps  # applied once more below, for pytest-benchmark's table
    step_base = 1_000 + size * 10
    compiled_times, numpy_times = [], []
    for j, (idx, loss, confidence, correct) in enumerate(steps):
        start = time.perf_counter()
        table.update_arrays(idx, loss, confidence, correct, step_base + j)
        middle = time.perf_counter()
        numpy_update(reference.fields, idx, loss, confidence, correct, step_base + j, reference.config)
        end = time.perf_counter()
        if j:  # the first call of each is a warm-up
            compiled_times.append(middle - start)
            numpy_times.append(end - middle)
    touched = np.concatenate([s[0] for s in steps])
    for name in FIELD_DTYPES:  # the baseline did the same work: the same bits
        np.testing.assert_array_equal(table.gather(name, touched), reference.fields[name][touched], err_msg=name)

    seconds, numpy_seconds = statistics.median(compiled_times), statistics.median(numpy_times)
    # pytest-benchmark's own table gets one more call (the figures are the medians above).
    benchmark.pedantic(lambda: table.update_arrays(*last, step_base + calls + 1), rounds=1, iterations=1)
    numpy_update(reference.fields, *last, step_base + calls + 1, reference.config)
    rate, numpy_rate = size / seconds / 1e6, size / numpy_seconds / 1e6
    benchmark.extra_info.update(
        {
            "M_updates_per_s": rate,
            "numpy_M_updates_per_s": numpy_rate,
            "speedup_vs_numpy": rate / numpy_rate,
            "us_per_call": seconds * 1e6,
            "numpy_us_per_call": numpy_seconds * 1e6,
            "num_samples": NUM_SAMPLES,
            "batch": size,
            "calls": calls,
        }
    )
    _report(
        capsys,
        f"SampleTable.update_arrays, {size:>5} distinct indices per call on {NUM_SAMPLES:,} samples, 1 thread: "
        f"{seconds * 1e6:7.1f} us/call = {rate:5.1f} M updates/s; numpy gather-compute-scatter "
        f"{numpy_seconds * 1e6:7.1f} us = {numpy_rate:5.2f} M/s -> {rate / numpy_rate:4.1f}x "
        f"(medians of {calls} alternating calls; goal at 4096: >= 20 M/s, >= 3x)",
    )


@pytest.mark.parametrize("num_threads", [1, 2])
def test_update_random_indices(benchmark, tables, batches, capsys, num_threads):
    table, reference = tables
    table.num_threads = num_threads
    steps = iter(range(10, 10**9))

    def numpy_times() -> list[float]:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            reference.update(*batches[0], step=next(steps))
            times.append(time.perf_counter() - start)
        return times

    numpy_seconds = statistics.median(numpy_times())
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
        f"{BATCH:,} random int64 indices; numpy reference {numpy_rate:.2f} M/s (median of 3) -> "
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
