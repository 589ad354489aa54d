"""Rollout statistics and the per-prompt reward history of RL fine-tuning (docs/design.md §9).

A rollout batch is B prompts with G completions each, scored by any verifier: rewards
``[B, G]`` and, optionally, completion lengths ``[B, G]`` in tokens. :func:`rollout_stats`
reduces each prompt's group to its pass rate, reward spread, zero-variance flag (the group
gives GRPO no gradient), all-right and all-wrong flags and mean length; :class:`RolloutTable`
keeps, per prompt, the history the RL policies plan from, in one compiled 32-byte record
(``csrc/rollout_table.cpp``). The rule is written once, in the compiled core; the numpy
reference (``geko_core.reference_rollouts``) is the tests' oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ._backend import load_compiled_core
from ._checks import check_array_1d, check_float_array, check_int
from ._record_table import RecordTable, table_indices
from ._table_file import make_format
from .config import CompiledConfig

__all__ = ["ROLLOUT_FORMAT_VERSION", "ROLLOUT_RECORD_DTYPE", "RolloutConfig", "RolloutStats", "RolloutTable", "rollout_stats"]

_C = load_compiled_core()
_DEFAULTS = _C.RolloutConfig()
_MAX_STEP: int = _C.MAX_STEP

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class RolloutConfig(CompiledConfig):
    """Thresholds and rates of the rollout rule (defaults from ``csrc/include/geko/rollout_table.h``).

    Attributes:
        right_at: a reward at or above this is right.
        wrong_at: a reward at or below this is wrong; below ``right_at``. A reward's share of
            the pass rate is ``clip((r - wrong_at) / (right_at - wrong_at), 0, 1)``: with 0/1
            rewards, the share of right completions.
        alpha: EMA weight of a visit's pass rate and mean length, in (0, 1].
        light_above: a group with a reward spread and a pass rate above this is LIGHT, else
            FOCUS, in [0, 1].
        flat_tol: a group is zero-variance when ``max(r) - min(r) <= flat_tol``.
    """

    right_at: float = _DEFAULTS.right_at
    wrong_at: float = _DEFAULTS.wrong_at
    alpha: float = _DEFAULTS.alpha
    light_above: float = _DEFAULTS.light_above
    flat_tol: float = _DEFAULTS.flat_tol

    _CPP = _C.RolloutConfig


_DEFAULT_CONFIG = RolloutConfig()


def _resolve(config: RolloutConfig | None) -> RolloutConfig:
    if config is None:
        return _DEFAULT_CONFIG
    if not isinstance(config, RolloutConfig):
        raise TypeError(f"config must be a geko_core.RolloutConfig, got {type(config).__name__}")
    return config


@dataclass
class RolloutStats:
    """Per-prompt statistics of a rollout batch, ``[B]`` each, on the rewards' device.

    Attributes:
        pass_rate: float32, mean of each reward's share in ``[0, 1]`` (see ``RolloutConfig``).
        spread: float32, population standard deviation of the group's rewards.
        zero_variance: bool, ``max(r) - min(r) <= flat_tol``: the group's advantages are all 0.
        mean_length: float32, mean completion length in tokens (0 without lengths).
        all_right: bool, every reward ``>= right_at``.
        all_wrong: bool, every reward ``<= wrong_at``.
    """

    pass_rate: torch.Tensor
    spread: torch.Tensor
    zero_variance: torch.Tensor
    mean_length: torch.Tensor
    all_right: torch.Tensor
    all_wrong: torch.Tensor

    @property
    def keep(self) -> torch.Tensor:
        """bool ``[B]``: the groups with a reward spread, the ones that carry a gradient."""
        return ~self.zero_variance

    @classmethod
    def _from_compiled(cls, out: tuple) -> "RolloutStats":
        pass_rate, spread, zero_variance, all_right, all_wrong, mean_length = (torch.from_numpy(a) for a in out)
        return cls(pass_rate, spread, zero_variance, mean_length, all_right, all_wrong)


# -- input checks ------------------------------------------------------------------------------


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array [B, G], got {type(value).__name__}")
    return value.detach()


def _groups(rewards: Any, lengths: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rewards float32 ``[B, G]`` (G >= 1) and lengths float32 of the same shape or None, on one device."""
    r = _as_tensor(rewards, "rewards")
    if not r.dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating-point array, got {r.dtype}")
    if r.dim() != 2 or r.shape[1] < 1:
        raise ValueError(f"rewards must be [B, G] with G >= 1, got shape {tuple(r.shape)}")
    if lengths is None:
        return r.float(), None
    n = _as_tensor(lengths, "lengths")
    if n.dtype == torch.bool or n.dtype.is_complex:
        raise TypeError(f"lengths must be an integer or float array, got {n.dtype}")
    if tuple(n.shape) != tuple(r.shape):
        raise ValueError(f"lengths must have the shape of rewards {tuple(r.shape)}, got {tuple(n.shape)}")
    if n.device != r.device:
        raise ValueError(f"lengths is on {n.device} but rewards is on {r.device}; they must be on the same device")
    return r.float(), n.float()


def _host(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())


# -- statistics --------------------------------------------------------------------------------


def rollout_stats(rewards: ArrayLike, lengths: ArrayLike | None = None, config: RolloutConfig | None = None) -> RolloutStats:
    """Per-prompt statistics of a rollout batch.

    On the CPU the compiled core computes them (and refuses NaN or infinite rewards); on
    another device, torch operations on that device, without a host synchronisation (so
    without a check of the values: a NaN reward gives a NaN pass rate, which
    ``RolloutTable.update_stats`` refuses).

    Args:
        rewards: float ``[B, G]``, torch tensor (any device) or numpy array.
        lengths: completion lengths in tokens, integer or float ``[B, G]``, or None.
        config: the thresholds; ``RolloutConfig()`` when None.

    Returns:
        The statistics, ``[B]`` each, on the rewards' device.

    Raises:
        TypeError: rewards not floating-point, lengths not numeric, config not a RolloutConfig.
        ValueError: not ``[B, G]`` with G >= 1, lengths of another shape or device, and on the
            CPU a non-finite reward or a negative or non-finite length.
    """
    config = _resolve(config)
    r, n = _groups(rewards, lengths)
    if r.device.type != "cpu":
        return _device_stats(r, n, config)
    out = _C.rollout_group_stats(_host(r), None if n is None else _host(n), config.to_cpp())
    return RolloutStats._from_compiled(out)


def _device_stats(r: torch.Tensor, n: torch.Tensor | None, config: RolloutConfig) -> RolloutStats:
    """The compiled rule in torch operations (float32 arithmetic: equal to rounding)."""
    share = ((r - config.wrong_at) / (config.right_at - config.wrong_at)).clamp(0.0, 1.0)
    mean_length = n.mean(dim=1) if n is not None else torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)
    return RolloutStats(
        pass_rate=share.mean(dim=1),
        spread=r.std(dim=1, correction=0),
        zero_variance=(r.amax(dim=1) - r.amin(dim=1)) <= config.flat_tol,
        mean_length=mean_length,
        all_right=(r >= config.right_at).all(dim=1),
        all_wrong=(r <= config.wrong_at).all(dim=1),
    )


# -- the table ---------------------------------------------------------------------------------

ROLLOUT_FORMAT = make_format(
    "RolloutTable", b"GEKORLT\0", _C.ROLLOUT_FORMAT_VERSION, _C.RolloutTable, RolloutConfig, ("updates",)
)
#: Version of the RolloutTable's record layout, state dicts and files (the core's).
ROLLOUT_FORMAT_VERSION: int = ROLLOUT_FORMAT.version
#: numpy dtype of one RolloutTable record (32 bytes), as ``RolloutTable.records()`` returns them.
ROLLOUT_RECORD_DTYPE = ROLLOUT_FORMAT.record_dtype


def _flags(value: Any, name: str) -> np.ndarray:
    array = check_array_1d(value, name)
    if array.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array, got dtype {array.dtype}")
    return np.ascontiguousarray(array)


class RolloutTable(RecordTable):
    """Per-prompt reward history of N prompts, 32 bytes each (docs/design.md §9).

    Per visit of prompt i with group statistics (pass rate p, spread, zero variance, all
    right, all wrong, mean length L) at ``step``:

    * first visit: ``pass_ema = p``, ``length_ema = L``; later ``x <- (1 - alpha) x + alpha v``;
    * ``last_pass = p``, ``last_spread = spread``;
    * ``flat_run``, ``solved_run``, ``failed_run``: +1 on a zero-variance, all-right,
      all-wrong visit, else 0 (saturating at 65535);
    * bucket: zero variance -> FREEZE when ``p >= 0.5`` else HARD (no gradient either way);
      otherwise LIGHT when ``p > light_above`` else FOCUS;
    * ``visits += 1`` (saturating), ``last_step = step``.

    Fields (``field``, ``gather``, ``records``, state dicts) and dtypes: ``pass_ema``,
    ``last_pass``, ``last_spread``, ``length_ema`` float32; ``visits`` uint32; ``last_step``
    int32 (-1: never visited); ``flat_run``, ``solved_run``, ``failed_run`` uint16;
    ``bucket`` int8 (UNSEEN when never visited); ``flags`` uint8 (reserved, 0). Reads, state
    dicts and checkpoint files are ``SampleTable``'s (``RecordTable``); so are thread
    safety and ``num_threads`` (the result never depends on it).

    Args:
        num_samples: N >= 1, the number of prompts.
        config: thresholds and rates; ``RolloutConfig()`` when None.
        num_threads: OpenMP threads of updates and scans, 0 for OpenMP's default.

    Raises:
        TypeError: num_samples or num_threads not an int, or config not a RolloutConfig.
        ValueError: num_samples < 1, num_threads outside [0, 1024].
        MemoryError: the records do not fit in memory.
    """

    _FORMAT = ROLLOUT_FORMAT

    def __init__(self, num_samples: int, config: RolloutConfig | None = None, *, num_threads: int = 1) -> None:
        num_samples = check_int(num_samples, "num_samples")
        config = _resolve(config)
        super().__init__(_C.RolloutTable(num_samples, config.to_cpp(), check_int(num_threads, "num_threads")), config)

    def update(
        self,
        indices: ArrayLike,
        rewards: ArrayLike,
        lengths: ArrayLike | None = None,
        step: int = 0,
        *,
        before: np.ndarray | None = None,
        after: np.ndarray | None = None,
    ) -> RolloutStats:
        """Apply one rollout batch, in batch order (a repeated prompt once per occurrence).

        The statistics are computed and applied in one compiled call; everything is
        validated before any record changes.

        Args:
            indices: integer ``[B]``, prompt indices in ``[0, N)``.
            rewards: float ``[B, G]`` on the CPU (on a GPU: ``rollout_stats`` there, then
                ``update_stats`` with the statistics brought to the host).
            lengths: completion lengths ``[B, G]`` (tokens), or None.
            step: training step in ``[0, MAX_STEP]``, stored as ``last_step``.
            before, after: None, or writable contiguous int8 ``[B]`` arrays that receive each
                row's bucket just before and just after the batch.

        Returns:
            The batch's statistics (CPU tensors).

        Raises:
            IndexError: an index outside ``[0, N)``.
            TypeError: indices not integer, rewards not floating-point, step not an int.
            ValueError: shapes, a non-CPU tensor, a NaN or infinite reward, a negative or
                non-finite length, or a step out of range. The table is unchanged.
        """
        step = check_int(step, "step", low=0, high=_MAX_STEP)
        idx = table_indices(indices, self.num_samples)
        r, n = _groups(rewards, lengths)
        if r.device.type != "cpu":
            raise ValueError(
                f"rewards is on device {r.device}; pass CPU data, or call rollout_stats on the device and update_stats"
            )
        if r.shape[0] != idx.shape[0]:
            raise ValueError(f"indices and rewards must have the same length B, got {idx.shape[0]} and {r.shape[0]}")
        with self._lock:
            out = self._c.update(idx, _host(r), None if n is None else _host(n), step, before, after)
        return RolloutStats._from_compiled(out)

    def update_stats(
        self,
        indices: ArrayLike,
        pass_rate: ArrayLike,
        spread: ArrayLike,
        zero_variance: ArrayLike,
        all_right: ArrayLike,
        all_wrong: ArrayLike,
        mean_length: ArrayLike,
        step: int,
        *,
        before: np.ndarray | None = None,
        after: np.ndarray | None = None,
    ) -> None:
        """Apply statistics computed elsewhere (``rollout_stats`` on a GPU) by the same rule.

        Args:
            indices: integer ``[B]`` in ``[0, N)``.
            pass_rate, spread, mean_length: float ``[B]`` on the CPU: pass rates in [0, 1],
                spreads and lengths finite and >= 0.
            zero_variance, all_right, all_wrong: bool ``[B]`` (never both all right and all wrong).
            step, before, after: as in :meth:`update`.

        Raises:
            IndexError, TypeError, ValueError: as :meth:`update`; nothing changes.
        """
        step = check_int(step, "step", low=0, high=_MAX_STEP)
        idx = table_indices(indices, self.num_samples)
        p = check_float_array(pass_rate, "pass_rate", dtype=np.float32)
        s = check_float_array(spread, "spread", dtype=np.float32)
        length = check_float_array(mean_length, "mean_length", dtype=np.float32)
        flat, right, wrong = _flags(zero_variance, "zero_variance"), _flags(all_right, "all_right"), _flags(all_wrong, "all_wrong")
        with self._lock:
            self._c.update_stats(idx, p, s, flat, right, wrong, length, step, before, after)

    @property
    def updates(self) -> int:
        """Prompt-updates applied since the table was created (saved with its state)."""
        return self._c.updates

    def __repr__(self) -> str:
        return f"RolloutTable(num_samples={self.num_samples}, nbytes={self.nbytes}, updates={self.updates})"

    # -- what RecordTable asks ---------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {"updates": self._c.updates}

    def _load_compiled(self, buffer: np.ndarray, config: RolloutConfig, counters: dict[str, int]) -> None:
        self._c.load(buffer, config.to_cpp(), counters["updates"])
