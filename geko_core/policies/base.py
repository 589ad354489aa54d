"""The policy interface: how a selection method plugs into the Selector.

A policy decides which samples an epoch contains (``plan_epoch``) and learns from the
statistics the training loop produces (``observe``). The Selector owns everything else:
the table, step and epoch counting, sharding, resume and metrics. Write your own policy by
subclassing :class:`Policy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..selector import Selector


@dataclass
class StatsBatch:
    """Statistics of one batch, on the host, as the table consumes them.

    All arrays are ``[B]``: ``indices`` int64 dataset indices; ``loss``, ``confidence``,
    ``correct`` float32 (NaN for invalid samples); ``el2n`` float32 ``||softmax - onehot||_2``
    (NaN for invalid samples), or None when whoever built the batch did not provide it.
    """

    indices: np.ndarray
    loss: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    el2n: np.ndarray | None = None


@dataclass
class Plan:
    """An epoch's global sample list (identical on every rank before sharding).

    ``indices`` int64 ``[M]`` dataset indices in visiting order (a sample may repeat);
    ``weights`` float32 ``[M]`` importance weights (1 / expected copies) or ones.
    """

    indices: np.ndarray
    weights: np.ndarray


class Policy:
    """Base class of selection policies.

    Subclasses implement :meth:`plan_epoch`; :meth:`observe` defaults to updating the shared
    :class:`~geko_core.SampleTable`.
    """

    name: str = "custom"
    #: True for batch-level policies that choose inside a forwarded meta-batch (``Selector.select``).
    meta_batch: bool = False

    def __init__(self) -> None:
        self.selector: Selector | None = None

    def bind(self, selector: Selector) -> None:
        """Called once by the Selector that owns this policy."""
        self.selector = selector

    # -- planning ---------------------------------------------------------------------------
    def plan_epoch(self, epoch: int, progress: float) -> Plan:
        """The global plan of ``epoch`` at training ``progress`` in [0, 1]; deterministic in
        (the selector's seed, epoch, the table's state). Every policy must define it."""
        raise NotImplementedError(f"policy {self.name!r} does not define plan_epoch")

    # -- learning ---------------------------------------------------------------------------
    def observe(self, batch: StatsBatch, step: int) -> None:
        self._bound().table.update_arrays(batch.indices, batch.loss, batch.confidence, batch.correct, step)

    def select(self, indices: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """For meta-batch policies: positions to back-propagate and their weights."""
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
    def _bound(self) -> "Selector":
        if self.selector is None:
            raise RuntimeError(f"policy {self.name!r} is not bound to a Selector; pass it as Selector(policy=...)")
        return self.selector

    @property
    def num_samples(self) -> int:
        return self._bound().num_samples

    def rng(self, epoch: int, purpose: int = 0) -> np.random.Generator:
        """A generator keyed by (seed, epoch, purpose): plans never depend on call history."""
        return np.random.default_rng([self._bound().seed, epoch, purpose, 0x6E6B])
