"""GEKO's few-epoch mechanisms: the streak FREEZE gate and stagnation (docs/design.md §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import geko_core
from geko_core import Selector
from geko_core._backend import load_compiled_core
from geko_core.policies import GekoPolicy

N, V = 200, 4
IDX = np.arange(N)
LABELS = torch.from_numpy(IDX % V)
RIGHT = F.one_hot(LABELS, V).float() * 10.0  # confident and right
UNSURE_WRONG = torch.zeros(N, V)  # uniform: wrong (ties go to index 0) and unconfident


def wrong_at(loss_scale: float) -> torch.Tensor:
    """Wrong, unconfident logits whose loss grows with ``loss_scale``."""
    logits = torch.zeros(N, V)
    logits[torch.arange(N), (LABELS + 1) % V] = loss_scale
    return logits


def visit(sel: Selector, epoch: int, logits: torch.Tensor, idx: np.ndarray = IDX) -> None:
    sel.set_epoch(epoch)
    sel.observe_stats(idx, geko_core.sample_stats(logits[idx], LABELS[idx]))


def selector(**options) -> Selector:
    return Selector(N, policy="geko", epochs=20, seed=0, policy_options=options)


def test_streak_gate_freezes_after_k_right_and_confident_epochs():
    sel = selector(freeze_streak=2)
    visit(sel, 0, RIGHT)
    visit(sel, 0, RIGHT)  # a second copy in the same epoch does not count
    sel.set_epoch(1)
    assert sel.table.bucket_counts()["FREEZE"] == 0  # the Q gate (q_alpha 0.1) is far away
    indices, _ = sel.plan()
    assert len(indices) > N // 4  # one epoch right: still LIGHT, thinned to its rate
    visit(sel, 1, RIGHT)
    sel.set_epoch(2)
    indices, weights = sel.plan()
    # Two epochs right and confident: planned as FREEZE, the guard's 10% revisited.
    assert len(indices) == int(np.ceil(0.1 * N)) and sel.metrics()["geko/frozen"] == N
    np.testing.assert_allclose(weights, 10.0)
    assert sel.table.bucket_counts()["FREEZE"] == 0  # the table itself is unchanged
    # A revisit that finds the sample wrong: a failed revisit, back in training at once.
    visit(sel, 2, wrong_at(5.0), indices)
    assert sel.metrics()["geko/failed_revisits"] == len(indices)
    sel.set_epoch(3)
    indices_after, _ = sel.plan()
    assert sel.metrics()["geko/frozen"] == N - len(indices)


def test_streak_gate_resets_on_an_unconfident_visit():
    sel = selector(freeze_streak=2)
    visit(sel, 0, RIGHT)
    visit(sel, 1, RIGHT * 0.1)  # right but unconfident: the streak restarts
    visit(sel, 2, RIGHT)
    sel.set_epoch(3)
    sel.plan()
    assert sel.metrics()["geko/frozen"] == 0
    visit(sel, 3, RIGHT)
    sel.set_epoch(4)
    sel.plan()
    assert sel.metrics()["geko/frozen"] == N


def test_stagnant_wrong_samples_are_probed_at_the_stall_rate():
    sel = selector(stall_visits=2, stall_drop=0.2, stall_rate=0.25)
    half = IDX < N // 2
    visit(sel, 0, wrong_at(5.0))
    # Half the samples improve a lot every epoch, half stay where they are.
    for epoch, improving_scale in ((1, 3.0), (2, 1.5)):
        logits = torch.where(torch.from_numpy(half)[:, None], wrong_at(improving_scale), wrong_at(5.0))
        visit(sel, epoch, logits)
        visit(sel, epoch, logits)  # a repeated copy in the epoch counts once
    sel.set_epoch(3)
    indices, weights = sel.plan()
    stalled = sel.policy.stalled(sel.table.field("bucket"))
    assert stalled.sum() == N // 2 and not stalled[half].any()
    # Every improving sample keeps its bucket's rate; stalled ones appear about a quarter of
    # the time, with weight 1 ("thinning": spend less on them, do not weigh them up).
    assert set(IDX[half]) <= set(indices.tolist())
    probes = stalled[indices]
    assert 0.1 * (N // 2) < probes.sum() < 0.4 * (N // 2)
    np.testing.assert_array_equal(weights[probes], 1.0)
    assert sel.metrics()["geko/stalled"] == N // 2
    # A probe whose loss falls by the stall_drop ends the stall.
    visit(sel, 3, wrong_at(1.0), IDX[~half])
    assert not sel.policy.stalled(sel.table.field("bucket")).any()


def test_one_stagnant_epoch_is_not_a_stall_with_stall_visits_2():
    sel = selector(stall_visits=2)
    visit(sel, 0, wrong_at(5.0))
    visit(sel, 1, wrong_at(5.0))
    assert not sel.policy.stalled(sel.table.field("bucket")).any()
    visit(sel, 2, wrong_at(5.0))
    assert sel.policy.stalled(sel.table.field("bucket")).all()
    visit(sel, 3, RIGHT)  # right: no longer wrong, the count restarts
    assert not sel.policy.stalled(sel.table.field("bucket")).any()


def test_under_a_budget_stalled_samples_yield_their_tokens_first():
    # The stuck half costs 3 tokens a sample, the improving half 1: 400 tokens in all.
    tokens = np.where(IDX < N // 2, 3, 1).astype(np.int64)
    stuck = IDX < N // 2
    logits = torch.where(torch.from_numpy(stuck)[:, None], wrong_at(5.0), wrong_at(2.0))

    def planned(budget: float):
        sel = Selector(N, policy="geko", epochs=20, seed=0, sample_tokens=tokens,
                       policy_options={"budget": budget, "budget_unit": "tokens", "stall_visits": 1, "stall_rate": 0.2})
        visit(sel, 0, wrong_at(5.0))
        visit(sel, 1, logits)
        sel.set_epoch(2)
        sel.plan()
        buckets = sel.table.field("bucket")
        assert (sel.policy.stalled(buckets) == stuck).all()
        return np.asarray(sel.metrics()["geko/rates"]), buckets[~stuck][0]

    # Without the stall the budget would scale every wrong sample alike; with it the probes
    # (0.2 * 300 tokens) are a fixed cost and the improving half gets what is left.
    rates, bucket = planned(1.0)
    unscaled = rates[bucket]
    rates, bucket = planned(0.25)
    assert 0.2 * 300 + rates[bucket] * 100 == pytest.approx(0.25 * 400, rel=1e-6)
    assert rates[bucket] < unscaled


def test_counters_resume_and_refuse_bad_states():
    sel = selector(freeze_streak=2, stall_visits=1)
    visit(sel, 0, RIGHT)
    visit(sel, 1, RIGHT)
    state = sel.state_dict()
    assert state["policy_state"]["streak"].dtype == np.uint8
    other = selector(freeze_streak=2, stall_visits=1)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.policy._streak, sel.policy._streak)
    np.testing.assert_array_equal(other.policy._seen_epoch, sel.policy._seen_epoch)
    # A policy without the mechanisms refuses counters it cannot use, and vice versa.
    with pytest.raises(ValueError):
        selector().load_state_dict(state)
    plain = selector().state_dict()
    with pytest.raises(ValueError):
        selector(freeze_streak=2, stall_visits=1).load_state_dict(plain)
    bad = dict(state, policy_state=dict(state["policy_state"], streak=np.zeros(N + 1, dtype=np.uint8)))
    with pytest.raises(ValueError):
        other.load_state_dict(bad)


@pytest.mark.parametrize("options", [
    {"freeze_streak": -1}, {"freeze_streak": 2.0}, {"freeze_streak": True}, {"stall_visits": 256},
    {"stall_drop": 1.5}, {"stall_rate": -0.1}, {"stall_rate": "0.2"},
])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        GekoPolicy(**options)


def test_defaults_leave_the_mechanisms_off():
    policy = GekoPolicy()
    assert policy.freeze_streak == 0 and policy.stall_visits == 0
    sel = selector()
    visit(sel, 0, RIGHT)
    assert "streak" not in sel.state_dict()["policy_state"]


# -- the guard's revisits ------------------------------------------------------------------------


def revisits(sel: Selector) -> tuple[int, int]:
    metrics = sel.policy.metrics()
    return metrics["revisits"], metrics["failed_revisits"]


@pytest.mark.parametrize("options", [{}, {"freeze_streak": 2, "stall_visits": 1}])
def test_a_sample_frozen_during_an_epoch_is_not_revisited_in_it(options):
    """A revisit is a frozen sample's first visit of an epoch: a sample that freezes on its
    first copy of an epoch and is drawn again in it was not drawn as a revisit."""
    config = geko_core.GekoConfig(q_alpha=1.0, freeze_q=0.5)  # one right, confident visit freezes
    sel = Selector(N, policy="geko", epochs=20, seed=0, config=config, policy_options=options)
    one = IDX[1:2]  # label 1: UNSURE_WRONG predicts 0
    visit(sel, 0, UNSURE_WRONG, one)
    visit(sel, 1, RIGHT, one)  # frozen on its first copy of epoch 1
    assert sel.table.buckets(one)[0] == FREEZE
    visit(sel, 1, UNSURE_WRONG, one)  # its second copy: wrong, but not a revisit
    assert revisits(sel) == (0, 0)
    visit(sel, 1, RIGHT, one)
    visit(sel, 2, RIGHT, one)  # frozen before epoch 2: its first visit there is a revisit ...
    visit(sel, 2, RIGHT, one)  # ... and its second is not
    assert revisits(sel) == (1, 0)
    visit(sel, 3, UNSURE_WRONG, np.array([1, 1]))  # two copies in one batch: one revisit, failed
    assert revisits(sel) == (2, 1)


# -- the policy's compiled counters (_C.count_visits on the table's report) against a reference --

FREEZE, LIGHT, FOCUS, HARD = 0, 1, 2, 3
_C = load_compiled_core()


def reference_counts(before, after, idx, loss, conf, correct, epoch, seen, streak, stall, ref, k, conf_gate, drop):
    """The counters' rules, one row (one visit) at a time, in plain Python."""
    revisits = failed = 0
    streak_before = None if streak is None else streak.copy()
    keep = np.float32(1.0 - drop)
    for i, s in enumerate(idx):
        frozen = before[i] == FREEZE or (streak is not None and k > 0 and before[i] == LIGHT and streak_before[s] >= k)
        wrong = after[i] in (FOCUS, HARD)
        fresh = seen[s] != epoch
        if fresh and frozen and np.isfinite(correct[i]):  # a revisit is a first visit of the epoch
            revisits += 1
            failed += int(wrong)
        if not (np.isfinite(loss[i]) and np.isfinite(conf[i]) and np.isfinite(correct[i])):
            continue
        if streak is not None:
            right_confident = after[i] in (FREEZE, LIGHT) and conf[i] > np.float32(conf_gate)
            streak[s] = min(255, int(streak[s]) + int(fresh)) if right_confident else 0
        if stall is not None:
            stagnant = wrong and np.isfinite(ref[s]) and not (loss[i] <= keep * ref[s])
            if not stagnant:
                stall[s] = 0
            elif fresh:
                stall[s] = min(255, int(stall[s]) + 1)
            if fresh:
                ref[s] = loss[i]
        seen[s] = epoch
    return revisits, failed


def counted(table, idx, loss, conf, correct, step, *, epoch, seen_epoch, streak, stall, ref_loss, freeze_streak, stall_drop):
    """One step of GekoPolicy.observe: the table's update with its report, then the counters."""
    before = np.empty(len(idx), dtype=np.int8)
    after = np.empty(len(idx), dtype=np.int8)
    table.update_arrays(idx, loss, conf, correct, step, before=before, after=after)
    return _C.count_visits(
        idx, loss, conf, correct, before, after, epoch, seen_epoch, streak, stall, ref_loss,
        freeze_streak, table.config.freeze_confidence, stall_drop,
    )


@pytest.mark.parametrize("mechanisms", ["both", "streak", "stall", "guard"])
def test_compiled_counters_match_the_reference(mechanisms):
    n = 40
    rng = np.random.default_rng(3)
    config = geko_core.GekoConfig(q_alpha=0.5, freeze_q=0.3)
    table = geko_core.SampleTable(n, config)
    plain = geko_core.SampleTable(n, config)
    counters = {
        "seen_epoch": np.full(n, -1, dtype=np.int32),
        "streak": np.zeros(n, dtype=np.uint8) if mechanisms in ("both", "streak") else None,
        "stall": np.zeros(n, dtype=np.uint8) if mechanisms in ("both", "stall") else None,
        "ref_loss": np.full(n, np.nan, dtype=np.float32) if mechanisms in ("both", "stall") else None,
    }
    mirror = {key: None if value is None else value.copy() for key, value in counters.items()}
    step = 0
    totals = np.zeros(2, dtype=np.int64)
    for epoch in range(6):
        for _ in range(5):
            size = 24
            idx = rng.integers(0, n, size=size).astype(np.int64 if epoch % 2 else np.int32)  # repeats within a batch
            idx[:4] = idx[4]  # and always one sample visited five times in a row
            # Samples of three kinds: mastered (right, confident), stuck (wrong, flat loss),
            # learning (wrong, loss halving per epoch); a few visits contradict their kind.
            kind = idx % 3
            loss = np.where(kind == 2, 2.0 * 0.5**epoch, 2.0) * rng.uniform(0.97, 1.03, size)
            loss = loss.astype(np.float32)
            conf = np.where(kind == 0, rng.uniform(0.9, 1.0, size), rng.uniform(0.3, 1.0, size)).astype(np.float32)
            correct = ((kind == 0) ^ (rng.random(size) < 0.1)).astype(np.float32)
            loss[rng.random(size) < 0.05] = np.nan  # skipped by the table and the counters
            correct[rng.random(size) < 0.05] = np.inf
            before = plain.buckets(idx)
            plain.update_arrays(idx, loss, conf, correct, step)
            after = plain.buckets(idx)
            expected = reference_counts(
                before, after, idx, loss, conf, correct, epoch, mirror["seen_epoch"], mirror["streak"],
                mirror["stall"], mirror["ref_loss"], 2, config.freeze_confidence, 0.1,
            )
            got = counted(table, idx, loss, conf, correct, step, epoch=epoch, **counters, freeze_streak=2, stall_drop=0.1)
            assert got == expected
            totals += got
            for key, value in counters.items():
                if value is not None:
                    np.testing.assert_array_equal(value, mirror[key], err_msg=key)
            step += 1
    np.testing.assert_array_equal(table.records(), plain.records())
    assert totals[0] > 0 and totals[1] > 0, totals  # revisits, some failed
    if counters["streak"] is not None:
        assert counters["streak"].max() >= 2  # the run reached the gate
    if counters["stall"] is not None:
        assert counters["stall"].max() >= 2


def count_call(n, idx, **changes):
    """_C.count_visits on a batch of ``idx`` (all right and confident), with ``changes``."""
    args = {
        "epoch": 0,
        "seen_epoch": np.full(n, -1, dtype=np.int32),
        "streak": np.zeros(n, dtype=np.uint8),
        "stall": np.zeros(n, dtype=np.uint8),
        "ref_loss": np.full(n, np.nan, dtype=np.float32),
        "freeze_streak": 2,
        "freeze_confidence": 0.85,
        "stall_drop": 0.1,
    }
    args.update(changes)
    m = len(idx)
    ones = np.ones(m, dtype=np.float32)
    codes = np.zeros(m, dtype=np.int8)
    before, after = args.pop("before", codes), args.pop("after", codes)
    return _C.count_visits(np.asarray(idx, dtype=np.int64), ones, ones, ones, before, after, **args), args


@pytest.mark.parametrize(
    "idx, changes, error, match",
    [
        ([0, 8], {}, IndexError, "out of range"),
        ([0, -1], {}, IndexError, "out of range"),
        ([0], {"seen_epoch": np.full(8, -1, dtype=np.int64)}, TypeError, "seen_epoch must have dtype int32"),
        ([0], {"seen_epoch": None}, ValueError, "seen_epoch is required"),
        ([0], {"streak": np.zeros(9, dtype=np.uint8)}, ValueError, "streak must have one entry per sample"),
        ([0], {"stall": np.zeros(8, dtype=np.int8)}, TypeError, "stall must have dtype uint8"),
        ([0], {"ref_loss": None}, ValueError, "ref_loss is required"),
        ([0], {"ref_loss": np.zeros(8, dtype=np.float64)}, TypeError, "ref_loss must have dtype float32"),
        ([0], {"streak": [0] * 8}, TypeError, "streak must be a numpy array"),
        ([0], {"before": np.zeros(2, dtype=np.int8)}, ValueError, "before and after must have one entry per row"),
        ([0], {"after": np.zeros(1, dtype=np.int16)}, TypeError, "after must have dtype int8"),
        ([0], {"epoch": -1}, ValueError, "epoch must lie"),
        ([0], {"freeze_streak": 256}, ValueError, "freeze_streak must lie"),
        ([0], {"freeze_confidence": 1.5}, ValueError, "freeze_confidence must lie"),
        ([0], {"stall_drop": float("nan")}, ValueError, "stall_drop must lie"),
    ],
)
def test_compiled_counters_refuse_bad_input_and_change_nothing(idx, changes, error, match):
    n = 8
    args = {
        "seen_epoch": np.full(n, -1, dtype=np.int32),
        "streak": np.zeros(n, dtype=np.uint8),
        "stall": np.zeros(n, dtype=np.uint8),
        "ref_loss": np.full(n, np.nan, dtype=np.float32),
    }
    args.update(changes)
    copies = {key: None if not isinstance(value, np.ndarray) else value.copy() for key, value in args.items()}
    with pytest.raises(error, match=match):
        count_call(n, idx, **args)
    for key, value in args.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, copies[key], err_msg=key)


def test_compiled_counters_refuse_a_read_only_array():
    streak = np.zeros(8, dtype=np.uint8)
    streak.setflags(write=False)
    with pytest.raises(ValueError, match="streak must be writable"):
        count_call(8, [0, 1], streak=streak)
