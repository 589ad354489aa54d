"""Trained batches on their way to the policy: the Selector's one queue.

Host rows (CPU statistics) are applied in the call that trained them. Rows on a GPU are
copied into pinned host buffers without blocking, an event is recorded after the copies,
and the batch is applied one step later, when the next batch is queued: the host then
waits on that event, which by then has usually completed (the copy ran behind the step's
own work). So a step never waits for its own statistics; it may wait for the previous
step's copy, a lag of at most one step (docs/design.md §1). An epoch's end, a new epoch,
``state_dict`` and ``select`` apply everything.

A batch's dataset indices may be on the GPU too (:class:`DeviceIndices`): they are read on
the host when their batch is applied, and a batch that turns out not to be the plan's next
one (its weights were taken from the plan's positions) is reported then.

The device mechanics (pinned copy, event) are a :class:`HostCopy`, which tests replace to
run this module on CPU.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .policies.base import StatsBatch

__all__ = ["CUDA_COPY", "DeviceIndices", "HostCopy", "StatsQueue", "host_copy_for"]


class HostCopy:
    """Copies device tensors to the host without blocking: a pinned buffer per tensor filled
    with ``non_blocking=True``, then one event recorded behind the copies."""

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def record(self) -> Any:
        """An object whose ``synchronize()`` waits for the copies started so far."""
        event = torch.cuda.Event()
        event.record()
        return event


class _BlockingCopy(HostCopy):
    """Devices without a pinned-copy path: copy now."""

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.cpu()

    def record(self) -> None:
        return None


CUDA_COPY = HostCopy()
_BLOCKING = _BlockingCopy()


def host_copy_for(device: torch.device) -> HostCopy | None:
    """How rows on ``device`` reach the host: None for host memory (nothing to copy)."""
    if device.type == "cpu":
        return None
    return CUDA_COPY if device.type == "cuda" else _BLOCKING


class DeviceIndices:
    """A batch's dataset indices still on their device, read on the host one step late.

    Args:
        tensor: integer ``[B]`` indices.
        keep: uint8 ``[B]`` flags of the entries that update the table (None: all), for a
            batch gathered at full size with its padding copies.
        copier: how the tensors reach the host (None: they are host memory already).
    """

    def __init__(self, tensor: torch.Tensor, keep: torch.Tensor | None = None, copier: HostCopy | None = None) -> None:
        self._tensor = tensor.detach()
        self._keep = keep
        self._copier = copier
        self._host: torch.Tensor | None = None
        self._host_keep: torch.Tensor | None = None
        self._event: Any = None
        self._expected: np.ndarray | None = None
        self._values: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self._tensor.shape[0])

    def device_tensor(self) -> torch.Tensor:
        return self._tensor

    def assume_at(self, plan: Any) -> int:
        """The plan position this batch is taken to start at: where training stands, when the
        plan has that many entries left; else -1."""
        at = plan.position
        return at if at + len(self) <= len(plan) else -1

    def masked(self, keep: torch.Tensor) -> "DeviceIndices":
        return DeviceIndices(self._tensor[keep.to(self._tensor.device)], copier=self._copier)

    def start_copy(self, expected: np.ndarray | None) -> None:
        """Start the copy to the host; ``expected`` is what the plan holds there (None: not
        checked, e.g. every rank's batch after a gather)."""
        self._expected = None if expected is None else np.array(expected, dtype=np.int64)
        if self._copier is None:
            self._host, self._host_keep = self._tensor, self._keep
            return
        self._host = self._copier.copy(self._tensor)
        if self._keep is not None:
            self._host_keep = self._copier.copy(self._keep)
        self._event = self._copier.record()

    def _wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def host_keep(self) -> np.ndarray | None:
        """bool flags of the entries that update the table (None: all); waits for the copy."""
        if self._keep is None:
            return None
        self._wait()
        return (self._host_keep if self._host_keep is not None else self._keep.cpu()).numpy().astype(bool)

    def resolve(self, num_samples: int, check_plan: bool = False) -> np.ndarray:
        """The indices as int64 numpy (waits for the copy), range-checked; with
        ``check_plan``, a batch that was not the plan's is reported."""
        if self._values is None:
            if self._host is None:
                self._host = self._tensor.cpu()
            self._wait()
            values = self._host.numpy().astype(np.int64, copy=False)
            keep = self.host_keep()
            if keep is not None:
                values = values[keep]
            if len(values) and (values.min() < 0 or values.max() >= num_samples):
                bad = values[(values < 0) | (values >= num_samples)][0]
                raise IndexError(
                    f"dataset index {int(bad)} is out of range for a Selector of {num_samples} samples "
                    "(found when its batch was applied, one step after it was trained: indices on a GPU are read late)"
                )
            self._values = values
        if check_plan and self._expected is not None and not np.array_equal(self._values, self._expected):
            warnings.warn(
                "a batch whose indices were on a GPU was not the plan's next batch: its loss weights were taken from "
                "the plan's positions. Loops that reorder or filter batches should pass idx on the CPU "
                "(sel.loss(..., idx.cpu())), which costs a synchronisation per step",
                RuntimeWarning,
                stacklevel=5,
            )
            self._expected = None
        return self._values


def _host_floats(values: Any) -> np.ndarray:
    """Contiguous float32 numpy of a queued row (a host array or a CPU tensor)."""
    if not isinstance(values, np.ndarray):
        values = values.numpy()
    return np.ascontiguousarray(values, dtype=np.float32)


class StatsQueue:
    """Trained batches, oldest first, each applied to ``observe`` (the policy) as a
    :class:`~geko_core.policies.StatsBatch` (or what ``batch`` builds).

    Args:
        observe: receives every batch, in training order.
        num_samples: the data set's size (range check of indices read late).
        batch: builds the batch handed to ``observe`` from ``(indices, *rows, step, epoch)``
            (host arrays); :class:`~geko_core.policies.StatsBatch` by default, whose rows are
            loss, confidence, correct and el2n (a Selector in rewards mode queues the rollout
            statistics' rows and builds a :class:`~geko_core.policies.RolloutBatch`).
    """

    def __init__(self, observe: Callable[[Any], None], num_samples: int, batch: Callable[..., Any] = StatsBatch) -> None:
        self._observe = observe
        self._num_samples = num_samples
        self._batch = batch
        self._pending: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def push(
        self, indices: "np.ndarray | DeviceIndices", rows: Sequence[Any], step: int, epoch: int, copier: HostCopy | None = None
    ) -> None:
        """Queue a batch: ``rows`` are its statistics (by default loss, confidence, correct and
        el2n; host arrays or CPU tensors, or device tensors with ``copier``, which starts their
        copy now)."""
        if copier is None:
            event = None
        else:
            rows = [copier.copy(r.detach()) for r in rows]
            event = copier.record()
        self._pending.append((indices, rows, event, step, epoch, False))

    def push_host(self, indices: np.ndarray, rows: Sequence[np.ndarray], step: int, epoch: int) -> None:
        """Queue a batch whose int64 indices and float32 rows are contiguous host arrays
        already (the usual CPU step): handed to ``observe`` as they are."""
        self._pending.append((indices, rows, None, step, epoch, True))

    def apply(self, keep_last: bool = False) -> None:
        """Hand the queued batches to ``observe``; ``keep_last`` leaves the newest queued (its
        copy may still be in flight)."""
        pending = self._pending
        while len(pending) > keep_last:
            indices, rows, event, step, epoch, ready = pending.pop(0)
            if ready:
                self._observe(self._batch(indices, *rows, step, epoch))
                continue
            if event is not None:
                event.synchronize()
            if isinstance(indices, DeviceIndices):
                keep = indices.host_keep()
                indices = indices.resolve(self._num_samples, check_plan=True)
                if keep is not None:  # gathered at full size: drop the padding copies now
                    rows = [torch.as_tensor(r)[torch.from_numpy(keep)] for r in rows]
            self._observe(self._batch(np.ascontiguousarray(indices, dtype=np.int64), *[_host_floats(r) for r in rows], step, epoch))

    def clear(self) -> None:
        self._pending.clear()
