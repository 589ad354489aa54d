"""The Selector in rewards mode (RL loops): its table, its input checks, its touch point
``observe_rewards`` and its counts, all on the Selector's one path (the epoch, the plan's
position, the queue, the all-gather, the step count of ``Selector._record``).

In rewards mode the sampler yields *prompt* indices; the loop rolls out G completions per
prompt, scores them with any verifier and calls ``sel.observe_rewards(idx, rewards,
lengths)``. The per-prompt rollout statistics (``geko_core.rollouts.rollout_stats``) go to
the policy through the queue as a :class:`~geko_core.policies.RolloutBatch` and from there
into the ``RolloutTable`` (``Policy.observe_rollouts``); under DDP every rank's statistics
are all-gathered first, so every rank's table stays identical. A prompt rolled out counts
as forwarded and back-propagated (its group goes to the policy-gradient step; a zero-variance
group carries no gradient), its completions' tokens as forwarded and back-propagated tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._gather import distributed
from ._queue import StatsQueue, host_copy_for
from ._selector_inputs import host_indices
from .policies.base import rollout_batch

if TYPE_CHECKING:  # pragma: no cover
    from .rollouts import RolloutStats

__all__ = ["RewardsMode", "check_rollout_inputs", "logits_only"]


def logits_only(call: str) -> TypeError:
    """The error of a logits touch point called on a Selector in rewards mode."""
    return TypeError(
        f"Selector.{call} learns from logits, but this Selector runs in rewards mode (signal='rewards'): "
        "report each batch's rewards with sel.observe_rewards(idx, rewards, lengths)"
    )


def _as_tensor(values: Any, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach()
    if isinstance(values, np.ndarray):
        return torch.from_numpy(values)
    if isinstance(values, (list, tuple)):
        return torch.as_tensor(np.asarray(values))
    raise TypeError(f"{name} must be a tensor, array or nested list, got {type(values).__name__}")


def check_rollout_inputs(rewards: Any, lengths: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rewards`` as a float tensor and ``lengths`` as a tensor (or None). Shapes and, on the
    CPU, values are checked by ``rollout_stats`` (the compiled core refuses NaN/inf rewards and
    negative lengths); on another device it reads no value (no host synchronisation), so the
    values are checked here: refused input must change nothing, and a device batch reaches
    the table one step late."""
    rewards = _as_tensor(rewards, "rewards")
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"rewards must hold real numbers, got {rewards.dtype}")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.float32)
    lengths = None if lengths is None else _as_tensor(lengths, "lengths")
    if rewards.device.type != "cpu":
        if rewards.numel() and not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards must be finite: a NaN or infinite reward (a verifier's failure?) refused, nothing changed")
        if lengths is not None and lengths.numel() and lengths.dtype != torch.bool and not lengths.is_complex():
            bad = (~torch.isfinite(lengths) | (lengths < 0)) if lengths.dtype.is_floating_point else lengths < 0
            if bool(bad.any()):
                raise ValueError("lengths must be finite and non-negative token counts")
    return rewards, lengths


class RewardsMode:
    """What a Selector holds in rewards mode: the ``RolloutConfig`` and the table factory.

    Args:
        config: a ``geko_core.rollouts.RolloutConfig`` or None (the defaults).
    """

    def __init__(self, config: Any) -> None:
        from .rollouts import RolloutConfig

        if config is None:
            config = RolloutConfig()
        if not isinstance(config, RolloutConfig):
            raise TypeError(
                f"a Selector in rewards mode takes config=geko_core.rollouts.RolloutConfig(...), got {type(config).__name__}"
            )
        self.config = config

    def new_table(self, num_samples: int) -> Any:
        from .rollouts import RolloutTable

        return RolloutTable(num_samples, self.config)

    def queue(self, selector: Any) -> StatsQueue:
        """The Selector's queue, handing :class:`RolloutBatch` es to ``observe_rollouts``."""
        return StatsQueue(lambda batch: selector.policy.observe_rollouts(batch, selector.table), selector.num_samples, rollout_batch)

    # -- the touch point -------------------------------------------------------------------
    def observe(self, sel: Any, idx: Any, rewards: Any, lengths: Any) -> "RolloutStats":
        """``Selector.observe_rewards`` (see there)."""
        from .rollouts import rollout_stats

        rewards, lengths = check_rollout_inputs(rewards, lengths)
        stats = rollout_stats(rewards, lengths, self.config)  # checks the shapes (and the values on the CPU)
        indices = host_indices(idx, sel.num_samples, expected=rewards.shape[0])
        batch, group = rewards.shape
        cpu = rewards.device.type == "cpu"
        if lengths is None:
            tokens: Any = 0
        elif cpu:
            tokens = int(round(float(lengths.to(torch.float64).sum()))) if lengths.dtype.is_floating_point else int(lengths.sum())
        else:
            tokens = lengths.to(torch.float64).sum().round().to(torch.int64)
        rows = [stats.pass_rate, stats.spread, stats.zero_variance, stats.all_right, stats.all_wrong, stats.mean_length]
        rows = [r.to(torch.float32) for r in rows]  # one dtype for the queue and the all-gather

        # Everything is checked: from here the batch changes the run.
        plan = sel._epochs.start()
        at = plan.locate(indices)
        weights = np.array(plan.batch_weights(indices, at), dtype=np.float32)
        counters = sel._counters
        zero_variance = stats.zero_variance
        counters.rollouts["rollouts"] += batch * group
        counters.rollouts["zero_variance_prompts"] = counters.rollouts["zero_variance_prompts"] + (
            int(zero_variance.sum()) if cpu else zero_variance.sum()
        )
        counters.backpropagated += batch
        counters.tokens["backpropagated"] = counters.tokens["backpropagated"] + tokens
        world = sel.num_replicas > 1 and distributed()
        if cpu and sel._host_copy is None:
            device = copier = None
            if not world:  # the host path: plain arrays, applied in this call
                rows = [r.numpy() for r in rows]
        else:  # a device's rows reach the table one step late (``_host_copy``: tests on CPU)
            device = rewards.device
            copier = sel._host_copy if sel._host_copy is not None else host_copy_for(device)
        sel._record(indices, at, weights, None, None, tokens, rows=(rows, device, copier))
        return stats

    def planned(self, sel: Any, plan: Any) -> None:
        """A started epoch's plan: count the prompts it leaves out (global draws below N)."""
        sel._counters.rollouts["skipped_prompts"] += max(0, sel.num_samples - int(plan.epoch_size))

    # -- reporting ---------------------------------------------------------------------------
    @staticmethod
    def metrics(sel: Any) -> dict[str, Any]:
        counters = sel._counters
        prompts = counters.forwarded
        zero_variance = counters.count_of("zero_variance_prompts")
        return {
            "signal": "rewards",
            "prompts": prompts,
            "rollouts": counters.count_of("rollouts"),
            "rollout_tokens": counters.tokens_of("forwarded"),
            "zero_variance_prompts": zero_variance,
            "zero_variance_share": zero_variance / prompts if prompts else 0.0,
            "skipped_prompts": counters.count_of("skipped_prompts"),
            "filter_groups": bool(sel.policy.filter_groups),
        }
