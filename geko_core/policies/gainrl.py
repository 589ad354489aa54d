"""GAIN-RL (arXiv 2506.02281): angle-ordered data, a Gaussian window moved by reported accuracy.

The exact rules (also in ``docs/policies.md``):

* **Order.** Every sample may carry an angle concentration ``a_i`` (the mean pairwise cosine of
  its token hidden states, :func:`geko_core.angle_concentration`). The order sorts the scored
  samples by ``a_i`` descending (GAIN-RL trains high-concentration samples first: their
  gradients are largest), ties by dataset index; samples without a score (never given, or NaN)
  follow in dataset-index order at the end (``unscored="end"``) or lead at the start
  (``unscored="start"``).
* **Window.** Epoch ``e`` draws ``k`` distinct positions ``j`` of that order without
  replacement, position ``j`` with weight ``exp(-(j - mu)^2 / (2 sigma^2))`` (randomized
  systematic PPS, :func:`geko_core.gaussian_window_plan`), and trains ``order[j]``; ``mu``
  starts at ``mu0`` (default 0, the most concentrated samples). The window weight underflows
  beyond about 38 sigma, so when ``k > 30 sigma`` the draw uses ``sigma = k / 30`` instead
  (otherwise not enough positions would be drawable at an end of the order).
* **Move.** After each round the user reports the accuracy (or reward) ``acc`` of that round
  and optionally an angle signal ``ang`` (default 0); then
  ``mu <- clamp(mu + clamp(n tanh(alpha (acc / acc_scale - beta)) + n tanh(alpha ang),
  adj_min, adj_max), 0, N - 1)`` (:func:`geko_core.gainrl_update_mu`). Above ``beta`` the
  window moves on to less concentrated data, below it moves back. Without any report since
  the last plan, ``auto_accuracy=True`` uses the mean ``correct`` of the statistics observed
  since then (pass ``auto_accuracy=False`` to keep ``mu`` fixed until a report).
* **Weights.** 1 (GAIN-RL is a curriculum: the point is to change what the model sees), or
  ``weighting="importance"`` for ``1 / pi_j`` (the inclusion probability of the draw).
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np

from .base import Plan, Policy, PolicyContext, StatsBatch


def _finite_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


class GainRLPolicy(Policy):
    """Angle-concentration order + Gaussian-window sampling (see the module docstring).

    Args:
        samples_per_epoch: an int ``k >= 1`` (samples per epoch, capped at N) or a float
            fraction of N in (0, 1].
        sigma: window width in positions (> 0).
        n, alpha, beta, acc_scale: the window move (``acc_scale > 0``, ``n, alpha >= 0``).
        adj_min, adj_max: bounds of one move (None: unbounded beyond ``[-2n, 2n]``).
        angles: optional float ``[N]`` angle concentration per sample (NaN = no score).
        mu0: starting window centre in positions (>= 0).
        unscored: ``"end"`` or ``"start"``: where samples without a score sit in the order.
        auto_accuracy: use the observed mean ``correct`` when no accuracy was reported.
        weighting: ``"none"`` (weight 1) or ``"importance"`` (``1 / pi``).
    """

    name = "gainrl"

    def __init__(
        self,
        samples_per_epoch: int | float = 0.5,
        *,
        sigma: float = 1000.0,
        n: float = 500.0,
        alpha: float = 2.0,
        beta: float = 0.5,
        acc_scale: float = 1.0,
        adj_min: float | None = None,
        adj_max: float | None = None,
        angles: Any = None,
        mu0: float = 0.0,
        unscored: str = "end",
        auto_accuracy: bool = True,
        weighting: str = "none",
    ) -> None:
        super().__init__()
        if isinstance(samples_per_epoch, bool) or not isinstance(samples_per_epoch, (Integral, Real)):
            raise TypeError(f"samples_per_epoch must be an int count or a float fraction, got {type(samples_per_epoch).__name__}")
        if isinstance(samples_per_epoch, Integral):
            if samples_per_epoch < 1:
                raise ValueError(f"samples_per_epoch as a count must be >= 1, got {samples_per_epoch}")
        elif not 0.0 < float(samples_per_epoch) <= 1.0:
            raise ValueError(f"samples_per_epoch as a fraction must be in (0, 1], got {samples_per_epoch}")
        self.samples_per_epoch = samples_per_epoch
        self.sigma = _finite_real(sigma, "sigma")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.n = _finite_real(n, "n")
        self.alpha = _finite_real(alpha, "alpha")
        if self.n < 0 or self.alpha < 0:
            raise ValueError(f"n and alpha must be >= 0, got n={n}, alpha={alpha}")
        self.beta = _finite_real(beta, "beta")
        self.acc_scale = _finite_real(acc_scale, "acc_scale")
        if self.acc_scale <= 0:
            raise ValueError(f"acc_scale must be > 0, got {acc_scale}")
        self.adj_min = None if adj_min is None else _finite_real(adj_min, "adj_min")
        self.adj_max = None if adj_max is None else _finite_real(adj_max, "adj_max")
        if self.adj_min is not None and self.adj_max is not None and self.adj_min > self.adj_max:
            raise ValueError(f"adj_min must be <= adj_max, got {adj_min} > {adj_max}")
        self.mu = _finite_real(mu0, "mu0")
        if self.mu < 0:
            raise ValueError(f"mu0 must be >= 0, got {mu0}")
        if unscored not in ("end", "start"):
            raise ValueError(f"unscored must be 'end' or 'start', got {unscored!r}")
        if weighting not in ("none", "importance"):
            raise ValueError(f"weighting must be 'none' or 'importance', got {weighting!r}")
        self.unscored = unscored
        self.auto_accuracy = bool(auto_accuracy)
        self.weighting = weighting
        self._initial_angles = angles
        self.angles: np.ndarray | None = None
        self.order: np.ndarray | None = None
        self.mu_history: list[float] = []
        self._reported: tuple[float, float] | None = None
        self._observed_correct = 0.0
        self._observed_count = 0

    def bind(self, context: PolicyContext) -> None:
        n = context.num_samples
        if self.mu > n - 1:
            raise ValueError(f"mu0 must be <= N - 1 = {n - 1}, got {self.mu}")
        values = None if self._initial_angles is None else self._check_values(self._initial_angles, n, "angles")
        super().bind(context)
        self.angles = np.full(n, np.nan, dtype=np.float32)
        if values is not None:
            self.angles[:] = values
        self._initial_angles = None
        self._rebuild_order()

    # -- user input --------------------------------------------------------------------------
    @staticmethod
    def _check_values(values: Any, expected: int, name: str) -> np.ndarray:
        if hasattr(values, "detach"):
            values = values.detach().cpu().numpy()
        array = np.asarray(values)
        if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
        if array.shape != (expected,):
            raise ValueError(f"{name} must have shape ({expected},), got {array.shape}")
        array = array.astype(np.float32)
        if np.isinf(array).any():
            raise ValueError(f"{name} must be finite or NaN (no score), got an infinite value")
        return array

    def set_angles(self, indices: Any, concentration: Any) -> None:
        """Give (or replace) the angle concentration of some samples and re-sort.

        Args:
            indices: int ``[M]`` dataset indices (numpy, list or tensor).
            concentration: float ``[M]`` (e.g. ``angle_concentration(...).concentration``);
                NaN marks "no score" (the sample moves to the unscored part).
        """
        self._bound()
        if hasattr(indices, "detach"):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices)
        if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        values = self._check_values(concentration, len(idx), "concentration")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"indices must be in [0, {self.num_samples}), got {int(idx.min())}..{int(idx.max())}")
        self.angles[idx.astype(np.int64)] = values
        self._rebuild_order()

    def report(self, accuracy: float, angle: float | None = None) -> float:
        """The accuracy (or reward) of the last round; moves the window now. Returns the new mu."""
        self._bound()
        acc = _finite_real(accuracy, "accuracy")
        ang = 0.0 if angle is None else _finite_real(angle, "angle")
        self._move(acc, ang)
        self._reported = (acc, ang)
        return self.mu

    def _move(self, accuracy: float, angle: float) -> None:
        from ..planner import gainrl_update_mu

        self.mu = float(
            gainrl_update_mu(
                self.mu, accuracy, angle, num_positions=self.num_samples, n=self.n, alpha=self.alpha,
                beta=self.beta, acc_scale=self.acc_scale, adj_min=self.adj_min, adj_max=self.adj_max,
            )
        )

    def _rebuild_order(self) -> None:
        angles = self.angles
        scored = np.flatnonzero(~np.isnan(angles))
        unscored = np.flatnonzero(np.isnan(angles))
        # lexsort: last key is primary; descending angle, then ascending index.
        scored = scored[np.lexsort((scored, -angles[scored].astype(np.float64)))]
        parts = (scored, unscored) if self.unscored == "end" else (unscored, scored)
        self.order = np.concatenate(parts).astype(np.int64)

    # -- the policy --------------------------------------------------------------------------
    def observe(self, batch: StatsBatch, table) -> None:
        super().observe(batch, table)
        correct = batch.correct[np.isfinite(batch.correct)]
        self._observed_correct += float(correct.sum())
        self._observed_count += int(correct.size)

    def epoch_size(self) -> int:
        """Samples drawn per epoch."""
        if isinstance(self.samples_per_epoch, Integral):
            return min(int(self.samples_per_epoch), self.num_samples)
        return max(1, int(round(float(self.samples_per_epoch) * self.num_samples)))

    def plan_epoch(self, context: PolicyContext, epoch: int, progress: float) -> Plan:
        from ..planner import gaussian_window_plan

        if epoch > 0 and self._reported is None and self.auto_accuracy and self._observed_count > 0:
            self._move(self._observed_correct / self._observed_count, 0.0)
        self._reported = None
        self._observed_correct, self._observed_count = 0.0, 0
        self.mu_history.append(self.mu)
        k = self.epoch_size()
        # The window weight underflows to 0 beyond ~38 sigma of mu; with mu at an end of the
        # order only one side exists, so widen sigma to k / 30 when k is that many sigmas wide.
        sigma = max(self.sigma, k / 30.0)
        plan = gaussian_window_plan(
            self.order, mu=self.mu, sigma=sigma, num_samples_to_draw=k, seed=context.seed, epoch=epoch,
        )
        indices = np.asarray(plan.indices, dtype=np.int64)
        if self.weighting == "importance":
            weights = np.asarray(plan.weights, dtype=np.float32)
        else:
            weights = np.ones(len(indices), dtype=np.float32)
        return Plan(indices, weights)

    def metrics(self) -> dict[str, Any]:
        return {"mu": self.mu, "scored": int((~np.isnan(self.angles)).sum())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "mu": self.mu,
            "angles": self.angles.copy(),
            "order": self.order.copy(),
            "mu_history": list(self.mu_history),
            "reported": None if self._reported is None else list(self._reported),
            "observed": [self._observed_correct, self._observed_count],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"mu", "angles", "order", "mu_history", "reported", "observed"}:
            raise ValueError(f"gainrl state must have keys mu, angles, order, mu_history, reported, observed, got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        n = self.num_samples
        angles = np.asarray(state["angles"])
        order = np.asarray(state["order"])
        if angles.shape != (n,) or angles.dtype != np.float32:
            raise ValueError(f"gainrl angles must be float32 [{n}], got {angles.dtype} {angles.shape}")
        if order.shape != (n,) or order.dtype != np.int64 or not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"gainrl order must be an int64 permutation of range({n})")
        mu = _finite_real(state["mu"], "mu")
        if not 0 <= mu <= n - 1:
            raise ValueError(f"gainrl mu must be in [0, {n - 1}], got {mu}")
        self.angles, self.order, self.mu = angles.copy(), order.copy(), mu
        self.mu_history = [float(m) for m in state["mu_history"]]
        self._reported = None if state["reported"] is None else (float(state["reported"][0]), float(state["reported"][1]))
        self._observed_correct, self._observed_count = float(state["observed"][0]), int(state["observed"][1])


class GainRLRolloutPolicy(GainRLPolicy):
    """GAIN-RL in its own setting, an RL loop (rewards mode): the same order, window and move
    as :class:`GainRLPolicy`, with the move driven by the measured mean reward.

    The caller gives the angle concentration of each prompt from the policy model's hidden
    states (``set_angles``, from :func:`geko_core.angle_concentration` over
    :func:`geko_core.capture_hidden_states`), as GAIN-RL orders prompts with the model it
    starts from; ``count_prepass(prompts, tokens)`` records that forward pass's cost, which
    the metrics report. Without a ``report()`` since the last plan, the window moves by the
    mean pass rate of the groups rolled out since then (the mean reward for 0/1 rewards;
    ``acc_scale`` rescales another range); a ``report(accuracy)`` overrides it, as in the
    supervised setting.

    Args:
        samples_per_epoch: as :class:`GainRLPolicy`.
        sigma, n: the window's width and largest move in positions; None (the default)
            scales them to the prompt set, ``sigma = max(1, N / 10)`` and ``n = N / 20``
            (the supervised defaults, 1000 and 500, suit data sets of tens of thousands).
        filter_groups: also fill each batch with informative groups after the rollout, as
            dynamic sampling does.
        options: the other options of :class:`GainRLPolicy`.
    """

    name = "gainrl"
    signal = "rewards"

    def __init__(
        self, samples_per_epoch: int | float = 0.5, *, sigma: float | None = None, n: float | None = None,
        filter_groups: bool = False, **options: Any,
    ) -> None:
        super().__init__(samples_per_epoch, sigma=1.0 if sigma is None else sigma, n=0.0 if n is None else n, **options)
        self._set_filter_groups(filter_groups)
        self._scaled = (sigma is None, n is None)
        self.prepass_prompts = 0
        self.prepass_tokens = 0

    def bind(self, context: PolicyContext) -> None:
        super().bind(context)
        if self._scaled[0]:
            self.sigma = max(1.0, context.num_samples / 10.0)
        if self._scaled[1]:
            self.n = context.num_samples / 20.0

    def observe(self, batch: StatsBatch, table) -> None:
        raise TypeError("the RL gainrl policy learns from rewards (Selector.observe_rewards), not from logits")

    def observe_rollouts(self, batch: Any, table: Any) -> None:
        Policy.observe_rollouts(self, batch, table)
        self._observed_correct += float(batch.pass_rate.sum(dtype=np.float64))
        self._observed_count += int(len(batch.indices))

    def count_prepass(self, prompts: int, tokens: int = 0) -> None:
        """Add the cost of a forward pass that measured angles: ``prompts`` scored, ``tokens``
        forwarded (both non-negative ints)."""
        for name, value in (("prompts", prompts), ("tokens", tokens)):
            if isinstance(value, bool) or not isinstance(value, (Integral, np.integer)) or value < 0:
                raise ValueError(f"count_prepass {name} must be a non-negative int, got {value!r}")
        self.prepass_prompts += int(prompts)
        self.prepass_tokens += int(tokens)

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), "prepass_prompts": self.prepass_prompts, "prepass_tokens": self.prepass_tokens}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prepass": [self.prepass_prompts, self.prepass_tokens]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "prepass" not in state:
            raise ValueError("gainrl (rewards) state must have the key prepass")
        prepass = state["prepass"]
        if not isinstance(prepass, (list, tuple)) or len(prepass) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (Integral, np.integer)) or v < 0 for v in prepass
        ):
            raise ValueError(f"gainrl state prepass must be two non-negative ints, got {prepass!r}")
        super().load_state_dict({k: v for k, v in state.items() if k != "prepass"})
        self.prepass_prompts, self.prepass_tokens = int(prepass[0]), int(prepass[1])
