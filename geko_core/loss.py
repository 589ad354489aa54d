"""Fused cross-entropy with per-sample statistics: ``cross_entropy_with_stats``.

The loss and the statistics of ``geko_core.sample_stats`` come from the same pass over
the logits. On CPU tensors the C++ kernels run forward (statistics + token loss +
log-sum-exp) and backward (``softmax - onehot``, scaled per token); on CUDA tensors the
Triton kernels do; ``backend="reference"`` is plain differentiable torch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack
import torch.nn.functional as F

from ._backend import compiled_core_error, load_compiled_core
from ._checks import check_bool, check_choice, check_same_device, check_tensor
from .config import GekoConfig, cpp_config_for_kernels, resolve_config
from .reference import as_samples, sample_stats_reference
from .segments import SegmentMap, prepare_segments, segment_loss, segment_stats
from .stats import MAX_VOCAB as _MAX_VOCAB
from .stats import forward_blocks_cpp, prepare_inputs, segment_token_values, stats_from_blocks
from .types import SampleStats

__all__ = ["cross_entropy_with_stats"]

_REDUCTIONS = ("none", "sum", "mean")
_HOST_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))


class HostForward(NamedTuple):
    """The CPU forward of the fused loss in host arrays (``_HostCrossEntropy``): what the
    Selector reads every step, so nothing is converted twice."""

    values: np.ndarray  # float32 [6, S]: loss, confidence, label_prob, correct, entropy, el2n
    valid_tokens: np.ndarray  # int32 [S]
    bucket: np.ndarray  # int8 [S]
    valid_total: int  # the batch's valid tokens

    def stats(self) -> SampleStats:
        """The statistics as tensors sharing these arrays."""
        return SampleStats(
            *torch.from_numpy(self.values).unbind(0), valid_tokens=torch.from_numpy(self.valid_tokens),
            bucket=torch.from_numpy(self.bucket), tokens=None,
        )


def _reduce(
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


def _token_scale(
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


def _reduce_host(
    losses: np.ndarray, valid_tokens: np.ndarray, weight: torch.Tensor | None, reduction: str
) -> tuple[torch.Tensor, int]:
    """``_reduce`` of the host arrays of CPU token losses ``[S, T]`` and valid-token counts
    ``[S]``, in float64 numpy (a few microseconds instead of several torch reductions);
    returns the float32 loss and the batch's valid-token count."""
    per_sample = losses[:, 0].astype(np.float64) if losses.shape[1] == 1 else losses.sum(axis=1, dtype=np.float64)
    value = float(per_sample.sum() if weight is None else np.dot(per_sample, weight.numpy().astype(np.float64)))
    total = int(valid_tokens.sum())  # int32 counts summed as int64
    if reduction == "mean":
        value = value / total if total else float("nan")  # 0 / 0 = NaN, as F.cross_entropy
    return torch.from_numpy(np.array(value, dtype=np.float32)), total


def _sample_scale(
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


def _capsule(values: "torch.Tensor | np.ndarray") -> Any:
    """A DLPack capsule of a CPU tensor or a host array."""
    return values.__dlpack__() if isinstance(values, np.ndarray) else to_dlpack(values)


def _samples_view(tensor: torch.Tensor, shift: bool) -> torch.Tensor:
    """``tensor`` (logits-shaped) viewed as the kernels' ``[S, T, V]``."""
    if tensor.dim() == 2:
        return tensor.unsqueeze(1)
    return tensor[:, :-1, :] if shift else tensor


def _kernel_backward(function: Any, ctx: Any, grad_output: torch.Tensor) -> Any:
    """The backward of a kernel-backed autograd function: ``function._backward``, through
    ``once_differentiable`` under create_graph=True (the kernels' gradient is not
    differentiable, and the wrapper says so when it is differentiated again; a plain backward
    runs with grad mode off and skips the wrapper's cost)."""
    if torch.is_grad_enabled():
        return function._backward_once(ctx, grad_output)
    return function._backward(ctx, grad_output)


def _label_error(labels3: torch.Tensor, flat: int, vocab: int, ignore_index: int) -> ValueError:
    position = divmod(flat, labels3.shape[1]) if labels3.dim() == 2 else (flat, 0)
    value = labels3[position] if labels3.dim() == 2 else labels3[flat]
    return ValueError(
        f"label {int(value)} at (sample, token) {position} is outside [0, {vocab}) "
        f"and is not ignore_index ({ignore_index})"
    )


class _HostCrossEntropy(torch.autograd.Function):
    """The C++ path for a reduced loss without per-token output: one compiled call forward
    (label check, statistics, log-sum-exp, the weighted reduction), one backward; host
    arrays throughout. The statistics leave through ``out`` as a :class:`HostForward`.

    ``options``: (ignore_index, shift, reduction, kernel config, inplace). ``weight``: a
    float32 ``[S]`` numpy array or None (the backward reads it, so it must not change)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        logits3: torch.Tensor,
        labels3: torch.Tensor,
        weight: np.ndarray | None,
        options: tuple,
        out: list,
    ) -> torch.Tensor:
        ignore_index, _, reduction, kernel_config, _ = options
        samples = labels3.shape[0]
        tokens = labels3.shape[1] if labels3.dim() == 2 else 1
        values = np.empty((6, samples), dtype=np.float32)
        valid = np.empty(samples, dtype=np.int32)
        bucket = np.empty(samples, dtype=np.int8)
        lse = np.empty((samples, tokens), dtype=np.float32)
        # The compiled core reads a capsule without consuming it: the backward reuses these.
        capsules = (
            to_dlpack(logits3.detach()),
            to_dlpack(labels3),
            lse.__dlpack__(),
            None if weight is None else weight.__dlpack__(),
        )
        bad, value, total = load_compiled_core().loss_forward(
            capsules[0], capsules[1], ignore_index, kernel_config, capsules[3], reduction,
            values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__(), capsules[2],
        )
        if bad >= 0:
            raise _label_error(labels3, bad, logits3.shape[-1], ignore_index)
        out.append(HostForward(values, valid, bucket, total))
        ctx.options, ctx.capsules, ctx.valid_total = options, capsules, total
        ctx.logits_shape = logits.shape
        # Saved (not only captured) so that an in-place change of the logits or the labels
        # before the backward is caught by autograd's version check.
        ctx.save_for_backward(logits, logits3, labels3)
        return torch.from_numpy(np.array(value, dtype=np.float32))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        return _kernel_backward(_HostCrossEntropy, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor):
        logits, logits3, labels3 = ctx.saved_tensors
        ignore_index, shift, reduction, _, inplace = ctx.options
        logits_capsule, labels_capsule, lse_capsule, scale_capsule = ctx.capsules
        factor = float(grad_output)
        if reduction == "mean":
            factor = factor / ctx.valid_total if ctx.valid_total else float("nan")
        if scale_capsule is None:
            scale_capsule = np.ones(labels3.shape[0], dtype=np.float32).__dlpack__()
        core = load_compiled_core()
        if inplace and logits3.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            grad = logits.detach()  # the same storage, now holding the gradient
            target = None
        else:
            grad = torch.empty(ctx.logits_shape, dtype=logits.dtype)
            target = to_dlpack(grad[:, :-1] if shift else grad)  # the kernel reads 2-D as [N, 1, V]
        core.cross_entropy_backward(logits_capsule, labels_capsule, lse_capsule, scale_capsule, target, ignore_index, factor)
        if shift and grad.shape[1] > 0:
            grad[:, -1].zero_()  # the last position predicts nothing
        return grad, None, None, None, None, None


_HostCrossEntropy._backward_once = staticmethod(torch.autograd.function.once_differentiable(_HostCrossEntropy._backward))


def _host_loss(
    logits: torch.Tensor,
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    weight: np.ndarray | None,
    *,
    ignore_index: int,
    shift: bool,
    reduction: str,
    config: GekoConfig,
    inplace: bool,
) -> tuple[torch.Tensor, HostForward]:
    """The loss and the host arrays of the C++ path (``reduction`` "sum" or "mean"), from
    checked ``[S, T, V]`` / ``[S, T]`` int64 CPU views, or ``[N, V]`` / ``[N]`` (read as
    ``[N, 1, V]``); the label range is checked here."""
    out: list = []
    options = (ignore_index, shift, reduction, cpp_config_for_kernels(config), inplace)
    loss = _HostCrossEntropy.apply(logits, logits3, labels3, weight, options, out)
    return loss, out[0]


def cpu_loss_fast(
    logits: Any,
    labels: Any,
    weight: np.ndarray | None,
    *,
    ignore_index: Any,
    shift: Any,
    reduction: Any,
    config: GekoConfig,
    inplace: bool,
) -> tuple[torch.Tensor, HostForward] | None:
    """The usual small CPU step in as few operations as possible: plain CPU tensors of an
    accepted dtype, int64 labels of the logits' leading shape, a contiguous last dimension,
    ``reduction`` "sum" or "mean", the compiled core loaded, not under torch.compile. Returns
    None for anything else, having changed nothing: the caller then takes the general path,
    whose checks name the problem. A label out of range raises the general path's
    ValueError."""
    if not (
        type(logits) is torch.Tensor
        and type(labels) is torch.Tensor
        and type(ignore_index) is int
        and type(shift) is bool
        and (reduction == "mean" or reduction == "sum")
        and logits.dtype in _HOST_DTYPES
        and labels.dtype is torch.int64
        and logits.is_cpu
        and labels.is_cpu
        and -(2**63) <= ignore_index < 2**63
    ):
        return None
    dim = logits.dim()
    if dim == 2 and not shift and labels.dim() == 1 and labels.shape[0] == logits.shape[0]:
        logits3, labels3 = logits, labels  # the kernels read them as [N, 1, V] / [N, 1]
    elif dim == 3 and labels.shape == logits.shape[:2]:
        logits3, labels3 = (logits[:, :-1], labels[:, 1:]) if shift else (logits, labels)
    else:
        return None
    if not (2 <= logits.shape[-1] <= _MAX_VOCAB and logits.stride(-1) == 1) or torch.compiler.is_compiling():
        return None
    if compiled_core_error() is not None:
        return None
    return _host_loss(
        logits, logits3, labels3, weight, ignore_index=ignore_index, shift=shift, reduction=reduction, config=config,
        inplace=inplace,
    )


class _FusedCrossEntropy(torch.autograd.Function):
    """One autograd node for the C++ and Triton paths; the statistics leave through ``out``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor | None,
        options: dict,
        out: list,
    ) -> torch.Tensor:
        logits3, labels3 = options.pop("views")  # prepared (and checked) by the caller
        logits3 = logits3.detach()
        if options["backend"] == "cpp":
            # Per-token output or reduction "none" (the rest takes _HostCrossEntropy).
            blocks = forward_blocks_cpp(
                logits3, labels3, ignore_index=options["ignore_index"], config=options["config"],
                per_token=options["per_token"], write_lse=True,
            )
            stats = stats_from_blocks(blocks, options["per_token"])
            token_loss, lse = blocks.token_values[0], blocks.lse
        else:
            from .kernels.cross_entropy import cross_entropy_forward_triton

            stats, token_loss, lse = cross_entropy_forward_triton(
                logits3,
                labels3,
                ignore_index=options["ignore_index"],
                config=options["config"],
                per_token=options["per_token"],
            )
        out.append(stats)
        valid_tokens = stats.valid_tokens
        ctx.options = options
        ctx.logits_shape = logits.shape
        reduction = options["reduction"]
        if options["backend"] == "cpp" and reduction != "none":
            # Small CPU batches pay per-op overhead more than arithmetic: reduce on the host.
            loss, total = _reduce_host(token_loss.numpy(), valid_tokens.numpy(), weight, reduction)
            ctx.valid_total = total
        else:
            if isinstance(token_loss, np.ndarray):
                token_loss = torch.from_numpy(token_loss)
            per_sample = token_loss[:, 0] if token_loss.shape[1] == 1 else token_loss.sum(dim=1)
            loss = _reduce(per_sample, valid_tokens, weight, reduction)
            ctx.valid_total = None
        # This node's own tensors ride on ctx (fewer saved tensors to unpack); the inputs'
        # views are saved, so an in-place change of the logits or labels is still caught.
        ctx.lse, ctx.valid_tokens, ctx.weight = lse, valid_tokens, weight
        ctx.save_for_backward(logits, logits3, labels3)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        return _kernel_backward(_FusedCrossEntropy, ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor):
        logits, logits3, labels3 = ctx.saved_tensors
        lse, valid_tokens, weight = ctx.lse, ctx.valid_tokens, ctx.weight
        options = ctx.options
        shift = options["shift"]
        inplace = options["inplace"]
        # Only the in-place path asks whether the kernels' view shares the logits' memory.
        shares_logits = inplace and logits3.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        if options["backend"] == "cpp":
            core = load_compiled_core()
            scale, factor = _sample_scale(grad_output, valid_tokens, weight, options["reduction"], ctx.valid_total)
            if shares_logits:
                grad = logits.detach()  # the same storage, now holding the gradient
                core.cross_entropy_backward(
                    to_dlpack(logits3), to_dlpack(labels3), _capsule(lse), to_dlpack(scale),
                    None, options["ignore_index"], factor,
                )
            else:
                grad = torch.empty(ctx.logits_shape, dtype=logits.dtype)
                core.cross_entropy_backward(
                    to_dlpack(logits3), to_dlpack(labels3), _capsule(lse), to_dlpack(scale),
                    to_dlpack(_samples_view(grad, shift)), options["ignore_index"], factor,
                )
            if shift and grad.shape[1] > 0:
                grad[:, -1].zero_()  # the last position predicts nothing
            return grad, None, None, None, None

        from .kernels.cross_entropy import cross_entropy_backward_triton

        token_scale = _token_scale(grad_output, valid_tokens, weight, options["reduction"], labels3.shape[1])
        if shares_logits:
            grad = logits.detach()
            cross_entropy_backward_triton(
                logits3.detach(), labels3, lse, token_scale, ignore_index=options["ignore_index"], inplace=True
            )
        else:  # one logits-sized allocation: the kernel writes into the gradient's [S, T, V] view
            grad = torch.empty(ctx.logits_shape, dtype=logits.dtype, device=logits.device)
            cross_entropy_backward_triton(
                logits3.detach(), labels3, lse, token_scale, ignore_index=options["ignore_index"], inplace=False,
                out=_samples_view(grad, shift),
            )
        if shift and grad.shape[1] > 0:
            grad[:, -1].zero_()
        return grad, None, None, None, None


_FusedCrossEntropy._backward_once = staticmethod(torch.autograd.function.once_differentiable(_FusedCrossEntropy._backward))


class _SegmentTokenLoss(torch.autograd.Function):
    """Token losses of packed rows (C++ and Triton paths): the forward keeps every token
    statistic for the per-sample reduction, the backward takes any per-token gradient."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, options: dict, out: list) -> torch.Tensor:  # type: ignore[override]
        logits3, labels3 = options.pop("views")  # labels of tokens of no sample set to ignore_index
        logits3 = logits3.detach()
        values, valid, bad, lse = segment_token_values(
            logits3, labels3, name=options["backend"], ignore_index=options["ignore_index"],
            config=options["config"], write_lse=True,
        )
        out.append((values, valid, bad))
        ctx.options = options
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(logits, logits3, labels3, lse)
        return values[0].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_tokens: torch.Tensor):  # type: ignore[override]
        logits, logits3, labels3, lse = ctx.saved_tensors
        options = ctx.options
        scale = grad_tokens.to(torch.float32).contiguous()
        grad = torch.empty(ctx.logits_shape, dtype=logits.dtype, device=logits.device)
        view = _samples_view(grad, options["shift"])
        if options["backend"] == "cpp":
            load_compiled_core().cross_entropy_backward(
                to_dlpack(logits3), to_dlpack(labels3), to_dlpack(lse), to_dlpack(scale), to_dlpack(view),
                options["ignore_index"],
            )
        else:
            from .kernels.cross_entropy import cross_entropy_backward_triton

            cross_entropy_backward_triton(
                logits3, labels3, lse, scale, ignore_index=options["ignore_index"], inplace=False, out=view
            )
        if options["shift"] and grad.shape[1] > 0:
            grad[:, -1].zero_()  # the last position predicts nothing
        return grad, None, None


def _segmented_loss(
    logits: torch.Tensor,
    logits3: torch.Tensor,
    packed: SegmentMap,
    *,
    name: str,
    ignore_index: int,
    shift: bool,
    weight: torch.Tensor | None,
    reduction: str,
    per_token: bool,
    config: GekoConfig,
) -> tuple[torch.Tensor, SampleStats]:
    """``cross_entropy_with_stats`` over the samples of packed rows."""
    labels3 = packed.labels3
    if name == "reference":
        with torch.no_grad():
            values, valid, bad, _ = segment_token_values(
                logits3.detach(), labels3, name=name, ignore_index=ignore_index, config=config, write_lse=False
            )
        vocab = logits3.shape[-1]
        x = logits3 if logits3.dtype == torch.float64 else logits3.float()
        target = torch.where(valid, labels3, torch.full_like(labels3, -100))
        token_loss = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), ignore_index=-100, reduction="none")
        token_loss = token_loss.reshape(labels3.shape)
    elif name == "op":  # torch.compile: the operator's token losses carry the fused backward
        values, valid, bad, _ = segment_token_values(
            logits3, labels3, name=name, ignore_index=ignore_index, config=config, write_lse=True
        )
        token_loss = values[0]
        values = values.detach()
    else:
        options = {"backend": name, "ignore_index": ignore_index, "shift": shift, "config": config, "views": (logits3, labels3)}
        out: list = []
        token_loss = _SegmentTokenLoss.apply(logits, options, out)
        values, valid, bad = out[0]
    stats = segment_stats(values, valid, bad, packed.owner, packed.num_segments, config, per_token)
    w = None if weight is None else weight.to(token_loss.dtype)
    return segment_loss(token_loss, valid, packed.owner, stats.valid_tokens, w, reduction), stats


def _compiled_loss(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    ignore_index: int,
    weight: torch.Tensor | None,
    reduction: str,
    per_token: bool,
    config: GekoConfig,
) -> tuple[torch.Tensor, SampleStats]:
    """The loss as torch.compile sees it: the ``geko::stats_forward`` operator (whose token
    losses carry the fused backward) and the reduction in plain torch operations."""
    from .ops import config_values, stats_forward
    from .stats import stats_from_blocks

    blocks = stats_forward(logits3, labels3, ignore_index, config_values(config), per_token, True)
    stats = stats_from_blocks(tuple(b.detach() for b in blocks), per_token)
    token_loss = blocks[3][0]
    return _reduce(token_loss.sum(dim=1), stats.valid_tokens, weight, reduction), stats


def _reference_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    logits3, labels3 = as_samples(logits, labels, shift=shift)
    samples, tokens, vocab = logits3.shape
    x = logits3 if logits3.dtype == torch.float64 else logits3.float()
    labels3 = labels3.to(torch.int64)
    valid = (labels3 != ignore_index) & (labels3 >= 0) & (labels3 < vocab)
    # F.cross_entropy masks ignored tokens out of both the loss and the gradient.
    target = torch.where(valid, labels3, torch.full_like(labels3, -100))
    token_loss = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), ignore_index=-100, reduction="none")
    token_loss = token_loss.reshape(samples, tokens)
    w = None if weight is None else weight.to(token_loss.dtype)
    return _reduce(token_loss.sum(dim=1), valid.sum(dim=1), w, reduction)


def cross_entropy_with_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
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
) -> tuple[torch.Tensor, SampleStats]:
    """Differentiable cross-entropy and the per-sample statistics, from one pass.

    Reductions (``w_s`` is ``sample_weight[s]``, 1 when None; ``l_st`` the token loss;
    sums run over valid tokens, i.e. label != ignore_index and in ``[0, V)``):

    * ``"none"``: ``[S]`` per-sample loss ``w_s * mean_t l_st`` (0 for a sample without
      valid tokens);
    * ``"sum"``: ``sum_s w_s sum_t l_st``;
    * ``"mean"``: that sum divided by the number of valid tokens in the batch. Without
      weights this is ``F.cross_entropy(..., reduction="mean")``; with importance weights
      (1 / inclusion probability) it is the unbiased InfoBatch-style estimate; weights are
      not renormalised. No valid token in the batch gives NaN, as torch does.

    A NaN or inf logit in a valid token's row makes that sample's loss NaN on the fused
    (C++/Triton) paths, so a mean or sum is NaN too, and marks the sample invalid in the
    statistics. This differs from ``F.cross_entropy`` for ``-inf`` logits (masked classes),
    which torch handles as probability 0: mask with a large negative finite value instead.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, float32/bfloat16/float16/float64 (float64 not
            on the Triton backend), any strides (see ``sample_stats``).
        labels: ``[N]`` or ``[B, T]``, integer.
        ignore_index: label of tokens that do not count.
        shift: causal-LM shift (3-D only); the gradient of the last position is 0.
        sample_weight: optional float ``[S]`` (``S = N`` or ``B``) per-sample weights, e.g.
            the planner's importance weights. Treated as constants: no gradient flows to
            them.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        per_token: also return token-level statistics.
        config: thresholds of the instant bucket.
        backend: ``None`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or
            ``"reference"`` (plain torch, differentiable in float64; use it for gradcheck).
        inplace_backward: the fused backends write the gradient into the logits' own
            storage (as Liger-Kernel does) instead of allocating one: saves a logits-sized
            buffer, but the logits tensor is overwritten by its gradient during backward, so
            do not use it afterwards. Ignored on the reference path, with segments, and
            when the logits had to be copied (non-contiguous last dimension).
        segments, position_ids, num_segments: packed rows, as in ``sample_stats``: the
            statistics, ``sample_weight`` (``[K]``) and the reductions are then per sample
            (``"none"`` gives ``K`` losses, ``"mean"`` divides by the batch's valid tokens),
            and the loss and its gradient equal those of the samples computed alone.

    Returns:
        (loss, stats): ``loss`` is float32 (float64 on the reference path for float64
        logits), a scalar or ``[S]`` for ``"none"``; its gradient flows to ``logits`` only,
        in the logits' dtype. ``stats`` is the detached ``SampleStats`` of ``sample_stats``.

    Raises:
        TypeError, ValueError: as ``sample_stats``; also an unknown reduction, a
            ``sample_weight`` that is not a float tensor of shape ``[S]`` on the logits'
            device.
    """
    loss, stats, _ = _loss_and_stats(
        logits, labels, ignore_index=ignore_index, shift=shift, sample_weight=sample_weight, reduction=reduction,
        per_token=per_token, config=config, backend=backend, inplace_backward=inplace_backward, segments=segments,
        position_ids=position_ids, num_segments=num_segments,
    )
    return loss, stats


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
) -> tuple[torch.Tensor, SampleStats, HostForward | None]:
    """``cross_entropy_with_stats`` and, on the C++ path, what the Selector reads on the host
    every step (so it converts nothing again); None on the other paths."""

    config = resolve_config(config)
    check_choice(reduction, "reduction", _REDUCTIONS)
    per_token = check_bool(per_token, "per_token")
    inplace_backward = check_bool(inplace_backward, "inplace_backward")
    logits3, labels3, name, ignore_index, shift = prepare_inputs(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend
    )
    packed = None
    if segments is not None or position_ids is not None or num_segments is not None:
        packed = prepare_segments(
            segments, position_ids, num_segments, labels=labels, labels3=labels3, shift=shift, ignore_index=ignore_index
        )
    weight = check_tensor(
        sample_weight,
        "sample_weight",
        dtype="floating",
        shape=(logits3.shape[0] if packed is None else packed.num_segments,),
        layout="[S] (one weight per sample)",
        optional=True,
    )
    if weight is not None:
        check_same_device(weight, "sample_weight", logits, "logits")
        if weight.requires_grad:
            weight = weight.detach()
    if packed is not None:
        return (
            *_segmented_loss(
                logits, logits3, packed, name=name, ignore_index=ignore_index, shift=shift,
                weight=weight,
                reduction=reduction, per_token=per_token, config=config,
            ),
            None,
        )

    if name == "reference":
        loss = _reference_loss(logits, labels, ignore_index=ignore_index, shift=shift, weight=weight, reduction=reduction)
        with torch.no_grad():
            stats = sample_stats_reference(
                logits3.detach(), labels3, ignore_index=ignore_index, per_token=per_token, config=config
            )
        return loss, stats, None

    if weight is not None and weight.dtype != torch.float32:
        weight = weight.to(torch.float32)
    if torch.compiler.is_compiling():
        return (*_compiled_loss(logits3, labels3, ignore_index, weight, reduction, per_token, config), None)
    if name == "cpp" and not per_token and reduction != "none":
        loss, host = _host_loss(
            logits, logits3, labels3, None if weight is None else weight.numpy(), ignore_index=ignore_index,
            shift=shift, reduction=reduction, config=config, inplace=inplace_backward,
        )
        return loss, host.stats(), host
    options = {
        "backend": name,
        "ignore_index": ignore_index,
        "shift": shift,
        "reduction": reduction,
        "per_token": per_token,
        "config": config,
        "inplace": inplace_backward,
        "views": (logits3, labels3),
    }
    out: list = []
    loss = _FusedCrossEntropy.apply(logits, labels, weight, options, out)
    return loss, out[0], None
