"""The run's epochs in order (:class:`Epochs`): which one is current, the one moment it is
planned, and when it ends; an epoch's own plan, shard, position and saved state are
:class:`~geko_core.epoch.EpochPlan`."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator

import numpy as np

from .epoch import EpochPlan

__all__ = ["Epochs", "state_int"]


class Epochs:
    """The run's epochs in order: which one is current, the one moment it is planned, and
    when it ends (docs/design.md §1).

    An epoch is planned once, when it *starts*: at its sampler's first iteration, or at the
    first call that needs its plan for a batch (``Selector.loss``/``observe``/``select``/
    ``weights``) or asks for it (``Selector.plan``), whichever comes first; never before
    (policies such as GAIN-RL and GRACE take inputs between epochs, after the previous
    epoch ended). It ends when training has consumed it (inside the call that trained its
    last batch), at ``set_epoch`` to another epoch, or when a DataLoader that ran through
    it and dropped an incomplete last batch iterates again.

    Reads never plan: before the start, :meth:`preview` answers what the epoch would be if it
    started now, from a planning that changes nothing (a loader and a Trainer measure an
    epoch with ``len(sampler)`` before they iterate it).

    Args:
        plan: ``plan(epoch, preview)`` returns this rank's :class:`EpochPlan`; with ``preview``
            it must change nothing.
        leave: called with the current plan (None if not started) before the run moves
            to another epoch.
        enter: called with the new epoch number after the run moved to it.
        drop_last: the Selector was told the DataLoader drops incomplete batches (an
            iteration that drops a tail then ends the epoch without a warning).
    """

    def __init__(
        self,
        plan: Callable[[int, bool], EpochPlan],
        leave: Callable[[EpochPlan | None], None],
        enter: Callable[[int], None],
        *,
        drop_last: bool = False,
    ) -> None:
        self.epoch = 0
        #: The current epoch's plan; None until the epoch starts.
        self.plan: EpochPlan | None = None
        #: The largest batch trained in the current epoch (tells a dropped tail from a break).
        self.batch_seen = 0
        self._plan, self._leave, self._enter = plan, leave, enter
        self._drop_last = drop_last
        self._iteration_start: int | None = None  # from a sampler state, used by the next iteration

    # -- the one planning moment -------------------------------------------------------------
    def start(self) -> EpochPlan:
        """The current epoch's plan, planned now if the epoch has not started."""
        if self.plan is None:
            self.plan = self._plan(self.epoch, False)
        return self.plan

    def preview(self) -> EpochPlan:
        """The current plan, or (before the start) the plan the epoch would get if it started
        now. Changes nothing."""
        return self.plan if self.plan is not None else self._plan(self.epoch, True)

    # -- moving on ---------------------------------------------------------------------------
    def move_to(self, epoch: int) -> None:
        """End the current epoch and make ``epoch`` current (not started)."""
        self._leave(self.plan)
        if self.plan is not None:
            self.plan.stop_iteration()
        self._iteration_start = None
        self.epoch = epoch
        self.plan = None
        self.batch_seen = 0
        self._enter(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch`` (DistributedSampler's convention); a no-op for the current one."""
        if epoch != self.epoch:
            self.move_to(epoch)

    def trained(self, count: int) -> None:
        """Training consumed a batch of ``count`` entries of the started epoch; the epoch ends
        here when that was its last."""
        plan = self.plan
        plan.advance(count)
        if count > self.batch_seen:
            self.batch_seen = count
        if len(plan) and plan.trained:
            self.move_to(self.epoch + 1)

    def iterate(self) -> Iterator[int]:
        """The sampler's iteration: ends an epoch that is over, starts the current one and
        yields from the trained position (or a restored sampler state's)."""
        plan = self.plan
        if plan is not None and plan.exhausted:
            dropped = plan.remaining
            if dropped == 0 or (self.batch_seen and dropped < self.batch_seen):
                if dropped and not self._drop_last:
                    warnings.warn(
                        f"the DataLoader dropped the last {dropped} samples of epoch {self.epoch} (drop_last=True?): "
                        f"pass batch_size= and drop_last=True to the Selector so that epochs are planned in whole "
                        f"batches and a resume is exact",
                        stacklevel=4,
                    )
                self.move_to(self.epoch + 1)
            # else: the loop stopped early (break); continue the epoch from the trained position
        elif plan is not None and len(plan) and plan.trained:
            self.move_to(self.epoch + 1)
        plan = self.start()
        start, self._iteration_start = self._iteration_start, None
        if start is not None and start >= len(plan) and len(plan):  # the loader had finished this epoch
            self.move_to(self.epoch + 1)
            plan, start = self.start(), None
        return plan.iterate(start)

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epoch_plan": None if self.plan is None else self.plan.state_dict(),
            "batch_seen": self.batch_seen,
        }

    @staticmethod
    def parse_state(state: dict[str, Any], *, rank: int, num_replicas: int, num_samples: int) -> tuple[int, EpochPlan | None, int]:
        """``(epoch, plan, batch_seen)`` from :meth:`state_dict`'s entries, validated; raises
        ``ValueError``/``IndexError`` (``KeyError``/``TypeError`` for a missing or odd entry)."""
        epoch = state_int(state["epoch"], "epoch")
        batch_seen = state_int(state.get("batch_seen", 0), "batch_seen")
        plan = None
        if state["epoch_plan"] is not None:
            plan = EpochPlan.from_state_dict(state["epoch_plan"])
            if (plan.epoch, plan.rank, plan.num_replicas) != (epoch, rank, num_replicas):
                raise ValueError(
                    f"Selector state's plan is for epoch {plan.epoch}, rank {plan.rank} of {plan.num_replicas}; "
                    f"expected epoch {epoch}, rank {rank} of {num_replicas}"
                )
            if len(plan) and int(plan.indices.max()) >= num_samples:
                raise IndexError(f"Selector state's plan holds an index outside [0, {num_samples})")
        return epoch, plan, batch_seen

    def install(self, epoch: int, plan: EpochPlan | None, batch_seen: int) -> None:
        """Become a parsed state (no epoch ends: nothing is recorded)."""
        if self.plan is not None:
            self.plan.stop_iteration()
        self.epoch, self.plan, self.batch_seen = epoch, plan, batch_seen
        self._iteration_start = None
        self._enter(epoch)

    def iteration_state(self) -> dict[str, int]:
        """The sampler's state: ``{"epoch": e, "yielded": n}``."""
        plan = self.plan
        return {"epoch": self.epoch, "yielded": 0} if plan is None else {"epoch": plan.epoch, "yielded": plan.yielded}

    def load_iteration_state(self, state: Any) -> None:
        """Make the next iteration start where a sampler state says; never plans, changes the
        epoch or the trained position."""
        if not isinstance(state, dict):
            raise TypeError(f"sampler state must be a dict, got {type(state).__name__}")
        try:
            epoch = state_int(state["epoch"], "sampler epoch")
            yielded = state_int(state["yielded"], "sampler yielded")
        except KeyError as exc:
            raise ValueError(f"sampler state is missing {exc}") from None
        if epoch == self.epoch - 1:
            return  # the loader stood at the end of the epoch the Selector has finished
        if epoch != self.epoch:
            raise ValueError(
                f"sampler state is for epoch {epoch} but the Selector is in epoch {self.epoch}: "
                "restore the Selector's state (Selector.load_state_dict) from the same checkpoint first"
            )
        if self.plan is not None and yielded > len(self.plan):
            raise ValueError(f"sampler state has yielded {yielded} samples of an epoch of {len(self.plan)}")
        self._iteration_start = yielded


def state_int(value: Any, name: str) -> int:
    """A saved state's count, refused unless a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Selector state {name} must be a non-negative int, got {value!r}")
    return int(value)
