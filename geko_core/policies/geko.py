"""GEKO: buckets from the table, a mountain curriculum, and an epoch that really shrinks."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext


class GekoPolicy(Policy):
    """FREEZE skipped (revisited stalest-first), LIGHT thinned, FOCUS kept, HARD oversampled.

    Per-bucket rates (expected copies per epoch) come from the curriculum at the current
    training progress; the planner draws the epoch and gives every copy its importance
    weight ``1 / rate``.

    Weighting modes:

    * ``"thinning"`` (default): a sample drawn at a rate below 1 (thinned LIGHT, revisited
      FREEZE) is weighted ``1 / rate``, as InfoBatch rescales the samples it keeps, so
      skipping easy samples does not bias the gradient; a HARD sample drawn more than once
      keeps weight 1 per copy, so it really gets more attention.
    * ``"unbiased"``: every copy weighted ``1 / rate``: the expected summed gradient of an
      epoch equals a full epoch's, and the curriculum only changes the variance.
    * ``"none"``: weight 1 everywhere (the curriculum's emphasis, uncorrected).

    Args:
        curriculum: a :class:`~geko_core.MountainCurriculum` (phases, rate limits and the
            FREEZE revisit fraction); the default one otherwise.
        weighting: ``"thinning"``, ``"unbiased"`` or ``"none"`` (above).
        budget: optional cap on an epoch's expected size as a fraction of the data set. When
            the curriculum's rates would plan more, the LIGHT, FOCUS and HARD rates are scaled
            down by one common factor (found by bisection) until the expected size fits;
            UNSEEN samples are always drawn once and FREEZE keeps its revisit rate. Weights
            follow the scaled rates, so thinning stays unbiased.
        max_weight: cap on a weight (variance guard); ``None`` for no cap; ``"auto"`` (default)
            caps at 2 when a ``budget`` is set (deep thinning makes large weights whose
            variance cost more accuracy than their bias in our measurements) and not otherwise.
    """

    name = "geko"

    def __init__(
        self,
        curriculum: Any = None,
        *,
        weighting: str = "thinning",
        max_weight: float | str | None = "auto",
        budget: float | None = None,
    ) -> None:
        super().__init__()
        from ..curriculum import MountainCurriculum

        if curriculum is None:
            curriculum = MountainCurriculum()
        if not isinstance(curriculum, MountainCurriculum):
            raise TypeError(f"curriculum must be a MountainCurriculum, got {type(curriculum).__name__}")
        if weighting not in ("thinning", "unbiased", "none"):
            raise ValueError(f"weighting must be 'thinning', 'unbiased' or 'none', got {weighting!r}")
        if max_weight == "auto":
            max_weight = 2.0 if budget is not None else None
        if max_weight is not None and (isinstance(max_weight, (str, bool)) or not max_weight >= 1.0):
            raise ValueError(f"max_weight must be >= 1 or None, got {max_weight}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0):
            raise ValueError(f"budget must be a fraction in (0, 1] or None, got {budget!r}")
        self.budget = None if budget is None else float(budget)
        self.curriculum = curriculum
        self.weighting = weighting
        self.max_weight = max_weight
        self._planner = None
        self._last_rates: np.ndarray | None = None

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        from ..planner import EpochPlanner

        # A global plan: the epoch object shards it.
        self._planner = EpochPlanner(context.num_samples, seed=context.seed)

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        table = context.table
        rates = np.asarray(self.curriculum.rates(progress), dtype=np.float64)
        buckets = table.field("bucket")
        if self.budget is not None:
            rates = self._fit_budget(rates, np.bincount(buckets, minlength=len(rates)).astype(np.float64))
        self._last_rates = rates
        plan = self._planner.plan(
            buckets,
            rates,
            epoch=epoch,
            last_visit_step=table.field("last_step"),
        )
        weights = np.asarray(plan.weights, dtype=np.float32)
        if self.weighting == "none":
            weights = np.ones_like(weights)
        elif self.weighting == "thinning":
            weights = np.maximum(weights, np.float32(1.0))
        if self.max_weight is not None:
            weights = np.minimum(weights, np.float32(self.max_weight))
        return Plan(np.asarray(plan.indices, dtype=np.int64), weights)

    def _fit_budget(self, rates: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Scale the LIGHT/FOCUS/HARD rates so the expected epoch is at most budget * N."""
        from ..config import BUCKET_FOCUS, BUCKET_HARD, BUCKET_LIGHT

        scaled = np.zeros(len(rates), dtype=bool)
        scaled[[BUCKET_LIGHT, BUCKET_FOCUS, BUCKET_HARD]] = True
        target = self.budget * counts.sum()
        fixed = float((counts * rates)[~scaled].sum())
        variable = float((counts * rates)[scaled].sum())
        if fixed + variable <= target or variable <= 0.0:
            return rates
        # The planner refuses positive rates below 1e-6; the expected size is linear in the
        # factor above that floor, so the bisection converges to the exact fit.
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (low + high)
            trial = np.where(scaled & (rates > 0), np.maximum(rates * mid, 1e-6), rates)
            if float((counts * trial).sum()) > target:
                high = mid
            else:
                low = mid
        return np.where(scaled & (rates > 0), np.maximum(rates * low, 1e-6), rates)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.budget is None else {"budget": self.budget}
        if self._last_rates is not None:
            out["rates"] = [float(r) for r in self._last_rates]
        return out
