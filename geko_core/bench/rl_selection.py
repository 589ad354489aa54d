"""The ``Selector`` in rewards mode as ``rl-algo``'s selection policy (``rl_grpo.LoopPolicy``).

Each epoch the loop takes the Selector's plan from ``sel.sampler`` and rolls out its prompts
in order; after every rollout it calls ``sel.observe_rewards(idx, rewards, lengths)`` and
trains the groups of ``stats.keep``. A policy whose ``filter_groups`` is set (dynamic
sampling) has the loop draw again from the plan until the batch holds ``B`` informative
groups. GAIN-RL's angles come from a pre-pass over every training prompt with the policy
model (``TinyLM.hidden``, the final normalised hidden states of the prompt's positions)
before the first epoch, as GAIN-RL orders the data before training; the pre-pass's prompt
tokens and seconds are counted (``prepass_tokens``, ``prepass_seconds``; the loop counts the
seconds as selection time).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

__all__ = ["SELECTOR_POLICIES", "SelectorPolicy", "selector_options"]

#: rewards-mode policies run through the Selector
SELECTOR_POLICIES = ("geko", "greso", "gainrl", "dynamic", "random_subset")

_CHUNK = 512


def selector_options(policy: str, num_prompts: int, budget: float = 0.5, *, fill: bool = False) -> dict[str, Any] | None:
    """rl-algo's constructor options of a Selector policy: ``budget`` (share of the prompts
    per epoch) for ``random_subset``, the library's defaults otherwise; ``fill``: the policy
    also fills each batch with informative groups (``filter_groups``; ``dynamic`` always does)."""
    options: dict[str, Any] = {"budget": budget} if policy == "random_subset" else {}
    if fill and policy != "dynamic":
        options["filter_groups"] = True
    return options or None


class SelectorPolicy:
    """A ``Selector(num_prompts, name, signal="rewards")`` driving the GRPO loop.

    Args:
        name: a rewards-mode policy name of ``geko_core.policies``.
        num_prompts: training prompts.
        seed: the Selector's seed (its plans).
        epochs: the run's epochs (the Selector's progress).
        options: the policy's constructor options.
    """

    def __init__(self, name: str, num_prompts: int, seed: int, epochs: int, *, options: dict[str, Any] | None = None) -> None:
        from ..selector import Selector

        self.selector = Selector(num_prompts, policy=name, signal="rewards", epochs=epochs, seed=seed, policy_options=options)
        self.filter_zero_variance = bool(getattr(self.selector.policy, "filter_groups", False))
        self.order = np.empty(0, dtype=np.int64)
        self.position = 0
        self.prepass_tokens = 0
        self.prepass_seconds = 0.0

    @torch.no_grad()
    def prepare_epoch(self, epoch: int, model: torch.nn.Module, split: Any) -> None:
        """GAIN-RL: the angle concentration of every prompt from the policy model, once."""
        policy = self.selector.policy
        if policy.name != "gainrl" or epoch != 0:
            return
        from ..angle import angle_concentration

        began = time.perf_counter()
        was_training = model.training
        model.eval()
        n = len(split)
        for start in range(0, n, _CHUNK):
            idx = np.arange(start, min(n, start + _CHUNK), dtype=np.int64)
            states = model.hidden(torch.from_numpy(split.prompts[idx]))
            policy.set_angles(idx, angle_concentration(states).concentration)
        model.train(was_training)
        self.prepass_tokens += int(split.prompts.size)
        self.prepass_seconds += time.perf_counter() - began
        policy.count_prepass(n, int(split.prompts.size))

    def begin_epoch(self, epoch: int) -> None:
        self.order = np.fromiter(iter(self.selector.sampler), dtype=np.int64)
        self.position = 0

    def epoch_share(self) -> float:
        """The share of the training prompts in the epoch's plan."""
        return len(self.order) / self.selector.num_samples

    def choose(self, step: int, count: int) -> np.ndarray:
        taken = self.order[self.position : self.position + count]
        self.position += len(taken)
        return taken

    def report(self, indices: np.ndarray, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        stats = self.selector.observe_rewards(torch.from_numpy(np.asarray(indices, dtype=np.int64)), torch.from_numpy(np.asarray(rewards, dtype=np.float32)), torch.from_numpy(np.asarray(lengths)))
        keep = stats.keep
        return keep.numpy() if isinstance(keep, torch.Tensor) else np.asarray(keep, dtype=bool)

    def metrics(self) -> dict[str, Any]:
        """The Selector's metrics (skipped prompts, buckets, rollouts) and the pre-pass cost."""
        out = {k: v for k, v in self.selector.metrics().items() if isinstance(v, (int, float, str, bool))}
        out["prepass_tokens"] = self.prepass_tokens
        out["prepass_seconds"] = self.prepass_seconds
        return out
