"""The reductions of the loss operations, shared by the cross-entropy and the linear
cross-entropy: token losses to the loss (forward) and ``grad_output`` to the per-token
scale of the gradient (backward).

``w_s`` is the sample's weight (1 without ``sample_weight``), ``l_st`` a token loss (0 for a
token that does not count):

* ``"none"``: the token losses ``w_s * l_st``, ``[S, T]``: differentiable per token;
* ``"per_sample"``: ``w_s * mean_t l_st`` over the sample's valid tokens, ``[S]`` (0 for a
  sample without one);
* ``"sum"``: ``sum_s w_s sum_t l_st``;
* ``"mean"``: that sum over the batch's number of valid tokens (0 / 0 = NaN, as torch); with
  class weights (``geko_core.loss_options``) over the sum of the valid tokens' class weights
  instead (``mean_total``), as ``F.cross_entropy(weight=...)``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["REDUCTIONS", "reduce_host", "reduce_samples", "reduce_tokens", "sample_scale", "token_scale", "weight_tokens"]

REDUCTIONS = ("none", "sum", "mean", "per_sample")


def reduce_samples(
    token_loss_sum: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str,
    mean_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss from per-sample sums of token losses ``[S]`` and valid-token counts ``[S]``, for
    every reduction but ``"none"`` (which needs the token losses: ``reduce_tokens``).
    ``mean_total``: the divisor of ``"mean"`` when it is not the number of valid tokens (the
    sum of their class weights)."""
    weighted = token_loss_sum if weight is None else token_loss_sum * weight
    if reduction == "per_sample":
        return weighted / valid_tokens.clamp(min=1).to(weighted.dtype)
    total = weighted.sum()
    if reduction == "sum":
        return total
    divisor = valid_tokens.sum() if mean_total is None else mean_total
    return total / divisor.to(weighted.dtype)  # 0 / 0 = NaN, as F.cross_entropy


def weight_tokens(token_loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``"none"``: the ``[S, T]`` token losses, each sample's times its weight; a new tensor
    (never a view of ``token_loss``, which may be another output of the same Function)."""
    if weight is None:
        return token_loss.clone()
    return token_loss * weight.to(token_loss.dtype)[:, None]


def reduce_tokens(
    token_loss: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str,
    mean_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of any reduction from the ``[S, T]`` token losses (0 where not valid)."""
    if reduction == "none":
        return weight_tokens(token_loss, weight)
    per_sample = token_loss[:, 0] if token_loss.shape[1] == 1 else token_loss.sum(dim=1)
    return reduce_samples(per_sample, valid_tokens, weight, reduction, mean_total)


def _token_grad(grad_output: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``"none"``: d loss / d token_loss, float32 ``[S, T]``, from the upstream ``[S, T]``."""
    g = grad_output.to(torch.float32)
    if weight is not None:
        g = g * weight.to(torch.float32)[:, None]
    return g.contiguous()


def token_scale(
    grad_output: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str, tokens: int,
    mean_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d token_loss, float32 ``[S, T]`` (the kernels zero non-valid tokens);
    ``mean_total`` as in :func:`reduce_samples`."""
    if reduction == "none":
        return _token_grad(grad_output, weight)
    samples = valid_tokens.shape[0]
    g = grad_output.to(torch.float32)
    scale = torch.ones(samples, dtype=torch.float32, device=valid_tokens.device) if weight is None else weight
    if reduction == "per_sample":
        scale = g * scale / valid_tokens.clamp(min=1).to(torch.float32)
    elif reduction == "sum":
        scale = g * scale
    else:
        divisor = valid_tokens.sum() if mean_total is None else mean_total
        scale = g * scale / divisor.to(torch.float32)
    return scale[:, None].expand(samples, tokens).contiguous()


def reduce_host(
    losses: np.ndarray, valid_tokens: np.ndarray, weight: torch.Tensor | None, reduction: str
) -> tuple[torch.Tensor, int]:
    """``reduce_samples`` of the host arrays of CPU token losses ``[S, T]`` and valid-token
    counts ``[S]``, in float64 numpy (a few microseconds instead of several torch
    reductions), for ``"sum"`` and ``"mean"``; returns the float32 loss and the batch's
    valid-token count."""
    per_sample = losses[:, 0].astype(np.float64) if losses.shape[1] == 1 else losses.sum(axis=1, dtype=np.float64)
    value = float(per_sample.sum() if weight is None else np.dot(per_sample, weight.numpy().astype(np.float64)))
    total = int(valid_tokens.sum())  # int32 counts summed as int64
    if reduction == "mean":
        value = value / total if total else float("nan")  # 0 / 0 = NaN, as F.cross_entropy
    return torch.from_numpy(np.array(value, dtype=np.float32)), total


def sample_scale(
    grad_output: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str, total: int | None
) -> tuple[torch.Tensor, float]:
    """d loss / d token_loss as float32 ``[S]`` per sample (``[S, T]`` per token for
    ``"none"``) times a common factor (CPU; the kernel multiplies the two and zeroes
    non-valid tokens)."""
    if reduction == "none":
        return _token_grad(grad_output, weight), 1.0
    if reduction == "per_sample":
        scale = grad_output.to(torch.float32) / valid_tokens.clamp(min=1).to(torch.float32)
        return (scale if weight is None else scale * weight).contiguous(), 1.0
    g = float(grad_output)
    if reduction == "mean":
        g = g / total if total else float("nan")
    if weight is None:
        return torch.full((valid_tokens.shape[0],), g, dtype=torch.float32), 1.0
    return weight, g
