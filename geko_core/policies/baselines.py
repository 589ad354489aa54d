"""The honest baselines: full data, and a random subset of the same budget."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext


class UniformPolicy(Policy):
    """Every sample once per epoch, shuffled, weight 1: plain full-data training."""

    name = "uniform"

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        order = context.rng(epoch).permutation(context.num_samples).astype(np.int64)
        return Plan(order, np.ones(len(order), dtype=np.float32))


class RandomSubsetPolicy(Policy):
    """A fresh uniform random subset of ``budget * N`` samples each epoch.

    The baseline every saving is measured against: the same number of back-propagated
    samples as the policy under test, chosen without looking at the data.

    Args:
        budget: fraction of the data set per epoch, in (0, 1].
        rescale: weight kept samples by ``1 / budget`` so one epoch's summed gradient matches a
            full epoch's in expectation (as InfoBatch rescales); off by default, since a
            uniform subset's batch mean is already unbiased.
    """

    name = "random_subset"

    def __init__(self, budget: float = 0.5, *, rescale: bool = False) -> None:
        super().__init__()
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"random_subset budget must be a fraction in (0, 1], got {budget!r}")
        self.budget = float(budget)
        self.rescale = bool(rescale)

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        n = context.num_samples
        size = max(1, int(round(self.budget * n)))
        chosen = context.rng(epoch).permutation(n)[:size].astype(np.int64)
        weight = 1.0 / self.budget if self.rescale else 1.0
        return Plan(chosen, np.full(size, weight, dtype=np.float32))

    def metrics(self) -> dict[str, Any]:
        return {"budget": self.budget}
