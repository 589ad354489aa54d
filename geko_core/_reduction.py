"""The reductions of the loss operations, shared by the cross-entropy and the linear
cross-entropy: token losses to the loss (forward) and ``grad_output`` to the per-token
scale of the gradient (backward)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["REDUCTIONS", "reduce_host", "reduce_samples", "sample_scale", "token_scale"]

REDUCTIONS = ("none", "sum", "mean")


def reduce_samples(
    token_loss_sum: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """Loss from per-sample sums of token losses ``[S]`` and valid-token counts ``[S]``."""
    weighted = token_loss_sum if weight is None else token_loss_sum * weight
    if reduction == "none":
        return weighted / valid_tokens.clamp(min=1).to(weighted.dtype)
    total = weighted.sum()
    if reduction == "sum":
        return total
    return total / valid_tokens.sum().to(weighted.dtype)  # 0 / 0 = NaN, as F.cross_entropy


def token_scale(
    grad_output: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str, tokens: int
) -> torch.Tensor:
    """d loss / d token_loss, float32 ``[S, T]`` (the kernels zero non-valid tokens)."""
    samples = valid_tokens.shape[0]
    g = grad_output.to(torch.float32)
    scale = torch.ones(samples, dtype=torch.float32, device=valid_tokens.device) if weight is None else weight
    if reduction == "none":
        scale = g * scale / valid_tokens.clamp(min=1).to(torch.float32)
    elif reduction == "sum":
        scale = g * scale
    else:
        scale = g * scale / valid_tokens.sum().to(torch.float32)
    return scale[:, None].expand(samples, tokens).contiguous()


def reduce_host(
    losses: np.ndarray, valid_tokens: np.ndarray, weight: torch.Tensor | None, reduction: str
) -> tuple[torch.Tensor, int]:
    """``reduce_samples`` of the host arrays of CPU token losses ``[S, T]`` and valid-token
    counts ``[S]``, in float64 numpy (a few microseconds instead of several torch
    reductions); returns the float32 loss and the batch's valid-token count."""
    per_sample = losses[:, 0].astype(np.float64) if losses.shape[1] == 1 else losses.sum(axis=1, dtype=np.float64)
    value = float(per_sample.sum() if weight is None else np.dot(per_sample, weight.numpy().astype(np.float64)))
    total = int(valid_tokens.sum())  # int32 counts summed as int64
    if reduction == "mean":
        value = value / total if total else float("nan")  # 0 / 0 = NaN, as F.cross_entropy
    return torch.from_numpy(np.array(value, dtype=np.float32)), total


def sample_scale(
    grad_output: torch.Tensor, valid_tokens: torch.Tensor, weight: torch.Tensor | None, reduction: str, total: int | None
) -> tuple[torch.Tensor, float]:
    """d loss / d token_loss per sample as float32 ``[S]`` times a common factor (CPU; the
    kernel multiplies the two and zeroes non-valid tokens)."""
    if reduction == "none":
        scale = grad_output.to(torch.float32) / valid_tokens.clamp(min=1).to(torch.float32)
        return (scale if weight is None else scale * weight).contiguous(), 1.0
    g = float(grad_output)
    if reduction == "mean":
        g = g / total if total else float("nan")
    if weight is None:
        return torch.full((valid_tokens.shape[0],), g, dtype=torch.float32), 1.0
    return weight, g
