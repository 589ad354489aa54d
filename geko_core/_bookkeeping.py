"""The Selector's one bookkeeping of a batch: what every touch point that trains (or rolls
out) a batch does after its own work, on the host or a GPU, in one process or under DDP."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._counters import batch_tokens
from ._gather import distributed, gather_batch
from ._queue import DeviceIndices, host_copy_for
from .types import SampleStats

__all__ = ["record_batch", "record_located"]


def record_batch(
    sel: Any, indices: "np.ndarray | DeviceIndices", at: int, weights: np.ndarray | None,
    stats: SampleStats | None, host: Any, tokens: Any, rows: tuple | None = None,
) -> None:
    """The one bookkeeping of a trained batch (every ``loss``/``observe``/``select`` and, in
    rewards mode, ``observe_rewards``): queue its statistics for the policy, count it as
    forwarded, count the step, move the epoch's position; the epoch ends here when this was
    its last batch.

    Args:
        sel: the Selector.
        indices: the batch's dataset indices (host, or still on a GPU).
        at: its plan position (-1: not where the plan expects it).
        weights: its loss weights (None: given by the caller).
        stats: its statistics; may be None when ``host`` holds them.
        host: the loss's host arrays (``cross_entropy.HostForward``: float32 ``[6, S]``
            ``values``) or None; the policy then gets these rows as they are.
        tokens: the batch's valid tokens (int, or a device tensor).
        rows: rewards mode: ``(rows, device, copier)`` of the rollout statistics
            (``geko_core._rewards``), queued instead of the loss statistics.
    """
    plan = sel._epochs.plan
    batch = indices
    count = len(indices)
    real = plan.real_mask(at, count)  # padding copies are trained with weight 0 but never update the table
    world = sel.num_replicas > 1 and distributed()
    margin = rows is None and sel.config.correct_margin > 0.0
    deferred = isinstance(indices, DeviceIndices)
    if rows is not None:
        rows, device, copier = rows
    elif host is not None and not (margin or world or sel._host_copy is not None):
        values = host.values  # the usual CPU step: rows of one host block
        rows = [values[0], values[1], values[3], values[5]]
        device = copier = None
    else:
        if stats is None:
            stats = host.stats()
        correct = stats.correct
        if margin:  # the table cannot apply the margin rule itself
            from .stats import table_correct

            correct = table_correct(stats, sel.config)
        rows = [stats.loss.detach(), stats.confidence.detach(), correct.detach(), stats.el2n.detach()]
        device = stats.loss.device
        copier = sel._host_copy if sel._host_copy is not None else host_copy_for(device)
    if world:
        late = copier is not None or deferred or sel._defer_host_indices
        indices, rows = gather_batch(indices, rows, real, device, copier, late)
    else:
        if real is not None:
            keep = real if device is None else torch.from_numpy(real).to(device)
            indices = indices.masked(torch.from_numpy(real)) if deferred else indices[real]
            rows = [r[keep] for r in rows]
        if deferred:
            expected = plan.indices[at : at + count]
            indices.start_copy(expected=expected if real is None else expected[real])
    step = sel._step if sel._explicit_steps else sel._step + 1  # the step this batch is trained in
    if device is None and not deferred:
        sel._queue.push_host(indices if indices.flags.c_contiguous else np.ascontiguousarray(indices), rows, step, sel._epochs.epoch)
    else:
        sel._queue.push(indices, rows, step, sel._epochs.epoch, copier)
    counters = sel._counters
    counters.forwarded += count
    counters.tokens["forwarded"] = counters.tokens["forwarded"] + tokens
    sel._last_batch = (
        batch if isinstance(batch, DeviceIndices) else batch.copy(), np.ones(count, dtype=np.float32) if weights is None else weights
    )
    if not sel._explicit_steps:
        sel._step += 1
    sel._queue.apply(keep_last=copier is not None)  # a GPU batch is applied one step late
    sel._epochs.trained(count)



def record_located(sel: Any, indices: np.ndarray, stats: SampleStats, *, backpropagated: bool) -> np.ndarray:
    """:func:`record_batch` for a batch scored by the caller (``observe``, ``observe_stats``,
    ``select``): located in the plan here. Returns the batch's plan weights."""
    plan = sel._epochs.start()
    at = plan.locate(indices)
    weights = np.array(plan.batch_weights(indices, at), dtype=np.float32)
    tokens = batch_tokens(stats.valid_tokens)
    if backpropagated:
        sel._counters.backpropagated += len(indices)
        sel._counters.tokens["backpropagated"] = sel._counters.tokens["backpropagated"] + tokens
    record_batch(sel, indices, at, weights, stats, None, tokens)
    return weights
