"""A test-only stand-in for ``geko_core.rollouts`` (RL_SPEC §1), installed only while the
compiled RolloutTable is not on this branch; removed once it is merged."""

from __future__ import annotations

import sys
import types
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

FREEZE, LIGHT, FOCUS, HARD, UNSEEN = 0, 1, 2, 3, 4
NAMES = ("FREEZE", "LIGHT", "FOCUS", "HARD", "UNSEEN")


@dataclass(frozen=True)
class RolloutConfig:
    right_at: float = 1.0
    wrong_at: float = 0.0
    alpha: float = 0.5
    light_above: float = 0.75
    flat_tol: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RolloutStats:
    pass_rate: torch.Tensor
    spread: torch.Tensor
    zero_variance: torch.Tensor
    mean_length: torch.Tensor

    @property
    def keep(self) -> torch.Tensor:
        return ~self.zero_variance


def rollout_stats(rewards, lengths=None, config=None) -> RolloutStats:
    config = config or RolloutConfig()
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    p = ((r - config.wrong_at) / (config.right_at - config.wrong_at)).clamp(0, 1).mean(1)
    spread = r.std(1, unbiased=False)
    zv = (r.max(1).values - r.min(1).values) <= config.flat_tol
    ml = torch.zeros(r.shape[0]) if lengths is None else torch.as_tensor(lengths, dtype=torch.float32).mean(1)
    return RolloutStats(p, spread, zv, ml)


_FIELDS = {
    "pass_ema": np.float32, "last_pass": np.float32, "last_spread": np.float32, "length_ema": np.float32,
    "visits": np.uint32, "last_step": np.int32, "flat_run": np.uint16, "solved_run": np.uint16,
    "failed_run": np.uint16, "bucket": np.int8,
}


class RolloutTable:
    def __init__(self, num_samples: int, config: RolloutConfig | None = None) -> None:
        self.num_samples = int(num_samples)
        self.config = config or RolloutConfig()
        self._f = {k: np.zeros(num_samples, dtype=t) for k, t in _FIELDS.items()}
        self._f["last_step"][:] = -1
        self._f["bucket"][:] = UNSEEN
        self.updates = 0

    def update_stats(self, indices, pass_rate, spread, zero_variance, all_right, all_wrong, mean_length, step):
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError("index out of range")
        if step < 0:
            raise ValueError("bad step")
        f, a, c = self._f, self.config.alpha, self.config
        for k, i in enumerate(idx):
            p = float(pass_rate[k])
            first = f["visits"][i] == 0
            f["pass_ema"][i] = p if first else (1 - a) * f["pass_ema"][i] + a * p
            f["length_ema"][i] = mean_length[k] if first else (1 - a) * f["length_ema"][i] + a * mean_length[k]
            f["last_pass"][i], f["last_spread"][i] = p, spread[k]
            f["visits"][i] += 1
            f["last_step"][i] = step
            zv = bool(zero_variance[k])
            f["flat_run"][i] = min(f["flat_run"][i] + 1, 65535) if zv else 0
            f["solved_run"][i] = min(f["solved_run"][i] + 1, 65535) if all_right[k] else 0
            f["failed_run"][i] = min(f["failed_run"][i] + 1, 65535) if all_wrong[k] else 0
            f["bucket"][i] = (FREEZE if p >= 0.5 else HARD) if zv else (LIGHT if p > c.light_above else FOCUS)
        self.updates += 1

    def field(self, name):
        return self._f[name].copy()

    def gather(self, name, indices):
        return self._f[name][np.asarray(indices, dtype=np.int64)].copy()

    def buckets(self, indices):
        return self.gather("bucket", indices)

    def bucket_counts_array(self):
        return np.bincount(self._f["bucket"], minlength=5).astype(np.int64)

    def bucket_counts(self):
        return dict(zip(NAMES, (int(c) for c in self.bucket_counts_array())))

    def state_dict(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "config": self.config.to_dict(), "updates": self.updates,
                **{k: v.copy() for k, v in self._f.items()}}

    def load_state_dict(self, state) -> None:
        if state.get("num_samples") != self.num_samples or "pass_ema" not in state:
            raise ValueError("RolloutTable state does not match")
        fields = {}
        for k, t in _FIELDS.items():
            v = np.asarray(state[k])
            if v.dtype != t or v.shape != (self.num_samples,):
                raise ValueError(f"bad field {k}")
            fields[k] = v.copy()
        self._f, self.updates = fields, int(state["updates"])


def install() -> None:
    """Make ``geko_core.rollouts`` importable (the stand-in) when the real one is absent."""
    try:
        import geko_core.rollouts  # noqa: F401
    except ImportError:
        module = types.ModuleType("geko_core.rollouts")
        for name in ("RolloutConfig", "RolloutStats", "RolloutTable", "rollout_stats"):
            setattr(module, name, globals()[name])
        sys.modules["geko_core.rollouts"] = module
        import geko_core

        geko_core.rollouts = module
