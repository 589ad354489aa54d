"""The Selector in rewards mode: observe_rewards, its counts, epochs, steps, resume, checks."""

from __future__ import annotations

import os
import pickle
import socket

import numpy as np
import pytest
import torch

from geko_core import Selector
from geko_core.policies import GekoRolloutPolicy, GresoPolicy, Policy, RolloutBatch, UniformPolicy, make_policy

N, B, G = 24, 4, 6
RL = ["full", "uniform", "random_subset", "dynamic", "greso", "geko", "gainrl"]


def _rewards(idx, epoch, group=G):
    """Deterministic 0/1 rewards: prompt i is solved with probability i / N."""
    g = torch.Generator().manual_seed(1000 * epoch + int(idx.sum()))
    skill = idx.to(torch.float32)[:, None] / N
    return (torch.rand(len(idx), group, generator=g) < skill).to(torch.float32)


def _lengths(idx, group=G):
    return (idx[:, None] % 7 + 3).expand(len(idx), group).clone()


def _run_epoch(sel, stop_after=None):
    """Roll out one epoch in batches of B from the sampler; returns the batches seen."""
    seen, batch = [], []
    for i in sel.sampler:
        batch.append(i)
        if len(batch) == B:
            idx = torch.tensor(batch)
            sel.observe_rewards(idx, _rewards(idx, sel.epoch), _lengths(idx))
            seen.append(batch)
            batch = []
            if stop_after is not None and len(seen) == stop_after:
                return seen
    if batch:
        idx = torch.tensor(batch)
        sel.observe_rewards(idx, _rewards(idx, sel.epoch), _lengths(idx))
        seen.append(batch)
    return seen


def _bytes(state):
    """Each entry pickled apart (a whole-dict pickle also encodes which objects are shared)."""
    return {key: pickle.dumps(value) for key, value in state.items() if key not in ("seconds", "history")}


def _state_bytes(sel):
    return _bytes(sel.state_dict())


# -- signal resolution ------------------------------------------------------------------------
def test_signal_resolves_from_the_policy_and_names_resolve_per_signal():
    assert Selector(N, "greso", epochs=2).signal == "rewards"
    assert Selector(N, "dynamic", epochs=2).signal == "rewards"
    assert Selector(N, "geko", epochs=2).signal == "logits"
    assert Selector(N, "uniform", epochs=2).signal == "logits"
    sel = Selector(N, "geko", epochs=2, signal="rewards")
    assert isinstance(sel.policy, GekoRolloutPolicy) and sel.signal == "rewards"
    assert type(sel.table).__name__ == "RolloutTable"
    assert Selector(N, "uniform", epochs=2, signal="rewards").signal == "rewards"
    with pytest.raises(ValueError, match="learns from rewards"):
        Selector(N, GresoPolicy(), epochs=2, signal="logits")
    with pytest.raises(ValueError, match="unknown policy 'greso' with signal='logits'"):
        make_policy("greso", signal="logits")
    with pytest.raises(ValueError, match="signal must be"):
        Selector(N, "full", epochs=2, signal="loss")
    with pytest.raises(TypeError, match="RolloutConfig"):
        from geko_core import GekoConfig

        Selector(N, "greso", epochs=2, config=GekoConfig())


# -- the touch point --------------------------------------------------------------------------
def test_observe_rewards_counts_and_keep_mask():
    sel = Selector(N, "full", signal="rewards", epochs=2, seed=0)
    plan, _ = sel.plan()
    idx = torch.from_numpy(plan[:B])
    rewards = torch.tensor([[1.0] * G, [0.0] * G, [1.0, 0.0] * (G // 2), [0.5] * G])
    lengths = torch.arange(B * G).reshape(B, G)
    stats = sel.observe_rewards(idx, rewards, lengths)
    assert stats.keep.tolist() == [False, False, True, False]
    np.testing.assert_allclose(stats.pass_rate.numpy(), [1.0, 0.0, 0.5, 0.5])
    m = sel.metrics()
    assert (m["prompts"], m["rollouts"], m["rollout_tokens"]) == (B, B * G, int(lengths.sum()))
    assert m["zero_variance_prompts"] == 3 and m["zero_variance_share"] == pytest.approx(0.75)
    assert m["forwarded"] == m["backpropagated"] == B and m["step"] == 1 and sel.position == B
    assert m["skipped_prompts"] == 0 and m["signal"] == "rewards"
    buckets = sel.table.buckets(idx.numpy())
    assert buckets.tolist() == [0, 3, 2, 0]  # FREEZE, HARD, FOCUS, FREEZE (zero variance at 0.5)
    # Without lengths: no tokens counted.
    sel.observe_rewards(torch.from_numpy(plan[B : 2 * B]), torch.ones(B, G))
    assert sel.metrics()["rollout_tokens"] == int(lengths.sum()) and sel.metrics()["rollouts"] == 2 * B * G


def test_the_policy_receives_rollout_batches_in_order():
    seen = []

    class Recorder(UniformPolicy):
        signal = "rewards"

        def observe_rollouts(self, batch, table):
            seen.append(batch)
            super().observe_rollouts(batch, table)

    sel = Selector(N, Recorder(), epochs=1, seed=3)
    assert sel.signal == "rewards"
    _run_epoch(sel)
    assert sum(len(b.indices) for b in seen) == N
    first = seen[0]
    assert isinstance(first, RolloutBatch) and first.indices.dtype == np.int64
    assert first.zero_variance.dtype == np.bool_ and first.all_right.dtype == np.bool_
    assert first.pass_rate.dtype == np.float32 and (first.step, first.epoch) == (1, 0)
    assert [b.step for b in seen] == list(range(1, len(seen) + 1))
    assert np.array_equal(first.all_right, first.pass_rate == 1.0)
    assert np.array_equal(first.all_wrong, first.pass_rate == 0.0)


def test_epochs_positions_and_steps():
    sel = Selector(N, "greso", epochs=3, seed=1)
    calls = prompts = 0
    for epoch in range(3):
        assert sel.epoch == epoch
        planned = len(sel.sampler)
        batches = _run_epoch(sel)
        assert sum(map(len, batches)) == planned
        calls, prompts = calls + len(batches), prompts + planned
        assert sel.epoch == epoch + 1  # consumed: the epoch moved on inside the last call
        assert sel.history[-1]["epoch"] == epoch and sel.history[-1]["prompts"] == prompts
    assert sel.step_count == calls and sel.metrics()["prompts"] == prompts
    # explicit steps: only step() counts
    sel = Selector(N, "full", signal="rewards", epochs=1, explicit_steps=True)
    _run_epoch(sel, stop_after=3)
    assert sel.step_count == 0 and sel.position == 3 * B
    sel.step()
    assert sel.step_count == 1


def test_skipped_prompts_count_what_plans_leave_out():
    sel = Selector(N, "random_subset", signal="rewards", epochs=2, policy_options={"budget": 0.5})
    _run_epoch(sel)
    assert sel.metrics()["skipped_prompts"] == N // 2
    len(sel.sampler)  # a preview plans nothing and counts nothing
    assert sel.metrics()["skipped_prompts"] == N // 2


@pytest.mark.parametrize("policy", RL)
def test_exact_resume_mid_epoch(policy):
    def fresh():
        return Selector(N, policy, signal="rewards", epochs=4, seed=5)

    straight = fresh()
    _run_epoch(straight)
    _run_epoch(straight)
    tail = _run_epoch(straight, stop_after=2)
    tail += _run_epoch(straight)
    tail += _run_epoch(straight)

    first = fresh()
    _run_epoch(first)
    _run_epoch(first)
    _run_epoch(first, stop_after=2)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = fresh()
    resumed.load_state_dict(state)
    rest = _run_epoch(resumed) + _run_epoch(resumed)
    assert rest == tail[2:]
    assert _state_bytes(straight) == _state_bytes(resumed)


def test_state_dict_carries_the_rollout_table():
    sel = Selector(N, "geko", signal="rewards", epochs=2, seed=2)
    _run_epoch(sel, stop_after=3)
    state = sel.state_dict()
    assert state["signal"] == "rewards"
    np.testing.assert_array_equal(state["table"]["pass_ema"], sel.table.field("pass_ema"))
    other = Selector(N, "geko", signal="rewards", epochs=2, seed=2)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.table.field("flat_run"), sel.table.field("flat_run"))


def test_device_rows_reach_the_table_one_step_late():
    from test_selector_device_indices import FakeCopy

    host = Selector(N, "greso", epochs=2, seed=9)
    late = Selector(N, "greso", epochs=2, seed=9)
    late._host_copy = copier = FakeCopy()
    plan, _ = late.plan()
    first, second = torch.from_numpy(plan[:B]), torch.from_numpy(plan[B : 2 * B])
    for idx in (first, second):
        host.observe_rewards(idx, _rewards(idx, 0), _lengths(idx))
    late.observe_rewards(first, _rewards(first, 0), _lengths(first))
    assert (late.table.field("visits") == 0).all() and copier.copies == 6  # queued, copies started
    late.observe_rewards(second, _rewards(second, 0), _lengths(second))
    assert late.table.field("visits")[first.numpy()].tolist() == [1] * B and copier.events[0].waited
    assert (late.table.field("visits")[second.numpy()] == 0).all()
    _run_epoch(host), _run_epoch(late)
    _run_epoch(host), _run_epoch(late)
    assert _state_bytes(host) == _state_bytes(late)  # state_dict applies what is queued


# -- checks ---------------------------------------------------------------------------------
BAD = [
    ("nan", lambda idx: (idx, torch.full((B, G), float("nan")), None), ValueError, "finite"),
    ("inf", lambda idx: (idx, torch.full((B, G), float("inf")), None), ValueError, "finite"),
    ("1-d", lambda idx: (idx, torch.ones(B), None), ValueError, r"\[B, G\]"),
    ("rows", lambda idx: (idx, torch.ones(B + 1, G), None), ValueError, "idx has"),
    ("bool", lambda idx: (idx, torch.ones(B, G, dtype=torch.bool), None), TypeError, "real numbers"),
    ("range", lambda idx: (torch.tensor([0, 1, 2, N]), torch.ones(B, G), None), IndexError, "out of range"),
    ("negative", lambda idx: (torch.tensor([0, -1, 2, 3]), torch.ones(B, G), None), IndexError, "out of range"),
    ("float idx", lambda idx: (idx.float(), torch.ones(B, G), None), TypeError, "integer"),
    ("lengths shape", lambda idx: (idx, torch.ones(B, G), torch.ones(B, G + 1)), ValueError, "lengths"),
    ("lengths negative", lambda idx: (idx, torch.ones(B, G), -torch.ones(B, G, dtype=torch.int64)), ValueError, "lengths"),
    ("lengths nan", lambda idx: (idx, torch.ones(B, G), torch.full((B, G), float("nan"))), ValueError, "lengths"),
    ("rewards type", lambda idx: (idx, "1,0", None), TypeError, "rewards"),
]


@pytest.mark.parametrize("name,make,error,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("started", [False, True])
def test_bad_input_changes_nothing(name, make, error, match, started):
    sel = Selector(N, "greso", epochs=3, seed=4)
    if started:
        _run_epoch(sel)
        _run_epoch(sel, stop_after=2)
    before = _state_bytes(sel)
    plan_before = sel._epochs.plan
    idx = torch.from_numpy(sel.epoch_plan.indices[sel.position : sel.position + B].copy())
    with pytest.raises(error, match=match):
        sel.observe_rewards(*make(idx))
    assert _state_bytes(sel) == before
    assert sel._epochs.plan is plan_before  # not started by a bad call (None stays None)


def test_reads_change_nothing():
    sel = Selector(N, "geko", signal="rewards", epochs=3, seed=6)
    _run_epoch(sel, stop_after=2)
    before = _state_bytes(sel)
    for _ in range(2):
        sel.metrics(), len(sel.sampler), sel.epoch_plan, sel.remaining, sel.position, sel.progress()
        sel.table.field("pass_ema"), sel.table.bucket_counts(), sel.sampler.state_dict()
    assert _state_bytes(sel) == before
    fresh = Selector(N, "greso", epochs=3, seed=6)
    before = _state_bytes(fresh)
    fresh.metrics(), len(fresh.sampler), fresh.remaining
    assert fresh._epochs.plan is None and _state_bytes(fresh) == before


def test_mode_mismatches_raise():
    rl = Selector(N, "greso", epochs=2)
    logits, labels = torch.randn(B, 5), torch.zeros(B, dtype=torch.int64)
    idx = torch.arange(B)
    before = _state_bytes(rl)
    for call in (lambda: rl.loss(logits, labels, idx), lambda: rl.observe(idx, logits, labels),
                 lambda: rl.select(idx, logits, labels)):
        with pytest.raises(TypeError, match="rewards mode"):
            call()
    from geko_core.types import SampleStats  # noqa: F401

    assert _state_bytes(rl) == before
    sup = Selector(N, "geko", epochs=2)
    with pytest.raises(TypeError, match="rewards mode"):
        sup.observe_rewards(idx, torch.ones(B, G))
    with pytest.raises(ValueError, match="logits mode"):
        rl.load_state_dict(sup.state_dict())
    with pytest.raises(ValueError, match="rewards mode"):
        sup.load_state_dict(rl.state_dict())
    # the same policy name in the other signal: refused by the signal, before anything else
    geko_rl = Selector(N, "geko", signal="rewards", epochs=2)
    with pytest.raises(ValueError, match="logits mode"):
        geko_rl.load_state_dict(sup.state_dict())
    assert _state_bytes(rl) == before


def test_a_policy_without_observe_rollouts_override_uses_the_table():
    class Plain(Policy):
        signal = "rewards"
        name = "plain"

        def plan_epoch(self, context, epoch, progress):
            from geko_core.policies import Plan

            order = np.arange(context.num_samples, dtype=np.int64)
            return Plan(order, np.ones(len(order), dtype=np.float32))

    sel = Selector(N, Plain(), epochs=1)
    _run_epoch(sel)
    assert (sel.table.field("visits") == 1).all()


# -- DDP ------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sel = Selector(N, "greso", epochs=2, seed=3)
        seen = []
        for epoch in range(2):
            shard = list(sel.sampler)
            seen.append(shard)
            for start in range(0, len(shard), B):
                idx = torch.tensor(shard[start : start + B])
                sel.observe_rewards(idx, _rewards(idx, epoch), _lengths(idx))
        torch.save({"seen": seen, "table": sel.table.state_dict(), "policy": sel.policy.state_dict(),
                    "metrics": sel.metrics()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_keep_one_rollout_table(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    first = out[0]["seen"][0], out[1]["seen"][0]
    assert len(first[0]) == len(first[1]) == N // 2 and sorted(first[0] + first[1]) == list(range(N))
    for key, value in out[0]["table"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(out[1]["table"][key], value, err_msg=key)
    assert (out[0]["table"]["visits"] > 0).all()  # every rank's rollouts reached every table
    assert out[0]["policy"] == out[1]["policy"]  # GRESO's adapted p: the same on both ranks
    assert out[0]["seen"][1] != out[1]["seen"][1]
    assert out[0]["metrics"]["rollouts"] == len(out[0]["seen"][0] + out[0]["seen"][1]) * G
