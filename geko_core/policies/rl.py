"""RL prompt selection from reward history: DAPO's dynamic sampling and GRESO's pre-rollout
skipping (``docs/policies.md``, "RL policies"). Both plan from the ``RolloutTable`` a
Selector in rewards mode keeps; neither needs anything from the loop beyond its rewards."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import BUCKET_FREEZE, BUCKET_HARD
from .base import Plan, Policy, PolicyContext, RolloutBatch
from .baselines import UniformPolicy

__all__ = ["DynamicSamplingPolicy", "GresoPolicy"]


def _fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _state_count(state: dict[str, Any], key: str, policy: str) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{policy} state {key} must be a non-negative int, got {value!r}")
    return int(value)


class DynamicSamplingPolicy(UniformPolicy):
    """DAPO's dynamic sampling: every prompt is planned every epoch; the loop rolls a batch
    out, trains only the groups with a reward spread (``stats.keep``) and keeps drawing
    prompts from the sampler until it holds a full batch of them (``filter_groups``). The
    zero-variance groups it filtered out after rolling them out are counted here; their
    rollouts are counted by the Selector like any other."""

    name = "dynamic"
    signal = "rewards"
    filter_groups = True

    def __init__(self) -> None:
        super().__init__()
        self.groups = 0
        self.filtered_groups = 0

    def observe_rollouts(self, batch: RolloutBatch, table: Any) -> None:
        super().observe_rollouts(batch, table)
        self.groups += len(batch.indices)
        self.filtered_groups += int(np.count_nonzero(batch.zero_variance))

    def metrics(self) -> dict[str, Any]:
        share = self.filtered_groups / self.groups if self.groups else 0.0
        return {"groups": self.groups, "filtered_groups": self.filtered_groups, "filtered_share": share}

    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "filtered_groups": self.filtered_groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups, filtered = _state_count(state, "groups", self.name), _state_count(state, "filtered_groups", self.name)
        if filtered > groups:
            raise ValueError(f"dynamic state filtered_groups {filtered} exceeds groups {groups}")
        self.groups, self.filtered_groups = groups, filtered


class GresoPolicy(Policy):
    """GRESO (arXiv 2506.02177): skip prompts before rollout by their run of zero-variance
    visits, with exploration probabilities adapted toward a target.

    Rules (reconstructed from the paper; our defaults are marked in ``docs/policies.md``):

    * **Skip.** A prompt whose last ``z`` visits were zero-variance (the table's
      ``flat_run``) is rolled out this epoch with probability ``max(p**z, min_explore)``
      and skipped otherwise (skip probability ``1 - p**z``). ``p`` is ``p_easy`` when its
      last zero-variance group was solved (bucket FREEZE: pass rate >= 0.5) and ``p_hard``
      when it was not (HARD). A prompt with ``z = 0`` (last group mixed, or never visited)
      is always rolled out. The draw is keyed by (seed, epoch).
    * **Adapt.** After every observed batch, for each kind ``k`` of easy and hard: if the
      share of the batch's prompts that came back zero-variance of kind ``k`` exceeds
      ``target_k``, ``p_k`` falls by ``step`` (skip more), otherwise it rises by ``step``;
      ``p_k`` stays in ``[min_explore, 1]``. So the zero-variance share of the rollouts is
      held near ``target_easy + target_hard``, and the skip rate follows from it.
    * **Weights** 1 (skipped prompts carry no gradient anyway: they were zero-variance).

    Args:
        p_easy, p_hard: the starting exploration probabilities, in [min_explore, 1].
        target_easy, target_hard: the zero-variance shares of a rolled-out batch aimed at, in
            [0, 1] (``adapt=False`` keeps ``p`` fixed).
        step: the change of ``p`` per observed batch, in [0, 1].
        min_explore: the exploration floor: the least probability of rolling a prompt out
            in an epoch, and the least ``p``, in (0, 1].
        filter_groups: also fill each batch with informative groups after the rollout, as
            dynamic sampling does (GRESO's setting in the paper: skipping on top of DAPO).
    """

    name = "greso"
    signal = "rewards"

    def __init__(
        self,
        *,
        p_easy: float = 0.5,
        p_hard: float = 0.5,
        target_easy: float = 0.125,
        target_hard: float = 0.125,
        step: float = 0.01,
        min_explore: float = 0.05,
        adapt: bool = True,
        filter_groups: bool = False,
    ) -> None:
        super().__init__()
        self._set_filter_groups(filter_groups)
        self.min_explore = _fraction(min_explore, "min_explore")
        if self.min_explore <= 0.0:
            raise ValueError("min_explore must be > 0: every prompt keeps a chance to be rolled out again")
        self.p_easy = _fraction(p_easy, "p_easy", self.min_explore)
        self.p_hard = _fraction(p_hard, "p_hard", self.min_explore)
        self.target_easy = _fraction(target_easy, "target_easy")
        self.target_hard = _fraction(target_hard, "target_hard")
        self.step = _fraction(step, "step")
        if not isinstance(adapt, bool):
            raise TypeError(f"adapt must be a bool, got {type(adapt).__name__}")
        self.adapt = adapt
        self._last = {"planned": 0, "skipped": 0, "skipped_easy": 0, "skipped_hard": 0}

    def keep_probability(self, buckets: np.ndarray, flat_run: np.ndarray) -> np.ndarray:
        """float64 ``[N]``: each prompt's probability of being rolled out this epoch."""
        z = flat_run.astype(np.float64)
        p = np.where(buckets == BUCKET_FREEZE, self.p_easy, self.p_hard)
        keep = np.maximum(np.power(p, z), self.min_explore)
        keep[z == 0] = 1.0
        return keep

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        table = context.table
        buckets = table.field("bucket")
        keep_p = self.keep_probability(buckets, table.field("flat_run"))
        rng = context.rng(epoch, 0x6E50)
        kept = rng.random(context.num_samples) < keep_p
        if not kept.any():  # never an empty epoch: the stalest prompt is rolled out
            kept[int(np.argmin(table.field("last_step")))] = True
        skipped = ~kept
        self._last = {
            "planned": int(kept.sum()), "skipped": int(skipped.sum()),
            "skipped_easy": int((skipped & (buckets == BUCKET_FREEZE)).sum()),
            "skipped_hard": int((skipped & (buckets == BUCKET_HARD)).sum()),
        }
        chosen = np.flatnonzero(kept).astype(np.int64)
        chosen = chosen[rng.permutation(len(chosen))]
        return Plan(chosen, np.ones(len(chosen), dtype=np.float32))

    def observe_rollouts(self, batch: RolloutBatch, table: Any) -> None:
        super().observe_rollouts(batch, table)
        count = len(batch.indices)
        if not self.adapt or count == 0:
            return
        easy = batch.zero_variance & (batch.pass_rate >= 0.5)
        hard = batch.zero_variance & ~(batch.pass_rate >= 0.5)
        self.p_easy = self._moved(self.p_easy, np.count_nonzero(easy) / count, self.target_easy)
        self.p_hard = self._moved(self.p_hard, np.count_nonzero(hard) / count, self.target_hard)

    def _moved(self, p: float, share: float, target: float) -> float:
        p = p - self.step if share > target else p + self.step
        return float(min(1.0, max(self.min_explore, p)))

    def metrics(self) -> dict[str, Any]:
        return {"p_easy": self.p_easy, "p_hard": self.p_hard, **self._last}

    def state_dict(self) -> dict[str, Any]:
        return {"p_easy": self.p_easy, "p_hard": self.p_hard, "last": dict(self._last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p_easy = _fraction(state["p_easy"], "greso state p_easy", self.min_explore)
        p_hard = _fraction(state["p_hard"], "greso state p_hard", self.min_explore)
        last = state["last"]
        if not isinstance(last, dict) or set(last) != set(self._last):
            raise ValueError(f"greso state last must be a dict with keys {sorted(self._last)}")
        last = {key: _state_count(last, key, self.name) for key in self._last}
        self.p_easy, self.p_hard, self._last = p_easy, p_hard, last
