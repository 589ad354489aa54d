"""The plug-and-play Selector: three touch-points in any training loop.

    sel = geko_core.Selector(num_samples=len(ds), policy="geko", epochs=E, seed=0)
    loader = DataLoader(geko_core.WithIndex(ds), batch_size=B, sampler=sel.sampler)
    for epoch in range(E):
        for idx, x, y in loader:
            loss = sel.loss(model(x), y, idx)
            loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .config import BUCKET_NAMES, GekoConfig, resolve_config
from .policies import Plan, Policy, StatsBatch, make_policy
from .types import SampleStats

__all__ = ["GekoSampler", "Selector", "WithIndex"]

STATE_FORMAT_VERSION = 1
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

    Its length is the planned epoch length, so epochs really shrink. It moves to the next
    epoch by itself once an epoch has been consumed, and also accepts ``set_epoch``.
    """

    def __init__(self, selector: "Selector") -> None:
        self._selector = selector

    def __len__(self) -> int:
        return self._selector._current_plan_length()

    def __iter__(self) -> Iterator[int]:
        return self._selector._iterate()

    def set_epoch(self, epoch: int) -> None:
        self._selector.set_epoch(epoch)


def _shard(plan: Plan, num_replicas: int, rank: int) -> Plan:
    """This rank's share of a global plan, as DistributedSampler shards: pad by wrapping
    around to a multiple of ``num_replicas``, then take every ``num_replicas``-th entry."""
    if num_replicas == 1:
        return plan
    total = len(plan.indices)
    per_rank = math.ceil(total / num_replicas) if total else 0
    padded = per_rank * num_replicas
    take = np.arange(padded) % max(total, 1)
    indices, weights = plan.indices[take], plan.weights[take].copy()
    # The wrapped-around padding repeats samples already in the epoch: weight 0 keeps the
    # epoch's weighted sum unbiased, as the planner's own padding does.
    weights[total:] = 0.0
    return Plan(indices[rank::num_replicas].copy(), weights[rank::num_replicas].copy())


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
    ) -> None:
        from .table import SampleTable

        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if (epochs is None) == (total_steps is None):
            raise ValueError("give exactly one of epochs= or total_steps=")
        for name, value in (("epochs", epochs), ("total_steps", total_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_replicas is None and rank is None and _distributed():
            num_replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        num_replicas = 1 if num_replicas is None else int(num_replicas)
        rank = 0 if rank is None else int(rank)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")

        self.num_samples = int(num_samples)
        self.epochs = None if epochs is None else int(epochs)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.seed = int(seed)
        self.config = resolve_config(config)
        self.num_replicas = num_replicas
        self.rank = rank
        self.backend = backend
        self.table = SampleTable(self.num_samples, self.config)
        self.policy = make_policy(policy, **(policy_options or {}))
        self.policy.bind(self)
        self.sampler = GekoSampler(self)
        self.history: list[dict[str, Any]] = []

        self.epoch = 0
        self._step = 0
        self._explicit_steps = bool(explicit_steps)
        self._plan: Plan | None = None
        self._position = 0  # samples of this rank's plan consumed by training
        self._yield_finished = False
        self._weight_of = np.ones(self.num_samples, dtype=np.float32)
        self._pending: list[tuple[Any, ...]] = []
        self._forwarded = 0
        self._backpropagated = 0
        self._epoch_start_counts = (0, 0)
        # Seconds spent planning epochs and updating the table/policy: the selection overhead.
        self._overhead = 0.0
        self._planning_seconds = 0.0

    # -- progress -----------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        return self._step

    def progress(self) -> float:
        """Training progress in [0, 1] (by steps with total_steps=, by epochs otherwise)."""
        if self.total_steps is not None:
            return min(self._step / self.total_steps, 1.0)
        length = len(self._plan.indices) if self._plan is not None else 0
        within = self._position / length if length else 0.0
        return min((self.epoch + within) / self.epochs, 1.0)

    @property
    def position(self) -> int:
        """Samples of this rank's current plan consumed by training (loss/observe calls)."""
        return self._position

    @property
    def remaining(self) -> int:
        """Samples of this rank's current plan not yet consumed by training (plans the epoch,
        or moves past a consumed one, like ``len(sampler)``)."""
        return max(self._current_plan_length() - self._position, 0)

    @property
    def epoch_consumed(self) -> bool:
        """The current epoch has been iterated to its end or fully trained on."""
        return self._epoch_consumed()

    def epoch_progress(self) -> float:
        """Epochs done plus the consumed share of the current one."""
        length = len(self._plan.indices) if self._plan is not None else 0
        return self.epoch + (min(self._position / length, 1.0) if length else 0.0)

    def count_steps_explicitly(self) -> None:
        """From now on only :meth:`step` advances the step count (gradient accumulation)."""
        self._explicit_steps = True

    def step(self) -> None:
        """Count one optimizer step explicitly (for gradient accumulation). Once called, the
        Selector stops counting a step per batch."""
        self._explicit_steps = True
        self._step += 1

    # -- planning -----------------------------------------------------------------------------
    def _ensure_plan(self) -> Plan:
        if self._plan is None:
            self._flush()
            started = time.perf_counter()
            plan = self.policy.plan_epoch(self.epoch, self.progress())
            _check_plan(plan, self.num_samples)
            local = _shard(plan, self.num_replicas, self.rank)
            self._set_plan(local)
            elapsed = time.perf_counter() - started
            self._planning_seconds += elapsed
            self._overhead += elapsed
        return self._plan

    def _set_plan(self, plan: Plan) -> None:
        self._plan = plan
        self._weight_of.fill(1.0)
        self._weight_of[plan.indices] = plan.weights
        self._yield_finished = False

    def _epoch_consumed(self) -> bool:
        if self._plan is None:
            return False
        return self._yield_finished or (self._position >= len(self._plan.indices) and self._position > 0)

    def _advance(self) -> None:
        self._record_history()
        self.epoch += 1
        self._plan = None
        self._position = 0

    def _current_plan_length(self) -> int:
        if self._plan is not None and self._position >= len(self._plan.indices) and self._position > 0:
            self._advance()
        return len(self._ensure_plan().indices)

    def _iterate(self) -> Iterator[int]:
        if self._epoch_consumed():
            self._advance()
        plan = self._ensure_plan()
        epoch = self.epoch
        for i in range(self._position, len(plan.indices)):
            if self.epoch != epoch or self._plan is not plan:
                return  # set_epoch or a resume replaced the plan under this iterator
            yield int(plan.indices[i])
        self._yield_finished = True

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch`` (DistributedSampler's convention); a no-op for the current one."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch == self.epoch:
            return
        self._flush()
        if self._plan is not None:
            self._record_history()
        self.epoch = int(epoch)
        self._plan = None
        self._position = 0

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's planned indices and importance weights of the current epoch (copies)."""
        plan = self._ensure_plan()
        return plan.indices.copy(), plan.weights.copy()

    # -- observing ----------------------------------------------------------------------------
    def weights(self, idx: Any) -> torch.Tensor:
        """Importance weights (float32) of the samples ``idx`` in the current plan."""
        indices = self._indices(idx)
        self._ensure_plan()
        out = torch.from_numpy(self._weight_of[indices].copy())
        if isinstance(idx, torch.Tensor) and idx.device.type != "cpu":
            out = out.to(idx.device, non_blocking=True)
        return out

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
    ) -> torch.Tensor:
        """Fused loss + statistics, table update and importance weights in one call.

        Args:
            logits: ``[B, V]`` or ``[B, T, V]``.
            labels: ``[B]`` or ``[B, T]``.
            idx: ``[B]`` dataset indices (from :class:`WithIndex`).
            weights: per-sample loss weights; default: the plan's importance weights.
            observe: update the table from these statistics (False after ``select``, which
                already observed the forward pass).

        Returns:
            The weighted loss (``reduction`` as in :func:`~geko_core.cross_entropy_with_stats`).
        """
        from .loss import cross_entropy_with_stats

        indices = self._indices(idx, expected=logits.shape[0] if logits.dim() >= 1 else None)
        planned = self._plan is not None
        self._ensure_plan()
        if weights is None:
            weights = torch.from_numpy(self._weight_of[indices].copy()).to(logits.device, non_blocking=True)
        try:
            loss, stats = cross_entropy_with_stats(
                logits, labels, ignore_index=ignore_index, shift=shift, sample_weight=weights,
                reduction=reduction, config=self.config, backend=self.backend,
            )
        except BaseException:
            if not planned:
                # Bad input changes nothing: the epoch is planned later, from the table as it
                # will be then, exactly as if this call had not happened.
                self._plan = None
                self._weight_of.fill(1.0)
            raise
        self._backpropagated += len(indices)
        if observe:
            self._observe(indices, stats, forwarded=len(indices))
        else:
            self._forwarded += len(indices)
        return loss

    def observe(self, idx: Any, logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = False) -> SampleStats:
        """Score a batch the caller trained with its own loss; counts it as forwarded and
        back-propagated. Returns the statistics."""
        from .stats import sample_stats

        indices = self._indices(idx, expected=logits.shape[0] if logits.dim() >= 1 else None)
        stats = sample_stats(logits.detach(), labels, ignore_index=ignore_index, shift=shift, config=self.config, backend=self.backend)
        self._backpropagated += len(indices)
        self._observe(indices, stats, forwarded=len(indices))
        return stats

    def observe_stats(self, idx: Any, stats: SampleStats, *, backpropagated: bool = True) -> None:
        """Feed statistics computed elsewhere (e.g. by ``cross_entropy_with_stats``)."""
        if not isinstance(stats, SampleStats):
            raise TypeError(f"stats must be a geko_core.SampleStats, got {type(stats).__name__}")
        indices = self._indices(idx, expected=stats.loss.shape[0])
        if backpropagated:
            self._backpropagated += len(indices)
        self._observe(indices, stats, forwarded=len(indices))

    def select(self, idx: Any, logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta-batch selection (policies "es", "eswp"): score a forwarded meta-batch
        (no grad needed) and choose which of its samples to back-propagate.

        Returns:
            ``(positions, weights)``: int64 positions into the meta-batch and float32 loss
            weights, on the logits' device. Back-propagate ``model(x[positions])`` with
            ``sel.loss(..., idx[positions], weights=weights, observe=False)``.
        """
        from .stats import sample_stats

        if not self.policy.meta_batch:
            raise TypeError(f"policy {self.policy.name!r} does not select inside a meta-batch; use Selector.loss")
        indices = self._indices(idx, expected=logits.shape[0] if logits.dim() >= 1 else None)
        # Statistics first: bad input raises before the epoch is planned (nothing changes).
        stats = sample_stats(logits.detach(), labels, ignore_index=ignore_index, shift=shift, config=self.config, backend=self.backend)
        self._ensure_plan()
        self._observe(indices, stats, forwarded=len(indices))
        self._flush()  # selection needs this batch's scores now
        positions, weights = self.policy.select(indices, self._step)
        device = logits.device
        return torch.from_numpy(positions).to(device), torch.from_numpy(weights).to(device)

    def _indices(self, idx: Any, expected: int | None = None) -> np.ndarray:
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

    def _observe(self, indices: np.ndarray, stats: SampleStats, *, forwarded: int) -> None:
        values = (stats.loss, stats.confidence, stats.correct, stats.el2n)
        device = stats.loss.device
        local_count = len(indices)
        if _distributed() and self.num_replicas > 1:
            idx_t = torch.from_numpy(indices).to(device)
            idx_t, *values = _all_gather_padded([idx_t, *values])
            indices = idx_t.cpu().numpy()
        if device.type == "cpu":
            self._pending.append((indices, *[v.detach() for v in values], None))
        else:
            # No host synchronisation: copy into pinned buffers and apply one step late.
            host = [torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for v in values]
            for h, v in zip(host, values):
                h.copy_(v.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((indices, *host, event))
        self._forwarded += forwarded
        self._position += local_count
        if not self._explicit_steps:
            self._step += 1
        # Apply everything but the newest entry when it is still in flight on a GPU.
        keep_last = device.type != "cpu"
        self._flush(keep_last=keep_last)

    def _flush(self, keep_last: bool = False) -> None:
        while len(self._pending) > (1 if keep_last else 0):
            indices, loss, confidence, correct, el2n, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            batch = StatsBatch(
                indices=np.ascontiguousarray(indices, dtype=np.int64),
                loss=np.ascontiguousarray(loss.numpy(), dtype=np.float32),
                confidence=np.ascontiguousarray(confidence.numpy(), dtype=np.float32),
                correct=np.ascontiguousarray(correct.numpy(), dtype=np.float32),
                el2n=np.ascontiguousarray(el2n.numpy(), dtype=np.float32),
            )
            started = time.perf_counter()
            self.policy.observe(batch, self._step)
            self._overhead += time.perf_counter() - started

    # -- reporting ----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Bucket counts, samples forwarded / back-propagated, saved fraction, phase."""
        self._flush()
        counts = self.table.bucket_counts()
        seen_epochs = self.epoch + (self._position / len(self._plan.indices) if self._plan is not None and len(self._plan.indices) else 0.0)
        full = seen_epochs * self.num_samples / self.num_replicas
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self._step,
            "progress": self.progress(),
            "policy": self.policy.name,
            "buckets": {name: int(counts[name]) for name in BUCKET_NAMES},
            "forwarded": self._forwarded,
            "backpropagated": self._backpropagated,
            "saved_fraction": (1.0 - self._backpropagated / full) if full > 0 else 0.0,
            "epoch_length": len(self._plan.indices) if self._plan is not None else None,
            "nonfinite_skipped": int(self.table.nonfinite_skipped),
            "overhead_seconds": self._overhead,
            "planning_seconds": self._planning_seconds,
        }
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
        self._epoch_start_counts = (self._forwarded, self._backpropagated)
        self.history.append(entry)

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: table, policy state, epoch, position inside
        the epoch, step and the current plan (plain arrays and numbers)."""
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
            "epoch": self.epoch,
            "position": self._position,
            "step": self._step,
            "explicit_steps": self._explicit_steps,
            # "consumed by training": a DataLoader prefetches, so the sampler may have run to
            # the end of an epoch whose last batches were never trained on.
            "yield_finished": self._plan is not None and self._position >= len(self._plan.indices),
            "plan_indices": None if self._plan is None else self._plan.indices.copy(),
            "plan_weights": None if self._plan is None else self._plan.weights.copy(),
            "counters": {"forwarded": self._forwarded, "backpropagated": self._backpropagated, "epoch_start": list(self._epoch_start_counts)},
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
            epoch, step, position = (_nonnegative_int(state[k], k) for k in ("epoch", "step", "position"))
            explicit_steps, yield_finished = bool(state["explicit_steps"]), bool(state["yield_finished"])
            counters = state["counters"]
            forwarded = _nonnegative_int(counters["forwarded"], "counters.forwarded")
            backpropagated = _nonnegative_int(counters["backpropagated"], "counters.backpropagated")
            epoch_start = tuple(_nonnegative_int(c, "counters.epoch_start") for c in counters["epoch_start"])
            if len(epoch_start) != 2:
                raise ValueError(f"counters.epoch_start must hold 2 counts, got {len(epoch_start)}")
            if not isinstance(state["history"], list):
                raise ValueError(f"Selector state history must be a list, got {type(state['history']).__name__}")
            history = [dict(h) for h in state["history"]]
            table_state, policy_state = state["table"], state["policy_state"]
        except KeyError as exc:
            raise ValueError(f"Selector state is missing {exc}") from None
        except TypeError as exc:
            raise ValueError(f"Selector state is malformed: {exc}") from None
        indices, weights = state.get("plan_indices"), state.get("plan_weights")
        plan = None
        if indices is not None:
            try:
                indices = np.asarray(indices, dtype=np.int64)
                weights = np.asarray(weights, dtype=np.float32)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ValueError(f"Selector state has a malformed plan: {exc}") from None
            _check_plan(Plan(indices, weights), self.num_samples)
            if not 0 <= position <= len(indices):
                raise ValueError(f"Selector state position {position} is outside its plan of {len(indices)}")
            plan = Plan(indices.copy(), weights.copy())
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
        self.epoch = epoch
        self._step = step
        self._explicit_steps = explicit_steps
        self._plan = None
        if plan is not None:
            self._set_plan(plan)
        self._yield_finished = yield_finished
        self._position = position
        self._forwarded = forwarded
        self._backpropagated = backpropagated
        self._epoch_start_counts = epoch_start
        self.history = history


def _check_plan(plan: Plan, num_samples: int) -> None:
    if not isinstance(plan, Plan):
        raise TypeError(f"a policy's plan_epoch must return geko_core.policies.Plan, got {type(plan).__name__}")
    if plan.indices.ndim != 1 or plan.weights.shape != plan.indices.shape:
        raise ValueError(f"plan indices and weights must be 1-D of equal length, got {plan.indices.shape} and {plan.weights.shape}")
    if len(plan.indices) and (plan.indices.min() < 0 or plan.indices.max() >= num_samples):
        raise IndexError(f"plan holds an index outside [0, {num_samples})")
    if not np.isfinite(plan.weights).all() or (plan.weights < 0).any():
        raise ValueError("plan weights must be finite and non-negative")


def _nonnegative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"Selector state {name} must be a non-negative int, got {value!r}")
    return int(value)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather_padded(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather 1-D tensors whose length may differ per rank; rank order is kept."""
    dist = torch.distributed
    world = dist.get_world_size()
    device = tensors[0].device
    length = torch.tensor([tensors[0].shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = torch.cat(lengths).tolist()  # one host sync per step, only in distributed runs
    longest = max(sizes)
    out = []
    for tensor in tensors:
        padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out.append(torch.cat([g[:n] for g, n in zip(gathered, sizes)]))
    return out
