"""The numpy reference of the sample-table update rule: the oracle of the table tests and
the baseline of its benchmark.

Plain, vectorised numpy over one array per field. It follows ``csrc/sample_table.cpp``
step by step (float32 coefficients, float64 arithmetic in which every product is exact,
one rounding to float32 per stored value), so the compiled table agrees with it bit for
bit on every field. The instant bucket comes from
``geko_core.reference.instant_bucket``, the one definition shared with the kernels.

Inputs are assumed validated (as ``geko_core.SampleTable.update`` validates them).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_UNSEEN, NUM_BUCKETS, GekoConfig, resolve_config
from .reference import instant_bucket

__all__ = ["FIELD_DTYPES", "ReferenceTable", "occurrence_rank"]

#: Field name -> numpy dtype, in record order (the compiled table's ``field()`` dtypes).
FIELD_DTYPES: dict[str, np.dtype] = {
    "q": np.dtype(np.float32),
    "loss_ema": np.dtype(np.float32),
    "loss_diff_ema": np.dtype(np.float32),
    "last_loss": np.dtype(np.float32),
    "last_confidence": np.dtype(np.float32),
    "visits": np.dtype(np.uint32),
    "last_step": np.dtype(np.int32),
    "last_correct": np.dtype(np.uint8),
    "bucket": np.dtype(np.int8),
    "hard_streak": np.dtype(np.uint8),
    "flags": np.dtype(np.uint8),
}
FLAG_SUSPECTED_NOISY = 1
_FLOAT_MAX = float(np.finfo(np.float32).max)
_UINT32_MAX = np.iinfo(np.uint32).max


def occurrence_rank(indices: np.ndarray) -> np.ndarray:
    """int64 ``[n]``: how many earlier positions hold the same index.

    Positions of rank k all hold distinct indices, so applying the batch rank by rank,
    each rank as one vectorised step, applies duplicates in batch order.
    """
    n = indices.shape[0]
    order = np.argsort(indices, kind="stable")
    ordered = indices[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return rank


def _stored(values: np.ndarray) -> np.ndarray:
    """float64 -> float32, clamped to the float32 range."""
    return np.clip(values, -_FLOAT_MAX, _FLOAT_MAX).astype(np.float32)


def _blend(keep: float, a: np.ndarray, take: float, b: np.ndarray) -> np.ndarray:
    """``keep * a + take * b`` in float64 with float32 coefficients and float32 ``a``, ``b``.

    Each product of two float32 values is exact in float64, so the sum is rounded once:
    the compiled table gets the same bits whether or not its compiler fuses multiply-adds.
    """
    keep64 = np.float64(np.float32(keep))
    take64 = np.float64(np.float32(take))
    return keep64 * a.astype(np.float64) + take64 * b.astype(np.float64)


class ReferenceTable:
    """Per-sample state as one numpy array per field (see ``FIELD_DTYPES``).

    Args:
        num_samples: number of samples N.
        config: thresholds and rates; defaults when None.
    """

    def __init__(self, num_samples: int, config: GekoConfig | None = None) -> None:
        self.config = resolve_config(config)
        self.num_samples = num_samples
        self.fields = {name: np.zeros(num_samples, dtype=dtype) for name, dtype in FIELD_DTYPES.items()}
        self.fields["q"][:] = np.float32(self.config.q_init)
        self.fields["last_step"][:] = -1
        self.fields["bucket"][:] = BUCKET_UNSEEN
        self.updates_applied = 0
        self.nonfinite_skipped = 0

    def update(
        self,
        indices: np.ndarray,
        loss: np.ndarray,
        confidence: np.ndarray,
        correct: np.ndarray,
        step: int,
    ) -> None:
        """Apply one batch in order.

        Args:
            indices: int ``[n]`` in ``[0, N)``; duplicates are applied in order.
            loss, confidence, correct: float32 ``[n]``; a sample with a non-finite value is
                skipped and counted.
            step: the training step, stored as ``last_step``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        loss = np.asarray(loss, dtype=np.float32)
        confidence = np.asarray(confidence, dtype=np.float32)
        correct = np.asarray(correct, dtype=np.float32)
        finite = np.isfinite(loss) & np.isfinite(confidence) & np.isfinite(correct)
        self.nonfinite_skipped += int((~finite).sum())
        self.updates_applied += int(finite.sum())
        indices, loss, confidence, correct = indices[finite], loss[finite], confidence[finite], correct[finite]
        if indices.size == 0:
            return
        rank = occurrence_rank(indices)
        for k in range(int(rank.max()) + 1):
            at = rank == k
            self._apply_distinct(indices[at], loss[at], confidence[at], correct[at], step)

    def _apply_distinct(
        self, idx: np.ndarray, loss: np.ndarray, confidence: np.ndarray, correct: np.ndarray, step: int
    ) -> None:
        cfg, f = self.config, self.fields
        # 1. Q-value (the clamp absorbs the rounding of the float32 coefficients).
        loss64 = loss.astype(np.float64)
        reward = (1.0 - np.minimum(np.maximum(loss64, 0.0) / cfg.loss_scale, 1.0)).astype(np.float32)
        q = np.clip(_blend(1.0 - cfg.q_alpha, f["q"][idx], cfg.q_alpha, reward), 0.0, 1.0).astype(np.float32)
        # 2. Loss EMAs; the first visit seeds them.
        first = f["visits"][idx] == 0
        diff = _stored(loss64 - f["last_loss"][idx].astype(np.float64))
        beta1, beta2 = cfg.loss_ema_beta, cfg.loss_diff_ema_beta
        diff_ema = _stored(_blend(beta2, f["loss_diff_ema"][idx], 1.0 - beta2, diff))
        loss_ema = _stored(_blend(beta1, f["loss_ema"][idx], 1.0 - beta1, loss))
        # 3. Bucket: instant bucket, Q gate on FREEZE, noise guard on HARD.
        # The table keeps no label probabilities: no margin rule here (the Selector folds it
        # into the stored correct, see geko_core.stats.table_correct), as in the C++ table.
        no_margin = torch.ones(len(confidence), dtype=torch.float32)
        bucket = instant_bucket(torch.from_numpy(confidence), torch.from_numpy(correct), cfg, no_margin).numpy()
        hard = bucket == BUCKET_HARD
        streak = np.where(hard, np.minimum(f["hard_streak"][idx].astype(np.int64) + 1, 255), 0)
        bucket = np.where((bucket == BUCKET_FREEZE) & (q < np.float32(cfg.freeze_q)), BUCKET_LIGHT, bucket)
        noisy = hard & (cfg.noise_guard_visits > 0) & (streak >= cfg.noise_guard_visits)
        bucket = np.where(noisy, BUCKET_FOCUS, bucket)
        flags = (f["flags"][idx] & ~np.uint8(FLAG_SUSPECTED_NOISY)) | np.where(noisy, FLAG_SUSPECTED_NOISY, 0)
        # 4. History.
        visits = f["visits"][idx].astype(np.int64)
        f["q"][idx] = q
        f["loss_ema"][idx] = np.where(first, loss, loss_ema)
        f["loss_diff_ema"][idx] = np.where(first, np.float32(0.0), diff_ema)
        f["bucket"][idx] = bucket
        f["hard_streak"][idx] = streak
        f["flags"][idx] = flags
        f["visits"][idx] = np.minimum(visits + 1, _UINT32_MAX)
        f["last_step"][idx] = step
        f["last_loss"][idx] = loss
        f["last_confidence"][idx] = confidence
        f["last_correct"][idx] = np.rint(correct.astype(np.float64) * 255.0).astype(np.uint8)

    def bucket_counts(self) -> np.ndarray:
        """int64 ``[5]``: samples per bucket code (FREEZE, LIGHT, FOCUS, HARD, UNSEEN)."""
        return np.bincount(self.fields["bucket"].astype(np.int64), minlength=NUM_BUCKETS)
