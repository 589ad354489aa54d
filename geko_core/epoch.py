"""An epoch's whole life in one place: the global plan, this rank's shard, the position
reached by training, the weight of every position and the state that resumes it.

A policy returns a :class:`Plan`, the epoch every rank agrees on (sample indices in visiting
order, a sample may repeat, and an importance weight per entry). :meth:`EpochPlan.from_plan`
splits it for one rank with the project's one sharder (``_C.shard_plan``, written as
``DistributedSampler`` splits: padding by wrapping around, weight 0 on padding, then every
``num_replicas``-th entry) and, when the DataLoader drops an incomplete last batch, cuts the
shard to whole batches so that what is planned is exactly what is trained.

Two cursors, because a DataLoader reads its sampler ahead of training:

* ``position`` counts the entries *trained on* (the batches the Selector has observed). It
  is the resume point: :meth:`state_dict` saves it, and a resumed sampler yields from it.
* the iteration cursor counts the entries *yielded* to the DataLoader, which may be up to
  ``prefetch_factor * num_workers`` batches ahead. It is never saved: prefetched batches that
  training never saw are yielded again after a resume.

Weights belong to positions, not to dataset indices: a sample planned twice (HARD copies, or
a padding copy on a rank) has one weight per copy, and a padding copy never updates the
table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ._backend import load_compiled_core

_C = load_compiled_core()

__all__ = ["EpochPlan", "Plan", "shard"]

_STATE_VERSION = 1


@dataclass
class Plan:
    """An epoch's global sample list, identical on every rank, as a policy returns it.

    Attributes:
        indices: int64 ``[M]`` dataset indices in visiting order (a sample may repeat).
        weights: float32 ``[M]`` importance weight of each entry, finite and >= 0.
    """

    indices: np.ndarray
    weights: np.ndarray

    def checked(self, num_samples: int) -> "Plan":
        """This plan as contiguous int64 / float32 arrays, refused if malformed.

        Raises:
            TypeError: not array-like integers / floats.
            ValueError: shapes differ, weights negative or not finite.
            IndexError: an index outside ``[0, num_samples)``.
        """
        indices = np.asarray(self.indices)
        weights = np.asarray(self.weights)
        if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"plan indices must be integers, got dtype {indices.dtype}")
        if not (np.issubdtype(weights.dtype, np.floating) or np.issubdtype(weights.dtype, np.integer)) or weights.dtype == np.bool_:
            raise TypeError(f"plan weights must be floats, got dtype {weights.dtype}")
        if indices.ndim != 1 or weights.shape != indices.shape:
            raise ValueError(f"plan indices and weights must be 1-D of equal length, got {indices.shape} and {weights.shape}")
        if len(indices) and (indices.min() < 0 or indices.max() >= num_samples):
            bad = indices[(indices < 0) | (indices >= num_samples)][0]
            raise IndexError(f"plan holds index {int(bad)}, outside [0, {num_samples})")
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("plan weights must be finite and non-negative")
        return Plan(np.ascontiguousarray(indices, dtype=np.int64), weights)


def shard(
    indices: np.ndarray, weights: np.ndarray, num_replicas: int, rank: int, *, drop_last: bool = False
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One rank's share of a global plan: ``(indices, weights, total_size, real)``.

    ``real`` is the number of leading entries that are not padding; ``total_size`` the
    padded (or cut, with ``drop_last``) global length.
    """
    if num_replicas == 1 and not drop_last:
        return indices, weights, len(indices), len(indices)
    local, local_weights, total, real = _C.shard_plan(indices, weights, num_replicas, rank, drop_last)
    return local, local_weights, int(total), int(real)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _count(value: Any, name: str, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (high is not None and value > high):
        bound = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= 0{bound}, got {value}")
    return int(value)


class EpochPlan:
    """This rank's part of one epoch: indices in training order, a weight per position, the
    position training has reached, and the iteration the sampler runs over it.

    Attributes:
        indices: int64 ``[len]``, read-only.
        weights: float32 ``[len]``, read-only: importance weight of each position (0 on
            padding).
        real: number of leading positions that are real draws; positions from ``real`` on are
            padding that keeps ranks equally long (they are trained with weight 0 and never
            update the table).
        epoch, rank, num_replicas: what the plan was made for.
        epoch_size: global draws of the epoch, before chunking, padding or dropping.
        total_size: global length after chunking, padding or dropping.
        bucket_draws: global draws per bucket code (planner plans), zeros otherwise.
        kind: where the plan came from (``"policy"``, ``"buckets"``, ``"infobatch"``,
            ``"gaussian_window"``).
    """

    def __init__(
        self,
        indices: np.ndarray,
        weights: np.ndarray,
        *,
        epoch: int,
        rank: int = 0,
        num_replicas: int = 1,
        real: int | None = None,
        epoch_size: int | None = None,
        total_size: int | None = None,
        bucket_draws: Sequence[int] = (0,) * 5,
        kind: str = "policy",
        position: int = 0,
    ) -> None:
        indices = np.asarray(indices)
        weights = np.asarray(weights)
        if indices.dtype != np.int64 or indices.ndim != 1:
            raise TypeError(f"indices must be a 1-D int64 array, got {indices.dtype} with shape {indices.shape}")
        if weights.dtype != np.float32 or weights.shape != indices.shape:
            raise TypeError(f"weights must be float32 of shape {indices.shape}, got {weights.dtype} {weights.shape}")
        self.indices = _readonly(indices)
        self.weights = _readonly(weights)
        self.epoch = _count(epoch, "epoch")
        self.num_replicas = _count(num_replicas, "num_replicas")
        if self.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1, got 0")
        self.rank = _count(rank, "rank", self.num_replicas - 1)
        self.real = len(indices) if real is None else _count(real, "real", len(indices))
        self.epoch_size = len(indices) if epoch_size is None else _count(epoch_size, "epoch_size")
        self.total_size = len(indices) * self.num_replicas if total_size is None else _count(total_size, "total_size")
        self.bucket_draws = tuple(int(x) for x in bucket_draws)
        self.kind = str(kind)
        self._position = _count(position, "position", len(indices))
        self._iteration = 0  # bumped by every iterate(): an older iterator stops
        self._yielded = self._position
        self._exhausted = False
        self._weight_of: np.ndarray | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        epoch: int,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int | None = None,
        drop_last: bool = False,
        kind: str = "policy",
    ) -> "EpochPlan":
        """Split a global plan for ``rank``. With ``drop_last`` and a ``batch_size`` (the
        DataLoader's), the shard is cut to whole batches: the dropped tail is never yielded,
        so the plan's end is the epoch's end."""
        indices, weights, total, real = shard(plan.indices, plan.weights, num_replicas, rank)
        if drop_last and batch_size:
            whole = len(indices) - len(indices) % batch_size
            indices, weights = indices[:whole], weights[:whole]
            real, total = min(real, whole), whole * num_replicas
        return cls(
            indices, weights, epoch=epoch, rank=rank, num_replicas=num_replicas, real=real,
            epoch_size=len(plan.indices), total_size=total, kind=kind,
        )

    @classmethod
    def _from_core(cls, result: dict, *, epoch: int, rank: int, num_replicas: int, kind: str) -> "EpochPlan":
        """A planner function's result (already sharded by the core)."""
        return cls(
            result["indices"], result["weights"], epoch=epoch, rank=rank, num_replicas=num_replicas,
            real=result["real"], epoch_size=result["epoch_size"], total_size=result["total_size"],
            bucket_draws=result["bucket_draws"], kind=kind,
        )

    # -- size and position -------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def position(self) -> int:
        """Entries trained on so far; the next batch starts here."""
        return self._position

    @property
    def remaining(self) -> int:
        """Entries not yet trained on."""
        return len(self) - self._position

    @property
    def trained(self) -> bool:
        """Training has consumed every entry."""
        return self._position >= len(self)

    @property
    def exhausted(self) -> bool:
        """The last iteration yielded every entry (training may still be behind it)."""
        return self._exhausted

    def seek(self, position: int) -> None:
        """Continue from ``position`` (0 <= position <= len): the next iteration yields from there."""
        self._position = _count(position, "position", len(self))
        self._yielded = self._position
        self._exhausted = False

    # -- iteration (the sampler) ---------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        return self.iterate()

    def iterate(self, start: int | None = None) -> Iterator[int]:
        """Yield the indices from ``start`` (default: ``position``) on. A new iteration ends any
        older one (a DataLoader that is iterated again restarts its sampler)."""
        self._iteration += 1
        token = self._iteration
        self._exhausted = False
        start = self._position if start is None else _count(start, "start", len(self))
        self._yielded = start
        return self._generate(token, start)

    @property
    def yielded(self) -> int:
        """Where the current (or last) iteration stands: its start plus the entries it yielded."""
        return self._yielded

    def _generate(self, token: int, start: int) -> Iterator[int]:
        for i in range(start, len(self)):
            if token != self._iteration:
                return
            self._yielded = i + 1
            yield int(self.indices[i])
        if token == self._iteration:
            self._exhausted = True

    def stop_iteration(self) -> None:
        """End every live iterator of this plan (the epoch was replaced under it)."""
        self._iteration += 1

    def remaining_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices, weights) from ``position`` to the end, as read-only views."""
        return self.indices[self._position :], self.weights[self._position :]

    # -- batches (training) ------------------------------------------------------------------
    def locate(self, indices: np.ndarray, start: int | None = None) -> int:
        """Where the batch ``indices`` sits in the plan: ``start`` (default ``position``) when
        the plan's entries there are exactly these indices, else -1."""
        at = self._position if start is None else start
        end = at + len(indices)
        if at < 0 or end > len(self):
            return -1
        planned = self.indices[at:end]
        if isinstance(indices, np.ndarray) and indices.dtype == np.int64 and indices.ndim == 1:
            # The Selector's int64 batches: compare the bytes (a fraction of array_equal's cost).
            same = planned.tobytes() == indices.tobytes()
        else:
            same = np.array_equal(planned, indices)
        return at if same else -1

    def batch_weights(self, indices: np.ndarray, at: int) -> np.ndarray:
        """float32 ``[B]`` weights of a batch at position ``at`` (from :meth:`locate`); for a
        batch that is not where the plan expects it (``at == -1``), the weight of each
        sample's real copy, or 1 for a sample the plan does not hold."""
        if at >= 0:
            return self.weights[at : at + len(indices)]
        if self._weight_of is None:
            size = int(self.indices[: self.real].max()) + 1 if self.real else 0
            self._weight_of = np.ones(max(size, 1), dtype=np.float32)
            # A sample's real copies share one weight in every built-in policy; padding
            # copies (weight 0) are left out.
            self._weight_of[self.indices[: self.real]] = self.weights[: self.real]
        known = indices < len(self._weight_of)
        out = np.ones(len(indices), dtype=np.float32)
        out[known] = self._weight_of[indices[known]]
        return out

    def real_mask(self, at: int, count: int) -> np.ndarray | None:
        """bool ``[count]`` of the batch at ``at``: True for real draws, False for padding;
        None when every entry is real (or the batch was not located)."""
        if at < 0 or at + count <= self.real:
            return None
        return np.arange(at, at + count) < self.real

    def advance(self, count: int) -> None:
        """Training consumed ``count`` more entries (clamped to the plan's end)."""
        self._position = min(self._position + count, len(self))
        self._yielded = max(self._yielded, self._position)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The arrays themselves (about 12 bytes per entry) and the trained position, so a
        resume depends neither on the table nor on how far a DataLoader had prefetched."""
        return {
            "version": _STATE_VERSION,
            "indices": self.indices.copy(),
            "weights": self.weights.copy(),
            "real": self.real,
            "position": self._position,
            "epoch": self.epoch,
            "rank": self.rank,
            "num_replicas": self.num_replicas,
            "epoch_size": self.epoch_size,
            "total_size": self.total_size,
            "bucket_draws": list(self.bucket_draws),
            "kind": self.kind,
        }

    @classmethod
    def from_state_dict(cls, state: Any) -> "EpochPlan":
        """Rebuild a plan from :meth:`state_dict`; a malformed state raises ``ValueError``."""
        if not isinstance(state, dict):
            raise ValueError(f"EpochPlan state must be a dict, got {type(state).__name__}")
        missing = {"indices", "weights", "position", "epoch"} - set(state)
        if missing:
            raise ValueError(f"EpochPlan state is missing {sorted(missing)}")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"EpochPlan state has version {state.get('version')!r}; this version reads {_STATE_VERSION}")
        try:
            indices = np.asarray(state["indices"])
            weights = np.asarray(state["weights"])
            if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer) or indices.ndim != 1:
                raise ValueError(f"indices must be 1-D integers, got {indices.dtype} {indices.shape}")
            if not np.issubdtype(weights.dtype, np.floating) or weights.shape != indices.shape:
                raise ValueError(f"weights must be floats shaped like indices, got {weights.dtype} {weights.shape}")
            weights = weights.astype(np.float32)
            if not np.isfinite(weights).all() or (weights < 0).any():
                raise ValueError("weights must be finite and non-negative")
            if len(indices) and indices.min() < 0:
                raise ValueError("indices must be non-negative")
            return cls(
                indices.astype(np.int64),
                weights,
                epoch=state["epoch"],
                rank=state.get("rank", 0),
                num_replicas=state.get("num_replicas", 1),
                real=state.get("real"),
                epoch_size=state.get("epoch_size"),
                total_size=state.get("total_size"),
                bucket_draws=state.get("bucket_draws", (0,) * 5),
                kind=state.get("kind", "policy"),
                position=state["position"],
            )
        except (TypeError, OverflowError) as exc:
            raise ValueError(f"EpochPlan state is malformed: {exc}") from None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Become the plan saved in ``state`` (validated before anything changes)."""
        other = EpochPlan.from_state_dict(state)
        self.stop_iteration()
        iteration = self._iteration
        self.__dict__.update(other.__dict__)
        self._iteration = iteration

    def __repr__(self) -> str:
        return (
            f"EpochPlan(kind={self.kind!r}, epoch={self.epoch}, rank={self.rank}/{self.num_replicas}, "
            f"len={len(self)}, real={self.real}, position={self._position}, epoch_size={self.epoch_size})"
        )
