"""GekoCallback: a LightningModule trains on the Selector's epochs, and a run stopped at an
epoch end or mid-epoch and resumed from Lightning's checkpoint trains the same samples in the
same order, with the same final table and weights, as an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import geko_core  # noqa: E402
from geko_core.integrations.lightning import GekoCallback  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    # Lightning's advice for a tiny CPU run (more workers, more batches than the logging
    # interval) and, on a mid-epoch resume, its warning that a plain DataLoader is not
    # resumable: the Selector's sampler resumes itself.
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    # Lightning 2.6 still builds torch.utils._pytree.LeafSpec, which torch 2.13 deprecates.
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning",
    # A resumed run writes its checkpoints next to the ones it resumes from.
    "ignore:Checkpoint directory .* exists and is not empty:UserWarning",
    # torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch 2.13 deprecates.
    "ignore:'set_vital' is deprecated:UserWarning",
)]

SAMPLES, FEATURES, CLASSES, BATCH, EPOCHS = 48, 6, 3, 8, 5


def _dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    y = (x @ teacher + 0.7 * torch.randn(SAMPLES, CLASSES, generator=generator)).argmax(1)
    return TensorDataset(x, y)


def _selector(*, drop_last: bool = False, explicit_steps: bool = True) -> geko_core.Selector:
    return geko_core.Selector(
        SAMPLES, policy="geko", epochs=EPOCHS, seed=0, explicit_steps=explicit_steps, batch_size=BATCH, drop_last=drop_last
    )


class _Model(pl.LightningModule):
    def __init__(self, selector: geko_core.Selector, *, loader: str = "torch", drop_last: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(FEATURES, CLASSES)
        self.selector = selector
        self.loader = loader
        self.drop_last = drop_last
        self.trained: list[tuple[int, int]] = []  # (epoch, dataset index) of every trained sample

    def training_step(self, batch, batch_idx):
        idx, x, y = batch
        self.trained.extend((self.current_epoch, int(i)) for i in idx)
        return self.selector.loss(self.net(x), y, idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=4.0, momentum=0.9)

    def train_dataloader(self):
        options = {"batch_size": BATCH, "sampler": self.selector.sampler, "drop_last": self.drop_last}
        data = geko_core.WithIndex(_dataset())
        if self.loader == "workers":
            return DataLoader(data, num_workers=1, **options)
        if self.loader == "shuffled":
            return DataLoader(data, batch_size=BATCH, shuffle=True)
        if self.loader.startswith("stateful"):
            stateful = pytest.importorskip("torchdata.stateful_dataloader")
            return stateful.StatefulDataLoader(data, num_workers=int(self.loader.endswith("workers")), **options)
        return DataLoader(data, **options)


class _ValidatedModel(_Model):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validated: list[int] = []  # epochs at whose end validation ran

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_validation_epoch_end(self):
        self.validated.append(self.current_epoch)

    def val_dataloader(self):
        return DataLoader(_dataset(), batch_size=SAMPLES)


class _Stop(Exception):
    """Ends a run as a crash would."""


class _StopAt(pl.Callback):
    """Raises at the first batch of ``epoch``, or at the first batch after optimizer step ``step``."""

    def __init__(self, *, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        at_epoch = self.epoch is not None and trainer.current_epoch >= self.epoch
        if at_epoch or (self.step is not None and trainer.global_step >= self.step):
            raise _Stop


class _Run:
    def __init__(self, trainer: pl.Trainer, model: _Model, selector: geko_core.Selector) -> None:
        self.trainer, self.model, self.selector = trainer, model, selector


def _fit(
    root, name, *, stop=None, callbacks=(), ckpt_path=None, weights_only=None, accumulate=1, selector=None, max_epochs=None,
    model=_Model, **model_options,
) -> _Run:
    """Train a fresh model (with ``stop``: until it raises) and return what the run left."""
    if selector is None:
        selector = _selector(drop_last=model_options.get("drop_last", False))
    model = model(selector, **model_options)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS if max_epochs is None else max_epochs,
        accumulate_grad_batches=accumulate,
        callbacks=[GekoCallback(selector), *callbacks, *([stop] if stop else [])],
        logger=CSVLogger(root, name=name),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=root / name,
    )
    if stop is None:
        trainer.fit(model, ckpt_path=ckpt_path, weights_only=weights_only)
    else:
        with pytest.raises(_Stop):
            trainer.fit(model, ckpt_path=ckpt_path, weights_only=weights_only)
    return _Run(trainer, model, selector)


def _epoch_saves(folder) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=folder, filename="{epoch}", every_n_epochs=1, save_top_k=-1)


def _assert_same_end(resumed: _Run, reference: _Run) -> None:
    assert resumed.trainer.global_step == reference.trainer.global_step
    table, ref_table = resumed.selector.table.state_dict(), reference.selector.table.state_dict()
    assert table.keys() == ref_table.keys()
    for key, value in ref_table.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(table[key], value, err_msg=key)
        else:
            assert table[key] == value, key
    metrics, ref_metrics = resumed.selector.metrics(), reference.selector.metrics()
    for name in ("epoch", "step", "forwarded", "backpropagated", "buckets"):
        assert metrics[name] == ref_metrics[name], name
    for param, ref_param in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(param, ref_param)


def _epoch_lengths(run: _Run) -> list[int]:
    return [sum(1 for epoch, _ in run.model.trained if epoch == e) for e in range(EPOCHS)]


def _batches(samples: int, drop_last: bool = False) -> int:
    return samples // BATCH if drop_last else math.ceil(samples / BATCH)


def test_each_epoch_trains_its_plan_with_accumulation_validates_and_logs_metrics(tmp_path):
    run = _fit(tmp_path, "run", accumulate=2, model=_ValidatedModel)

    history = run.selector.history + [run.selector.metrics()]
    planned = [entry["epoch_length"] for entry in history[:EPOCHS]]
    assert _epoch_lengths(run) == planned  # every epoch ends where its plan ends
    # Lightning alone would cap every epoch at the first one's batch count.
    assert _batches(max(planned[1:])) > _batches(planned[0]), "no epoch is longer than the first: change the data or lr"
    # The last accumulation group of every epoch steps; the Selector counts optimizer steps.
    steps = sum(math.ceil(_batches(n) / 2) for n in planned)
    assert run.trainer.global_step == steps
    assert run.selector.metrics()["step"] == steps
    assert run.model.validated == list(range(EPOCHS))  # at every epoch end, whatever its length

    logged = run.trainer.logged_metrics
    for name in ("geko/saved_fraction", "geko/forwarded", "geko/backpropagated", "geko/epoch_length", "geko/bucket_HARD"):
        assert name in logged, name
    assert float(logged["geko/backpropagated"]) == sum(planned)
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "geko/saved_fraction" in header.split(",")


@pytest.mark.parametrize("case", ["longer-epoch-after-resume", "drop_last", "saved-at-validation-end"])
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path, case):
    drop_last = case == "drop_last"
    stop_epoch = 1 if case == "longer-epoch-after-resume" else 2
    model = _ValidatedModel if case == "saved-at-validation-end" else _Model
    reference = _fit(tmp_path, "reference", drop_last=drop_last, model=model)
    lengths = _epoch_lengths(reference)
    if drop_last:
        # Epochs are planned in whole batches.
        assert all(n % BATCH == 0 for n in lengths)
    elif case == "longer-epoch-after-resume":
        # A later epoch is longer than the one Lightning resumes in, whose batch count
        # Lightning alone would take for every remaining epoch.
        longer = _batches(max(lengths[stop_epoch + 1 :])) > _batches(lengths[stop_epoch])
        assert longer, "no longer epoch: change the data or lr"

    def saves():
        # At validation end, Lightning has not closed the epoch yet.
        at_validation = case == "saved-at-validation-end"
        return ModelCheckpoint(
            dirpath=tmp_path / "ckpt", filename="{epoch}", every_n_epochs=1, save_top_k=-1,
            save_on_train_epoch_end=not at_validation,
        )

    stop = _StopAt(epoch=stop_epoch)
    stopped = _fit(tmp_path, "stopped", callbacks=[saves()], stop=stop, drop_last=drop_last, model=model)
    path = tmp_path / "ckpt" / f"epoch={stop_epoch - 1}.ckpt"
    assert "GekoCallback" in torch.load(path, weights_only=True)["callbacks"]
    resumed = _fit(tmp_path, "resumed", callbacks=[saves()], ckpt_path=path, drop_last=drop_last, model=model)

    assert {epoch for epoch, _ in stopped.model.trained} == set(range(stop_epoch))
    assert stopped.model.trained + resumed.model.trained == reference.model.trained
    if model is _ValidatedModel:
        assert stopped.model.validated + resumed.model.validated == reference.model.validated
    _assert_same_end(resumed, reference)


@pytest.mark.parametrize(
    ("loader", "where"),
    [
        ("torch", "middle"),
        ("workers", "middle"),
        ("torch", "last-batch"),
        # torchdata's StatefulDataLoader checkpoints the sampler with the loader (0 and 1 worker).
        ("stateful", "middle"),
        ("stateful-workers", "middle"),
    ],
)
def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, loader, where):
    if loader.startswith("stateful"):
        pytest.importorskip("torchdata.stateful_dataloader")
    reference = _fit(tmp_path, "reference", accumulate=2, loader=loader)
    # Stop after an optimizer step in the middle of epoch 1, or after its last batch (saved
    # before Lightning has ended the epoch).
    lengths = _epoch_lengths(reference)
    steps_of = [math.ceil(_batches(n) / 2) for n in lengths]
    assert steps_of[1] >= 2
    step = steps_of[0] + (steps_of[1] // 2 if where == "middle" else steps_of[1])

    def saves(folder):
        return ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=step, save_top_k=-1)

    stop = _StopAt(step=step)
    stopped = _fit(tmp_path, "stopped", callbacks=[saves(tmp_path / "ckpt")], stop=stop, accumulate=2, loader=loader)
    path = tmp_path / "ckpt" / f"step={step}.ckpt"
    resumed = _fit(tmp_path, "resumed", callbacks=[saves(tmp_path / "ckpt")], ckpt_path=path, accumulate=2, loader=loader)

    if where == "middle":
        assert lengths[0] < len(stopped.model.trained) < lengths[0] + lengths[1]
    else:
        assert len(stopped.model.trained) == lengths[0] + lengths[1]
    assert stopped.model.trained + resumed.model.trained == reference.model.trained
    _assert_same_end(resumed, reference)


def test_refuses_what_would_train_other_samples(tmp_path):
    # Lightning's length of the run differs from the Selector's.
    with pytest.raises(ValueError, match="max_epochs"):
        _fit(tmp_path, "length", max_epochs=EPOCHS + 1)
    # A training loader that does not sample with selector.sampler.
    with pytest.raises(RuntimeError, match="selector.sampler"):
        _fit(tmp_path, "shuffled", loader="shuffled")
    # The Selector counting a step per batch on top of Lightning's optimizer steps.
    with pytest.raises(ValueError, match="explicit_steps=True"):
        _fit(tmp_path, "implicit", selector=_selector(explicit_steps=False))


def _first_tensor(value):
    if isinstance(value, torch.Tensor) and value.numel():
        return value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ():
        if (found := _first_tensor(item)) is not None:
            return found
    return None


def test_refuses_a_checkpoint_without_or_with_damaged_selector_state(tmp_path):
    _fit(tmp_path, "stopped", callbacks=[_epoch_saves(tmp_path / "ckpt")], stop=_StopAt(epoch=1))
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)

    damaged = tmp_path / "damaged.ckpt"
    _first_tensor(checkpoint["callbacks"]["GekoCallback"]["ranks"][0]["selector"]).view(-1)[0] += 1
    torch.save(checkpoint, damaged)
    with pytest.raises(ValueError, match="checksum"):
        _fit(tmp_path, "damaged", callbacks=[_epoch_saves(tmp_path / "ckpt")], ckpt_path=damaged)

    missing = tmp_path / "missing.ckpt"
    del checkpoint["callbacks"]["GekoCallback"]
    torch.save(checkpoint, missing)
    with pytest.raises(ValueError, match="no GekoCallback state"):
        _fit(tmp_path, "missing", callbacks=[_epoch_saves(tmp_path / "ckpt")], ckpt_path=missing)


# -- DDP under Lightning's own launcher -------------------------------------------------------------
# Lightning's DDP launcher runs this script again for rank 1, so it is a file of its own.
_DDP_SCRIPT = '''
import json, sys, warnings
from pathlib import Path

# The suite's rule: any warning is an error, except Lightning's advice for a tiny CPU run, its
# notes on a mid-epoch resume from a plain DataLoader (the Selector's sampler resumes itself) and
# on a resumed run saving next to the checkpoints it resumes from.
warnings.simplefilter("error")
for message in (
    ".*does not have many workers.*", ".*is not resumable.*", ".*isinstance\\\\(treespec, LeafSpec\\\\).*",
    "Checkpoint directory .* exists and is not empty.*",
):
    warnings.filterwarnings("ignore", message=message)

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import geko_core
from geko_core.integrations.lightning import GekoCallback

torch.set_num_threads(1)
SAMPLES, BATCH, EPOCHS, EVERY = 40, 4, 3, 4
out = Path(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.randn(SAMPLES, 6, generator=g)
y = (x @ torch.randn(6, 3, generator=g) + 0.7 * torch.randn(SAMPLES, 3, generator=g)).argmax(1)


class Model(pl.LightningModule):
    def __init__(self, selector):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(6, 3)
        self.selector = selector
        self.trained = []

    def training_step(self, batch, batch_idx):
        idx, xb, yb = batch
        self.trained.append(idx.tolist())
        return self.selector.loss(self.net(xb), yb, idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=2.0)

    def train_dataloader(self):
        data = geko_core.WithIndex(TensorDataset(x, y))
        return DataLoader(data, batch_size=BATCH, sampler=self.selector.sampler)


def fit(name, ckpt_path=None):
    # As the documentation says: the Trainer first, then the Selector with the process layout,
    # then the callback appended (after ModelCheckpoint, which saves in on_train_batch_end).
    saves = ModelCheckpoint(dirpath=out / "ckpt", filename="{step}", every_n_train_steps=EVERY, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=EPOCHS, use_distributed_sampler=False, callbacks=[saves],
        logger=CSVLogger(out, name=name), log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
    )
    selector = geko_core.Selector(
        SAMPLES, policy="geko", epochs=EPOCHS, seed=0, explicit_steps=True, batch_size=BATCH,
        num_replicas=trainer.world_size, rank=trainer.global_rank,
    )
    trainer.callbacks.append(GekoCallback(selector))
    model = Model(selector)
    trainer.fit(model, ckpt_path=ckpt_path)
    table = selector.table.state_dict()
    return {
        "trained": model.trained, "global_step": trainer.global_step, "selector_step": selector.metrics()["step"],
        "lengths": [h["epoch_length"] for h in selector.history],
        "table": {k: v.tolist() for k, v in table.items() if hasattr(v, "tolist")},
        "params": [p.detach().tolist() for p in model.net.parameters()],
        "logged": {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("geko/") and "seconds" not in k},
        "local": {k: selector.metrics()[k] for k in ("backpropagated", "forwarded")},
    }


full = fit("full")
resume_step = 2 * EVERY
resumed = fit("resumed", ckpt_path=out / "ckpt" / f"step={resume_step}.ckpt")
rank = pl.utilities.rank_zero.rank_zero_only.rank
(out / f"rank{rank}.json").write_text(json.dumps({"full": full, "resumed": resumed, "resume_step": resume_step}))
'''


@pytest.mark.slow  # about 90 s: four processes start Lightning and torch.distributed
def test_ddp_step_checkpoint_resumes_as_an_uninterrupted_run(tmp_path):
    """Two gloo processes under Lightning's DDP launcher, set up as the module documentation
    says (the callback appended after the Trainer is built, so after ModelCheckpoint): a step
    checkpoint holds the Selector at that step, resuming from it trains the samples of the
    uninterrupted run and ends with its table and weights, every rank logs the run's counts,
    and no warning is raised (Lightning's sync_dist advice included)."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(_DDP_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "error"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for run in ranks:
        full, resumed, step = run["full"], run["resumed"], run["resume_step"]
        assert full["selector_step"] == full["global_step"] == resumed["selector_step"] == resumed["global_step"]
        first = math.ceil(full["lengths"][0] / 4)  # each rank's optimizer steps in epoch 0 (batch 4)
        assert first < step < first + math.ceil(full["lengths"][1] / 4)  # in the middle of epoch 1
        assert resumed["trained"] == full["trained"][step:]
        assert resumed["table"] == full["table"] and resumed["params"] == full["params"]
    assert ranks[0]["full"]["table"] == ranks[1]["full"]["table"]
    assert ranks[0]["full"]["trained"] != ranks[1]["full"]["trained"]
    # Logged counts are the run's, the same on both ranks.
    logged = [r["full"]["logged"] for r in ranks]
    assert logged[0] == logged[1]
    assert logged[0]["geko/backpropagated"] == sum(r["full"]["local"]["backpropagated"] for r in ranks)
