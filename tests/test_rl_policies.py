"""Each RL policy's rule on hand-made reward histories (docs/policies.md, "RL policies")."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from geko_core.config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_UNSEEN
from geko_core.policies import (
    DynamicSamplingPolicy,
    FullPolicy,
    GainRLRolloutPolicy,
    GekoRolloutPolicy,
    GresoPolicy,
    PolicyContext,
    RandomSubsetPolicy,
    RolloutBatch,
    TableView,
    make_policy,
)
from geko_core.rollouts import RolloutTable


def _batch(indices, pass_rate, *, zero_variance=None, step=1, epoch=0):
    indices = np.asarray(indices, dtype=np.int64)
    p = np.broadcast_to(np.asarray(pass_rate, dtype=np.float32), indices.shape).copy()
    zv = (p == 0) | (p == 1) if zero_variance is None else np.broadcast_to(zero_variance, indices.shape).copy()
    return RolloutBatch(indices, p, np.where(zv, 0.0, 0.5).astype(np.float32), zv, zv & (p == 1), zv & (p == 0),
                        np.full(indices.shape, 10.0, dtype=np.float32), step, epoch)


def _bound(policy, n, *, seed=0, epochs=10, total_steps=None):
    table = RolloutTable(n)
    context = PolicyContext(num_samples=n, seed=seed, epochs=None if total_steps else epochs, total_steps=total_steps,
                            rank=0, world_size=1, table=TableView(table))
    policy.bind(context)
    return policy, table, context


def _visit(policy, table, indices, pass_rate, times=1, step0=1):
    for k in range(times):
        policy.observe_rollouts(_batch(indices, pass_rate, step=step0 + k), table)


# -- names ----------------------------------------------------------------------------------
def test_names_resolve_per_signal():
    assert type(make_policy("geko", signal="rewards")) is GekoRolloutPolicy
    assert type(make_policy("gainrl", signal="rewards")) is GainRLRolloutPolicy
    assert type(make_policy("greso")) is GresoPolicy and type(make_policy("dynamic")) is DynamicSamplingPolicy
    assert type(make_policy("full", signal="rewards")) is FullPolicy and FullPolicy.signal == "any"
    assert RandomSubsetPolicy.signal == "any" and GresoPolicy.signal == "rewards"
    assert make_policy("dynamic").filter_groups and not make_policy("greso").filter_groups
    assert make_policy("geko").signal == "logits"


@pytest.mark.parametrize("name", ["greso", "geko", "gainrl", "random_subset"])
def test_filter_groups_option_puts_a_policy_on_dynamic_sampling(name):
    assert not make_policy(name, signal="rewards").filter_groups
    policy = make_policy(name, signal="rewards", filter_groups=True)
    assert policy.filter_groups is True
    assert type(policy).filter_groups is False  # an instance's option, not the class's
    with pytest.raises(TypeError, match="filter_groups must be a bool"):
        make_policy(name, signal="rewards", filter_groups=1)


# -- GRESO ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,p_easy,p_hard", [("easy", 0.6, 0.3), ("hard", 0.6, 0.3)])
def test_greso_skips_with_probability_one_minus_p_to_the_run(kind, p_easy, p_hard):
    n = 400
    policy, table, context = _bound(GresoPolicy(p_easy=p_easy, p_hard=p_hard, adapt=False, min_explore=0.01), n)
    rate = 1.0 if kind == "easy" else 0.0
    runs = {0: np.arange(0, 100), 1: np.arange(100, 200), 2: np.arange(200, 300), 3: np.arange(300, 400)}
    for z, group in runs.items():
        policy.observe_rollouts(_batch(group, 0.5), table)  # a mixed visit: run 0
        _visit(policy, table, group, rate, times=z, step0=2)
    np.testing.assert_array_equal(table.field("flat_run")[[0, 100, 200, 300]], [0, 1, 2, 3])
    p = p_easy if kind == "easy" else p_hard
    epochs = 200
    kept = np.zeros(n)
    for epoch in range(epochs):
        kept[policy.plan_epoch(context, epoch, 0.0).indices] += 1
    for z, group in runs.items():
        share = kept[group].mean() / epochs
        expected = p**z
        sd = np.sqrt(expected * (1 - expected) / (len(group) * epochs))
        assert abs(share - expected) < 5 * sd + 1e-9, (z, share, expected)
    assert policy.metrics()["skipped"] + policy.metrics()["planned"] == n


def test_greso_exploration_floor():
    n = 200
    policy, table, context = _bound(GresoPolicy(p_easy=0.3, adapt=False, min_explore=0.2), n)
    _visit(policy, table, np.arange(n), 1.0, times=20)
    kept = sum(len(policy.plan_epoch(context, e, 0.0).indices) for e in range(100))
    assert abs(kept / (100 * n) - 0.2) < 0.02  # 0.2, not 0.3**20


def test_greso_adapts_toward_the_target_and_stays_in_bounds():
    n = 100
    policy, table, _ = _bound(GresoPolicy(p_easy=0.5, p_hard=0.5, target_easy=0.25, target_hard=0.25, step=0.1, min_explore=0.1), n)
    # Half the batch solved (zero variance, easy) > 0.25: p_easy falls; no hard ones: p_hard rises.
    indices = np.arange(8)
    rates = np.array([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    policy.observe_rollouts(_batch(indices, rates), table)
    assert policy.p_easy == pytest.approx(0.4) and policy.p_hard == pytest.approx(0.6)
    for _ in range(10):
        policy.observe_rollouts(_batch(indices, rates), table)
    assert policy.p_easy == pytest.approx(0.1) and policy.p_hard == pytest.approx(1.0)
    # Under the target: p_easy rises again.
    policy.observe_rollouts(_batch(indices, np.full(8, 0.5, dtype=np.float32)), table)
    assert policy.p_easy == pytest.approx(0.2)
    fixed, table2, _ = _bound(GresoPolicy(adapt=False), n)
    fixed.observe_rollouts(_batch(indices, rates), table2)
    assert fixed.p_easy == 0.5 and table2.field("visits")[:8].tolist() == [1] * 8


def test_greso_never_plans_an_empty_epoch():
    n = 10
    policy, table, context = _bound(GresoPolicy(p_easy=0.01, p_hard=0.01, adapt=False, min_explore=0.01), n)
    for k in range(n):
        policy.observe_rollouts(_batch(np.arange(n), 1.0, step=k + 1), table)
    policy.observe_rollouts(_batch([3], 1.0, step=0), table)  # prompt 3 is the stalest (step 0)
    sizes = [len(policy.plan_epoch(context, e, 0.0).indices) for e in range(50)]
    assert min(sizes) >= 1


# -- GEKO (rewards) -------------------------------------------------------------------------
def _geko_history(policy, table, n):
    """A quarter each: FREEZE (solved), HARD (failed), FOCUS (mixed), LIGHT (nearly solved)."""
    q = n // 4
    _visit(policy, table, np.arange(q), 1.0)
    _visit(policy, table, np.arange(q, 2 * q), 0.0)
    _visit(policy, table, np.arange(2 * q, 3 * q), 0.5)
    _visit(policy, table, np.arange(3 * q, n), 0.875)
    assert np.bincount(table.field("bucket"), minlength=5).tolist() == [q, q, q, q, 0]


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_geko_never_plans_extra_rollouts_for_hard(progress):
    n = 400
    policy, table, context = _bound(GekoRolloutPolicy(), n, epochs=10)
    _geko_history(policy, table, n)
    buckets = table.field("bucket")
    for epoch in range(5):
        plan = policy.plan_epoch(context, epoch, progress)
        counts = np.bincount(plan.indices, minlength=n)
        assert counts.max() <= 1  # no prompt rolled out twice in an epoch
        hard = counts[buckets == BUCKET_HARD].mean()
        assert hard <= 0.1 * 2.5 + 0.08  # a low rate, PEAK's 2.5 x hard_rate at most
        assert counts[buckets == BUCKET_FOCUS].min() == 1
    rates = policy.metrics()["rates"]
    assert rates[BUCKET_HARD] <= 0.25 + 1e-9 and rates[BUCKET_UNSEEN] == 1.0 and max(rates) <= 1.0


def test_geko_band_moves_easy_hard_easy():
    policy = GekoRolloutPolicy()
    early, peak, late = (policy.rl_rates(p) for p in (0.05, 0.5, 0.95))
    assert early[BUCKET_LIGHT] > peak[BUCKET_LIGHT] and late[BUCKET_LIGHT] > peak[BUCKET_LIGHT]
    assert peak[BUCKET_HARD] > early[BUCKET_HARD] and peak[BUCKET_HARD] > late[BUCKET_HARD]


def test_geko_revisits_frozen_prompts_stalest_first():
    n = 100
    policy, table, context = _bound(GekoRolloutPolicy(min_revisit=0.2, guard=True), n)
    # 50 solved prompts, prompt k last visited at step k + 1 (0 the stalest); the rest mixed.
    for k in range(50):
        policy.observe_rollouts(_batch([k], 1.0, step=k + 1), table)
    _visit(policy, table, np.arange(50, n), 0.5, step0=100)
    plan = policy.plan_epoch(context, 0, 0.5)
    frozen = sorted(int(i) for i in plan.indices if i < 50)
    assert frozen == list(range(10))  # 20% of 50, the stalest ten


def test_geko_measures_forgetting_from_failed_revisits():
    n = 40
    policy, table, context = _bound(GekoRolloutPolicy(min_revisit=0.1, revisit_gain=2.0), n)
    _visit(policy, table, np.arange(n), 1.0)
    policy.plan_epoch(context, 0, 0.0)
    policy.observe_rollouts(_batch(np.arange(4), np.array([0.5, 0.5, 1.0, 1.0]), step=5, epoch=1), table)
    policy.observe_rollouts(_batch(np.arange(4), 0.5, step=6, epoch=1), table)  # same epoch: not new revisits
    assert (policy.revisits, policy.failed_revisits) == (4, 2)
    plan = policy.plan_epoch(context, 1, 0.0)
    assert policy.forgetting == pytest.approx(0.25)
    assert policy.metrics()["rates"][BUCKET_FREEZE] == pytest.approx(0.6)
    assert len(plan.indices) > 0


def test_geko_budget_is_respected():
    n = 400
    policy, table, context = _bound(GekoRolloutPolicy(budget=0.3), n)
    _geko_history(policy, table, n)
    sizes = [len(policy.plan_epoch(context, e, 0.1).indices) for e in range(20)]
    assert np.mean(sizes) <= 0.3 * n * 1.05
    free, table2, context2 = _bound(GekoRolloutPolicy(), n)
    _geko_history(free, table2, n)
    assert np.mean([len(free.plan_epoch(context2, e, 0.1).indices) for e in range(20)]) > 0.5 * n


def test_random_subset_budget_in_rewards_mode():
    n = 200
    policy, _, context = _bound(RandomSubsetPolicy(budget=0.35), n)
    plan = policy.plan_epoch(context, 3, 0.5)
    assert len(plan.indices) == 70 and len(set(plan.indices.tolist())) == 70


# -- GAIN-RL (rewards) -------------------------------------------------------------------------
def test_gainrl_window_moves_by_the_measured_mean_reward():
    n = 200
    policy, table, context = _bound(GainRLRolloutPolicy(samples_per_epoch=0.2, alpha=2.0, beta=0.5), n)
    assert (policy.sigma, policy.n) == (20.0, 10.0)  # scaled to the prompt set
    policy.set_angles(np.arange(n), np.linspace(1.0, 0.0, n))
    policy.plan_epoch(context, 0, 0.0)
    _visit(policy, table, np.arange(10), 1.0)
    policy.plan_epoch(context, 1, 0.1)
    moved = 10.0 * np.tanh(2.0 * (1.0 - 0.5))
    assert policy.mu == pytest.approx(moved)
    _visit(policy, table, np.arange(10), 0.0)
    policy.plan_epoch(context, 2, 0.2)
    assert policy.mu == pytest.approx(0.0)  # moved back (clamped at the start of the order)
    policy.count_prepass(n, tokens=5 * n)
    assert policy.metrics()["prepass_prompts"] == n and policy.metrics()["prepass_tokens"] == 5 * n
    with pytest.raises(ValueError):
        policy.count_prepass(-1)


# -- dynamic sampling ---------------------------------------------------------------------------
def test_dynamic_plans_everything_and_counts_filtered_groups():
    n = 30
    policy, table, context = _bound(DynamicSamplingPolicy(), n)
    plan = policy.plan_epoch(context, 0, 0.0)
    assert sorted(plan.indices.tolist()) == list(range(n))
    policy.observe_rollouts(_batch(np.arange(6), np.array([1, 0, 0.5, 0.5, 1, 0.25], dtype=np.float32)), table)
    assert policy.metrics() == {"groups": 6, "filtered_groups": 3, "filtered_share": 0.5}


# -- determinism and resume ---------------------------------------------------------------------
def _policies():
    return {
        "greso": lambda: GresoPolicy(),
        "geko": lambda: GekoRolloutPolicy(budget=0.6),
        "gainrl": lambda: GainRLRolloutPolicy(samples_per_epoch=0.3),
        "dynamic": lambda: DynamicSamplingPolicy(),
        "random_subset": lambda: RandomSubsetPolicy(budget=0.4),
    }


def _history(policy, table, n, seed):
    rng = np.random.default_rng(seed)
    for step in range(1, 6):
        idx = rng.choice(n, size=12, replace=False)
        policy.observe_rollouts(_batch(idx, rng.choice([0.0, 0.25, 0.5, 1.0], size=12).astype(np.float32), step=step), table)


@pytest.mark.parametrize("name", list(_policies()))
def test_plans_are_deterministic_and_resume_exactly(name):
    n = 60
    make = _policies()[name]
    a, table_a, ctx_a = _bound(make(), n, seed=7)
    b, table_b, ctx_b = _bound(make(), n, seed=7)
    for policy, table in ((a, table_a), (b, table_b)):
        _history(policy, table, n, 1)
    plan_a, plan_b = a.plan_epoch(ctx_a, 2, 0.3), b.plan_epoch(ctx_b, 2, 0.3)
    np.testing.assert_array_equal(plan_a.indices, plan_b.indices)
    np.testing.assert_array_equal(plan_a.weights, plan_b.weights)
    # resume: a fresh policy loading a's state (and the same table) plans what a plans next
    _history(a, table_a, n, 2)
    c, table_c, ctx_c = _bound(make(), n, seed=7)
    c.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    table_c.load_state_dict(table_a.state_dict())
    plan_a, plan_c = a.plan_epoch(ctx_a, 3, 0.5), c.plan_epoch(ctx_c, 3, 0.5)
    np.testing.assert_array_equal(plan_a.indices, plan_c.indices)
    np.testing.assert_array_equal(plan_a.weights, plan_c.weights)
    assert pickle.dumps(a.state_dict()) == pickle.dumps(c.state_dict())
    # and another epoch or seed gives another plan
    d, table_d, ctx_d = _bound(make(), n, seed=8)
    table_d.load_state_dict(table_a.state_dict())
    d.load_state_dict(a.state_dict())
    other = d.plan_epoch(ctx_d, 3, 0.5)
    assert not np.array_equal(other.indices, plan_a.indices)


@pytest.mark.parametrize("name", ["greso", "dynamic", "gainrl"])
def test_bad_policy_state_is_refused_and_changes_nothing(name):
    policy, _, _ = _bound(_policies()[name](), 20)
    before = pickle.dumps(policy.state_dict())
    state = policy.state_dict()
    key = next(iter(state))
    state[key] = -3
    with pytest.raises((ValueError, KeyError, TypeError)):
        policy.load_state_dict(state)
    assert pickle.dumps(policy.state_dict()) == before


def test_rl_policies_refuse_logits_batches():
    from geko_core.policies import StatsBatch

    for policy in (GekoRolloutPolicy(), GainRLRolloutPolicy()):
        bound, table, _ = _bound(policy, 10)
        with pytest.raises(TypeError, match="rewards"):
            bound.observe(StatsBatch(np.arange(2), *(np.zeros(2, np.float32),) * 3), table)
