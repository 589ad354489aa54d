"""GEKO: buckets from the table, a mountain curriculum, and an epoch that really shrinks."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy


class GekoPolicy(Policy):
    """FREEZE skipped (revisited stalest-first), LIGHT thinned, FOCUS kept, HARD oversampled.

    Per-bucket rates (expected copies per epoch) come from the curriculum at the current
    training progress; the planner draws the epoch and gives every copy its importance
    weight ``1 / rate``, so with ``importance_weights=True`` the expected summed gradient
    of an epoch equals that of a full epoch.

    Args:
        curriculum: a :class:`~geko_core.MountainCurriculum` (phases, rate limits and the
            FREEZE revisit fraction); the default one otherwise.
        importance_weights: weight copies by 1 / expected inclusion (unbiased mode).
        max_weight: cap on an importance weight (variance guard); ``None`` for no cap.
    """

    name = "geko"

    def __init__(
        self,
        curriculum: Any = None,
        *,
        importance_weights: bool = True,
        max_weight: float | None = None,
    ) -> None:
        super().__init__()
        from ..curriculum import MountainCurriculum

        if curriculum is None:
            curriculum = MountainCurriculum()
        if not isinstance(curriculum, MountainCurriculum):
            raise TypeError(f"curriculum must be a MountainCurriculum, got {type(curriculum).__name__}")
        if max_weight is not None and not max_weight >= 1.0:
            raise ValueError(f"max_weight must be >= 1 or None, got {max_weight}")
        self.curriculum = curriculum
        self.importance_weights = bool(importance_weights)
        self.max_weight = max_weight
        self._planner = None
        self._last_rates: np.ndarray | None = None

    def bind(self, selector) -> None:
        super().bind(selector)
        from ..planner import EpochPlanner

        self._planner = EpochPlanner(selector.num_samples, seed=selector.seed)

    def plan_epoch(self, epoch: int, progress: float) -> Plan:
        table = self.selector.table
        rates = np.asarray(self.curriculum.rates(progress), dtype=np.float64)
        self._last_rates = rates
        plan = self._planner.plan(
            table.field("bucket"),
            rates,
            epoch=epoch,
            last_visit_step=table.field("last_step"),
        )
        weights = np.asarray(plan.weights, dtype=np.float32)
        if not self.importance_weights:
            weights = np.ones_like(weights)
        elif self.max_weight is not None:
            weights = np.minimum(weights, np.float32(self.max_weight))
        return Plan(np.asarray(plan.indices, dtype=np.int64), weights)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._last_rates is not None:
            out["rates"] = [float(r) for r in self._last_rates]
        return out
