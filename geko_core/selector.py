"""The plug-and-play Selector: three touch-points in any training loop.

The Selector serves the loop and nothing more: the epochs (their one planning moment, plan,
shard, position, weights, saved state) live in :mod:`geko_core.epoch`, the selection rules
in :mod:`geko_core.policies`, the queue that carries statistics to the policy (and, on a
GPU, reads them one step late) in ``_queue``, the run's counters and clock in ``_counters``,
the all-gathers in ``_gather``.

    sel = geko_core.Selector(num_samples=len(ds), policy="geko", epochs=E, seed=0)
    loader = DataLoader(geko_core.WithIndex(ds), batch_size=B, sampler=sel.sampler)
    for epoch in range(E):
        for idx, x, y in loader:
            loss = sel.loss(model(x), y, idx)
            loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from ._checks import check_bool, check_int
from ._bookkeeping import record_batch, record_located
from ._counters import RunCounters, batch_tokens
from ._gather import distributed
from ._selector_inputs import batch_indices, check_index_range, check_loss_inputs, check_sample_tokens, head_parameters, host_indices
from ._queue import DeviceIndices, HostCopy, StatsQueue
from ._rewards import RewardsMode, logits_only
from ._selector_state import epoch_entry, load_selector_state, selector_metrics, selector_state
from .config import GekoConfig, resolve_config
from .epoch import EpochPlan, Plan
from .epochs import Epochs
from .cross_entropy import _loss_and_stats
from .policies import Policy, PolicyContext, TableView, make_policy, resolve_signal
from .sampler import GekoSampler, WithIndex
from .types import SampleStats

__all__ = ["GekoSampler", "Selector", "WithIndex"]



class Selector:
    """Sample selection for any PyTorch training loop.

    Args:
        num_samples: size of the (index-yielding) training set.
        policy: ``"geko"``, ``"infobatch"``, ``"es"``, ``"eswp"``, ``"gainrl"``, ``"grace"``,
            ``"uniform"``/``"full"``, ``"random_subset"``; in rewards mode ``"full"``,
            ``"random_subset"``, ``"dynamic"``, ``"greso"``, ``"geko"``, ``"gainrl"``
            (docs/policies.md); or a :class:`~geko_core.policies.Policy` object.
        epochs: planned number of epochs (training progress = epochs done + share of the
            current one). Give this or ``total_steps``.
        total_steps: planned number of optimizer steps (progress = steps / total_steps);
            a step is one ``loss``/``observe``/``select`` call unless ``sel.step()`` is used.
        seed: seed of every plan (deterministic in seed, epoch and the table's state).
        config: :class:`~geko_core.GekoConfig` thresholds and rates; in rewards mode a
            ``geko_core.rollouts.RolloutConfig`` (what counts as right, the EMA weight).
        policy_options: constructor options of a named policy (e.g. ``budget=0.6``).
        num_replicas, rank: distributed sharding; taken from ``torch.distributed`` when it
            is initialised and these are None.
        backend: statistics backend (None = automatic; see ``geko_core.backend_status``).
        explicit_steps: count optimizer steps only through :meth:`step` from the start
            (gradient accumulation); by default every batch is a step until ``step()`` is
            first called.
        batch_size, drop_last: the DataLoader's. With ``drop_last=True`` (which needs
            ``batch_size``) every epoch is planned in whole batches, so the samples a
            DataLoader would drop are never drawn and a resume continues exactly.
        sample_tokens: optional int ``[N]``: the tokens each sample costs (for a language
            model, its response tokens). Budgets in tokens need it, and ``metrics()`` then
            reports the share of tokens saved. Tokens forwarded and back-propagated are
            counted from the statistics either way.
        signal: ``"logits"`` (a supervised loop: ``loss``/``observe``/``select``) or
            ``"rewards"`` (an RL loop: the sampler yields prompt indices, ``observe_rewards``
            reports their rollouts' rewards, ``table`` is a ``RolloutTable``; see
            ``geko_core._rewards``). None: the policy's own (``Policy.signal``; ``"any"``
            policies default to logits). Policy names resolve per signal.

    Thread safety: a Selector is *not* thread-safe; drive it from the one thread that runs
    the training loop (DataLoader workers are separate processes and never touch it). Its
    ``table`` alone may be shared: :class:`~geko_core.SampleTable` serialises its calls.

    Distributed runs: every ``loss``/``observe``/``select`` call all-gathers the batch's
    statistics, so all ranks must make the same calls. If one rank fails and never joins,
    the others block in the all-gather until the process group's timeout
    (``torch.distributed.init_process_group(timeout=...)``; PyTorch's default is 30
    minutes for gloo, 10 for NCCL) and then raise, or at once if gloo sees the failed
    rank's process exit. Pass a timeout longer than your slowest step but well below the
    default when a hang must be caught early.
    """

    def __init__(
        self,
        num_samples: int,
        policy: str | Policy = "geko",
        *,
        epochs: int | None = None,
        total_steps: int | None = None,
        seed: int = 0,
        config: GekoConfig | None = None,
        policy_options: dict[str, Any] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        backend: str | None = None,
        explicit_steps: bool = False,
        batch_size: int | None = None,
        drop_last: bool = False,
        sample_tokens: Any = None,
        signal: str | None = None,
    ) -> None:
        from .table import SampleTable

        num_samples = check_int(num_samples, "num_samples", low=1)
        if (epochs is None) == (total_steps is None):
            raise ValueError("give exactly one of epochs= or total_steps=")
        epochs = None if epochs is None else check_int(epochs, "epochs", low=1)
        total_steps = None if total_steps is None else check_int(total_steps, "total_steps", low=1)
        seed = check_int(seed, "seed", low=0)
        batch_size = None if batch_size is None else check_int(batch_size, "batch_size", low=1)
        drop_last = check_bool(drop_last, "drop_last")
        if drop_last and batch_size is None:
            raise ValueError("drop_last=True needs the DataLoader's batch_size= to plan epochs in whole batches")
        sample_tokens = check_sample_tokens(sample_tokens, num_samples)
        if num_replicas is None and rank is None and distributed():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        num_replicas = 1 if num_replicas is None else check_int(num_replicas, "num_replicas", low=1)
        rank = 0 if rank is None else check_int(rank, "rank", low=0, high=num_replicas - 1)

        self.policy = make_policy(policy, signal=signal, **(policy_options or {}))
        #: What the Selector learns from: ``"logits"`` or ``"rewards"``.
        self.signal = resolve_signal(self.policy, signal)
        self._rewards = RewardsMode(config) if self.signal == "rewards" else None
        self.num_samples = num_samples
        self.epochs = epochs
        self.total_steps = total_steps
        self.seed = seed
        self.config = resolve_config(config) if self._rewards is None else self._rewards.config
        self.num_replicas = num_replicas
        self.rank = rank
        self.backend = backend
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.table = SampleTable(self.num_samples, self.config) if self._rewards is None else self._rewards.new_table(num_samples)
        #: What policies see of the run (frozen).
        self.context = PolicyContext(
            num_samples=num_samples, seed=seed, epochs=epochs, total_steps=total_steps,
            rank=rank, world_size=num_replicas, table=TableView(self.table), sample_tokens=sample_tokens,
        )
        self.policy.bind(self.context)
        self.policy.on_epoch(0)
        self.history: list[dict[str, Any]] = []
        self._step = 0
        self._explicit_steps = bool(explicit_steps)
        self._epochs = Epochs(self._plan_epoch, self._leave_epoch, lambda epoch: self.policy.on_epoch(epoch), drop_last=drop_last)
        if self._rewards is None:
            self._queue = StatsQueue(lambda batch: self.policy.observe(batch, self.table), num_samples)
        else:
            self._queue = self._rewards.queue(self)
        self._counters = RunCounters()
        self._last_batch: tuple[Any, np.ndarray] | None = None  # indices, weights of the last observed batch
        # Index tensors on a GPU are read one step late (no per-step host synchronisation);
        # True takes that path for CPU tensors too, and _host_copy replaces the device's
        # pinned copies and events (tests of the device path on CPU).
        self._defer_host_indices = False
        self._host_copy: HostCopy | None = None
        self.sampler = GekoSampler(self)

    # -- progress -----------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epochs.epoch

    @property
    def step_count(self) -> int:
        return self._step

    def progress(self) -> float:
        """Training progress in [0, 1] (by steps with total_steps=, by epochs otherwise)."""
        if self.total_steps is not None:
            return min(self._step / self.total_steps, 1.0)
        return min(self.epoch_progress() / self.epochs, 1.0)

    @property
    def epoch_plan(self) -> EpochPlan:
        """This rank's :class:`~geko_core.epoch.EpochPlan` of the current epoch. Read it; the
        Selector moves its position. Before the epoch has started, the plan it would start
        with now (a preview: a separate object, which changes nothing)."""
        return self._epochs.preview()

    @property
    def position(self) -> int:
        """Samples of this rank's current plan consumed by training (loss/observe calls)."""
        plan = self._epochs.plan
        return 0 if plan is None else plan.position

    @property
    def remaining(self) -> int:
        """Samples of this rank's current epoch not yet consumed by training (before the epoch
        has started: the length it would be planned with now). Changes nothing."""
        return self._epochs.preview().remaining

    @property
    def epoch_consumed(self) -> bool:
        """Training has consumed the current epoch's plan (it moves on at the next iteration)."""
        plan = self._epochs.plan
        return plan is not None and plan.trained

    def epoch_progress(self) -> float:
        """Epochs done plus the consumed share of the current one."""
        plan = self._epochs.plan
        return self.epoch + (plan.position / len(plan) if plan is not None and len(plan) else 0.0)

    def count_steps_explicitly(self) -> None:
        """From now on only :meth:`step` advances the step count (gradient accumulation)."""
        self._explicit_steps = True

    def step(self) -> None:
        """Count one optimizer step explicitly (for gradient accumulation). Once called, the
        Selector stops counting a step per batch."""
        self._explicit_steps = True
        self._step += 1

    # -- epochs -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch`` (DistributedSampler's convention); a no-op for the current one.
        The epoch is planned when it starts (its first iteration or batch)."""
        self._epochs.set_epoch(check_int(epoch, "epoch", low=0))

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's planned indices and importance weights of the current epoch (copies).
        Starts the epoch (plans it) if it has not started."""
        plan = self._epochs.start()
        return plan.indices.copy(), plan.weights.copy()

    def _plan_epoch(self, epoch: int, preview: bool) -> EpochPlan:
        """``Epochs``' planner. A preview (``len(sampler)`` or ``remaining`` before the epoch
        has started) changes nothing: the policy's attributes and state are restored after it,
        and its time is not the run's."""
        if not preview:
            started = time.perf_counter()
            plan = self._policy_plan(epoch)
            self._counters.add_planning(time.perf_counter() - started)
            if self._rewards is not None:
                self._rewards.planned(self, plan)
            return plan
        policy = self.policy
        attributes, state = dict(policy.__dict__), copy.deepcopy(policy.state_dict())
        try:
            return self._policy_plan(epoch)
        finally:
            policy.__dict__.clear()
            policy.__dict__.update(attributes)
            policy.load_state_dict(state)

    def _policy_plan(self, epoch: int) -> EpochPlan:
        plan = self.policy.plan_epoch(self.context, epoch, self.progress())
        if not isinstance(plan, Plan):
            raise TypeError(f"a policy's plan_epoch must return geko_core.policies.Plan, got {type(plan).__name__}")
        return EpochPlan.from_plan(
            plan.checked(self.num_samples), epoch=epoch, num_replicas=self.num_replicas, rank=self.rank,
            batch_size=self.batch_size, drop_last=self.drop_last,
        )

    def _leave_epoch(self, plan: EpochPlan | None) -> None:
        self._queue.apply()
        if plan is not None and (plan.position > 0 or plan.exhausted):  # an epoch that ran
            self.history.append(epoch_entry(self))

    # -- batches ------------------------------------------------------------------------------
    def weights(self, idx: Any) -> torch.Tensor:
        """Importance weights (float32) of the batch ``idx``: the batch about to be trained
        (at the plan's position), or the one just observed."""
        with self._counters.timed("weights"):
            indices = host_indices(idx, self.num_samples)
            plan = self._epochs.start()
            at = plan.locate(indices)
            last = self._last_batch
            if last is not None and isinstance(last[0], DeviceIndices):
                last = self._last_batch = (last[0].resolve(self.num_samples), last[1])
            if at < 0 and last is not None and np.array_equal(last[0], indices):
                values = last[1]
            else:
                values = plan.batch_weights(indices, at)
            values = torch.from_numpy(np.array(values, dtype=np.float32))
            if isinstance(idx, torch.Tensor) and idx.device.type != "cpu":
                values = values.to(idx.device, non_blocking=True)
            return values

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        idx: Any,
        *,
        ignore_index: int = -100,
        shift: bool = False,
        reduction: str = "mean",
        weights: torch.Tensor | None = None,
        observe: bool = True,
        lm_head: Any = None,
        chunk_size: int | None = None,
        inplace_backward: bool = False,
        segments: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused loss + statistics, table update and importance weights in one call.

        Args:
            logits: ``[B, V]`` or ``[B, T, V]``; with ``lm_head``, the hidden states
                ``[B, d]`` or ``[B, T, d]`` that the head turns into logits.
            labels: ``[B]`` or ``[B, T]``.
            idx: ``[B]`` dataset indices (from :class:`WithIndex`).
            weights: per-sample loss weights; default: the plan's importance weights of these
                positions (0 on padding copies).
            observe: update the table from these statistics (False after ``select``, which
                already observed the forward pass).
            lm_head: the output layer (an ``nn.Linear`` ``d -> V``, e.g. ``model.lm_head``, or
                its ``[V, d]`` weight tensor): the loss and the statistics come from
                :func:`~geko_core.linear_cross_entropy_with_stats`, chunk by chunk, and the
                ``[B, T, V]`` logits never exist.
            chunk_size: tokens per chunk with ``lm_head`` (None: from free memory).
            inplace_backward: without ``lm_head``, write the logits' gradient into the
                logits' storage (see :func:`~geko_core.cross_entropy_with_stats`).
            segments, position_ids: packed rows (see :func:`~geko_core.sample_stats`): the
                batch is then the ``len(idx)`` samples the segments number ``0..len(idx)-1``,
                ``idx[k]`` the dataset index of segment ``k``; not with ``lm_head``.

        Returns:
            The weighted loss (``reduction`` as in :func:`~geko_core.cross_entropy_with_stats`:
            a scalar for ``"mean"``/``"sum"``, the per-token losses for ``"none"``, ``[B]``
            (``[len(idx)]`` with packed rows) for ``"per_sample"``).

        On a GPU the call does not wait for its own statistics: they are copied to the host
        behind the step and reach the table one step later, so a step waits at most for the
        previous step's copy (docs/design.md §1).
        """
        if self._rewards is not None:
            raise logits_only("loss")
        with self._counters.timed("loss"):
            packed = segments is not None or position_ids is not None
            batch_size = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and not packed else None
            indices = batch_indices(idx, self.num_samples, batch_size, defer=self._defer_host_indices, host_copy=self._host_copy)
            head_weight, head_bias = head_parameters(lm_head)
            if packed and head_weight is not None:
                raise ValueError("segments= / position_ids= are not supported with lm_head=")
            count = len(indices)
            deferred = isinstance(indices, DeviceIndices)
            plan = self._epochs.plan
            if plan is None:  # this batch starts the epoch: check it first (bad input changes nothing)
                if not deferred:
                    check_index_range(indices, self.num_samples)
                check_loss_inputs(
                    logits, labels, ignore_index, shift, segments, position_ids, count, head_weight, head_bias, weights, chunk_size, self.backend
                )
                plan = self._epochs.start()
            if deferred:
                at = indices.assume_at(plan)
                if at < 0:  # not where the plan stands: the values are needed now
                    indices = indices.resolve(self.num_samples)
                    at = plan.locate(indices)
            else:
                at = plan.locate(indices)
                if at < 0:  # the plan's own entries are in range; any other batch is checked
                    check_index_range(indices, self.num_samples)
            batch_weights = None
            if weights is None:
                batch_weights = plan.weights[at : at + count].copy() if at >= 0 else plan.batch_weights(indices, at)
                weights = torch.from_numpy(batch_weights)
                if isinstance(logits, torch.Tensor) and logits.device.type != "cpu":
                    weights = weights.to(logits.device, non_blocking=True)
            host = None  # the host path's arrays: nothing converted twice
            if head_weight is None:
                loss, stats, host = _loss_and_stats(
                    logits, labels, ignore_index=ignore_index, shift=shift, sample_weight=weights,
                    reduction=reduction, per_token=False, config=self.config, backend=self.backend,
                    inplace_backward=inplace_backward, segments=segments, position_ids=position_ids,
                    num_segments=count if packed else None,
                )
            else:
                from .linear_cross_entropy import linear_cross_entropy_with_stats

                loss, stats = linear_cross_entropy_with_stats(
                    logits, head_weight, labels, bias=head_bias, ignore_index=ignore_index, shift=shift,
                    sample_weight=weights, reduction=reduction, chunk_size=chunk_size, config=self.config,
                    backend=self.backend,
                )
            tokens = host.valid_total if host is not None else batch_tokens(stats.valid_tokens)
            counters = self._counters
            counters.backpropagated += count
            counters.tokens["backpropagated"] = counters.tokens["backpropagated"] + tokens
            if observe:
                record_batch(self, indices, at, batch_weights, stats, host, tokens)
            else:
                counters.forwarded += count
                counters.tokens["forwarded"] = counters.tokens["forwarded"] + tokens
            return loss

    def observe(
        self,
        idx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        ignore_index: int = -100,
        shift: bool = False,
        segments: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> SampleStats:
        """Score a batch the caller trained with its own loss; counts it as forwarded and
        back-propagated. Returns the statistics. ``segments`` / ``position_ids``: packed
        rows, as in :meth:`loss`."""
        from .stats import sample_stats

        if self._rewards is not None:
            raise logits_only("observe")
        with self._counters.timed("observe"):
            packed = segments is not None or position_ids is not None
            batch_size = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and not packed else None
            indices = host_indices(idx, self.num_samples, expected=batch_size)
            packing = {"segments": segments, "position_ids": position_ids, "num_segments": len(indices)} if packed else {}
            stats = sample_stats(
                logits.detach(), labels, ignore_index=ignore_index, shift=shift, config=self.config, backend=self.backend,
                **packing,
            )
            record_located(self, indices, stats, backpropagated=True)
            return stats

    def observe_stats(self, idx: Any, stats: SampleStats, *, backpropagated: bool = True) -> None:
        """Feed statistics computed elsewhere (e.g. by ``cross_entropy_with_stats``)."""
        if self._rewards is not None:
            raise logits_only("observe_stats")
        with self._counters.timed("observe"):
            if not isinstance(stats, SampleStats):
                raise TypeError(f"stats must be a geko_core.SampleStats, got {type(stats).__name__}")
            indices = host_indices(idx, self.num_samples, expected=stats.loss.shape[0])
            record_located(self, indices, stats, backpropagated=backpropagated)

    def select(self, idx: Any, logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-batch selection (policies "es", "eswp"): score a forwarded meta-batch
        (no grad needed) and choose which of its samples to back-propagate.

        Returns:
            ``(positions, weights)``: int64 positions into the meta-batch and float32 loss
            weights, on the logits' device: the policy's selection weight times the plan's
            importance weight of each position, so the weighted loss of the selected samples
            has the meta-batch's weighted loss as its expectation. Back-propagate
            ``model(x[positions])`` with ``sel.loss(..., idx[positions], weights=weights,
            observe=False)``.
        """
        from .stats import sample_stats

        if self._rewards is not None:
            raise logits_only("select")
        with self._counters.timed("select"):
            if not self.policy.meta_batch:
                raise TypeError(f"policy {self.policy.name!r} does not select inside a meta-batch; use Selector.loss")
            indices = host_indices(idx, self.num_samples, expected=logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 else None)
            # Statistics first: bad input raises before the epoch starts (nothing changes).
            stats = sample_stats(logits.detach(), labels, ignore_index=ignore_index, shift=shift, config=self.config, backend=self.backend)
            plan_weights = record_located(self, indices, stats, backpropagated=False)
            self._queue.apply()  # selection needs this batch's scores now
            positions, weights = self.policy.select(self.context, indices, self._step)
            weights = (np.asarray(weights, dtype=np.float32) * plan_weights[positions]).astype(np.float32)
            device = logits.device
            return torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(device), torch.from_numpy(weights).to(device)

    def observe_rewards(self, idx: Any, rewards: Any, lengths: Any = None) -> Any:
        """Report a batch of rollouts (rewards mode): the one touch point of an RL loop.

        Args:
            idx: ``[B]`` prompt indices, as the sampler gave them.
            rewards: ``[B, G]`` float rewards of the G completions of each prompt (any
                verifier; finite).
            lengths: ``[B, G]`` completion tokens, or None.

        Returns:
            The per-prompt ``RolloutStats`` (on the rewards' device); ``stats.keep`` marks the
            groups with a reward spread, the ones that carry a gradient (the post-rollout
            filter).

        Everything is checked first (``TypeError``/``ValueError``/``IndexError``; nothing
        changes, the epoch does not start). Then the batch is bookkept as ``loss`` bookkeeps
        a trained batch: the epoch starts if needed, the statistics are queued for
        ``policy.observe_rollouts`` (all-gathered under DDP), the prompts, rollouts, rollout
        tokens and zero-variance groups are counted, the epoch's position moves and the
        step is counted (unless steps are counted explicitly).
        """
        if self._rewards is None:
            raise TypeError(
                "Selector.observe_rewards needs a Selector in rewards mode (Selector(..., signal='rewards') or an RL "
                "policy); this one learns from logits (loss/observe)"
            )
        with self._counters.timed("observe_rewards"):
            return self._rewards.observe(self, idx, rewards, lengths)

    # -- reporting and resume -----------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Bucket counts, samples forwarded / back-propagated, saved fraction, phase, and the
        wall-clock of the Selector's calls (``overhead_seconds``: the whole ``loss``,
        ``select``, ``observe``, ``weights`` calls and planning, as a training loop pays them).
        Changes nothing: on a GPU the table (so the bucket counts) is one batch behind until
        the next batch, the epoch's end or ``state_dict`` applies it."""
        return selector_metrics(self)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: table, policy state, epoch, the epoch's plan
        with the position training reached, step and counters (plain arrays and numbers).
        Applies the queued statistics to the table first.

        The position counts samples *trained on*, not samples a DataLoader has prefetched, so
        a state saved at any point resumes with the next batch training would have seen."""
        return selector_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses a mismatched one and then changes nothing."""
        load_selector_state(self, state)
