"""GRACE policy: exact kNN graph, propagation, coverage vs importance, real training, resume, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from geko_core import SampleTable, Selector, WithIndex
from geko_core.policies import GracePolicy, StatsBatch
from geko_core.policies.grace import knn_graph

from test_selector import TRAIN, accuracy, make_model


def feed(policy: GracePolicy, indices, el2n, step: int = 0) -> None:
    indices = np.asarray(indices, dtype=np.int64)
    el2n = np.asarray(el2n, dtype=np.float32)
    ones = np.ones(len(indices), dtype=np.float32)
    # The policy's own state is under test; a scratch table takes the default table update.
    policy.observe(StatsBatch(indices, ones, ones * 0.5, ones, el2n, step=step, epoch=policy.epoch), SampleTable(policy.num_samples))


def brute_force(x: torch.Tensor, k: int, rows, valid=None):
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    sim = xn @ xn.T
    sim.fill_diagonal_(-np.inf)
    if valid is not None:
        sim[:, ~valid] = -np.inf
    s, i = torch.topk(sim[rows], k, dim=1)
    return i, s


@pytest.mark.parametrize("block_size", [1, 37, 4096])
def test_knn_graph_is_exact(block_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 7, generator=g)
    rows = torch.tensor([0, 5, 149, 77, 30])
    idx, sim = knn_graph(x, 6, rows=rows, block_size=block_size)
    ref_idx, ref_sim = brute_force(x, 6, rows)
    assert torch.equal(idx, ref_idx)  # random data: no ties
    torch.testing.assert_close(sim.double(), ref_sim, atol=1e-5, rtol=0)
    full_idx, _ = knn_graph(x, 6, block_size=block_size)
    assert torch.equal(full_idx, brute_force(x, 6, torch.arange(150))[0])
    assert not (full_idx == torch.arange(150)[:, None]).any()


def test_knn_graph_respects_valid_and_pads():
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1))
    valid = torch.zeros(10, dtype=torch.bool)
    valid[[1, 2, 3]] = True
    idx, sim = knn_graph(x, 4, valid=valid, block_size=4)
    ref_idx, _ = brute_force(x, 2, torch.tensor([0]), valid)
    assert set(idx[0, :3].tolist()) == {1, 2, 3} and idx[0, 3] == -1 and sim[0, 3] == -np.inf
    assert set(idx[1, :2].tolist()) == {2, 3} and (idx[1, 2:] == -1).all()  # never itself
    assert torch.equal(idx[0, :2], ref_idx[0])


def make(num, **options):
    sel = Selector(num, policy="grace", epochs=10, seed=5, policy_options=options)
    return sel, sel.policy


def test_propagation_rule():
    sel, policy = make(6, stale_after=1, damping=0.25, warmup_epochs=0, budget=0.5)
    # Graph: 0 -> (1, 2); 3 -> (4, 5); 4 -> (3, -1); 5 -> (0, 3)
    policy.set_graph(np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, -1], [0, 3]]))
    feed(policy, [0, 1, 2, 3, 4], [0.9, 0.4, 0.6, 0.2, 0.8])  # seen in round 0
    sel.set_epoch(3)
    feed(policy, [1, 2, 4], [0.3, 0.5, 0.7])  # fresh at round 3; 0 and 3 stale, 5 never seen
    h, used = policy.propagated_scores(3)
    expected = np.array([
        0.25 * np.mean([0.3, 0.5]) + 0.75 * 0.9,  # stale 0: fresh neighbours 1, 2
        0.3, 0.5,  # fresh
        0.25 * 0.7 + 0.75 * 0.2,  # stale 3: fresh neighbour 4 only (5 never seen)
        0.7,  # fresh
        np.mean([0.3, 0.5, 0.7]),  # never seen, no fresh neighbour (0, 3 stale): mean of fresh
    ])
    np.testing.assert_allclose(h, expected, rtol=1e-6)
    assert used == 2
    # Without a graph a stale sample keeps its own last el2n.
    sel2, p2 = make(3, warmup_epochs=0)
    feed(p2, [0, 1], [0.9, 0.1])
    sel2.set_epoch(5)
    np.testing.assert_allclose(p2.propagated_scores(5)[0], [0.9, 0.1, 0.5])


def clustered(num_clusters=10, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(40, 160, num_clusters)
    centers = rng.normal(size=(num_clusters, 16)) * 5.0
    label = np.repeat(np.arange(num_clusters), sizes)
    x = centers[label] + rng.normal(size=(len(label), 16))
    # el2n depends on the cluster: a global top-K by importance would skip the easy clusters.
    el2n = 0.08 * label + 0.1 * rng.random(len(label))
    return torch.from_numpy(x).float(), label, el2n.astype(np.float32), sizes


def test_coreset_covers_every_cluster_and_prefers_high_el2n():
    x, label, el2n, sizes = clustered()
    n = len(label)
    sel, policy = make(n, budget=0.2, diversity=0.3, k=8)
    policy.set_embeddings(np.arange(n), x)
    feed(policy, np.arange(n), el2n)
    sel.set_epoch(1)
    chosen, weights = sel.plan()
    assert len(chosen) == round(0.2 * n) and len(np.unique(chosen)) == len(chosen) and (weights == 1).all()
    per_cluster = np.bincount(label[chosen], minlength=10)
    # Coverage: each cluster gets close to its share (a global top-K would give clusters 0-5 nothing).
    assert (per_cluster >= 0.6 * 0.2 * sizes).all(), (per_cluster, sizes)
    topk = np.argsort(-el2n)[: len(chosen)]
    assert (np.bincount(label[topk], minlength=10) == 0).sum() >= 4  # the contrast is real
    # Importance: inside its cluster a chosen sample is mostly from the high-el2n half.
    upper = np.zeros(n, dtype=bool)
    for c in range(10):
        members = np.flatnonzero(label == c)
        upper[members[el2n[members] >= np.median(el2n[members])]] = True
    assert upper[chosen].mean() >= 0.75
    assert el2n[chosen].mean() > el2n.mean() + 0.02
    assert policy.metrics()["covered"] == policy.metrics()["strata"]


def test_without_embeddings_the_coreset_is_importance_plus_diversity():
    sel, policy = make(200, budget=0.25, diversity=0.2)
    el2n = np.linspace(0, 1, 200)
    feed(policy, np.arange(200), el2n)
    sel.set_epoch(1)
    chosen, _ = sel.plan()
    assert len(chosen) == 50
    assert set(range(160, 200)) <= set(chosen.tolist())  # the top round(0.8 * 50) = 40
    assert (chosen < 160).sum() == 10


def test_only_a_fraction_is_refreshed_per_round():
    sel, policy = make(100, refresh_fraction=0.2, k=4)
    assert len(policy.stale_embeddings()) == 100  # nothing embedded yet: all
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(2))
    policy.set_embeddings(np.arange(100), x)
    sel.plan()
    assert policy.metrics()["graph_rows_refreshed"] == 100  # first build: every row
    sel.set_epoch(1)
    stale = policy.stale_embeddings()
    assert list(stale) == list(range(20))  # all embedded in round 0: ties by index
    x2 = x.clone()
    x2[stale] = torch.randn(20, 5, generator=torch.Generator().manual_seed(3))
    policy.set_embeddings(stale, x2[stale])
    feed(policy, np.arange(100), np.ones(100))
    sel.set_epoch(2)
    sel.plan()
    assert policy.metrics()["graph_rows_refreshed"] == 20
    assert list(policy.stale_embeddings()) == list(range(20, 40))
    ref, _ = brute_force(x2, 4, torch.from_numpy(stale))
    assert np.array_equal(policy.neighbours[stale], ref.numpy())


def test_quotas():
    q = GracePolicy.quotas(np.array([100, 50, 3, 1, 0]), 31)
    assert q.sum() == 31 and (q[:4] >= 1).all() and q[4] == 0
    # exact shares 20.13, 10.06, 0.60, 0.20 -> floors 20, 10, 0, 0 -> at least 1: 20, 10, 1, 1 (32);
    # one too many is taken back from the largest quota.
    np.testing.assert_array_equal(q, [19, 10, 1, 1, 0])
    # too few: exact 4.8, 1.2 (+0 for the empty one) -> floors 4, 1; the remainder goes to 0.8 first.
    np.testing.assert_array_equal(GracePolicy.quotas(np.array([80, 20, 0]), 6), [5, 1, 0])
    np.testing.assert_array_equal(GracePolicy.quotas(np.array([5, 5, 5]), 2), [1, 1, 0])


def test_grace_trains_a_real_model_through_the_selector():
    epochs = 6
    model = make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sel = Selector(len(TRAIN[1]), policy="grace", epochs=epochs, seed=0, policy_options=dict(budget=0.5, k=8))
    loader = DataLoader(WithIndex(TensorDataset(*TRAIN)), batch_size=32, sampler=sel.sampler)
    for _ in range(epochs):
        stale = sel.policy.stale_embeddings()
        with torch.no_grad():  # embeddings: the hidden layer of the current model
            sel.policy.set_embeddings(stale, model[:2](TRAIN[0][stale]))
        for idx, x, y in loader:
            loss = sel.loss(model(x), y, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert accuracy(model) >= 0.88  # uniform reaches about 0.92
    m = sel.metrics()
    assert m["backpropagated"] == 1200 + 5 * 600  # warm-up epoch on everything, then the coreset
    assert m["grace/covered"] == m["grace/strata"] >= 20
    assert np.isfinite(sel.policy.observed).all()


def test_state_dict_round_trip_continues_identically():
    x, label, el2n, _ = clustered(seed=1)
    n = len(label)
    sel, policy = make(n, budget=0.3)
    policy.set_embeddings(np.arange(n), x)
    feed(policy, np.arange(n), el2n)
    sel.plan()
    sel.set_epoch(1)
    first = sel.plan()[0]
    state = sel.state_dict()
    other, other_policy = make(n, budget=0.3)
    other.load_state_dict(state)
    for s in (sel, other):
        s.set_epoch(2)
    np.testing.assert_array_equal(sel.plan()[0], other.plan()[0])
    assert not np.array_equal(first, sel.plan()[0])
    with pytest.raises(ValueError, match="neighbours"):
        other_policy.load_state_dict(dict(state["policy_state"], neighbours=np.full((n, 3), n, np.int64)))
    with pytest.raises(ValueError, match="keys"):
        other_policy.load_state_dict({"observed": state["policy_state"]["observed"]})
    np.testing.assert_array_equal(other_policy.observed, policy.observed)


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(budget=0.0), ValueError),
        (dict(budget=1.2), ValueError),
        (dict(budget="all"), TypeError),
        (dict(k=0), ValueError),
        (dict(refresh_fraction=0.0), ValueError),
        (dict(diversity=1.5), ValueError),
        (dict(damping=-0.1), ValueError),
        (dict(stale_after=-1), ValueError),
        (dict(kmeans_iters=0), ValueError),
        (dict(weighting="heavy"), ValueError),
    ],
)
def test_bad_options(options, error):
    with pytest.raises(error):
        GracePolicy(**options)


def test_bad_input():
    sel, policy = make(20)
    with pytest.raises(ValueError, match="shape"):
        policy.set_embeddings(np.arange(3), torch.zeros(2, 4))
    with pytest.raises(IndexError):
        policy.set_embeddings(np.array([0, 20]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="repeat"):
        policy.set_embeddings(np.array([1, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="finite"):
        policy.set_embeddings(np.array([0, 1]), torch.tensor([[0.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(TypeError):
        policy.set_embeddings(np.array([0, 1]), torch.zeros(2, 4, dtype=torch.int64))
    assert policy.embeddings is None and (policy.embedded_round < 0).all()
    policy.set_embeddings(np.array([0, 1]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="d="):
        policy.set_embeddings(np.array([2]), torch.zeros(1, 3))
    ones = np.ones(2, dtype=np.float32)
    with pytest.raises(ValueError, match="el2n"):
        policy.observe(StatsBatch(np.array([0, 1]), ones, ones, ones), SampleTable(policy.num_samples))
    with pytest.raises(ValueError, match="its own"):
        policy.set_graph(np.tile(np.arange(20)[:, None], (1, 2)))
    with pytest.raises(IndexError):
        policy.set_graph(np.full((20, 2), 20))
    with pytest.raises(ValueError, match="k must"):
        knn_graph(torch.zeros(3, 2), 0)
