"""The kernels of the fused cross-entropy, one entry per compiled backend in ``KERNELS``
(``"cpp"``: the C++ core; ``"triton"``: ``kernels/``), each with the same ``forward`` and
``backward``; ``geko_core.cross_entropy`` runs them inside its autograd Function, and the
linear cross-entropy's chunk loop uses the checked Triton functions below.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from ._backend import load_compiled_core
from ._inputs import check_triton_backward, label_error
from ._reduction import reduce_host, reduce_tokens, sample_scale, token_scale
from .config import GekoConfig, cpp_config_for_kernels
from .loss_options import LossOptions, class_weight_total, cpp_kernel_options, kernel_options
from .stats import forward_blocks_cpp, forward_triton
from .types import SampleStats, TokenStats

__all__ = ["KERNELS", "HostForward", "Spec", "cross_entropy_backward_triton", "cross_entropy_forward_triton", "sample_stats_of"]


class HostForward(NamedTuple):
    """The C++ one-call forward's results in host arrays: what the Selector reads every step,
    so nothing is converted twice."""

    values: np.ndarray  # float32 [6, S]: loss, confidence, label_prob, correct, entropy, el2n
    valid_tokens: np.ndarray  # int32 [S]
    bucket: np.ndarray  # int8 [S]
    valid_total: int  # the batch's valid tokens

    def stats(self) -> SampleStats:
        """The same statistics as tensors sharing these arrays' memory."""
        values = torch.from_numpy(self.values)
        return SampleStats(
            *values.unbind(0), valid_tokens=torch.from_numpy(self.valid_tokens), bucket=torch.from_numpy(self.bucket),
            tokens=None,
        )


class Spec(NamedTuple):
    """What the cross-entropy's autograd Function and its kernels need besides the tensors."""

    backend: str  # "cpp" or "triton"
    ignore_index: int
    shift: bool
    reduction: str  # "none", "per_sample", "sum", "mean", or "token": the raw token losses [S, T] (packed rows)
    per_token: bool
    config: GekoConfig
    inplace: bool
    options: LossOptions = LossOptions()  # temperature, soft-capping, label smoothing, z-loss, class weights
    lse: bool = False  # also output the float64 [S, T] log-sum-exp of every token (its last statistics output)


# -- the kernels: KERNELS[name].forward / .backward -------------------------------------------
# forward(logits3, labels3, weight, spec, grad) -> (loss, statistics outputs, state, HostForward
#   or None), for the reductions "none", "per_sample", "sum", "mean": the one-call C++ forward gives its
#   statistics as a HostForward of host arrays and no statistics outputs. ``grad``: None, or
#   where to write d loss / d logits in the same call ([S, T, V] or the flat logits' [N, V];
#   only where ``gradient_in_forward(spec)``); the backward then only scales it.
# backward(logits3, labels3, state, grad_output, target, spec) writes d loss / d logits into
#   ``target`` ([S, T, V]; None: into logits3 itself). The token losses of packed rows
#   ("token") keep state = (lse,).


def _one_call(spec: Spec) -> bool:
    """The C++ one-call forward: a plain ``"sum"``/``"mean"`` of the token losses."""
    return not spec.per_token and spec.reduction in ("sum", "mean")


class _CppKernels:
    @staticmethod
    def gradient_in_forward(spec: Spec) -> bool:
        # Not in place: the logits must keep their values until the backward.
        return _one_call(spec) and not spec.inplace

    @staticmethod
    def forward(
        logits3: torch.Tensor, labels3: torch.Tensor, weight: torch.Tensor | None, spec: Spec, grad: torch.Tensor | None = None
    ) -> tuple:
        # The compiled core reads a capsule without consuming it: the backward reuses these.
        capsules = (to_dlpack(logits3), to_dlpack(labels3))
        if _one_call(spec):
            # One compiled call: label check, statistics, the weighted reduction, and either the
            # gradient or the log-sum-exp the backward needs.
            samples = labels3.shape[0]
            values = np.empty((6, samples), dtype=np.float32)
            valid = np.empty(samples, dtype=np.int32)
            bucket = np.empty(samples, dtype=np.int8)
            weight_capsule = None if weight is None else to_dlpack(weight)  # read again by the backward
            lse = None
            if grad is None or spec.lse:
                lse = np.empty((samples, labels3.shape[1] if labels3.dim() == 2 else 1), dtype=np.float64)
            lse_capsule = None if lse is None else lse.__dlpack__()
            grad_capsule = None if grad is None else to_dlpack(grad)
            capsules = (*capsules, lse_capsule, weight_capsule)
            args = (
                capsules[0], capsules[1], spec.ignore_index, cpp_config_for_kernels(spec.config), weight_capsule,
                spec.reduction, values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__(), lse_capsule, grad_capsule,
            )
            options = None if spec.options.plain else cpp_kernel_options(spec.options)
            if options is None:
                bad, value, total = load_compiled_core().loss_forward(*args)
                divisor = total
            else:  # "mean" divides by the valid tokens' class weights (their count without)
                bad, value, total, divisor, _ = load_compiled_core().loss_forward(*args, return_totals=True, **options)
            if bad >= 0:
                raise label_error(labels3, bad, logits3.shape[-1], spec.ignore_index)
            # The statistics stay host arrays (no tensor outputs for autograd to track); the
            # caller turns them into tensors only when asked (HostForward.stats).
            host = HostForward(values, valid, bucket, total)
            outputs = (torch.from_numpy(lse),) if spec.lse else ()
            return torch.from_numpy(np.array(value, dtype=np.float32)), outputs, (capsules, divisor, None, None, options), host
        options = None if spec.options.plain else cpp_kernel_options(spec.options)
        trained = None if options is None else torch.empty(labels3.shape, dtype=torch.float32)
        blocks = forward_blocks_cpp(
            logits3, labels3, ignore_index=spec.ignore_index, config=spec.config, per_token=spec.per_token, write_lse=True,
            options=options, loss_out=trained,
        )
        token_loss, valid_tokens = (blocks.token_values[0] if trained is None else trained), blocks.valid_tokens
        divisor = None
        if options is not None:
            divisor = class_weight_total(spec.options, labels3, spec.ignore_index)
        if spec.reduction in ("sum", "mean") and divisor is None:
            # Small CPU batches pay per-op overhead more than arithmetic: reduce on the host.
            loss, total = reduce_host(token_loss.numpy(), valid_tokens.numpy(), weight, spec.reduction)
        else:
            loss = reduce_tokens(token_loss, valid_tokens, weight, spec.reduction, divisor)
            total = None if divisor is None else float(divisor)
        outputs = tuple(blocks[:5]) if spec.per_token else tuple(blocks[:3])
        if spec.lse:
            outputs = (*outputs, blocks.lse)
        return loss, outputs, ((*capsules, to_dlpack(blocks.lse)), total, valid_tokens, weight, options), None

    @staticmethod
    def backward(logits3, labels3, state, grad_output, target, spec) -> None:
        core = load_compiled_core()
        target_capsule = None if target is None else to_dlpack(target)
        if spec.reduction == "token":
            (lse,) = state
            scale = grad_output.to(torch.float32).contiguous()
            core.cross_entropy_backward(
                to_dlpack(logits3), to_dlpack(labels3), to_dlpack(lse), to_dlpack(scale), target_capsule, spec.ignore_index
            )
            return
        capsules, total, valid_tokens, weight, options = state
        if valid_tokens is None:  # the one-call forward: the scale is its weights, the rest one factor
            factor = float(grad_output)
            if spec.reduction == "mean":
                factor = factor / total if total else float("nan")
            scale_capsule = capsules[3]
            if scale_capsule is None:
                scale_capsule = np.ones(labels3.shape[0], dtype=np.float32).__dlpack__()
        else:
            scale, factor = sample_scale(grad_output, valid_tokens, weight, spec.reduction, total)
            scale_capsule = to_dlpack(scale)
        core.cross_entropy_backward(
            capsules[0], capsules[1], capsules[2], scale_capsule, target_capsule, spec.ignore_index, factor,
            **(options or {}),
        )


class _TritonKernels:
    @staticmethod
    def gradient_in_forward(spec: Spec) -> bool:
        return False

    @staticmethod
    def forward(
        logits3: torch.Tensor, labels3: torch.Tensor, weight: torch.Tensor | None, spec: Spec, grad: torch.Tensor | None = None
    ) -> tuple:
        options = kernel_options(spec.options)
        blocks = forward_triton(
            logits3, labels3, ignore_index=spec.ignore_index, config=spec.config, write_lse=True, options=options
        )
        sample_values, valid_tokens, bucket, token_values, token_valid, lse = blocks
        # Under the options the token loss trained on is the last row; the first six are the statistics.
        mean_total = class_weight_total(spec.options, labels3, spec.ignore_index)
        loss = reduce_tokens(token_values[-1] if options else token_values[0], valid_tokens, weight, spec.reduction, mean_total)
        outputs = (*blocks[:3], token_values[:6], token_valid) if spec.per_token else tuple(blocks[:3])
        if spec.lse:
            outputs = (*outputs, lse)
        return loss, outputs, (lse, valid_tokens, weight, mean_total), None

    @staticmethod
    def backward(logits3, labels3, state, grad_output, target, spec) -> None:
        if spec.reduction == "token":
            (lse,) = state
            scale = grad_output.to(torch.float32).contiguous()
        else:
            lse, valid_tokens, weight, mean_total = state
            scale = token_scale(grad_output, valid_tokens, weight, spec.reduction, labels3.shape[1], mean_total)
        cross_entropy_backward_triton(
            logits3, labels3, lse, scale, ignore_index=spec.ignore_index, inplace=target is None, out=target,
            options=kernel_options(spec.options),
        )


KERNELS = {"cpp": _CppKernels, "triton": _TritonKernels}


def sample_stats_of(outputs: tuple, per_token: bool) -> SampleStats:
    tokens = TokenStats(*outputs[3].unbind(0), valid=outputs[4]) if per_token else None
    return SampleStats(*outputs[0].unbind(0), valid_tokens=outputs[1], bucket=outputs[2], tokens=tokens)



# -- the Triton kernels, checked ----------------------------------------------------------------


def cross_entropy_forward_triton(
    logits3: torch.Tensor, labels3: torch.Tensor, *, ignore_index: int, config: GekoConfig, per_token: bool
) -> tuple[SampleStats, torch.Tensor, torch.Tensor]:
    """Forward of the fused cross-entropy with the Triton kernels: statistics (as
    ``sample_stats_triton``), float32 ``[S, T]`` token losses (``lse - x[y]`` for valid
    tokens, 0 for the others) and float64 ``[S, T]`` log-sum-exp of every row, from one read."""
    blocks = forward_triton(logits3, labels3, ignore_index=ignore_index, config=config, write_lse=True)
    return sample_stats_of(blocks, per_token), blocks[3][0], blocks[5]


def cross_entropy_backward_triton(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    lse: torch.Tensor,
    token_scale: torch.Tensor,
    *,
    ignore_index: int,
    inplace: bool,
    out: torch.Tensor | None = None,
    options: dict | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(token_scale * token_loss)`` with respect to the logits, with the
    Triton kernel (``kernels.cross_entropy``); ``options``: the loss options' kernel
    arguments (``loss_options.kernel_options``), the forward's.

    ``grad[s, t, :] = (softmax(logits3[s, t]) - onehot(labels3[s, t])) * token_scale[s, t]``,
    zero rows for tokens that are not valid.

    Args:
        logits3: the forward's ``[S, T, V]`` logits, stride 1 along V.
        labels3: the forward's ``[S, T]`` labels.
        lse: float64 ``[S, T]`` log-sum-exp from the forward (float32 would cost the gradient
            half an ulp of the log-sum-exp, relative, at large logits).
        token_scale: float32 ``[S, T]``, e.g. ``grad_output / num_valid_tokens`` times
            per-sample importance weights.
        ignore_index: as in the forward.
        inplace: write the gradient into the logits' storage and return ``logits3`` (the
            logits are overwritten; their rows must not overlap).
        out: write the gradient here instead of a new tensor (not with ``inplace``):
            ``[S, T, V]`` in the logits' dtype and device, stride 1 along V, rows that do
            not overlap.

    Returns:
        The gradient, ``[S, T, V]`` in the logits' dtype (``logits3`` itself when inplace).

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices or overlapping rows with inplace.
    """
    from .kernels.cross_entropy import launch_cross_entropy_backward

    check_triton_backward(logits3, labels3, lse, token_scale, ignore_index=ignore_index, inplace=inplace, out=out)
    if inplace:
        grad = logits3
    elif out is not None:
        grad = out
    else:
        grad = torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)
    return launch_cross_entropy_backward(logits3, labels3, lse, token_scale, grad, ignore_index=ignore_index, **(options or {}))


