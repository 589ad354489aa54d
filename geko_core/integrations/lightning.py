"""PyTorch Lightning integration: :class:`GekoCallback` trains a ``LightningModule`` on the
Selector's epochs.

    import lightning as L
    from torch.utils.data import DataLoader
    import geko_core
    from geko_core.integrations.lightning import GekoCallback

    selector = geko_core.Selector(len(ds), policy="geko", epochs=E, seed=0, explicit_steps=True, batch_size=B)

    class Model(L.LightningModule):
        def __init__(self, selector):
            super().__init__()
            self.selector = selector
            self.net = ...

        def training_step(self, batch, batch_idx):
            idx, x, y = batch                            # WithIndex puts the index first
            return self.selector.loss(self.net(x), y, idx)

        def train_dataloader(self):
            return DataLoader(geko_core.WithIndex(ds), batch_size=B, sampler=self.selector.sampler)

    trainer = L.Trainer(max_epochs=E, callbacks=[GekoCallback(selector)])
    trainer.fit(Model(selector))                       # or fit(..., ckpt_path=...) to resume

PyTorch Lightning 2.x is optional (``pip install 'geko_core[lightning]'``): this module imports
``lightning``, ``import geko_core`` never does. Written against the loops of Lightning 2.6
(tested with 2.6.6).

Decisions
---------
Loss
    No helper: ``training_step`` calls the Selector itself, exactly as a plain loop does
    (``selector.loss(logits, y, idx)``, or ``selector.observe`` next to your own loss,
    ``selector.select`` for the meta-batch policies). The batch comes from
    :class:`~geko_core.WithIndex`, so it starts with the dataset indices.
Data loader and DDP
    The training ``DataLoader`` is yours: ``sampler=selector.sampler``, no ``shuffle``, and the
    Selector built with its ``batch_size`` and ``drop_last``. At the start of training the
    callback checks that Lightning's training loader still samples with ``selector.sampler``
    with those settings, and raises otherwise. Under DDP the Selector already shards each epoch
    over the ranks, so pass ``Trainer(use_distributed_sampler=False)``: with the default,
    Lightning wraps the sampler in a shuffling ``DistributedSamplerWrapper``, which the check
    refuses. The callback does not change the Trainer's settings itself. Lightning initialises
    ``torch.distributed`` only inside ``fit``, so a Selector built before it cannot see the
    process layout: build the Trainer first, then the Selector with
    ``num_replicas=trainer.world_size, rank=trainer.global_rank`` (checked at ``setup``), then
    ``trainer.callbacks.append(GekoCallback(selector))``::

        trainer = L.Trainer(max_epochs=E, strategy="ddp", devices=2, use_distributed_sampler=False)
        selector = geko_core.Selector(len(ds), policy="geko", epochs=E, seed=0, explicit_steps=True,
                                      batch_size=B, num_replicas=trainer.world_size, rank=trainer.global_rank)
        trainer.callbacks.append(GekoCallback(selector))
Epochs
    Lightning calls ``set_epoch`` on the sampler at every epoch start; the callback calls
    ``selector.set_epoch(trainer.current_epoch)`` too (for loaders whose sampler Lightning
    cannot see). Lightning measures ``len(train_dataloader)`` once per ``fit`` and would cap
    every epoch at that count, but the Selector's epochs change length: they shrink as samples
    are learned and can grow past the data set's size (repeated HARD samples). At each epoch
    start the callback sets the fit loop's batch count to this epoch's planned batches
    (``trainer.num_training_batches``, and ``trainer.val_check_batch`` for a fractional
    ``val_check_interval``), so every epoch runs exactly its plan, the last gradient
    accumulation group of a short epoch still steps, and validation runs at every epoch end.
    ``limit_train_batches`` is applied to each epoch's count. One training loader only.
Optimizer steps
    ``selector.step()`` is called once for every optimizer step Lightning takes (each increase
    of ``trainer.global_step``, seen at ``on_train_batch_end``), so with
    ``accumulate_grad_batches`` the Selector counts optimizer steps, not micro-batches. Build
    the Selector with ``explicit_steps=True``; the callback checks after the first batch that
    the Selector's step count is Lightning's ``global_step`` and raises otherwise.
Length of the run
    A Selector built with ``epochs=E`` needs ``Trainer(max_epochs=E)``; one built with
    ``total_steps=S`` needs ``Trainer(max_steps=S)``: its training progress (the curriculum)
    is measured against that length. A mismatch is refused at ``setup``. Learning-rate
    schedules sized by ``trainer.estimated_stepping_batches`` assume full-length epochs and
    end late; schedule on ``selector.progress()`` instead (e.g. ``LambdaLR``).
Metrics
    ``selector.metrics()`` is logged through ``LightningModule.log_dict`` as flat ``geko/...``
    scalars (bucket counts ``geko/bucket_<name>``, ``forwarded``, ``backpropagated``,
    ``saved_fraction``, ``epoch_length``, ...; strings such as the phase name are left out):
    after every ``trainer.log_every_n_steps``-th optimizer step and at each training epoch
    end. ``GekoCallback(selector, log_metrics=False)`` turns this off. Under DDP the counts
    (samples and tokens forwarded and back-propagated) are summed over the ranks and the saved
    fractions computed from the sums, so every rank logs the run's figures (the bucket counts
    are the same on every rank; the timings are each rank's own).
Checkpoints
    The callback's ``state_dict`` holds ``selector.state_dict()``, with the optimizer step of
    the current batch counted even when a checkpoint callback that runs before this one saves
    it (the callback's place in ``trainer.callbacks`` does not matter); Lightning stores it in its
    checkpoint under ``checkpoint["callbacks"]["GekoCallback"]`` (the ``state_key``) and hands
    it back to ``load_state_dict`` when ``trainer.fit(ckpt_path=...)`` restores callbacks,
    before it builds the training loader. Arrays are stored as tensors (the checkpoint loads
    with ``torch.load(weights_only=True)``) with a CRC32 of the content
    (:func:`geko_core.checkpoint.content_crc32`), checked on load: a damaged state is
    refused. Under DDP every rank saves different Selector state (its shard and position),
    so the state of all ranks is gathered into the checkpoint and each rank restores its own.
    Resuming from a checkpoint without the callback's state is refused.
Resume
    The state also records the epoch Lightning passes to ``set_epoch`` when it resumes from
    the checkpoint, and on load the Selector moves to that epoch, so ``len(train_dataloader)``
    and any worker prefetching are already those of the resumed epoch. At the start of
    training the callback checks that the Selector's epoch and step count are Lightning's
    ``current_epoch`` and ``global_step``.

    End of epoch (saved at ``on_train_epoch_end``): the next epoch is planned from the
    restored table, as in an uninterrupted run. After an epoch's last batch but before
    Lightning has closed the epoch (saved at ``on_validation_end``, or at
    ``on_train_batch_end`` of the last batch): Lightning recognises the epoch as finished
    only if its batch count is that epoch's, so the callback gives it that count until the
    next epoch starts. (Closing it, Lightning calls ``set_epoch`` with that epoch once more:
    the Selector, already in the next one, goes back and forth, which leaves an empty entry
    in ``selector.history``.) Mid-epoch (e.g. ``ModelCheckpoint(every_n_train_steps=...)``): with a
    plain ``torch.utils.data.DataLoader`` Lightning neither skips batches nor restores the
    loader; it starts a fresh iterator, and the Selector's sampler yields from the position
    training had reached. In every case the trained samples, their order, the final table and
    the weights are those of an uninterrupted run. Lightning warns on a mid-epoch resume that
    the dataloader "is not resumable" (a ``PossibleUserWarning``); the sampler resumes
    itself, so the warning does not apply. A torchdata ``StatefulDataLoader`` adds nothing
    here and is not recommended: Lightning stores and restores its state too, and then
    the sampler's own ``state_dict``/``load_state_dict`` decide the resumed position after
    the Selector's (``tests/test_lightning.py`` records what they give today). Such a loader
    with a sampler that has no ``state_dict``/``load_state_dict`` is refused: torchdata
    would fast-forward it by the samples already yielded, on top of the Selector's own resume.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "geko_core.integrations.lightning needs PyTorch Lightning 2.x: pip install 'geko_core[lightning]'"
    ) from error

from ..checkpoint import content_crc32
from ..selector import Selector
from ._common import flat_metrics, from_storable, global_metrics, to_storable

__all__ = ["GekoCallback"]

_STATE_VERSION = 1


class GekoCallback(Callback):
    """Wires a :class:`~geko_core.Selector` into ``Trainer.fit``: epochs, optimizer steps,
    per-epoch batch counts, metrics and checkpointed state (see the module docstring).

    Args:
        selector: the Selector whose ``sampler`` the training DataLoader uses and whose
            ``loss``/``observe`` the ``training_step`` calls.
        log_metrics: log ``selector.metrics()`` as ``geko/...`` scalars.

    Attributes:
        selector: the Selector.
    """

    def __init__(self, selector: Selector, *, log_metrics: bool = True) -> None:
        if not isinstance(selector, Selector):
            raise TypeError(f"selector must be a geko_core.Selector, got {type(selector).__name__}")
        if not isinstance(log_metrics, bool):
            raise TypeError(f"log_metrics must be a bool, got {type(log_metrics).__name__}")
        self.selector = selector
        self.log_metrics = log_metrics
        self._counted_global_step = 0  # Lightning's optimizer steps already passed to selector.step()
        self._counting = False  # inside fit, between on_train_start and on_train_end
        self._logged_step = -1  # the global step whose metrics were logged last
        self._steps_checked = False
        self._refit_at_next_batch = False
        # state_dict() gets no trainer; a weak reference avoids a Trainer <-> callback cycle.
        self._trainer_ref: weakref.ReferenceType[pl.Trainer] | None = None

    # -- setup and consistency ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer_ref = weakref.ref(trainer)
        layout = (getattr(self.selector, "num_replicas", 1), getattr(self.selector, "rank", 0))
        if layout != (trainer.world_size, trainer.global_rank):
            raise ValueError(
                f"the Selector shards for rank {layout[1]} of {layout[0]} but this process is rank {trainer.global_rank} "
                f"of {trainer.world_size}: Lightning starts torch.distributed inside fit, after the Selector is built, so "
                "build it with num_replicas=trainer.world_size, rank=trainer.global_rank"
            )
        total_steps = getattr(self.selector, "total_steps", None)
        epochs = getattr(self.selector, "epochs", None)
        if total_steps is not None and trainer.max_steps != total_steps:
            raise ValueError(
                f"the Selector was built with total_steps={total_steps} but Trainer(max_steps={trainer.max_steps}); "
                "its training progress is measured against that length, so give both the same value"
            )
        if total_steps is None and epochs is not None and trainer.max_epochs != epochs:
            raise ValueError(
                f"the Selector was built with epochs={epochs} but Trainer(max_epochs={trainer.max_epochs}); "
                "its training progress is measured against that length, so give both the same value"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_loader(trainer)
        selector = self.selector
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # Resumed after the last batch of an epoch that Lightning has not closed yet (saved at
        # on_validation_end, or at on_train_batch_end of that batch).
        closing = trainer.fit_loop.restarting and progress.is_last_batch
        epochs = trainer.fit_loop.epoch_progress.current
        # A finished epoch's sampler may already have moved on when the loader was measured.
        allowed = {trainer.current_epoch}
        if closing and epochs.processed < epochs.started:
            allowed.add(trainer.current_epoch + 1)
        if selector.epoch not in allowed:
            raise RuntimeError(
                f"the Selector is at epoch {selector.epoch} but Lightning starts epoch {trainer.current_epoch}: "
                "a Selector and a Trainer continue together only from the same checkpoint "
                "(trainer.fit(..., ckpt_path=...) with this callback, which restores the Selector)"
            )
        step = selector.metrics().get("step")
        if step is not None and step != trainer.global_step:
            raise RuntimeError(
                f"the Selector has counted {step} optimizer steps but Lightning is at global_step {trainer.global_step}: "
                "a Selector and a Trainer continue together only from the same checkpoint"
            )
        self._counted_global_step = trainer.global_step
        self._logged_step = trainer.global_step
        self._counting = True
        self._steps_checked = False
        if closing:
            # Lightning recognises the restored epoch as finished (saved at on_validation_end,
            # or at on_train_batch_end of its last batch) only when its batch count is that
            # epoch's; the next epoch's count is set at that epoch's start or first batch.
            self._fit_loop_to_epoch(trainer, progress.current.ready)
            self._refit_at_next_batch = True
        else:
            self._fit_loop_to_epoch(trainer)

    def _train_loader(self, trainer: pl.Trainer) -> torch.utils.data.DataLoader:
        loaders = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "flattened", None)
        if loaders is None:
            raise RuntimeError(
                f"GekoCallback could not find Lightning's training loader (trainer.fit_loop._combined_loader); "
                f"it is written for Lightning 2.6, this is {pl.__version__}"
            )
        if len(loaders) != 1:
            raise ValueError(f"GekoCallback needs exactly one training DataLoader, got {len(loaders)}")
        return loaders[0]

    def _check_loader(self, trainer: pl.Trainer) -> None:
        loader = self._train_loader(trainer)
        sampler = self.selector.sampler
        batch_sampler = getattr(loader, "batch_sampler", None)
        if getattr(loader, "sampler", None) is not sampler and getattr(batch_sampler, "sampler", None) is not sampler:
            found = type(getattr(loader, "sampler", None)).__name__
            raise RuntimeError(
                f"the training DataLoader samples with a {found}, not with selector.sampler: build it as "
                "DataLoader(geko_core.WithIndex(ds), batch_size=B, sampler=selector.sampler); under DDP also pass "
                "Trainer(use_distributed_sampler=False), or Lightning replaces the sampler with a DistributedSampler"
            )
        # With drop_last the Selector plans whole batches, so that what is planned is trained.
        planned = (getattr(self.selector, "batch_size", None), getattr(self.selector, "drop_last", False))
        if planned[1] != loader.drop_last or planned[0] not in (None, loader.batch_size):
            raise ValueError(
                f"the Selector plans epochs with batch_size={planned[0]}, drop_last={planned[1]} but the training "
                f"DataLoader has batch_size={loader.batch_size}, drop_last={loader.drop_last}: build the Selector with "
                "the DataLoader's batch_size= and drop_last="
            )
        sampler_is_stateful = hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict")
        if hasattr(loader, "load_state_dict") and not sampler_is_stateful:
            raise TypeError(
                f"the training loader ({type(loader).__name__}) restores its position on a mid-epoch resume by "
                "fast-forwarding a sampler without state_dict/load_state_dict, and the Selector already resumes "
                "its sampler: the batches would be skipped twice. Use torch.utils.data.DataLoader"
            )

    def _fit_loop_to_epoch(self, trainer: pl.Trainer, batches: int | None = None) -> None:
        """Make this epoch's planned batch count (or ``batches``) Lightning's epoch length.

        Lightning takes ``num_training_batches`` (and ``val_check_batch``) from the loader's
        length when the loader is set up, and the combined loader caps every later epoch at
        that count; the Selector's epochs are shorter or longer than that one."""
        if batches is None:
            batches = _limited(len(self._train_loader(trainer)), trainer.limit_train_batches)
        trainer.fit_loop._combined_loader.limits = [batches]
        trainer.fit_loop.max_batches = batches
        interval = trainer.val_check_interval
        if isinstance(interval, float) and isinstance(trainer.val_check_batch, int):
            trainer.val_check_batch = max(1, int(batches * interval))

    # -- epochs and steps -------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.selector.set_epoch(trainer.current_epoch)
        self._refit_at_next_batch = False
        self._fit_loop_to_epoch(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._refit_at_next_batch:
            self._refit_at_next_batch = False
            self._fit_loop_to_epoch(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count_steps(trainer)
        if not self._steps_checked:
            self._steps_checked = True
            step = self.selector.metrics().get("step")
            if step is not None and step != trainer.global_step:
                raise ValueError(
                    f"after the first batch the Selector counts {step} steps and Lightning {trainer.global_step} optimizer "
                    "steps: build the Selector with explicit_steps=True, so that only GekoCallback counts them"
                )
        every = trainer.log_every_n_steps
        if self.log_metrics and every and trainer.global_step != self._logged_step and trainer.global_step % every == 0:
            self._logged_step = trainer.global_step
            self._log(trainer, pl_module, on_step=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._counting = False

    def _count_steps(self, trainer: pl.Trainer) -> None:
        """Call ``selector.step()`` for every optimizer step Lightning took since the last call.

        Called at every ``on_train_batch_end`` and by :meth:`state_dict`: a callback that runs
        before this one in ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)``
        when this callback was appended after the Trainer was built) saves the Selector with
        the step it has just taken."""
        stepped = trainer.global_step - self._counted_global_step
        for _ in range(stepped):
            self.selector.step()
        self._counted_global_step = trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_metrics:
            self._log(trainer, pl_module, on_step=False)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, on_step: bool) -> None:
        # Every rank logs at the same points (same global step, same epoch end).
        metrics = global_metrics(self.selector, lambda values: trainer.strategy.reduce(values.to(pl_module.device), reduce_op="sum"))
        # The figures are the same on every rank now: the epoch-level values are synced with
        # "max", which leaves them as they are (and keeps Lightning from warning that they are not).
        pl_module.log_dict(
            {name: float(value) for name, value in flat_metrics(metrics, numeric_only=True).items()},
            on_step=on_step, on_epoch=not on_step, prog_bar=False, logger=True, batch_size=1,
            sync_dist=not on_step, reduce_fx="max",
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's Selector state (arrays as tensors, each with its CRC32) and the epoch
        Lightning resumes in. Under DDP this gathers from all ranks: Lightning calls it on
        every rank when it writes a checkpoint."""
        trainer = self._trainer
        if self._counting and trainer is not None:
            self._count_steps(trainer)  # this batch's optimizer step, when saved before on_train_batch_end
        state = self.selector.state_dict()
        states = [state]
        world = getattr(self.selector, "num_replicas", 1)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Gathered as numpy arrays: all_gather_object fails to unpickle tensors (torch 2.13).
            states = [None] * world
            torch.distributed.all_gather_object(states, state)
        storable = [to_storable(s) for s in states]
        resume_epoch, closing = self._resume_epoch()
        return {
            "version": _STATE_VERSION,
            "resume_epoch": resume_epoch,
            "closing": closing,
            "ranks": [{"selector": s, "crc32": content_crc32(s)} for s in storable],
        }

    def _resume_epoch(self) -> tuple[int, bool]:
        """The epoch Lightning passes to ``set_epoch`` when it resumes from a checkpoint
        written now, and whether it first closes the epoch before (all its batches have run
        but ``on_train_epoch_end`` has not been reached, e.g. at ``on_validation_end``).

        The epoch in progress, or the next one once ``on_train_epoch_end`` has been reached;
        a checkpoint written at ``on_train_batch_end`` of an epoch's last batch also resumes
        in the next epoch (Lightning's fit loop moves on at restart)."""
        trainer = self._trainer
        if trainer is None:
            return self.selector.epoch, False
        epochs = trainer.fit_loop.epoch_progress.current
        batches = trainer.fit_loop.epoch_loop.batch_progress
        # During an epoch `started` is one ahead of `processed` (which moves on just before
        # on_train_epoch_end); inside on_train_batch_end the batch is processed, not completed.
        last_batch_done = epochs.started > epochs.processed and batches.is_last_batch
        if last_batch_done and batches.total.completed < batches.total.processed:
            return epochs.processed + 1, False
        return epochs.processed, last_batch_done

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version") if isinstance(state_dict, dict) else None
        if version != _STATE_VERSION:
            raise ValueError(f"GekoCallback state has version {version!r}; this version reads {_STATE_VERSION}")
        try:
            ranks, resume_epoch, closing = state_dict["ranks"], int(state_dict["resume_epoch"]), bool(state_dict["closing"])
        except KeyError as exc:
            raise ValueError(f"GekoCallback state is missing {exc}") from None
        world = getattr(self.selector, "num_replicas", 1)
        rank = getattr(self.selector, "rank", 0)
        if len(ranks) != world:
            raise ValueError(f"the checkpoint holds Selector state for {len(ranks)} ranks, this run has {world}")
        entry = ranks[rank]
        if content_crc32(entry["selector"]) != entry["crc32"]:
            raise ValueError("the checkpoint's Selector state does not match its checksum: the checkpoint is corrupt")
        state = from_storable(entry["selector"])
        saved_epoch = state.get("epoch") if isinstance(state, dict) else None
        # A Selector moves to the next epoch once training has consumed its epoch, which may
        # be before Lightning has closed the epoch.
        if isinstance(saved_epoch, int) and saved_epoch > resume_epoch + int(closing):
            raise ValueError(
                f"the checkpoint's Selector is at epoch {saved_epoch} but Lightning resumes epoch {resume_epoch}"
            )
        self.selector.load_state_dict(state)
        if resume_epoch > self.selector.epoch:
            # Lightning measures the loader (and workers start prefetching) before its own
            # set_epoch call of the resumed epoch.
            self.selector.set_epoch(resume_epoch)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in (checkpoint.get("callbacks") or {}):
            raise ValueError(
                f"the checkpoint holds no {self.state_key} state (was it written without GekoCallback?): "
                "the Selector cannot continue where training stopped"
            )

    @property
    def _trainer(self) -> pl.Trainer | None:
        return None if self._trainer_ref is None else self._trainer_ref()


def _limited(batches: int, limit: int | float) -> int:
    """An epoch's batch count under ``Trainer(limit_train_batches=...)``."""
    if isinstance(limit, int):
        return min(batches, limit)
    if limit == 1.0:
        return batches
    return int(batches * limit)
