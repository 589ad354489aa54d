"""GEKO in an RL loop: its buckets read from reward history, its curriculum as a moving
preferred pass-rate band, frozen prompts revisited stalest first (``docs/policies.md``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_UNSEEN
from .base import Plan, Policy, PolicyContext, RolloutBatch
from .geko import GekoPolicy

__all__ = ["GekoRolloutPolicy"]

#: The planner refuses positive rates below this.
_MIN_POSITIVE_RATE = 1e-6


class GekoRolloutPolicy(GekoPolicy):
    """GEKO's buckets from the ``RolloutTable`` (rewards mode).

    What the buckets mean when the signal is a group's pass rate (the table sets them after
    every visit): **FREEZE** the last group was all right (zero variance, pass rate >= 0.5):
    solved, no gradient; **HARD** all wrong: never solved at the last visit, no gradient;
    **FOCUS** a mixed group (pass rate <= ``light_above``): the most signal; **LIGHT** a mixed
    group that is nearly solved; **UNSEEN** never rolled out.

    An epoch's expected copies per prompt (rates, at training progress ``p``):

    * UNSEEN 1 (a prompt must be rolled out once to be known); FOCUS 1.
    * LIGHT ``min(1, curriculum LIGHT rate)``: in full while the curriculum prefers easy
      prompts (WARMUP, CONSOLIDATE), thinned to its ``min_rate`` while it prefers hard ones.
    * HARD ``min(1, hard_rate * curriculum HARD rate)``: a low rate that the curriculum
      raises in its PEAK (2.5 × ``hard_rate``) and lowers at the ends; never above 1, so a
      prompt that is never solved never draws extra rollouts.
    * FREEZE: the curriculum's revisit fraction, raised by the quality guard to
      ``min_revisit + revisit_gain × forgetting``; the planner revisits the *stalest* frozen
      prompts first (smallest ``last_step``). Forgetting is measured: a revisit (a frozen
      prompt's first visit of an epoch) that comes back no longer solved is a failed one.

    So the curriculum moves the preferred pass-rate band easy → hard → easy over training
    (LIGHT, then FOCUS and HARD, then LIGHT again), within one rollout per prompt. A
    ``budget`` (share of the prompts per epoch) scales LIGHT, FOCUS and HARD by one common
    factor and caps FREEZE's revisits at it (GEKO's budget fit). ``final_full`` (off by
    default in RL) makes the last share of training roll out every prompt once, HARD still
    at its rate. Weights: ``"none"`` by default (a skipped prompt was zero-variance, so the
    gradient of the kept ones needs no correction); GEKO's ``"thinning"``/``"unbiased"``
    are available.

    Args:
        curriculum: a :class:`~geko_core.MountainCurriculum` (default: the default one).
        hard_rate: the HARD rate at curriculum HARD rate 1, in [0, 1].
        weighting, max_weight, budget, budget_unit, guard, min_revisit, revisit_gain,
            final_full: as :class:`~geko_core.policies.GekoPolicy`.
        filter_groups: also fill each batch with informative groups after the rollout, as
            dynamic sampling does.
    """

    name = "geko"
    signal = "rewards"

    def __init__(
        self,
        curriculum: Any = None,
        *,
        hard_rate: float = 0.1,
        weighting: str = "none",
        max_weight: float | str | None = "auto",
        budget: float | None = None,
        budget_unit: str = "samples",
        guard: bool = True,
        min_revisit: float = 0.1,
        revisit_gain: float = 2.0,
        final_full: float = 0.0,
        filter_groups: bool = False,
    ) -> None:
        super().__init__(
            curriculum, weighting=weighting, max_weight=max_weight, budget=budget, budget_unit=budget_unit, guard=guard,
            min_revisit=min_revisit, revisit_gain=revisit_gain, final_full=final_full,
        )
        self._set_filter_groups(filter_groups)
        if isinstance(hard_rate, bool) or not isinstance(hard_rate, (int, float)) or not 0.0 <= hard_rate <= 1.0:
            raise ValueError(f"hard_rate must be a number in [0, 1], got {hard_rate!r}")
        self.hard_rate = float(hard_rate)

    def rl_rates(self, progress: float) -> np.ndarray:
        """float64 ``[5]`` rates (bucket-code order) at ``progress``, before the guard and the
        budget."""
        curriculum = np.asarray(self.curriculum.rates(progress), dtype=np.float64)
        rates = curriculum.copy()
        rates[BUCKET_LIGHT] = min(curriculum[BUCKET_LIGHT], 1.0)
        rates[BUCKET_FOCUS] = min(curriculum[BUCKET_FOCUS], 1.0)
        hard = min(1.0, self.hard_rate * curriculum[BUCKET_HARD])
        rates[BUCKET_HARD] = max(hard, _MIN_POSITIVE_RATE) if hard > 0 else 0.0
        rates[BUCKET_UNSEEN] = 1.0
        return rates

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        table = context.table
        buckets = table.field("bucket")
        rates = self.rl_rates(progress)
        self._last_frozen = int((buckets == BUCKET_FREEZE).sum())
        if self.guard:
            self._update_forgetting()
            rates[BUCKET_FREEZE] = min(1.0, max(rates[BUCKET_FREEZE], self.min_revisit + self.revisit_gain * self.forgetting))
        if self.final_full > 0:
            done = (epoch + 1) / context.epochs if context.epochs else progress
            if done > 1.0 - self.final_full + 1e-9:
                full = np.maximum(rates, 1.0)
                full[BUCKET_HARD] = rates[BUCKET_HARD]
                rates = full
        rates, _ = self._budgeted(context, rates, buckets)
        self._last_rates = rates
        plan = self._planner.plan(buckets, rates, epoch=epoch, last_visit_step=table.field("last_step"))
        weights = self._weighted(np.asarray(plan.weights, dtype=np.float32))
        if self.max_weight is not None:
            weights = np.minimum(weights, np.float32(self.max_weight))
        return Plan(np.asarray(plan.indices, dtype=np.int64), weights)

    def observe(self, batch: Any, table: Any) -> None:
        raise TypeError("the RL geko policy learns from rewards (Selector.observe_rewards), not from logits")

    def observe_rollouts(self, batch: RolloutBatch, table: Any) -> None:
        indices = batch.indices
        if self._rows is not None:
            self._rows += len(indices)
        if not self.guard:
            Policy.observe_rollouts(self, batch, table)
            return
        before = table.buckets(indices)
        Policy.observe_rollouts(self, batch, table)
        after = table.buckets(indices)
        # A revisit is a frozen prompt's first visit of the epoch (a repeat later in the same
        # batch or epoch is not another one).
        first = np.zeros(len(indices), dtype=bool)
        first[np.unique(indices, return_index=True)[1]] = True
        revisit = first & (self._seen_epoch[indices] != batch.epoch) & (before == BUCKET_FREEZE)
        self._seen_epoch[indices] = batch.epoch
        self.revisits += int(revisit.sum())
        self.failed_revisits += int((revisit & (after != BUCKET_FREEZE)).sum())

    def metrics(self) -> dict[str, Any]:
        out = super().metrics()
        out["hard_rate"] = self.hard_rate
        out["frozen"] = self._last_frozen
        return out
