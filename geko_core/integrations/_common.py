"""What every framework integration does the same way: the Selector's state as something a
framework checkpoint holds, and ``selector.metrics()`` as flat ``geko/...`` entries.

No framework is imported here.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["flat_metrics", "from_storable", "global_metrics", "to_storable"]

_ARRAY_TAG = "__geko_ndarray__"


def to_storable(value: Any) -> Any:
    """Selector state with numpy arrays as tagged tensors and numpy scalars as Python
    numbers: what ``torch.load(weights_only=True)`` accepts."""
    if isinstance(value, np.ndarray):
        return {_ARRAY_TAG: torch.from_numpy(np.ascontiguousarray(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_storable(v) for v in value)
    return value


def from_storable(value: Any) -> Any:
    """Inverse of :func:`to_storable`: tagged tensors become numpy arrays again."""
    if isinstance(value, dict):
        if set(value) == {_ARRAY_TAG}:
            return value[_ARRAY_TAG].numpy()
        return {k: from_storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_storable(v) for v in value)
    return value


def flat_metrics(metrics: dict[str, Any], *, numeric_only: bool = False) -> dict[str, Any]:
    """``selector.metrics()`` as flat ``geko/<name>`` entries.

    Bucket counts become ``geko/bucket_<name>``, booleans 0/1, numeric lists
    ``geko/<name>_<i>``; None is left out.

    Args:
        metrics: a dict as :meth:`~geko_core.Selector.metrics` returns.
        numeric_only: leave out strings (policy and phase names) too, for loggers that only
            take numbers.
    """
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        key = name if name.startswith("geko/") else f"geko/{name}"
        if name == "buckets":
            for bucket, count in value.items():
                out[f"geko/bucket_{bucket}"] = int(count)
        elif isinstance(value, (bool, np.bool_)):
            out[key] = int(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out[key] = value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, str):
            if not numeric_only:
                out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            for i, v in enumerate(value):
                out[f"{key}_{i}"] = v
    return out


#: The counts of ``selector.metrics()`` that each rank keeps for its own shard.
_RANK_COUNTS = ("forwarded", "backpropagated", "forwarded_tokens", "backpropagated_tokens")


def global_metrics(selector: Any, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """``selector.metrics()`` for the whole run: under DDP, the samples and tokens forwarded
    and back-propagated summed over the ranks, and the saved fractions computed from those
    sums (each rank counts only its shard; the table, and so the bucket counts, is the same on
    every rank). ``overhead_seconds`` and the other timings stay this rank's own.

    Args:
        selector: a :class:`~geko_core.Selector`.
        sum_over_ranks: sums a float64 CPU tensor over the ranks (one collective, which every
            rank must call at the same point) and returns the sums; called only when the
            Selector shards over several processes.
    """
    metrics = selector.metrics()
    if selector.num_replicas <= 1:
        return metrics
    local = torch.tensor([float(metrics[name]) for name in _RANK_COUNTS], dtype=torch.float64)
    totals = sum_over_ranks(local).cpu().tolist()
    for name, total in zip(_RANK_COUNTS, totals):
        metrics[name] = int(round(total))
    # The ranks move through an epoch in lockstep, so this rank's progress is the run's.
    full = selector.epoch_progress() * selector.num_samples
    metrics["saved_fraction"] = (1.0 - metrics["backpropagated"] / full) if full > 0 else 0.0
    if "saved_token_fraction" in metrics:
        full_tokens = selector.epoch_progress() * float(selector.context.sample_tokens.sum())
        metrics["saved_token_fraction"] = (1.0 - metrics["backpropagated_tokens"] / full_tokens) if full_tokens > 0 else 0.0
    return metrics
