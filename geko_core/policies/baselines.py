"""The honest baselines: full data, and a random subset of the same budget (in either signal:
they plan without looking at the table, so they serve supervised and RL loops alike)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext


class UniformPolicy(Policy):
    """Every sample once per epoch, shuffled, weight 1: plain full-data training (in an RL
    loop, every prompt rolled out every epoch: vanilla GRPO)."""

    name = "uniform"
    signal = "any"

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
        unit: ``"samples"`` (the budget is a share of the samples) or ``"tokens"`` (a share of
            the tokens, ``Selector(sample_tokens=...)``: the random order is cut where its
            tokens reach the budget), so a language-model baseline costs what the policy
            under test cost in the unit compute is paid in.
        filter_groups: in an RL loop, also fill each batch with informative groups after the
            rollout, as dynamic sampling does (the random baseline of a policy that does).
    """

    name = "random_subset"
    signal = "any"

    def __init__(self, budget: float = 0.5, *, rescale: bool = False, unit: str = "samples", filter_groups: bool = False) -> None:
        super().__init__()
        self._set_filter_groups(filter_groups)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"random_subset budget must be a fraction in (0, 1], got {budget!r}")
        if unit not in ("samples", "tokens"):
            raise ValueError(f"random_subset unit must be 'samples' or 'tokens', got {unit!r}")
        self.budget = float(budget)
        self.rescale = bool(rescale)
        self.unit = unit

    def bind(self, context: PolicyContext) -> None:
        if self.unit == "tokens" and context.sample_tokens is None:
            raise ValueError("random_subset with unit='tokens' needs Selector(sample_tokens=...)")
        super().bind(context)

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        n = context.num_samples
        order = context.rng(epoch).permutation(n).astype(np.int64)
        if self.unit == "tokens":
            spent = np.cumsum(context.sample_tokens[order])
            size = max(1, int(np.searchsorted(spent, self.budget * spent[-1], side="left")) + 1)
            size = min(size, n)
        else:
            size = max(1, int(round(self.budget * n)))
        chosen = order[:size]
        weight = 1.0 / self.budget if self.rescale else 1.0
        return Plan(chosen, np.full(size, weight, dtype=np.float32))

    def metrics(self) -> dict[str, Any]:
        return {"budget": self.budget, "unit": self.unit}


class FullPolicy(UniformPolicy):
    """``"full"``: :class:`UniformPolicy` under the name RL results use for vanilla GRPO."""

    name = "full"
