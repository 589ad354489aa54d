"""``rl-algo``'s statistics over seeds: paired differences against full GRPO, the cost to reach
full GRPO's final held-out accuracy, accuracy at an equal rollout budget, mean curves.

Every run of a seed starts from the same warm-started weights whatever the policy, so the
figures of two policies are compared seed by seed (paired): the difference of the seed's two
runs, then its mean and sample standard deviation over the seeds. A difference is called
noise when the paired two-sided 95% t interval of the mean difference contains 0.

A curve is the list of held-out points ``run_rl`` records (``curve``): dicts with
``rollout_tokens``, ``rl_seconds`` (RL wall-clock, evaluations excluded), ``validation_exact_%``
and ``test_exact_%`` at least.

The target (``target_of``) is set on the validation split only: full GRPO's final validation
greedy exact match of the same seed less one binomial standard error of that accuracy on the
validation prompts (``100 * sqrt(p (1 - p) / n)``, about 2.2 pt at 40% on 480 prompts), so a
policy that ends where full GRPO ends, within the split's own sampling noise, counts as
having reached it. A run's cost to target is the rollout tokens and RL wall-clock at the first
curve point whose validation exact match is at or above the target (no interpolation between
points); a run that never gets there has no cost (``None``), counted apart.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "accuracy_at_budget",
    "cost_to_target",
    "mean_curve",
    "mean_std",
    "paired",
    "target_of",
]

#: two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for a single value).

    Raises:
        ValueError: no values.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("mean_std needs at least one value")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def paired(values: dict[int, float], baseline: dict[int, float]) -> dict:
    """Paired difference ``values - baseline`` over the seeds both have.

    Args:
        values: seed → figure of a policy.
        baseline: seed → the same figure of the baseline (full GRPO).

    Returns:
        ``{"seeds", "mean", "std", "ci95", "noise"}``: mean and sample std of the per-seed
        differences, the half-width of the 95% t interval of their mean (``None`` with one
        seed) and ``noise``: True when that interval contains 0 (always with one seed).

    Raises:
        ValueError: no seed in common.
    """
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        raise ValueError("paired: the two sets of runs have no seed in common")
    diffs = np.array([values[s] - baseline[s] for s in seeds], dtype=np.float64)
    mean, std = mean_std(diffs)
    if len(diffs) < 2:
        return {"seeds": seeds, "mean": mean, "std": std, "ci95": None, "noise": True}
    df = len(diffs) - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.96
    half = t * std / math.sqrt(len(diffs))
    return {"seeds": seeds, "mean": mean, "std": std, "ci95": half, "noise": bool(abs(mean) <= half)}


def target_of(full_curve: Sequence[dict], num_validation: int) -> float:
    """The validation exact match (%) a run must reach: full GRPO's final one less one
    binomial standard error on ``num_validation`` prompts.

    Raises:
        ValueError: an empty curve or no validation prompts.
    """
    if not full_curve:
        raise ValueError("target_of: full GRPO's curve is empty")
    if num_validation < 1:
        raise ValueError(f"num_validation must be positive, got {num_validation}")
    final = float(full_curve[-1]["validation_exact_%"])
    p = final / 100.0
    return final - 100.0 * math.sqrt(p * (1.0 - p) / num_validation)


def cost_to_target(curve: Sequence[dict], target: float, key: str = "validation_exact_%") -> dict | None:
    """Rollout tokens and RL seconds at the first point of ``curve`` whose ``key`` is at or
    above ``target``; None if none is.

    Returns:
        ``{"step", "rollout_tokens", "rl_seconds"}`` of that point.
    """
    for point in curve:
        if float(point[key]) >= target:
            return {"step": int(point["step"]), "rollout_tokens": int(point["rollout_tokens"]), "rl_seconds": float(point["rl_seconds"])}
    return None


def accuracy_at_budget(curve: Sequence[dict], budget_tokens: float, key: str = "test_exact_%") -> float:
    """``key`` at the last point of ``curve`` with at most ``budget_tokens`` rollout tokens (the
    model a run holds when that budget is spent; the final one if it never spends it).

    Raises:
        ValueError: an empty curve.
    """
    if not curve:
        raise ValueError("accuracy_at_budget: empty curve")
    value = float(curve[0][key])
    for point in curve:
        if point["rollout_tokens"] > budget_tokens:
            break
        value = float(point[key])
    return value


def mean_curve(curves: Sequence[Sequence[dict]], grid: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std over runs of ``key`` against rollout tokens on ``grid``: each curve
    held stepwise (the last measured point at or before each grid value); ``nan`` where a run
    has ended, so the mean never changes because a run dropped out.
    """
    rows = []
    for curve in curves:
        xs = np.array([p["rollout_tokens"] for p in curve], dtype=np.float64)
        ys = np.array([p[key] for p in curve], dtype=np.float64)
        at = np.searchsorted(xs, grid, side="right") - 1
        rows.append(np.where((at >= 0) & (grid <= xs[-1]), ys[np.clip(at, 0, len(ys) - 1)], np.nan))
    stacked = np.array(rows)
    mean = stacked.mean(axis=0)
    std = stacked.std(axis=0, ddof=1) if len(rows) > 1 else np.zeros_like(mean)
    return mean, std
