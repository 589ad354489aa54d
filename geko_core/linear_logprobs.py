"""Per-token log-probabilities and entropy of a linear head: ``linear_logprobs``.

What a policy-gradient loss (GRPO, PPO, REINFORCE) consumes: for every token, the
log-probability of a given token id and the entropy of the distribution
``softmax((hidden @ weight.T + bias) / temperature)``, both differentiable with respect to
``hidden``, ``weight`` and ``bias``, without ever holding the ``[tokens, V]`` logits. The rows
run in chunks (``geko_core._logprob_chunks``) through reused ``[chunk, V]`` buffers: the
forward keeps only each row's log-sum-exp and entropy (two floats), and the backward forms
each chunk's logits again (docs/linear_loss.md, "Per-token log-probabilities for policy
gradients").

Masked tokens (``mask`` False, or a token id equal to ``ignore_index``) are left out before
the chunk loop: they cost nothing, get 0 in both outputs and no gradient.

The backend named by ``_backend.resolve_backend`` picks the path: ``"cpp"`` and ``"triton"``
run ``_LinearLogprobs`` (the one autograd Function of this operation) over the chunk loop in
torch operations (the per-row pass is a handful of in-place vectorised operations on the
buffers; on the CPU torch's matmuls dominate its time); ``"reference"`` is plain torch on the
materialised logits (for gradcheck); ``"op"`` (under torch.compile) is the
``geko::linear_logprobs_forward`` / ``geko::linear_logprobs_backward`` operators registered here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._backend import resolve_backend
from ._checks import check_bool, check_int, check_real, check_same_device, check_tensor
from ._inputs import LOGITS_DTYPES, MAX_VOCAB, TRITON_LOGITS_DTYPES
from ._linear_chunks import MAX_CHUNK_BUFFER_BYTES, default_chunk_rows
from ._logprob_chunks import backward_chunks, forward_chunks, work_dtype

__all__ = ["linear_logprobs", "linear_logprobs_backward", "linear_logprobs_forward"]

class _Spec(NamedTuple):
    temperature: float
    chunk: int
    entropy: bool


class _LinearLogprobs(torch.autograd.Function):
    """``(logprobs [R], entropy [R])`` of the kept rows; the backward forms each chunk's
    logits again from the saved log-sum-exp and entropy (no ``[R, V]`` tensor is kept)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ids: torch.Tensor,
        spec: _Spec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs, entropies, lse = forward_chunks(
            hidden2.detach(), weight.detach(), None if bias is None else bias.detach(), ids,
            spec.temperature, spec.chunk, spec.entropy,
        )
        ctx.spec = spec
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.save_for_backward(hidden2, weight, bias, ids, lse, entropies)
        ctx.set_materialize_grads(False)
        if not spec.entropy:
            ctx.mark_non_differentiable(entropies)
        return logprobs, entropies

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None):  # type: ignore[override]
        hidden2, weight, bias, ids, lse, entropies = ctx.saved_tensors
        spec: _Spec = ctx.spec
        if grad_logprobs is None and (grad_entropy is None or not spec.entropy):
            return None, None, None, None, None
        grads = backward_chunks(
            hidden2.detach(), weight.detach(), None if bias is None else bias.detach(), ids, spec.temperature,
            spec.chunk, lse, entropies if spec.entropy else None, grad_logprobs,
            grad_entropy if spec.entropy else None, ctx.need,
        )
        return grads.hidden, grads.weight, grads.bias, None, None


# -- geko::linear_logprobs_forward / geko::linear_logprobs_backward -------------------------------


@torch.library.custom_op("geko::linear_logprobs_forward", mutates_args=())
def linear_logprobs_forward(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    temperature: float,
    chunk: int,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logprobs [R], entropy [R] (empty without entropy), lse [R])`` of the ``R`` rows,
    chunk by chunk; the first two are differentiable (``geko::linear_logprobs_backward``)."""
    logprobs, entropies, lse = forward_chunks(
        hidden2.detach(), weight.detach(), None if bias is None else bias.detach(), ids, temperature, chunk, entropy
    )
    return logprobs, entropies, lse


@linear_logprobs_forward.register_fake
def _linear_logprobs_forward_fake(hidden2, weight, bias, ids, temperature, chunk, entropy):
    rows, work = hidden2.shape[0], work_dtype(hidden2.dtype)
    return (
        hidden2.new_empty((rows,), dtype=work),
        hidden2.new_empty((rows if entropy else 0,), dtype=work),
        hidden2.new_empty((rows,), dtype=work),
    )


def _forward_setup(ctx, inputs, output) -> None:
    hidden2, weight, bias, ids, temperature, chunk, entropy = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.temperature, ctx.chunk, ctx.entropy, ctx.has_bias = temperature, chunk, entropy, bias is not None
    ctx.save_for_backward(hidden2, weight, bias if bias is not None else hidden2.new_empty(0), ids, output[2], output[1])


def _forward_backward(ctx, g_logprobs, g_entropy, g_lse):
    hidden2, weight, bias, ids, lse, entropies = ctx.saved_tensors
    g_logprobs = torch.zeros_like(lse) if g_logprobs is None else g_logprobs
    g_entropy = torch.zeros_like(entropies) if g_entropy is None or not ctx.entropy else g_entropy
    grad_h, grad_w, grad_b = linear_logprobs_backward(
        hidden2, weight, bias if ctx.has_bias else None, ids, lse, entropies, g_logprobs.contiguous(),
        g_entropy.contiguous(), ctx.temperature, ctx.chunk,
    )
    return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


linear_logprobs_forward.register_autograd(_forward_backward, setup_context=_forward_setup)


@torch.library.custom_op("geko::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    lse: torch.Tensor,
    entropies: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``Σ grad_logprobs · logprobs + Σ grad_entropy · entropy`` with
    respect to ``hidden2``, ``weight`` and ``bias`` (an empty tensor without bias); an empty
    ``entropies`` (no entropy in the forward) leaves the entropy term out."""
    with_entropy = entropies.numel() == lse.numel() and lse.numel() > 0
    grads = backward_chunks(
        hidden2.detach(), weight.detach(), None if bias is None else bias.detach(), ids, temperature, chunk,
        lse.detach(), entropies.detach() if with_entropy else None, grad_logprobs.detach(),
        grad_entropy.detach() if with_entropy else None, (True, True, bias is not None),
    )
    grad_b = grads.bias if bias is not None else hidden2.new_empty(0)
    return grads.hidden, grads.weight, grad_b


@linear_logprobs_backward.register_fake
def _linear_logprobs_backward_fake(hidden2, weight, bias, ids, lse, entropies, grad_logprobs, grad_entropy, temperature, chunk):
    grad_b = hidden2.new_empty(bias.shape if bias is not None else (0,), dtype=bias.dtype if bias is not None else hidden2.dtype)
    return (
        torch.empty_like(hidden2, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        grad_b,
    )


# -- the backend table: _BACKENDS[name](hidden2, weight, bias, ids, spec) -> (logprobs [R], entropy [R])


def _fused(hidden2, weight, bias, ids, spec: _Spec):
    inputs = [t for t in (hidden2, weight, bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _LinearLogprobs.apply(hidden2, weight, bias, ids, spec)
    logprobs, entropies, _ = forward_chunks(hidden2, weight, bias, ids, spec.temperature, spec.chunk, spec.entropy)
    return logprobs, entropies


def _compiled(hidden2, weight, bias, ids, spec: _Spec):
    logprobs, entropies, _ = linear_logprobs_forward(
        hidden2, weight, bias, ids, spec.temperature, spec.chunk, spec.entropy
    )
    return logprobs, entropies


def _reference(hidden2, weight, bias, ids, spec: _Spec):
    """Plain torch on the materialised logits, differentiable (gradcheck in float64)."""
    logits = hidden2 @ weight.T
    if bias is not None:
        logits = logits + bias
    z = logits.to(work_dtype(hidden2.dtype)) / spec.temperature
    logp = torch.log_softmax(z, dim=-1)
    logprobs = logp.gather(1, ids.unsqueeze(1)).squeeze(1)
    if not spec.entropy:
        return logprobs, logprobs.new_empty((0,))
    safe = logp.clamp(min=torch.finfo(logp.dtype).min)
    return logprobs, -(logp.exp() * safe).sum(dim=1)


_BACKENDS = {"cpp": _fused, "triton": _fused, "reference": _reference, "op": _compiled}


# -- inputs ----------------------------------------------------------------------------------


class _Prepared(NamedTuple):
    hidden2: torch.Tensor  # [R, d]
    ids: torch.Tensor  # [R] int64, 0 where masked
    keep: torch.Tensor | None  # [R] bool, None when every row counts
    out_shape: tuple[int, ...]  # hidden.shape[:-1]
    backend: str
    chunk: int


def _prepare(hidden, weight, token_ids, bias, mask, ignore_index, temperature, chunk_size, backend) -> tuple[_Prepared, float]:
    check_tensor(hidden, "hidden", dtype=LOGITS_DTYPES, ndim=(2, 3), layout="[N, d] or [B, T, d]")
    check_tensor(weight, "weight", ndim=2, layout="[V, d]")
    check_tensor(token_ids, "token_ids", dtype="integer")
    check_tensor(bias, "bias", ndim=1, layout="[V]", optional=True)
    check_tensor(mask, "mask", dtype=torch.bool, optional=True)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {value.dtype}")
    vocab = check_int(weight.shape[0], "vocabulary size (weight.shape[0])", low=2, high=MAX_VOCAB)
    dim = hidden.shape[-1]
    if weight.shape[1] != dim:
        raise ValueError(f"weight must be [V, d] with d = hidden.shape[-1] = {dim}, got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias must be [V] with V = weight.shape[0] = {vocab}, got shape {tuple(bias.shape)}")
    out_shape = tuple(hidden.shape[:-1])
    for name, value in (("token_ids", token_ids), ("mask", mask)):
        if value is not None and tuple(value.shape) != out_shape:
            raise ValueError(f"{name} must have shape hidden.shape[:-1] = {out_shape}, got {tuple(value.shape)}")
    for name, value in (("weight", weight), ("token_ids", token_ids), ("bias", bias), ("mask", mask)):
        if value is not None:
            check_same_device(value, name, hidden, "hidden")
    temperature = check_real(temperature, "temperature")
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if ignore_index is not None:
        ignore_index = check_int(ignore_index, "ignore_index")
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    compiling = torch.compiler.is_compiling()
    name = resolve_backend(hidden.device.type, backend, traced=compiling)
    if name == "triton" and hidden.dtype not in TRITON_LOGITS_DTYPES:
        raise TypeError(
            f"hidden must be float32, bfloat16 or float16 on the Triton backend, got {hidden.dtype} "
            "(float64 runs on the 'cpp' and 'reference' backends)"
        )

    rows = math.prod(out_shape)
    ids = token_ids.reshape(rows).to(torch.int64)
    keep = None if mask is None else mask.reshape(rows)
    if ignore_index is not None:
        counted = ids != ignore_index
        keep = counted if keep is None else keep & counted
    in_range = (ids >= 0) & (ids < vocab)
    if not compiling and rows > 0:
        bad = ~in_range if keep is None else keep & ~in_range
        if bool(bad.any()):
            position = tuple(int(i) for i in bad.view(out_shape).nonzero()[0])
            raise ValueError(
                f"token id {int(token_ids[position])} at {position} is outside [0, {vocab}) "
                "(mask it, or pass its value as ignore_index)"
            )
    if keep is not None:
        ids = torch.where(keep, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    if chunk_size is None:
        # z and p in the work dtype (and the 16-bit logits) share the buffer budget
        per_class = 3 if work_dtype(hidden.dtype) != hidden.dtype else 2
        if compiling:
            itemsize = torch.empty((), dtype=work_dtype(hidden.dtype)).element_size()
            chunk_size = max(1, min(MAX_CHUNK_BUFFER_BYTES // (per_class * vocab * itemsize), max(rows, 1)))
        else:
            chunk_size = default_chunk_rows(rows, per_class * vocab, work_dtype(hidden.dtype), hidden.device)
    prepared = _Prepared(hidden.reshape(rows, dim), ids, keep, out_shape, name, min(chunk_size, max(rows, 1)))
    return prepared, temperature


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy: bool = True,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities of ``token_ids`` and per-token entropy under
    ``softmax((hidden @ weight.T + bias) / temperature)``, never holding the ``[N, V]`` logits.

    The values of ``log_softmax((hidden @ weight.T + bias) / temperature).gather(-1, ids)``
    and of the entropy ``-Σ p log p`` of the same distribution, differentiable with respect to
    ``hidden``, ``weight`` and ``bias``: what a GRPO/PPO loss takes (the token ids are the
    sampled completion tokens, already aligned with the positions that predict them). The
    rows run in chunks of ``chunk_size`` through reused ``[chunk_size, V]`` buffers; the
    backward forms each chunk's logits again (docs/linear_loss.md).

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]``, float32/bfloat16/float16/float64 (float64 is
            computed in float64; not on the Triton backend).
        weight: ``[V, d]``, the dtype and device of ``hidden`` (e.g. an lm_head weight).
            ``2 <= V <= 262144``.
        token_ids: ``[N]`` or ``[B, T]`` integer ids in ``[0, V)`` (masked positions may hold
            anything).
        bias: optional ``[V]``, the dtype of ``hidden``.
        temperature: ``τ > 0``, finite; the logits are divided by it (the sampling temperature).
        entropy: also compute the per-token entropy (False saves a little time and returns None).
        mask: optional bool, the shape of ``token_ids``: False positions are left out.
        ignore_index: optional int: positions whose id equals it are left out.
        chunk_size: rows per chunk, ``>= 1``; None picks it from free memory (the buffers get
            at most ``min(free / 8, 64 MiB)`` on the CPU, 256 MiB on CUDA).
        backend: ``None`` (``"triton"`` on CUDA, ``"cpp"`` on CPU: the same chunked torch
            path), ``"triton"``, ``"cpp"`` or ``"reference"`` (plain torch on the
            materialised logits; ``chunk_size`` is checked but not used).

    Returns:
        ``(logprobs, entropy)``, each of shape ``hidden.shape[:-1]``, float32 (float64 for
        float64 inputs); ``entropy`` is None when ``entropy=False``. Left-out positions hold
        0 in both and pass no gradient. Gradients reach ``hidden``, ``weight`` and ``bias`` in
        their dtype (16-bit inputs accumulate the weight and bias gradients in float32).

    Raises:
        TypeError: non-tensor inputs, a hidden dtype other than float32/bfloat16/float16/
            float64, weight or bias of another dtype, non-integer token ids, a non-bool mask,
            a non-real temperature, non-int ignore_index or chunk_size, non-bool entropy.
        ValueError: wrong ranks or shapes, tensors on different devices, V outside
            [2, 262144], temperature not finite and > 0, ``chunk_size < 1``, an unknown or
            unusable backend, a kept token id outside ``[0, V)`` (checked on every device
            outside torch.compile: one synchronisation on CUDA).
    """
    entropy = check_bool(entropy, "entropy")
    prepared, temperature = _prepare(
        hidden, weight, token_ids, bias, mask, ignore_index, temperature, chunk_size, backend
    )
    spec = _Spec(temperature, prepared.chunk, entropy)
    run = _BACKENDS[prepared.backend]
    keep = prepared.keep
    if keep is None or prepared.backend == "op":
        logprobs, entropies = run(prepared.hidden2, weight, bias, prepared.ids, spec)
        if keep is not None:  # under torch.compile: every row runs, masked rows are zeroed
            logprobs = torch.where(keep, logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
            if entropy:
                entropies = torch.where(keep, entropies, torch.zeros((), dtype=entropies.dtype, device=entropies.device))
    else:
        # only the kept rows run; index_select / index_put route their gradients back
        rows = keep.nonzero().squeeze(1)
        kept_lp, kept_h = run(prepared.hidden2.index_select(0, rows), weight, bias, prepared.ids.index_select(0, rows), spec)
        zeros = torch.zeros(keep.shape, dtype=kept_lp.dtype, device=kept_lp.device)
        logprobs = zeros.index_put((rows,), kept_lp)
        entropies = zeros.index_put((rows,), kept_h) if entropy else None
    out_shape = prepared.out_shape
    return logprobs.view(out_shape), entropies.view(out_shape) if entropy else None
