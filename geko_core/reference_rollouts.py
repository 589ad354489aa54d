"""The numpy reference of the rollout statistics and the RolloutTable's update rule: the oracle
of ``tests/test_rollouts.py``.

Plain numpy over one array per field, following ``csrc/rollout_table.cpp`` step by step: the
group sums run in float64 in the order of the group (so pass rates, flags and mean lengths
agree bit for bit; the spread to rounding, as a compiler may fuse its multiply-adds), and the
EMAs blend float32 coefficients in float64 with one rounding, as the SampleTable's reference.

Inputs are assumed validated (as ``geko_core.RolloutTable`` validates them).
"""

from __future__ import annotations

import numpy as np

from .config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_UNSEEN
from .reference_table import _blend, occurrence_rank
from .rollouts import RolloutConfig

__all__ = ["ROLLOUT_FIELD_DTYPES", "ReferenceRolloutTable", "reference_group_stats"]

#: Field name -> numpy dtype, in record order (the compiled table's ``field()`` dtypes).
ROLLOUT_FIELD_DTYPES: dict[str, np.dtype] = {
    "pass_ema": np.dtype(np.float32),
    "last_pass": np.dtype(np.float32),
    "last_spread": np.dtype(np.float32),
    "length_ema": np.dtype(np.float32),
    "visits": np.dtype(np.uint32),
    "last_step": np.dtype(np.int32),
    "flat_run": np.dtype(np.uint16),
    "solved_run": np.dtype(np.uint16),
    "failed_run": np.dtype(np.uint16),
    "bucket": np.dtype(np.int8),
    "flags": np.dtype(np.uint8),
}
_UINT16_MAX = np.iinfo(np.uint16).max
_UINT32_MAX = np.iinfo(np.uint32).max
_FLOAT_MAX = float(np.finfo(np.float32).max)


def reference_group_stats(
    rewards: np.ndarray, lengths: np.ndarray | None, config: RolloutConfig
) -> dict[str, np.ndarray]:
    """Statistics of each group of ``rewards`` float32 ``[B, G]`` (lengths float32 ``[B, G]`` or None).

    Returns:
        ``{"pass_rate", "spread", "mean_length"}`` float32 ``[B]`` and ``{"zero_variance",
        "all_right", "all_wrong"}`` bool ``[B]``.
    """
    r = np.asarray(rewards, dtype=np.float32)
    count, group = r.shape
    r64 = r.astype(np.float64)
    share = np.clip((r64 - config.wrong_at) / (config.right_at - config.wrong_at), 0.0, 1.0)
    passed = np.zeros(count)
    total = np.zeros(count)
    length = np.zeros(count)
    for j in range(group):  # in order, as the compiled loop sums
        passed += share[:, j]
        total += r64[:, j]
        if lengths is not None:
            length += np.asarray(lengths, dtype=np.float32)[:, j].astype(np.float64)
    mean = total / group
    squares = np.zeros(count)
    for j in range(group):
        squares += (r64[:, j] - mean) ** 2
    return {
        "pass_rate": (passed / group).astype(np.float32),
        "spread": np.sqrt(squares / group).astype(np.float32),
        "zero_variance": r.max(axis=1).astype(np.float64) - r.min(axis=1).astype(np.float64) <= config.flat_tol,
        "all_right": (r >= np.float32(config.right_at)).all(axis=1),
        "all_wrong": (r <= np.float32(config.wrong_at)).all(axis=1),
        "mean_length": (length / group).astype(np.float32),
    }


class ReferenceRolloutTable:
    """Per-prompt reward history as one numpy array per field (see ``ROLLOUT_FIELD_DTYPES``)."""

    def __init__(self, num_samples: int, config: RolloutConfig | None = None) -> None:
        self.config = config if config is not None else RolloutConfig()
        self.num_samples = num_samples
        self.fields = {name: np.zeros(num_samples, dtype=dtype) for name, dtype in ROLLOUT_FIELD_DTYPES.items()}
        self.fields["last_step"][:] = -1
        self.fields["bucket"][:] = BUCKET_UNSEEN
        self.updates = 0

    def update(self, indices: np.ndarray, rewards: np.ndarray, lengths: np.ndarray | None, step: int) -> dict[str, np.ndarray]:
        """Apply one rollout batch in order; returns its statistics."""
        stats = reference_group_stats(rewards, lengths, self.config)
        self.update_stats(indices, stats, step)
        return stats

    def update_stats(self, indices: np.ndarray, stats: dict[str, np.ndarray], step: int) -> None:
        """Apply precomputed statistics in order (duplicates once per occurrence)."""
        indices = np.asarray(indices, dtype=np.int64)
        self.updates += indices.size
        if indices.size == 0:
            return
        rank = occurrence_rank(indices)
        for k in range(int(rank.max()) + 1):
            at = rank == k
            self._apply_distinct(indices[at], {name: np.asarray(v)[at] for name, v in stats.items()}, step)

    def _apply_distinct(self, idx: np.ndarray, s: dict[str, np.ndarray], step: int) -> None:
        cfg, f = self.config, self.fields
        p = s["pass_rate"].astype(np.float32)
        length = s["mean_length"].astype(np.float32)
        flat = s["zero_variance"].astype(bool)
        first = f["visits"][idx] == 0
        keep, take = 1.0 - cfg.alpha, cfg.alpha
        pass_ema = np.clip(_blend(keep, f["pass_ema"][idx], take, p), 0.0, 1.0).astype(np.float32)
        length_ema = np.minimum(_blend(keep, f["length_ema"][idx], take, length), _FLOAT_MAX).astype(np.float32)
        f["pass_ema"][idx] = np.where(first, p, pass_ema)
        f["length_ema"][idx] = np.where(first, length, length_ema)
        f["last_pass"][idx] = p
        f["last_spread"][idx] = s["spread"].astype(np.float32)
        for run, on in (("flat_run", flat), ("solved_run", s["all_right"]), ("failed_run", s["all_wrong"])):
            f[run][idx] = np.where(on, np.minimum(f[run][idx].astype(np.int64) + 1, _UINT16_MAX), 0)
        flat_bucket = np.where(p >= np.float32(0.5), BUCKET_FREEZE, BUCKET_HARD)
        mixed_bucket = np.where(p > np.float32(cfg.light_above), BUCKET_LIGHT, BUCKET_FOCUS)
        f["bucket"][idx] = np.where(flat, flat_bucket, mixed_bucket)
        f["visits"][idx] = np.minimum(f["visits"][idx].astype(np.int64) + 1, _UINT32_MAX)
        f["last_step"][idx] = step
