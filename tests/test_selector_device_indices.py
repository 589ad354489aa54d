"""Index tensors on a GPU are read one step late (no host synchronisation per step). There is
no GPU here: ``Selector._defer_host_indices`` sends CPU index tensors down the same path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geko_core import Selector


def _run(defer: bool, *, policy: str = "geko", epochs: int = 3, num_samples: int = 50, batch: int = 8, swap_at=None):
    torch.manual_seed(0)
    sel = Selector(num_samples, policy=policy, epochs=epochs, seed=3, batch_size=batch)
    sel._defer_host_indices = defer
    data = torch.randn(num_samples, 4)
    targets = (data[:, 0] > 0).long()
    head = torch.nn.Linear(4, 2)
    losses = []
    for epoch in range(epochs):
        order = sel.epoch_plan.indices.copy()
        batches = [order[i : i + batch] for i in range(0, len(order), batch)]
        for b, idx in enumerate(batches):
            if swap_at == (epoch, b):
                idx = idx[::-1].copy()  # the loop reordered this batch
            idx_t = torch.from_numpy(idx)
            loss = sel.loss(head(data[idx_t]), targets[idx_t], idx_t)
            loss.backward()
            losses.append(float(loss.detach()))
    return sel, losses


@pytest.mark.parametrize("policy", ["geko", "infobatch", "uniform"])
def test_deferred_indices_train_exactly_as_host_indices(policy):
    host, host_losses = _run(False, policy=policy)
    late, late_losses = _run(True, policy=policy)
    assert late_losses == host_losses
    a, b = host.table.state_dict(), late.table.state_dict()
    for name in ("bucket", "visits", "last_step", "q", "last_loss"):
        assert np.array_equal(a[name], b[name]), name
    ma, mb = host.metrics(), late.metrics()
    for key in ("forwarded", "backpropagated", "backpropagated_tokens", "buckets", "epoch"):
        assert ma[key] == mb[key], key
    assert [h["epoch_length"] for h in host.history] == [h["epoch_length"] for h in late.history]


def test_a_batch_out_of_plan_order_is_reported_and_still_recorded_under_its_indices():
    host, _ = _run(False, swap_at=(1, 2))
    with pytest.warns(RuntimeWarning, match="not the plan's next batch"):
        late, _ = _run(True, swap_at=(1, 2))
    # The table knows each sample under its own index either way.
    for name in ("visits", "last_step", "bucket"):
        assert np.array_equal(host.table.field(name), late.table.field(name)), name


def test_an_out_of_range_index_raises_when_its_batch_is_applied():
    sel = Selector(20, policy="geko", epochs=2, seed=0)
    sel._defer_host_indices = True
    logits = torch.randn(4, 3)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(IndexError, match="one step after"):
        sel.loss(logits, labels, torch.tensor([0, 1, 2, 99]))


def test_weights_of_the_last_batch_resolve_deferred_indices():
    sel = Selector(20, policy="geko", epochs=2, seed=0)
    sel._defer_host_indices = True
    idx = torch.from_numpy(sel.epoch_plan.indices[:4].copy())
    sel.loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), idx)
    assert torch.equal(sel.weights(idx), torch.ones(4))
