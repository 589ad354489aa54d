"""InfoBatch (ICLR 2024): prune below-mean-loss samples at random, rescale, anneal."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext, StatsBatch


#: Largest prune ratio a budget may ask for: kept well-learned samples weigh at most 20.
MAX_BUDGET_PRUNE_RATIO = 0.95


class InfoBatchPolicy(Policy):
    """Each epoch, samples whose last loss is below the mean are "well learned": a random
    ``prune_ratio`` of them is skipped and the kept ones are weighted ``1 / (1 - prune_ratio)``;
    the last ``1 - delta`` of the epochs use the full data (annealing).

    Scores start at 3.0 (the loss of an unseen sample, as in InfoBatch) and take each
    sample's latest finite loss.

    Args:
        prune_ratio: share of the well-learned samples skipped in a pruning epoch, in [0, 1).
        delta: share of the epochs that prune, in (0, 1].
        budget: instead of a fixed ``prune_ratio``, a fraction in (0, 1] of the full data's
            cost that each pruning epoch should cost in expectation: the epoch's prune ratio
            is the one at which the samples above the mean plus the kept share of the
            well-learned ones cost ``budget`` times the whole data set, clamped to
            ``[0, 0.95]`` (so when the well-learned samples are too few to reach the budget,
            the epoch costs more; ``metrics()`` reports the ratio used and the expected
            cost). The annealing epochs still use the full data.
        unit: what the budget counts: ``"samples"`` or ``"tokens"`` (each sample's tokens,
            ``Selector(sample_tokens=...)``), so the budget can match another policy's on
            the unit compute is paid in.
    """

    name = "infobatch"
    initial_score = 3.0

    def __init__(
        self, prune_ratio: float = 0.5, delta: float = 0.875, *, budget: float | None = None, unit: str = "samples"
    ) -> None:
        super().__init__()
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {delta}")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
                raise TypeError(f"infobatch budget must be None or a fraction in (0, 1], got {type(budget).__name__}")
            if not 0.0 < float(budget) <= 1.0:
                raise ValueError(f"infobatch budget must be a fraction in (0, 1], got {budget!r}")
            budget = float(budget)
        if unit not in ("samples", "tokens"):
            raise ValueError(f"infobatch unit must be 'samples' or 'tokens', got {unit!r}")
        if unit == "tokens" and budget is None:
            raise ValueError("infobatch unit='tokens' sets what a budget counts: pass budget= too")
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.budget = budget
        self.unit = unit
        self.scores: np.ndarray | None = None
        self._last_prune_ratio = self.prune_ratio
        self._last_cost_fraction = 1.0

    def bind(self, context: PolicyContext) -> None:
        if context.epochs is None:
            raise ValueError("policy 'infobatch' anneals over a known number of epochs: pass epochs= to the Selector")
        if self.unit == "tokens" and context.sample_tokens is None:
            raise ValueError("infobatch with unit='tokens' needs Selector(sample_tokens=...)")
        super().bind(context)
        self.scores = np.full(context.num_samples, self.initial_score, dtype=np.float32)

    def budget_prune_ratio(self, context: PolicyContext) -> tuple[float, float]:
        """The prune ratio that meets the budget with the current scores, and the expected
        cost of such an epoch as a fraction of the full data's."""
        scores = self.scores
        cost = np.ones(len(scores)) if self.unit == "samples" else np.asarray(context.sample_tokens, dtype=np.float64)
        well_learned = scores.astype(np.float64) < _planner_mean(scores)  # the planner's split
        total = float(cost.sum())
        if total <= 0.0:
            return 0.0, 1.0
        learned_cost = float(cost[well_learned].sum())
        rest_cost = total - learned_cost
        ratio = 0.0
        if learned_cost > 0.0:
            ratio = 1.0 - (self.budget * total - rest_cost) / learned_cost
            ratio = min(max(ratio, 0.0), MAX_BUDGET_PRUNE_RATIO)
        return ratio, (rest_cost + (1.0 - ratio) * learned_cost) / total

    def observe(self, batch: StatsBatch, table) -> None:
        super().observe(batch, table)
        finite = np.isfinite(batch.loss)
        self.scores[batch.indices[finite]] = batch.loss[finite]

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        from ..planner import infobatch_plan

        prune_ratio = self.prune_ratio
        pruning = epoch < self.delta * context.epochs  # as the planner decides
        if self.budget is not None:
            prune_ratio, cost = self.budget_prune_ratio(context) if pruning else (0.0, 1.0)
            self._last_prune_ratio, self._last_cost_fraction = prune_ratio, cost
        plan = infobatch_plan(
            self.scores,
            epoch=epoch,
            num_epochs=context.epochs,
            prune_ratio=prune_ratio,
            delta=self.delta,
            seed=context.seed,
        )
        return Plan(np.asarray(plan.indices, dtype=np.int64), np.asarray(plan.weights, dtype=np.float32))

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean_score": float(self.scores.mean())}
        if self.budget is not None:
            out.update(
                budget=self.budget,
                unit=self.unit,
                prune_ratio=self._last_prune_ratio,
                expected_cost_fraction=self._last_cost_fraction,
            )
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = np.asarray(state["scores"])
        if scores.shape != self.scores.shape or scores.dtype != np.float32:
            raise ValueError(f"infobatch scores must be float32 [{len(self.scores)}], got {scores.dtype} {scores.shape}")
        self.scores = scores.copy()


def _planner_mean(scores: np.ndarray) -> float:
    """The mean score as the compiled planner computes it (float64 sums of fixed 32768-entry
    chunks, each summed in order, combined in order), so the well-learned split here is the
    planner's bit for bit."""
    chunk = 1 << 15
    total = 0.0
    for start in range(0, len(scores), chunk):
        total += float(np.cumsum(scores[start : start + chunk], dtype=np.float64)[-1])
    return total / len(scores) if len(scores) else 0.0
