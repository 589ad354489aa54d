"""GAIN-RL policy: order by angle concentration, the window move, real training, resume, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from geko_core import Selector, WithIndex, angle_concentration
from geko_core.policies import GainRLPolicy, StatsBatch

from test_selector import TRAIN, accuracy, make_model


def expected_mu(mu, acc, ang, *, n, alpha, beta, acc_scale=1.0, adj_min=None, adj_max=None, num):
    move = n * math.tanh(alpha * (acc / acc_scale - beta)) + n * math.tanh(alpha * ang)
    if adj_min is not None:
        move = max(move, adj_min)
    if adj_max is not None:
        move = min(move, adj_max)
    return min(max(mu + move, 0.0), num - 1)


def make(num=1000, **options):
    options.setdefault("samples_per_epoch", 0.2)
    sel = Selector(num, policy="gainrl", epochs=10, seed=3, policy_options=options)
    return sel, sel.policy


def test_window_moves_as_the_formula_on_a_scripted_accuracy_sequence():
    opts = dict(n=120.0, alpha=1.5, beta=0.55, acc_scale=0.9, adj_min=-80.0, adj_max=150.0)
    sel, policy = make(sigma=40.0, **opts)
    mu = 0.0
    sequence = [(0.2, None), (0.7, None), (0.9, 0.3), (0.95, None), (0.99, -0.1), (0.1, None), (0.0, None), (0.6, 0.0)]
    for acc, ang in sequence:
        mu = expected_mu(mu, acc, 0.0 if ang is None else ang, num=1000, **opts)
        assert policy.report(acc, ang) == pytest.approx(mu, abs=1e-9)
    # The first report moved nothing (clamped at position 0); the bounds bit in between.
    assert policy.mu == pytest.approx(mu, abs=1e-9) and 0 < mu < 999


def test_window_clamps_to_the_last_position():
    sel, policy = make(num=300, n=500.0)
    for _ in range(3):
        policy.report(1.0)
    assert policy.mu == 299.0
    expected = expected_mu(299.0, 0.0, 0.0, n=500.0, alpha=2.0, beta=0.5, num=300)
    assert policy.report(0.0) == pytest.approx(expected) and expected == 0.0


def test_order_sorts_by_concentration_and_unscored_samples_follow():
    angles = np.full(20, np.nan, dtype=np.float32)
    angles[[4, 7, 9, 15]] = [0.1, 0.9, 0.5, 0.9]
    sel = Selector(20, policy=GainRLPolicy(5, angles=angles), epochs=2)
    order = sel.policy.order
    assert list(order[:4]) == [7, 15, 9, 4]  # descending, ties by index
    assert list(order[4:]) == [i for i in range(20) if i not in (4, 7, 9, 15)]
    sel.policy.set_angles(np.array([0, 7]), np.array([0.95, np.nan]))
    assert list(sel.policy.order[:4]) == [0, 15, 9, 4] and 7 in sel.policy.order[4:]
    start = Selector(20, policy=GainRLPolicy(5, angles=angles, unscored="start"), epochs=2).policy.order
    assert list(start[-4:]) == [7, 15, 9, 4]


def test_plan_draws_around_the_window_centre():
    num = 2000
    sel, policy = make(num=num, samples_per_epoch=60, sigma=30.0, n=400.0)
    policy.set_angles(np.arange(num), -np.arange(num, dtype=np.float32))  # order = identity
    assert np.array_equal(policy.order, np.arange(num))
    for _ in range(3):
        policy.report(0.9)
    mu = policy.mu
    assert 600 < mu < 1500
    sel.set_epoch(1)
    indices, weights = sel.plan()
    assert len(indices) == 60 and len(np.unique(indices)) == 60 and (weights == 1).all()
    assert np.abs(indices - mu).max() <= 5 * 30  # positions = indices here
    assert abs(np.mean(indices) - mu) < 15


def test_auto_accuracy_uses_the_observed_correct_fraction():
    sel, policy = make(num=500, n=100.0, sigma=20.0)
    policy.set_angles(np.arange(500), np.zeros(500, dtype=np.float32))
    sel.plan()
    correct = np.array([1, 1, 1, 0, 1, 1, 1, 1], dtype=np.float32)  # 7/8
    nan = np.full(8, np.nan, dtype=np.float32)
    correct_with_invalid = np.concatenate([correct, nan[:2]])
    idx = np.arange(10, dtype=np.int64)
    policy.observe(StatsBatch(idx, np.ones(10, np.float32), np.ones(10, np.float32), correct_with_invalid, step=0), sel.table)
    sel.set_epoch(1)
    sel.plan()
    assert policy.mu == pytest.approx(expected_mu(0.0, 7 / 8, 0.0, n=100.0, alpha=2.0, beta=0.5, num=500))
    # A report takes precedence over the observed accuracy.
    policy.observe(StatsBatch(idx, np.ones(10, np.float32), np.ones(10, np.float32), correct_with_invalid, step=1), sel.table)
    before = policy.report(0.5)  # tanh(0) = 0: no move
    sel.set_epoch(2)
    sel.plan()
    assert policy.mu == before == pytest.approx(expected_mu(0.0, 7 / 8, 0.0, n=100.0, alpha=2.0, beta=0.5, num=500))


def _angles_of_inputs(x: torch.Tensor) -> torch.Tensor:
    # Blob features seen as 4 "tokens" of 4 dims: a stand-in for hidden states.
    return angle_concentration(x.reshape(len(x), 4, 4)).concentration


def test_gainrl_trains_a_real_model_through_the_selector():
    epochs = 6
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sel = Selector(len(TRAIN[1]), policy="gainrl", epochs=epochs, seed=0,
                   policy_options=dict(samples_per_epoch=0.6, sigma=150.0, n=300.0))
    sel.policy.set_angles(torch.arange(len(TRAIN[1])), _angles_of_inputs(TRAIN[0]))
    loader = DataLoader(WithIndex(TensorDataset(*TRAIN)), batch_size=32, sampler=sel.sampler)
    for _ in range(epochs):
        right = seen = 0
        for idx, x, y in loader:
            logits = model(x)
            loss = sel.loss(logits, y, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            right += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        sel.policy.report(right / seen)
    assert accuracy(model) >= 0.88  # uniform reaches about 0.92
    m = sel.metrics()
    assert m["backpropagated"] == epochs * 720
    assert m["gainrl/mu"] > 0 and sel.policy.mu_history[0] == 0.0
    assert sorted(sel.policy.mu_history) == sel.policy.mu_history  # training accuracy > beta: moves on


def test_state_dict_round_trip_continues_identically():
    sel, policy = make(num=400, sigma=15.0, n=50.0)
    rng = np.random.default_rng(0)
    policy.set_angles(np.arange(400), rng.random(400).astype(np.float32))
    sel.plan()
    policy.report(0.8)
    state = sel.state_dict()
    other, other_policy = make(num=400, sigma=15.0, n=50.0)
    other.load_state_dict(state)
    assert other_policy.mu == policy.mu and np.array_equal(other_policy.order, policy.order)
    for s in (sel, other):
        s.set_epoch(1)
    np.testing.assert_array_equal(sel.plan()[0], other.plan()[0])
    bad = dict(state["policy_state"], mu=1e9)
    with pytest.raises(ValueError, match="mu"):
        other_policy.load_state_dict(bad)
    with pytest.raises(ValueError, match="order"):
        other_policy.load_state_dict(dict(state["policy_state"], order=np.zeros(400, np.int64)))
    assert other_policy.mu == policy.mu  # unchanged after the refusals


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(samples_per_epoch=0), ValueError),
        (dict(samples_per_epoch=1.5), ValueError),
        (dict(samples_per_epoch="half"), TypeError),
        (dict(sigma=0.0), ValueError),
        (dict(n=-1.0), ValueError),
        (dict(acc_scale=0.0), ValueError),
        (dict(adj_min=5.0, adj_max=1.0), ValueError),
        (dict(unscored="middle"), ValueError),
        (dict(weighting="heavy"), ValueError),
        (dict(beta=float("nan")), ValueError),
        (dict(mu0=-1.0), ValueError),
    ],
)
def test_bad_options(options, error):
    with pytest.raises(error):
        GainRLPolicy(**options)


def test_bad_input():
    sel, policy = make(num=50)
    with pytest.raises(ValueError, match="shape"):
        policy.set_angles(np.arange(3), np.zeros(2))
    with pytest.raises(IndexError):
        policy.set_angles(np.array([0, 50]), np.zeros(2))
    with pytest.raises(TypeError):
        policy.set_angles(np.array([0.0, 1.0]), np.zeros(2))
    with pytest.raises(ValueError, match="infinite"):
        policy.set_angles(np.array([0, 1]), np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="accuracy"):
        policy.report(float("nan"))
    with pytest.raises(ValueError, match="angles"):
        Selector(50, policy=GainRLPolicy(angles=np.zeros(49)), epochs=1)
    with pytest.raises(ValueError, match="mu0"):
        Selector(50, policy=GainRLPolicy(mu0=60.0), epochs=1)
    assert policy.mu == 0.0 and np.isnan(policy.angles).all()
