"""Statistics and index tensors on a GPU are read one step late (no host synchronisation per
step). There is no GPU here: ``Selector._defer_host_indices`` sends CPU index tensors down the
same path, and ``Selector._host_copy`` replaces the pinned copies and CUDA events with a
recording stand-in, so that the queue's device mechanics run on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geko_core import Selector
from geko_core._queue import DeviceIndices, HostCopy, StatsQueue


class FakeEvent:
    def __init__(self) -> None:
        self.waited = False

    def synchronize(self) -> None:
        self.waited = True


class FakeCopy(HostCopy):
    """A device's host copy on CPU: copies now (as a finished async copy would) and records
    which events the host waited on."""

    def __init__(self) -> None:
        self.copies = 0
        self.events: list[FakeEvent] = []

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        self.copies += 1
        return tensor.clone()

    def record(self) -> FakeEvent:
        self.events.append(FakeEvent())
        return self.events[-1]


def _run(defer: bool, *, policy: str = "geko", epochs: int = 3, num_samples: int = 50, batch: int = 8, swap_at=None, copier=None):
    torch.manual_seed(0)
    sel = Selector(num_samples, policy=policy, epochs=epochs, seed=3, batch_size=batch)
    sel._defer_host_indices = defer
    sel._host_copy = copier
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


@pytest.mark.parametrize("policy", ["geko", "infobatch"])
def test_statistics_copied_from_a_device_train_exactly_as_host_statistics(policy):
    host, host_losses = _run(False, policy=policy)
    copier = FakeCopy()
    late, late_losses = _run(True, policy=policy, copier=copier)
    assert late_losses == host_losses and copier.copies > 0 and all(e.waited for e in copier.events)
    assert np.array_equal(host.table.records(), late.table.records())
    assert [h["epoch_length"] for h in host.history] == [h["epoch_length"] for h in late.history]


def test_the_queue_applies_a_device_batch_exactly_one_step_late():
    seen = []
    copier = FakeCopy()
    queue = StatsQueue(seen.append, 10)

    def push(indices, step):
        idx = DeviceIndices(torch.tensor(indices), copier=copier)
        idx.start_copy(expected=np.array(indices))
        rows = [torch.full((len(indices),), float(step)) for _ in range(4)]
        queue.push(idx, rows, step, 0, copier)
        rows[0].fill_(-1.0)  # the source changes after the push: the copy was taken at the push

    push([0, 1], 1)
    queue.apply(keep_last=True)
    assert seen == [] and len(queue) == 1 and not any(e.waited for e in copier.events)
    push([2, 3], 2)
    queue.apply(keep_last=True)
    assert [b.indices.tolist() for b in seen] == [[0, 1]] and seen[0].loss.tolist() == [1.0, 1.0] and seen[0].step == 1
    assert [e.waited for e in copier.events] == [True, True, False, False]  # batch 1's index and row copies
    queue.apply()
    assert [b.indices.tolist() for b in seen] == [[0, 1], [2, 3]] and len(queue) == 0 and all(e.waited for e in copier.events)


def test_the_selector_applies_device_batches_one_step_late_and_all_at_the_epoch_end_or_state_dict():
    sel = Selector(24, policy="geko", epochs=2, seed=0)
    sel._defer_host_indices = True
    sel._host_copy = copier = FakeCopy()
    order = torch.from_numpy(sel.plan()[0])
    batches = order.split(8)
    visits = lambda: sel.table.field("visits")  # noqa: E731
    labels = torch.zeros(8, dtype=torch.long)
    sel.loss(torch.randn(8, 3), labels, batches[0])
    assert visits().sum() == 0  # in flight
    sel.metrics(), len(sel.sampler), sel.remaining  # reads apply nothing
    assert visits().sum() == 0
    sel.loss(torch.randn(8, 3), labels, batches[1])
    assert visits()[batches[0]].tolist() == [1] * 8 and visits()[batches[1]].sum() == 0
    state = sel.state_dict()  # applies everything queued, and saves it
    assert visits()[batches[1]].tolist() == [1] * 8 and state["table"]["visits"][batches[1]].tolist() == [1] * 8
    sel.loss(torch.randn(8, 3), labels, batches[2])  # the epoch's last batch: the epoch ends, all applied
    assert sel.epoch == 1 and visits().sum() == 24 and len(sel.history) == 1 and copier.copies > 0


def test_a_device_batch_that_was_not_the_plans_is_reported_one_step_later():
    sel = Selector(24, policy="uniform", epochs=2, seed=0)
    sel._defer_host_indices = True
    sel._host_copy = FakeCopy()
    order = torch.from_numpy(sel.plan()[0])
    labels = torch.zeros(8, dtype=torch.long)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel.loss(torch.randn(8, 3), labels, order[:8].flip(0))  # reordered: assumed at the plan's position
    with pytest.warns(RuntimeWarning, match="not the plan's next batch"):
        sel.loss(torch.randn(8, 3), labels, order[8:16])
    assert sel.table.field("visits")[order[:8]].tolist() == [1] * 8  # recorded under its own indices


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
