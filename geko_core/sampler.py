"""The map-style dataset wrapper every batch needs, and the Selector's sampler."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import Dataset, Sampler

from ._checks import check_int
from .epochs import Epochs

__all__ = ["GekoSampler", "WithIndex"]


class WithIndex(Dataset):
    """Makes a map-style dataset yield ``(index, *item)``.

    A tuple item is flattened (``(x, y)`` becomes ``(index, x, y)``); anything else becomes
    ``(index, item)``.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"WithIndex needs a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (index, *item)
        return (index, item)


class GekoSampler(Sampler[int]):
    """The Selector's sampler: yields this rank's planned indices of the current epoch.

    It behaves as ``DistributedSampler`` does: ``len()`` only answers (the current epoch's
    length; before the epoch has started, the length it would be planned with now),
    ``set_epoch`` moves to an epoch, and iterating starts the epoch (plans it, once) and
    yields from the position training has reached. An epoch ends when training has consumed
    it (the Selector then moves on by itself) or when the DataLoader has run through it and
    dropped an incomplete last batch. ``state_dict``/``load_state_dict`` carry the epoch and
    the iteration, so torchdata's ``StatefulDataLoader`` checkpoints the sampler with the loader.
    """

    def __init__(self, selector: Any) -> None:
        self._epochs: Epochs = selector._epochs

    def __len__(self) -> int:
        return len(self._epochs.preview())

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing happens before the first next() (loaders call iter() more than
        # once while they restore a checkpoint).
        yield from self._epochs.iterate()

    def set_epoch(self, epoch: int) -> None:
        self._epochs.set_epoch(check_int(epoch, "epoch", low=0))

    def state_dict(self) -> dict[str, int]:
        """Where the sampler's iteration stands: ``{"epoch": e, "yielded": n}``, plain ints,
        constant time, no side effect. A loader that checkpoints its sampler (torchdata's
        ``StatefulDataLoader`` snapshots it when it hands a batch to a worker) restores the
        iteration with it; the plan, the trained position and the table come with
        ``Selector.state_dict``."""
        return self._epochs.iteration_state()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration start where ``state`` says (after
        ``Selector.load_state_dict``). Never plans, changes the epoch or the trained position."""
        self._epochs.load_iteration_state(state)
