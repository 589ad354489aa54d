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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, defer: bool) -> None:
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        sel = Selector(29, policy="geko", epochs=3, seed=1, batch_size=4)  # 29: padding copies on one rank
        sel._defer_host_indices = defer
        data = torch.randn(29, 4, generator=torch.Generator().manual_seed(5))
        targets = (data[:, 1] > 0).long()
        head = torch.nn.Linear(4, 2)
        for _ in range(3):
            order = sel.epoch_plan.indices.copy()
            for start in range(0, len(order), 4):
                idx = torch.from_numpy(order[start : start + 4])
                sel.loss(head(data[idx]), targets[idx], idx).backward()
        state = sel.table.state_dict()
        np.savez(os.path.join(out_dir, f"{'late' if defer else 'host'}{rank}.npz"), **{k: state[k] for k in ("bucket", "visits", "last_step", "q")})
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_full_batches_without_reading_lengths(tmp_path):
    import torch.multiprocessing as mp

    for defer in (False, True):
        mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), defer), nprocs=2, join=True)
    tables = {(kind, r): np.load(tmp_path / f"{kind}{r}.npz") for kind in ("host", "late") for r in range(2)}
    for name in ("bucket", "visits", "last_step", "q"):
        reference = tables[("host", 0)][name]
        for key in tables:
            assert np.array_equal(tables[key][name], reference), (key, name)
    # Padding copies never update the table: 29 samples, each visited at most once per epoch copy.
    assert tables[("late", 0)]["visits"].sum() == tables[("host", 0)]["visits"].sum()
