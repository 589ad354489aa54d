"""The policy interface: how a selection method plugs into the Selector.

A policy answers two questions and nothing else:

* ``plan_epoch(context, epoch, progress)``: which samples the next epoch holds, as a global
  :class:`~geko_core.epoch.Plan` (the same on every rank; the epoch object shards it);
* ``observe(batch, table)``: what to learn from a batch's statistics (by default, update
  the shared :class:`~geko_core.SampleTable`); in an RL loop (``signal = "rewards"``),
  ``observe_rollouts(batch, table)`` with a :class:`RolloutBatch` and the ``RolloutTable``.

It sees the run through a frozen :class:`PolicyContext` (dataset size, seed, length of the
run, rank, world size and a read-only view of the table), never through the Selector. The
Selector owns everything else: the epoch object, step counting, sharding, resume, metrics.
Write your own policy by subclassing :class:`Policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..epoch import Plan

if TYPE_CHECKING:  # pragma: no cover
    from ..table import SampleTable

__all__ = ["SIGNALS", "Plan", "Policy", "PolicyContext", "RolloutBatch", "StatsBatch", "TableView", "rollout_batch"]

#: What a Selector learns from: the logits of a supervised loss, or the rewards of RL rollouts.
SIGNALS = ("logits", "rewards")


@dataclass
class StatsBatch:
    """Statistics of one batch, on the host, as the table consumes them.

    All arrays are ``[B]``: ``indices`` int64 dataset indices; ``loss``, ``confidence``,
    ``correct`` float32 (NaN for invalid samples); ``el2n`` float32 ``||softmax - onehot||_2``
    (NaN for invalid samples), or None when whoever built the batch did not provide it.
    ``step`` is the optimizer step the batch belongs to, ``epoch`` the Selector's epoch.
    """

    indices: np.ndarray
    loss: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    el2n: np.ndarray | None = None
    step: int = 0
    epoch: int = 0


@dataclass
class RolloutBatch:
    """Rollout statistics of one batch of prompts, on the host, as the ``RolloutTable``
    consumes them (``Selector.observe_rewards``).

    All arrays are ``[B]``: ``indices`` int64 prompt indices; ``pass_rate``, ``spread``
    (population std of the group's rewards), ``mean_length`` (mean completion tokens, 0 when
    not given) float32; ``zero_variance``, ``all_right``, ``all_wrong`` bool. ``step`` is the
    optimizer step the batch belongs to, ``epoch`` the Selector's epoch.
    """

    indices: np.ndarray
    pass_rate: np.ndarray
    spread: np.ndarray
    zero_variance: np.ndarray
    all_right: np.ndarray
    all_wrong: np.ndarray
    mean_length: np.ndarray
    step: int = 0
    epoch: int = 0


def _host(values: Any, dtype: Any) -> np.ndarray:
    if not isinstance(values, np.ndarray):
        values = values.numpy()
    return np.ascontiguousarray(values, dtype=dtype)


def rollout_batch(indices: Any, pass_rate: Any, spread: Any, zero_variance: Any, all_right: Any, all_wrong: Any,
                  mean_length: Any, step: int, epoch: int) -> RolloutBatch:
    """A :class:`RolloutBatch` from the rows a Selector queues (host arrays or CPU tensors;
    the flags as 0/1 floats): the Selector's queue builds every rewards batch with this."""
    return RolloutBatch(
        _host(indices, np.int64), _host(pass_rate, np.float32), _host(spread, np.float32),
        _host(zero_variance, np.float32) != 0, _host(all_right, np.float32) != 0, _host(all_wrong, np.float32) != 0,
        _host(mean_length, np.float32), int(step), int(epoch),
    )


class TableView:
    """Read-only access to a :class:`~geko_core.SampleTable` (or, in rewards mode, a
    ``RolloutTable``: the same read methods) for planning."""

    __slots__ = ("_table",)

    def __init__(self, table: "SampleTable") -> None:
        self._table = table

    @property
    def num_samples(self) -> int:
        return self._table.num_samples

    @property
    def config(self):
        return self._table.config

    def field(self, name: str) -> np.ndarray:
        """A copy of one field for every sample (see ``SampleTable.field``)."""
        return self._table.field(name)

    def gather(self, name: str, indices: Any) -> np.ndarray:
        return self._table.gather(name, indices)

    def buckets(self, indices: Any) -> np.ndarray:
        return self._table.buckets(indices)

    def bucket_counts(self) -> dict[str, int]:
        return self._table.bucket_counts()

    def bucket_counts_array(self) -> np.ndarray:
        return self._table.bucket_counts_array()


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know about the run; fixed for the Selector's lifetime.

    Attributes:
        num_samples: dataset size N.
        seed: seed of every plan.
        epochs: planned number of epochs, or None when the run is counted in steps.
        total_steps: planned optimizer steps, or None when the run is counted in epochs.
        rank, world_size: this process and the number of processes (plans are global: every
            rank computes the same one).
        table: read-only view of the shared table.
        sample_tokens: int64 ``[N]`` tokens each sample costs (for language models, its
            response tokens), read-only; None when the run is counted in samples. Budgets in
            tokens need it.
    """

    num_samples: int
    seed: int
    epochs: int | None
    total_steps: int | None
    rank: int
    world_size: int
    table: TableView
    sample_tokens: np.ndarray | None = None

    def rng(self, epoch: int, purpose: int = 0) -> np.random.Generator:
        """A generator keyed by (seed, epoch, purpose): plans never depend on call history."""
        return np.random.default_rng([self.seed, epoch, purpose, 0x6E6B])


class Policy:
    """Base class of selection policies.

    Subclasses implement :meth:`plan_epoch`; :meth:`observe` defaults to updating the table;
    :meth:`bind` is where a policy allocates per-sample state and checks that the run suits
    it (e.g. a known number of epochs).
    """

    name: str = "custom"
    #: True for batch-level policies that choose inside a forwarded meta-batch (``Selector.select``).
    meta_batch: bool = False
    #: What the policy learns from: ``"logits"`` (``observe``), ``"rewards"`` (RL rollouts,
    #: ``observe_rollouts``) or ``"any"`` (plans that need neither: full data, random subsets;
    #: a Selector then defaults to logits).
    signal: str = "logits"
    #: RL only: the loop trains the groups with a reward spread (``stats.keep``) and draws
    #: more prompts from the sampler until it holds a full batch of them (DAPO's dynamic
    #: sampling); the extra rollouts are counted like any other.
    filter_groups: bool = False

    def _set_filter_groups(self, value: Any) -> None:
        """The constructor option of the RL policies that may run on top of dynamic sampling
        (GRESO's own setting: skip before the rollout, then fill the batch with informative
        groups); ignored outside an RL loop."""
        if not isinstance(value, bool):
            raise TypeError(f"filter_groups must be a bool, got {type(value).__name__}")
        self.filter_groups = value

    def __init__(self) -> None:
        self.num_samples: int | None = None
        self.epoch = 0  # the Selector's current epoch (see on_epoch)

    def bind(self, context: PolicyContext) -> None:
        """Called once by the Selector that owns this policy, before anything else."""
        if self.num_samples is not None:
            raise ValueError(f"policy {self.name!r} already belongs to a Selector; make a new policy object per Selector")
        self.num_samples = context.num_samples

    def on_epoch(self, epoch: int) -> None:
        """Called when the Selector moves to ``epoch`` (before the epoch is planned) and after a
        resume. Policies with user-facing methods that stamp rounds (GRACE) read ``self.epoch``."""
        self.epoch = epoch

    # -- planning ---------------------------------------------------------------------------
    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        """The global plan of ``epoch`` at training ``progress`` in [0, 1]; deterministic in
        (``context.seed``, epoch, the table's state, the policy's state). Every policy must
        define it."""
        raise NotImplementedError(f"policy {self.name!r} does not define plan_epoch")

    # -- learning ---------------------------------------------------------------------------
    def observe(self, batch: StatsBatch, table: "SampleTable") -> None:
        table.update_arrays(batch.indices, batch.loss, batch.confidence, batch.correct, batch.step)

    def observe_rollouts(self, batch: RolloutBatch, table: Any) -> None:
        """What to learn from a batch of rollout statistics (rewards mode); by default the
        ``RolloutTable`` applies them."""
        table.update_stats(
            batch.indices, batch.pass_rate, batch.spread, batch.zero_variance, batch.all_right, batch.all_wrong,
            batch.mean_length, batch.step,
        )

    def select(self, context: PolicyContext, indices: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """For meta-batch policies: positions to back-propagate and their weights relative to
        the meta-batch mean (the Selector multiplies in the plan's weights)."""
        raise TypeError(f"policy {self.name!r} does not select inside a meta-batch; use Selector.loss")

    # -- reporting and resume ---------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"policy {self.name!r} has no state but got keys {sorted(state)}")

    # -- helpers ----------------------------------------------------------------------------
    def _bound(self) -> int:
        if self.num_samples is None:
            raise RuntimeError(f"policy {self.name!r} is not bound to a Selector; pass it as Selector(policy=...)")
        return self.num_samples
