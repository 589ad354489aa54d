"""Fused cross-entropy with per-sample statistics: ``cross_entropy_with_stats``.

The loss and the statistics of ``geko_core.sample_stats`` come from the same pass over the
logits. The backend named by ``_backend.resolve_backend`` is looked up in ``_BACKENDS``,
whose entries share one signature:

* ``"cpp"`` (CPU tensors) and ``"triton"`` (CUDA tensors): ``_CrossEntropy``, the one
  autograd Function of this operation, over the kernels of ``_KERNELS`` (forward:
  statistics + token losses + log-sum-exp; backward: ``softmax - onehot``, scaled per
  token). The usual CPU step (a plain reduction, no per-token output) is one compiled call
  forward, the weighted reduction included, and one backward, with host arrays throughout:
  ``_loss_and_stats`` hands them to the Selector as a :class:`HostForward`;
* ``"reference"``: plain differentiable torch;
* ``"op"`` (under torch.compile): the ``geko::stats_forward`` operator, whose token losses
  carry the fused backward registered here (``geko::cross_entropy_backward``).

The statistics leave the Function as extra outputs marked non-differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._checks import check_bool, check_choice, check_same_device, check_tensor
from ._cross_entropy_kernels import KERNELS, HostForward, Spec, cross_entropy_backward_triton, sample_stats_of
from ._inputs import check_cpu_labels, config_values, prepare_inputs, samples_view
from ._reduction import REDUCTIONS, reduce_tokens
from .config import GekoConfig, resolve_config
from .loss_options import (
    LossOptions, check_loss_options, options_given, options_token_loss_reference, public_lse, transformed_logits,
)
from .reference import sample_stats_reference
from .segments import SegmentMap, prepare_segments, segment_loss, segment_stats
from .stats import segment_token_values, stats_forward
from .types import SampleStats

__all__ = ["HostForward", "cross_entropy_backward", "cross_entropy_with_stats"]


class _CrossEntropy(torch.autograd.Function):
    """The cross-entropy of the C++ and Triton kernels: ``(loss, *statistics, host)``, the
    statistics marked non-differentiable; the one-call C++ forward gives no statistics
    outputs and its :class:`HostForward` as ``host`` (None otherwise: not a tensor, so
    autograd passes it through).
    ``prepared``: ``(logits3, labels3, weight, spec)``, the kernels' views of the logits and
    labels; ``weight`` float32 ``[S]`` or None (a constant; the C++ backward reads it again,
    so it must not change in between). Where the kernel can (``gradient_in_forward``: the
    C++ one-call forward, not in place), the forward writes the gradient too and the backward
    only scales it by the incoming gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, prepared: tuple
    ) -> tuple:
        # (the kernels' views, the labels and the weights arrive in one plain argument: only the
        # logits take a gradient, and every tensor input costs autograd bookkeeping per call)
        logits3, labels3, weight, spec = prepared
        grad = None
        if spec.reduction == "token":
            values, valid, bad, lse = segment_token_values(
                logits3, labels3, name=spec.backend, ignore_index=spec.ignore_index, config=spec.config, write_lse=True
            )
            loss, outputs, state, host = values[0].clone(), (values, valid, bad), (lse,), None
        else:
            target = None
            if ctx.needs_input_grad[0] and KERNELS[spec.backend].gradient_in_forward(spec):
                grad, target = _gradient_buffer(logits, logits3, spec)
            loss, outputs, state, host = KERNELS[spec.backend].forward(logits3, labels3, weight, spec, target)
            if grad is not None and spec.shift and grad.shape[1] > 0:
                grad[:, -1].zero_()  # the last position predicts nothing
        ctx.spec, ctx.state, ctx.logits_shape = spec, state, logits.shape
        if grad is not None:
            # The gradient is already written (reduction and weights included): saved, not
            # kept on ctx, so that autograd frees it after the backward (or hands it to
            # .grad as it is) unless the graph is retained.
            ctx.save_for_backward(grad)
        else:
            # Saved (not only captured) so that an in-place change of the logits or the labels
            # before the backward is caught by autograd's version check.
            ctx.save_for_backward(logits, logits3, labels3)
        ctx.precomputed = grad is not None
        ctx.mark_non_differentiable(*outputs)
        ctx.set_materialize_grads(False)  # no zero gradients made up for the statistics
        return (loss, *outputs, host)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: Any):  # type: ignore[override]
        # The kernels' gradient is not differentiable: under create_graph=True the wrapper
        # says so when it is differentiated again; a plain backward skips the wrapper's cost.
        if torch.is_grad_enabled():
            return _backward_once(ctx, grad_output)
        return _backward(ctx, grad_output)


def _gradient_buffer(logits: torch.Tensor, logits3: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad, target)``: one logits-sized allocation, and the view of it the kernels write
    (``[N, V]`` logits read flat take a flat gradient; shifted rows a ``[S, T-1, V]`` view)."""
    grad = torch.empty_like(logits) if logits.is_contiguous() else torch.empty_like(logits, memory_format=torch.contiguous_format)
    return grad, (grad if logits3.dim() == 2 else samples_view(grad, spec.shift))


def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
    spec = ctx.spec
    if ctx.precomputed:  # the forward wrote d loss / d logits: only the incoming factor is left
        (grad,) = ctx.saved_tensors
        if float(grad_output) != 1.0:  # (a CPU scalar: the one-call forward runs on the host)
            grad = grad * grad_output
    else:
        logits, logits3, labels3 = ctx.saved_tensors
        # Only the in-place path asks whether the kernels' view shares the logits' memory.
        if spec.inplace and logits3.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            grad, target = logits.detach(), None  # the same storage, now holding the gradient
        else:
            grad, target = _gradient_buffer(logits, logits3, spec)
        KERNELS[spec.backend].backward(logits3, labels3, ctx.state, grad_output, target, spec)
        if spec.shift and grad.shape[1] > 0:
            grad[:, -1].zero_()  # the last position predicts nothing
    return grad, None


_backward_once = torch.autograd.function.once_differentiable(_backward)


# -- geko::cross_entropy_backward, and the autograd formula of geko::stats_forward --------------


@torch.library.custom_op("geko::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    logits3: torch.Tensor, labels3: torch.Tensor, lse: torch.Tensor, token_scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """``grad [S, T, V]`` of ``sum(token_scale * token_loss)``, the token losses of
    ``geko::stats_forward`` (with ``write_lse``, whose ``lse`` this takes)."""
    raise NotImplementedError(
        f"geko::cross_entropy_backward has no kernel for {logits3.device.type} tensors (CPU and CUDA only)"
    )


@cross_entropy_backward.register_kernel("cpu")
def _cross_entropy_backward_cpu(logits3, labels3, lse, token_scale, ignore_index):
    grad = torch.empty(logits3.shape, dtype=logits3.dtype)
    spec = Spec("cpp", ignore_index, False, "token", False, resolve_config(None), False)
    KERNELS["cpp"].backward(logits3.detach(), labels3, (lse.contiguous(),), token_scale, grad, spec)
    return grad


@cross_entropy_backward.register_kernel("cuda")
def _cross_entropy_backward_cuda(logits3, labels3, lse, token_scale, ignore_index):
    return cross_entropy_backward_triton(
        logits3.detach(), labels3, lse, token_scale.contiguous(), ignore_index=ignore_index, inplace=False
    )


@cross_entropy_backward.register_fake
def _cross_entropy_backward_fake(logits3, labels3, lse, token_scale, ignore_index):
    return torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)


def _stats_forward_setup(ctx, inputs, output) -> None:
    logits3, labels3, ignore_index, _config, _per_token, write_lse = inputs
    sample_values, _, _, token_values, _, lse = output
    # The statistics are measurements; only the token losses (row 0 of token_values, with
    # write_lse) are differentiable.
    ctx.mark_non_differentiable(sample_values, lse, *(() if write_lse else (token_values,)))
    ctx.ignore_index = ignore_index
    ctx.save_for_backward(logits3, labels3, lse)


def _stats_forward_backward(ctx, g_sample, g_valid_tokens, g_bucket, g_tokens, g_token_valid, g_lse):
    if g_tokens is None:
        return None, None, None, None, None, None
    logits3, labels3, lse = ctx.saved_tensors
    token_scale = g_tokens[0].to(torch.float32).contiguous()
    grad = cross_entropy_backward(logits3, labels3, lse, token_scale, ctx.ignore_index)
    return grad, None, None, None, None, None


stats_forward.register_autograd(_stats_forward_backward, setup_context=_stats_forward_setup)


# -- the backend table: _BACKENDS[name].loss / .token_loss -------------------------------------
# loss(logits, logits3, labels3, weight, spec) -> (loss, SampleStats, None) or, for the
#   one-call C++ forward, (loss, None, HostForward)
# token_loss(logits, logits3, labels3, spec) -> (token_loss [S, T], token_values, valid, bad)
# on validated views; ``spec.backend`` is the table's key.


class _Fused:
    """The C++ and Triton kernels, through ``_CrossEntropy``."""

    @staticmethod
    def loss(logits, logits3, labels3, weight, spec):
        *outputs, host = _CrossEntropy.apply(logits, (logits3, labels3, weight, spec))
        lse = outputs.pop() if spec.lse else None
        if host is not None:  # the usual CPU step: the statistics stay host arrays until asked for
            return outputs[0], None, host, lse
        if spec.per_token:
            return outputs[0], sample_stats_of(outputs[1:], True), None, lse
        stats = SampleStats(*outputs[1].unbind(0), valid_tokens=outputs[2], bucket=outputs[3], tokens=None)
        return outputs[0], stats, None, lse

    @staticmethod
    def token_loss(logits, logits3, labels3, spec):
        return tuple(_CrossEntropy.apply(logits, (logits3, labels3, None, spec._replace(reduction="token", inplace=False)))[:-1])


class _Reference:
    """Plain differentiable torch (gradcheck in float64)."""

    @staticmethod
    def loss(logits, logits3, labels3, weight, spec):
        if not spec.options.plain:
            return _reference_with_options(logits3, labels3, weight, spec)
        samples, tokens, vocab = logits3.shape
        x = logits3 if logits3.dtype == torch.float64 else logits3.float()
        valid = (labels3 != spec.ignore_index) & (labels3 >= 0) & (labels3 < vocab)
        # F.cross_entropy masks ignored tokens out of both the loss and the gradient.
        target = torch.where(valid, labels3, torch.full_like(labels3, -100))
        token_loss = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), ignore_index=-100, reduction="none")
        token_loss = token_loss.reshape(samples, tokens)
        w = None if weight is None else weight.to(token_loss.dtype)
        loss = reduce_tokens(token_loss, valid.sum(dim=1), w, spec.reduction)
        with torch.no_grad():
            stats = sample_stats_reference(
                logits3.detach(), labels3, ignore_index=spec.ignore_index, per_token=spec.per_token, config=spec.config
            )
            lse = torch.logsumexp(x.detach(), dim=-1) if spec.lse else None
        return loss, stats, None, lse

    @staticmethod
    def token_loss(logits, logits3, labels3, spec):
        with torch.no_grad():
            values, valid, bad, _ = segment_token_values(
                logits3.detach(), labels3, name="reference", ignore_index=spec.ignore_index, config=spec.config,
                write_lse=False,
            )
        vocab = logits3.shape[-1]
        x = logits3 if logits3.dtype == torch.float64 else logits3.float()
        target = torch.where(valid, labels3, torch.full_like(labels3, -100))
        token_loss = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), ignore_index=-100, reduction="none")
        return token_loss.reshape(labels3.shape), values, valid, bad


def _reference_with_options(logits3: torch.Tensor, labels3: torch.Tensor, weight: torch.Tensor | None, spec: Spec) -> tuple:
    """The reference backend under the loss options: ``loss_options``' token losses, the
    statistics of ``softmax(z)``."""
    samples, tokens, vocab = logits3.shape
    valid = (labels3 != spec.ignore_index) & (labels3 >= 0) & (labels3 < vocab)
    target = torch.where(valid, labels3, torch.full_like(labels3, -100))
    token_loss, lse, token_weight = options_token_loss_reference(
        logits3.reshape(-1, vocab), target.reshape(-1), spec.options, ignore_index=-100
    )
    token_loss = token_loss.reshape(samples, tokens)
    mean_total = None if spec.options.class_weight is None else token_weight.sum()
    w = None if weight is None else weight.to(token_loss.dtype)
    loss = reduce_tokens(token_loss, valid.sum(dim=1), w, spec.reduction, mean_total)
    with torch.no_grad():
        stats = sample_stats_reference(
            transformed_logits(logits3.detach(), spec.options), labels3, ignore_index=spec.ignore_index,
            per_token=spec.per_token, config=spec.config,
        )
    return loss, stats, None, lse.detach().reshape(samples, tokens) if spec.lse else None


class _Op:
    """torch.compile: the ``geko::stats_forward`` operator (whose token losses carry the fused
    backward) and the reduction in plain torch operations."""

    @staticmethod
    def loss(logits, logits3, labels3, weight, spec):
        blocks = stats_forward(logits3, labels3, spec.ignore_index, config_values(spec.config), spec.per_token, True)
        stats = sample_stats_of(tuple(b.detach() for b in blocks), spec.per_token)
        lse = blocks[5].detach() if spec.lse else None
        return reduce_tokens(blocks[3][0], stats.valid_tokens, weight, spec.reduction), stats, None, lse

    @staticmethod
    def token_loss(logits, logits3, labels3, spec):
        values, valid, bad, _ = segment_token_values(
            logits3, labels3, name="op", ignore_index=spec.ignore_index, config=spec.config, write_lse=True
        )
        return values[0], values.detach(), valid, bad


_BACKENDS = {"cpp": _Fused, "triton": _Fused, "reference": _Reference, "op": _Op}
_PLAIN = LossOptions()


def _segmented_loss(
    logits: torch.Tensor, logits3: torch.Tensor, packed: SegmentMap, weight: torch.Tensor | None, spec: Spec
) -> tuple[torch.Tensor, SampleStats]:
    """``cross_entropy_with_stats`` over the samples of packed rows."""
    token_loss, values, valid, bad = _BACKENDS[spec.backend].token_loss(logits, logits3, packed.labels3, spec)
    stats = segment_stats(values, valid, bad, packed.owner, packed.num_segments, spec.config, spec.per_token)
    w = None if weight is None else weight.to(token_loss.dtype)
    return segment_loss(token_loss, valid, packed.owner, stats.valid_tokens, w, spec.reduction), stats


def cross_entropy_with_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    shift: bool = False,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    per_token: bool = False,
    config: GekoConfig | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
    segments: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: torch.Tensor | None = None,
    return_lse: bool = False,
) -> tuple:
    """Differentiable cross-entropy and the per-sample statistics, from one pass.

    Reductions (``w_s`` is ``sample_weight[s]``, 1 when None; ``l_st`` the token loss;
    sums run over valid tokens, i.e. label != ignore_index and in ``[0, V)``):

    * ``"none"``: the token losses ``w_s * l_st``, differentiable per token, as
      ``F.cross_entropy(..., reduction="none")`` gives them (times the weights): ``[N]`` for
      ``[N, V]`` logits, ``[B, T]`` for ``[B, T, V]``, and ``[B, T - 1]`` with ``shift`` (the
      shifted pair ``logits[:, :-1]`` / ``labels[:, 1:]``, the layout of the per-token
      statistics; pad a zero column for HF's ``[B, T]``); 0 at tokens that do not count;
    * ``"per_sample"``: ``[S]`` per-sample loss ``w_s * mean_t l_st`` (0 for a sample without
      valid tokens), differentiable (the unweighted means are also ``stats.loss``, detached,
      NaN for an invalid sample);
    * ``"sum"``: ``sum_s w_s sum_t l_st``;
    * ``"mean"``: that sum divided by the number of valid tokens in the batch. Without
      weights this is ``F.cross_entropy(..., reduction="mean")``; with importance weights
      (1 / inclusion probability) it is the unbiased InfoBatch-style estimate; weights are
      not renormalised. No valid token in the batch gives NaN, as torch does.

    A NaN or ``+inf`` logit (or only ``-inf`` logits) in a valid token's row makes that
    sample's loss NaN on the fused (C++/Triton) paths, so a mean or sum is NaN too, and marks
    the sample invalid in the statistics. Other ``-inf`` logits (masked classes) are
    probability 0, as in ``F.cross_entropy``: a ``-inf`` label logit gives loss ``+inf``.
    Float64 logits are computed in float64 on the reference path, to which the default
    backend sends them (gradcheck passes).

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float32/bfloat16/float16/float64 (float64 not
            on the Triton backend), any strides (see ``sample_stats``).
        labels: ``[N]`` or ``[B, T]``, integer.
        ignore_index: label of tokens that do not count; None means -100 (as
            ``F.linear_cross_entropy``'s default).
        shift: causal-LM shift (3-D only); the gradient of the last position is 0.
        sample_weight: optional float ``[S]`` (``S = N`` or ``B``) per-sample weights, e.g.
            the planner's importance weights. Treated as constants: no gradient flows to
            them.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` (token losses) or ``"per_sample"``.
        per_token: also return token-level statistics.
        config: thresholds of the instant bucket.
        backend: ``None`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or
            ``"reference"`` (plain torch, differentiable in float64; use it for gradcheck).
        inplace_backward: the fused backends write the gradient into the logits' own
            storage (as Liger-Kernel does) instead of allocating one: saves a logits-sized
            buffer, but the logits tensor is overwritten by its gradient during backward, so
            do not use it afterwards. Ignored on the reference path, with segments, and
            when the logits had to be copied (non-contiguous last dimension).
        temperature, softcap, label_smoothing, z_loss, class_weight: the loss options of
            ``geko_core.loss_options`` (its docstring has the formulas): the logits are
            divided by ``temperature`` and soft-capped (``softcap * tanh(x / softcap)``,
            ``-inf`` kept), the token loss is label-smoothed, adds ``z_loss * lse**2`` and is
            weighted by the label's class weight (``"mean"`` then divides by the valid
            tokens' class weights, as ``F.cross_entropy(weight=...)``). The statistics are
            those of the capped, tempered distribution. Not with packed rows nor under
            torch.compile.
        return_lse: also return every token's log-sum-exp (of the tempered, soft-capped logits):
            ``(loss, stats, lse)``, ``lse`` in the layout of the ``"none"`` loss, 0 at tokens
            that do not count, float32 (float64 for float64 logits), without gradient; e.g.
            ``z_loss * (lse ** 2).sum() / counted`` is the z-loss part of a ``"mean"`` loss.
            Not with packed rows.
        segments, position_ids, num_segments: packed rows, as in ``sample_stats``: the
            statistics, ``sample_weight`` (``[K]``) and the reductions are then per sample
            (``"per_sample"`` gives ``K`` losses, ``"mean"`` divides by the batch's valid
            tokens; ``"none"`` keeps the token losses in row layout ``[B, T']``, each times
            its sample's weight, 0 at tokens of no sample), and the loss and its gradient
            equal those of the samples computed alone.

    Returns:
        (loss, stats): ``loss`` is float32 (float64 on the reference path for float64
        logits), a scalar, ``[S]`` for ``"per_sample"``, the token losses for ``"none"``;
        its gradient flows to ``logits`` only, in the logits' dtype. ``stats`` is the detached ``SampleStats`` of ``sample_stats``.

    Raises:
        TypeError, ValueError: as ``sample_stats``; also an unknown reduction, a
            ``sample_weight`` that is not a float tensor of shape ``[S]`` on the logits'
            device.
    """
    loss_options = None
    if options_given(temperature, softcap, label_smoothing, z_loss, class_weight):
        loss_options = {
            "temperature": temperature, "softcap": softcap, "label_smoothing": label_smoothing, "z_loss": z_loss,
            "class_weight": class_weight,
        }
    loss, stats, host, *lse = _loss_and_stats(
        logits, labels, ignore_index=ignore_index, shift=shift, sample_weight=sample_weight, reduction=reduction,
        per_token=per_token, config=config, backend=backend, inplace_backward=inplace_backward, segments=segments,
        position_ids=position_ids, num_segments=num_segments, loss_options=loss_options, return_lse=return_lse,
    )
    return (loss, (host.stats() if stats is None else stats), *lse)


def _loss_and_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    sample_weight: torch.Tensor | None,
    reduction: str,
    per_token: bool,
    config: GekoConfig | None,
    backend: str | None,
    inplace_backward: bool,
    segments: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    num_segments: int | None,
    loss_options: dict | None = None,
    return_lse: bool = False,
) -> tuple:
    """``cross_entropy_with_stats`` and, for the one-call C++ forward (CPU tensors, a plain
    ``"sum"``/``"mean"`` reduction, no per-token output, no packed rows), the host arrays the
    Selector reads every step; there ``stats`` is None (``host.stats()`` gives it as tensors,
    sharing the memory), so nothing is converted twice. ``host`` is None on the other paths. The
    Selector's one seam into the loss: its usual CPU step costs what this function costs.
    ``loss_options``: the unchecked keyword options of ``geko_core.loss_options`` (None: none).
    ``return_lse``: a fourth element, every token's log-sum-exp (``cross_entropy_with_stats``)."""
    config = resolve_config(config)
    check_choice(reduction, "reduction", REDUCTIONS)
    per_token = check_bool(per_token, "per_token")
    inplace_backward = check_bool(inplace_backward, "inplace_backward")
    packed_rows = segments is not None or position_ids is not None or num_segments is not None
    one_call = not per_token and reduction in ("sum", "mean") and not packed_rows  # the C++ one-call forward, on "cpp"
    logits3, labels3, name, ignore_index, shift = prepare_inputs(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend, check_labels=False, flat=one_call
    )
    options = _PLAIN
    if loss_options:
        options = check_loss_options(vocab=logits3.shape[-1], device=logits.device, **loss_options)
        if not options.plain and packed_rows:
            raise ValueError("the loss options (temperature, softcap, label_smoothing, z_loss, class_weight) do not take packed rows (segments=, position_ids=)")
        if not options.plain and name == "op":
            raise ValueError("the loss options (temperature, softcap, label_smoothing, z_loss, class_weight) do not run under torch.compile")
    if name != "cpp" or not one_call:
        # (the one-call C++ forward refuses an out-of-range label itself, before writing anything)
        check_cpu_labels(labels3, logits3.shape[-1], ignore_index)
    packed = None
    if packed_rows:
        packed = prepare_segments(
            segments, position_ids, num_segments, labels=labels, labels3=labels3, shift=shift, ignore_index=ignore_index
        )
    samples = logits3.shape[0] if packed is None else packed.num_segments
    weight = sample_weight
    if not (
        weight is None
        or (
            type(weight) is torch.Tensor
            and weight.dtype is torch.float32
            and weight.shape == (samples,)
            and weight.device == logits.device
            and not weight.requires_grad
        )
    ):  # the usual weights pass as they are; anything else is checked and named
        weight = check_tensor(
            weight, "sample_weight", dtype="floating", shape=(samples,), layout="[S] (one weight per sample)",
            optional=True,
        )
        check_same_device(weight, "sample_weight", logits, "logits")
        if weight.requires_grad:
            weight = weight.detach()
    return_lse = check_bool(return_lse, "return_lse")
    if return_lse and packed is not None:
        raise ValueError("return_lse=True does not take packed rows (segments=, position_ids=)")
    spec = Spec(name, ignore_index, shift, reduction, per_token, config, inplace_backward, options, return_lse)
    if packed is not None:
        return (*_segmented_loss(logits, logits3, packed, weight, spec), None)
    if name != "reference" and weight is not None and weight.dtype != torch.float32:
        weight = weight.to(torch.float32)
    loss, stats, host, lse = _BACKENDS[name].loss(logits, logits3, labels3, weight, spec)
    if reduction == "none" and logits.dim() == 2:
        loss = loss.reshape(labels.shape)  # [N, 1] token losses: one per row, as F.cross_entropy
    if not return_lse:
        return loss, stats, host
    lse = public_lse(lse, labels3, ignore_index, logits.shape[-1], logits.dtype == torch.float64)
    return loss, stats, host, lse.reshape(labels.shape) if logits.dim() == 2 else lse
