"""The small-step CPU path: ``loss.cpu_loss_fast`` (one compiled call forward, one backward)
and ``Selector._loss_fast`` (the Selector's bookkeeping without the general path's
conversions). Each is compared with the general path or the torch reference, exactly where
the output is discrete."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geko_core import GekoConfig, Selector, sample_stats
from geko_core.config import resolve_config
from geko_core.loss import cpu_loss_fast, cross_entropy_with_stats

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # the kernels compute in fp32


def _inputs(shape, dtype, seed=0, ignore_some=True, vocab_hi=None):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_some and labels.numel() > 2:
        labels.view(-1)[1::3] = -100
    return logits, labels


def _reference(logits, labels, weight, *, shift, reduction):
    x = logits.detach().double().clone().requires_grad_(True)
    w = None if weight is None else torch.from_numpy(weight).double()
    loss, stats = cross_entropy_with_stats(x, labels, shift=shift, sample_weight=w, reduction=reduction, backend="reference")
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,shift", [((7, 5), False), ((6, 300), False), ((3, 4, 11), False), ((3, 5, 11), True), ((2, 1, 4), True)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cpu_loss_fast_matches_the_reference(dtype, shape, shift, reduction, weighted):
    logits, labels = _inputs(shape, dtype)
    weight = np.linspace(0.5, 2.0, shape[0]).astype(np.float32) if weighted else None
    x = logits.clone().requires_grad_(True)
    result = cpu_loss_fast(x, labels, weight, ignore_index=-100, shift=shift, reduction=reduction,
                           config=resolve_config(None), inplace=False)
    assert result is not None
    loss, host = result
    loss.backward()
    ref_loss, ref_grad, ref_stats = _reference(logits, labels, weight, shift=shift, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    if ref_stats.valid_tokens.sum() == 0 and reduction == "mean":
        assert math.isnan(float(loss.detach()))
    else:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=TOL[dtype], atol=TOL[dtype])
    tol = TOL[dtype]
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=tol, atol=tol)
    stats = host.stats()
    expected = sample_stats(logits, labels, shift=shift, backend="cpp")
    assert torch.equal(stats.bucket, expected.bucket)
    assert torch.equal(stats.valid_tokens, expected.valid_tokens)
    for name in ("loss", "confidence", "label_prob", "correct", "entropy", "el2n"):
        assert torch.equal(getattr(stats, name).nan_to_num(-7), getattr(expected, name).nan_to_num(-7)), name
    assert host.valid_total == int(expected.valid_tokens.sum())


def test_cpu_loss_fast_inplace_writes_the_gradient_into_the_logits():
    logits, labels = _inputs((9, 13), torch.float32)
    x = logits.clone().requires_grad_(True)
    y = x * 1  # a non-leaf, as the model's output is
    loss, _ = cpu_loss_fast(y, labels, None, ignore_index=-100, shift=False, reduction="mean",
                            config=resolve_config(None), inplace=True)
    loss.backward()
    _, ref_grad, _ = _reference(logits, labels, None, shift=False, reduction="mean")
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args",
    [
        dict(logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.int32)),  # int32 labels
        dict(logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.int64), reduction="none"),
        dict(logits=torch.zeros(4, 3).t(), labels=torch.zeros(3, dtype=torch.int64)),  # strided rows
        dict(logits=torch.zeros(4, 3), labels=torch.zeros(5, dtype=torch.int64)),  # shape mismatch
        dict(logits=torch.zeros(4, 3), labels=torch.zeros(4, dtype=torch.int64), shift=True),  # shift on 2-D
        dict(logits=torch.zeros(4, 1), labels=torch.zeros(4, dtype=torch.int64)),  # one class
        dict(logits=torch.zeros(4, 3, dtype=torch.int32), labels=torch.zeros(4, dtype=torch.int64)),
        dict(logits=[[0.0, 1.0]], labels=torch.zeros(1, dtype=torch.int64)),
    ],
)
def test_cpu_loss_fast_declines_what_it_does_not_handle(args):
    kwargs = dict(ignore_index=-100, shift=False, reduction="mean")
    kwargs.update({k: v for k, v in args.items() if k in kwargs})
    assert cpu_loss_fast(args["logits"], args["labels"], None, config=resolve_config(None), inplace=False, **kwargs) is None


def test_cpu_loss_fast_refuses_an_out_of_range_label_as_the_general_path():
    logits = torch.zeros(3, 2, 4)
    labels = torch.tensor([[0, 1], [2, 9], [0, 0]])
    with pytest.raises(ValueError) as general:
        cross_entropy_with_stats(logits, labels)
    with pytest.raises(ValueError) as fast:
        cpu_loss_fast(logits, labels, None, ignore_index=-100, shift=False, reduction="mean",
                      config=resolve_config(None), inplace=False)
    assert str(fast.value) == str(general.value) and "label 9 at (sample, token) (1, 1)" in str(fast.value)
    with pytest.raises(ValueError, match=r"label -5 at \(sample, token\) \(2, 0\)"):
        cpu_loss_fast(torch.zeros(3, 4), torch.tensor([0, 1, -5]), None, ignore_index=-100, shift=False,
                      reduction="sum", config=resolve_config(None), inplace=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 5),
    tokens=st.integers(0, 4),
    vocab=st.sampled_from([2, 3, 7, 16, 33]),
    flat=st.booleans(),
    shift=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    dtype=st.sampled_from(DTYPES),
    specials=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 50.0]), max_size=2),
    seed=st.integers(0, 1000),
)
def test_cpu_loss_fast_fuzz(batch, tokens, vocab, flat, shift, reduction, dtype, specials, seed):
    shape = (batch, vocab) if flat else (batch, tokens, vocab)
    shift = shift and not flat
    logits, labels = _inputs(shape, dtype, seed=seed)
    flat_view = logits.view(-1)
    for k, value in enumerate(specials):
        if flat_view.numel():
            flat_view[(k * 7) % flat_view.numel()] = value
    x = logits.clone().requires_grad_(True)
    loss, host = cpu_loss_fast(x, labels, None, ignore_index=-100, shift=shift, reduction=reduction,
                               config=resolve_config(None), inplace=False)
    loss.backward()
    expected = sample_stats(logits, labels, shift=shift, backend="reference")
    stats = host.stats()
    assert torch.equal(stats.bucket.long(), expected.bucket.long())
    assert torch.equal(stats.valid_tokens.long(), expected.valid_tokens.long())
    if torch.isfinite(logits.double()).all():
        ref_loss, ref_grad, _ = _reference(logits, labels, None, shift=shift, reduction=reduction)
        torch.testing.assert_close(loss.double(), ref_loss.to(torch.float32).double(), rtol=2e-3, atol=2e-3, equal_nan=True)
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert x.grad.shape == x.shape


# -- the Selector ----------------------------------------------------------------------------------


def _run(selector: Selector, epochs, batch, classes, fast: bool, monkeypatch, seed=0):
    """Train ``epochs`` epochs of a fixed toy problem through ``selector``; with ``fast``
    False the small-step path is switched off, so the general path runs."""
    if not fast:
        monkeypatch.setattr(selector, "_loss_fast", lambda *args, **kwargs: None)
    g = torch.Generator().manual_seed(seed)
    n = selector.num_samples
    base = torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    losses, grads = [], []
    for epoch in range(epochs):
        selector.set_epoch(epoch)
        order = torch.from_numpy(np.fromiter(iter(selector.sampler), dtype=np.int64))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            # A sample's logits drift towards its label as it is trained: buckets move.
            logits = (base[idx] + 2.0 * epoch * torch.nn.functional.one_hot(targets[idx], classes)).requires_grad_(True)
            loss = selector.loss(logits, targets[idx], idx)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(logits.grad.clone())
    return losses, grads


@pytest.mark.parametrize("policy", ["geko", "infobatch", "uniform", "random_subset"])
def test_selector_fast_path_equals_the_general_path(policy, monkeypatch):
    results = []
    for fast in (True, False):
        config = GekoConfig(q_alpha=0.6)  # FREEZE within a few epochs, so revisits happen
        sel = Selector(96, policy, epochs=8, seed=3, config=config)
        losses, grads = _run(sel, 8, 16, 5, fast, monkeypatch)
        results.append((losses, grads, sel.table.records().copy(), sel.metrics(), sel.state_dict()))
    (l1, g1, r1, m1, s1), (l2, g2, r2, m2, s2) = results
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert np.array_equal(r1, r2)
    for key in ("epoch", "step", "buckets", "forwarded", "backpropagated", "forwarded_tokens", "backpropagated_tokens"):
        assert m1[key] == m2[key], key
    assert {k: v for k, v in m1.items() if k.startswith(policy + "/")} == {k: v for k, v in m2.items() if k.startswith(policy + "/")}
    if policy == "geko":
        assert m1["buckets"]["FREEZE"] > 0 and m1["geko/revisits"] > 0  # the guard's count was exercised


def test_selector_fast_path_is_taken_for_the_usual_step(monkeypatch):
    sel = Selector(32, "geko", epochs=2, seed=0)
    calls = []
    original = Selector._loss_fast

    def spy(self, *args):
        out = original(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(Selector, "_loss_fast", spy)
    order = torch.from_numpy(np.fromiter(iter(sel.sampler), dtype=np.int64))
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[:8])
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[8:16])
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int32), order[16:24])  # int32 labels: declined
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[:8])  # not the plan's next batch
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[24:32], weights=torch.ones(8))  # never asked
    assert calls == [True, True, False, False]


def test_selector_fast_path_bad_label_changes_nothing():
    sel = Selector(32, "geko", epochs=2, seed=0)
    order = torch.from_numpy(np.fromiter(iter(sel.sampler), dtype=np.int64))
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[:8])
    before = sel.state_dict()
    records = sel.table.records().copy()
    with pytest.raises(ValueError, match="label 3 at"):
        sel.loss(torch.zeros(8, 3), torch.tensor([0, 1, 2, 3, 0, 0, 0, 0]), order[8:16])
    after = sel.state_dict()
    assert np.array_equal(records, sel.table.records())
    assert after["epoch_plan"]["position"] == before["epoch_plan"]["position"]
    assert sel.metrics()["backpropagated"] == 8
    sel.loss(torch.zeros(8, 3), torch.zeros(8, dtype=torch.int64), order[8:16])  # the batch can be retried
    assert sel.metrics()["backpropagated"] == 16
