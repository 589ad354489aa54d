"""InfoBatch (ICLR 2024): prune below-mean-loss samples at random, rescale, anneal."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext, StatsBatch


class InfoBatchPolicy(Policy):
    """Each epoch, samples whose last loss is below the mean are "well learned": a random
    ``prune_ratio`` of them is skipped and the kept ones are weighted ``1 / (1 - prune_ratio)``;
    the last ``1 - delta`` of the epochs use the full data (annealing).

    Scores start at 3.0 (the loss of an unseen sample, as in InfoBatch) and take each
    sample's latest finite loss.
    """

    name = "infobatch"
    initial_score = 3.0

    def __init__(self, prune_ratio: float = 0.5, delta: float = 0.875) -> None:
        super().__init__()
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {delta}")
        self.prune_ratio = float(prune_ratio)
        self.delta = float(delta)
        self.scores: np.ndarray | None = None

    def bind(self, context: PolicyContext) -> None:
        if context.epochs is None:
            raise ValueError("policy 'infobatch' anneals over a known number of epochs: pass epochs= to the Selector")
        super().bind(context)
        self.scores = np.full(context.num_samples, self.initial_score, dtype=np.float32)

    def observe(self, batch: StatsBatch, table) -> None:
        super().observe(batch, table)
        finite = np.isfinite(batch.loss)
        self.scores[batch.indices[finite]] = batch.loss[finite]

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        from ..planner import infobatch_plan

        plan = infobatch_plan(
            self.scores,
            epoch=epoch,
            num_epochs=context.epochs,
            prune_ratio=self.prune_ratio,
            delta=self.delta,
            seed=context.seed,
        )
        return Plan(np.asarray(plan.indices, dtype=np.int64), np.asarray(plan.weights, dtype=np.float32))

    def metrics(self) -> dict[str, Any]:
        return {"mean_score": float(self.scores.mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = np.asarray(state["scores"])
        if scores.shape != self.scores.shape or scores.dtype != np.float32:
            raise ValueError(f"infobatch scores must be float32 [{len(self.scores)}], got {scores.dtype} {scores.shape}")
        self.scores = scores.copy()
