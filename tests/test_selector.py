"""The Selector in real (small) training loops: every policy, resume, DDP, bad input."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import geko_core
from geko_core import Selector, WithIndex
from geko_core.policies import Plan, Policy

POLICIES = ["geko", "infobatch", "es", "eswp", "uniform", "random_subset"]


def make_blobs(n: int, *, dims: int = 16, classes: int = 4, seed: int = 0, noise: float = 2.5):
    centers = torch.randn(classes, dims, generator=torch.Generator().manual_seed(1234)) * 2.0
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + noise * torch.randn(n, dims, generator=g)
    return x, y


TRAIN = make_blobs(1200, seed=1)
TEST = make_blobs(400, seed=2)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def accuracy(model) -> float:
    with torch.no_grad():
        return (model(TEST[0]).argmax(-1) == TEST[1]).float().mean().item()


def train(policy: str, epochs: int = 6, *, seed: int = 0, policy_options=None, config=None):
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sel = Selector(len(TRAIN[1]), policy=policy, epochs=epochs, seed=seed, policy_options=policy_options, config=config)
    loader = DataLoader(WithIndex(TensorDataset(*TRAIN)), batch_size=32, sampler=sel.sampler)
    for _ in range(epochs):
        for idx, x, y in loader:
            if sel.policy.meta_batch:
                with torch.no_grad():
                    meta_logits = model(x)
                pos, w = sel.select(idx, meta_logits, y)
                loss = sel.loss(model(x[pos]), y[pos], idx[pos], weights=w, observe=False)
            else:
                loss = sel.loss(model(x), y, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, sel


@pytest.fixture(scope="module")
def trained():
    return {p: train(p, policy_options={"budget": 0.6} if p == "random_subset" else None) for p in POLICIES}


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_trains_to_held_out_accuracy(trained, policy):
    model, sel = trained[policy]
    assert accuracy(model) >= 0.88, policy  # uniform reaches about 0.92
    m = sel.metrics()
    assert m["policy"] == policy and m["forwarded"] >= m["backpropagated"] > 0
    assert len(sel.history) == 6  # one entry per finished epoch: the Selector moves on when training consumed one


def test_geko_and_infobatch_backpropagate_fewer_samples_than_uniform(trained):
    full = trained["uniform"][1].metrics()["backpropagated"]
    assert full == 6 * 1200
    for policy in ("geko", "infobatch", "es", "eswp"):
        assert trained[policy][1].metrics()["backpropagated"] < full, policy
    assert trained["random_subset"][1].metrics()["backpropagated"] == 6 * 720


def test_geko_epochs_really_shrink(trained):
    sel = trained["geko"][1]
    lengths = [h["epoch_backpropagated"] for h in sel.history]
    assert lengths[0] == 1200  # all UNSEEN at the start: the whole data set
    assert min(lengths[1:]) < 1200
    # LIGHT is thinned and weighted 1 / rate; HARD copies keep weight 1.
    sel.set_epoch(3)  # plan a PEAK-phase epoch (progress 0.5) from the table as it is now
    indices, weights = sel.plan()
    buckets = sel.table.buckets(indices)
    light, hard = buckets == geko_core.BUCKET_LIGHT, buckets == geko_core.BUCKET_HARD
    assert light.any() and hard.any(), "the test needs LIGHT and HARD samples in the plan"
    assert (weights[light] > 1).all()
    assert (weights[hard] == 1).all()


def test_frozen_samples_are_skipped_but_revisited():
    # A faster Q-value (q_alpha=0.5) lets samples pass the FREEZE gate within a few visits.
    model, sel = train("geko", epochs=6, config=geko_core.GekoConfig(q_alpha=0.5))
    assert accuracy(model) >= 0.88
    frozen = sel.table.field("bucket") == geko_core.BUCKET_FREEZE
    assert frozen.sum() > 100
    sel.set_epoch(3)  # a PEAK-phase epoch planned from the table as it is now
    indices, weights = sel.plan()
    planned_frozen = frozen[indices]
    # The guard's revisit fraction: at least 10% (min_revisit), raised by the measured forgetting.
    revisit = sel.metrics()["geko/rates"][geko_core.BUCKET_FREEZE]
    assert revisit == pytest.approx(min(1.0, 0.1 + 2.0 * sel.policy.forgetting))
    assert planned_frozen.sum() == int(np.ceil(revisit * frozen.sum() - 1e-9))
    np.testing.assert_allclose(weights[planned_frozen], frozen.sum() / planned_frozen.sum(), rtol=1e-5)
    # The last phase runs on the full data, FREEZE included.
    sel.set_epoch(5)
    indices, _ = sel.plan()
    assert set(indices.tolist()) == set(range(1200))


def test_quality_guard_measures_forgetting_and_raises_revisits():
    """Frozen samples that come back wrong are failed revisits: they return to training and the
    forgetting rate raises the next epoch's revisit fraction."""
    guard = {"min_revisit": 0.2}  # the mechanism under test, not the default's value
    sel = Selector(400, policy="geko", epochs=10, seed=0, config=geko_core.GekoConfig(q_alpha=0.9), policy_options=guard)
    idx = np.arange(400)
    labels = torch.from_numpy(idx % 4)
    right = F.one_hot(labels, 4).float() * 10.0  # confident and right
    for _ in range(3):
        sel.observe_stats(idx, geko_core.sample_stats(right, labels))
    assert sel.table.bucket_counts()["FREEZE"] == 400
    sel.set_epoch(4)
    plan, _ = sel.plan()
    assert len(plan) == 80 and sel.policy.forgetting == 0.0  # 20% revisited
    # Half the revisited samples are now confidently wrong: forgotten.
    wrong = F.one_hot((labels + 1) % 4, 4).float() * 10.0
    logits = torch.where(torch.from_numpy(np.arange(80) < 40)[:, None], wrong[plan], right[plan])
    before = sel.metrics()["geko/revisits"]  # the 2nd and 3rd passes above observed frozen samples
    sel.observe_stats(plan, geko_core.sample_stats(logits, labels[plan]))
    assert sel.metrics()["geko/failed_revisits"] == 40 and sel.metrics()["geko/revisits"] == before + 80
    counts = sel.table.bucket_counts()
    assert counts["FREEZE"] == 360 and counts["HARD"] == 40  # back in training at once
    sel.set_epoch(5)
    sel.plan()
    assert sel.policy.forgetting == pytest.approx(0.25)  # smoothed: 0.5 * 0 + 0.5 * (40 / 80)
    assert sel.metrics()["geko/rates"][geko_core.BUCKET_FREEZE] == pytest.approx(0.7)
    # Resume keeps the measurement.
    other = Selector(400, policy="geko", epochs=10, seed=0, config=geko_core.GekoConfig(q_alpha=0.9), policy_options=guard)
    other.load_state_dict(sel.state_dict())
    assert other.policy.forgetting == pytest.approx(0.25) and other.metrics()["geko/revisits"] == before + 80
    # Without the guard, the curriculum's 5% and no full-data final phase.
    plain = Selector(400, policy="geko", epochs=10, seed=0, config=geko_core.GekoConfig(q_alpha=0.9), policy_options={"guard": False})
    for _ in range(3):
        plain.observe_stats(idx, geko_core.sample_stats(right, labels))
    plain.set_epoch(9)
    assert len(plain.plan()[0]) == 20


def test_sampler_length_has_no_side_effects_and_epochs_move_as_in_distributed_sampler():
    sel = Selector(100, policy="uniform", epochs=3, seed=0)
    assert len(sel.sampler) == 100 and len(sel.sampler) == 100 and sel.epoch == 0 and sel.history == []
    first = list(sel.sampler)
    assert sorted(first) == list(range(100))
    # Iterated but never trained on: iterating again gives the same epoch (nothing was consumed).
    assert list(sel.sampler) == first and sel.epoch == 0
    sel.sampler.set_epoch(1)
    second = list(sel.sampler)
    assert sel.epoch == 1 and sorted(second) == list(range(100)) and second != first
    sel.sampler.set_epoch(0)
    assert list(sel.sampler) == first  # deterministic in (seed, epoch)
    # Training through an epoch moves to the next one at its last batch; len() then answers
    # for the new epoch without moving again.
    for start in range(0, 100, 25):
        idx = torch.tensor(first[start : start + 25])
        sel.loss(torch.randn(25, 3), idx % 3, idx)
    assert sel.epoch == 1 and len(sel.sampler) == 100 and sel.epoch == 1
    assert list(sel.sampler) == second


def test_with_index():
    ds = WithIndex(TensorDataset(torch.arange(5.0), torch.arange(5)))
    assert ds[3] == (3, torch.tensor(3.0), torch.tensor(3)) and len(ds) == 5
    assert WithIndex([10, 11])[1] == (1, 11)
    with pytest.raises(TypeError, match="map-style"):
        WithIndex(iter([1, 2]))


def _run(sel, model, opt, loader, stop_after=None, record=None):
    steps = 0
    for idx, x, y in loader:
        if record is not None:
            record.extend(idx.tolist())
        loss = sel.loss(model(x), y, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        if stop_after is not None and steps == stop_after:
            return True
    return False


@pytest.mark.parametrize("policy", ["geko", "infobatch"])
def test_resume_mid_epoch_is_exact(policy):
    ds = WithIndex(TensorDataset(*TRAIN))

    def fresh():
        model = make_model(3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sel = Selector(len(ds), policy=policy, epochs=4, seed=7)
        return model, opt, sel, DataLoader(ds, batch_size=50, sampler=sel.sampler)

    model, opt, sel, loader = fresh()
    full_order: list[int] = []
    for _ in range(4):
        _run(sel, model, opt, loader, record=full_order)
    reference_table = sel.table.state_dict()

    model, opt, sel, loader = fresh()
    order: list[int] = []
    _run(sel, model, opt, loader, record=order)
    _run(sel, model, opt, loader, stop_after=7, record=order)  # stop inside epoch 1
    saved = (sel.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())

    model, opt, sel, loader = fresh()
    sel.load_state_dict(saved[0])
    model.load_state_dict(saved[1])
    opt.load_state_dict(saved[2])
    _run(sel, model, opt, loader, record=order)  # the rest of epoch 1
    for _ in range(2):
        _run(sel, model, opt, loader, record=order)
    assert order == full_order
    for key, value in reference_table.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(sel.table.state_dict()[key], value, err_msg=key)


def test_bad_input_is_refused_and_changes_nothing():
    sel = Selector(50, policy="geko", epochs=2)
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    sel.loss(logits, labels, torch.tensor([0, 1, 2, 3]))
    before = sel.state_dict()
    with pytest.raises(TypeError, match="WithIndex"):
        sel.loss(logits, labels, torch.randn(4))
    with pytest.raises(ValueError, match="WithIndex"):
        sel.loss(logits, labels, torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError, match="50"):
        sel.loss(logits, labels, torch.tensor([0, 1, 2, 50]))
    with pytest.raises(IndexError, match="-1"):  # a batch off the plan is range-checked
        sel.loss(logits, labels, torch.tensor([4, -1, 5, 6]))
    fresh = Selector(50, policy="geko", epochs=2)
    with pytest.raises(IndexError, match="50"):  # a batch that would start the epoch
        fresh.loss(logits, labels, torch.tensor([0, 1, 2, 50]))
    assert fresh.position == 0 and fresh._epochs.plan is None
    with pytest.raises(ValueError):
        sel.loss(logits, torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="meta-batch"):
        sel.select(torch.tensor([0, 1, 2, 3]), logits, labels)
    after = sel.state_dict()
    for key in ("epoch", "step", "counters"):
        assert after[key] == before[key]
    assert after["epoch_plan"]["position"] == before["epoch_plan"]["position"] == 4
    for key, value in before["table"].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after["table"][key], value)
    other = Selector(51, policy="geko", epochs=2)
    with pytest.raises(ValueError, match="different dataset"):
        other.load_state_dict(before)
    with pytest.raises(ValueError, match="policy"):
        Selector(50, policy="uniform", epochs=2).load_state_dict(before)
    with pytest.raises(ValueError, match="exactly one"):
        Selector(50, policy="geko")
    with pytest.raises(ValueError, match="unknown policy"):
        Selector(50, policy="magic", epochs=1)


def test_custom_policy_object():
    class EveryOther(Policy):
        name = "every_other"

        def plan_epoch(self, context, epoch, progress):
            idx = np.arange(epoch % 2, context.num_samples, 2, dtype=np.int64)
            return Plan(idx, np.full(len(idx), 2.0, dtype=np.float32))

    sel = Selector(10, policy=EveryOther(), epochs=2)
    assert list(sel.sampler) == [0, 2, 4, 6, 8]
    assert sel.weights(torch.tensor([0, 2])).tolist() == [2.0, 2.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sel = Selector(64, policy="geko", epochs=2, seed=3)
        seen = []
        g = torch.Generator().manual_seed(100 + rank)
        for idx in sel.sampler:
            seen.append(idx)
        # feed the rank's shard in batches of 8 with deterministic fake logits
        for start in range(0, len(seen), 8):
            idx = torch.tensor(seen[start : start + 8])
            logits = torch.randn(len(idx), 5, generator=g)
            labels = idx % 5
            sel.observe(idx, logits, labels)
        np.save(os.path.join(out_dir, f"shard{rank}.npy"), np.asarray(seen))
        torch.save(sel.table.state_dict(), os.path.join(out_dir, f"table{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_share_one_table(tmp_path):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    shards = [np.load(tmp_path / f"shard{r}.npy") for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 32
    assert not set(shards[0]) & set(shards[1]) and sorted(np.concatenate(shards)) == list(range(64))
    tables = [torch.load(tmp_path / f"table{r}.pt", weights_only=False) for r in range(2)]
    for key, value in tables[0].items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(tables[1][key], value, err_msg=key)
    # One process fed the same samples in rank order holds the same table.
    single = Selector(64, policy="geko", epochs=2, seed=3, num_replicas=1, rank=0)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for start in range(0, 32, 8):
        for r in range(2):
            idx = torch.from_numpy(shards[r][start : start + 8])
            logits = torch.randn(len(idx), 5, generator=gens[r])
            stats = geko_core.sample_stats(logits, idx % 5)
            single.table.update(idx.numpy(), stats.loss.numpy(), stats.confidence.numpy(), stats.correct.numpy(), 0)
    ref = single.table.state_dict()
    for key in ("q", "loss_ema", "bucket", "visits"):
        if key in ref:
            np.testing.assert_array_equal(tables[0][key], ref[key], err_msg=key)


def test_geko_budget_caps_the_expected_epoch():
    model, sel = train("geko", epochs=4, policy_options={"budget": 0.3})
    lengths = [h["epoch_backpropagated"] for h in sel.history]
    assert lengths[0] == 1200  # UNSEEN samples are always drawn once
    # every later epoch is about 30% of the data (binomial noise allowed)
    assert all(abs(n - 360) < 60 for n in lengths[1:]), lengths
    assert accuracy(model) >= 0.85
    with pytest.raises(ValueError, match="budget"):
        Selector(10, policy="geko", epochs=1, policy_options={"budget": 1.5})


def test_tokens_are_counted_and_budgets_can_be_set_in_tokens():
    """For language models compute is paid in (response) tokens: counted from the statistics,
    and the random subset and GEKO can be budgeted in them."""
    n, t, v = 40, 6, 7
    g = torch.Generator().manual_seed(0)
    lengths = 1 + torch.arange(n) % 5  # response tokens per sample
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[torch.arange(t)[None, :] < (t - lengths)[:, None]] = -100  # the prompt is masked
    sel = Selector(n, policy="uniform", epochs=2, sample_tokens=lengths.numpy())
    for idx in torch.tensor(list(sel.sampler)).split(8):
        sel.loss(torch.randn(len(idx), t + 1, v, generator=g), torch.cat([labels[idx], torch.full((len(idx), 1), -100)], 1), idx, shift=True)
    m = sel.metrics()
    # With shift=True the label of position t+1 is predicted at position t: every response token counts.
    assert m["forwarded_tokens"] == m["backpropagated_tokens"] == int(lengths.sum())
    assert m["saved_token_fraction"] == pytest.approx(0.0, abs=1e-12)

    tokens = np.where(np.arange(1000) < 100, 50, 1)  # 10% of the samples hold 5000 of 5900 tokens
    subset = Selector(1000, policy="random_subset", epochs=1, sample_tokens=tokens, policy_options={"budget": 0.3, "unit": "tokens"})
    chosen, _ = subset.plan()
    assert 0.3 * tokens.sum() <= tokens[chosen].sum() <= 0.3 * tokens.sum() + 50
    with pytest.raises(ValueError, match="sample_tokens"):
        Selector(1000, policy="random_subset", epochs=1, policy_options={"unit": "tokens"})
    with pytest.raises(ValueError, match="shape"):
        Selector(10, policy="uniform", epochs=1, sample_tokens=np.ones(9, dtype=np.int64))

    geko = Selector(1000, policy="geko", epochs=4, sample_tokens=tokens, policy_options={"budget": 0.5, "budget_unit": "tokens"})
    idx = np.arange(1000)
    y = torch.from_numpy(idx % 3)
    geko.observe_stats(idx, geko_core.sample_stats(torch.randn(1000, 3, generator=g), y))
    geko.set_epoch(1)
    plans = [geko.epoch_plan.indices.copy()]
    for epoch in range(2, 3):
        geko.set_epoch(epoch)
        plans.append(geko.epoch_plan.indices.copy())
    spent = [tokens[p].sum() / tokens.sum() for p in plans]
    assert all(s < 0.6 for s in spent), spent  # about half the tokens (binomial noise), never the 100% of no budget


# -- reads change nothing; an epoch is planned once, at its start ----------------------------------


def _snapshot(sel):
    """Everything a read could change, as bytes."""
    import pickle

    return pickle.dumps((sel.state_dict(), sel.policy.state_dict(), sel.table.records().tobytes(), sel.history))


def _read_everything(sel):
    for _ in range(3):
        out = (
            len(sel.sampler), sel.remaining, sel.epoch_plan.indices.tobytes(), sel.position, sel.epoch_consumed,
            sel.progress(), sel.epoch_progress(), sel.sampler.state_dict(), {k: v for k, v in sel.metrics().items() if k != "seconds"},
        )
    return out


@pytest.mark.parametrize("policy,options", [("geko", {"freeze_streak": 2, "stall_visits": 1}), ("gainrl", None), ("infobatch", None), ("grace", {"warmup_epochs": 1, "budget": 0.5})])
def test_reads_change_nothing_and_the_epoch_is_planned_at_its_start(policy, options):
    g = torch.Generator().manual_seed(0)
    sel = Selector(64, policy=policy, epochs=4, seed=1, policy_options=options, config=geko_core.GekoConfig(q_alpha=0.6))
    if policy == "gainrl":
        sel.policy.set_angles(np.arange(64), np.linspace(0, 1, 64, dtype=np.float32))
    targets = torch.arange(64) % 4
    for epoch in range(3):
        # Between epochs (the last one consumed, this one not started) and in the middle of one.
        for stop in (0, 2):
            before = _snapshot(sel)
            first, second = _read_everything(sel), _read_everything(sel)
            assert _snapshot(sel) == before and str(first) == str(second), (epoch, stop)
            if stop == 0:
                previewed = sel.epoch_plan.indices.copy()
                assert sel.state_dict()["epoch_plan"] is None  # not started: reads did not plan it
                order = torch.tensor(list(sel.sampler))  # the start
                assert order.tolist() == previewed.tolist() and len(sel.sampler) == len(order) == sel.remaining
                batches = order.split(8)
                for idx in batches[:2]:
                    logits = torch.randn(len(idx), 4, generator=g) + 3 * F.one_hot(targets[idx], 4) * epoch
                    sel.loss(logits, targets[idx], idx)
        for idx in batches[2:]:
            sel.loss(torch.randn(len(idx), 4, generator=g) + 3 * F.one_hot(targets[idx], 4) * epoch, targets[idx], idx)
        assert sel.epoch == epoch + 1 and len(sel.history) == epoch + 1


def test_a_bad_batch_that_would_start_an_epoch_changes_nothing():
    sel = Selector(32, policy="geko", epochs=2, seed=0, policy_options={"freeze_streak": 2, "stall_visits": 1})
    before = _snapshot(sel)
    with pytest.raises(ValueError, match="label"):
        sel.loss(torch.zeros(8, 3), torch.full((8,), 7), torch.arange(8))
    assert _snapshot(sel) == before and sel.state_dict()["epoch_plan"] is None


# -- the one loss path's contract ------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["geko", "infobatch", "uniform", "random_subset"])
def test_loss_observes_what_observe_stats_would_and_returns_the_weighted_loss(policy):
    """``loss`` = the plan-weighted cross-entropy (value and gradient), and its bookkeeping
    (table, counters, policy) is that of ``observe_stats`` with the same statistics."""
    config = geko_core.GekoConfig(q_alpha=0.6)  # FREEZE within a few epochs, so revisits happen
    a = Selector(96, policy, epochs=6, seed=3, config=config)
    b = Selector(96, policy, epochs=6, seed=3, config=config)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(96, 5, generator=g)
    targets = torch.randint(0, 5, (96,), generator=g)
    for epoch in range(6):
        order = torch.tensor(list(a.sampler))
        assert order.tolist() == list(b.sampler)
        for idx in order.split(16):
            logits = base[idx] + 2.0 * epoch * F.one_hot(targets[idx], 5)
            weights = a.weights(idx)
            x = logits.clone().requires_grad_(True)
            loss = a.loss(x, targets[idx], idx)
            loss.backward()
            y = logits.clone().requires_grad_(True)
            expected = (F.cross_entropy(y, targets[idx], reduction="none") * weights).sum() / len(idx)
            expected.backward()
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)
            b.observe_stats(idx, geko_core.sample_stats(logits, targets[idx]))
    assert np.array_equal(a.table.records(), b.table.records())
    ma, mb = a.metrics(), b.metrics()
    for key in ("epoch", "step", "buckets", "forwarded", "backpropagated", "forwarded_tokens", "backpropagated_tokens"):
        assert ma[key] == mb[key], key
    assert {k: v for k, v in ma.items() if k.startswith(policy + "/")} == {k: v for k, v in mb.items() if k.startswith(policy + "/")}
    if policy == "geko":
        assert ma["buckets"]["FREEZE"] > 0 and ma["geko/revisits"] > 0  # the guard's count was exercised


def test_loss_with_a_bad_label_changes_nothing_and_the_batch_can_be_retried():
    sel = Selector(32, "geko", epochs=2, seed=0)
    order = torch.from_numpy(np.fromiter(iter(sel.sampler), dtype=np.int64))
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[:8])
    before = _snapshot(sel)
    with pytest.raises(ValueError, match="label 3 at"):
        sel.loss(torch.zeros(8, 3), torch.tensor([0, 1, 2, 3, 0, 0, 0, 0]), order[8:16])
    assert _snapshot(sel) == before and sel.metrics()["backpropagated"] == 8
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[8:16])
    assert sel.metrics()["backpropagated"] == 16 and sel.position == 16
