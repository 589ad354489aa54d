"""The clipped policy-gradient loss of a linear head in one chunked pass: ``linear_policy_loss``.

GRPO and PPO train on ``-min(ρ A, clip(ρ, 1 - ε_low, 1 + ε_high) A)`` per completion token,
with ``ρ = exp(log p - log p_old)``, averaged over the kept tokens. ``linear_logprobs`` gives
the log-probabilities without the ``[tokens, V]`` logits, but its backward forms every
chunk's logits again: four matrix products per chunk where the plain path takes three. Each
token's loss depends on its own log-probability only, so its gradient is known as soon as the
chunk's log-probabilities are: this pass computes them, the loss's ``d / d log p``, and the
gradients of the hidden states, the head weight and bias through the same chunk's logits
(``_logprob_chunks.policy_chunks``), which are formed once. The backward only scales the
gradients already made by the incoming gradient (docs/linear_loss.md, "A fused policy-gradient
loss").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._checks import check_real, check_same_device, check_tensor
from ._linear_chunks import default_chunk_rows
from ._logprob_chunks import policy_chunks, work_dtype
from .linear_logprobs import _prepare

__all__ = ["linear_policy_loss"]


class _Terms(NamedTuple):
    """The per-row inputs of the loss, over the kept rows."""

    advantages: torch.Tensor  # [R] work dtype
    old_logprobs: torch.Tensor | None  # [R] work dtype; None: the log-probabilities themselves
    clip_low: float
    clip_high: float
    count: int  # kept tokens: the mean's divisor (at least 1)


def _token_losses(logprobs: torch.Tensor, terms: _Terms, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_t, d loss_t / d logprob_t)`` of rows ``[start, stop)``, before the mean.

    ``ρ A`` is the smaller term (and carries the gradient ``-A ρ``) unless the ratio has left the
    clipping range on the side the advantage favours; there the clipped constant wins and the
    gradient is 0 (torch's ``minimum`` and ``clamp`` give the same)."""
    a = terms.advantages[start:stop]
    if terms.old_logprobs is None:
        ratio = torch.ones_like(logprobs)
    else:
        ratio = torch.exp(logprobs - terms.old_logprobs[start:stop])
    clipped = ratio.clamp(1.0 - terms.clip_low, 1.0 + terms.clip_high)
    loss = -torch.minimum(ratio * a, clipped * a)
    active = ratio * a <= clipped * a
    grad = torch.where(active, -a * ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))
    return loss, grad


class _LinearPolicyLoss(torch.autograd.Function):
    """``(loss, logprobs)``: the gradients are made in the forward; ``logprobs`` carries none."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: tuple
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, terms, temperature, chunk = args
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        token_loss = torch.empty_like(ids, dtype=terms.advantages.dtype)

        def token_grad(start: int, stop: int, logprobs: torch.Tensor) -> torch.Tensor:
            loss, grad = _token_losses(logprobs, terms, start, stop)
            token_loss[start:stop] = loss
            return grad / terms.count

        with torch.no_grad():
            logprobs, grads = policy_chunks(
                hidden2.detach(), weight.detach(), None if bias is None else bias.detach(), ids, temperature, chunk,
                token_grad if any(need) else None, need,
            )
            if not any(need):
                token_loss = _token_losses(logprobs, terms, 0, ids.shape[0])[0]
            loss = token_loss.sum(dtype=torch.float64).div(terms.count).to(torch.float64 if hidden2.dtype == torch.float64 else torch.float32)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.mark_non_differentiable(logprobs)
        ctx.set_materialize_grads(False)
        return loss, logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor | None, _: Any):  # type: ignore[override]
        if grad_loss is None:
            return None, None, None, None
        out = []
        for grad in ctx.saved_tensors:
            if grad is not None and not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
                grad = grad * grad_loss.to(grad.dtype)
            out.append(grad)
        return out[0], out[1], out[2], None


def _per_row(value: torch.Tensor, name: str, out_shape: tuple[int, ...], hidden: torch.Tensor) -> torch.Tensor:
    """``value`` as one number per row (a ``[B]`` value per sequence broadcast over ``T``)."""
    check_tensor(value, name, dtype="floating")
    check_same_device(value, name, hidden, "hidden")
    shape = tuple(value.shape)
    if shape == out_shape:
        return value.reshape(-1)
    if len(out_shape) == 2 and shape == out_shape[:1]:
        return value[:, None].expand(out_shape).reshape(-1)
    allowed = f"{out_shape}" + (f" or {out_shape[:1]} (one per sequence)" if len(out_shape) == 2 else "")
    raise ValueError(f"{name} must have shape {allowed}, got {shape}")


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped policy-gradient (GRPO/PPO) loss of a linear head, token-mean over the kept
    tokens, with its gradients made in the same chunked pass as the log-probabilities.

    Per kept token ``t`` of advantage ``A_t``: ``loss_t = -min(ρ_t A_t, clip(ρ_t, 1 - ε_low,
    1 + ε_high) A_t)`` with ``ρ_t = exp(log p_t - old_logprobs_t)`` and
    ``log p_t = log_softmax((hidden @ weight.T + bias) / temperature)[t, token_ids_t]``; the
    loss is ``Σ_t loss_t / max(kept tokens, 1)``. Equal, up to rounding, to
    ``linear_logprobs`` followed by that formula in torch, in less time (the logits of each
    chunk are formed once, not again in the backward) and the same memory.

    Args:
        hidden, weight, token_ids, bias, temperature, mask, ignore_index, chunk_size, backend:
            as :func:`~geko_core.linear_logprobs` (the ``"reference"`` backend is plain torch on
            the materialised logits; under torch.compile use ``linear_logprobs`` and write the
            loss in torch). The pass needs one ``[chunk, V]`` work buffer where
            ``linear_logprobs`` needs two, so the default chunk is twice as tall.
        advantages: floating, one per token (``hidden.shape[:-1]``) or, for ``[B, T, d]``
            hidden states, one per sequence (``[B]``).
        old_logprobs: floating, ``hidden.shape[:-1]``: the log-probabilities under the policy
            that sampled the tokens (no gradient). None: the current ones, detached (ρ = 1,
            the single-update GRPO step; the gradient is ``-A ∇ log p``).
        clip_eps: ``ε_low`` (and ``ε_high`` unless given), in [0, 1).
        clip_eps_high: ``ε_high`` >= 0 (DAPO's "clip higher"); None: ``clip_eps``.

    Returns:
        ``(loss, logprobs)``: the scalar loss (float32, float64 for float64 inputs), differentiable with respect to
        ``hidden``, ``weight`` and ``bias``; the per-token log-probabilities (float32, float64
        for float64 inputs, 0 where left out, no gradient), for logging or a KL estimate.

    Raises:
        TypeError, ValueError: as ``linear_logprobs``; also advantages or old_logprobs of
            the wrong type, shape or device, clip values out of range, a call under
            torch.compile.
    """
    prepared, temperature = _prepare(hidden, weight, token_ids, bias, mask, ignore_index, temperature, chunk_size, backend)
    if chunk_size is None:
        # one work-dtype buffer (and the 16-bit logits) per chunk: twice the rows linear_logprobs takes
        per_class = 1 if work_dtype(hidden.dtype) == hidden.dtype else 2
        rows = prepared.hidden2.shape[0]
        chunk = default_chunk_rows(rows, per_class * weight.shape[0], work_dtype(hidden.dtype), hidden.device)
        prepared = prepared._replace(chunk=min(chunk, max(rows, 1)))
    if prepared.backend == "op":
        raise ValueError(
            "linear_policy_loss does not run under torch.compile: use linear_logprobs and write the loss in torch"
        )
    clip_low = check_real(clip_eps, "clip_eps")
    clip_high = clip_low if clip_eps_high is None else check_real(clip_eps_high, "clip_eps_high")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_low}")
    if not 0.0 <= clip_high < float("inf"):
        raise ValueError(f"clip_eps_high must be finite and >= 0, got {clip_high}")
    work = work_dtype(hidden.dtype)
    rows_a = _per_row(advantages, "advantages", prepared.out_shape, hidden).detach().to(work)
    rows_old = None
    if old_logprobs is not None:
        check_tensor(old_logprobs, "old_logprobs", dtype="floating")
        check_same_device(old_logprobs, "old_logprobs", hidden, "hidden")
        if tuple(old_logprobs.shape) != prepared.out_shape:
            raise ValueError(f"old_logprobs must have shape {prepared.out_shape}, got {tuple(old_logprobs.shape)}")
        rows_old = old_logprobs.detach().reshape(-1).to(work)
    hidden2, ids, keep = prepared.hidden2, prepared.ids, prepared.keep
    rows = None
    if keep is not None:  # only the kept rows run; index_select routes the hidden gradient back
        rows = keep.nonzero().squeeze(1)
        hidden2, ids, rows_a = hidden2.index_select(0, rows), ids.index_select(0, rows), rows_a.index_select(0, rows)
        rows_old = None if rows_old is None else rows_old.index_select(0, rows)
    terms = _Terms(rows_a, rows_old, clip_low, clip_high, max(int(ids.shape[0]), 1))
    if prepared.backend == "reference":
        loss, logprobs = _reference(hidden2, weight, bias, ids, terms, temperature)
    else:
        loss, logprobs = _LinearPolicyLoss.apply(hidden2, weight, bias, (ids, terms, temperature, prepared.chunk))
    if rows is not None:
        logprobs = torch.zeros(keep.shape, dtype=logprobs.dtype, device=logprobs.device).index_put((rows,), logprobs)
    return loss, logprobs.view(prepared.out_shape)


def _reference(hidden2, weight, bias, ids, terms: _Terms, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch on the materialised logits, differentiable (gradcheck in float64)."""
    logits = hidden2 @ weight.T
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits.to(work_dtype(hidden2.dtype)) / temperature, dim=-1)
    logprobs = logp.gather(1, ids.unsqueeze(1)).squeeze(1)
    old = logprobs.detach() if terms.old_logprobs is None else terms.old_logprobs
    ratio = torch.exp(logprobs - old)
    a = terms.advantages
    token_loss = -torch.minimum(ratio * a, ratio.clamp(1.0 - terms.clip_low, 1.0 + terms.clip_high) * a)
    loss = token_loss.sum() / terms.count
    return loss.to(torch.float64 if hidden2.dtype == torch.float64 else torch.float32), logprobs.detach()
