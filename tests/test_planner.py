import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import geko_core.planner as planner_mod
from geko_core.curriculum import MountainCurriculum
from geko_core.planner import (
    EpochPlan,
    EpochPlanner,
    gainrl_update_mu,
    gaussian_window_plan,
    infobatch_plan,
    random_permutation,
    weighted_sample,
)

FREEZE, LIGHT, FOCUS, HARD, UNSEEN = range(5)
# Frequencies are compared with their expectation within Z binomial standard deviations;
# with a few hundred checks per test, 5 sigma keeps a false alarm below ~1e-4 at a fixed seed
# while a wrong rate (a few percent off on thousands of draws) still fails.
Z = 5.0


def mixed_buckets(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(5, size=n, p=[0.3, 0.2, 0.25, 0.15, 0.1]).astype(np.int8)


def copies_per_sample(indices: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(indices, minlength=n)


def numpy_pps_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """Reference: pi = min(1, c w) with sum(pi) = k, capping iterated (plain numpy)."""
    w = np.asarray(w, dtype=np.float64)
    capped = np.zeros(w.shape, dtype=bool)
    while True:
        scale = (k - capped.sum()) / w[~capped].sum()
        new = ~capped & (w * scale >= 1.0)
        if not new.any():
            break
        capped |= new
    return np.where(capped, 1.0, w * scale)


# -- EpochPlanner: inclusion, weights, unbiasedness ---------------------------------------------


def test_copies_are_floor_or_ceil_and_weights_are_one_over_rate():
    n = 500
    buckets = mixed_buckets(n)
    rates = (0.2, 0.3, 1.0, 2.5, 1.0)
    plan = EpochPlanner(n, seed=3).plan(buckets, rates, epoch=0)
    copies = copies_per_sample(plan.indices, n)
    for b in (LIGHT, FOCUS, HARD, UNSEEN):
        c = copies[buckets == b]
        assert c.min() >= math.floor(rates[b]) and c.max() <= math.ceil(rates[b])
        assert np.all(plan.weights[buckets[plan.indices] == b] == np.float32(1.0 / rates[b]))
    n_freeze = int((buckets == FREEZE).sum())
    k = math.ceil(0.2 * n_freeze)
    assert copies[buckets == FREEZE].sum() == k and copies[buckets == FREEZE].max() == 1
    assert np.all(plan.weights[buckets[plan.indices] == FREEZE] == np.float32(n_freeze / k))
    assert plan.bucket_draws == tuple(int(copies[buckets == b].sum()) for b in range(5))
    assert plan.epoch_size == len(plan) == copies.sum()


def test_inclusion_frequencies_match_rates():
    """2000 epochs on N=200: mean copies of every sample against its rate."""
    n, epochs = 200, 2000
    buckets = mixed_buckets(n, seed=1)
    rates = (0.1, 0.3, 1.0, 2.5, 0.7)
    planner = EpochPlanner(n, seed=11)
    counts = np.zeros(n)
    for epoch in range(epochs):
        counts += copies_per_sample(planner.plan(buckets, rates, epoch=epoch).indices, n)
    mean = counts / epochs
    for b in (LIGHT, FOCUS, HARD, UNSEEN):
        frac = rates[b] - math.floor(rates[b])
        sd = math.sqrt(frac * (1 - frac) / epochs)
        got = mean[buckets == b]
        if sd == 0:
            assert np.all(got == rates[b])
        else:
            assert np.all(np.abs(got - rates[b]) < Z * sd), (b, got.min(), got.max())
            # pooled over the bucket: sensitive to a rate off by ~1%
            assert abs(got.mean() - rates[b]) < Z * sd / math.sqrt(got.size), (b, got.mean())
    # FREEZE without last_visit_step: a uniformly random k of n_freeze each epoch
    n_freeze = int((buckets == FREEZE).sum())
    p = math.ceil(0.1 * n_freeze) / n_freeze
    got = mean[buckets == FREEZE]
    assert np.all(np.abs(got - p) < Z * math.sqrt(p * (1 - p) / epochs)), (got.min(), got.max())


def test_importance_weights_make_the_weighted_sum_unbiased():
    n, epochs = 200, 2000
    buckets = mixed_buckets(n, seed=2)
    values = np.random.default_rng(5).gamma(2.0, size=n)
    rates = MountainCurriculum().rates(0.5)  # PEAK: LIGHT thinned to 0.1, HARD 2.5
    planner = EpochPlanner(n, seed=7, num_replicas=3, rank=0)
    planners = [EpochPlanner(n, seed=7, num_replicas=3, rank=r) for r in range(3)]
    estimates = []
    for epoch in range(epochs):
        total = 0.0
        for p in planners:  # the padded entries weigh 0, so summing over ranks stays unbiased
            plan = p.plan(buckets, rates, epoch=epoch, freeze_revisit=0.2)
            total += float(np.sum(plan.weights.astype(np.float64) * values[plan.indices]))
        estimates.append(total / n)
    estimates = np.array(estimates)
    se = estimates.std() / math.sqrt(epochs)
    assert abs(estimates.mean() - values.mean()) < Z * se
    assert se < 0.05 * values.mean()  # the test has power: the tolerance is a small fraction
    del planner


def test_unweighted_plan_would_be_biased():
    """Sanity check of the statistic above: without the weights the same sum is far off."""
    n = 200
    buckets = mixed_buckets(n, seed=2)
    values = np.random.default_rng(5).gamma(2.0, size=n)
    plan = EpochPlanner(n, seed=7).plan(buckets, MountainCurriculum(min_rate=0.1).rates(0.5), epoch=0)
    weighted = np.sum(plan.weights * values[plan.indices]) / n
    unweighted = np.sum(values[plan.indices]) / n
    assert abs(unweighted - values.mean()) > 3 * abs(weighted - values.mean())


def test_freeze_revisits_stalest_first_with_random_ties():
    n = 100
    buckets = np.full(n, FREEZE, dtype=np.int8)
    buckets[::10] = FOCUS  # 90 frozen
    last_visit = np.arange(n, dtype=np.int64)[::-1].copy()  # higher index = staler
    last_visit[50:60] = 3  # ten ties around the cut
    rates = (0.1, 1.0, 1.0, 1.0, 1.0)  # ceil(0.1 * 90) = 9 revisits
    planner = EpochPlanner(n, seed=0, shuffle=False)
    stalest = set(np.flatnonzero((buckets == FREEZE) & (last_visit < 3)).tolist())  # 97, 98, 99
    tied = set(np.flatnonzero((buckets == FREEZE) & (last_visit == 3)).tolist())  # 51..59 and 96
    assert len(stalest) == 3 and len(tied) == 10
    seen_tie_sets = set()
    for epoch in range(30):
        plan = planner.plan(buckets, rates, epoch=epoch, last_visit_step=last_visit)
        revisited = {int(i) for i in plan.indices if buckets[i] == FREEZE}
        assert len(revisited) == 9
        assert stalest <= revisited  # every strictly staler sample is in
        ties = revisited - stalest
        assert ties <= tied and len(ties) == 6
        seen_tie_sets.add(frozenset(ties))
    assert len(seen_tie_sets) > 5  # ties are broken differently per epoch
    # int32 and int64 last_visit_step plan the same
    a = planner.plan(buckets, rates, epoch=4, last_visit_step=last_visit)
    b = planner.plan(buckets, rates, epoch=4, last_visit_step=last_visit.astype(np.int32))
    assert np.array_equal(a.indices, b.indices)


@pytest.mark.parametrize("fraction, n_freeze, expected", [(0.05, 200, 10), (0.05, 7, 1), (0.0, 50, 0), (1.0, 13, 13), (0.1, 90, 9)])
def test_freeze_revisit_count_rounding(fraction, n_freeze, expected):
    assert planner_mod._C.freeze_revisit_count(fraction, n_freeze) == expected
    buckets = np.full(n_freeze + 3, FREEZE, dtype=np.int8)
    buckets[:3] = FOCUS
    plan = EpochPlanner(len(buckets)).plan(buckets, (fraction, 1, 1, 1, 1), epoch=0)
    assert plan.bucket_draws[FREEZE] == expected


# -- determinism, shards, resume -----------------------------------------------------------------


def test_deterministic_for_seed_and_epoch():
    n = 1000
    buckets = mixed_buckets(n)
    rates = (0.05, 0.5, 1.0, 2.5, 1.0)
    a = EpochPlanner(n, seed=42).plan(buckets, rates, epoch=3)
    b = EpochPlanner(n, seed=42).plan(torch.from_numpy(buckets.astype(np.int64)), list(rates), epoch=3)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.weights, b.weights)
    c = EpochPlanner(n, seed=42).plan(buckets, rates, epoch=4)
    d = EpochPlanner(n, seed=43).plan(buckets, rates, epoch=3)
    assert not np.array_equal(a.indices[:50], c.indices[:50]) and not np.array_equal(a.indices[:50], d.indices[:50])


def test_results_do_not_depend_on_thread_count():
    """Large enough for several chunks and the blocked shuffle; run with 1 and 2 threads."""
    script = (
        "import hashlib, numpy as np\n"
        "from geko_core.planner import EpochPlanner, weighted_sample, infobatch_plan\n"
        "n = 300_000\n"
        "b = np.random.default_rng(0).choice(5, size=n).astype(np.int8)\n"
        "p = EpochPlanner(n, seed=9, num_replicas=2, rank=1).plan(b, (0.05, 0.3, 1, 2.5, 1), epoch=2)\n"
        "w = np.random.default_rng(1).random(n)\n"
        "h = hashlib.sha256()\n"
        "h.update(p.indices.tobytes()); h.update(p.weights.tobytes())\n"
        "for m in ('systematic', 'exponential'):\n"
        "    i, pi = weighted_sample(w, n // 3, seed=4, method=m); h.update(i.tobytes()); h.update(pi.tobytes())\n"
        "q = infobatch_plan(w, epoch=1, num_epochs=10, seed=2); h.update(q.indices.tobytes())\n"
        "print(h.hexdigest())\n"
    )
    digests = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("replicas", [2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shards_interleave_to_the_global_plan(replicas, drop_last):
    n = 301
    buckets = mixed_buckets(n, seed=4)
    rates = (0.1, 0.4, 1.0, 2.0, 1.0)
    whole = EpochPlanner(n, seed=5).plan(buckets, rates, epoch=1)
    m = len(whole)
    shards = [
        EpochPlanner(n, seed=5, num_replicas=replicas, rank=r, drop_last=drop_last).plan(buckets, rates, epoch=1)
        for r in range(replicas)
    ]
    per = m // replicas if drop_last else -(-m // replicas)
    assert all(len(s) == per for s in shards)  # equal lengths
    assert all(s.total_size == per * replicas and s.epoch_size == m for s in shards)
    interleaved = np.stack([s.indices for s in shards], axis=1).reshape(-1)
    weights = np.stack([s.weights for s in shards], axis=1).reshape(-1)
    if drop_last:
        assert np.array_equal(interleaved, whole.indices[: per * replicas])
        assert np.array_equal(weights, whole.weights[: per * replicas])
    else:
        pad = per * replicas - m
        assert np.array_equal(interleaved[:m], whole.indices)
        assert np.array_equal(interleaved[m:], whole.indices[:pad])  # wrap-around padding
        assert np.array_equal(weights[:m], whole.weights) and np.all(weights[m:] == 0)


def test_shards_disjoint_and_covering_without_repeats():
    n = 1200  # every sample at most once: rates <= 1; 1200 draws split evenly over 4 ranks
    buckets = np.full(n, FOCUS, dtype=np.int8)
    shards = [EpochPlanner(n, seed=1, num_replicas=4, rank=r).plan(buckets, (0, 1, 1, 1, 1), epoch=0) for r in range(4)]
    sets = [set(s.indices.tolist()) for s in shards]
    assert all(len(s) == 300 for s in sets)
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(sets, 2))
    assert set().union(*sets) == set(range(n))


def test_shuffle_false_keeps_index_order():
    n = 300
    plan = EpochPlanner(n, shuffle=False).plan(mixed_buckets(n), (0.1, 0.5, 1, 2.5, 1), epoch=0)
    assert np.all(np.diff(plan.indices) >= 0)


def test_resume_mid_epoch():
    """The epoch object resumes from the position *trained*, not from how far it was iterated."""
    n = 500
    plan = EpochPlanner(n, seed=2).plan(mixed_buckets(n), (0.1, 0.5, 1, 2.5, 1), epoch=6)
    full = list(EpochPlan.from_state_dict(plan.state_dict()))
    it = iter(plan)
    first = [next(it) for _ in range(45)]  # a DataLoader reads ahead ...
    plan.advance(37)  # ... of what training consumed
    assert plan.position == 37 and plan.remaining == len(plan) - 37 and not plan.exhausted
    state = plan.state_dict()
    resumed = EpochPlan.from_state_dict(state)
    assert resumed.position == 37 and len(resumed) == len(plan)
    rest_idx, rest_w = resumed.remaining_entries()
    assert np.array_equal(rest_idx, plan.indices[37:]) and np.array_equal(rest_w, plan.weights[37:])
    assert first[:37] + list(resumed) == full
    other = EpochPlanner(n, seed=99).plan(mixed_buckets(n), (0.1, 0.5, 1, 2.5, 1), epoch=0)
    other.load_state_dict(state)
    assert list(other) == full[37:] and other.epoch == 6 and other.exhausted
    other.seek(0)
    assert list(other) == full
    with pytest.raises(ValueError, match="position"):
        other.seek(len(other) + 1)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"indices": []})
    assert other.position == 0 and other.epoch == 6  # the failed load changed nothing
    # A new iteration ends an older one (a DataLoader iterated again restarts its sampler).
    old = iter(other)
    next(old)
    assert list(iter(other))[:1] == full[:1] and list(old) == []
    with pytest.raises(ValueError, match="read-only"):
        plan.indices[0] = 1


# -- weighted sampling without replacement -------------------------------------------------------


WEIGHTS = np.array([8.0, 5.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.0, 2.0, 4.0, 0.1])


def test_systematic_inclusion_is_exact_and_matches_frequencies():
    k, trials = 4, 6000
    counts = np.zeros(len(WEIGHTS))
    for seed in range(trials):
        idx, pi = weighted_sample(WEIGHTS, k, seed=seed)
        assert len(idx) == k and len(set(idx.tolist())) == k
        counts[idx] += 1
        expected = numpy_pps_inclusion(WEIGHTS, k)
        np.testing.assert_allclose(pi, expected[idx], rtol=1e-12)
    expected = numpy_pps_inclusion(WEIGHTS, k)
    assert expected[0] == 1.0 and counts[0] == trials  # capped: always in
    assert counts[8] == 0  # zero weight: never
    sd = np.sqrt(expected * (1 - expected) / trials)
    assert np.all(np.abs(counts / trials - expected) <= Z * sd + 1e-12)


def exact_successive_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """Marginals of sequential draws proportional to the remaining weights (what
    exponential keys and torch.multinomial(replacement=False) sample), by enumeration."""
    n = len(w)
    pi = np.zeros(n)
    for seq in itertools.permutations(range(n), k):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        pi[list(seq)] += prob
    return pi


def test_exponential_keys_match_successive_sampling_and_ht_is_unbiased():
    w = np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.0, 2.0])
    k, trials = 3, 6000
    values = np.array([1.0, 4.0, 2.0, 7.0, 3.0, 100.0, 0.5])  # index 5 has weight 0: excluded below
    counts = np.zeros(len(w))
    ht = []
    for seed in range(trials):
        idx, pi = weighted_sample(w, k, seed=seed, method="exponential")
        assert len(set(idx.tolist())) == k and 5 not in idx
        counts[idx] += 1
        ht.append(np.sum(values[idx] / pi))
    exact = exact_successive_inclusion(w, k)
    sd = np.sqrt(exact * (1 - exact) / trials)
    assert np.all(np.abs(counts / trials - exact) <= Z * sd + 1e-12)
    # not proportional to w: that is why the systematic method is the default
    assert not np.allclose(exact[w > 0], numpy_pps_inclusion(w[w > 0], k))
    ht = np.array(ht)
    truth = values[w > 0].sum()
    assert abs(ht.mean() - truth) < Z * ht.std() / math.sqrt(trials)


def test_weighted_sample_edge_cases():
    idx, pi = weighted_sample(WEIGHTS, 0)
    assert idx.dtype == np.int64 and len(idx) == 0 and pi.dtype == np.float64
    for method in ("systematic", "exponential"):
        idx, pi = weighted_sample(WEIGHTS, 11, method=method)  # all positive weights
        assert sorted(idx.tolist()) == [i for i in range(12) if i != 8] and np.all(pi == 1.0)
    heavy = np.array([1e6, 1.0, 1.0, 1.0])
    idx, pi = weighted_sample(heavy, 2)
    assert 0 in idx.tolist() and pi[idx.tolist().index(0)] == 1.0
    geometric = 2.0 ** -np.arange(60)  # slow capping: falls back to the sorted scan
    idx, pi = weighted_sample(geometric, 40)
    np.testing.assert_allclose(np.sort(pi)[::-1], np.sort(numpy_pps_inclusion(geometric, 40)[idx])[::-1])
    assert len(set(idx.tolist())) == 40
    a = weighted_sample(np.float32(WEIGHTS), 3, seed=5)[0]
    b = weighted_sample(WEIGHTS, 3, seed=5)[0]
    assert np.array_equal(a, b)


# -- InfoBatch and the GAIN-RL window ------------------------------------------------------------


def test_infobatch_prune_rescale_and_anneal():
    n, epochs = 400, 300
    scores = np.random.default_rng(3).exponential(size=n).astype(np.float32)
    well = scores < scores.mean()
    kept = np.zeros(n)
    for epoch in range(epochs):
        plan = infobatch_plan(scores, epoch=epoch % 87, num_epochs=100, seed=epoch)  # epochs < 87.5: pruning
        copies = copies_per_sample(plan.indices, n)
        assert np.all(copies[~well] == 1) and copies.max() == 1
        w = np.zeros(n)
        w[plan.indices] = plan.weights
        assert np.all(w[plan.indices][well[plan.indices]] == 2.0) and np.all(w[~well] == 1.0)
        kept += copies
    frac = kept[well] / epochs
    sd = math.sqrt(0.25 / epochs)
    assert np.all(np.abs(frac - 0.5) < Z * sd)
    assert abs(frac.mean() - 0.5) < Z * sd / math.sqrt(well.sum())
    # anneal: from epoch delta * num_epochs on, the full data with weight 1
    full = infobatch_plan(scores, epoch=88, num_epochs=100, seed=1)
    assert sorted(full.indices.tolist()) == list(range(n)) and np.all(full.weights == 1.0)
    assert len(infobatch_plan(scores, epoch=87, num_epochs=100, seed=1)) < n
    # prune_ratio 0 keeps everything
    assert len(infobatch_plan(scores, epoch=0, num_epochs=100, prune_ratio=0.0)) == n


def test_infobatch_initial_scores_prune_nothing():
    # InfoBatch initialises every score to 3.0: nothing is below the mean
    plan = infobatch_plan(np.full(50, 3.0), epoch=0, num_epochs=10)
    assert sorted(plan.indices.tolist()) == list(range(50)) and np.all(plan.weights == 1)


def test_gaussian_window_frequencies_and_weights():
    m, k, trials = 60, 8, 3000
    order = random_permutation(m, seed=3) + 1000  # sorted order of some dataset indices
    mu, sigma = 20.0, 6.0
    window = np.exp(-((np.arange(m) - mu) ** 2) / (2 * sigma**2))
    expected = numpy_pps_inclusion(window, k)
    position_of = {int(v): j for j, v in enumerate(order)}
    counts = np.zeros(m)
    for seed in range(trials):
        plan = gaussian_window_plan(order, mu=mu, sigma=sigma, num_samples_to_draw=k, seed=seed)
        positions = np.array([position_of[int(i)] for i in plan.indices])
        assert len(set(positions.tolist())) == k
        np.testing.assert_allclose(plan.weights, (1.0 / expected[positions]).astype(np.float32), rtol=1e-6)
        counts[positions] += 1
    sd = np.sqrt(expected * (1 - expected) / trials)
    assert np.all(np.abs(counts / trials - expected) <= Z * sd + 1e-12)


def reference_mu(mu, acc, angle, n=500.0, alpha=2.0, beta=0.5, acc_scale=1.0, adj_min=-math.inf, adj_max=math.inf, size=10_000):
    dmu = n * math.tanh(alpha * (acc / acc_scale - beta)) + n * math.tanh(alpha * angle)
    dmu = min(max(dmu, adj_min), adj_max)
    return min(max(mu + dmu, 0.0), size - 1.0)


def test_gainrl_mu_follows_a_scripted_accuracy_sequence():
    accuracies = [0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.2]
    angles = [0.0, 0.1, -0.2, 0.05, 0.0, 0.3, -0.1]
    mu, ref = 1000.0, 1000.0
    for acc, angle in zip(accuracies, angles):
        mu = gainrl_update_mu(mu, acc, angle, num_positions=10_000, adj_min=-300.0, adj_max=400.0)
        ref = reference_mu(ref, acc, angle, adj_min=-300.0, adj_max=400.0)
        assert mu == pytest.approx(ref, rel=1e-12)
    # accuracy at beta and zero angle: the window stays put
    assert gainrl_update_mu(123.0, 0.5, 0.0, num_positions=1000) == 123.0
    # high accuracy moves the window forward; clamped to the last position
    assert gainrl_update_mu(990.0, 1.0, 1.0, num_positions=1000) == 999.0
    assert gainrl_update_mu(10.0, 0.0, -1.0, num_positions=1000) == 0.0
    assert gainrl_update_mu(0.0, 80.0, 0.0, num_positions=10_000, acc_scale=100.0) == pytest.approx(
        500 * math.tanh(2 * 0.3)
    )


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture
def planner():
    return EpochPlanner(10)


GOOD_RATES = (0.05, 0.5, 1.0, 2.5, 1.0)


def test_bad_buckets_refused(planner):
    b = np.full(10, FOCUS, dtype=np.int8)
    b[7] = 5
    with pytest.raises(ValueError, match=r"buckets\[7\] = 5"):
        planner.plan(b, GOOD_RATES, epoch=0)
    b[7] = -1
    with pytest.raises(ValueError, match=r"buckets\[7\] = -1"):
        planner.plan(b, GOOD_RATES, epoch=0)
    with pytest.raises(ValueError, match=r"buckets\[3\] = 9"):
        planner.plan(np.array([2, 2, 2, 9, 2, 2, 2, 2, 2, 2]), GOOD_RATES, epoch=0)
    with pytest.raises(TypeError, match="integer"):
        planner.plan(np.full(10, 2.0), GOOD_RATES, epoch=0)
    with pytest.raises(ValueError, match="num_samples=10"):
        planner.plan(np.full(11, 2, dtype=np.int8), GOOD_RATES, epoch=0)
    with pytest.raises(ValueError, match="1-D"):
        planner.plan(np.full((2, 5), 2, dtype=np.int8), GOOD_RATES, epoch=0)


@pytest.mark.parametrize(
    "rates, message",
    [
        ((0.05, 0.5, 1.0, 2.5), "5 entries"),
        ((0.05, 0.5, 1.0, 5.5, 1.0), "HARD"),
        ((0.05, -0.1, 1.0, 2.5, 1.0), "LIGHT"),
        ((0.05, 0.5, math.nan, 2.5, 1.0), "FOCUS"),
        ((0.05, 0.5, 1.0, 2.5, math.inf), "UNSEEN"),
        ((1.5, 0.5, 1.0, 2.5, 1.0), "FREEZE"),
        ((0.05, 1e-9, 1.0, 2.5, 1.0), "LIGHT must be 0 or >= 1e-06"),
    ],
)
def test_bad_rates_refused(planner, rates, message):
    with pytest.raises(ValueError, match=message):
        planner.plan(np.full(10, 2, dtype=np.int8), rates, epoch=0)


def test_bad_planner_arguments_refused(planner):
    b = np.full(10, 2, dtype=np.int8)
    for kwargs, error, message in [
        ({"num_replicas": 0}, ValueError, "num_replicas"),
        ({"num_replicas": 3, "rank": 3}, ValueError, "rank"),
        ({"rank": -1}, ValueError, "rank"),
        ({"seed": -1}, ValueError, "seed"),
        ({"seed": 2**64}, ValueError, "seed"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"shuffle": "yes"}, TypeError, "shuffle"),
    ]:
        with pytest.raises(error, match=message):
            EpochPlanner(10, **kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        EpochPlanner(-1)
    with pytest.raises(ValueError, match="epoch"):
        planner.plan(b, GOOD_RATES, epoch=-1)
    with pytest.raises(TypeError, match="last_visit_step"):
        planner.plan(b, GOOD_RATES, epoch=0, last_visit_step=np.zeros(10))
    with pytest.raises(ValueError, match="last_visit_step has 9"):
        planner.plan(b, GOOD_RATES, epoch=0, last_visit_step=np.zeros(9, dtype=np.int64))
    with pytest.raises(ValueError, match="FREEZE"):
        planner.plan(b, GOOD_RATES, epoch=0, freeze_revisit=-0.5)


def test_compiled_core_checks_dtype_and_layout_itself():
    """The bindings refuse what the Python layer would have converted."""
    core = planner_mod._C.EpochPlanner(10, 0, 1, 0, True, False)
    with pytest.raises(TypeError, match="int8"):
        core.plan(np.full(10, 2, dtype=np.int64), [0, 1, 1, 1, 1], 0, None)
    with pytest.raises(ValueError, match="contiguous"):
        core.plan(np.full(20, 2, dtype=np.int8)[::2], [0, 1, 1, 1, 1], 0, None)
    with pytest.raises(ValueError, match="num_samples=10"):
        core.plan(np.full(12, 2, dtype=np.int8), [0, 1, 1, 1, 1], 0, None)
    with pytest.raises(TypeError, match="last_visit_step"):
        core.plan(np.full(10, 2, dtype=np.int8), [0, 1, 1, 1, 1], 0, [1] * 10)
    with pytest.raises(ValueError, match="rank"):
        planner_mod._C.EpochPlanner(10, 0, 2, 2, True, False)
    with pytest.raises(TypeError, match="float32 or float64"):
        planner_mod._C.weighted_sample(np.ones(4, dtype=np.int64), 2, 0, 0, "systematic")


def test_bad_sampling_arguments_refused():
    w = np.ones(5)
    with pytest.raises(ValueError, match="method"):
        weighted_sample(w, 2, method="reservoir")
    with pytest.raises(ValueError, match="k must be in"):
        weighted_sample(np.array([1.0, 0.0, 1.0]), 3)
    with pytest.raises(ValueError, match=r"weights\[2\] = -1"):
        weighted_sample(np.array([1.0, 1.0, -1.0]), 1)
    with pytest.raises(ValueError, match=r"weights\[1\] = nan"):
        weighted_sample(np.array([1.0, np.nan]), 1)
    with pytest.raises(TypeError, match="float"):
        weighted_sample(np.array(["a", "b"]), 1)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        infobatch_plan(np.array([1.0, np.inf]), epoch=0, num_epochs=3)
    with pytest.raises(ValueError, match="prune_ratio"):
        infobatch_plan(w, epoch=0, num_epochs=3, prune_ratio=1.0)
    with pytest.raises(ValueError, match="delta"):
        infobatch_plan(w, epoch=0, num_epochs=3, delta=1.5)
    with pytest.raises(ValueError, match="num_epochs"):
        infobatch_plan(w, epoch=0, num_epochs=0)
    order = np.arange(10)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_window_plan(order, mu=2, sigma=0.0, num_samples_to_draw=2)
    with pytest.raises(ValueError, match="num_samples_to_draw"):
        gaussian_window_plan(order, mu=2, sigma=1.0, num_samples_to_draw=11)
    with pytest.raises(ValueError, match="nonzero window weight"):
        gaussian_window_plan(np.arange(10_000), mu=0, sigma=1.0, num_samples_to_draw=500)
    with pytest.raises(ValueError, match=r"order\[1\] = -4"):
        gaussian_window_plan(np.array([1, -4, 2]), mu=1, sigma=1.0, num_samples_to_draw=1)
    with pytest.raises(ValueError, match="adj_min"):
        gainrl_update_mu(0.0, 0.5, 0.0, num_positions=10, adj_min=5.0, adj_max=1.0)
    with pytest.raises(ValueError, match="num_positions"):
        gainrl_update_mu(0.0, 0.5, 0.0, num_positions=0)
    with pytest.raises(ValueError, match="acc_scale"):
        gainrl_update_mu(0.0, 0.5, 0.0, num_positions=10, acc_scale=0.0)


def test_random_permutation_is_uniform():
    # small n (Fisher-Yates path): all 24 orders of 4 elements equally often
    trials = 4800
    counts: dict[tuple, int] = {}
    for seed in range(trials):
        key = tuple(random_permutation(4, seed=seed).tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 24
    expected = trials / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 23 + Z * math.sqrt(2 * 23)  # df = 23
    # large n (blocked shuffle): a permutation; where element 0 lands is uniform over 8 bins
    n, runs = 70_000, 240
    bins = np.zeros(8)
    for epoch in range(runs):
        p = random_permutation(n, seed=1, epoch=epoch)
        if epoch == 0:
            assert np.array_equal(np.sort(p), np.arange(n))
        bins[int(np.flatnonzero(p == 0)[0]) * 8 // n] += 1
    chi2 = float(((bins - runs / 8) ** 2 / (runs / 8)).sum())
    assert chi2 < 7 + Z * math.sqrt(14)


def test_empty_and_degenerate_plans():
    empty = EpochPlanner(0, num_replicas=2, rank=1).plan(np.zeros(0, dtype=np.int8), GOOD_RATES, epoch=0)
    assert len(empty) == 0 and empty.indices.dtype == np.int64 and empty.weights.dtype == np.float32
    assert list(empty) == []
    frozen = np.zeros(40, dtype=np.int8)
    nothing = EpochPlanner(40).plan(frozen, (0, 1, 1, 1, 1), epoch=0)
    assert len(nothing) == 0 and nothing.epoch_size == 0
    everything = EpochPlanner(40).plan(frozen, (1, 1, 1, 1, 1), epoch=0)
    assert sorted(everything.indices.tolist()) == list(range(40)) and np.all(everything.weights == 1)
    # one draw over three ranks: every rank gets one entry, two of them weightless padding
    single = np.full(5, FREEZE, dtype=np.int8)
    single[2] = HARD
    shards = [EpochPlanner(5, num_replicas=3, rank=r).plan(single, (0, 1, 1, 1, 1), epoch=0) for r in range(3)]
    assert [s.indices.tolist() for s in shards] == [[2], [2], [2]]
    assert [float(s.weights[0]) for s in shards] == [1.0, 0.0, 0.0]
    # a rate of exactly 5 gives five copies of each HARD sample
    five = EpochPlanner(5).plan(single, (0, 1, 1, 5, 1), epoch=0)
    assert five.indices.tolist() == [2] * 5 and np.all(five.weights == np.float32(0.2))


def test_chunks_for_step_based_training():
    n, chunk = 300, 64
    buckets = mixed_buckets(n, seed=8)
    rates = (0.1, 0.4, 1.0, 2.5, 1.0)
    planner = EpochPlanner(n, seed=3, num_replicas=2, rank=1)
    whole = EpochPlanner(n, seed=3).plan(buckets, rates, epoch=2)
    part = EpochPlanner(n, seed=3).plan(buckets, rates, epoch=2, chunk_size=chunk)
    assert np.array_equal(part.indices, whole.indices[:chunk])  # the head of the shuffled epoch
    np.testing.assert_allclose(part.weights, whole.weights[:chunk] * np.float32(whole.epoch_size / chunk), rtol=1e-6)
    assert part.epoch_size == whole.epoch_size and len(planner.plan(buckets, rates, epoch=2, chunk_size=chunk)) == 32
    # unbiased: mean over chunks of the weighted sum, against the dataset sum
    values = np.random.default_rng(1).gamma(2.0, size=n)
    single = EpochPlanner(n, seed=3)
    estimates = np.array([
        np.sum(p.weights * values[p.indices]) / n
        for p in (single.plan(buckets, rates, epoch=e, chunk_size=chunk) for e in range(2000))
    ])
    assert abs(estimates.mean() - values.mean()) < Z * estimates.std() / math.sqrt(len(estimates))
    assert len(single.plan(buckets, rates, epoch=0, chunk_size=0)) == 0
    assert len(single.plan(buckets, rates, epoch=2, chunk_size=10**6)) == whole.epoch_size
    with pytest.raises(ValueError, match="shuffle"):
        EpochPlanner(n, shuffle=False).plan(buckets, rates, epoch=0, chunk_size=5)
    with pytest.raises(ValueError, match="chunk_size"):
        single.plan(buckets, rates, epoch=0, chunk_size=-2)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    codes=st.lists(st.integers(0, 4), max_size=60),
    rates=st.tuples(st.floats(0, 1), *[st.just(0.0) | st.floats(1e-6, 5)] * 4),
    replicas=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 2**40),
)
def test_any_plan_is_consistent(codes, rates, replicas, drop_last, seed, epoch):
    buckets = np.array(codes, dtype=np.int8)
    n = len(buckets)
    whole = EpochPlanner(n, seed=seed).plan(buckets, rates, epoch=epoch)
    copies = copies_per_sample(whole.indices, n) if n else np.zeros(0, dtype=np.int64)
    for b in (LIGHT, FOCUS, HARD, UNSEEN):
        c = copies[buckets == b]
        assert np.all((c >= math.floor(rates[b])) & (c <= math.ceil(rates[b])))
        sel = buckets[whole.indices] == b
        assert not sel.any() if rates[b] == 0 else np.all(whole.weights[sel] == np.float32(1.0 / rates[b]))
    n_freeze = int((buckets == FREEZE).sum())
    assert copies[buckets == FREEZE].sum() == planner_mod._C.freeze_revisit_count(rates[FREEZE], n_freeze)
    shards = [
        EpochPlanner(n, seed=seed, num_replicas=replicas, rank=r, drop_last=drop_last).plan(buckets, rates, epoch=epoch)
        for r in range(replicas)
    ]
    assert len({len(s) for s in shards}) == 1
    interleaved = np.stack([s.indices for s in shards], axis=1).reshape(-1) if len(shards[0]) else np.zeros(0, np.int64)
    m = min(len(interleaved), len(whole))
    assert np.array_equal(interleaved[:m], whole.indices[:m])
