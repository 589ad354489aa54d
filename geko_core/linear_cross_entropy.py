"""Fused linear cross-entropy with per-sample statistics: ``linear_cross_entropy_with_stats``.

The loss of ``hidden @ weight.T + bias`` against the labels, and the statistics of
``sample_stats`` on those logits, without ever holding the ``[N, V]`` logits: the tokens are
processed in chunks, and one ``[chunk, V]`` buffer is reused for every chunk. Per chunk, torch's
matmul forms the logits in the input dtype; the fused kernel of ``cross_entropy_with_stats``
(C++ on CPU tensors, Triton on CUDA tensors) computes the token losses and statistics and then
overwrites the buffer with the logits' gradient; two more matmuls turn that gradient into the
chunk's share of the gradients of ``hidden``, ``weight`` and ``bias``. See docs/linear_loss.md.

The backend named by ``_backend.resolve_backend`` picks the path: ``"cpp"`` and ``"triton"``
run ``_LinearCrossEntropy`` (the one autograd Function of this operation; its statistics are
extra outputs marked non-differentiable) over the chunk loop of ``geko_core._linear_chunks``;
``"reference"`` is ``cross_entropy_with_stats``'s reference on materialised logits; ``"op"``
(under torch.compile) is the ``geko::linear_token_forward`` / ``geko::linear_token_backward``
operators registered here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._backend import resolve_backend
from ._checks import check_bool, check_choice
from ._inputs import config_from_values, config_values
from ._linear_chunks import Inputs, Rows, TokenValues, prepare, reduce_rows, row_scale, run_chunks, sample_statistics
from ._reduction import REDUCTIONS
from .config import GekoConfig, resolve_config
from .cross_entropy import cross_entropy_with_stats
from .loss_options import LossOptions, check_loss_options, class_weight_total, options_given, public_lse
from .types import SampleStats, TokenStats

__all__ = ["linear_cross_entropy_with_stats", "linear_token_backward", "linear_token_forward"]


class _Spec(NamedTuple):
    reduction: str
    per_token: bool
    config: GekoConfig
    options: LossOptions = LossOptions()
    lse: bool = False  # also output every row's log-sum-exp


def _flat(stats: SampleStats) -> tuple[torch.Tensor, ...]:
    """The tensors of ``stats``, as the Function's extra outputs."""
    return (*stats[:8], *(() if stats.tokens is None else stats.tokens))


def _stats_of(outputs: tuple | list, per_token: bool) -> SampleStats:
    return SampleStats(*outputs[:8], tokens=TokenStats(*outputs[8:15]) if per_token else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """``(loss, *statistics)``, the statistics marked non-differentiable.

    ``"mean"`` and ``"sum"``: the gradients are computed during the forward, when each chunk's
    logits are in the buffer, and the backward scales them by ``grad_output``. ``"none"`` and
    ``"per_sample"`` (an upstream gradient per token or per sample, unknown in the forward):
    the forward only scores; the backward forms each chunk's logits again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        prepared: Inputs,
        spec: _Spec,
    ) -> tuple:
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        early = spec.reduction in ("sum", "mean")
        one = torch.ones((), dtype=torch.float32, device=hidden2.device)
        mean_total = _mean_total(prepared, spec.options)
        tokens, grads = run_chunks(
            prepared.rows(spec.options), weight, bias, config=spec.config, keep_lse=not early or spec.lse,
            token_scale=row_scale(prepared, one, spec.reduction, mean_total) if early else None, need=need,
        )
        stats, token_loss_sum = sample_statistics(tokens, prepared, spec.config, spec.per_token)
        ctx.prepared, ctx.need, ctx.reduction = prepared, need, spec.reduction
        ctx.options, ctx.mean_total = spec.options, mean_total
        if early:
            ctx.grads = grads  # owned by this node; handed to autograd (and dropped) by the backward
        else:
            # the forward's lse: the backward runs no statistics pass
            ctx.save_for_backward(hidden2, weight, bias, tokens.lse)
        outputs = _flat(stats)
        if spec.lse:
            outputs = (*outputs, tokens.lse.clone())
        ctx.mark_non_differentiable(*outputs)
        return (reduce_rows(tokens.trained_loss, token_loss_sum, prepared, spec.reduction, mean_total), *outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any):  # type: ignore[override]
        prepared: Inputs = ctx.prepared
        if hasattr(ctx, "grads"):
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "linear_cross_entropy_with_stats: this loss's gradients were already handed out by a "
                    "previous backward (they are computed once, during the forward)"
                )
            ctx.grads = None
            scale_needed = grad_output.device.type != "cpu" or float(grad_output) != 1.0
            result = []
            for g in grads:
                if g is not None and scale_needed:
                    g.mul_(grad_output.to(g.dtype))
                result.append(g)
            return result[0], result[1], result[2], None, None
        hidden2, weight, bias, lse = ctx.saved_tensors
        _, grads = run_chunks(
            prepared.rows(ctx.options)._replace(hidden2=hidden2.detach()), weight.detach(),
            None if bias is None else bias.detach(), config=None,
            token_scale=row_scale(prepared, grad_output, ctx.reduction, ctx.mean_total), lse=lse, need=ctx.need,
        )
        return grads.hidden, grads.weight, grads.bias, None, None


def _mean_total(prepared: Inputs, options: LossOptions) -> torch.Tensor | None:
    """The class-weighted ``"mean"``'s divisor (None: the number of valid tokens)."""
    return class_weight_total(options, prepared.label_rows, prepared.ignore_index)


# -- geko::linear_token_forward / geko::linear_token_backward ------------------------------------


def _op_rows(hidden2: torch.Tensor, label_rows: torch.Tensor, ignore_index: int, chunk: int) -> Rows:
    return Rows(hidden2.detach(), label_rows, resolve_backend(hidden2.device.type, None), chunk, ignore_index)


@torch.library.custom_op("geko::linear_token_forward", mutates_args=())
def linear_token_forward(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    label_rows: torch.Tensor,
    ignore_index: int,
    chunk: int,
    config: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token_values [6, R], valid [R], spoiled [R], lse [R])`` of ``hidden2 @ weight.T +
    bias`` (``R`` rows), chunk by chunk without the ``[R, V]`` logits; the token losses
    (row 0) are differentiable (``geko::linear_token_backward``)."""
    tokens, _ = run_chunks(
        _op_rows(hidden2, label_rows, ignore_index, chunk), weight.detach(), None if bias is None else bias.detach(),
        config=config_from_values(config), keep_lse=True,
    )
    return tokens.values, tokens.valid, tokens.spoiled, tokens.lse


@linear_token_forward.register_fake
def _linear_token_forward_fake(hidden2, weight, bias, label_rows, ignore_index, chunk, config):
    rows = hidden2.shape[0]
    device = hidden2.device
    return (
        torch.empty((6, rows), dtype=torch.float32, device=device),
        torch.empty((rows,), dtype=torch.bool, device=device),
        torch.empty((rows,), dtype=torch.bool, device=device),
        torch.empty((rows,), dtype=torch.float64, device=device),
    )


def _linear_forward_setup(ctx, inputs, output) -> None:
    hidden2, weight, bias, label_rows, ignore_index, chunk, _config = inputs
    ctx.mark_non_differentiable(output[3])  # the log-sum-exp: an input of the backward only
    ctx.ignore_index, ctx.chunk, ctx.has_bias = ignore_index, chunk, bias is not None
    ctx.save_for_backward(hidden2, weight, bias if bias is not None else hidden2.new_empty(0), label_rows, output[3])


def _linear_forward_backward(ctx, g_values, g_valid, g_spoiled, g_lse):
    if g_values is None:
        return None, None, None, None, None, None, None
    hidden2, weight, bias, label_rows, lse = ctx.saved_tensors
    grad_h, grad_w, grad_b = linear_token_backward(
        hidden2, weight, bias if ctx.has_bias else None, label_rows, lse,
        g_values[0].to(torch.float32).contiguous(), ctx.ignore_index, ctx.chunk,
    )
    return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


linear_token_forward.register_autograd(_linear_forward_backward, setup_context=_linear_forward_setup)


@torch.library.custom_op("geko::linear_token_backward", mutates_args=())
def linear_token_backward(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    label_rows: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``sum(row_scale * token_loss)`` with respect to ``hidden2``,
    ``weight`` and ``bias`` (an empty tensor without bias), chunk by chunk again."""
    _, grads = run_chunks(
        _op_rows(hidden2, label_rows, ignore_index, chunk), weight.detach(), None if bias is None else bias.detach(),
        config=None, token_scale=row_scale.detach().contiguous(), lse=lse.detach(), need=(True, True, bias is not None),
    )
    grad_b = grads.bias.to(bias.dtype) if bias is not None else torch.empty(0, dtype=hidden2.dtype, device=hidden2.device)
    return grads.hidden, grads.weight.to(weight.dtype), grad_b


@linear_token_backward.register_fake
def _linear_token_backward_fake(hidden2, weight, bias, label_rows, lse, row_scale, ignore_index, chunk):
    grad_b = torch.empty(bias.shape if bias is not None else (0,), dtype=hidden2.dtype, device=hidden2.device)
    return torch.empty_like(hidden2, memory_format=torch.contiguous_format), torch.empty_like(weight, memory_format=torch.contiguous_format), grad_b


# -- the backend table: _BACKENDS[name](hidden, weight, bias, labels, prepared, spec, training)
#    -> (loss, SampleStats)


def _compiled_linear_loss(hidden, weight, bias, labels, prepared: Inputs, spec: _Spec, training: bool):
    """The loss as torch.compile sees it: the ``geko::linear_token_forward`` operator (whose
    token losses carry the chunked backward, ``geko::linear_token_backward``) and the
    per-sample reduction in plain torch operations. The backward forms each chunk's logits
    again (the eager path computes the gradients during the forward instead)."""
    hidden2 = prepared.hidden2
    if not training:
        hidden2, weight = hidden2.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    values, valid, spoiled, lse = linear_token_forward(
        hidden2, weight, bias, prepared.label_rows, prepared.ignore_index, prepared.chunk, config_values(spec.config)
    )
    stats, token_loss_sum = sample_statistics(TokenValues(values, valid, spoiled, lse), prepared, spec.config, spec.per_token)
    stats = SampleStats(
        *(field.detach() for field in stats[:8]),
        tokens=None if stats.tokens is None else TokenStats(*(field.detach() for field in stats.tokens)),
    )
    return reduce_rows(values[0], token_loss_sum, prepared, spec.reduction), stats, (lse.detach() if spec.lse else None)


def _reference_linear_loss(hidden, weight, bias, labels, prepared: Inputs, spec: _Spec, training: bool):
    """Plain torch on the materialised logits (gradcheck in float64)."""
    with torch.enable_grad() if training else torch.no_grad():
        logits = hidden @ weight.T
        if bias is not None:
            logits = logits + bias
        o = spec.options
        loss, stats, *lse = cross_entropy_with_stats(
            logits, labels, ignore_index=prepared.ignore_index, shift=prepared.shift, sample_weight=prepared.weight,
            reduction=spec.reduction, per_token=spec.per_token, config=spec.config, backend="reference",
            temperature=o.temperature, softcap=o.softcap, label_smoothing=o.label_smoothing, z_loss=o.z_loss,
            class_weight=o.class_weight, return_lse=spec.lse,
        )
        return loss, stats, (lse[0] if lse else None)


def _fused_linear_loss(hidden, weight, bias, labels, prepared: Inputs, spec: _Spec, training: bool):
    """The chunk loop with the C++ or Triton kernels: ``_LinearCrossEntropy``, or a scoring pass."""
    if not training:
        with torch.no_grad():
            rows = prepared.rows(spec.options)._replace(hidden2=prepared.hidden2.detach())
            tokens, _ = run_chunks(
                rows, weight.detach(), None if bias is None else bias.detach(), config=spec.config, keep_lse=spec.lse
            )
            stats, token_loss_sum = sample_statistics(tokens, prepared, spec.config, spec.per_token)
            mean_total = _mean_total(prepared, spec.options)
            loss = reduce_rows(tokens.trained_loss, token_loss_sum, prepared, spec.reduction, mean_total)
            return loss, stats, tokens.lse
    outputs = list(_LinearCrossEntropy.apply(prepared.hidden2, weight, bias, prepared, spec))
    lse = outputs.pop() if spec.lse else None
    return outputs[0], _stats_of(outputs[1:], spec.per_token), lse


def _row_lse(lse: torch.Tensor, prepared: Inputs, vocab: int, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Every row's log-sum-exp in the public layout, that of the ``"none"`` loss."""
    rows = prepared.label_rows.view(prepared.samples, prepared.row_tokens)[:, : prepared.out_tokens]
    lse = lse.reshape(prepared.samples, prepared.row_tokens)[:, : prepared.out_tokens]
    out = public_lse(lse, rows, prepared.ignore_index, vocab, hidden.dtype == torch.float64)
    return out.reshape(labels.shape) if hidden.dim() == 2 else out


_PLAIN = LossOptions()
_BACKENDS = {
    "cpp": _fused_linear_loss,
    "triton": _fused_linear_loss,
    "reference": _reference_linear_loss,
    "op": _compiled_linear_loss,
}


def linear_cross_entropy_with_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    shift: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    grad: bool = True,
    per_token: bool = False,
    config: GekoConfig | None = None,
    backend: str | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: torch.Tensor | None = None,
    return_lse: bool = False,
) -> tuple:
    """Cross-entropy of ``hidden @ weight.T + bias`` and its per-sample statistics, never
    holding the ``[N, V]`` logits.

    The loss, its reductions and ``sample_weight`` mean what they mean in
    ``cross_entropy_with_stats`` (``"mean"`` divides the weighted sum of token losses by the
    number of valid tokens in the batch; weights are constants), and the statistics are those
    of ``sample_stats`` on the materialised logits: discrete fields identical, floats to
    float32 rounding (bit-identical on the C++ path when the chunked matmul reproduces the
    full one's values). The tokens run in chunks of ``chunk_size`` rows through one reused
    ``[chunk_size, V]`` buffer (docs/linear_loss.md).

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]``, float32/bfloat16/float16 (float64 on the
            ``"cpp"`` and ``"reference"`` backends); e.g. the last hidden states.
        weight: ``[V, d]``, the dtype and device of ``hidden``; e.g. an lm_head weight, which
            may be tied to an embedding (its gradient is returned to autograd, which adds it
            to whatever else reaches ``weight.grad``). ``2 <= V <= 262144``.
        labels: ``[N]`` or ``[B, T]``, integer.
        bias: optional ``[V]``, the dtype of ``hidden``.
        sample_weight: optional float ``[S]`` per-sample weights (``S = N`` or ``B``); no
            gradient flows to them.
        ignore_index: label of tokens that do not count; None means -100, as in
            ``F.linear_cross_entropy``.
        shift: causal-LM shift (3-D only): position ``t`` is scored against label ``t + 1``;
            the last position gets no gradient.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` (the token losses, differentiable per
            token: ``[N]``, ``[B, T]``, ``[B, T - 1]`` with shift, each times its sample's
            weight, 0 at tokens that do not count) or ``"per_sample"`` (``[S]`` per-sample
            means, as in ``cross_entropy_with_stats``).
        chunk_size: tokens per chunk, ``>= 1``; None picks it from free memory: the logits
            buffer gets at most ``min(free / 8, 64 MiB)`` on the CPU, ``min(free / 8,
            256 MiB)`` on CUDA (``default_chunk_rows``).
        grad: False runs a scoring pass: no gradient is computed, and the loss has no
            ``grad_fn``. Also the case when no input requires grad, or grad mode is off.
        per_token: also return token-level statistics (``[S, T]``, ``T - 1`` with shift).
        temperature, softcap, label_smoothing, z_loss, class_weight: the loss options, as in
            ``cross_entropy_with_stats``.
        return_lse: also return every token's log-sum-exp, ``(loss, stats, lse)``, as in
            ``cross_entropy_with_stats``.
        config: thresholds of the instant bucket.
        backend: ``None`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or
            ``"reference"`` (plain torch on materialised logits, differentiable in float64;
            for gradcheck; ``chunk_size`` is checked but not used).

    Returns:
        (loss, stats): ``loss`` float32 (float64 on the reference path for float64 inputs),
        a scalar, ``[S]`` for ``"per_sample"``, the token losses for ``"none"``. Gradients
        flow to ``hidden``, ``weight`` and ``bias`` in their dtype (16-bit inputs accumulate the weight and bias gradients over
        the chunks in float32). ``stats`` is a detached ``SampleStats``.

        On the fused paths a NaN or ``+inf`` logit (or only ``-inf`` logits) in a valid
        token's row makes that sample's loss NaN and the sample invalid, as in
        ``cross_entropy_with_stats``; other ``-inf`` logits (e.g. a bias masking classes) are
        probability 0, as in torch. Float64 inputs run on the reference path. With ``"mean"``/``"sum"`` the gradients are computed
        in the forward and handed out by the first backward; a second backward through the
        same loss (``retain_graph=True``) raises RuntimeError.

    Raises:
        TypeError: non-tensor inputs, a hidden dtype other than float32/bfloat16/float16/
            float64 (float64 on Triton), weight or bias of another dtype, non-integer labels,
            a non-int ignore_index or chunk_size, non-bool shift/grad/per_token, a config that
            is not a GekoConfig, a non-float sample_weight.
        ValueError: wrong ranks or shapes (weight not ``[V, d]`` with hidden's ``d``, bias not
            ``[V]``, labels not ``hidden.shape[:-1]``, sample_weight not ``[S]``), tensors on
            different devices, V outside [2, 262144], ``shift=True`` with 2-D hidden,
            ``chunk_size < 1``, an unknown reduction or unusable backend, and (CPU tensors) a
            label outside [0, V) that is not ``ignore_index``.
    """
    config = resolve_config(config)
    check_choice(reduction, "reduction", REDUCTIONS)
    per_token = check_bool(per_token, "per_token")
    grad = check_bool(grad, "grad")
    prepared = prepare(
        hidden, weight, labels, bias, sample_weight, ignore_index=ignore_index, shift=shift, chunk_size=chunk_size,
        backend=backend,
    )
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    training = grad and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    options = _PLAIN
    if options_given(temperature, softcap, label_smoothing, z_loss, class_weight):
        options = check_loss_options(
            temperature=temperature, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss,
            class_weight=class_weight, vocab=weight.shape[0], device=hidden.device,
        )
        if not options.plain and prepared.backend == "op":
            raise ValueError(
                "the loss options (temperature, softcap, label_smoothing, z_loss, class_weight) do not run under torch.compile"
            )
    return_lse = check_bool(return_lse, "return_lse")
    spec = _Spec(reduction, per_token, config, options, return_lse)
    loss, stats, lse = _BACKENDS[prepared.backend](hidden, weight, bias, labels, prepared, spec, training)
    if reduction == "none" and hidden.dim() == 2:
        loss = loss.reshape(labels.shape)  # [N, 1] token losses: one per row
    if not return_lse:
        return loss, stats
    if prepared.backend != "reference":  # (the reference's is in the public layout already)
        lse = _row_lse(lse, prepared, weight.shape[0], hidden, labels)
    return loss, stats, lse
