"""The Selector's all-gathers: every rank's batch statistics, in rank order, for the table
that every rank keeps whole (docs/design.md §1)."""

from __future__ import annotations

import torch

__all__ = ["all_gather_fixed", "all_gather_padded", "distributed"]


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
