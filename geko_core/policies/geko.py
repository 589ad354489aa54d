"""GEKO: buckets from the table, a mountain curriculum, and an epoch that really shrinks."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import BUCKET_FREEZE
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
        budget_unit: ``"samples"`` or ``"tokens"`` (the budget caps the expected tokens of an
            epoch as a share of the data set's, ``Selector(sample_tokens=...)``).
        budget: optional cap on an epoch's expected size as a fraction of the data set. When
            the curriculum's rates would plan more, the LIGHT, FOCUS and HARD rates are scaled
            down by one common factor (found by bisection) until the expected size fits;
            UNSEEN samples are always drawn once and FREEZE keeps its revisit rate. Weights
            follow the scaled rates, so thinning stays unbiased.
        max_weight: cap on a weight (variance guard); ``None`` for no cap; ``"auto"`` (default)
            caps at 2 when a ``budget`` is set (deep thinning makes large weights whose
            variance cost more accuracy than their bias in our measurements) and not otherwise.
        guard: the quality guard (on by default), see below.
        min_revisit: with the guard, the least fraction of FREEZE samples revisited per epoch
            (stalest first); the curriculum's own revisit fraction applies when it is larger.
            Its default, ``final_full``'s and ``GekoConfig.q_alpha``'s were chosen on the
            benchmark's validation splits (docs/tuning.md); ``revisit_gain`` was not tuned.
        revisit_gain: with the guard, the revisit fraction grows by this times the measured
            forgetting rate (up to 1: every frozen sample checked).
        final_full: with the guard, an epoch that reaches into the last ``final_full`` share
            of training runs on the full data: every sample at least once, FREEZE included.

    Quality guard. Forgetting is measured, not assumed: a revisited FREEZE sample that is no
    longer right (it lands in FOCUS or HARD) is a failed revisit; it returns to training at
    once (the table's bucket follows its statistics), and the share of failed revisits, the
    *forgetting rate* (smoothed over epochs), raises the next epochs' revisit fraction. The
    last phase of training never runs on thinned data only. HARD samples that stay HARD visit
    after visit lose their extra copies through the table's noise guard
    (``GekoConfig.noise_guard_visits``).
    """

    name = "geko"

    def __init__(
        self,
        curriculum: Any = None,
        *,
        weighting: str = "thinning",
        max_weight: float | str | None = "auto",
        budget: float | None = None,
        budget_unit: str = "samples",
        guard: bool = True,
        min_revisit: float = 0.1,
        revisit_gain: float = 2.0,
        final_full: float = 0.1,
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
        if budget_unit not in ("samples", "tokens"):
            raise ValueError(f"budget_unit must be 'samples' or 'tokens', got {budget_unit!r}")
        self.budget_unit = budget_unit
        if not isinstance(guard, bool):
            raise TypeError(f"guard must be a bool, got {type(guard).__name__}")
        for name, value, high in (("min_revisit", min_revisit, 1.0), ("revisit_gain", revisit_gain, 100.0), ("final_full", final_full, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
                raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}")
        self.guard = guard
        self.min_revisit = float(min_revisit)
        self.revisit_gain = float(revisit_gain)
        self.final_full = float(final_full)
        self.budget = None if budget is None else float(budget)
        self.curriculum = curriculum
        self.weighting = weighting
        self.max_weight = max_weight
        self._planner = None
        self._last_rates: np.ndarray | None = None
        # Forgetting: FREEZE samples observed and how many of them were no longer right,
        # in the current epoch and over the run; the smoothed rate drives the revisits.
        self.revisits = self.failed_revisits = 0
        self.total_revisits = self.total_failed_revisits = 0
        self.forgetting = 0.0

    def bind(self, context: PolicyContext) -> None:
        if self.budget is not None and self.budget_unit == "tokens" and context.sample_tokens is None:
            raise ValueError("a GEKO budget in tokens needs Selector(sample_tokens=...)")
        super().bind(context)
        from ..planner import EpochPlanner

        # A global plan: the epoch object shards it.
        self._planner = EpochPlanner(context.num_samples, seed=context.seed)

    def observe(self, batch, table) -> None:
        if not self.guard:
            super().observe(batch, table)
            return
        # The table counts the batch's FREEZE revisits (FREEZE before it, finite correct) and
        # the failed ones (FOCUS or HARD after it) in the same compiled call as the update.
        revisits, failed = table.update_arrays_revisits(
            batch.indices, batch.loss, batch.confidence, batch.correct, batch.step
        )
        self.revisits += revisits
        self.failed_revisits += failed

    def _update_forgetting(self) -> None:
        """Fold the last epoch's failed revisits into the smoothed forgetting rate."""
        if self.revisits:
            measured = self.failed_revisits / self.revisits
            self.forgetting = 0.5 * self.forgetting + 0.5 * measured
            self.total_revisits += self.revisits
            self.total_failed_revisits += self.failed_revisits
        self.revisits = self.failed_revisits = 0

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        from ..config import BUCKET_FREEZE

        table = context.table
        rates = np.asarray(self.curriculum.rates(progress), dtype=np.float64)
        buckets = table.field("bucket")
        if self.guard:
            self._update_forgetting()
            # An epoch that reaches into the last `final_full` of training runs on the full data.
            end = (epoch + 1) / context.epochs if context.epochs else progress
            if self.final_full > 0 and end > 1.0 - self.final_full + 1e-9:
                rates = np.maximum(rates, 1.0)  # the last phase: the full data, FREEZE included
            else:
                rates[BUCKET_FREEZE] = min(1.0, max(rates[BUCKET_FREEZE], self.min_revisit + self.revisit_gain * self.forgetting))
        if self.budget is not None:
            # What each bucket costs at rate 1: its samples, or its tokens.
            cost = None if self.budget_unit == "samples" else context.sample_tokens
            rates = self._fit_budget(rates, np.bincount(buckets, weights=cost, minlength=len(rates)).astype(np.float64))
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
        if self.guard:
            revisits = self.total_revisits + self.revisits
            out["forgetting"] = self.forgetting
            out["revisits"] = revisits
            out["failed_revisits"] = self.total_failed_revisits + self.failed_revisits
        if self._last_rates is not None:
            out["rates"] = [float(r) for r in self._last_rates]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "revisits": self.revisits, "failed_revisits": self.failed_revisits,
            "total_revisits": self.total_revisits, "total_failed_revisits": self.total_failed_revisits,
            "forgetting": self.forgetting,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = {}
        for key in ("revisits", "failed_revisits", "total_revisits", "total_failed_revisits"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"geko state {key} must be a non-negative int, got {value!r}")
            counts[key] = int(value)
        forgetting = state["forgetting"]
        if isinstance(forgetting, bool) or not isinstance(forgetting, (int, float, np.floating)) or not 0.0 <= forgetting <= 1.0:
            raise ValueError(f"geko state forgetting must be in [0, 1], got {forgetting!r}")
        for key, value in counts.items():
            setattr(self, key, value)
        self.forgetting = float(forgetting)
