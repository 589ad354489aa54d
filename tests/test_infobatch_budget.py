"""InfoBatch with a budget in samples or tokens: each pruning epoch costs the budget's share
of the full data in expectation, measured in the unit asked for."""

from __future__ import annotations

import numpy as np
import pytest

from geko_core import Selector
from geko_core.policies import InfoBatchPolicy
from geko_core.policies.infobatch import MAX_BUDGET_PRUNE_RATIO

N = 2000


def tokens_and_scores(seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(5, 200, size=N).astype(np.int64)
    # long samples are the well learned (low loss) ones: samples and tokens budgets differ
    scores = np.where(tokens > 100, rng.uniform(0.1, 0.5, N), rng.uniform(1.0, 3.0, N)).astype(np.float32)
    return tokens, scores


def selector(unit: str, budget: float | None, epochs: int = 8, seed: int = 0) -> tuple[Selector, np.ndarray, np.ndarray]:
    tokens, scores = tokens_and_scores()
    options = {"unit": unit} if budget is None else {"budget": budget, "unit": unit}
    sel = Selector(N, policy="infobatch", epochs=epochs, seed=seed, sample_tokens=tokens, policy_options=options)
    sel.policy.scores[:] = scores  # as if every sample had been observed once
    return sel, tokens, scores


@pytest.mark.parametrize("unit", ["samples", "tokens"])
@pytest.mark.parametrize("budget", [0.6, 0.8])
def test_pruning_epochs_cost_the_budget_in_expectation(unit, budget):
    sel, tokens, scores = selector(unit, budget)
    policy = sel.policy
    ratio, expected = policy.budget_prune_ratio(sel.context)
    assert 0.0 < ratio < MAX_BUDGET_PRUNE_RATIO
    assert expected == pytest.approx(budget, abs=1e-12)
    cost = np.ones(N) if unit == "samples" else tokens.astype(np.float64)
    well = scores < scores.astype(np.float64).mean()
    fractions = []
    for epoch in range(7):  # 7 < delta * 8 = 7: all pruning epochs
        plan = policy.plan_epoch(sel.context, epoch, epoch / 8)
        kept = np.bincount(plan.indices, minlength=N)
        assert kept.max() == 1 and kept[~well].all()  # every sample above the mean is kept
        fractions.append(float(cost[plan.indices].sum() / cost.sum()))
        weights = plan.weights[well[plan.indices]]
        np.testing.assert_allclose(weights, np.float32(1.0 / (1.0 - ratio)), rtol=1e-6)
        assert (plan.weights[~well[plan.indices]] == 1.0).all()
    # Bernoulli pruning: the mean of 7 epochs lies within a few standard deviations
    assert abs(np.mean(fractions) - budget) < 0.02
    metrics = policy.metrics()
    assert metrics["prune_ratio"] == ratio and metrics["unit"] == unit and metrics["expected_cost_fraction"] == expected
    # the annealing epoch: the full data, weight 1
    last = policy.plan_epoch(sel.context, 7, 7 / 8)
    assert sorted(last.indices.tolist()) == list(range(N)) and (last.weights == 1.0).all()


def test_tokens_and_samples_units_differ_when_costs_differ():
    by_samples, _, _ = selector("samples", 0.6)
    by_tokens, _, _ = selector("tokens", 0.6)
    # the well-learned samples are the long ones: a tokens budget prunes fewer of them
    samples_ratio, _ = by_samples.policy.budget_prune_ratio(by_samples.context)
    tokens_ratio, _ = by_tokens.policy.budget_prune_ratio(by_tokens.context)
    assert tokens_ratio < samples_ratio


def test_budget_edges():
    full, _, _ = selector("tokens", 1.0)
    assert full.policy.budget_prune_ratio(full.context) == (0.0, 1.0)
    plan = full.policy.plan_epoch(full.context, 0, 0.0)
    assert len(plan.indices) == N and (plan.weights == 1.0).all()
    # too few well-learned samples for the budget: the ratio stops at the cap, the epoch costs more
    tight, tokens, scores = selector("samples", 0.1)
    ratio, expected = tight.policy.budget_prune_ratio(tight.context)
    assert ratio == MAX_BUDGET_PRUNE_RATIO and expected > 0.1
    # all scores equal: nobody is below the mean, nothing to prune
    flat, _, _ = selector("tokens", 0.5)
    flat.policy.scores[:] = 1.0
    assert flat.policy.budget_prune_ratio(flat.context) == (0.0, 1.0)
    # the fixed prune ratio is unchanged without a budget
    plain = Selector(N, policy="infobatch", epochs=8, policy_options={"prune_ratio": 0.3})
    assert plain.policy.budget is None and "prune_ratio" not in plain.policy.metrics()


def test_through_the_selector_from_the_first_epoch():
    tokens, _ = tokens_and_scores()
    sel = Selector(N, policy="infobatch", epochs=4, sample_tokens=tokens, policy_options={"budget": 0.5, "unit": "tokens"})
    # before any observation every score is 3.0: nothing is below the mean, a full epoch
    indices, weights = sel.plan()
    assert len(indices) == N and sel.policy.metrics()["prune_ratio"] == 0.0


def test_bad_options_are_refused():
    for budget in (0.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            InfoBatchPolicy(budget=budget)
    for budget in ("0.5", True, [0.5]):
        with pytest.raises(TypeError, match="budget"):
            InfoBatchPolicy(budget=budget)
    with pytest.raises(ValueError, match="unit"):
        InfoBatchPolicy(budget=0.5, unit="bytes")
    with pytest.raises(ValueError, match="pass budget="):
        InfoBatchPolicy(unit="tokens")
    with pytest.raises(ValueError, match="sample_tokens"):
        Selector(10, policy="infobatch", epochs=2, policy_options={"budget": 0.5, "unit": "tokens"})
