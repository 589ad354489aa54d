"""The plug-and-play Selector: three touch-points in any training loop.

The Selector serves the loop; an epoch's life (plan, shard, position, weights, saved state)
lives in :mod:`geko_core.epoch`, the selection rules in :mod:`geko_core.policies`.

    sel = geko_core.Selector(num_samples=len(ds), policy="geko", epochs=E, seed=0)
    loader = DataLoader(geko_core.WithIndex(ds), batch_size=B, sampler=sel.sampler)
    for epoch in range(E):
        for idx, x, y in loader:
            loss = sel.loss(model(x), y, idx)
            loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ._checks import check_bool, check_int
from .config import BUCKET_NAMES, GekoConfig, resolve_config
from .epoch import EpochPlan, Plan
from .cross_entropy import _loss_and_stats
from .policies import Policy, PolicyContext, StatsBatch, TableView, make_policy
from .types import SampleStats

__all__ = ["GekoSampler", "Selector", "WithIndex"]

STATE_FORMAT_VERSION = 2  # 2: the epoch object's state (per-position weights, padding, trained position)
_WITH_INDEX_HINT = (
    "wrap your dataset in geko_core.WithIndex(dataset) so every batch starts with the samples' "
    "dataset indices, and pass those indices to the Selector"
)


class WithIndex(Dataset):
    """Makes a map-style dataset yield ``(index, *item)``.

    A tuple item is flattened (``(x, y)`` becomes ``(index, x, y)``); anything else becomes
    ``(index, item)``.
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"WithIndex needs a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (index, *item)
        return (index, item)


class GekoSampler(Sampler[int]):
    """The Selector's sampler: yields this rank's planned indices of the current epoch.

    It behaves as ``DistributedSampler`` does: ``len()`` only answers (the current epoch's
    planned length), ``set_epoch`` moves to an epoch, and iterating yields from the position
    training has reached. An epoch ends when training has consumed it (the Selector then
    moves on by itself) or when the DataLoader has run through it and dropped an incomplete
    last batch. ``state_dict``/``load_state_dict`` carry the epoch, its plan and the trained
    position, so torchdata's ``StatefulDataLoader`` checkpoints the sampler with the loader.
    """

    def __init__(self, selector: "Selector") -> None:
        self._selector = selector

    def __len__(self) -> int:
        return self._selector._epoch_length()

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing happens before the first next() (loaders call iter() more than
        # once while they restore a checkpoint).
        yield from self._selector._iterate()

    def set_epoch(self, epoch: int) -> None:
        self._selector.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the sampler's iteration stands: ``{"epoch": e, "yielded": n}``, plain ints,
        constant time, no side effect. A loader that checkpoints its sampler (torchdata's
        ``StatefulDataLoader`` snapshots it when it hands a batch to a worker) restores the
        iteration with it; the plan, the trained position and the table come with
        ``Selector.state_dict``."""
        return self._selector._iteration_state()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next iteration start where ``state`` says (after
        ``Selector.load_state_dict``). Never plans, changes the epoch or the trained position."""
        self._selector._load_iteration_state(state)


class Selector:
    """Sample selection for any PyTorch training loop.

    Args:
        num_samples: size of the (index-yielding) training set.
        policy: ``"geko"``, ``"infobatch"``, ``"es"``, ``"eswp"``, ``"gainrl"``, ``"grace"``,
            ``"uniform"``, ``"random_subset"``, or a :class:`~geko_core.policies.Policy` object.
        epochs: planned number of epochs (training progress = epochs done + share of the
            current one). Give this or ``total_steps``.
        total_steps: planned number of optimizer steps (progress = steps / total_steps);
            a step is one ``loss``/``observe``/``select`` call unless ``sel.step()`` is used.
        seed: seed of every plan (deterministic in seed, epoch and the table's state).
        config: :class:`~geko_core.GekoConfig` thresholds and rates.
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
        if sample_tokens is not None:
            if isinstance(sample_tokens, torch.Tensor):
                sample_tokens = sample_tokens.detach().cpu().numpy()
            sample_tokens = np.asarray(sample_tokens)
            if sample_tokens.dtype == np.bool_ or not np.issubdtype(sample_tokens.dtype, np.integer):
                raise TypeError(f"sample_tokens must hold integer token counts, got dtype {sample_tokens.dtype}")
            if sample_tokens.shape != (num_samples,):
                raise ValueError(f"sample_tokens must have shape ({num_samples},), got {sample_tokens.shape}")
            if (sample_tokens < 0).any() or sample_tokens.sum() == 0:
                raise ValueError("sample_tokens must be >= 0 with a positive total")
            sample_tokens = sample_tokens.astype(np.int64)
            sample_tokens.flags.writeable = False
        if num_replicas is None and rank is None and _distributed():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        num_replicas = 1 if num_replicas is None else check_int(num_replicas, "num_replicas", low=1)
        rank = 0 if rank is None else check_int(rank, "rank", low=0, high=num_replicas - 1)

        self.num_samples = num_samples
        self.epochs = epochs
        self.total_steps = total_steps
        self.seed = seed
        self.config = resolve_config(config)
        self.num_replicas = num_replicas
        self.rank = rank
        self.backend = backend
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.table = SampleTable(self.num_samples, self.config)
        #: What policies see of the run (frozen).
        self.context = PolicyContext(
            num_samples=num_samples, seed=seed, epochs=epochs, total_steps=total_steps,
            rank=rank, world_size=num_replicas, table=TableView(self.table), sample_tokens=sample_tokens,
        )
        self.policy = make_policy(policy, **(policy_options or {}))
        self.policy.bind(self.context)
        self.policy.on_epoch(0)
        self.sampler = GekoSampler(self)
        self.history: list[dict[str, Any]] = []

        self.epoch = 0
        self._step = 0
        self._explicit_steps = bool(explicit_steps)
        self._plan: EpochPlan | None = None
        self._iteration_start: int | None = None  # set by GekoSampler.load_state_dict, used once
        self._batch_seen = 0  # largest batch trained in the current epoch
        self._last_batch: tuple[Any, np.ndarray] | None = None  # indices, weights of the last observed batch
        # Index tensors on a GPU are read one step late (no per-step host synchronisation);
        # True takes that path for CPU tensors too (tests of the deferred path).
        self._defer_host_indices = False
        self._pending: list[tuple[Any, ...]] = []
        self._forwarded = 0
        self._backpropagated = 0
        self._epoch_start_counts = (0, 0)
        # Tokens (valid label tokens: response tokens for a masked prompt), kept as tensors on
        # the statistics' device so that counting never synchronises with a GPU.
        self._tokens: dict[str, Any] = {"forwarded": 0, "backpropagated": 0}
        # Wall-clock of the whole Selector calls a training loop pays (the overhead), and of
        # planning; _depth keeps nested calls from counting twice.
        self._seconds = dict.fromkeys(_TIMED, 0.0)
        self._depth = 0

    # -- progress -----------------------------------------------------------------------------
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
        """This rank's :class:`~geko_core.epoch.EpochPlan` of the current epoch (planned now if
        it is not yet). Read it; the Selector moves its position."""
        return self._current()

    @property
    def position(self) -> int:
        """Samples of this rank's current plan consumed by training (loss/observe calls)."""
        return 0 if self._plan is None else self._plan.position

    @property
    def remaining(self) -> int:
        """Samples of this rank's current plan not yet consumed by training (plans the
        current epoch if needed; never moves to another epoch)."""
        return self._current().remaining

    @property
    def epoch_consumed(self) -> bool:
        """Training has consumed the current epoch's plan (it moves on at the next iteration)."""
        return self._plan is not None and self._plan.trained

    def epoch_progress(self) -> float:
        """Epochs done plus the consumed share of the current one."""
        plan = self._plan
        return self.epoch + (plan.position / len(plan) if plan is not None and len(plan) else 0.0)

    def count_steps_explicitly(self) -> None:
        """From now on only :meth:`step` advances the step count (gradient accumulation)."""
        self._explicit_steps = True

    def step(self) -> None:
        """Count one optimizer step explicitly (for gradient accumulation). Once called, the
        Selector stops counting a step per batch."""
        self._explicit_steps = True
        self._step += 1

    # -- the epoch ----------------------------------------------------------------------------
    def _current(self) -> EpochPlan:
        """The current epoch's plan, planned from the table as it is now if not yet planned."""
        if self._plan is None:
            self._flush()
            started = time.perf_counter()
            plan = self.policy.plan_epoch(self.context, self.epoch, self.progress())
            if not isinstance(plan, Plan):
                raise TypeError(f"a policy's plan_epoch must return geko_core.policies.Plan, got {type(plan).__name__}")
            self._plan = EpochPlan.from_plan(
                plan.checked(self.num_samples), epoch=self.epoch, num_replicas=self.num_replicas, rank=self.rank,
                batch_size=self.batch_size, drop_last=self.drop_last,
            )
            elapsed = time.perf_counter() - started
            self._seconds["planning"] += elapsed
            if self._depth == 0:
                self._seconds["total"] += elapsed
        return self._plan

    def _epoch_length(self) -> int:
        return len(self._current())

    def _advance(self) -> None:
        self._move_to(self.epoch + 1)

    def _move_to(self, epoch: int) -> None:
        self._flush()
        if self._plan is not None:
            if self._plan.position > 0 or self._plan.exhausted:  # an epoch that ran
                self._record_history()
            self._plan.stop_iteration()
        self._iteration_start = None
        self.epoch = epoch
        self._plan = None
        self._batch_seen = 0
        self.policy.on_epoch(epoch)

    def _iterate(self) -> Iterator[int]:
        plan = self._plan
        if plan is not None and plan.exhausted:
            dropped = plan.remaining
            if dropped == 0 or (self._batch_seen and dropped < self._batch_seen):
                if dropped and not self.drop_last:
                    warnings.warn(
                        f"the DataLoader dropped the last {dropped} samples of epoch {self.epoch} (drop_last=True?): "
                        f"pass batch_size= and drop_last=True to the Selector so that epochs are planned in whole "
                        f"batches and a resume is exact",
                        stacklevel=3,
                    )
                self._advance()
            # else: the loop stopped early (break); continue the epoch from the trained position
        elif plan is not None and len(plan) and plan.trained:
            self._advance()
        plan = self._current()
        start, self._iteration_start = self._iteration_start, None
        if start is not None and start >= len(plan) and len(plan):  # the loader had finished this epoch
            self._advance()
            plan, start = self._current(), None
        return plan.iterate(start)

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch`` (DistributedSampler's convention); a no-op for the current one."""
        epoch = check_int(epoch, "epoch", low=0)
        if epoch != self.epoch:
            self._move_to(epoch)

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's planned indices and importance weights of the current epoch (copies)."""
        plan = self._current()
        return plan.indices.copy(), plan.weights.copy()

    # -- observing ----------------------------------------------------------------------------
    def weights(self, idx: Any) -> torch.Tensor:
        """Importance weights (float32) of the batch ``idx``: the batch about to be trained
        (at the plan's position), or the one just observed."""
        with self._timed("weights"):
            indices = self._indices(idx)
            plan = self._current()
            at = plan.locate(indices)
            if self._last_batch is not None and isinstance(self._last_batch[0], _DeviceIndices):
                self._last_batch = (self._last_batch[0].resolve(self.num_samples), self._last_batch[1])
            if at < 0 and self._last_batch is not None and np.array_equal(self._last_batch[0], indices):
                values = self._last_batch[1]
            else:
                values = plan.batch_weights(indices, at)
            return _on_device(torch.from_numpy(np.array(values, dtype=np.float32)), idx)

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
            The weighted loss (``reduction`` as in :func:`~geko_core.cross_entropy_with_stats`).
        """
        with self._timed("loss"):
            packed = segments is not None or position_ids is not None
            batch_size = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and not packed else None
            indices = self._batch_indices(idx, expected=batch_size)
            head_weight, head_bias = _head_parameters(lm_head)
            if packed and head_weight is not None:
                raise ValueError("segments= / position_ids= are not supported with lm_head=")
            packing = {"segments": segments, "position_ids": position_ids, "num_segments": len(indices)} if packed else {}
            if head_weight is None:
                self._check_before_planning(logits, labels, ignore_index, shift, packing)
            elif self._plan is None:  # bad input must not plan an epoch (see _check_before_planning)
                from ._linear_chunks import prepare as _prepare

                _prepare(logits, head_weight, labels, head_bias, weights, ignore_index=ignore_index, shift=shift,
                         chunk_size=chunk_size, backend=self.backend)
            plan = self._current()
            if isinstance(indices, _DeviceIndices):
                at = indices.assume_at(plan)
                if at < 0:  # not where the plan stands: the values are needed now
                    indices = indices.resolve(self.num_samples)
                    at = plan.locate(indices)
            else:
                at = plan.locate(indices)
            if weights is None:
                batch_weights = np.array(plan.batch_weights(indices, at), dtype=np.float32)
                weights = torch.from_numpy(batch_weights)
                if isinstance(logits, torch.Tensor) and logits.device.type != "cpu":
                    weights = weights.to(logits.device, non_blocking=True)
            else:
                batch_weights = None
            host = None  # the C++ path's host arrays: nothing converted twice
            if head_weight is None:
                loss, stats, host = _loss_and_stats(
                    logits, labels, ignore_index=ignore_index, shift=shift, sample_weight=weights,
                    reduction=reduction, per_token=False, config=self.config, backend=self.backend,
                    inplace_backward=inplace_backward, segments=packing.get("segments"),
                    position_ids=packing.get("position_ids"), num_segments=packing.get("num_segments"),
                )
            else:
                from .linear_cross_entropy import linear_cross_entropy_with_stats

                loss, stats = linear_cross_entropy_with_stats(
                    logits, head_weight, labels, bias=head_bias, ignore_index=ignore_index, shift=shift,
                    sample_weight=weights, reduction=reduction, chunk_size=chunk_size, config=self.config,
                    backend=self.backend,
                )
            tokens = host.valid_total if host is not None and host.valid_total is not None else self._token_value(stats)
            self._backpropagated += len(indices)
            self._tokens["backpropagated"] = self._tokens["backpropagated"] + tokens
            if observe:
                self._observe(indices, stats, at, batch_weights, tokens=tokens, host_values=None if host is None else host.values)
            else:
                self._forwarded += len(indices)
                self._tokens["forwarded"] = self._tokens["forwarded"] + tokens
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

        with self._timed("observe"):
            packed = segments is not None or position_ids is not None
            batch_size = logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and not packed else None
            indices = self._indices(idx, expected=batch_size)
            packing = {"segments": segments, "position_ids": position_ids, "num_segments": len(indices)} if packed else {}
            stats = sample_stats(
                logits.detach(), labels, ignore_index=ignore_index, shift=shift, config=self.config, backend=self.backend,
                **packing,
            )
            self._backpropagated += len(indices)
            self._count_tokens(stats, "backpropagated")
            self._observe_located(indices, stats)
            return stats

    def observe_stats(self, idx: Any, stats: SampleStats, *, backpropagated: bool = True) -> None:
        """Feed statistics computed elsewhere (e.g. by ``cross_entropy_with_stats``)."""
        with self._timed("observe"):
            if not isinstance(stats, SampleStats):
                raise TypeError(f"stats must be a geko_core.SampleStats, got {type(stats).__name__}")
            indices = self._indices(idx, expected=stats.loss.shape[0])
            if backpropagated:
                self._backpropagated += len(indices)
                self._count_tokens(stats, "backpropagated")
            self._observe_located(indices, stats)

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

        with self._timed("select"):
            if not self.policy.meta_batch:
                raise TypeError(f"policy {self.policy.name!r} does not select inside a meta-batch; use Selector.loss")
            indices = self._indices(idx, expected=logits.shape[0] if isinstance(logits, torch.Tensor) and logits.dim() >= 1 else None)
            # Statistics first: bad input raises before the epoch is planned (nothing changes).
            stats = sample_stats(logits.detach(), labels, ignore_index=ignore_index, shift=shift, config=self.config, backend=self.backend)
            plan = self._current()
            at = plan.locate(indices)
            plan_weights = np.array(plan.batch_weights(indices, at), dtype=np.float32)
            self._observe(indices, stats, at, plan_weights)
            self._flush()  # selection needs this batch's scores now
            positions, weights = self.policy.select(self.context, indices, self._step)
            weights = (np.asarray(weights, dtype=np.float32) * plan_weights[positions]).astype(np.float32)
            device = logits.device
            return torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(device), torch.from_numpy(weights).to(device)

    def _check_before_planning(self, logits: Any, labels: Any, ignore_index: int, shift: bool, packing: dict | None = None) -> None:
        """Bad input must change nothing; planning an epoch does (policies keep state), so the
        rare call that would plan checks its tensors first."""
        if self._plan is None:
            from ._inputs import prepare_inputs

            prepared = prepare_inputs(logits, labels, ignore_index=ignore_index, shift=shift, backend=self.backend)
            if packing:
                from .segments import prepare_segments

                prepare_segments(
                    packing["segments"], packing["position_ids"], packing["num_segments"], labels=labels,
                    labels3=prepared.labels3, shift=prepared.shift, ignore_index=prepared.ignore_index,
                )

    def _indices(self, idx: Any, expected: int | None = None) -> np.ndarray:
        if type(idx) is torch.Tensor and idx.dtype == torch.int64 and idx.dim() == 1 and idx.is_cpu:
            # The usual batch (WithIndex's collated indices): a few attribute reads, and one
            # reduction for the range (a negative int64 read as uint64 is above any size).
            array = idx.numpy()  # an integer tensor never requires grad
            if expected is not None and len(array) != expected:
                raise ValueError(f"idx has {len(array)} entries but the batch has {expected} samples; {_WITH_INDEX_HINT}")
            if len(array) and array.view(np.uint64).max() >= self.num_samples:
                bad = array[(array < 0) | (array >= self.num_samples)][0]
                raise IndexError(f"dataset index {int(bad)} is out of range for a Selector of {self.num_samples} samples")
            return array
        if isinstance(idx, torch.Tensor):
            if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex():
                raise TypeError(f"idx must hold integer dataset indices, got a {idx.dtype} tensor; {_WITH_INDEX_HINT}")
            array = idx.detach().cpu().numpy()
        elif isinstance(idx, np.ndarray):
            array = idx
        elif isinstance(idx, (list, tuple)):
            array = np.asarray(idx)
        else:
            raise TypeError(f"idx must be a tensor, array or list of dataset indices, got {type(idx).__name__}; {_WITH_INDEX_HINT}")
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"idx must hold integer dataset indices, got dtype {array.dtype}; {_WITH_INDEX_HINT}")
        if array.ndim != 1:
            raise ValueError(f"idx must be 1-D [B], got shape {tuple(array.shape)}; {_WITH_INDEX_HINT}")
        if expected is not None and len(array) != expected:
            raise ValueError(f"idx has {len(array)} entries but the batch has {expected} samples; {_WITH_INDEX_HINT}")
        if len(array) and (array.min() < 0 or array.max() >= self.num_samples):
            bad = array[(array < 0) | (array >= self.num_samples)][0]
            raise IndexError(f"dataset index {int(bad)} is out of range for a Selector of {self.num_samples} samples")
        return array.astype(np.int64, copy=False)

    def _batch_indices(self, idx: Any, expected: int | None = None) -> "np.ndarray | _DeviceIndices":
        """``_indices``, except that an integer index tensor on a GPU is not read now (that
        would synchronise with the device every step): it is copied to the host
        asynchronously and checked when its batch is applied to the table, one step later.
        Until then the batch is assumed to be the plan's next ``len(idx)`` entries, which is
        what the sampler yields; a batch that was not is reported then."""
        if (
            isinstance(idx, torch.Tensor)
            and (idx.device.type != "cpu" or self._defer_host_indices)
            and idx.dim() == 1
            and not (idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.is_complex())
        ):
            if expected is not None and idx.shape[0] != expected:
                raise ValueError(f"idx has {idx.shape[0]} entries but the batch has {expected} samples; {_WITH_INDEX_HINT}")
            return _DeviceIndices(idx)
        return self._indices(idx, expected)

    def _observe_located(self, indices: np.ndarray, stats: SampleStats) -> None:
        plan = self._current()
        at = plan.locate(indices)
        self._observe(indices, stats, at, np.array(plan.batch_weights(indices, at), dtype=np.float32))

    def _observe(
        self,
        indices: np.ndarray,
        stats: SampleStats,
        at: int,
        weights: np.ndarray | None,
        tokens: Any = None,
        host_values: np.ndarray | None = None,
    ) -> None:
        """Queue a trained batch's statistics for the table, move the epoch's position, count
        the step; the epoch ends here when training has consumed it. ``tokens``: the batch's
        valid tokens when already counted; ``host_values``: the float32 ``[6, S]`` numpy
        memory of the CPU statistics' float fields, when the caller holds it."""
        plan = self._current()
        count = len(indices)
        real = plan.real_mask(at, count)
        deferred = isinstance(indices, _DeviceIndices)
        distributed = self.num_replicas > 1 and _distributed()
        if host_values is not None and self.config.correct_margin <= 0.0 and not deferred and not distributed:
            # The usual CPU step: rows of one host block (loss, confidence, correct, el2n).
            values = [host_values[0], host_values[1], host_values[3], host_values[5]]
            table_indices = indices
            if real is not None:  # padding copies are trained with weight 0 but never update the table
                table_indices = indices[real]
                values = [v[real] for v in values]
            # Contiguous float32 rows already: the batch goes to the policy as it is, after
            # anything still queued.
            ready = StatsBatch(table_indices, *values, step=self._step_of_batch(), epoch=self.epoch)
            self._after_observe(indices, stats, weights, tokens, plan, count, keep_last=False, ready=ready)
            return
        correct = stats.correct
        if self.config.correct_margin > 0.0:  # the table cannot apply the margin rule itself
            from .stats import table_correct

            correct = table_correct(stats, self.config)
        values = [stats.loss, stats.confidence, correct, stats.el2n]
        device = stats.loss.device
        if distributed and (device.type != "cpu" or self._defer_host_indices):
            self._observe_gathered(indices, values, real, device)
            self._after_observe(indices, stats, weights, tokens, plan, count, keep_last=device.type != "cpu")
            return
        table_indices = indices
        if real is not None:  # padding copies are trained with weight 0 but never update the table
            keep = torch.from_numpy(real).to(device)
            table_indices = indices.masked(keep) if deferred else indices[real]
            values = [v[keep] for v in values]
        if distributed:
            if deferred:
                idx_t = table_indices.device_tensor().to(device=device, dtype=torch.int64)
            else:
                idx_t = torch.from_numpy(np.ascontiguousarray(table_indices)).to(device)
            idx_t, *values = _all_gather_padded([idx_t, *values])
            table_indices = _DeviceIndices(idx_t) if deferred else idx_t.cpu().numpy()
        if deferred:
            expected = None if distributed else plan.indices[at : at + count]  # gathered: every rank's batch
            if expected is not None and real is not None:
                expected = expected[real]
            table_indices.start_copy(expected=expected)
        if device.type == "cpu":
            self._pending.append((table_indices, *[v.detach() for v in values], None, self._step_of_batch(), self.epoch))
        else:
            # No host synchronisation: copy into pinned buffers and apply one step late.
            host = [torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for v in values]
            for h, v in zip(host, values):
                h.copy_(v.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((table_indices, *host, event, self._step_of_batch(), self.epoch))
        # Apply everything but the newest entry when it is still in flight on a GPU.
        self._after_observe(indices, stats, weights, tokens, plan, count, keep_last=device.type != "cpu")

    def _observe_gathered(self, indices: Any, values: list[torch.Tensor], real: np.ndarray | None, device: torch.device) -> None:
        """DDP on GPUs: all-gather the batch at its full size, padding copies included and
        flagged, so no rank waits for the host to learn the lengths; the flags drop them when
        the batch is applied, one step later. Every rank trains equally long batches in
        lockstep (the sampler gives each rank the same number of samples)."""
        count = len(indices)
        if isinstance(indices, _DeviceIndices):
            idx_t = indices.device_tensor().to(device=device, dtype=torch.int64)
        else:
            idx_t = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(device)
        keep = torch.ones(count, dtype=torch.uint8, device=device) if real is None else torch.from_numpy(real.astype(np.uint8)).to(device)
        idx_all, keep_all, *values = _all_gather_fixed([idx_t, keep, *[v.detach() for v in values]])
        table_indices = _DeviceIndices(idx_all, keep=keep_all)
        table_indices.start_copy(expected=None)
        if device.type == "cpu":
            self._pending.append((table_indices, *values, None, self._step_of_batch(), self.epoch))
            return
        host = [torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for v in values]
        for h, v in zip(host, values):
            h.copy_(v, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((table_indices, *host, event, self._step_of_batch(), self.epoch))

    def _after_observe(
        self, indices: Any, stats: SampleStats | None, weights: np.ndarray | None, tokens: Any, plan: EpochPlan,
        count: int, keep_last: bool, ready: StatsBatch | None = None,
    ) -> None:
        self._forwarded += count
        self._tokens["forwarded"] = self._tokens["forwarded"] + (self._token_value(stats) if tokens is None else tokens)
        plan.advance(count)
        self._batch_seen = max(self._batch_seen, count)
        deferred = isinstance(indices, _DeviceIndices)
        self._last_batch = (indices if deferred else indices.copy(), weights if weights is not None else np.ones(count, dtype=np.float32))
        if not self._explicit_steps:
            self._step += 1
        self._flush(keep_last=keep_last)
        if ready is not None:
            self.policy.observe(ready, self.table)
        if len(plan) and plan.trained:
            self._advance()

    def _count_tokens(self, stats: SampleStats, kind: str) -> None:
        self._tokens[kind] = self._tokens[kind] + self._token_value(stats)

    @staticmethod
    def _token_value(stats: SampleStats) -> Any:
        """The batch's valid tokens: a host int for CPU statistics (no torch reduction per
        step), a device tensor otherwise (no synchronisation until metrics() reads it)."""
        counts = stats.valid_tokens
        if counts.device.type == "cpu":
            return int(counts.numpy().sum(dtype=np.int64))
        return counts.sum(dtype=torch.int64)

    def _token_count(self, kind: str) -> int:
        value = self._tokens[kind]
        return int(value.item()) if isinstance(value, torch.Tensor) else int(value)

    def _step_of_batch(self) -> int:
        # The table stamps a batch with the step it is trained in (counted after it by default).
        return self._step if self._explicit_steps else self._step + 1

    def _flush(self, keep_last: bool = False) -> None:
        while len(self._pending) > (1 if keep_last else 0):
            indices, loss, confidence, correct, el2n, event, step, epoch = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            if isinstance(indices, _DeviceIndices):
                keep = indices.host_keep()
                indices = indices.resolve(self.num_samples, check_plan=True)
                if keep is not None:  # gathered at full size: drop the padding copies now
                    loss, confidence, correct, el2n = (torch.as_tensor(v)[torch.from_numpy(keep)] for v in (loss, confidence, correct, el2n))
            batch = StatsBatch(
                indices=np.ascontiguousarray(indices, dtype=np.int64),
                loss=_host_floats(loss),
                confidence=_host_floats(confidence),
                correct=_host_floats(correct),
                el2n=_host_floats(el2n),
                step=step,
                epoch=epoch,
            )
            self.policy.observe(batch, self.table)

    def _timed(self, name: str) -> "_Clock":
        return _Clock(self, name)

    # -- reporting ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Bucket counts, samples forwarded / back-propagated, saved fraction, phase, and the
        wall-clock of the Selector's calls (``overhead_seconds``: the whole ``loss``,
        ``select``, ``observe``, ``weights`` calls and planning, as a training loop pays them)."""
        self._flush()
        counts = self.table.bucket_counts()
        full = self.epoch_progress() * self.num_samples / self.num_replicas
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self._step,
            "progress": self.progress(),
            "policy": self.policy.name,
            "buckets": {name: int(counts[name]) for name in BUCKET_NAMES},
            "forwarded": self._forwarded,
            "backpropagated": self._backpropagated,
            "saved_fraction": (1.0 - self._backpropagated / full) if full > 0 else 0.0,
            "forwarded_tokens": self._token_count("forwarded"),
            "backpropagated_tokens": self._token_count("backpropagated"),
            "epoch_length": len(self._plan) if self._plan is not None else None,
            "nonfinite_skipped": int(self.table.nonfinite_skipped),
            "overhead_seconds": self._seconds["total"],
            "planning_seconds": self._seconds["planning"],
            "seconds": {name: self._seconds[name] for name in _TIMED if name != "total"},
        }
        if self.context.sample_tokens is not None:
            full_tokens = self.epoch_progress() * float(self.context.sample_tokens.sum()) / self.num_replicas
            out["saved_token_fraction"] = (1.0 - out["backpropagated_tokens"] / full_tokens) if full_tokens > 0 else 0.0
        curriculum = getattr(self.policy, "curriculum", None)
        if curriculum is not None:
            out["phase"] = curriculum.phase(self.progress())[1]
        out.update({f"{self.policy.name}/{k}": v for k, v in self.policy.metrics().items()})
        return out

    def _record_history(self) -> None:
        entry = self.metrics()
        start_fwd, start_bwd = self._epoch_start_counts
        entry["epoch_forwarded"] = self._forwarded - start_fwd
        entry["epoch_backpropagated"] = self._backpropagated - start_bwd
        entry["epoch_backpropagated_tokens"] = entry["backpropagated_tokens"] - (self.history[-1]["backpropagated_tokens"] if self.history else 0)
        self._epoch_start_counts = (self._forwarded, self._backpropagated)
        self.history.append(entry)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: table, policy state, epoch, the epoch's plan
        with the position training reached, step and counters (plain arrays and numbers).

        The position counts samples *trained on*, not samples a DataLoader has prefetched, so
        a state saved at any point resumes with the next batch training would have seen."""
        self._flush()
        return {
            "format_version": STATE_FORMAT_VERSION,
            "num_samples": self.num_samples,
            "policy": self.policy.name,
            "policy_state": self.policy.state_dict(),
            "table": self.table.state_dict(),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            **self._epoch_state(),
            "step": self._step,
            "explicit_steps": self._explicit_steps,
            "counters": {
                "forwarded": self._forwarded, "backpropagated": self._backpropagated, "epoch_start": list(self._epoch_start_counts),
                "forwarded_tokens": self._token_count("forwarded"), "backpropagated_tokens": self._token_count("backpropagated"),
            },
            "seconds": dict(self._seconds),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses a mismatched one and then changes nothing."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        version = state.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"Selector state has format_version {version!r}; this version reads {STATE_FORMAT_VERSION}")
        if state.get("num_samples") != self.num_samples:
            raise ValueError(f"Selector state is for {state.get('num_samples')} samples, this Selector has {self.num_samples} (a different dataset?)")
        if state.get("policy") != self.policy.name:
            raise ValueError(f"Selector state is for policy {state.get('policy')!r}, this Selector runs {self.policy.name!r}")
        if (state.get("num_replicas"), state.get("rank")) != (self.num_replicas, self.rank):
            raise ValueError(
                f"Selector state is for rank {state.get('rank')} of {state.get('num_replicas')}, this is rank {self.rank} of {self.num_replicas}"
            )
        # Parse every plain field before anything changes: a missing or malformed entry
        # raises here and leaves this Selector as it was.
        try:
            step = _nonnegative_int(state["step"], "step")
            explicit_steps = bool(state["explicit_steps"])
            counters = state["counters"]
            forwarded = _nonnegative_int(counters["forwarded"], "counters.forwarded")
            backpropagated = _nonnegative_int(counters["backpropagated"], "counters.backpropagated")
            epoch_start = tuple(_nonnegative_int(c, "counters.epoch_start") for c in counters["epoch_start"])
            tokens = {kind: _nonnegative_int(counters.get(f"{kind}_tokens", 0), f"counters.{kind}_tokens") for kind in ("forwarded", "backpropagated")}
            if len(epoch_start) != 2:
                raise ValueError(f"counters.epoch_start must hold 2 counts, got {len(epoch_start)}")
            if not isinstance(state["history"], list):
                raise ValueError(f"Selector state history must be a list, got {type(state['history']).__name__}")
            history = [dict(h) for h in state["history"]]
            raw_seconds = state.get("seconds", {})
            if not isinstance(raw_seconds, dict):
                raise ValueError(f"Selector state seconds must be a dict, got {type(raw_seconds).__name__}")
            seconds = {name: float(raw_seconds.get(name, 0.0)) for name in _TIMED}
            if not all(np.isfinite(v) and v >= 0 for v in seconds.values()):
                raise ValueError("Selector state seconds must be finite and non-negative")
            table_state, policy_state = state["table"], state["policy_state"]
            epoch, plan, batch_seen = self._parse_sampler_state(state)
        except KeyError as exc:
            raise ValueError(f"Selector state is missing {exc}") from None
        except TypeError as exc:
            raise ValueError(f"Selector state is malformed: {exc}") from None
        # Validate the table and policy state on scratch copies first: nothing changes on error.
        from .table import SampleTable

        scratch = SampleTable(self.num_samples, self.config)
        scratch.load_state_dict(table_state)
        before_policy = self.policy.state_dict()
        try:
            self.policy.load_state_dict(policy_state)
            self.table.load_state_dict(table_state)
        except Exception as exc:
            # A policy may have replaced part of its state before refusing the rest.
            self.policy.load_state_dict(before_policy)
            if isinstance(exc, KeyError):
                raise ValueError(f"Selector state's policy_state is missing {exc}") from None
            raise
        self._pending.clear()
        self._install_epoch(epoch, plan, batch_seen)
        self._step = step
        self._explicit_steps = explicit_steps
        self._forwarded = forwarded
        self._backpropagated = backpropagated
        self._epoch_start_counts = epoch_start
        self._tokens = tokens
        self._seconds = seconds
        self.history = history

    def _epoch_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "epoch_plan": None if self._plan is None else self._plan.state_dict(),
            "batch_seen": self._batch_seen,
        }

    def _parse_sampler_state(self, state: dict[str, Any]) -> tuple[int, EpochPlan | None, int]:
        epoch = _nonnegative_int(state["epoch"], "epoch")
        batch_seen = _nonnegative_int(state.get("batch_seen", 0), "batch_seen")
        plan = None
        if state["epoch_plan"] is not None:
            plan = EpochPlan.from_state_dict(state["epoch_plan"])
            if (plan.epoch, plan.rank, plan.num_replicas) != (epoch, self.rank, self.num_replicas):
                raise ValueError(
                    f"Selector state's plan is for epoch {plan.epoch}, rank {plan.rank} of {plan.num_replicas}; "
                    f"expected epoch {epoch}, rank {self.rank} of {self.num_replicas}"
                )
            if len(plan) and int(plan.indices.max()) >= self.num_samples:
                raise IndexError(f"Selector state's plan holds an index outside [0, {self.num_samples})")
        return epoch, plan, batch_seen

    def _install_epoch(self, epoch: int, plan: EpochPlan | None, batch_seen: int) -> None:
        if self._plan is not None:
            self._plan.stop_iteration()
        self.epoch = epoch
        self._plan = plan
        self._batch_seen = batch_seen
        self._last_batch = None
        self._iteration_start = None
        self.policy.on_epoch(epoch)

    def _iteration_state(self) -> dict[str, int]:
        plan = self._plan
        if plan is None:
            return {"epoch": self.epoch, "yielded": 0}
        return {"epoch": plan.epoch, "yielded": plan.yielded}

    def _load_iteration_state(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"sampler state must be a dict, got {type(state).__name__}")
        try:
            epoch = _nonnegative_int(state["epoch"], "sampler epoch")
            yielded = _nonnegative_int(state["yielded"], "sampler yielded")
        except KeyError as exc:
            raise ValueError(f"sampler state is missing {exc}") from None
        if epoch == self.epoch - 1:
            return  # the loader stood at the end of the epoch the Selector has finished
        if epoch != self.epoch:
            raise ValueError(
                f"sampler state is for epoch {epoch} but the Selector is in epoch {self.epoch}: "
                "restore the Selector's state (Selector.load_state_dict) from the same checkpoint first"
            )
        if self._plan is not None and yielded > len(self._plan):
            raise ValueError(f"sampler state has yielded {yielded} samples of an epoch of {len(self._plan)}")
        self._iteration_start = yielded


_TIMED = ("loss", "select", "observe", "weights", "planning", "total")


class _Clock:
    """``with selector._timed(name):`` adds the block's wall-clock to ``name`` (and to
    ``total`` unless nested in another timed call). A call refused for bad input changes
    nothing, its clock included. (A plain class: a generator-based context manager costs
    a few microseconds more per step.)"""

    __slots__ = ("_selector", "_name", "_started")

    def __init__(self, selector: "Selector", name: str) -> None:
        self._selector = selector
        self._name = name

    def __enter__(self) -> None:
        self._selector._depth += 1
        self._started = time.perf_counter()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        selector = self._selector
        selector._depth -= 1
        if exc_type is None:
            elapsed = time.perf_counter() - self._started
            selector._seconds[self._name] += elapsed
            if selector._depth == 0:
                selector._seconds["total"] += elapsed
        return False


def _host_floats(values: Any) -> np.ndarray:
    """Contiguous float32 numpy of a queued field (a host array or a CPU tensor)."""
    if not isinstance(values, np.ndarray):
        values = values.numpy()
    return np.ascontiguousarray(values, dtype=np.float32)


def _on_device(values: torch.Tensor, like: Any) -> torch.Tensor:
    if isinstance(like, torch.Tensor) and like.device.type != "cpu":
        return values.to(like.device, non_blocking=True)
    return values


def _nonnegative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Selector state {name} must be a non-negative int, got {value!r}")
    return int(value)


class _DeviceIndices:
    """A batch's dataset indices still on their device, read on the host one step late."""

    def __init__(self, tensor: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self._tensor = tensor.detach()
        self._keep = keep  # uint8 flags of the entries that update the table (all when None)
        self._host_keep: torch.Tensor | None = None
        self._host: torch.Tensor | None = None
        self._event: Any = None
        self._expected: np.ndarray | None = None
        self._values: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self._tensor.shape[0])

    def device_tensor(self) -> torch.Tensor:
        return self._tensor

    def assume_at(self, plan: Any) -> int:
        """The plan position this batch is taken to start at: where training stands, when
        the plan has that many entries left; else -1."""
        at = plan.position
        return at if at + len(self) <= len(plan) else -1

    def masked(self, keep: torch.Tensor) -> "_DeviceIndices":
        return _DeviceIndices(self._tensor[keep.to(self._tensor.device)])

    def start_copy(self, expected: np.ndarray) -> None:
        """Copy to the host without waiting; ``expected`` is what the plan holds there."""
        self._expected = None if expected is None else np.array(expected, dtype=np.int64)
        if self._tensor.device.type == "cuda":
            self._host = torch.empty(self._tensor.shape, dtype=self._tensor.dtype, pin_memory=True)
            self._host.copy_(self._tensor, non_blocking=True)
            if self._keep is not None:
                self._host_keep = torch.empty(self._keep.shape, dtype=self._keep.dtype, pin_memory=True)
                self._host_keep.copy_(self._keep, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = self._tensor
            self._host_keep = self._keep

    def host_keep(self) -> np.ndarray | None:
        """bool flags of the entries that update the table (None: all); waits for the copy."""
        if self._keep is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        flags = (self._host_keep if self._host_keep is not None else self._keep.cpu()).numpy().astype(bool)
        return flags

    def resolve(self, num_samples: int, check_plan: bool = False) -> np.ndarray:
        """The indices as int64 numpy (waits for the copy), range-checked; with
        ``check_plan``, a batch that was not the plan's is reported."""
        if self._values is None:
            if self._host is None:
                self._host = self._tensor.cpu()
            if self._event is not None:
                self._event.synchronize()
            values = self._host.numpy().astype(np.int64, copy=False)
            keep = self.host_keep()
            if keep is not None:
                values = values[keep]
            if len(values) and (values.min() < 0 or values.max() >= num_samples):
                bad = values[(values < 0) | (values >= num_samples)][0]
                raise IndexError(
                    f"dataset index {int(bad)} is out of range for a Selector of {num_samples} samples "
                    "(found when its batch was applied, one step after it was trained: indices on a GPU are read late)"
                )
            self._values = values
        if check_plan and self._expected is not None and not np.array_equal(self._values, self._expected):
            warnings.warn(
                "a batch whose indices were on a GPU was not the plan's next batch: its loss weights were taken from "
                "the plan's positions. Loops that reorder or filter batches should pass idx on the CPU "
                "(sel.loss(..., idx.cpu())), which costs a synchronisation per step",
                RuntimeWarning,
                stacklevel=4,
            )
            self._expected = None
        return self._values


def _head_parameters(lm_head: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(weight, bias)`` of an output layer given to ``Selector.loss``: an ``nn.Linear`` (or
    any module with a 2-D ``weight`` and an optional ``bias``), a ``[V, d]`` tensor, or None."""
    if lm_head is None:
        return None, None
    if isinstance(lm_head, torch.Tensor):
        return lm_head, None
    weight = getattr(lm_head, "weight", None)
    if isinstance(lm_head, torch.nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        bias = getattr(lm_head, "bias", None)
        return weight, bias if isinstance(bias, torch.Tensor) else None
    raise TypeError(
        f"lm_head must be an nn.Linear-like module (a [V, d] weight, optional bias) or a [V, d] tensor, got {type(lm_head).__name__}"
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather_fixed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather 1-D tensors of the same length on every rank (no length exchange, so no
    host synchronisation); rank order is kept."""
    dist = torch.distributed
    world = dist.get_world_size()
    out = []
    for tensor in tensors:
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(gathered, tensor)
        out.append(torch.cat(gathered))
    return out


def _all_gather_padded(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather 1-D tensors whose length may differ per rank; rank order is kept."""
    dist = torch.distributed
    world = dist.get_world_size()
    device = tensors[0].device
    length = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = torch.cat(lengths).tolist()  # a host read per step: CPU (gloo) runs only; GPUs use _all_gather_fixed
    longest = max(sizes)
    out = []
    for tensor in tensors:
        padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out.append(torch.cat([g[:n] for g, n in zip(gathered, sizes)]))
    return out
