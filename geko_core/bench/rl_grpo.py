"""GRPO on ``rl-algo``: rollouts, verifiable rewards, clipped policy gradient, loop-level
selection baselines, held-out evaluation (issue 23, the environment part).

One RL step: a selection policy chooses ``B`` prompt indices (``choose``), the policy model
samples ``G`` completions of each at temperature 1 through its KV cache, ``rl_data`` scores them,
the policy is told the rewards (``report``), and the groups with a reward spread are trained:

* advantages ``(r - mean_g r) / (std_g r + eps)``, population std over the group's ``G``
  rewards, ``eps = 1e-6``; a group whose rewards are all equal gets exactly zero advantage
  (``group_advantages``), so it gives exactly zero gradient and is not forwarded at all;
* loss (``grpo_loss``, computed by ``rl_model.completion_policy_loss``): PPO's clipped ratio ``-min(rho A, clip(rho, 1-eps_c, 1+eps_c) A)`` per
  completion token, averaged over every completion token (``END`` included) of the groups
  trained — DAPO's token-mean, so a step's scale does not depend on how many groups were
  zero-variance; ``inner_updates`` optimiser steps on the same rollouts, the old
  log-probabilities taken before the first (with one update the ratio is exactly 1 and the
  clipping never acts: plain on-policy policy gradient);
* no reference model and no KL term; the log-probabilities (old and new alike) under the
  sampling distribution, ``softmax(logits / SAMPLING_TEMPERATURE)`` (temperature 1), through the
  fused policy-gradient path: ``geko_core.linear_policy_loss`` on the final hidden states and
  the head makes the loss and its gradients in one chunked pass, only at the trained tokens, so
  the ``[B*G, T, V]`` logits never exist (the values of ``log_softmax(...).gather(...)`` and of
  ``grpo_loss`` up to rounding); the old log-probabilities come from ``completion_logprobs``.

A selection policy is a ``LoopPolicy``: ``choose`` before the rollout, ``report`` after it
(which may return the groups to train). ``full`` is plain GRPO at the loop level (every
training prompt each epoch, shuffled; no selection library in the loop), the baseline; every
other policy is the ``Selector`` in rewards mode (``rl_selection.SelectorPolicy``: the epoch's
plan from ``sel.sampler``, ``sel.observe_rewards`` after each rollout, ``stats.keep`` trained):
``random_subset`` (a fresh random share of the prompts each epoch), ``dynamic`` (DAPO's
dynamic sampling: roll out, drop zero-variance groups, draw the missing count again until the
batch holds ``B`` informative groups or the epoch's prompts run out; the dropped groups'
rollouts are counted), ``greso``, ``geko`` and ``gainrl`` (pre-rollout selection from the
reward history; GAIN-RL's angle pre-pass counted).

``python -m geko_core.bench.rl_grpo --policy full --seeds 1 --scale quick`` prints the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from .rl_data import MAX_ANSWER, PROMPT_LEN, RLData, RLSplit
from .rl_model import TinyLM, completion_logprobs, completion_policy_loss, generate, token_mask
from .rl_setup import SCALES, RLConfig, evaluate, load_data, warm_start

__all__ = [
    "FullPolicy",
    "LoopPolicy",
    "group_advantages",
    "grpo_loss",
    "make_policy",
    "run_rl",
]

ADVANTAGE_EPS = 1e-6
#: the rollouts' sampling temperature; the loss's log-probabilities are taken at the same one
SAMPLING_TEMPERATURE = 1.0
#: ``full`` at the loop level, the others through the Selector in rewards mode
POLICIES = ("full", "geko", "greso", "gainrl", "dynamic", "random_subset")


# --------------------------------------------------------------------------------------------
# GRPO's arithmetic


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """float32 ``[B, G]``: ``(r - mean) / (std + eps)`` per group (population std); exactly 0
    in a group whose rewards are all equal.

    Raises:
        ValueError: rewards not 2-D, or not finite.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got {list(rewards.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite")
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    spread = r.std(dim=1, keepdim=True, unbiased=False)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(r), centred / (spread + eps))


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2) -> torch.Tensor:
    """Clipped policy-gradient loss, token-mean over the masked tokens.

    Args:
        logp: ``[N, T]`` log-probabilities of the completion tokens (with gradient).
        old_logp: ``[N, T]`` the same under the policy that sampled them (no gradient).
        advantages: ``[N]`` one per completion (its group's normalised reward).
        mask: bool ``[N, T]``: tokens up to and including each completion's end.
        clip_eps: the ratio's clipping range.
    """
    ratio = torch.exp(logp - old_logp.detach())
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


# --------------------------------------------------------------------------------------------
# Loop-level selection policies


class LoopPolicy(Protocol):
    """What the loop asks of a selection policy.

    ``filter_zero_variance``: drop zero-variance groups after the rollout and draw again until
    the batch holds ``B`` informative groups (dynamic sampling).
    """

    filter_zero_variance: bool

    def begin_epoch(self, epoch: int) -> None: ...

    def choose(self, step: int, count: int) -> np.ndarray:
        """Up to ``count`` prompt indices to roll out next; empty when the epoch is over."""

    def report(self, indices: np.ndarray, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """After every rollout: rewards ``[b, G]`` and completion lengths ``[b, G]``. May
        return bool ``[b]``, the groups to train on (a Selector's ``stats.keep``); None lets
        the loop keep the groups with a reward spread."""

    def epoch_share(self) -> float:
        """The share of the training prompts planned for the epoch begun last."""


class FullPolicy:
    """Plain GRPO, the baseline: every training prompt once per epoch, in a fresh shuffle,
    no selection library in the loop."""

    filter_zero_variance = False

    def __init__(self, num_prompts: int, seed: int) -> None:
        self.num_prompts = num_prompts
        self.rng = np.random.default_rng([seed, 23])
        self.order = np.empty(0, dtype=np.int64)
        self.position = 0

    def begin_epoch(self, epoch: int) -> None:
        self.order = self.rng.permutation(self.num_prompts)
        self.position = 0

    def choose(self, step: int, count: int) -> np.ndarray:
        taken = self.order[self.position : self.position + count]
        self.position += len(taken)
        return taken

    def report(self, indices: np.ndarray, rewards: np.ndarray, lengths: np.ndarray) -> None:
        pass

    def epoch_share(self) -> float:
        return 1.0


def make_policy(name: str, num_prompts: int, seed: int, *, epochs: int, budget: float = 0.5, fill: bool = False) -> LoopPolicy:
    """``full`` (plain GRPO, ``FullPolicy``) or a Selector policy in rewards mode
    (``rl_selection.SelectorPolicy``: ``random_subset`` with ``budget``, the share of the
    prompts per epoch; ``dynamic``, ``greso``, ``geko``, ``gainrl``). ``fill``: the Selector
    policies also fill every batch with informative groups, as ``dynamic`` does (``full``
    is plain GRPO either way).

    Raises:
        ValueError: an unknown name or a bad budget.
    """
    from .rl_selection import SelectorPolicy, selector_options

    if name == "full":
        return FullPolicy(num_prompts, seed)
    if name not in POLICIES:
        raise ValueError(f"unknown RL policy {name!r}; choose one of {', '.join(POLICIES)}")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a share in (0, 1], got {budget}")
    return SelectorPolicy(name, num_prompts, seed, epochs, options=selector_options(name, num_prompts, budget, fill=fill))


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Counters:
    rollout_tokens: int = 0
    rollouts: int = 0
    dropped_rollout_tokens: int = 0
    dropped_groups: int = 0
    trained_tokens: int = 0
    groups: int = 0
    zero_variance_groups: int = 0
    steps: int = 0
    updates: int = 0
    #: "selection": inside the policy's ``begin_epoch``/``choose``/``report`` (and a pre-pass
    #: the policy asks for); "other": the loop's own bookkeeping; "evaluation" apart
    seconds: dict = field(default_factory=lambda: {"rollout": 0.0, "training": 0.0, "selection": 0.0, "other": 0.0, "evaluation": 0.0})


def _rollout(model: TinyLM, split: RLSplit, idx: np.ndarray, cfg: RLConfig, generator: torch.Generator):
    out = generate(
        model, torch.from_numpy(split.prompts[idx]), cfg.G, max_new_tokens=MAX_ANSWER, temperature=SAMPLING_TEMPERATURE,
        generator=generator,
    )
    rewards = split.rewards(idx, out.tokens.numpy())
    return out, rewards


def _train_step(model: TinyLM, optimizer: torch.optim.Optimizer, split: RLSplit, groups: list, cfg: RLConfig) -> int:
    """One GRPO update (``inner_updates`` optimiser steps) on the informative ``groups``
    (``(index, tokens [G, T], lengths [G], rewards [G])``); returns the tokens trained."""
    idx = np.array([g[0] for g in groups], dtype=np.int64)
    completions = torch.cat([g[1] for g in groups])
    lengths = torch.cat([g[2] for g in groups])
    advantages = group_advantages(torch.from_numpy(np.stack([g[3] for g in groups]))).reshape(-1)
    prompts = torch.from_numpy(split.prompts[idx]).repeat_interleave(cfg.G, dim=0)
    mask = token_mask(lengths, completions.shape[1])
    old = None
    if cfg.inner_updates > 1:
        with torch.no_grad():
            old = completion_logprobs(model, prompts, completions, mask=mask, temperature=SAMPLING_TEMPERATURE)
    for _ in range(cfg.inner_updates):
        # positions after a completion's end are left out of the loss by its mask
        loss = completion_policy_loss(
            model, prompts, completions, advantages, mask=mask, old_logprobs=old, temperature=SAMPLING_TEMPERATURE,
            clip_eps=cfg.clip_eps,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    return int(mask.sum()) * cfg.inner_updates


def grpo_train(
    model: TinyLM,
    data: RLData,
    policy: LoopPolicy,
    cfg: RLConfig,
    seed: int,
    *,
    on_eval: Callable[[int, TinyLM, _Counters], None] | None = None,
) -> tuple[_Counters, list[dict]]:
    """Run ``cfg.epochs`` epochs of GRPO on ``data.train`` with ``policy``'s prompts.

    A step rolls out ``cfg.batch_prompts`` prompts of the plan (a filtering policy draws again
    until its batch holds that many informative groups). ``cfg.matched_steps``: a policy that
    plans a share ``s`` of the prompts for an epoch rolls out ``round(s * batch_prompts)``
    a step instead, so every epoch has full GRPO's number of optimizer steps and selection
    shrinks each step's rollouts rather than the number of steps (not with a filtering
    policy).

    ``on_eval(step, model, counters)`` is called before the first step, every
    ``cfg.eval_every`` trained steps and at the end when rollouts were spent since the last
    call (its time is counted apart).
    Returns the counters and per-epoch records (zero-variance share, pass-rate spread).
    """
    split = data.train
    generator = torch.Generator().manual_seed(int(seed) * 7919 + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    c = _Counters()
    epochs: list[dict] = []

    evaluated_at: list[int] = []  # rollout tokens at the latest evaluation

    def timed_eval() -> None:
        if on_eval is not None:
            began = time.perf_counter()
            on_eval(c.steps, model, c)
            c.seconds["evaluation"] += time.perf_counter() - began
            evaluated_at[:] = [c.rollout_tokens]

    timed_eval()
    for epoch in range(cfg.epochs):
        mark = time.perf_counter()
        prepare = getattr(policy, "prepare_epoch", None)
        if prepare is not None:  # e.g. GAIN-RL's hidden-state pre-pass over the prompts
            prepare(epoch, model, split)
        policy.begin_epoch(epoch)
        draw = cfg.batch_prompts
        if cfg.matched_steps and not policy.filter_zero_variance:
            draw = max(1, round(policy.epoch_share() * cfg.batch_prompts))
        now = time.perf_counter()
        c.seconds["selection"] += now - mark
        mark = now
        pass_rates: list[np.ndarray] = []
        epoch_groups = epoch_zero = 0
        exhausted = False
        while not exhausted:
            batch: list = []
            while len(batch) < draw:
                now = time.perf_counter()
                c.seconds["other"] += now - mark
                idx = np.asarray(policy.choose(c.steps, draw - len(batch)), dtype=np.int64)
                mark = time.perf_counter()
                c.seconds["selection"] += mark - now
                if len(idx) == 0:
                    exhausted = True
                    break
                now = time.perf_counter()
                c.seconds["other"] += now - mark
                out, rewards = _rollout(model, split, idx, cfg, generator)
                mark = time.perf_counter()
                c.seconds["rollout"] += mark - now
                lengths = out.lengths.view(len(idx), cfg.G)
                keep = policy.report(idx, rewards, lengths.numpy())
                now = time.perf_counter()
                c.seconds["selection"] += now - mark
                mark = now
                c.rollout_tokens += out.generated_tokens
                c.rollouts += out.tokens.shape[0]
                flat = (rewards == rewards[:, :1]).all(axis=1)
                keep = ~flat if keep is None else np.asarray(keep, dtype=bool)
                c.groups += len(idx)
                c.zero_variance_groups += int(flat.sum())
                epoch_groups += len(idx)
                epoch_zero += int(flat.sum())
                pass_rates.append(rewards.mean(axis=1))
                for j, i in enumerate(idx):
                    if not keep[j]:
                        if policy.filter_zero_variance:
                            c.dropped_groups += 1
                            c.dropped_rollout_tokens += int(lengths[j].sum())
                        continue
                    rows = slice(j * cfg.G, (j + 1) * cfg.G)
                    batch.append((int(i), out.tokens[rows], out.lengths[rows], rewards[j]))
                if not policy.filter_zero_variance:
                    break  # one draw per step; its zero-variance groups simply train nothing
            if not batch:
                continue
            now = time.perf_counter()
            c.seconds["other"] += now - mark
            c.trained_tokens += _train_step(model, optimizer, split, batch, cfg)
            mark = time.perf_counter()
            c.seconds["training"] += mark - now
            c.steps += 1
            c.updates += cfg.inner_updates
            if c.steps % cfg.eval_every == 0:
                c.seconds["other"] += time.perf_counter() - mark
                timed_eval()
                mark = time.perf_counter()
        c.seconds["other"] += time.perf_counter() - mark
        rates = np.concatenate(pass_rates) if pass_rates else np.empty(0)
        epochs.append({
            "epoch": epoch,
            "groups": epoch_groups,
            "zero_variance_share": epoch_zero / max(1, epoch_groups),
            "all_wrong_share": float((rates == 0).mean()) if len(rates) else 0.0,
            "all_right_share": float((rates == 1).mean()) if len(rates) else 0.0,
            "rollout_tokens_so_far": c.rollout_tokens,
        })
    # The last point carries the whole run's cost, rollouts after the last trained step included
    # (an all-zero-variance last draw, dynamic sampling's leftovers).
    if on_eval is not None and (c.steps % cfg.eval_every or evaluated_at != [c.rollout_tokens]):
        timed_eval()
    return c, epochs


def _rl_seconds(seconds: dict) -> float:
    """RL wall-clock: rollout, training, selection and the loop's own bookkeeping (not the
    evaluations)."""
    return seconds["rollout"] + seconds["training"] + seconds["selection"] + seconds["other"]


def run_rl(
    policy_name: str, seed: int, scale: str = "quick", *, budget: float = 0.5, config: RLConfig | None = None,
    policy: LoopPolicy | None = None, fill: bool = False, matched_steps: bool = False,
) -> dict:
    """Warm-start the policy model, run GRPO with a selection policy and measure it.

    Args:
        policy_name: ``full``, ``random_subset`` or ``dynamic`` (the name recorded when a
            ``policy`` object is given).
        seed: model, warm start, rollouts and selection.
        scale: ``smoke``, ``quick`` or ``default`` (``SCALES``).
        budget: ``random_subset``'s share of the prompts per epoch.
        config: overrides the scale's settings.
        policy: a ``LoopPolicy`` of one's own instead of ``policy_name``'s.
        fill: the Selector policies fill every batch with informative groups (``make_policy``;
            also the policies the scale's ``fill_policies`` names).
        matched_steps: every epoch has full GRPO's number of steps (``grpo_train``; the
            scale's ``matched_steps`` may say so too).

    Returns:
        A dict with the held-out figures before and after RL (``before``, ``after``: greedy
        exact match % and mean reward over ``G`` samples, on validation and test), the costs
        (rollout tokens, tokens trained, rollouts, dropped rollouts, wall-clock split into
        rollout / training / other, evaluation apart), the per-epoch zero-variance shares and
        the curve of held-out greedy exact match and mean reward over ``G`` samples against
        rollout tokens and RL wall-clock.
    """
    if scale not in SCALES and config is None:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    cfg = config or SCALES[scale]
    if matched_steps:
        cfg = cfg.with_(matched_steps=True)
    data = load_data(cfg)
    model = TinyLM(PROMPT_LEN + MAX_ANSWER, cfg.width, cfg.layers, cfg.heads)
    started = time.perf_counter()
    model.load_state_dict(warm_start(cfg, seed))
    warm_seconds = time.perf_counter() - started
    fill = fill or policy_name in cfg.fill_policies
    chosen = policy if policy is not None else make_policy(policy_name, len(data.train), seed, epochs=cfg.epochs, budget=budget, fill=fill)
    before = evaluate(model, data, cfg, seed)
    curve: list[dict] = []

    def on_eval(step: int, m: TinyLM, counters: _Counters) -> None:
        figures = evaluate(m, data, cfg, seed, sampled=cfg.curve_sampled)
        point = {"step": step, "rollout_tokens": counters.rollout_tokens, "trained_tokens": counters.trained_tokens, "rl_seconds": _rl_seconds(counters.seconds)}
        for split in ("validation", "test"):
            point[f"{split}_exact_%"] = figures[split]["exact_%"]
            if cfg.curve_sampled:
                point[f"{split}_sampled_reward"] = figures[split]["sampled_reward"]
        curve.append(point)

    counters, epochs = grpo_train(model, data, chosen, cfg, seed, on_eval=on_eval)
    after = evaluate(model, data, cfg, seed)
    seconds = dict(counters.seconds)
    return {
        "policy": policy_name,
        "fill": bool(getattr(chosen, "filter_zero_variance", False)),
        "matched_steps": bool(cfg.matched_steps),
        "seed": seed,
        "scale": scale,
        "before": before,
        "after": after,
        "rollout_tokens": counters.rollout_tokens,
        "rollouts": counters.rollouts,
        "dropped_groups": counters.dropped_groups,
        "dropped_rollout_tokens": counters.dropped_rollout_tokens,
        "trained_tokens": counters.trained_tokens,
        "groups": counters.groups,
        "zero_variance_share": counters.zero_variance_groups / max(1, counters.groups),
        "steps": counters.steps,
        "updates": counters.updates,
        "seconds": seconds,
        "rl_seconds": _rl_seconds(seconds),
        "warm_start_seconds": warm_seconds,
        "epochs": epochs,
        "curve": curve,
        # a Selector-driven policy's own figures (skipped prompts, a pre-pass's cost)
        "selection_metrics": chosen.metrics() if callable(getattr(chosen, "metrics", None)) else {},
    }


def _line(r: dict) -> str:
    b, a, s = r["before"], r["after"], r["seconds"]
    z = r["epochs"]
    return (
        f"{r['policy']:>13} seed {r['seed']}: test exact {b['test']['exact_%']:5.1f} -> {a['test']['exact_%']:5.1f}  "
        f"validation {b['validation']['exact_%']:5.1f} -> {a['validation']['exact_%']:5.1f}  "
        f"test reward@G {b['test']['sampled_reward']:.3f} -> {a['test']['sampled_reward']:.3f}  "
        f"zero-var {z[0]['zero_variance_share']:.0%} -> {z[-1]['zero_variance_share']:.0%}  "
        f"rollout tokens {r['rollout_tokens']:,} (dropped {r['dropped_rollout_tokens']:,})  trained {r['trained_tokens']:,}  "
        f"RL {r['rl_seconds']:.1f}s (rollout {s['rollout']:.1f} train {s['training']:.1f} selection {s['selection']:.2f} other {s['other']:.1f}; eval {s['evaluation']:.1f}; warm start {r['warm_start_seconds']:.1f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geko_core.bench.rl_grpo", description="GRPO on rl-algo: held-out accuracy before and after RL, rollout tokens, wall-clock.")
    parser.add_argument("--policy", default="full", choices=POLICIES)
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (0 .. n-1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--scale", default="quick", choices=tuple(SCALES))
    parser.add_argument("--budget", type=float, default=0.5, help="random_subset's share of the prompts per epoch")
    parser.add_argument("--fill", action="store_true", help="the Selector policies fill every batch with informative groups, as dynamic sampling does")
    parser.add_argument("--matched-steps", action="store_true", help="every epoch has full GRPO's number of steps: selection shrinks each step's rollouts")
    parser.add_argument("--epochs", type=int, default=None, help="override the scale's epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--epochs-detail", action="store_true", help="print the per-epoch zero-variance shares")
    parser.add_argument("--curve", action="store_true", help="print held-out greedy exact match against rollout tokens")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = SCALES[args.scale] if args.epochs is None else SCALES[args.scale].with_(epochs=args.epochs)
        r = run_rl(args.policy, seed, args.scale, budget=args.budget, config=cfg, fill=args.fill, matched_steps=args.matched_steps)
        results.append(r)
        print(_line(r), flush=True)
        if args.epochs_detail:
            for e in r["epochs"]:
                print(f"    epoch {e['epoch']:>2}: zero-variance {e['zero_variance_share']:.0%} (all wrong {e['all_wrong_share']:.0%}, all right {e['all_right_share']:.0%})")
        if args.curve:
            for p in r["curve"]:
                print(
                    f"    step {p['step']:>4}  rollout tokens {p['rollout_tokens']:>9,}  RL {p['rl_seconds']:6.1f}s  exact match validation {p['validation_exact_%']:5.1f}% "
                    f"test {p['test_exact_%']:5.1f}%"
                    + (f"  reward@G validation {p['validation_sampled_reward']:.3f} test {p['test_sampled_reward']:.3f}" if "test_sampled_reward" in p else "")
                )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
