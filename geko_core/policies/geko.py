"""GEKO: buckets from the table, a mountain curriculum, and an epoch that really shrinks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._backend import load_compiled_core
from ..config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_UNSEEN
from .base import Plan, Policy, PolicyContext, StatsBatch

if TYPE_CHECKING:  # pragma: no cover
    from ..table import SampleTable

_C = load_compiled_core()


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
            down by one common factor (found by bisection) until the expected size fits, and
            FREEZE's rate and the stalled samples' probe rate are capped at that factor: FREEZE
            keeps its revisit rate while it fits, and in the final full phase every bucket is
            thinned by the one factor, so the budget caps the final epochs too. UNSEEN samples
            are always drawn once. Weights follow the fitted rates, so thinning stays unbiased
            (docs/policies.md).
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
            of training runs on the full data: every sample at least once, FREEZE included
            (stalled samples keep their probe rate, below; under a budget, thinned to fit).
            With ``total_steps`` the full pass starts while there are steps left to finish it
            (an epoch's steps predicted from the samples a step has trained so far).
        freeze_streak: the sequence-level FREEZE gate (0 = off, the default): a sample right
            and confident (instant bucket FREEZE) in each of the last ``freeze_streak`` epochs
            it was visited in is planned as FREEZE even when its Q-value has not reached
            ``freeze_q`` yet. The Q gate needs about nine such visits at ``q_alpha`` 0.1, more
            than a fine-tuning run's epochs; a streak counts what the gate is meant to
            establish ("right visit after visit") directly, so it works in few epochs. Any
            visit that is not right and confident resets the streak (a streak-frozen sample
            found unconfident returns to LIGHT, found wrong to FOCUS/HARD: a failed revisit
            for the guard). Counters advance once per epoch (the first visit), not per copy.
        stall_visits: stagnation (0 = off, the default): a wrong sample (FOCUS or HARD) whose
            loss, at its first visit of an epoch, fell by less than ``stall_drop`` (relative)
            from its loss at its first visit of the previous epoch it was visited in, for
            ``stall_visits`` such epochs in a row, is *stalled*: it is not learning, so it stops
            drawing its bucket's rate (HARD's oversampling included) and is drawn at
            ``stall_rate`` instead, every epoch including the ``final_full`` one. A probe
            visit on which its loss falls by ``stall_drop`` or more (or that finds it right)
            ends the stall. Under a budget, stalled samples keep their probe rate and the
            scaled buckets share what is left, so stalled samples yield their tokens first.
        stall_drop: the relative loss decrease per epoch below which a wrong visit counts as
            stagnant (0.1: the loss must fall by 10% from one epoch's visit to the next).
        stall_rate: the probe rate of a stalled sample (expected copies per epoch, in [0, 1]).
            A probe copy weighs 1 under ``"thinning"`` and ``"none"`` (the point is to spend
            less on the sample, not to make each visit count more), ``1 / stall_rate`` under
            ``"unbiased"``.

    Quality guard. Forgetting is measured, not assumed: a revisit is a FREEZE sample's first
    visit of an epoch (not a later copy of a sample that froze earlier in the same epoch);
    one that finds the sample no longer right (it lands in FOCUS or HARD) is a failed revisit; it returns to training at
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
        freeze_streak: int = 0,
        stall_visits: int = 0,
        stall_drop: float = 0.1,
        stall_rate: float = 0.25,
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
        for name, value in (("freeze_streak", freeze_streak), ("stall_visits", stall_visits)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 255:
                raise ValueError(f"{name} must be an int in [0, 255] (0 = off), got {value!r}")
        for name, value in (("stall_drop", stall_drop), ("stall_rate", stall_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        self.freeze_streak = int(freeze_streak)
        self.stall_visits = int(stall_visits)
        self.stall_drop = float(stall_drop)
        self.stall_rate = float(stall_rate)
        # Per-sample counters (allocated in bind when the mechanism is on): consecutive right
        # and confident visits, and consecutive wrong visits without a stall_drop decrease.
        self._streak: np.ndarray | None = None
        self._stall: np.ndarray | None = None
        self._ref_loss: np.ndarray | None = None  # a sample's loss at its first visit of its last epoch
        # The epoch of a sample's latest applied visit: the counters' and the guard's "first
        # visit of the epoch" (a revisit is one).
        self._seen_epoch: np.ndarray | None = None
        self._last_frozen = self._last_stalled = 0
        # Rows observed over the run (all ranks'): with total_steps, the samples a step trains
        # (None: unknown, after loading a state that lacks it).
        self._rows: int | None = 0
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
        if self.freeze_streak:
            self._streak = np.zeros(context.num_samples, dtype=np.uint8)
        if self.stall_visits:
            self._stall = np.zeros(context.num_samples, dtype=np.uint8)
            self._ref_loss = np.full(context.num_samples, np.nan, dtype=np.float32)
        if self.guard or self.freeze_streak or self.stall_visits:
            self._seen_epoch = np.full(context.num_samples, -1, dtype=np.int32)

    def _frozen(self, buckets: np.ndarray, streak: np.ndarray | None) -> np.ndarray:
        """FREEZE as planned: the table's (Q gate), or LIGHT with a long enough streak."""
        frozen = buckets == BUCKET_FREEZE
        if streak is not None:
            frozen |= (buckets == BUCKET_LIGHT) & (streak >= self.freeze_streak)
        return frozen

    def stalled(self, buckets: np.ndarray | None = None) -> np.ndarray | None:
        """bool ``[N]``: the stalled samples (None when stagnation is off)."""
        if self._stall is None:
            return None
        if buckets is None:
            raise ValueError("stalled() needs the table's buckets")
        return (self._stall >= self.stall_visits) & ((buckets == BUCKET_FOCUS) | (buckets == BUCKET_HARD))

    def observe(self, batch: StatsBatch, table: "SampleTable") -> None:
        if self._rows is not None:
            self._rows += len(batch.indices)
        if self._seen_epoch is None:  # neither the guard nor a counter: the table alone
            super().observe(batch, table)
            return
        # The table applies the batch and reports each row's bucket before and after it; the
        # counters and the revisit count follow from that report in one compiled call of the
        # policy's own. Both count epochs, not copies (only a sample's first visit of an epoch
        # advances a counter: a HARD sample drawn 2.5 times in an epoch is seen by a model
        # that has hardly changed between its copies), while any visit can reset one.
        count = len(batch.indices)
        before = np.empty(count, dtype=np.int8)
        after = np.empty(count, dtype=np.int8)
        table.update_arrays(batch.indices, batch.loss, batch.confidence, batch.correct, batch.step, before=before, after=after)
        revisits, failed = _C.count_visits(
            batch.indices, batch.loss, batch.confidence, batch.correct, before, after, batch.epoch,
            self._seen_epoch, self._streak, self._stall, self._ref_loss,
            self.freeze_streak, table.config.freeze_confidence, self.stall_drop,
        )
        if self.guard:
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
        table = context.table
        rates = np.asarray(self.curriculum.rates(progress), dtype=np.float64)
        buckets = table.field("bucket")
        stalled = self.stalled(buckets)
        if self._streak is not None:
            buckets[self._frozen(buckets, self._streak)] = BUCKET_FREEZE
        self._last_frozen = int((buckets == BUCKET_FREEZE).sum())
        self._last_stalled = 0 if stalled is None else int(stalled.sum())
        # Stalled samples are counted apart (code UNSEEN + 1): they draw their probe rate.
        live = buckets if not self._last_stalled else np.where(stalled, BUCKET_UNSEEN + 1, buckets)
        if self.guard:
            self._update_forgetting()
            thinned = rates.copy()
            thinned[BUCKET_FREEZE] = min(1.0, max(rates[BUCKET_FREEZE], self.min_revisit + self.revisit_gain * self.forgetting))
            full = np.maximum(rates, 1.0)  # the last phase: the full data, FREEZE included
            if self.final_full <= 0:
                rates, probe_rate = self._budgeted(context, thinned, live)
            elif context.epochs:
                # An epoch that reaches into the last `final_full` of training runs on the full data.
                final = (epoch + 1) / context.epochs > 1.0 - self.final_full + 1e-9
                rates, probe_rate = self._budgeted(context, full if final else thinned, live)
            else:
                rates, probe_rate = self._final_by_steps(context, progress, live, self._budgeted(context, thinned, live), full)
        else:
            rates, probe_rate = self._budgeted(context, rates, live)
        self._last_rates = rates
        plan = self._planner.plan(
            buckets,
            rates,
            epoch=epoch,
            last_visit_step=table.field("last_step"),
        )
        indices = np.asarray(plan.indices, dtype=np.int64)
        weights = self._weighted(np.asarray(plan.weights, dtype=np.float32))
        if self._last_stalled:
            indices, weights = self._with_probes(context, epoch, indices, weights, stalled, probe_rate)
        if self.max_weight is not None:
            weights = np.minimum(weights, np.float32(self.max_weight))
        return Plan(indices, weights)

    def _weighted(self, weights: np.ndarray) -> np.ndarray:
        """The planner's ``1 / rate`` weights as ``weighting`` asks (before ``max_weight``)."""
        if self.weighting == "none":
            return np.ones_like(weights)
        if self.weighting == "thinning":
            return np.maximum(weights, np.float32(1.0))
        return weights

    def _final_by_steps(
        self, context: PolicyContext, progress: float, live: np.ndarray, thinned: tuple[np.ndarray, float], full: np.ndarray
    ) -> tuple[np.ndarray, float]:
        """The final phase of a run counted in steps: the ``full`` rates (budgeted) when this
        epoch, planned ``thinned``, would reach into the last ``final_full`` of the steps or
        leave too few steps after it for the full pass that would follow (at the curriculum's
        rates then, HARD's oversampling included); ``thinned`` otherwise. So the full pass is
        planned while there are steps left to finish it. An epoch's steps are its expected
        samples over the samples a step has trained so far (``observe``'s rows, all ranks').
        Before any step (or after loading a state without the row count) the epoch is full
        once ``progress`` is in the last ``final_full``."""
        total = float(context.total_steps)
        done = progress * total
        if self._rows is None or self._rows == 0 or done <= 0:
            final = progress > 1.0 - self.final_full + 1e-9
            return self._budgeted(context, full, live) if final else thinned
        per_step = self._rows / done
        samples = np.bincount(live, minlength=len(full) + 1).astype(np.float64)

        def steps(choice) -> float:
            rates, probe_rate = choice
            return (float((samples[:-1] * rates).sum()) + float(samples[-1]) * probe_rate) / per_step

        after_thinned = done + steps(thinned)
        later = np.maximum(np.asarray(self.curriculum.rates(min(after_thinned / total, 1.0)), dtype=np.float64), 1.0)
        final = after_thinned > (1.0 - self.final_full) * total + 1e-9 or after_thinned + steps(self._budgeted(context, later, live)) > total + 1e-9
        return self._budgeted(context, full, live) if final else thinned

    def _budgeted(self, context: PolicyContext, rates: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, float]:
        """``rates`` and the stalled samples' probe rate, fitted to the budget when one is set."""
        if self.budget is None:
            return rates, self.stall_rate
        # What each bucket costs at rate 1: its samples, or its tokens.
        cost = None if self.budget_unit == "samples" else context.sample_tokens
        counts = np.bincount(live, weights=cost, minlength=len(rates) + 1).astype(np.float64)
        return self._fit_budget(rates, counts)

    def _with_probes(self, context: PolicyContext, epoch: int, indices: np.ndarray, weights: np.ndarray, stalled: np.ndarray, rate: float):
        """Replace the stalled samples' copies by probes drawn at ``rate``, reshuffled."""
        keep = ~stalled[indices]
        rng = context.rng(epoch, 0x57A1)
        candidates = np.flatnonzero(stalled)
        probes = candidates[rng.random(len(candidates)) < rate]
        weight = 1.0 / rate if self.weighting == "unbiased" and rate > 0 else 1.0
        indices = np.concatenate([indices[keep], probes])
        weights = np.concatenate([weights[keep], np.full(len(probes), weight, dtype=np.float32)])
        order = rng.permutation(len(indices))
        return indices[order], weights[order]

    def _fit_budget(self, rates: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, float]:
        """Fit the expected epoch to at most ``budget`` times the data set's cost.

        ``counts``: each bucket's cost at rate 1, then the stalled samples' (``[6]``). The
        LIGHT/FOCUS/HARD rates are scaled by one factor ``f`` (found by bisection); FREEZE's
        rate and the stalled samples' probe rate are capped at ``f``: a frozen or stalled
        sample is never drawn more often than the scaled buckets' factor, so the budget holds
        even when FREEZE alone would exceed it (the final phase's full pass becomes every
        bucket thinned by the one factor). UNSEEN samples are always drawn once. Returns the
        rates and the probe rate."""
        k = len(rates)
        bucket_costs, probe_cost = counts[:k], float(counts[k])
        scaled = np.zeros(k, dtype=bool)
        scaled[[BUCKET_LIGHT, BUCKET_FOCUS, BUCKET_HARD]] = True
        target = self.budget * float(counts.sum())
        fixed = self.stall_rate * probe_cost + float((bucket_costs * rates)[~scaled].sum())
        if fixed + float((bucket_costs * rates)[scaled].sum()) <= target:
            return rates, self.stall_rate

        def at(factor: float) -> tuple[np.ndarray, float, float]:
            trial = np.where(scaled & (rates > 0), np.maximum(rates * factor, 1e-6), rates)
            if rates[BUCKET_FREEZE] > 0:
                trial[BUCKET_FREEZE] = max(min(rates[BUCKET_FREEZE], factor), 1e-6)
            probe = min(self.stall_rate, factor)
            return trial, probe, float((bucket_costs * trial)[scaled].sum()) + (probe * probe_cost + float((bucket_costs * trial)[~scaled].sum()))

        # The planner refuses positive rates below 1e-6; the expected size is monotone in the
        # factor, so the bisection converges to the largest factor that fits.
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (low + high)
            if at(mid)[2] > target:
                high = mid
            else:
                low = mid
        trial, probe, _ = at(low)
        return trial, probe

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.budget is None else {"budget": self.budget}
        if self.guard:
            revisits = self.total_revisits + self.revisits
            out["forgetting"] = self.forgetting
            out["revisits"] = revisits
            out["failed_revisits"] = self.total_failed_revisits + self.failed_revisits
        if self._last_rates is not None:
            out["rates"] = [float(r) for r in self._last_rates]
            if self._streak is not None:
                out["frozen"] = self._last_frozen  # FREEZE as the last plan saw it (Q gate or streak)
            if self._stall is not None:
                out["stalled"] = self._last_stalled
        return out

    #: Per-sample arrays of the guard (seen_epoch), the streak gate and stagnation, saved when
    #: their mechanism is on.
    _COUNTERS = {"streak": np.uint8, "stall": np.uint8, "ref_loss": np.float32, "seen_epoch": np.int32}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "revisits": self.revisits, "failed_revisits": self.failed_revisits,
            "total_revisits": self.total_revisits, "total_failed_revisits": self.total_failed_revisits,
            "forgetting": self.forgetting, "rows": self._rows,
        }
        # The per-sample counters, only when their mechanism is on (older states lack them).
        for key in self._COUNTERS:
            value = getattr(self, "_" + key)
            if value is not None:
                state[key] = value.copy()
        return state

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
        rows = state.get("rows")  # None: a state from before the row count
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0):
            raise ValueError(f"geko state rows must be a non-negative int or None, got {rows!r}")
        arrays = {}
        for key, dtype in self._COUNTERS.items():
            mine = getattr(self, "_" + key)
            if mine is None:
                if state.get(key) is not None:
                    raise ValueError(f"geko state has {key!r} but this policy has that mechanism off")
                continue
            if key == "seen_epoch" and key not in state and self._streak is None and self._stall is None:
                # A guard-only state from before the guard kept seen_epoch: no visit counted yet.
                arrays[key] = np.full_like(mine, -1)
                continue
            value = np.asarray(state[key])
            if value.dtype != dtype or value.shape != mine.shape:
                raise ValueError(f"geko state {key} must be {np.dtype(dtype)} {mine.shape}, got {value.dtype} {value.shape}")
            arrays[key] = value.copy()
        for key, value in counts.items():
            setattr(self, key, value)
        self.forgetting = float(forgetting)
        self._rows = None if rows is None else int(rows)
        for key, value in arrays.items():
            setattr(self, "_" + key, value)
