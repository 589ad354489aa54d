"""Epoch planning and weighted sampling without replacement at 10 M samples.

Run: ``pytest benchmarks/bench_planner.py -s`` (``-s`` shows the side-by-side ratios).
Sizes: ``GEKO_BENCH_PLANNER_N`` (default 10_000_000) and ``GEKO_BENCH_NUMPY_N`` for numpy's
``Generator.choice(replace=False, p=...)``, which is much slower (default: the same N).

Goal (docs/design.md §5): a 10 M-sample weighted epoch planned in <= 1 s.
Baselines, measured in the same run:
* ``plan()``: ``torch.randperm(N)``, what an ordinary shuffled epoch costs;
* ``weighted_sample(w, N/2)``: ``torch.multinomial(w, N/2, replacement=False)`` and
  ``numpy.random.default_rng().choice(N, N/2, replace=False, p=w)``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from geko_core.curriculum import MountainCurriculum
from geko_core.planner import EpochPlanner, weighted_sample

N = int(os.environ.get("GEKO_BENCH_PLANNER_N", 10_000_000))
NUMPY_N = int(os.environ.get("GEKO_BENCH_NUMPY_N", N))
ROUNDS = 3


def best_of(fn, rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def report(lines: list[str]) -> None:
    print("\n" + "\n".join("  " + line for line in lines))


@pytest.fixture(scope="module")
def buckets() -> np.ndarray:
    # A realistic mid-training mix: 30% FREEZE, 25% LIGHT, 25% FOCUS, 15% HARD, 5% UNSEEN.
    rng = np.random.default_rng(0)
    return rng.choice(5, size=N, p=[0.30, 0.25, 0.25, 0.15, 0.05]).astype(np.int8)


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return np.random.default_rng(1).random(N)


def test_plan_epoch(benchmark, buckets):
    rates = MountainCurriculum().rates(0.5)  # PEAK: HARD 2.5x, LIGHT 0.1, FREEZE 5% revisits
    planner = EpochPlanner(N, seed=0)
    last_visit = np.random.default_rng(2).integers(0, 100_000, size=N, dtype=np.int64)
    plan = benchmark.pedantic(lambda: planner.plan(buckets, rates, epoch=1), rounds=ROUNDS, iterations=1)
    ours = benchmark.stats.stats.min
    ours_stale = best_of(lambda: planner.plan(buckets, rates, epoch=1, last_visit_step=last_visit))
    randperm = best_of(lambda: torch.randperm(N))
    report([
        f"plan() of a {N:,}-sample epoch (PEAK rates {tuple(round(r, 3) for r in rates)}): "
        f"{len(plan):,} draws in {ours:.3f} s (goal <= 1 s: {'met' if ours <= 1.0 else 'MISSED'})",
        f"  with last_visit_step (stalest-first FREEZE): {ours_stale:.3f} s",
        f"  torch.randperm({N:,}) (a plain shuffled epoch): {randperm:.3f} s -> plan / randperm = {ours / randperm:.2f}x",
    ])


def test_weighted_sample_vs_torch_multinomial(benchmark, weights):
    k = N // 2
    benchmark.pedantic(lambda: weighted_sample(weights, k, seed=0), rounds=ROUNDS, iterations=1)
    systematic = benchmark.stats.stats.min
    exponential = best_of(lambda: weighted_sample(weights, k, seed=0, method="exponential"))
    w_torch = torch.from_numpy(weights)
    multinomial = best_of(lambda: torch.multinomial(w_torch, k, replacement=False), rounds=2)
    report([
        f"weighted sample of {k:,} of {N:,} without replacement:",
        f"  geko systematic (exact inclusion): {systematic:.3f} s",
        f"  geko exponential keys:             {exponential:.3f} s",
        f"  torch.multinomial(replacement=False): {multinomial:.3f} s -> "
        f"speed-up {multinomial / systematic:.1f}x (systematic), {multinomial / exponential:.1f}x (exponential)",
    ])


def test_weighted_sample_vs_numpy_choice(benchmark):
    n = NUMPY_N
    k = n // 2
    w = np.random.default_rng(1).random(n)
    p = w / w.sum()
    benchmark.pedantic(lambda: weighted_sample(w, k, seed=0), rounds=ROUNDS, iterations=1)
    ours = benchmark.stats.stats.min
    rng = np.random.default_rng(0)
    numpy_time = best_of(lambda: rng.choice(n, k, replace=False, p=p), rounds=1)
    report([
        f"weighted sample of {k:,} of {n:,} without replacement:",
        f"  geko systematic: {ours:.3f} s; numpy Generator.choice(replace=False, p=...): {numpy_time:.3f} s "
        f"-> speed-up {numpy_time / ours:.1f}x",
    ])
