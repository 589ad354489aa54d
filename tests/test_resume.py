"""Exact resume in every loader setting, for every policy.

A run stopped anywhere (in the middle of an epoch or at its end), saved with
``Selector.state_dict()`` and continued by a fresh process from that state must train the
same batches, in the same order, and end with the same table as a run never stopped:
with ``drop_last`` true and false, ``num_workers`` 0 and 2 (persistent workers,
prefetching), gradient accumulation, and uneven DDP shards over 2 and 3 gloo processes.

The "model" is a deterministic function of (sample, step), so that every difference in
what was trained shows up in the table, and the tests stay fast.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from geko_core import Selector, WithIndex

POLICIES = ["geko", "infobatch", "es", "eswp", "uniform", "random_subset", "gainrl", "grace"]
CLASSES = 5
EPOCHS = 4


class Labels(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i % CLASSES


def fake_logits(idx: torch.Tensor, step: int) -> torch.Tensor:
    """Logits that depend on the sample and the step only; samples get easier over time."""
    rows = []
    for i in idx.tolist():
        g = torch.Generator().manual_seed(1_000_003 * i + step)
        row = torch.randn(CLASSES, generator=g)
        row[i % CLASSES] += 0.15 * step + (i % 7) * 0.3
        rows.append(row)
    return torch.stack(rows) if rows else torch.zeros(0, CLASSES)


def make_selector(policy: str, n: int, *, batch: int, drop_last: bool, accumulate: int, **kw) -> Selector:
    options = {"budget": 0.6} if policy in ("random_subset", "grace") else None
    if policy == "gainrl":
        options = {"samples_per_epoch": 0.6}
    return Selector(
        n, policy=policy, epochs=EPOCHS, seed=11, policy_options=options, batch_size=batch, drop_last=drop_last,
        explicit_steps=accumulate > 1, **kw,
    )


def make_loader(sel: Selector, n: int, *, batch: int, drop_last: bool, workers: int) -> DataLoader:
    extra = {"num_workers": workers, "persistent_workers": True, "prefetch_factor": 2} if workers else {}
    return DataLoader(WithIndex(Labels(n)), batch_size=batch, sampler=sel.sampler, drop_last=drop_last, **extra)


def train_step(sel: Selector, idx: torch.Tensor, y: torch.Tensor, trained: list) -> None:
    logits = fake_logits(idx, sel.step_count)
    if sel.policy.meta_batch:
        pos, w = sel.select(idx, logits, y)
        sel.loss(logits[pos], y[pos], idx[pos], weights=w, observe=False)
        trained.append(idx[pos].tolist())
    else:
        sel.loss(logits, y, idx)
        trained.append(idx.tolist())


def run(sel: Selector, loader: DataLoader, trained: list, *, accumulate: int, set_epoch: bool, stop_after: int | None = None) -> int:
    """Train from the Selector's epoch to the end (or until ``stop_after`` batches);
    returns the number of batches run."""
    batches = 0
    for epoch in range(sel.epoch, EPOCHS):
        if set_epoch:
            sel.sampler.set_epoch(epoch)
        for idx, y in loader:
            train_step(sel, idx, y, trained)
            batches += 1
            if accumulate > 1 and batches % accumulate == 0:
                sel.step()
            if stop_after is not None and batches == stop_after:
                return batches
    return batches


def table_arrays(sel: Selector) -> dict:
    return {k: v for k, v in sel.table.state_dict().items() if isinstance(v, np.ndarray)}


def check_resume(policy, *, n, batch, drop_last, workers, stop_after, accumulate=1, set_epoch=True):
    kw = dict(batch=batch, drop_last=drop_last)
    sel = make_selector(policy, n, accumulate=accumulate, **kw)
    full: list = []
    run(sel, make_loader(sel, n, workers=workers, **kw), full, accumulate=accumulate, set_epoch=set_epoch)
    reference = table_arrays(sel)
    assert sel.epoch == EPOCHS and len(sel.history) == EPOCHS

    sel = make_selector(policy, n, accumulate=accumulate, **kw)
    part: list = []
    loader = make_loader(sel, n, workers=workers, **kw)
    run(sel, loader, part, accumulate=accumulate, set_epoch=set_epoch, stop_after=stop_after)
    saved = sel.state_dict()
    del loader  # its workers may have prefetched well past the saved position

    sel = make_selector(policy, n, accumulate=accumulate, **kw)
    sel.load_state_dict(saved)
    run(sel, make_loader(sel, n, workers=workers, **kw), part, accumulate=accumulate, set_epoch=set_epoch)
    assert part == full
    for key, value in reference.items():
        np.testing.assert_array_equal(table_arrays(sel)[key], value, err_msg=key)
    return full


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("stop_after", [5, 7], ids=["epoch_end", "mid_epoch"])
def test_resume_in_process(policy, drop_last, stop_after):
    # 30 samples, batch 6: 5 batches per full epoch, so batch 5 ends epoch 0; shrunk epochs
    # (GEKO, InfoBatch, the subsets) put the stop elsewhere, which is covered as well.
    full = check_resume(policy, n=30, batch=6, drop_last=drop_last, workers=0, stop_after=stop_after)
    if drop_last:
        assert all(len(b) == 6 for b in full) or policy in ("es", "eswp")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("drop_last", [False, True])
def test_resume_with_prefetching_workers(policy, drop_last):
    check_resume(policy, n=26, batch=4, drop_last=drop_last, workers=2, stop_after=9)


@pytest.mark.parametrize("policy", POLICIES)
def test_resume_with_gradient_accumulation(policy):
    check_resume(policy, n=26, batch=4, drop_last=False, workers=0, stop_after=6, accumulate=3)


@pytest.mark.parametrize("policy", POLICIES)
def test_resume_without_set_epoch(policy):
    check_resume(policy, n=26, batch=4, drop_last=True, workers=0, stop_after=7, set_epoch=False)


def test_drop_last_epochs_are_whole_batches_and_resume_does_not_lose_an_epoch():
    """10 samples, batch 4, drop_last: [2, 2, 2] batches per epoch, resumed or not."""
    def batches_per_epoch(stop: int | None):
        sel = Selector(10, policy="uniform", epochs=3, seed=0, batch_size=4, drop_last=True)
        loader = DataLoader(WithIndex(Labels(10)), batch_size=4, sampler=sel.sampler, drop_last=True)
        counts = []
        for epoch in range(sel.epoch, 3):
            sel.sampler.set_epoch(epoch)
            counts.append(0)
            for idx, y in loader:
                sel.loss(fake_logits(idx, sel.step_count), y, idx)
                counts[-1] += 1
            if stop is not None and epoch == stop:
                state = sel.state_dict()
                sel = Selector(10, policy="uniform", epochs=3, seed=0, batch_size=4, drop_last=True)
                sel.load_state_dict(state)
                loader = DataLoader(WithIndex(Labels(10)), batch_size=4, sampler=sel.sampler, drop_last=True)
                return counts + batches_from(sel, loader)
        return counts

    def batches_from(sel, loader):
        counts = []
        for epoch in range(sel.epoch, 3):
            sel.sampler.set_epoch(epoch)
            counts.append(sum(1 for idx, y in loader if sel.loss(fake_logits(idx, 0), y, idx) is not None))
        return counts

    assert batches_per_epoch(None) == [2, 2, 2]
    assert batches_per_epoch(0) == [2, 2, 2]
    assert batches_per_epoch(1) == [2, 2, 2]


def test_an_untold_drop_last_is_caught():
    sel = Selector(10, policy="uniform", epochs=3, seed=0)
    loader = DataLoader(WithIndex(Labels(10)), batch_size=4, sampler=sel.sampler, drop_last=True)
    for idx, y in loader:
        sel.loss(fake_logits(idx, 0), y, idx)
    with pytest.warns(UserWarning, match="drop_last=True to the Selector"):
        next(iter(loader))
    assert sel.epoch == 1


def test_weights_belong_to_positions_and_padding_never_updates_the_table():
    """3 samples over 2 ranks: rank 1 holds a real copy and a padding copy of one sample."""
    from geko_core.policies import Plan, Policy

    class Fixed(Policy):
        name = "fixed"

        def plan_epoch(self, context, epoch, progress):
            return Plan(np.array([1, 0, 0], dtype=np.int64), np.array([1.0, 3.0, 3.0], dtype=np.float32))

    # Global [1, 0, 0] padded to [1, 0, 0, 1]: rank 0 gets [1, 0] (both real), rank 1 gets
    # [0, 1] where the 1 is padding (weight 0).
    sel = Selector(3, policy=Fixed(), epochs=2, num_replicas=2, rank=1)
    plan = sel.epoch_plan
    assert plan.indices.tolist() == [0, 1] and plan.weights.tolist() == [3.0, 0.0] and plan.real == 1
    idx = torch.tensor(list(sel.sampler))
    assert sel.weights(idx).tolist() == [3.0, 0.0]
    sel.loss(fake_logits(idx, 0), idx % CLASSES, idx)
    visits = sel.table.field("visits")
    assert visits.tolist() == [1, 0, 0]  # the padding copy of sample 1 was not recorded

    # A sample planned twice on one rank keeps each copy's own weight.
    class Twice(Policy):
        name = "twice"

        def plan_epoch(self, context, epoch, progress):
            return Plan(np.array([2, 2, 0, 1], dtype=np.int64), np.array([0.5, 0.5, 1.0, 2.0], dtype=np.float32))

    sel = Selector(3, policy=Twice(), epochs=1)
    idx = torch.tensor(list(sel.sampler))
    assert sel.weights(idx).tolist() == [0.5, 0.5, 1.0, 2.0]
    sel.loss(fake_logits(idx, 0), idx % CLASSES, idx)
    assert sel.table.field("visits").tolist() == [1, 1, 2]


def test_eswp_selection_weights_include_the_pruning_rescale():
    """E[sum over the selected positions of w * v] equals the meta-batch's plan-weighted sum:
    the selection weight k / (B pi) times the plan weight 1 / (1 - r)."""
    sel = Selector(60, policy="eswp", epochs=8, seed=2, policy_options={"prune_ratio": 0.5, "patience": 1})
    # Two epochs of scores so that epoch 2 prunes and rescales.
    for _ in range(2):
        order = torch.tensor(list(sel.sampler))
        for start in range(0, len(order), 12):
            idx = order[start : start + 12]
            sel.select(idx, fake_logits(idx, sel.step_count), idx % CLASSES)
    plan = sel.epoch_plan
    assert sel.epoch == 2 and (plan.weights > 1.5).any(), "the test needs rescaled survivors"
    idx = torch.from_numpy(plan.indices[:12].copy())
    plan_weights = plan.weights[:12].astype(np.float64)
    values = np.where(plan_weights > 1.5, 3.0, 1.0)  # the rescaled survivors carry the larger values
    logits = fake_logits(idx, sel.step_count)
    state = sel.state_dict()
    estimates = []
    for trial in range(1000):
        sel.load_state_dict(state)
        sel._step = 10_000 + trial  # the draw is keyed by the step: a fresh draw per trial
        pos, w = sel.select(idx, logits, idx % CLASSES)
        # Exactly: the returned weight is the policy's k / (B pi) times the plan weight.
        raw_pos, raw = sel.policy.select(sel.context, idx.numpy(), sel.step_count)
        np.testing.assert_array_equal(raw_pos, pos.numpy())
        np.testing.assert_allclose(w.numpy(), raw * plan_weights[raw_pos], rtol=1e-6)
        estimates.append(float((w.numpy().astype(np.float64) * values[pos.numpy()]).sum()) / len(pos))
    # And in expectation: the meta-batch's plan-weighted mean (within 4 standard errors).
    expected = float((plan_weights * values).sum()) / 12
    assert abs(np.mean(estimates) - expected) < 4 * np.std(estimates) / np.sqrt(len(estimates))
    # Without the plan weight the estimate would miss the rescale by far more than that.
    assert abs(expected - float(values.mean())) > 6 * np.std(estimates) / np.sqrt(len(estimates))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 29  # not divisible by 2 or 3: padded shards
        kw = dict(batch=3, drop_last=False)
        results = {}
        for policy in POLICIES:
            sel = make_selector(policy, n, accumulate=1, **kw)
            full: list = []
            run(sel, make_loader(sel, n, workers=0, **kw), full, accumulate=1, set_epoch=True)
            reference = table_arrays(sel)
            sel = make_selector(policy, n, accumulate=1, **kw)
            part: list = []
            run(sel, make_loader(sel, n, workers=0, **kw), part, accumulate=1, set_epoch=True, stop_after=4)
            saved = sel.state_dict()
            sel = make_selector(policy, n, accumulate=1, **kw)
            sel.load_state_dict(saved)
            run(sel, make_loader(sel, n, workers=0, **kw), part, accumulate=1, set_epoch=True)
            same_table = all(np.array_equal(table_arrays(sel)[k], v) for k, v in reference.items())
            results[policy] = (part == full, same_table, full, reference["visits"] if "visits" in reference else None)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_resume_with_uneven_ddp_shards(tmp_path, world):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for policy in POLICIES:
        for r in range(world):
            same_batches, same_table, _, _ = results[r][policy]
            assert same_batches, (policy, r)
            assert same_table, (policy, r)
        # Every rank holds the same table (statistics are all-gathered).
        visits = [results[r][policy][3] for r in range(world)]
        assert all(np.array_equal(v, visits[0]) for v in visits), policy


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("policy", ["geko", "infobatch", "eswp"])
# torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.13 deprecates.
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_stateful_dataloader_checkpoints_the_sampler(policy, workers):
    """torchdata's StatefulDataLoader saves the sampler's iteration with the loader (with
    workers it snapshots the sampler when it hands a batch to a worker); restored after the
    Selector's own state, the run continues with the batch an uninterrupted one trains next."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    n, kw = 26, dict(batch=4, drop_last=False)
    extra = {"num_workers": workers, "persistent_workers": True, "prefetch_factor": 2} if workers else {}

    def loader_for(sel):
        return stateful.StatefulDataLoader(WithIndex(Labels(n)), batch_size=4, sampler=sel.sampler, **extra)

    sel = make_selector(policy, n, accumulate=1, **kw)
    full: list = []
    run(sel, loader_for(sel), full, accumulate=1, set_epoch=True)
    reference = table_arrays(sel)

    sel = make_selector(policy, n, accumulate=1, **kw)
    loader = loader_for(sel)
    part: list = []
    run(sel, loader, part, accumulate=1, set_epoch=True, stop_after=9)
    saved = {"selector": sel.state_dict(), "loader": loader.state_dict()}
    assert set(saved["loader"]) and all(isinstance(v, int) for v in sel.sampler.state_dict().values())
    del loader

    sel = make_selector(policy, n, accumulate=1, **kw)
    sel.load_state_dict(saved["selector"])
    loader = loader_for(sel)
    loader.load_state_dict(saved["loader"])
    run(sel, loader, part, accumulate=1, set_epoch=True)
    assert part == full
    for key, value in reference.items():
        np.testing.assert_array_equal(table_arrays(sel)[key], value, err_msg=key)


def test_sampler_state_is_checked():
    sel = Selector(10, policy="uniform", epochs=2, seed=0)
    with pytest.raises(ValueError, match="epoch 3"):
        sel.sampler.load_state_dict({"epoch": 3, "yielded": 0})
    with pytest.raises(ValueError, match="missing"):
        sel.sampler.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="yielded"):
        sel.sampler.load_state_dict({"epoch": 0, "yielded": -1})
    list(sel.sampler)
    with pytest.raises(ValueError, match="of an epoch of 10"):
        sel.sampler.load_state_dict({"epoch": 0, "yielded": 11})
    sel.sampler.load_state_dict({"epoch": 0, "yielded": 4})
    assert len(list(sel.sampler)) == 6
