"""Epoch planning: which samples to train on next, each with an importance weight.

Everything here runs in the compiled core (csrc/planner.cpp) in O(N), and every plan is a
pure function of its inputs and ``(seed, epoch)``: the random numbers are counter-based, so
results do not depend on the number of threads, and every rank of a distributed job
computes the same global plan, then keeps its shard.

Importance weights. A sample drawn with expected multiplicity ``c`` carries ``1 / c`` on each
copy, so for any per-sample value ``v``, ``E[sum over the plan of weight * v[index]] =
sum over the dataset of v``: the weighted loss has the full-data gradient in expectation
(the rule InfoBatch uses for its rescaling). Two documented exceptions:

* FREEZE revisits go to the *stalest* frozen samples (smallest ``last_visit_step``), which
  is a deterministic rotation rather than a random draw; they weigh ``n_freeze / n_revisited``
  so the frozen group keeps its total weight. Without ``last_visit_step`` the revisited
  subset is uniformly random and the weights are exactly unbiased.
* Padding entries (added, as ``DistributedSampler`` does, so every rank has the same
  length) weigh 0.

Sharding follows ``torch.utils.data.DistributedSampler``: the global plan (shuffled when
``shuffle=True``) is padded by wrapping around to a multiple of ``num_replicas`` (or its
tail dropped with ``drop_last=True``), and rank ``r`` takes positions ``r, r + R, r + 2R, ...``;
the core's ``shard_plan`` is the one implementation of that rule (``geko_core.epoch`` uses it
for policies' plans too). Plans come back as :class:`~geko_core.epoch.EpochPlan`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ._backend import load_compiled_core
from ._checks import check_array_1d, check_bool, check_float_array, check_int, check_real, check_seed, check_shard
from .epoch import EpochPlan

_C = load_compiled_core()

__all__ = [
    "EpochPlan",
    "EpochPlanner",
    "gainrl_update_mu",
    "gaussian_window_plan",
    "infobatch_plan",
    "random_permutation",
    "weighted_sample",
]

_NUM_BUCKETS = _C.NUM_BUCKETS
_METHODS = ("systematic", "exponential")


# -- argument checks: the shared ones (geko_core._checks); the C++ core checks again --------------

_int = check_int
_real = check_real
_bool = check_bool
_seed = check_seed
_shard_args = check_shard
_array_1d = check_array_1d


def _float_array(values: Any, name: str) -> np.ndarray:
    return check_float_array(values, name, allow_int=True)


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _buckets_int8(buckets: Any) -> np.ndarray:
    array = _array_1d(buckets, "buckets")
    if array.dtype == np.int8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"buckets must hold integer bucket codes, got dtype {array.dtype}")
    bad = (array < 0) | (array >= _NUM_BUCKETS)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(
            f"buckets[{i}] = {array[i]} is not a bucket code (0..4: FREEZE, LIGHT, FOCUS, HARD, UNSEEN)"
        )
    return array.astype(np.int8)


def _last_visit(last_visit_step: Any, n: int) -> np.ndarray | None:
    if last_visit_step is None:
        return None
    array = _array_1d(last_visit_step, "last_visit_step")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"last_visit_step must be an integer array, got dtype {array.dtype}")
    if array.shape[0] != n:
        raise ValueError(f"last_visit_step has {array.shape[0]} entries, buckets has {n}")
    if array.dtype in (np.int32, np.int64):
        return np.ascontiguousarray(array)
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError("last_visit_step holds values above 2**63 - 1")
    return array.astype(np.int64)


class EpochPlanner:
    """Plans epochs from per-sample buckets and per-bucket rates.

    Args:
        num_samples: dataset size N.
        seed: 0 <= seed < 2**64; with the epoch it fixes every random choice.
        num_replicas: number of distributed ranks (>= 1).
        rank: this rank, in ``[0, num_replicas)``.
        shuffle: shuffle the epoch (a uniformly random order); else index order.
        drop_last: drop the tail instead of padding to a multiple of ``num_replicas``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = _int(num_samples, "num_samples", low=0)
        self.seed = _seed(seed)
        self.num_replicas, self.rank = _shard_args(num_replicas, rank)
        self.shuffle = _bool(shuffle, "shuffle")
        self.drop_last = _bool(drop_last, "drop_last")
        self._impl = _C.EpochPlanner(
            self.num_samples, self.seed, self.num_replicas, self.rank, self.shuffle, self.drop_last
        )

    def plan(
        self,
        buckets: Any,
        rates: Sequence[float],
        *,
        epoch: int,
        last_visit_step: Any = None,
        freeze_revisit: float | None = None,
        chunk_size: int | None = None,
    ) -> EpochPlan:
        """The next epoch (this rank's shard).

        A sample of bucket ``b`` (not FREEZE) with rate ``c = rates[b]`` appears
        ``floor(c)`` times plus once more with probability ``frac(c)``, each copy with weight
        ``1 / c``. Of the ``n_freeze`` FREEZE samples, ``ceil(f * n_freeze)`` are revisited,
        the stalest first (ties at random), each with weight ``n_freeze / n_revisited``.

        Args:
            buckets: int ``[N]`` bucket codes (FREEZE 0, LIGHT 1, FOCUS 2, HARD 3, UNSEEN 4),
                numpy or CPU torch; int8 is used without a copy.
            rates: 5 floats in bucket-code order, e.g. ``MountainCurriculum.rates(p)``; each in
                [0, 5]; ``rates[FREEZE]`` is the revisit fraction ``f`` in [0, 1].
            epoch: >= 0; with the seed it fixes the plan.
            last_visit_step: optional int32/int64 ``[N]``; smaller = staler. Without it the
                revisited frozen samples are a uniformly random subset.
            freeze_revisit: overrides ``rates[FREEZE]`` when given.
            chunk_size: for step-based training: keep only the first ``chunk_size`` entries
                (globally, before sharding) of the shuffled epoch, with weights multiplied by
                ``epoch_size / chunk_size``. The head of a uniformly shuffled unbiased plan is a
                uniformly random part of it, so the rescaled weights stay unbiased. Pass a new
                ``epoch`` (a chunk counter) and fresh buckets for each chunk. Needs ``shuffle``.

        Returns:
            EpochPlan of this rank.

        Raises:
            ValueError: wrong length, a bad bucket code (naming its position), a rate out of
                range, a negative epoch.
            TypeError: wrong dtypes or argument types.
        """
        epoch = _int(epoch, "epoch", low=0)
        codes = _buckets_int8(buckets)
        if codes.shape[0] != self.num_samples:
            raise ValueError(f"buckets has {codes.shape[0]} entries, the planner was built for num_samples={self.num_samples}")
        rate_list = [_real(r, f"rates[{i}]") for i, r in enumerate(rates)]
        if len(rate_list) != _NUM_BUCKETS:
            raise ValueError(f"rates must have {_NUM_BUCKETS} entries (FREEZE, LIGHT, FOCUS, HARD, UNSEEN), got {len(rate_list)}")
        if freeze_revisit is not None:
            rate_list[0] = _real(freeze_revisit, "freeze_revisit")
        visits = _last_visit(last_visit_step, codes.shape[0])
        chunk = -1
        if chunk_size is not None:
            chunk = _int(chunk_size, "chunk_size", low=0)
            if not self.shuffle:
                raise ValueError("chunk_size needs shuffle=True: a chunk is the head of the shuffled epoch")
        result = self._impl.plan(codes, rate_list, epoch, visits, chunk)
        return EpochPlan._from_core(result, epoch=epoch, rank=self.rank, num_replicas=self.num_replicas, kind="buckets")

    def __repr__(self) -> str:
        return (
            f"EpochPlanner(num_samples={self.num_samples}, seed={self.seed}, num_replicas={self.num_replicas}, "
            f"rank={self.rank}, shuffle={self.shuffle}, drop_last={self.drop_last})"
        )


# -- sampling without replacement and the other policies ----------------------------------------


def weighted_sample(
    weights: Any, k: int, *, seed: int = 0, epoch: int = 0, method: str = "systematic"
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct indices drawn with probability increasing in ``weights``, in O(N).

    Methods:
        ``"systematic"`` (default): randomized systematic PPS. Index ``i`` is included with
        probability exactly ``pi_i = min(1, c * w_i)``, ``c`` chosen so that ``sum pi = k``
        (weights whose share exceeds 1 are capped at 1 and the rest rescaled, iterated).
        ``1 / pi`` are exact importance weights.
        ``"exponential"``: Efraimidis-Spirakis, the ``k`` smallest keys ``-log(u_i) / w_i``
        (the draw of ``torch.multinomial(..., replacement=False)``: sequential draws
        proportional to the remaining weights). Its marginal inclusion probabilities have no
        closed form and are *not* proportional to ``w``; the returned probability is the
        rank-conditioned one, ``1 - exp(-w_i * tau)`` with ``tau`` the ``(k+1)``-th smallest
        key, for which Horvitz-Thompson sums ``sum v_i / pi_i`` are still unbiased.

    Args:
        weights: float ``[N]``, finite and >= 0; zero weights are never drawn.
        k: number of indices, ``0 <= k <=`` number of positive weights.
        seed, epoch: fix the draw.
        method: ``"systematic"`` or ``"exponential"``.

    Returns:
        (indices int64 ``[k]``, inclusion_prob float64 ``[k]``); the order carries no meaning.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    array = _float_array(weights, "weights")
    k = _int(k, "k", low=0)
    return _C.weighted_sample(array, k, _seed(seed), _int(epoch, "epoch", low=0), method)


def random_permutation(n: int, *, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` (int64), O(n), fixed by (seed, epoch)."""
    return _C.random_permutation(_int(n, "n", low=0), _seed(seed), _int(epoch, "epoch", low=0))


def infobatch_plan(
    scores: Any,
    *,
    epoch: int,
    num_epochs: int,
    prune_ratio: float = 0.5,
    delta: float = 0.875,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> EpochPlan:
    """InfoBatch's epoch (docs/design.md §4): prune / rescale / anneal.

    Samples whose score (InfoBatch keeps the last loss, initialised to 3.0) is below the mean
    score are "well learned"; while ``epoch < delta * num_epochs`` each of them is kept with
    probability ``1 - prune_ratio`` and weighted ``1 / (1 - prune_ratio)``. Every other
    sample is kept with weight 1, and from epoch ``delta * num_epochs`` on the whole
    dataset is used with weight 1.

    Args:
        scores: float ``[N]``, finite.
        epoch: >= 0. num_epochs: >= 1.
        prune_ratio: r in [0, 1). delta: in [0, 1].
        seed, num_replicas, rank, shuffle, drop_last: as ``EpochPlanner``.
    """
    array = _float_array(scores, "scores")
    replicas, rank = _shard_args(num_replicas, rank)
    result = _C.infobatch_plan(
        array,
        _int(epoch, "epoch", low=0),
        _int(num_epochs, "num_epochs", low=1),
        _real(prune_ratio, "prune_ratio"),
        _real(delta, "delta"),
        _seed(seed),
        replicas,
        rank,
        _bool(shuffle, "shuffle"),
        _bool(drop_last, "drop_last"),
    )
    return EpochPlan._from_core(result, epoch=epoch, rank=rank, num_replicas=replicas, kind="infobatch")


def gaussian_window_plan(
    order: Any,
    *,
    mu: float,
    sigma: float = 1000.0,
    num_samples_to_draw: int,
    seed: int = 0,
    epoch: int = 0,
    method: str = "systematic",
    num_replicas: int = 1,
    rank: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
) -> EpochPlan:
    """GAIN-RL's draw (docs/design.md §4): a Gaussian window over a sorted order.

    Position ``j`` of ``order`` gets weight ``exp(-(j - mu)^2 / (2 sigma^2))``;
    ``num_samples_to_draw`` distinct positions are drawn without replacement with
    ``weighted_sample(method=...)`` and the plan holds ``order[j]`` with importance weight
    ``1 / pi_j``.

    Args:
        order: int ``[M]`` sample indices sorted by the policy's score (e.g. angle
            concentration), non-negative.
        mu: window centre, in positions (see ``gainrl_update_mu``). sigma: > 0, in positions.
        num_samples_to_draw: ``0 <= k <= M``, and at most the number of positions whose
            window weight does not underflow to 0.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    array = _array_1d(order, "order")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"order must be an integer array, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    replicas, rank = _shard_args(num_replicas, rank)
    epoch = _int(epoch, "epoch", low=0)
    result = _C.gaussian_window_plan(
        array,
        _real(mu, "mu"),
        _real(sigma, "sigma"),
        _int(num_samples_to_draw, "num_samples_to_draw", low=0),
        epoch,
        method,
        _seed(seed),
        replicas,
        rank,
        _bool(shuffle, "shuffle"),
        _bool(drop_last, "drop_last"),
    )
    return EpochPlan._from_core(result, epoch=epoch, rank=rank, num_replicas=replicas, kind="gaussian_window")


def gainrl_update_mu(
    mu: float,
    accuracy: float,
    angle: float,
    *,
    num_positions: int,
    n: float = 500.0,
    alpha: float = 2.0,
    beta: float = 0.5,
    acc_scale: float = 1.0,
    adj_min: float | None = None,
    adj_max: float | None = None,
) -> float:
    """GAIN-RL's window move (docs/design.md §4).

    ``dmu = n * tanh(alpha * (accuracy / acc_scale - beta)) + n * tanh(alpha * angle)``,
    clamped to ``[adj_min, adj_max]`` (None: no bound beyond the natural ``[-2n, 2n]``);
    returns ``mu + dmu`` clamped to the valid positions ``[0, num_positions - 1]``.
    """
    low = -math.inf if adj_min is None else _real(adj_min, "adj_min")
    high = math.inf if adj_max is None else _real(adj_max, "adj_max")
    return _C.gainrl_update_mu(
        _real(mu, "mu"),
        _real(accuracy, "accuracy"),
        _real(angle, "angle"),
        _real(n, "n"),
        _real(alpha, "alpha"),
        _real(beta, "beta"),
        _real(acc_scale, "acc_scale"),
        low,
        high,
        _int(num_positions, "num_positions", low=1),
    )
