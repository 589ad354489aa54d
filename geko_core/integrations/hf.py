"""Hugging Face Transformers integration: :class:`GekoTrainer`, a ``transformers.Trainer``
that trains on the Selector's shrinking epochs.

    from geko_core.integrations.hf import GekoTrainer

    trainer = GekoTrainer(model=model, args=args, train_dataset=ds, geko_policy="geko")
    trainer.train()
    print(trainer.selector.metrics()["saved_fraction"])

``train_dataset`` is any map-style dataset of dict items (``input_ids``, ``labels`` and
whatever else the collator takes), as with a plain Trainer. transformers, accelerate and peft
are optional: this module imports them, ``import geko_core`` never does. Written against the
training loop of transformers 5.x (tested with 5.23 and 5.24; it needs ``Trainer._run_epoch``).

Everything below lives in :class:`GekoTrainerMixin`; ``GekoTrainer`` is that mixin on
``transformers.Trainer``. To give another Trainer subclass the same machinery, put the mixin
before that class among the bases::

    class MyGekoTrainer(GekoTrainerMixin, MyTrainer):   # MyTrainer subclasses transformers.Trainer
        pass

The mixin replaces the training loss (the Selector's weighted loss from the model's logits)
and defers to the other class everywhere else: evaluation loss, ``prediction_step``, logging
and checkpoint writing still run the other class's versions. A class the other way round
(the Trainer class first) is refused when it is defined: the Trainer's methods would shadow
the mixin's. TRL's ``SFTTrainer`` is composed this way in :mod:`geko_core.integrations.trl`.

Decisions
---------
Indices
    The training set is wrapped in :class:`GekoIndexedDataset`, which adds an integer
    ``"geko_index"`` to every item. The data collator is wrapped too
    (:class:`GekoIndexCollator`): it takes the indices out before calling the user's collator
    (so any collator works, padding ones included) and puts them back as an int64 ``[B]``
    tensor. ``"geko_index"`` is added to the Trainer's signature columns, so it survives
    ``remove_unused_columns=True`` (so do ``"labels"``, even when ``model.forward`` does not
    take them); :meth:`GekoTrainerMixin.compute_loss` removes both before ``model(**inputs)``.
Sampler and DDP
    ``_get_train_sampler`` returns ``selector.sampler``. Under DDP the Selector already gives
    each rank its own shard (padded to the same length on every rank, so ranks stay in
    lockstep), so the ``BatchSamplerShard`` that ``accelerator.prepare`` puts around it is made
    a passthrough (one process, no even-batches padding), as the Trainer does for its own
    rank-aware ``BatchRebalanceSampler``. The Selector all-gathers statistics, so every rank
    holds the same table.
Training length and learning-rate schedule
    With ``max_steps <= 0`` (the usual case) the Selector is built with
    ``epochs=num_train_epochs`` (an integer) and the Trainer runs exactly those epochs, each as
    long as the Selector plans it: fewer optimizer steps, which is the saving. ``max_steps``
    (for the progress bar and the schedule) is computed from the *full* epoch length, and the
    learning-rate schedule follows the Selector's training progress instead of the step
    counter: at progress ``p`` it takes the value the schedule has at step
    ``p * max_steps``. A geko run therefore goes through the whole schedule (warm-up,
    decay) in its shorter run, and a uniform run gets exactly the plain Trainer's schedule.
    (Schedulers other than ``LambdaLR``, e.g. reduce-on-plateau, and schedulers passed in
    through ``optimizers=`` are left as they are.)
    With ``max_steps > 0`` the Selector is built with ``total_steps=max_steps``: the Trainer
    runs that many optimizer steps over as many (shorter) epochs as needed, and the schedule
    is the plain step-based one; this buys better steps, not fewer.
    Each epoch's real length is passed to the Trainer's epoch loop, so the last
    gradient-accumulation group of a short epoch still ends in an optimizer step.
Loss
    ``compute_loss`` runs the model without labels and calls ``selector.loss(logits, labels,
    idx, shift=...)``: per-sequence statistics over tokens whose label is not -100, with the
    causal shift for causal LMs (detected as the Trainer detects it: the model's loss is
    ``ForCausalLMLoss``, or its class is one of transformers' causal-LM classes; override with
    ``geko_shift=``). When the Trainer passes
    ``num_items_in_batch`` (valid target tokens of the whole accumulated batch, gathered over
    ranks), the loss is ``sum_s w_s * sum_t loss_st / num_items_in_batch`` (reduction
    ``"sum"`` divided by it, times the number of processes as the Trainer does for DDP): with
    all weights 1 this is the model's own loss; otherwise it is the per-micro-batch token mean
    and the Trainer divides by the accumulation steps. ``w_s`` are the Selector's importance
    weights.
Optimizer steps
    A callback calls ``selector.step()`` at every real optimizer step (``on_step_end``), so
    the curriculum and the table's visit steps follow optimizer steps, not micro-batches. It
    also sets ``state.epoch`` from the Selector's own position (the Trainer's fraction assumes
    full-length epochs). It runs before every other callback, so a callback that stops
    training (``control.should_training_stop``) stops it as with a plain Trainer.
Metrics
    ``log`` adds ``selector.metrics()`` to training logs as ``geko/...`` entries (bucket
    counts, forwarded, backpropagated, saved_fraction, epoch_length, phase, ...). Under DDP
    the counts of samples and tokens are summed over the ranks (one collective at each log)
    and the saved fractions computed from the sums: every rank logs the run's figures.
Checkpoints and resume
    ``_save_checkpoint`` writes ``selector.state_dict()`` to ``geko_selector.pt`` in the
    checkpoint folder (``geko_selector_rank<r>.pt`` per rank under DDP), through a temporary
    file and ``os.replace``, *before* the Trainer writes its state, so any checkpoint the
    Trainer can resume from holds the Selector's state. Arrays are stored as tensors, so
    ``torch.load(weights_only=True)`` reads it. At ``train(resume_from_checkpoint=...)`` the
    state is loaded before the data loader is built. The Selector resumes at its own position
    inside the epoch, so the Trainer must not skip batches: ``args.ignore_data_skip`` is
    forced to True, and the epoch the Trainer resumes in is the Selector's epoch (the
    Trainer's own guess, ``global_step // steps_per_epoch``, assumes full-length epochs).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable

import torch

try:
    import transformers
    from transformers import Trainer
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "geko_core.integrations.hf needs transformers (and accelerate): pip install 'geko_core[hf]'"
    ) from error

from ..selector import Selector
from ._common import flat_metrics, global_metrics
from ._hf_data import (
    GEKO_INDEX_KEY,
    GekoIndexCollator,
    GekoIndexedDataset,
    load_selector_state,
    save_selector_state,
    selector_state_file,
)
from ._hf_model import bound_argument, is_causal_lm, output_head, passthrough
from ._hf_selector import GekoStepCallback, build_selector, check_selector

__all__ = [
    "GEKO_INDEX_KEY",
    "output_head",
    "GekoIndexCollator",
    "GekoIndexedDataset",
    "GekoTrainer",
    "GekoTrainerMixin",
    "load_selector_state",
    "save_selector_state",
    "selector_state_file",
]


# -- trainer ------------------------------------------------------------------------------------
class GekoTrainerMixin:
    """The Selector wiring of :class:`GekoTrainer`, for any ``transformers.Trainer`` subclass.

    Put it before the Trainer class it extends among the bases::

        class MyGekoTrainer(GekoTrainerMixin, MyTrainer):   # MyTrainer subclasses transformers.Trainer
            pass

    It overrides the Trainer's sampler, data loader, training length, scheduler, epoch loop,
    ``compute_loss`` (training batches only), ``prediction_step``, ``log`` and
    ``_save_checkpoint``, and calls ``super()`` in each, so the other class's versions still
    run where the mixin defers to them (evaluation loss, logging, checkpoint writing). A
    training loss the other class computes in its own ``compute_loss`` is replaced by the
    Selector's weighted loss; subclasses change how through three hooks:
    :meth:`_geko_labels` (the labels the statistics and the loss count),
    :meth:`_geko_model_inputs` (what the model is called with) and :meth:`_geko_loss` (the
    weighted loss from the logits). :class:`~geko_core.integrations.trl.GekoSFTTrainer` is
    such a composition.

    Takes the keyword arguments documented in :class:`GekoTrainer`; every other argument goes
    to the Trainer class.
    """

    #: Batch fields the data loader adds for the Selector (never passed to the model).
    _geko_batch_keys: tuple[str, ...] = (GEKO_INDEX_KEY,)
    #: Wraps the data collator; puts the indices back into each training batch.
    _geko_collator_class: type = GekoIndexCollator

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(GekoTrainerMixin):
            # The Trainer's methods would shadow the mixin's, and its __init__ never reaches it.
            raise TypeError(
                f"{cls.__name__}: GekoTrainerMixin must come before the transformers.Trainer class among the bases, "
                "e.g. class MyTrainer(GekoTrainerMixin, SomeTrainer)"
            )

    def __init__(
        self,
        *args: Any,
        selector: Selector | None = None,
        geko_policy: Any = "geko",
        geko_options: dict[str, Any] | None = None,
        geko_config: Any = None,
        geko_shift: bool | None = None,
        geko_fused_head: bool = False,
        geko_inplace_backward: bool = False,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        if not isinstance(self, Trainer):
            raise TypeError(
                f"{name}: GekoTrainerMixin extends a transformers.Trainer class; "
                "e.g. class MyTrainer(GekoTrainerMixin, SomeTrainer)"
            )
        if not hasattr(Trainer, "_run_epoch"):
            raise ImportError(
                f"{name} needs the epoch loop of transformers 5 (Trainer._run_epoch); found transformers {transformers.__version__}"
            )
        if selector is not None and not isinstance(selector, Selector):
            raise TypeError(f"selector must be a geko_core.Selector or None, got {type(selector).__name__}")
        if geko_shift is not None and not isinstance(geko_shift, bool):
            raise TypeError(f"geko_shift must be a bool or None, got {type(geko_shift).__name__}")
        for option, value in (("geko_fused_head", geko_fused_head), ("geko_inplace_backward", geko_inplace_backward)):
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be a bool, got {type(value).__name__}")
        if (geko_fused_head or geko_inplace_backward) and type(self)._geko_loss is not GekoTrainerMixin._geko_loss:
            raise ValueError(f"{name} computes its own loss: geko_fused_head and geko_inplace_backward are not supported")
        train_dataset = bound_argument(super().__init__, args, kwargs, "train_dataset")
        if train_dataset is not None:
            GekoIndexedDataset(train_dataset)  # refuses iterable datasets before the Trainer does
        super().__init__(*args, **kwargs)
        if self.train_dataset is not None:
            self.train_dataset = GekoIndexedDataset(self.train_dataset)
        self.data_collator = self._geko_collator_class(self.data_collator)
        self._selector = selector
        self._geko_policy = geko_policy
        self._geko_options = geko_options
        self._geko_config = geko_config
        self._geko_shift = geko_shift
        self._geko_fused_head = geko_fused_head
        self._geko_inplace_backward = geko_inplace_backward
        if geko_fused_head and self.model is not None:
            output_head(self.model)  # refuses a model whose logits are not lm_head(hidden states)
        if selector is not None:
            self._adopt(selector)
        # The Selector resumes at its own position; the Trainer must not fast-forward the data.
        self.args.ignore_data_skip = True
        self.callback_handler.callbacks.insert(0, GekoStepCallback(self))

    # -- the Selector ---------------------------------------------------------------------------
    @property
    def selector(self) -> Selector:
        if self._selector is None:
            self._selector = self._build_selector()
            self._adopt(self._selector)
        return self._selector

    def _build_selector(self) -> Selector:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset to build its Selector")
        return build_selector(
            self.args, len(self.train_dataset), self._train_batch_size, type(self).__name__, policy=self._geko_policy,
            config=self._geko_config, policy_options=self._geko_options, **self._geko_selector_options(),
        )

    def _geko_selector_options(self) -> dict[str, Any]:
        """Further keyword arguments of the Selector built by default (e.g. ``sample_tokens``)."""
        return {}

    def _adopt(self, selector: Selector) -> None:
        size = None if self.train_dataset is None else len(self.train_dataset)
        check_selector(selector, self.args, size, self._train_batch_size, type(self).__name__)

    # -- data -----------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        # The index, and the labels even for a model whose forward does not take them (the
        # loss is computed here, not by the model).
        for column in (GEKO_INDEX_KEY, "labels"):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        return self.selector.sampler

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is not None and not isinstance(self.train_dataset, GekoIndexedDataset):
            self.train_dataset = GekoIndexedDataset(self.train_dataset)
        if not isinstance(self.data_collator, GekoIndexCollator):
            self.data_collator = GekoIndexCollator(self.data_collator)
        dataloader = super().get_train_dataloader()
        # The Selector already gives this rank its shard; accelerate's BatchSamplerShard would
        # shard it again (and pad the last batch with samples from the epoch's start).
        shard = getattr(dataloader, "batch_sampler", None)
        inner = getattr(shard, "batch_sampler", None)
        if inner is not None and getattr(inner, "sampler", None) is self.selector.sampler:
            shard.num_processes = 1
            shard.process_index = 0
            shard.even_batches = False
        return dataloader

    def _epoch_batches(self, samples: int) -> int:
        batch = self._train_batch_size
        return samples // batch if self.args.dataloader_drop_last else math.ceil(samples / batch)

    # -- training length ------------------------------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        values = list(super().set_initial_training_values(args, dataloader))
        (num_train_epochs, _, num_examples, num_train_samples, total_batch, _, max_steps) = values
        selector = self.selector
        gas = args.gradient_accumulation_steps
        full_batches = max(self._epoch_batches(math.ceil(selector.num_samples / selector.num_replicas)), 1)
        updates_per_epoch = max(math.ceil(full_batches / gas), 1)
        if args.max_steps > 0:
            # Shorter epochs: as many as it takes; DefaultFlowCallback stops at max_steps.
            num_train_epochs = sys.maxsize
        else:
            num_train_epochs = selector.epochs
            max_steps = selector.epochs * updates_per_epoch
        return (num_train_epochs, updates_per_epoch, num_examples, num_train_samples, total_batch, full_batches, max_steps)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        created_here = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if not created_here or self.args.max_steps > 0 or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return scheduler  # a scheduler passed in by the user is theirs to plan
        selector = self.selector

        def follow_progress(fn: Callable[[float], float]) -> Callable[[int], float]:
            def factor(_step: int) -> float:
                return fn(selector.progress() * num_training_steps)

            return factor

        # The step argument is ignored: shorter epochs must not stop the schedule half-way.
        scheduler.lr_lambdas = [follow_progress(fn) for fn in scheduler.lr_lambdas]
        return scheduler

    def _inner_training_loop(self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        selector = self.selector
        if resume_from_checkpoint is not None:
            load_selector_state(
                selector, selector_state_file(resume_from_checkpoint, selector.rank, selector.num_replicas)
            )
        return super()._inner_training_loop(
            batch_size=batch_size,
            args=args,
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
        )

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial):
        epochs_trained, _ = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None:
            return epochs_trained, 0
        selector = self.selector
        return selector.epoch + int(selector.epoch_consumed), 0

    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, **kwargs):
        selector = self.selector
        selector.set_epoch(epoch)
        batches = self._epoch_batches(selector.remaining)
        if batches == 0:  # nothing planned for this rank this epoch
            self.control = self.callback_handler.on_epoch_end(self.args, self.state, self.control)
            return None
        updates = math.ceil(batches / self.args.gradient_accumulation_steps)
        return super()._run_epoch(
            model=model,
            epoch=epoch,
            train_dataloader=train_dataloader,
            steps_in_epoch=batches,
            num_update_steps_per_epoch=updates,
            **kwargs,
        )

    # -- loss -----------------------------------------------------------------------------------
    def _shift(self) -> bool:
        if self._geko_shift is None:
            self._geko_shift = is_causal_lm(self.model) or bool(getattr(self, "_loss_shifts_labels", False))
        return self._geko_shift

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or GEKO_INDEX_KEY not in inputs:
            if model.training:
                raise ValueError(
                    f"a training batch without {GEKO_INDEX_KEY!r}: {type(self).__name__}'s data loader adds it; "
                    "do not replace get_train_dataloader's dataset or collator"
                )
            # Evaluation: the Selector only learns from training batches.
            inputs = self._geko_without_batch_keys(inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if "labels" not in inputs:
            raise ValueError(f"{type(self).__name__} needs 'labels' in every training batch (-100 marks tokens that do not count)")
        idx = inputs[GEKO_INDEX_KEY]
        labels = self._geko_labels(inputs)
        extra: dict[str, Any] = {}
        if self._geko_fused_head:
            # The model runs as usual (DDP and hooks included) with its output layer passed
            # through: "logits" are the last hidden states; the loss applies the head in chunks.
            head = output_head(model)
            with passthrough(head):
                outputs = model(**self._geko_model_inputs(inputs))
            extra["lm_head"] = head
        else:
            outputs = model(**self._geko_model_inputs(inputs))
            if self._geko_inplace_backward:
                extra["inplace_backward"] = True
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if num_items_in_batch is not None:
            loss = self._geko_loss(logits, labels, idx, inputs, reduction="sum", **extra)
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                # DDP averages gradients over ranks while num_items_in_batch counts all ranks.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self.loss_is_scaled_for_ga = True
        else:
            loss = self._geko_loss(logits, labels, idx, inputs, reduction="mean", **extra)
            self.loss_is_scaled_for_ga = False
        return (loss, outputs) if return_outputs else loss

    def _geko_labels(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Labels of a training batch as the statistics and the loss count them (-100: not counted)."""
        return inputs["labels"]

    def _geko_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """What the model is called with: the batch without the labels (the loss is computed
        here, not by the model) and without the Selector's fields."""
        return {k: v for k, v in inputs.items() if k != "labels" and k not in self._geko_batch_keys}

    def _geko_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, inputs: Mapping[str, Any], *, reduction: str,
        lm_head: Any = None, inplace_backward: bool = False,
    ) -> torch.Tensor:
        """The Selector's weighted loss of a training batch (``"sum"`` or ``"mean"`` over valid
        target tokens); it feeds the batch's per-sample statistics to the Selector. With
        ``lm_head``, ``logits`` are the last hidden states."""
        return self.selector.loss(
            logits, labels, idx, shift=self._shift(), reduction=reduction, lm_head=lm_head,
            inplace_backward=inplace_backward,
        )

    def _geko_without_batch_keys(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k not in self._geko_batch_keys}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluating on the (index-carrying) training set must not pass the index to the model.
        inputs = self._geko_without_batch_keys(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # -- metrics and checkpoints ------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._selector is not None and ("loss" in logs or "train_loss" in logs):
            # Every rank logs at the same steps (the Trainer gathers the loss there too).
            metrics = global_metrics(self._selector, self._geko_sum_over_ranks)
            logs = {**logs, **flat_metrics(metrics)}
        super().log(logs, start_time)

    def _geko_sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (one collective)."""
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum")

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self._selector is not None:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            selector = self._selector
            save_selector_state(selector, selector_state_file(folder, selector.rank, selector.num_replicas))
        super()._save_checkpoint(model, trial)


class GekoTrainer(GekoTrainerMixin, Trainer):
    """A ``transformers.Trainer`` whose training epochs are planned by a geko Selector.

    Takes every argument of ``transformers.Trainer`` plus:

    Args:
        selector: a ready :class:`~geko_core.Selector` for ``len(train_dataset)`` samples; by
            default one is built at the start of training from the options below, the
            training arguments (epochs or ``max_steps``, ``data_seed``/``seed``) and the
            process layout.
        geko_policy: policy name or object of the Selector built by default (``"geko"``,
            ``"infobatch"``, ``"uniform"``, ``"random_subset"``; the meta-batch policies
            ``"es"``/``"eswp"`` need a forward pass before selection and are refused).
        geko_options: ``policy_options`` of that Selector.
        geko_config: its :class:`~geko_core.GekoConfig`.
        geko_shift: causal shift of the labels in the loss and statistics; None detects it
            as the Trainer does (True for causal language models).
        geko_fused_head: compute the loss and the statistics from the last hidden states
            and the output layer, chunk by chunk (``linear_cross_entropy_with_stats``): the
            ``[B, T, V]`` logits never exist. For causal LMs whose logits are
            ``lm_head(last hidden state)`` (LLaMA- and GPT-2-style; refused otherwise). The
            model still runs through its own forward (DDP included), with the output layer
            passed through; under DDP keep ``ddp_find_unused_parameters`` off.
        geko_inplace_backward: without ``geko_fused_head``, the logits' gradient overwrites
            the logits (``cross_entropy_with_stats(inplace_backward=True)``): one logits-sized
            buffer less.

    Attributes:
        selector: the Selector (built on first access once ``train_dataset`` is known).

    All of it is :class:`GekoTrainerMixin`; compose that with another Trainer subclass the
    same way (``class MyGekoTrainer(GekoTrainerMixin, MyTrainer)``).
    """

