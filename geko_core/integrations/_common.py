"""What every framework integration does the same way: the Selector's state as something a
framework checkpoint holds, and ``selector.metrics()`` as flat ``geko/...`` entries.

No framework is imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["flat_metrics", "from_storable", "to_storable"]

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
