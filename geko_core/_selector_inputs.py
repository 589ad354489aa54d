"""What the Selector's calls accept, checked before anything changes: dataset indices (on the
host, or read late from a GPU), an output layer, the loss's inputs, per-sample token costs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._queue import DeviceIndices, HostCopy, host_copy_for

__all__ = ["WITH_INDEX_HINT", "batch_indices", "check_index_range", "check_loss_inputs", "check_sample_tokens", "head_parameters", "host_indices"]

WITH_INDEX_HINT = (
    "wrap your dataset in geko_core.WithIndex(dataset) so every batch starts with the samples' "
    "dataset indices, and pass those indices to the Selector"
)


def host_indices(idx: Any, num_samples: int, expected: int | None = None, *, check_range: bool = True) -> np.ndarray:
    """A batch's dataset indices as int64 numpy, checked: integers, 1-D, ``expected`` long,
    in ``[0, num_samples)``. ``check_range=False`` leaves the range to the caller
    (:func:`check_index_range`): a batch found where the plan expects it needs no check."""
    if type(idx) is torch.Tensor and idx.dtype == torch.int64 and idx.dim() == 1 and idx.is_cpu:
        # The usual batch (WithIndex's collated indices): a few attribute reads.
        array = idx.numpy()  # an integer tensor never requires grad
        if expected is not None and len(array) != expected:
            raise ValueError(f"idx has {len(array)} entries but the batch has {expected} samples; {WITH_INDEX_HINT}")
        if check_range:
            check_index_range(array, num_samples)
        return array
    if isinstance(idx, torch.Tensor):
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
            raise TypeError(f"idx must hold integer dataset indices, got a {idx.dtype} tensor; {WITH_INDEX_HINT}")
        array = idx.detach().cpu().numpy()
    elif isinstance(idx, np.ndarray):
        array = idx
    elif isinstance(idx, (list, tuple)):
        array = np.asarray(idx)
    else:
        raise TypeError(f"idx must be a tensor, array or list of dataset indices, got {type(idx).__name__}; {WITH_INDEX_HINT}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"idx must hold integer dataset indices, got dtype {array.dtype}; {WITH_INDEX_HINT}")
    if array.ndim != 1:
        raise ValueError(f"idx must be 1-D [B], got shape {tuple(array.shape)}; {WITH_INDEX_HINT}")
    if expected is not None and len(array) != expected:
        raise ValueError(f"idx has {len(array)} entries but the batch has {expected} samples; {WITH_INDEX_HINT}")
    array = array.astype(np.int64, copy=False)
    if check_range:
        check_index_range(array, num_samples)
    return array


def check_index_range(array: np.ndarray, num_samples: int) -> None:
    """Refuse an int64 index outside ``[0, num_samples)``, naming the first one."""
    # One reduction: a negative int64 read as uint64 is above any size.
    if len(array) and array.view(np.uint64).max() >= num_samples:
        bad = array[(array < 0) | (array >= num_samples)][0]
        raise IndexError(f"dataset index {int(bad)} is out of range for a Selector of {num_samples} samples")


def batch_indices(
    idx: Any, num_samples: int, expected: int | None, *, defer: bool = False, host_copy: HostCopy | None = None
) -> "np.ndarray | DeviceIndices":
    """``host_indices``, except that an integer index tensor on a GPU is not read now (that
    would synchronise with the device every step): it is copied to the host
    asynchronously and checked when its batch is applied to the table, one step later.
    Until then the batch is assumed to be the plan's next ``len(idx)`` entries, which is
    what the sampler yields; a batch that was not is reported then. ``defer``: CPU tensors
    too; ``host_copy``: the device mechanics (tests). The range of host indices is left to
    the caller (:func:`check_index_range`)."""
    if type(idx) is torch.Tensor and idx.is_cpu and not defer:
        return host_indices(idx, num_samples, expected, check_range=False)
    if (
        isinstance(idx, torch.Tensor)
        and (idx.device.type != "cpu" or defer)
        and idx.dim() == 1
        and not (idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex())
    ):
        if expected is not None and idx.shape[0] != expected:
            raise ValueError(f"idx has {idx.shape[0]} entries but the batch has {expected} samples; {WITH_INDEX_HINT}")
        return DeviceIndices(idx, copier=host_copy if host_copy is not None else host_copy_for(idx.device))
    return host_indices(idx, num_samples, expected, check_range=False)


def check_loss_inputs(
    logits: Any, labels: Any, ignore_index: Any, shift: Any, segments: Any, position_ids: Any, count: int,
    head_weight: Any, head_bias: Any, weights: Any, chunk_size: Any, backend: str | None,
) -> None:
    """The checks of ``loss``'s inputs, run before the batch starts an epoch: starting it
    plans it, and planning changes the policy's state."""
    if head_weight is not None:
        from ._linear_chunks import prepare as _prepare

        _prepare(logits, head_weight, labels, head_bias, weights, ignore_index=ignore_index, shift=shift,
                 chunk_size=chunk_size, backend=backend)
        return
    from ._inputs import prepare_inputs

    prepared = prepare_inputs(logits, labels, ignore_index=ignore_index, shift=shift, backend=backend)
    if segments is not None or position_ids is not None:
        from .segments import prepare_segments

        prepare_segments(
            segments, position_ids, count, labels=labels, labels3=prepared.labels3, shift=prepared.shift,
            ignore_index=prepared.ignore_index,
        )


def head_parameters(lm_head: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, bias)`` of an output layer given to ``Selector.loss``: an ``nn.Linear`` (or
    any module with a 2-D ``weight`` and an optional ``bias``), a ``[V, d]`` tensor, or None."""
    if lm_head is None:
        return None, None
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    weight = getattr(lm_head, "weight", None)
    if isinstance(lm_head, torch.nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        bias = getattr(lm_head, "bias", None)
        return weight, bias if isinstance(bias, torch.Tensor) else None
    raise TypeError(
        f"lm_head must be an nn.Linear-like module (a [V, d] weight, optional bias) or a [V, d] tensor, got {type(lm_head).__name__}"
    )


def check_sample_tokens(sample_tokens: Any, num_samples: int) -> np.ndarray | None:
    """``Selector(sample_tokens=)`` as a read-only int64 ``[num_samples]`` array (or None)."""
    if sample_tokens is None:
        return None
    if isinstance(sample_tokens, torch.Tensor):
        sample_tokens = sample_tokens.detach().cpu().numpy()
    sample_tokens = np.asarray(sample_tokens)
    if sample_tokens.dtype == np.bool_ or not np.issubdtype(sample_tokens.dtype, np.integer):
        raise TypeError(f"sample_tokens must hold integer token counts, got dtype {sample_tokens.dtype}")
    if sample_tokens.shape != (num_samples,):
        raise ValueError(f"sample_tokens must have shape ({num_samples},), got {sample_tokens.shape}")
    if (sample_tokens < 0).any() or sample_tokens.sum() == 0:
        raise ValueError("sample_tokens must be >= 0 with a positive total")
    sample_tokens = sample_tokens.astype(np.int64)
    sample_tokens.flags.writeable = False
    return sample_tokens
