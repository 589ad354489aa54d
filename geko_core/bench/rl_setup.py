"""``rl-algo``'s settings per scale, its supervised warm start and its held-out evaluation.

The warm start fine-tunes a fresh ``TinyLM`` on the warm-up prompts with their answers
(``num_warmup``, disjoint from the RL training, validation and test prompts) for
``sft_steps`` steps, so that at the start of RL the training
prompts' pass rates over ``G`` samples span the whole range: some solved nearly always, many
sometimes, some never. The warm-started weights are kept in memory per (settings, seed).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .rl_data import END, MAX_ANSWER, PAD, PROMPT_LEN, RLData, RLSplit, encode, make_rl_data
from .rl_model import TinyLM, generate, supervised_loss

__all__ = ["SCALES", "RLConfig", "answer_tokens", "evaluate", "load_data", "warm_start"]


@dataclass(frozen=True)
class RLConfig:
    """Every setting of one ``rl-algo`` run (the selection policy aside)."""

    num_train: int
    num_validation: int
    num_test: int
    #: prompts of the supervised warm start (a split of their own)
    num_warmup: int = 2400
    width: int = 64
    layers: int = 2
    heads: int = 4
    #: warm start: steps, batch, learning rate
    sft_steps: int = 150
    sft_batch: int = 32
    sft_lr: float = 3e-3
    #: GRPO: epochs over the training prompts, prompts per step, rollouts per prompt
    epochs: int = 20
    batch_prompts: int = 32
    G: int = 8
    lr: float = 1e-3
    clip_eps: float = 0.2
    inner_updates: int = 1
    grad_clip: float = 1.0
    #: held-out curve point every this many trained steps; samples per prompt in evaluation
    eval_every: int = 40
    eval_G: int = 8
    #: the curve's points also measure the mean reward over ``eval_G`` samples (the figures
    #: before and after RL always do); greedy exact match alone costs about a ninth of it
    curve_sampled: bool = True
    #: every epoch keeps full GRPO's number of optimizer steps: a policy that plans a share
    #: ``s`` of the prompts rolls out ``s`` of each step's prompts (``grpo_train``)
    matched_steps: bool = False
    #: the Selector policies that also fill every batch with informative groups at this scale,
    #: as dynamic sampling does (``rl_grpo.make_policy``'s ``fill``); chosen on validation
    fill_policies: tuple[str, ...] = ()

    def with_(self, **changes) -> "RLConfig":
        return replace(self, **changes)


#: Per scale. The model (width 64, 2 layers, 4 heads, 0.1 M parameters) and the families
#: were set so that a warm start generalises at all: fine-tuned on half of the RL training
#: prompts instead of a split of its own, it memorised them and solved 0% of the held-out
#: ``rev``, ``add`` and ``mul`` prompts. ``sft_steps`` and ``lr`` were chosen on the
#: validation split at the quick scale, full GRPO: 150 warm-start steps leave ``rev`` to be
#: learned by RL (after 200 the warm start had learned it and full GRPO's held-out greedy
#: exact match reached its plateau within two of the twenty epochs); after 150, 49% of the
#: validation prompts are never solved in 8 samples, 43% sometimes and 8% always. GRPO's
#: learning rate: 1e-3 ended at 39.6% validation exact match over seeds 0-2 (42.5, 45.4,
#: 30.8), 5e-4 at 38.6% (45.8, 39.6, 30.4), a tie within the seeds' spread; 2e-3 fell behind
#: on seed 0 (45.0% against 47.9% for 1e-3, with the 200-step warm start). CPU time of one
#: whole run (warm start, RL, evaluations) on one thread: smoke about 7 s, quick about 55 s,
#: default about 2.6 min (measured on a shared 2-core machine).
#:
#: ``bench`` is what ``geko-bench --tasks rl-algo`` runs (five seeds, every policy): the
#: default scale's prompts for 6 epochs, the curve measured twice an epoch of full GRPO by
#: greedy exact match alone. Chosen on the validation split, seed 0: over the default
#: scale's 10 first epochs full GRPO's validation exact match rose 28.1 → 46.9% by 171 k
#: rollout tokens (5 epochs) and then held 45-50%, while a random half of the prompts
#: each epoch followed full's curve against rollout tokens (45.8% at 170 k); stopped at 6
#: epochs, full GRPO ends near its plateau and a half budget ends about 7 pt below it, so
#: spending rollouts on the wrong prompts shows.
#:
#: ``late`` (``geko-bench --tasks rl-late``) is the late-RL regime of real RL fine-tuning, where
#: most groups are zero-variance: the bench scale's prompts after a 300-step warm start, 10
#: epochs, matched steps (selection shrinks each step's rollouts, never the number of updates).
#: Chosen on the validation split, seed 0, full GRPO: after 300 warm-start steps the share of
#: zero-variance groups rises from 61% to 89% over the run (all wrong 38%, all right 47% at the
#: end) while validation exact match still moves (45.4% -> 48.1%). GEKO and GRESO (and the
#: random subset that gets GEKO's rollout share) also fill every batch with informative groups,
#: as dynamic sampling does: over seeds 0-4 their validation exact match ended at 50.1% and
#: 48.6% that way against 48.4% and 46.0% with matched steps alone, at about the same rollouts
#: (docs/tuning.md, "rl-late").
#: ``late-smoke`` is its seconds-long check.
SCALES: dict[str, RLConfig] = {
    "smoke": RLConfig(num_train=48, num_validation=24, num_test=24, num_warmup=120, width=32, sft_steps=40, epochs=2, batch_prompts=8, eval_every=4),
    "quick": RLConfig(num_train=600, num_validation=240, num_test=300),
    "default": RLConfig(num_train=1200, num_validation=480, num_test=600, epochs=30, eval_every=75),
    "bench": RLConfig(num_train=1200, num_validation=480, num_test=600, epochs=6, eval_every=19, curve_sampled=False),
    "late": RLConfig(
        num_train=1200, num_validation=480, num_test=600, sft_steps=300, epochs=10, eval_every=38, curve_sampled=False,
        matched_steps=True, fill_policies=("geko", "greso", "random_subset"),
    ),
    "late-smoke": RLConfig(
        num_train=48, num_validation=24, num_test=24, num_warmup=120, width=32, sft_steps=60, epochs=2, batch_prompts=8,
        eval_every=4, matched_steps=True, fill_policies=("geko", "greso", "random_subset"),
    ),
}


@functools.lru_cache(maxsize=4)
def _data(num_train: int, num_validation: int, num_test: int, num_warmup: int) -> RLData:
    return make_rl_data(num_train, num_validation, num_test, num_warmup=num_warmup, seed=0)


def load_data(cfg: RLConfig) -> RLData:
    """The prompts of ``cfg``'s sizes (data seed 0 at every run seed, as the fine-tuning tasks)."""
    return _data(cfg.num_train, cfg.num_validation, cfg.num_test, cfg.num_warmup)


def answer_tokens(split: RLSplit, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``[n, MAX_ANSWER]`` reference completions (answer, ``END``, ``PAD``) and their
    lengths."""
    out = torch.full((len(idx), MAX_ANSWER), PAD, dtype=torch.int64)
    lengths = torch.empty(len(idx), dtype=torch.int64)
    for row, i in enumerate(idx):
        ids = encode(split.answers[int(i)]) + [END]
        out[row, : len(ids)] = torch.tensor(ids)
        lengths[row] = len(ids)
    return out, lengths


_WARM: dict[tuple, dict[str, torch.Tensor]] = {}
_WARM_FIELDS = ("num_train", "num_validation", "num_test", "num_warmup", "width", "layers", "heads", "sft_steps", "sft_batch", "sft_lr")


def warm_start(cfg: RLConfig, seed: int) -> dict[str, torch.Tensor]:
    """The warm-started weights for ``cfg`` and ``seed`` (a copy; computed once per process)."""
    key = (tuple(asdict(cfg)[f] for f in _WARM_FIELDS), int(seed))
    if key not in _WARM:
        data = load_data(cfg)
        torch.manual_seed(seed)
        model = TinyLM(PROMPT_LEN + MAX_ANSWER, cfg.width, cfg.layers, cfg.heads)
        rng = np.random.default_rng([seed, 5])
        chosen = np.arange(len(data.warmup))
        completions, lengths = answer_tokens(data.warmup, chosen)
        prompts = torch.from_numpy(data.warmup.prompts)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
        for step in range(cfg.sft_steps):
            batch = torch.from_numpy(rng.choice(len(chosen), size=min(cfg.sft_batch, len(chosen)), replace=False))
            loss = supervised_loss(model, prompts[batch], completions[batch], lengths[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _WARM[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.clone() for k, v in _WARM[key].items()}


@torch.no_grad()
def split_figures(model: TinyLM, split: RLSplit, families: tuple[str, ...], G: int, generator: torch.Generator | None, *, chunk: int = 256) -> dict:
    """Greedy exact match and reward; with a ``generator``, also the mean reward and the pass
    rates over ``G`` samples at temperature 1, overall and per family."""
    n = len(split)
    greedy = np.empty(n, dtype=np.float32)
    sampled = np.empty((n, G), dtype=np.float32) if generator is not None else None
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        prompts = torch.from_numpy(split.prompts[idx])
        out = generate(model, prompts, 1, max_new_tokens=MAX_ANSWER, greedy=True)
        greedy[idx] = split.rewards(idx, out.tokens.numpy())[:, 0]
        if sampled is not None:
            out = generate(model, prompts, G, max_new_tokens=MAX_ANSWER, generator=generator)
            sampled[idx] = split.rewards(idx, out.tokens.numpy())

    def figures(mask: np.ndarray) -> dict:
        f = {"exact_%": 100.0 * float((greedy[mask] == 1.0).mean()), "greedy_reward": float(greedy[mask].mean())}
        if sampled is not None:
            rates = sampled[mask].mean(axis=1)
            f.update(sampled_reward=float(rates.mean()), never_solved=float((rates == 0).mean()), always_solved=float((rates == 1).mean()))
        return f

    result = figures(np.ones(n, dtype=bool))
    result["families"] = {name: figures(split.family == k) for k, name in enumerate(families)}
    return result


def evaluate(model: TinyLM, data: RLData, cfg: RLConfig, seed: int, *, sampled: bool = True, splits: tuple[str, ...] = ("validation", "test")) -> dict:
    """Held-out figures per split (``split_figures``); the sampling generator is seeded from
    ``seed`` alone, so evaluations do not disturb the training's random streams."""
    generator = torch.Generator().manual_seed(int(seed) * 104729 + 17) if sampled else None
    return {s: split_figures(model, getattr(data, s), data.families, cfg.eval_G, generator) for s in splits}
