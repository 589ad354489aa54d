"""The Trainer side of :mod:`geko_core.integrations.hf` that needs no Trainer: the training
set with each item's index, the collator that carries the indices through a batch, and the
Selector's state file in a checkpoint folder.

No framework is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable

import torch

from ..checkpoint import load_verified, save_verified
from ..selector import Selector
from ._common import from_storable, to_storable

__all__ = [
    "GEKO_INDEX_KEY",
    "GekoIndexCollator",
    "GekoIndexedDataset",
    "load_selector_state",
    "save_selector_state",
    "selector_state_file",
]

#: Name of the field that carries each example's dataset index through the collator.
GEKO_INDEX_KEY = "geko_index"
_STATE_FILE = "geko_selector.pt"


class GekoIndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of dict items, each with its index added as ``"geko_index"``.

    Args:
        dataset: map-style dataset (``__getitem__`` and ``__len__``) whose items are mappings,
            e.g. ``{"input_ids": [...], "labels": [...]}`` or a ``datasets.Dataset``.
    """

    def __init__(self, dataset: Any) -> None:
        if isinstance(dataset, torch.utils.data.IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise TypeError(
                f"GekoTrainer needs a map-style train_dataset (with __getitem__ and __len__), got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(
                f"GekoTrainer needs dataset items that are mappings (e.g. {{'input_ids': ..., 'labels': ...}}), "
                f"got {type(item).__name__} at index {index}"
            )
        if GEKO_INDEX_KEY in item:
            raise ValueError(f"dataset items already hold a {GEKO_INDEX_KEY!r} field; rename it")
        return {**item, GEKO_INDEX_KEY: int(index)}


class GekoIndexCollator:
    """Wraps a data collator: takes ``"geko_index"`` out of the features, collates the rest
    with ``collator``, and returns the batch with ``"geko_index"`` as an int64 ``[B]`` tensor.
    Features without the field (evaluation sets) pass through unchanged."""

    def __init__(self, collator: Callable[[list], Any]) -> None:
        self.collator = collator

    def __call__(self, features: list) -> Any:
        if not features or not isinstance(features[0], Mapping) or GEKO_INDEX_KEY not in features[0]:
            return self.collator(features)
        indices = torch.tensor([int(f[GEKO_INDEX_KEY]) for f in features], dtype=torch.int64)
        batch = self.collator([{k: v for k, v in f.items() if k != GEKO_INDEX_KEY} for f in features])
        batch[GEKO_INDEX_KEY] = indices
        return batch


# -- checkpoint files ---------------------------------------------------------------------------
def selector_state_file(checkpoint_dir: str, rank: int = 0, world_size: int = 1) -> str:
    """Path of the Selector's state in a Trainer checkpoint folder."""
    name = _STATE_FILE if world_size <= 1 else f"geko_selector_rank{rank}.pt"
    return os.path.join(checkpoint_dir, name)


def save_selector_state(selector: Selector, path: str) -> None:
    """Write ``selector.state_dict()`` to ``path`` atomically (temporary file + ``os.replace``).

    The state's position counts the samples training consumed, not those a DataLoader
    prefetched, so a resume continues with the next batch training would have seen.
    """
    state = selector.state_dict()
    # Atomic (temporary file, fsync, rename) and checksummed: a torn or bit-flipped file is
    # refused by load_selector_state instead of resuming from silently wrong state.
    save_verified(to_storable(state), path)


def load_selector_state(selector: Selector, path: str) -> None:
    """Restore a state written by :func:`save_selector_state` into ``selector``.

    Raises:
        FileNotFoundError: no state at ``path`` (a checkpoint written without GekoTrainer?).
        ValueError: the state belongs to another data set, policy or rank layout, or the
            file is truncated or corrupt (checksum mismatch); the Selector is then unchanged.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no Selector state at {path}: this checkpoint was not written by GekoTrainer, so it cannot resume the selection exactly"
        )
    selector.load_state_dict(from_storable(load_verified(path)))
