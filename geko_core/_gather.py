"""The Selector's all-gathers: every rank's batch statistics, in rank order, for the table
that every rank keeps whole (docs/design.md §1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._queue import DeviceIndices, HostCopy

__all__ = ["all_gather_fixed", "all_gather_padded", "distributed", "gather_batch"]


def distributed() -> bool:
    """``torch.distributed`` is available and initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather_fixed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather 1-D tensors of the same length on every rank (no length exchange, so no
    host synchronisation); rank order is kept."""
    dist = torch.distributed
    world = dist.get_world_size()
    out = []
    for tensor in tensors:
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor)
        out.append(torch.cat(gathered))
    return out


def all_gather_padded(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather 1-D tensors whose length may differ per rank; rank order is kept. Reads the
    lengths on the host: for CPU (gloo) runs, GPUs use :func:`all_gather_fixed`."""
    dist = torch.distributed
    world = dist.get_world_size()
    device = tensors[0].device
    length = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = torch.cat(lengths).tolist()
    longest = max(sizes)
    out = []
    for tensor in tensors:
        padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out.append(torch.cat([g[:n] for g, n in zip(gathered, sizes)]))
    return out


def gather_batch(
    indices: Any, rows: list[torch.Tensor], real: np.ndarray | None, device: torch.device, copier: HostCopy | None, late: bool
) -> tuple[Any, list[torch.Tensor]]:
    """Under DDP, every rank's batch in rank order (the table is the same on every rank).

    On GPUs (``late``) the batch is gathered at its full size, padding copies included and
    flagged, so that no rank waits for the host to learn the lengths; the flags drop them
    when the batch is applied, one step later. Every rank trains equally long batches in
    lockstep (the sampler gives each rank the same number of samples). On CPUs the lengths
    are exchanged and the padding is dropped first."""
    if late:
        if isinstance(indices, DeviceIndices):
            idx = indices.device_tensor().to(device=device, dtype=torch.int64)
        else:
            idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(device)
        keep = torch.ones(len(idx), dtype=torch.uint8, device=device) if real is None else torch.from_numpy(real.astype(np.uint8)).to(device)
        idx, keep, *rows = all_gather_fixed([idx, keep, *rows])
        gathered = DeviceIndices(idx, keep=keep, copier=copier)
        gathered.start_copy(expected=None)
        return gathered, rows
    if real is not None:
        keep = torch.from_numpy(real)
        indices, rows = indices[real], [r[keep] for r in rows]
    idx, *rows = all_gather_padded([torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)), *rows])
    return idx.numpy(), rows
