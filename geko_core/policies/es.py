"""Evolved Sampling (ES) and ES with set-level pruning (ESWP): a documented reconstruction.

Only the abstract of arXiv 2509.23461 is public here, so this is "ES (reconstructed)":

* score of a sample = EMA_b1(loss) + lam * |EMA_b2(loss_t - loss_{t-1})|, both EMAs kept by the
  SampleTable (``GekoConfig.loss_ema_beta``, ``loss_diff_ema_beta``);
* from a meta-batch of B forwarded samples (no grad), b = ceil(select_fraction * B) distinct
  samples are back-propagated, drawn with inclusion probability proportional to the score
  (systematic PPS sampling: exact probabilities, fixed size), each weighted
  ``b / (B * inclusion)`` so the weighted mean over the b equals the meta-batch mean in
  expectation;
* ESWP also prunes at the set level: a sample whose score stayed below ``prune_quantile`` of the
  scores for ``patience`` consecutive epochs is left out of the next epoch with probability
  ``prune_ratio`` (kept ones weighted ``1 / (1 - prune_ratio)``); the last ``1 - delta`` of the
  epochs use the full data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext, TableView


class ESPolicy(Policy):
    """Batch-level selection from loss dynamics (see the module docstring).

    Args:
        select_fraction: share of each meta-batch that is back-propagated, in (0, 1].
        lam: weight of the loss-difference term.
        floor: added to every score as a share of the batch's mean score, so every sample
            keeps a non-zero inclusion probability (needed for unbiased weights).
    """

    name = "es"
    meta_batch = True

    def __init__(self, select_fraction: float = 0.5, lam: float = 1.0, floor: float = 0.05) -> None:
        super().__init__()
        if not 0.0 < select_fraction <= 1.0:
            raise ValueError(f"select_fraction must be in (0, 1], got {select_fraction}")
        if not np.isfinite(lam) or lam < 0:
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        self.select_fraction = float(select_fraction)
        self.lam = float(lam)
        self.floor = float(floor)

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        order = context.rng(epoch).permutation(context.num_samples).astype(np.int64)
        return Plan(order, np.ones(len(order), dtype=np.float32))

    def scores(self, table: TableView, indices: np.ndarray) -> np.ndarray:
        loss_ema = table.gather("loss_ema", indices).astype(np.float64)
        diff_ema = table.gather("loss_diff_ema", indices).astype(np.float64)
        score = loss_ema + self.lam * np.abs(diff_ema)
        seen = table.gather("visits", indices) > 0
        # A sample the table has no finite loss for yet gets the batch's highest score.
        fallback = score[seen].max() if seen.any() else 1.0
        return np.where(seen & np.isfinite(score), score, fallback)

    def select(self, context: PolicyContext, indices: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        from ..planner import weighted_sample

        batch = len(indices)
        k = min(batch, max(1, int(np.ceil(self.select_fraction * batch))))
        score = self.scores(context.table, indices)
        score = np.maximum(score, 0.0) + self.floor * max(float(score.mean()), 1e-12)
        # Keyed by (seed, step): the draw is reproducible after a resume.
        positions, inclusion = weighted_sample(score, k, seed=context.seed, epoch=step)
        positions = np.asarray(positions, dtype=np.int64)
        inclusion = np.asarray(inclusion, dtype=np.float64)
        weights = (k / (batch * inclusion)).astype(np.float32)
        return positions, weights

    def metrics(self) -> dict[str, Any]:
        return {"select_fraction": self.select_fraction}


class ESWPPolicy(ESPolicy):
    """ES plus set-level pruning of samples whose score stays low (see the module docstring)."""

    name = "eswp"

    def __init__(
        self,
        select_fraction: float = 0.5,
        lam: float = 1.0,
        floor: float = 0.05,
        *,
        prune_ratio: float = 0.5,
        prune_quantile: float = 0.3,
        patience: int = 1,
        delta: float = 0.875,
    ) -> None:
        super().__init__(select_fraction, lam, floor)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0.0 < prune_quantile < 1.0:
            raise ValueError(f"prune_quantile must be in (0, 1), got {prune_quantile}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {delta}")
        self.prune_ratio = float(prune_ratio)
        self.prune_quantile = float(prune_quantile)
        self.patience = patience
        self.delta = float(delta)
        self.low_streak: np.ndarray | None = None
        self.pruned_last_epoch = 0

    def bind(self, context: PolicyContext) -> None:
        if context.epochs is None:
            raise ValueError("policy 'eswp' anneals over a known number of epochs: pass epochs= to the Selector")
        super().bind(context)
        self.low_streak = np.zeros(context.num_samples, dtype=np.int32)

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        n = context.num_samples
        rng = context.rng(epoch, purpose=1)
        keep = np.ones(n, dtype=bool)
        weights = np.ones(n, dtype=np.float32)
        all_indices = np.arange(n, dtype=np.int64)
        seen = context.table.gather("visits", all_indices) > 0
        if epoch > 0 and seen.any():
            score = self.scores(context.table, all_indices)
            threshold = np.quantile(score[seen], self.prune_quantile)
            low = seen & (score < threshold)
            self.low_streak = np.where(low, self.low_streak + 1, 0).astype(np.int32)
            if epoch < self.delta * context.epochs:
                candidates = self.low_streak >= self.patience
                drop = candidates & (rng.random(n) < self.prune_ratio)
                keep &= ~drop
                weights[candidates & ~drop] = 1.0 / (1.0 - self.prune_ratio)
        self.pruned_last_epoch = int(n - keep.sum())
        order = rng.permutation(np.flatnonzero(keep)).astype(np.int64)
        return Plan(order, weights[order])

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "pruned_last_epoch": self.pruned_last_epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"low_streak": self.low_streak.copy(), "pruned_last_epoch": self.pruned_last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        streak = np.asarray(state["low_streak"])
        if streak.shape != self.low_streak.shape:
            raise ValueError(f"eswp low_streak must have shape {self.low_streak.shape}, got {streak.shape}")
        self.low_streak = streak.astype(np.int32, copy=True)
        self.pruned_last_epoch = int(state["pruned_last_epoch"])
