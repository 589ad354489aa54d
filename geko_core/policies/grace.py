"""GRACE-style dynamic coreset: el2n importance, a kNN graph over embeddings, coverage strata.

The GRACE paper's formulas are not public here; these are the rules this policy implements
(also in ``docs/policies.md``). A *round* is an epoch.

* **Importance.** ``s_i`` = the latest finite el2n (``||softmax - onehot||_2``, from the
  Selector's statistics) observed for sample ``i``, and ``r_i`` the round it was observed in.
  Sample ``i`` is *fresh* at round ``t`` when ``r_i >= t - stale_after``, otherwise *stale*
  (never observed counts as stale).
* **Embeddings and graph.** The user supplies embeddings ``e_i`` (e.g. mean-pooled hidden
  states) with :meth:`GracePolicy.set_embeddings`; :meth:`GracePolicy.stale_embeddings` says
  which ``ceil(refresh_fraction * N)`` samples to refresh next (never embedded first, then the
  oldest, ties by index). The graph holds, for every embedded sample, its ``k`` nearest other
  embedded samples by cosine similarity, computed exactly (:func:`knn_graph`: blocks of
  queries times blocks of keys, a running top-k; O(N^2 d) time for a full build, O(N k) memory
  for the graph, O(block^2) scratch). The first round builds every row; later rounds
  recompute only the rows of samples whose embedding changed since their row was built,
  at most ``ceil(refresh_fraction * N)`` of them (oldest rows first): O(refresh_fraction N^2 d).
  Rows not recomputed keep their neighbour lists even if a neighbour's embedding moved.
* **Propagation** (one step, O(N k)). For stale ``i`` with fresh graph neighbours ``F_i``:
  ``m_i = mean_{j in F_i} s_j`` and the planning score is
  ``h_i = damping * m_i + (1 - damping) * s_i`` if ``i`` was ever observed, else ``m_i``.
  A stale ``i`` without fresh neighbours keeps ``h_i = s_i`` if observed, else the mean ``s``
  of the fresh samples (of all observed ones if none is fresh; 1 if none is observed).
  A fresh ``i`` has ``h_i = s_i``.
* **Coverage strata.** Spherical k-means on the normalised embeddings with
  ``C = num_clusters`` or ``ceil(sqrt(K))`` centroids (``K`` the coreset size), warm-started
  from the previous round's centroids (first round: k-means++ seeding with the distance
  ``1 - cos``, O(N C d); an empty cluster is re-seeded with a random sample), ``kmeans_iters`` Lloyd steps per round:
  O(N C d kmeans_iters). Samples without an embedding form one extra stratum.
* **Coreset** (K = ``round(budget * N)``). Stratum ``c`` of size ``n_c`` gets the quota
  ``q_c = max(1, floor(K n_c / N))`` (capped at ``n_c``), then the remainder is handed out one
  at a time by largest fractional part ``K n_c / N - floor(K n_c / N)`` (ties: lower stratum),
  or, when the quotas exceed ``K``, taken back one at a time from the largest quota (above 1
  while one exists; ties: smaller ``K n_c / N``, then higher stratum), so every stratum is
  covered whenever ``K >= C``. Inside a stratum
  the ``round((1 - diversity) q_c)`` samples of highest ``h`` (ties: lower index) are taken,
  and the other ``q_c - round((1 - diversity) q_c)`` are drawn uniformly without replacement
  from the rest of the stratum. O(N log N) per round.
* **Warm-up.** The first ``warmup_epochs`` rounds train on all samples (every sample gets an
  el2n before any selection).
* **Weights.** 1 by default (a coreset trains on what it chose), or ``weighting="stratum"``:
  ``n_c / q_c`` for every sample of stratum ``c`` (each stratum's summed gradient is
  estimated at its full size).

Without embeddings there is one stratum: the coreset is importance (top ``h``) plus the
``diversity`` share drawn uniformly, and stale samples keep their last el2n.

Scale: the exact graph is meant for up to about 1 M samples (a full build at N = 1 M,
d = 256 is ~2.6e14 multiply-adds: minutes on a GPU, hours on a CPU; later rounds cost
``refresh_fraction`` of that). Beyond that, use an approximate index (IVF/HNSW, e.g. FAISS) to
build the graph and pass it in through ``set_graph``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch

from .base import Plan, Policy, PolicyContext, StatsBatch

__all__ = ["GracePolicy", "knn_graph"]


def knn_graph(
    embeddings: torch.Tensor,
    k: int,
    *,
    rows: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    block_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by cosine similarity, computed in blocks.

    Args:
        embeddings: float ``[N, d]`` on any device (computed in float32 there).
        k: neighbours per row, ``>= 1``.
        rows: int64 ``[R]`` query rows (default: all ``N``).
        valid: bool ``[N]``: which samples may be neighbours (default: all).
        block_size: rows and columns per matmul block (scratch memory ``block_size^2``).

    Returns:
        ``(neighbours int64 [R, k], similarity float32 [R, k])`` on the embeddings' device,
        most similar first; a row never lists itself; slots beyond the number of valid
        candidates hold index -1 and similarity -inf. Ties come in no particular order.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.dtype.is_floating_point:
        raise ValueError(f"embeddings must be a float [N, d] tensor, got {getattr(embeddings, 'shape', type(embeddings).__name__)}")
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    n = embeddings.shape[0]
    device = embeddings.device
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    rows = torch.arange(n, device=device) if rows is None else rows.to(device=device, dtype=torch.int64)
    key_ok = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(device)
    out_idx = torch.full((len(rows), k), -1, dtype=torch.int64, device=device)
    out_sim = torch.full((len(rows), k), -math.inf, dtype=torch.float32, device=device)
    for q0 in range(0, len(rows), block_size):
        q_rows = rows[q0 : q0 + block_size]
        q = x[q_rows]
        best_sim = torch.full((len(q_rows), k), -math.inf, dtype=torch.float32, device=device)
        best_idx = torch.full((len(q_rows), k), -1, dtype=torch.int64, device=device)
        for k0 in range(0, n, block_size):
            keys = torch.arange(k0, min(k0 + block_size, n), device=device)
            sim = q @ x[keys].T
            sim = sim.masked_fill(~key_ok[keys].unsqueeze(0), -math.inf)
            sim = sim.masked_fill(q_rows.unsqueeze(1) == keys.unsqueeze(0), -math.inf)
            merged_sim = torch.cat([best_sim, sim], dim=1)
            merged_idx = torch.cat([best_idx, keys.unsqueeze(0).expand(len(q_rows), -1)], dim=1)
            best_sim, pos = torch.topk(merged_sim, k, dim=1)
            best_idx = torch.gather(merged_idx, 1, pos)
        best_idx = best_idx.masked_fill(torch.isinf(best_sim), -1)
        out_idx[q0 : q0 + len(q_rows)] = best_idx
        out_sim[q0 : q0 + len(q_rows)] = best_sim
    return out_idx, out_sim


def _fraction(value: object, name: str, *, low_open: bool, high_closed: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = (v > 0.0 if low_open else v >= 0.0) and (v <= 1.0 if high_closed else v < 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1{']' if high_closed else ')'}, got {value!r}")
    return v


def _int_at_least(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class GracePolicy(Policy):
    """Dynamic coreset balancing el2n importance and embedding coverage (module docstring).

    Args:
        budget: coreset size as a fraction of N, in (0, 1].
        k: neighbours per sample in the kNN graph.
        refresh_fraction: share of embeddings requested and graph rows recomputed per round.
        diversity: share of each stratum's quota drawn uniformly instead of by importance, [0, 1].
        stale_after: a sample's el2n is fresh for this many rounds after it was observed.
        damping: weight of the neighbours' mean in a stale, observed sample's score, [0, 1].
        num_clusters: coverage strata (None: ``ceil(sqrt(K))``).
        kmeans_iters: Lloyd steps per round (>= 1).
        warmup_epochs: leading rounds on the full data.
        block_size: block of the exact kNN and k-means matmuls.
        weighting: ``"none"`` (weight 1) or ``"stratum"`` (``n_c / q_c``).
    """

    name = "grace"

    def __init__(
        self,
        budget: float = 0.5,
        *,
        k: int = 10,
        refresh_fraction: float = 0.2,
        diversity: float = 0.3,
        stale_after: int = 1,
        damping: float = 0.5,
        num_clusters: int | None = None,
        kmeans_iters: int = 3,
        warmup_epochs: int = 1,
        block_size: int = 4096,
        weighting: str = "none",
    ) -> None:
        super().__init__()
        self.budget = _fraction(budget, "budget", low_open=True)
        self.k = _int_at_least(k, "k", 1)
        self.refresh_fraction = _fraction(refresh_fraction, "refresh_fraction", low_open=True)
        self.diversity = _fraction(diversity, "diversity", low_open=False)
        self.stale_after = _int_at_least(stale_after, "stale_after", 0)
        self.damping = _fraction(damping, "damping", low_open=False)
        self.num_clusters = None if num_clusters is None else _int_at_least(num_clusters, "num_clusters", 1)
        self.kmeans_iters = _int_at_least(kmeans_iters, "kmeans_iters", 1)
        self.warmup_epochs = _int_at_least(warmup_epochs, "warmup_epochs", 0)
        self.block_size = _int_at_least(block_size, "block_size", 1)
        if weighting not in ("none", "stratum"):
            raise ValueError(f"weighting must be 'none' or 'stratum', got {weighting!r}")
        self.weighting = weighting
        # Per-sample state (allocated in bind).
        self.observed: np.ndarray | None = None  # float32 [N], last finite el2n (NaN: never)
        self.seen_round: np.ndarray | None = None  # int64 [N], -1: never
        self.embeddings: torch.Tensor | None = None  # float32 [N, d] on the user's device
        self.embedded_round: np.ndarray | None = None  # int64 [N], -1: never embedded
        self.neighbours: np.ndarray | None = None  # int64 [N, k], -1: none
        self.row_round: np.ndarray | None = None  # int64 [N], round the row was built, -1: never
        self.row_dirty: np.ndarray | None = None  # bool [N]: embedding changed since the row was built
        self.centroids: torch.Tensor | None = None
        self.strata: np.ndarray | None = None  # int64 [N], stratum of the last plan
        self.scores: np.ndarray | None = None  # float32 [N], h of the last plan
        self._last: dict[str, Any] = {}

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        n = context.num_samples
        self.observed = np.full(n, np.nan, dtype=np.float32)
        self.seen_round = np.full(n, -1, dtype=np.int64)
        self.embedded_round = np.full(n, -1, dtype=np.int64)
        self.row_round = np.full(n, -1, dtype=np.int64)
        self.row_dirty = np.zeros(n, dtype=bool)

    # -- user input --------------------------------------------------------------------------
    def _check_indices(self, indices: Any) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"indices must be in [0, {self.num_samples}), got {int(idx.min())}..{int(idx.max())}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("indices must not repeat")
        return idx.astype(np.int64)

    def refresh_count(self) -> int:
        """Embeddings requested (and graph rows recomputed) per round."""
        return min(self.num_samples, math.ceil(self.refresh_fraction * self.num_samples))

    def stale_embeddings(self) -> np.ndarray:
        """int64 dataset indices whose embeddings to (re)compute now: every sample without one,
        or else the ``refresh_count()`` oldest (ties by index)."""
        self._bound()
        missing = np.flatnonzero(self.embedded_round < 0)
        if len(missing):
            return missing.astype(np.int64)
        order = np.lexsort((np.arange(self.num_samples), self.embedded_round))
        return order[: self.refresh_count()].astype(np.int64)

    def set_embeddings(self, indices: Any, embeddings: Any) -> None:
        """Store embeddings ``[M, d]`` (float tensor on any device, or numpy) of ``indices [M]``.

        The first call fixes ``d`` and the device; the graph rows of these samples are marked
        for recomputation.
        """
        self._bound()
        idx = self._check_indices(indices)
        if isinstance(embeddings, np.ndarray):
            embeddings = torch.from_numpy(embeddings)
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a tensor or numpy array, got {type(embeddings).__name__}")
        if not embeddings.dtype.is_floating_point:
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if embeddings.dim() != 2 or embeddings.shape[0] != len(idx) or embeddings.shape[1] < 1:
            raise ValueError(f"embeddings must have shape ({len(idx)}, d), got {tuple(embeddings.shape)}")
        emb = embeddings.detach().float()
        if not torch.isfinite(emb).all():
            raise ValueError("embeddings must be finite")
        if self.embeddings is None:
            self.embeddings = torch.zeros(self.num_samples, emb.shape[1], dtype=torch.float32, device=emb.device)
        elif emb.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embeddings have d={emb.shape[1]}, earlier ones d={self.embeddings.shape[1]}")
        self.embeddings[torch.from_numpy(idx).to(self.embeddings.device)] = emb.to(self.embeddings.device)
        self.embedded_round[idx] = self.epoch
        self.row_dirty[idx] = True

    def set_graph(self, neighbours: Any) -> None:
        """Use a neighbour list built elsewhere (e.g. an approximate index beyond ~1 M samples).

        Args:
            neighbours: int ``[N, k]``; entries in ``[-1, N)``, -1 = no neighbour, never the
                row itself. Rows are kept until their sample's embedding changes.
        """
        self._bound()
        if isinstance(neighbours, torch.Tensor):
            neighbours = neighbours.detach().cpu().numpy()
        nb = np.asarray(neighbours)
        if nb.dtype == np.bool_ or not np.issubdtype(nb.dtype, np.integer):
            raise TypeError(f"neighbours must be integers, got dtype {nb.dtype}")
        n = self.num_samples
        if nb.ndim != 2 or nb.shape[0] != n or nb.shape[1] < 1:
            raise ValueError(f"neighbours must have shape ({n}, k), got {nb.shape}")
        if nb.min() < -1 or nb.max() >= n:
            raise IndexError(f"neighbours must be in [-1, {n})")
        if (nb == np.arange(n)[:, None]).any():
            raise ValueError("a row of neighbours lists its own sample")
        self.neighbours = nb.astype(np.int64, copy=True)
        self.row_round[:] = self.epoch
        self.row_dirty[:] = False

    # -- learning ----------------------------------------------------------------------------
    def observe(self, batch: StatsBatch, table) -> None:
        if batch.el2n is None:
            raise ValueError("policy 'grace' needs el2n in the statistics (StatsBatch.el2n); the Selector provides it")
        super().observe(batch, table)
        finite = np.isfinite(batch.el2n)
        idx = batch.indices[finite]
        self.observed[idx] = batch.el2n[finite]
        self.seen_round[idx] = batch.epoch

    # -- the rules ---------------------------------------------------------------------------
    def refresh_graph(self) -> int:
        """Recompute the kNN rows due this round (all on the first build); returns how many."""
        if self.embeddings is None:
            return 0
        n = self.num_samples
        embedded = self.embedded_round >= 0
        if self.neighbours is None:
            k = min(self.k, max(int(embedded.sum()) - 1, 1))
            self.neighbours = np.full((n, k), -1, dtype=np.int64)
            self.row_round[:] = -1
            due = np.flatnonzero(embedded)
        else:
            k = self.neighbours.shape[1]
            dirty = np.flatnonzero(self.row_dirty & embedded)
            dirty = dirty[np.lexsort((dirty, self.row_round[dirty]))]
            due = dirty[: self.refresh_count()]
        if len(due) == 0:
            return 0
        device = self.embeddings.device
        valid = torch.from_numpy(embedded).to(device)
        idx, _ = knn_graph(self.embeddings, k, rows=torch.from_numpy(due).to(device), valid=valid, block_size=self.block_size)
        self.neighbours[due] = idx.cpu().numpy()
        self.row_round[due] = self.epoch
        self.row_dirty[due] = False
        return len(due)

    def propagated_scores(self, round_: int) -> tuple[np.ndarray, int]:
        """``h`` of every sample at ``round_`` (the propagation rule); and how many stale
        samples took a value from fresh neighbours."""
        observed = self.observed
        ever = self.seen_round >= 0
        fresh = ever & (self.seen_round >= round_ - self.stale_after)
        if fresh.any():
            prior = float(observed[fresh].mean())
        elif ever.any():
            prior = float(observed[ever].mean())
        else:
            prior = 1.0
        h = np.where(ever, observed, np.float32(prior)).astype(np.float32)
        stale = np.flatnonzero(~fresh)
        used = 0
        if self.neighbours is not None and len(stale):
            nb = self.neighbours[stale]
            ok = nb >= 0
            nb_safe = np.where(ok, nb, 0)
            ok &= fresh[nb_safe]
            count = ok.sum(axis=1)
            total = np.where(ok, observed[nb_safe], 0.0).sum(axis=1, dtype=np.float64)
            has = count > 0
            mean = total[has] / count[has]
            rows = stale[has]
            own = observed[rows].astype(np.float64)
            h[rows] = np.where(ever[rows], self.damping * mean + (1.0 - self.damping) * own, mean).astype(np.float32)
            used = int(has.sum())
        return h, used

    def _update_strata(self, context: PolicyContext, epoch: int, size: int) -> np.ndarray:
        n = self.num_samples
        strata = np.zeros(n, dtype=np.int64)
        if self.embeddings is None:
            return strata
        embedded = np.flatnonzero(self.embedded_round >= 0)
        device = self.embeddings.device
        x = torch.nn.functional.normalize(self.embeddings[torch.from_numpy(embedded).to(device)], dim=1)
        c = min(self.num_clusters or math.ceil(math.sqrt(size)), len(embedded))
        rng = context.rng(epoch, purpose=11)
        if self.centroids is None or self.centroids.shape[0] != c or self.centroids.shape[1] != x.shape[1]:
            self.centroids = self._seed_centroids(x, c, rng)
        centroids = self.centroids.to(device)
        assign = None
        for _ in range(self.kmeans_iters):
            assign = torch.cat([(x[i : i + self.block_size] @ centroids.T).argmax(1) for i in range(0, len(x), self.block_size)])
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=c)
            empty = (counts == 0).cpu().numpy()
            centroids = torch.nn.functional.normalize(sums, dim=1)
            if empty.any():
                reseed = torch.from_numpy(rng.choice(len(embedded), int(empty.sum()), replace=False)).to(device)
                centroids[torch.from_numpy(np.flatnonzero(empty)).to(device)] = x[reseed]
        assign = torch.cat([(x[i : i + self.block_size] @ centroids.T).argmax(1) for i in range(0, len(x), self.block_size)])
        self.centroids = centroids
        strata[:] = c  # the stratum of samples without an embedding
        strata[embedded] = assign.cpu().numpy()
        return strata

    @staticmethod
    def _seed_centroids(x: torch.Tensor, c: int, rng: np.random.Generator) -> torch.Tensor:
        """k-means++ seeding with the cosine distance ``1 - cos``: O(N C d)."""
        first = int(rng.integers(len(x)))
        chosen = [first]
        distance = (1.0 - x @ x[first]).clamp_min(0).double().cpu().numpy()
        for _ in range(1, c):
            total = distance.sum()
            if total <= 0:  # fewer distinct directions than centroids: any sample will do
                nxt = int(rng.integers(len(x)))
            else:
                nxt = int(rng.choice(len(x), p=distance / total))
            chosen.append(nxt)
            distance = np.minimum(distance, (1.0 - x @ x[nxt]).clamp_min(0).double().cpu().numpy())
        return x[torch.tensor(chosen, device=x.device)].clone()

    @staticmethod
    def quotas(sizes: np.ndarray, total: int) -> np.ndarray:
        """Per-stratum quotas (the coverage rule in the module docstring)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        n = int(sizes.sum())
        exact = total * sizes / max(n, 1)
        q = np.floor(exact).astype(np.int64)
        q = np.where(sizes > 0, np.maximum(q, 1), 0)
        q = np.minimum(q, sizes)
        frac = exact - np.floor(exact)
        diff = total - int(q.sum())
        while diff > 0:
            room = np.flatnonzero(q < sizes)
            for s in room[np.lexsort((room, -frac[room]))][:diff]:
                q[s] += 1
            diff = total - int(q.sum())
        while diff < 0:
            big = np.flatnonzero(q > 1)
            if len(big) == 0:
                big = np.flatnonzero(q > 0)
            for s in big[np.lexsort((-big, exact[big], -q[big]))][: -diff]:
                q[s] -= 1
            diff = total - int(q.sum())
        return q

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        n = context.num_samples
        rng = context.rng(epoch, purpose=12)
        rows = self.refresh_graph()
        if epoch < self.warmup_epochs:
            self._last = {"coreset": n, "graph_rows_refreshed": rows, "warmup": True}
            order = rng.permutation(n).astype(np.int64)
            return Plan(order, np.ones(n, dtype=np.float32))
        size = max(1, int(round(self.budget * n)))
        h, propagated = self.propagated_scores(epoch)
        strata = self._update_strata(context, epoch, size)
        sizes = np.bincount(strata)
        q = self.quotas(sizes, size)
        chosen: list[np.ndarray] = []
        weights: list[np.ndarray] = []
        for s in np.flatnonzero(q > 0):
            members = np.flatnonzero(strata == s)
            top = int(round((1.0 - self.diversity) * q[s]))
            ranked = members[np.lexsort((members, -h[members].astype(np.float64)))]
            rest = ranked[top:]
            picked = np.concatenate([ranked[:top], rng.choice(rest, int(q[s]) - top, replace=False)])
            chosen.append(picked)
            w = sizes[s] / q[s] if self.weighting == "stratum" else 1.0
            weights.append(np.full(len(picked), w, dtype=np.float32))
        indices = np.concatenate(chosen).astype(np.int64)
        w = np.concatenate(weights)
        perm = rng.permutation(len(indices))
        self.strata, self.scores = strata, h
        self._last = {
            "coreset": int(len(indices)), "strata": int((sizes > 0).sum()), "covered": int((q > 0).sum()),
            "propagated": propagated, "graph_rows_refreshed": rows, "warmup": False,
        }
        return Plan(indices[perm], w[perm])

    # -- reporting and resume ----------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        return {"budget": self.budget, **self._last}

    _STATE_KEYS = ("observed", "seen_round", "embeddings", "embedded_round", "neighbours", "row_round", "row_dirty", "centroids")

    def state_dict(self) -> dict[str, Any]:
        return {
            "observed": self.observed.copy(),
            "seen_round": self.seen_round.copy(),
            "embeddings": None if self.embeddings is None else self.embeddings.cpu().numpy().copy(),
            "embedded_round": self.embedded_round.copy(),
            "neighbours": None if self.neighbours is None else self.neighbours.copy(),
            "row_round": self.row_round.copy(),
            "row_dirty": self.row_dirty.copy(),
            "centroids": None if self.centroids is None else self.centroids.cpu().numpy().copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != set(self._STATE_KEYS):
            raise ValueError(f"grace state must have keys {sorted(self._STATE_KEYS)}, got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        n = self.num_samples

        def arr(name: str, dtype: Any, shape: tuple | None = None, optional: bool = False) -> np.ndarray | None:
            value = state[name]
            if value is None and optional:
                return None
            a = np.asarray(value)
            if a.dtype != dtype or (shape is not None and a.shape != shape) or (shape is None and (a.ndim != 2 or a.shape[0] < 1)):
                raise ValueError(f"grace state {name!r} must be {np.dtype(dtype)} {shape or '2-D'}, got {a.dtype} {a.shape}")
            return a.copy()

        observed = arr("observed", np.float32, (n,))
        seen = arr("seen_round", np.int64, (n,))
        emb = arr("embeddings", np.float32, None, optional=True)
        if emb is not None and emb.shape[0] != n:
            raise ValueError(f"grace state 'embeddings' must have {n} rows, got {emb.shape[0]}")
        emb_round = arr("embedded_round", np.int64, (n,))
        nb = arr("neighbours", np.int64, None, optional=True)
        if nb is not None and (nb.shape[0] != n or nb.min() < -1 or nb.max() >= n):
            raise ValueError(f"grace state 'neighbours' must be [{n}, k] with entries in [-1, {n})")
        row_round = arr("row_round", np.int64, (n,))
        dirty = arr("row_dirty", np.bool_, (n,))
        cent = arr("centroids", np.float32, None, optional=True)
        device = self.embeddings.device if self.embeddings is not None else torch.device("cpu")
        self.observed, self.seen_round, self.embedded_round = observed, seen, emb_round
        self.embeddings = None if emb is None else torch.from_numpy(emb).to(device)
        self.neighbours, self.row_round, self.row_dirty = nb, row_round, dirty
        self.centroids = None if cent is None else torch.from_numpy(cent).to(device)
