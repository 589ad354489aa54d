"""The policy model of ``rl-algo``: a small causal transformer over ``rl_data.VOCAB`` with a KV
cache for sampling.

* ``TinyLM``: pre-norm blocks, learned positions, ``forward(tokens, cache)`` returns the logits
  and the cache extended by ``tokens`` (a cached call takes one new token per row).
  ``hidden(tokens)`` gives the final normalised hidden states (for hidden-state methods such
  as GAIN-RL's angle concentration).
* ``generate``: ``G`` completions per prompt, sampled at a temperature (or greedy), through the
  cache; each row stops at ``END``. It returns the completions, their lengths (``END``
  included) and the rollout tokens, the count of tokens actually generated.
* ``completion_logprobs``: the log-probabilities of given completions under teacher forcing,
  at a temperature, from the final hidden states and the head through the fused
  policy-gradient path (``geko_core.linear_logprobs``: chunked, the ``[N, T, V]`` logits never
  exist); the supervised warm start trains through it.
* ``completion_policy_loss``: GRPO's clipped loss of completions through
  ``geko_core.linear_policy_loss`` (the loss's gradients made in the same chunked pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..linear_logprobs import linear_logprobs
from ..linear_policy_loss import linear_policy_loss
from .rl_data import END, PAD, VOCAB

__all__ = ["Rollout", "TinyLM", "completion_logprobs", "completion_policy_loss", "generate", "supervised_loss", "token_mask"]

Cache = list[tuple[torch.Tensor, torch.Tensor]]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        # A cached call holds one query per row, which may see every key: no mask needed.
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, t, w))
        return x + self.mlp(self.norm2(x)), (k, v)


class TinyLM(nn.Module):
    """A causal transformer over ``VOCAB`` (``width`` wide, ``layers`` blocks)."""

    def __init__(self, max_len: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.max_len = max_len
        self.embed = nn.Embedding(len(VOCAB), width)
        # Random positions: zero-initialised ones slow down positional tasks (sft.py measured it).
        self.position = nn.Parameter(torch.randn(max_len, width) * 0.5)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(VOCAB))

    def _run(self, tokens: torch.Tensor, cache: Cache | None) -> tuple[torch.Tensor, Cache]:
        start = 0 if cache is None else cache[0][0].shape[2]
        t = tokens.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"{start + t} positions exceed the model's max_len {self.max_len}")
        if cache is not None and t != 1:
            raise ValueError(f"a cached call takes one token per row, got {t}")
        h = self.embed(tokens) + self.position[start : start + t]
        new_cache: Cache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.norm(h), new_cache

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """float ``[N, T, width]``: the final normalised hidden states of ``tokens``."""
        return self._run(tokens, None)[0]

    def forward(self, tokens: torch.Tensor, cache: Cache | None = None) -> tuple[torch.Tensor, Cache]:
        """Logits ``[N, T, V]`` of ``tokens`` ``[N, T]`` after ``cache``'s positions, and the
        cache extended by them."""
        h, new_cache = self._run(tokens, cache)
        return self.head(h), new_cache


@dataclass
class Rollout:
    """``G`` completions of each of ``B`` prompts, rows prompt-major (row ``b * G + g``).

    Attributes:
        tokens: int64 ``[B*G, T]``: completion tokens, ``PAD`` after ``END``.
        lengths: int64 ``[B*G]``: tokens up to and including ``END`` (``T`` if none came).
        logprobs: float32 ``[B*G, T]``: the sampled tokens' log-probabilities under the
            sampling distribution (0 after the end).
        generated_tokens: ``lengths.sum()``, the rollout tokens.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor
    generated_tokens: int


@torch.no_grad()
def generate(
    model: TinyLM,
    prompts: torch.Tensor,
    G: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``G`` completions of each prompt through the KV cache.

    Args:
        model: the policy.
        prompts: int64 ``[B, P]``, left-padded to one width.
        G: completions per prompt.
        max_new_tokens: the completion limit ``T``.
        temperature: softmax temperature of the sampling (ignored when ``greedy``).
        greedy: take the argmax instead of sampling.
        generator: the sampling's random generator (deterministic given its state).

    Raises:
        ValueError: ``G`` or ``max_new_tokens`` below 1, a non-positive temperature, or
            prompts that are not a 2-D integer tensor.
    """
    if prompts.dim() != 2 or prompts.dtype != torch.int64:
        raise ValueError(f"prompts must be int64 [B, P], got {prompts.dtype} {list(prompts.shape)}")
    if G < 1 or max_new_tokens < 1:
        raise ValueError(f"G and max_new_tokens must be at least 1, got {G} and {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    rows = prompts.repeat_interleave(G, dim=0)
    n = rows.shape[0]
    tokens = torch.full((n, max_new_tokens), PAD, dtype=torch.int64)
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32)
    done = torch.zeros(n, dtype=torch.bool)
    lengths = torch.full((n,), max_new_tokens, dtype=torch.int64)
    logits, cache = model(rows)
    logits = logits[:, -1]
    for step in range(max_new_tokens):
        scaled = logits.float() if greedy else logits.float() / temperature
        logp = torch.log_softmax(scaled, dim=-1)
        if greedy:
            chosen = logp.argmax(dim=-1)
        else:
            chosen = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        live = ~done
        tokens[live, step] = chosen[live]
        logprobs[live, step] = logp[live].gather(1, chosen[live, None]).squeeze(1)
        ended = live & (chosen == END)
        lengths[ended] = step + 1
        done |= ended
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        # Finished rows keep being computed (a pad token): batching them out is not worth it
        # at this size; their outputs are discarded.
        logits, cache = model(torch.where(done, PAD, chosen)[:, None], cache)
        logits = logits[:, -1]
    return Rollout(tokens, lengths, logprobs, int(lengths.sum()))


def completion_logprobs(
    model: TinyLM,
    prompts: torch.Tensor,
    completions: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """float32 ``[N, T]``: log-probabilities of ``completions`` ``[N, T]`` after ``prompts``
    ``[N, P]`` under teacher forcing, under ``softmax(head(hidden) / temperature)``.

    The values of ``log_softmax(model.head(h) / temperature).gather(...)``, computed by
    ``linear_logprobs`` from the final hidden states ``h`` and the head's weight and bias, in
    chunks (no ``[N, T, V]`` logits), differentiable with respect to the model's parameters.

    Args:
        model: the policy.
        prompts: int64 ``[N, P]``.
        completions: int64 ``[N, T]``.
        mask: optional bool ``[N, T]``: positions left out hold 0 and cost nothing (e.g.
            ``token_mask(lengths, T)``); without it every position is computed.
        temperature: the sampling temperature the completions were drawn at.
    """
    logprobs, _ = linear_logprobs(
        _completion_hidden(model, prompts, completions), model.head.weight, completions, bias=model.head.bias,
        temperature=temperature, entropy=False, mask=mask,
    )
    return logprobs


def completion_policy_loss(
    model: TinyLM,
    prompts: torch.Tensor,
    completions: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_eps: float = 0.2,
) -> torch.Tensor:
    """GRPO's clipped policy-gradient loss of ``completions`` (token-mean over ``mask``), by
    ``linear_policy_loss``: each chunk's head logits are formed once, its gradients made in
    the same pass. ``advantages``: ``[N]``, one per completion; ``old_logprobs``: ``[N, T]``
    under the sampling policy (None: the current ones, detached)."""
    loss, _ = linear_policy_loss(
        _completion_hidden(model, prompts, completions), model.head.weight, completions, advantages,
        old_logprobs=old_logprobs, bias=model.head.bias, temperature=temperature, clip_eps=clip_eps, mask=mask,
    )
    return loss


def _completion_hidden(model: TinyLM, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """The final hidden states at the positions that predict the completion tokens, ``[N, T, d]``."""
    p = prompts.shape[1]
    return model.hidden(torch.cat((prompts, completions[:, :-1]), dim=1))[:, p - 1 :]


def token_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """bool ``[N, width]``: the positions of each completion up to and including its end."""
    return torch.arange(width)[None, :] < lengths[:, None]


def supervised_loss(model: TinyLM, prompts: torch.Tensor, completions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the completion tokens (``END`` included)."""
    mask = token_mask(lengths, completions.shape[1])
    return -(completion_logprobs(model, prompts, completions, mask=mask) * mask).sum() / mask.sum()
