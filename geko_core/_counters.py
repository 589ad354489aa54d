"""The Selector's run counters (samples and tokens forwarded and back-propagated, the counts
at the current epoch's start, the wall-clock of the Selector's calls) and the parsing of a
saved Selector state, which carries them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .epochs import Epochs, state_int

__all__ = ["ROLLOUT_COUNTS", "STATE_FORMAT_VERSION", "TIMED", "RunCounters", "batch_tokens", "parse_state"]

STATE_FORMAT_VERSION = 2  # 2: the epoch object's state (per-position weights, padding, trained position)

#: The timed calls; ``total`` is what a training loop pays (nested calls count once).
TIMED = ("loss", "select", "observe", "observe_rewards", "weights", "planning", "total")

#: The counts of a Selector in rewards mode (prompts rolled out are ``forwarded``, their
#: completions' tokens ``tokens["forwarded"]``): completions, zero-variance groups, and the
#: prompts the plans left out (``num_samples`` minus each started epoch's global draws).
ROLLOUT_COUNTS = ("rollouts", "zero_variance_prompts", "skipped_prompts")


def batch_tokens(valid_tokens: torch.Tensor) -> Any:
    """A batch's valid tokens: a host int for CPU statistics (no torch reduction per step), a
    device tensor otherwise (no synchronisation until a report reads it)."""
    if valid_tokens.device.type == "cpu":
        return int(valid_tokens.numpy().sum(dtype=np.int64))
    return valid_tokens.sum(dtype=torch.int64)


class RunCounters:
    """Counts of the run, kept apart from the Selector's touch points.

    Attributes:
        forwarded, backpropagated: samples.
        tokens: ``{"forwarded": n, "backpropagated": n}``; a value may be a device tensor
            (summed on the device, read only by :meth:`tokens_of`).
        epoch_start: ``(forwarded, backpropagated)`` when the current epoch started.
        seconds: wall-clock per name of :data:`TIMED`.
        rollouts: the counts of :data:`ROLLOUT_COUNTS` (rewards mode); a value may be a
            device tensor, read only by :meth:`count_of`.
    """

    __slots__ = ("forwarded", "backpropagated", "tokens", "epoch_start", "seconds", "rollouts", "_depth")

    def __init__(self) -> None:
        self.forwarded = 0
        self.backpropagated = 0
        self.tokens: dict[str, Any] = {"forwarded": 0, "backpropagated": 0}
        self.epoch_start = (0, 0)
        self.seconds = dict.fromkeys(TIMED, 0.0)
        self.rollouts: dict[str, Any] = dict.fromkeys(ROLLOUT_COUNTS, 0)
        self._depth = 0

    def count_of(self, name: str) -> int:
        """A count of :data:`ROLLOUT_COUNTS` as an int (reads a device total)."""
        value = self.rollouts[name]
        return int(value.item()) if isinstance(value, torch.Tensor) else int(value)

    def tokens_of(self, kind: str) -> int:
        """Tokens ``"forwarded"`` or ``"backpropagated"`` as an int (reads a device total)."""
        value = self.tokens[kind]
        return int(value.item()) if isinstance(value, torch.Tensor) else int(value)

    def timed(self, name: str) -> "_Clock":
        """``with counters.timed(name):`` adds the block's wall-clock to ``name`` (and to
        ``total`` unless nested in another timed block). A block left by an exception (a call
        refused for bad input) counts nothing."""
        return _Clock(self, name)

    def add_planning(self, elapsed: float) -> None:
        self.seconds["planning"] += elapsed
        if self._depth == 0:
            self.seconds["total"] += elapsed

    def new_epoch(self) -> None:
        self.epoch_start = (self.forwarded, self.backpropagated)

    def state_dict(self) -> tuple[dict[str, Any], dict[str, float]]:
        """``(counters, seconds)`` as the Selector's state stores them."""
        counters = {
            "forwarded": self.forwarded, "backpropagated": self.backpropagated, "epoch_start": list(self.epoch_start),
            "forwarded_tokens": self.tokens_of("forwarded"), "backpropagated_tokens": self.tokens_of("backpropagated"),
            **{name: self.count_of(name) for name in ROLLOUT_COUNTS},
        }
        return counters, dict(self.seconds)

    @classmethod
    def from_state(cls, counters: Any, seconds: Any) -> "RunCounters":
        """Parse :meth:`state_dict`'s parts; raises ``ValueError``/``KeyError``/``TypeError``
        on a malformed entry."""
        out = cls()
        out.forwarded = state_int(counters["forwarded"], "counters.forwarded")
        out.backpropagated = state_int(counters["backpropagated"], "counters.backpropagated")
        epoch_start = tuple(state_int(c, "counters.epoch_start") for c in counters["epoch_start"])
        if len(epoch_start) != 2:
            raise ValueError(f"counters.epoch_start must hold 2 counts, got {len(epoch_start)}")
        out.epoch_start = epoch_start
        out.tokens = {
            kind: state_int(counters.get(f"{kind}_tokens", 0), f"counters.{kind}_tokens")
            for kind in ("forwarded", "backpropagated")
        }
        out.rollouts = {name: state_int(counters.get(name, 0), f"counters.{name}") for name in ROLLOUT_COUNTS}
        if not isinstance(seconds, dict):
            raise ValueError(f"Selector state seconds must be a dict, got {type(seconds).__name__}")
        out.seconds = {name: float(seconds.get(name, 0.0)) for name in TIMED}
        if not all(np.isfinite(v) and v >= 0 for v in out.seconds.values()):
            raise ValueError("Selector state seconds must be finite and non-negative")
        return out


class _Clock:
    """A plain class: a generator-based context manager costs a few microseconds more per step."""

    __slots__ = ("_counters", "_name", "_started")

    def __init__(self, counters: RunCounters, name: str) -> None:
        self._counters = counters
        self._name = name

    def __enter__(self) -> None:
        self._counters._depth += 1
        self._started = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        counters = self._counters
        counters._depth -= 1
        if exc_type is None:
            elapsed = time.perf_counter() - self._started
            counters.seconds[self._name] += elapsed
            if counters._depth == 0:
                counters.seconds["total"] += elapsed
        return False


def parse_state(state: Any, *, num_samples: int, policy: str, num_replicas: int, rank: int) -> tuple:
    """A ``Selector.state_dict`` checked against the Selector that loads it, every plain field
    parsed before anything changes: ``(step, explicit_steps, counters, history, table_state,
    policy_state, (epoch, plan, batch_seen))``. Raises ``TypeError``/``ValueError``/``IndexError``."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    version = state.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(f"Selector state has format_version {version!r}; this version reads {STATE_FORMAT_VERSION}")
    if state.get("num_samples") != num_samples:
        raise ValueError(f"Selector state is for {state.get('num_samples')} samples, this Selector has {num_samples} (a different dataset?)")
    if state.get("policy") != policy:
        raise ValueError(f"Selector state is for policy {state.get('policy')!r}, this Selector runs {policy!r}")
    if (state.get("num_replicas"), state.get("rank")) != (num_replicas, rank):
        raise ValueError(f"Selector state is for rank {state.get('rank')} of {state.get('num_replicas')}, this is rank {rank} of {num_replicas}")
    try:
        step = state_int(state["step"], "step")
        explicit_steps = bool(state["explicit_steps"])
        counters = RunCounters.from_state(state["counters"], state.get("seconds", {}))
        if not isinstance(state["history"], list):
            raise ValueError(f"Selector state history must be a list, got {type(state['history']).__name__}")
        history = [dict(h) for h in state["history"]]
        epoch = Epochs.parse_state(state, rank=rank, num_replicas=num_replicas, num_samples=num_samples)
        return step, explicit_steps, counters, history, state["table"], state["policy_state"], epoch
    except KeyError as exc:
        raise ValueError(f"Selector state is missing {exc}") from None
    except TypeError as exc:
        raise ValueError(f"Selector state is malformed: {exc}") from None
