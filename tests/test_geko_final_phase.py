"""GEKO's budget and final full phase: the budget holds in the final phase, and under
``total_steps=`` the final full pass is planned while there are steps left to finish it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geko_core
from geko_core import Selector
from geko_core.config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_UNSEEN
from geko_core.policies import GekoPolicy


def _table_with(sel: Selector, frozen: int) -> None:
    """The first ``frozen`` samples right and confident (FREEZE at once under q_alpha=1), the
    rest wrong."""
    n = sel.num_samples
    right = np.arange(n) < frozen
    loss = np.where(right, 0.01, 3.0).astype(np.float32)
    confidence = np.where(right, 0.99, 0.3).astype(np.float32)
    sel.table.update(np.arange(n), loss, confidence, right.astype(np.float32), step=1)


@pytest.mark.parametrize("budget", [0.6, 0.3])
def test_the_budget_holds_in_the_final_full_phase(budget):
    n, frozen = 1000, 700
    config = geko_core.GekoConfig(q_alpha=1.0, freeze_q=0.5)
    sel = Selector(n, policy="geko", epochs=10, seed=0, config=config, policy_options={"budget": budget})
    _table_with(sel, frozen)
    assert sel.table.bucket_counts()["FREEZE"] == frozen
    sel.set_epoch(9)  # reaches into the last final_full (0.1): the final phase
    indices, _ = sel.plan()  # starts the epoch (a read of epoch_plan would only preview it)
    rates = np.array(sel.policy.metrics()["rates"])
    # Every bucket thinned by one factor: frozen samples in proportion, unlearned ones not starved.
    assert rates[BUCKET_FREEZE] == pytest.approx(budget, rel=1e-6)
    assert rates[BUCKET_FOCUS] == pytest.approx(budget, rel=1e-6)
    drawn_frozen = int((indices < frozen).sum())
    drawn_unlearned = int((indices >= frozen).sum())
    assert len(indices) <= budget * n * 1.03
    assert abs(drawn_frozen - budget * frozen) <= 0.1 * budget * frozen
    assert abs(drawn_unlearned - budget * (n - frozen)) <= 0.15 * budget * (n - frozen)


def test_the_budget_caps_revisits_when_forgetting_asks_for_every_frozen_sample():
    """Outside the final phase FREEZE's revisit rate can reach 1 (heavy forgetting): it is
    capped at the factor of the scaled buckets, so the budget holds there too."""
    policy = GekoPolicy(budget=0.5)
    counts = np.array([700.0, 0.0, 300.0, 0.0, 0.0, 0.0])  # FREEZE, LIGHT, FOCUS, HARD, UNSEEN, stalled
    rates, probe = policy._fit_budget(np.array([1.0, 0.5, 1.0, 2.0, 1.0]), counts)
    assert rates[BUCKET_FREEZE] == pytest.approx(0.5) and rates[BUCKET_FOCUS] == pytest.approx(0.5)
    assert float((counts[:5] * rates).sum()) == pytest.approx(500.0)
    # A budget the revisits fit in leaves FREEZE's rate alone.
    rates, probe = policy._fit_budget(np.array([0.1, 0.5, 1.0, 2.0, 1.0]), np.array([100.0, 0.0, 900.0, 0.0, 0.0, 0.0]))
    assert rates[BUCKET_FREEZE] == 0.1 and float(100 * rates[0] + 900 * rates[2]) == pytest.approx(500.0)
    assert probe == policy.stall_rate
    assert rates[BUCKET_UNSEEN] == 1.0 and rates[BUCKET_LIGHT] == pytest.approx(0.5 * rates[BUCKET_FOCUS] / 1.0)
    assert rates[BUCKET_HARD] == pytest.approx(2 * rates[BUCKET_FOCUS])


def _train_in_steps(total_steps: int, n: int, batch: int, **options):
    """Train through ``total_steps`` steps of ``batch`` samples; per epoch (epoch, planned
    samples, distinct samples, samples trained)."""
    labels = torch.arange(n) % 4
    right = torch.arange(n) % 2 == 0
    logits = torch.zeros(n, 4)
    logits[torch.arange(n), torch.where(right, labels, (labels + 1) % 4)] = 6.0
    sel = Selector(n, policy="geko", total_steps=total_steps, seed=0, batch_size=batch, policy_options=options)
    epochs, steps = [], 0
    while steps < total_steps:
        epoch, indices = sel.epoch, sel.epoch_plan.indices.copy()
        trained = 0
        for start in range(0, len(indices), batch):
            idx = torch.from_numpy(indices[start : start + batch])
            sel.loss(logits[idx], labels[idx], idx)
            trained += len(idx)
            steps += 1
            if steps == total_steps:
                break
        epochs.append((epoch, len(indices), len(np.unique(indices)), trained))
    return sel, epochs


def test_total_steps_plans_the_final_full_pass_while_it_can_finish():
    n = 400
    sel, epochs = _train_in_steps(30, n, 40)
    full = [e for e in epochs[1:] if e[2] == n]  # after the first (all UNSEEN) epoch
    assert full, epochs
    assert any(trained == planned for _, planned, _, trained in full), epochs  # one completed
    assert not any(e[2] == n for e in epochs[1:-1] if e not in full)


def test_total_steps_final_phase_resumes_with_the_row_count():
    sel, _ = _train_in_steps(30, 400, 40)
    state = sel.policy.state_dict()
    assert state["rows"] == 30 * 40
    again = GekoPolicy()
    again.bind(sel.context.__class__(**{**sel.context.__dict__}))
    again.load_state_dict(state)
    assert again._rows == 1200
    older = {key: value for key, value in state.items() if key != "rows"}
    again.load_state_dict(older)  # a state from before the row count: the old rule
    assert again._rows is None
    with pytest.raises(ValueError, match="rows"):
        again.load_state_dict({**state, "rows": -1})
