"""The chunk loop of ``linear_logprobs`` (docs/linear_loss.md, "Per-token log-probabilities
for policy gradients"): the forward pass (log-probabilities, entropy and log-sum-exp of every
row) and the backward pass (each chunk's logits formed again and turned into the gradients of
the hidden states, the head weight and bias), through reused ``[chunk, V]`` buffers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._chunk_products import ChunkProducts

__all__ = ["backward_chunks", "forward_chunks", "policy_chunks", "work_dtype"]

def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-row pass and of the outputs: float64 stays float64, the rest is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Buffers:
    """The reused ``[chunk, V]`` buffers: the logits in the input dtype (16-bit inputs only;
    float32 and float64 logits are formed directly in ``z``), ``z`` and ``p`` in the work dtype
    (``p`` made on first use)."""

    def __init__(self, chunk: int, weight: torch.Tensor, dtype: torch.dtype) -> None:
        work, vocab, device = work_dtype(dtype), weight.shape[0], weight.device
        self.products = ChunkProducts(weight, chunk)
        self.logits = torch.empty((chunk, vocab), dtype=dtype, device=device) if dtype != work else None
        self.z = torch.empty((chunk, vocab), dtype=work, device=device)
        self._p_shape = (chunk, vocab)
        self._p: torch.Tensor | None = None

    def p(self, rows: int) -> torch.Tensor:
        """The second work-dtype buffer (made on first use: the fused loss needs only ``z``)."""
        if self._p is None:
            self._p = torch.empty(self._p_shape, dtype=self.z.dtype, device=self.z.device)
        return self._p[:rows]

    def scaled_logits(self, hidden_chunk: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """``z = (hidden_chunk @ weight.T + bias) / temperature`` in the work dtype: the
        product and the sum in the input dtype (as the plain path computes them), the division
        in the work dtype."""
        rows = hidden_chunk.shape[0]
        z = self.z[:rows]
        if self.logits is None:
            self.products.logits(hidden_chunk, z)
            if bias is not None:
                z.add_(bias)
        else:
            logits = self.products.logits(hidden_chunk, self.logits[:rows], scratch=z)
            if bias is not None:
                logits.add_(bias)
            z.copy_(logits)
        if temperature != 1.0:
            z.div_(temperature)
        return z


def _softmax_terms_in_place(z: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z`` becomes ``z - max`` and ``e`` ``exp(z - max)``; returns the rows' ``max`` and
    ``log Σ exp(z - max)`` (``[rows, 1]`` each), so that ``log p = z - log_total`` and
    ``p = e / exp(log_total)``: torch's softmax arithmetic, accurate for large logits, without
    normalising the buffers. A row whose logits are all ``-inf`` has max 0 here (its values
    become NaN, as torch's log_softmax gives)."""
    top = z.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
    z.sub_(top)
    torch.exp(z, out=e)
    return top, e.sum(dim=1, keepdim=True).log_()


def _clamp_log_zero(logp: torch.Tensor) -> None:
    """A ``-inf`` log-probability (a ``-inf`` logit, e.g. a masked class) becomes the dtype's
    lowest finite value, so that ``p · log p`` is 0 for it, not NaN (NaN stays NaN)."""
    logp.clamp_(min=torch.finfo(logp.dtype).min)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` without a ``[rows, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


class _Grads(NamedTuple):
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def forward_chunks(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float,
    chunk: int,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs [R], entropy [R] (empty without entropy), lse [R])`` of the ``R`` rows, in
    the work dtype, chunk by chunk. ``lse`` is the log-sum-exp of the scaled logits ``z``."""
    rows, vocab = hidden2.shape[0], weight.shape[0]
    device, work = hidden2.device, work_dtype(hidden2.dtype)
    logprobs = torch.empty((rows,), dtype=work, device=device)
    entropies = torch.empty((rows if entropy else 0,), dtype=work, device=device)
    lse = torch.empty((rows,), dtype=work, device=device)
    if rows == 0:
        return logprobs, entropies, lse
    buffers = _Buffers(min(chunk, rows), weight, hidden2.dtype)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        z = buffers.scaled_logits(hidden2[start:stop], bias, temperature)
        e = buffers.p(stop - start)
        top, log_total = _softmax_terms_in_place(z, e)  # z is now z - max
        lse[start:stop] = (top + log_total).squeeze(1)
        log_total = log_total.squeeze(1)
        logprobs[start:stop] = z.gather(1, ids[start:stop].unsqueeze(1)).squeeze(1).sub_(log_total)
        if entropy:
            # H = -Σ p log p = log Σe - Σ e (z - max) / Σe, with p = e / Σe
            _clamp_log_zero(z)
            entropies[start:stop] = log_total - _row_dot(e, z) / log_total.exp()
    return logprobs, entropies, lse


def _chunk_gradients(
    buffers: _Buffers,
    grad: torch.Tensor,
    hidden_chunk: torch.Tensor,
    start: int,
    stop: int,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
) -> None:
    """A chunk's ``d / d logits`` (``grad``, work dtype) into the hidden gradient rows
    ``[start, stop)`` and the weight and bias accumulators (those not None)."""
    grad_work = grad
    if buffers.logits is not None and not buffers.products.wide:
        grad = buffers.logits[: stop - start].copy_(grad)  # 16-bit products take a 16-bit gradient
    grad_h_rows = None if grad_h is None else grad_h[start:stop]
    buffers.products.add_gradients(grad, hidden_chunk, grad_h_rows, grad_w, grad_b, grad_work)


def _gradient_buffers(
    rows: int, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, need: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The hidden gradient (input dtype) and the weight and bias accumulators (work dtype:
    16-bit inputs accumulate in float32) that ``need`` asks for."""
    need_h, need_w, need_b = need
    vocab, dim, device, acc = weight.shape[0], weight.shape[1], weight.device, work_dtype(dtype)
    grad_h = torch.empty((rows, dim), dtype=dtype, device=device) if need_h else None
    grad_w = torch.zeros((vocab, dim), dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros((vocab,), dtype=acc, device=device) if need_b and bias is not None else None
    return grad_h, grad_w, grad_b


def _grads(grad_h, grad_w, grad_b, weight: torch.Tensor, bias: torch.Tensor | None) -> _Grads:
    return _Grads(
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


def policy_chunks(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float,
    chunk: int,
    token_grad: Callable[[int, int, torch.Tensor], torch.Tensor] | None,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, _Grads]:
    """``(logprobs [R], gradients)`` in one pass: each chunk's log-probabilities, then at once
    the gradients of ``Σ_t loss_t(logprob_t)`` through that chunk's logits, so the logits are
    formed once (three products per chunk, where ``forward_chunks`` + ``backward_chunks``
    take four). ``token_grad(start, stop, logprobs)`` gives ``d loss / d logprob`` of rows
    ``[start, stop)`` (work dtype) from their log-probabilities; None: no gradient."""
    rows = hidden2.shape[0]
    dtype, work = hidden2.dtype, work_dtype(hidden2.dtype)
    logprobs = torch.empty((rows,), dtype=work, device=hidden2.device)
    if token_grad is None:
        need = (False, False, False)
    grad_h, grad_w, grad_b = _gradient_buffers(rows, weight, bias, dtype, need)
    if rows == 0:
        if grad_h is not None:
            grad_h.zero_()
        return logprobs, _grads(grad_h, grad_w, grad_b, weight, bias)
    buffers = _Buffers(min(chunk, rows), weight, dtype)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        hidden_chunk = hidden2[start:stop]
        z = buffers.scaled_logits(hidden_chunk, bias, temperature)
        # One buffer: z - max, the label's entry kept, then exp in place, its row sums.
        top = z.amax(dim=1, keepdim=True)
        z.sub_(torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device)))
        chunk_ids = ids[start:stop].unsqueeze(1)
        z_label = z.gather(1, chunk_ids).squeeze(1)
        total = z.exp_().sum(dim=1, keepdim=True)  # z now holds e = exp(z - max)
        logprobs[start:stop] = z_label.sub_(total.log().squeeze(1))
        if token_grad is None:
            continue
        # d loss / d z_j = g (δ_jy - p_j), with 1/τ folded into g and p = e / Σe: one pass
        g = (token_grad(start, stop, logprobs[start:stop]).to(work) / temperature).unsqueeze(1)
        grad = z.mul_(g.neg().div_(total))
        grad.scatter_add_(1, chunk_ids, g)
        _chunk_gradients(buffers, grad, hidden_chunk, start, stop, grad_h, grad_w, grad_b)
    return logprobs, _grads(grad_h, grad_w, grad_b, weight, bias)


def backward_chunks(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float,
    chunk: int,
    lse: torch.Tensor,
    entropies: torch.Tensor | None,
    grad_logprobs: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    need: tuple[bool, bool, bool],
) -> _Grads:
    """The gradients of ``Σ g_lp · logprobs + Σ g_H · entropy`` with respect to ``hidden2``,
    ``weight`` and ``bias`` (those ``need`` asks for), forming each chunk's logits again.

    With ``z = logits / τ``, ``p = softmax(z)`` and ``H = -Σ_j p_j log p_j``:
    ``d log p_y / d z_j = δ_jy - p_j`` and ``d H / d z_j = -p_j (log p_j + H)``, so the
    gradient of the logits of a row is ``(g_lp (δ_jy - p_j) - g_H p_j (log p_j + H)) / τ``.
    """
    rows = hidden2.shape[0]
    dtype, work = hidden2.dtype, work_dtype(hidden2.dtype)
    grad_h, grad_w, grad_b = _gradient_buffers(rows, weight, bias, dtype, need)
    if rows > 0 and (grad_h is not None or grad_w is not None or grad_b is not None):
        # 1/τ folded into the per-row factors
        g_lp = None if grad_logprobs is None else (grad_logprobs.to(work) / temperature).unsqueeze(1)
        g_h = None if grad_entropy is None else (grad_entropy.to(work) / temperature).unsqueeze(1)
        buffers = _Buffers(min(chunk, rows), weight, dtype)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            count = stop - start
            hidden_chunk = hidden2[start:stop]
            logp = buffers.scaled_logits(hidden_chunk, bias, temperature)
            logp.sub_(lse[start:stop].unsqueeze(1))
            p = torch.exp(logp, out=buffers.p(count))
            if g_h is not None:
                # logp becomes -g_H p log p - p (g_H H + g_lp): the gradient but for the one-hot
                # term (p log p first: 0 for a class of probability 0 whatever g_H)
                _clamp_log_zero(logp)
                row_h = g_h[start:stop]
                shift = row_h * entropies[start:stop].unsqueeze(1)
                if g_lp is not None:
                    shift = shift + g_lp[start:stop]
                logp.mul_(p).mul_(row_h.neg()).addcmul_(p, shift.neg_())
                grad = logp
            else:
                grad = p.mul_(g_lp[start:stop].neg())
            if g_lp is not None:
                grad.scatter_add_(1, ids[start:stop].unsqueeze(1), g_lp[start:stop])
            _chunk_gradients(buffers, grad, hidden_chunk, start, stop, grad_h, grad_w, grad_b)
    elif grad_h is not None:
        grad_h.zero_()
    return _grads(grad_h, grad_w, grad_b, weight, bias)
