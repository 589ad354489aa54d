"""The Selector that a ``transformers.Trainer``'s arguments describe, and the callback that
keeps it in step with the Trainer: the part of :mod:`geko_core.integrations.hf` that speaks
``TrainingArguments``."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from ..selector import Selector

__all__ = ["GekoStepCallback", "build_selector", "check_selector", "whole_epochs"]


class GekoStepCallback(TrainerCallback):
    """Counts optimizer steps for the Selector and keeps ``state.epoch`` truthful.

    It must run before every other callback (the Trainer's own flow callback included): they
    then see the Selector's epoch, and a stop any of them asks for is never undone.

    Args:
        trainer: the Trainer whose ``_selector`` (None until built) it steps.
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        selector = self._trainer._selector
        if selector is not None:
            selector.step()
            state.epoch = selector.epoch_progress()
            if selector.total_steps is None and state.global_step >= state.max_steps and selector.epoch < selector.epochs:
                # The Trainer's step estimate assumes epochs of N samples; the Selector's can be
                # longer (HARD copies). The run ends with the Selector's last epoch, so the flow
                # callback, which stops at max_steps, must not stop it here.
                state.max_steps = state.global_step + 1
        return control


def whole_epochs(args: Any, name: str) -> int:
    """``args.num_train_epochs`` as an int; ``name`` is the Trainer class named in the error.

    Raises:
        ValueError: not a positive whole number.
    """
    epochs = args.num_train_epochs
    if epochs <= 0 or float(epochs) != int(epochs):
        raise ValueError(
            f"{name} plans whole epochs: num_train_epochs must be a positive integer (got {epochs}); "
            "or set max_steps to train for a number of optimizer steps"
        )
    return int(epochs)


def build_selector(args: Any, num_samples: int, batch_size: int, name: str, **options: Any) -> Selector:
    """The Selector of a Trainer run: its length (``epochs`` or ``total_steps``), seed,
    process layout and batch from the training arguments; ``options`` are the Selector's
    other keyword arguments (policy, config, ...)."""
    seed = args.data_seed if args.data_seed is not None else args.seed
    length = {"total_steps": int(args.max_steps)} if args.max_steps > 0 else {"epochs": whole_epochs(args, name)}
    return Selector(
        num_samples,
        seed=int(seed),
        num_replicas=max(int(args.world_size), 1),
        rank=int(args.process_index) if args.world_size > 1 else 0,
        batch_size=batch_size,
        drop_last=bool(args.dataloader_drop_last),
        **length,
        **options,
    )


def check_selector(selector: Selector, args: Any, num_samples: int | None, batch_size: int, name: str) -> None:
    """Refuse a Selector that would plan another run than the Trainer's (``num_samples``:
    the training set's size, None when unknown yet); then let it count optimizer steps only
    when told (the callback's ``step()``).

    Raises:
        ValueError: a meta-batch policy, or another size, length, batch or process layout.
    """
    if selector.policy.meta_batch:
        raise ValueError(
            f"policy {selector.policy.name!r} selects inside a forwarded meta-batch, which {name} does not do; "
            "use 'geko', 'infobatch', 'uniform' or 'random_subset'"
        )
    if num_samples is not None and selector.num_samples != num_samples:
        raise ValueError(f"the Selector has {selector.num_samples} samples but train_dataset has {num_samples}")
    if args.max_steps > 0:
        if selector.total_steps != args.max_steps:
            raise ValueError(
                f"with max_steps={args.max_steps} the Selector must be built with total_steps={args.max_steps}, "
                f"got total_steps={selector.total_steps}, epochs={selector.epochs}"
            )
    elif selector.epochs != whole_epochs(args, name):
        raise ValueError(
            f"the Selector plans epochs={selector.epochs} (total_steps={selector.total_steps}) but "
            f"num_train_epochs={args.num_train_epochs}"
        )
    if args.dataloader_drop_last and (not selector.drop_last or selector.batch_size != batch_size):
        raise ValueError(
            f"dataloader_drop_last=True: build the Selector with batch_size={batch_size}, drop_last=True "
            f"(got batch_size={selector.batch_size}, drop_last={selector.drop_last}) so that its epochs are whole batches"
        )
    world = max(int(args.world_size), 1)
    if selector.num_replicas != world:
        raise ValueError(f"the Selector shards over {selector.num_replicas} processes, the Trainer runs {world}")
    if selector.step_count == 0:
        # Count optimizer steps from the first one (the callback calls step()); otherwise the
        # Selector counts one per micro-batch until the first explicit step.
        selector.count_steps_explicitly()
