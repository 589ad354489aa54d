"""Fused cross-entropy with per-sample statistics, Triton GPU path.

The forward is the statistics kernel of ``sample_stats.py`` with ``WRITE_LSE=True``: one read
of the logits gives the loss of every token, the per-sample statistics and the log-sum-exp
the backward needs. The backward reads the logits a second time (unavoidably) and writes
``(softmax(x) - onehot(y)) * token_scale`` per token (under the loss options, the closed-form
gradient of the option token loss), optionally into the logits' storage, so that no
``[S, T, V]`` buffer is allocated. Imports triton and torch only: the caller
(``geko_core.cross_entropy``) checks the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .loss_options import _transformed_logits, check_kernel_options
from .sample_stats import _device_guard, stats_launch_config

__all__ = ["launch_cross_entropy_backward"]


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr,  # [S, T, V] fp32/bf16/fp16, stride along V == 1
    labels_ptr,  # [S, T] int64 (or int32)
    lse_ptr,  # fp64 [S, T] from the forward
    scale_ptr,  # fp32 [S, T]: d(total loss) / d(token loss)
    grad_ptr,  # [S, T, V] logits dtype, stride along V == 1; may alias logits_ptr
    T,
    V,
    stride_ls,
    stride_lt,
    stride_ys,
    stride_yt,
    stride_lse_s,
    stride_lse_t,
    stride_scale_s,
    stride_scale_t,
    stride_gs,
    stride_gt,
    ignore_index,
    class_weight_ptr,  # fp32 [V], read when HAS_CLASS_WEIGHT
    weight_sum_ptr,  # fp32 [1]: sum of class_weight, read when HAS_SMOOTHING and HAS_CLASS_WEIGHT
    temperature,  # fp32 > 0, used when HAS_TEMPERATURE
    softcap,  # fp32 > 0, used when HAS_SOFTCAP
    label_smoothing,  # fp32 in [0, 1], used when HAS_SMOOTHING
    z_loss,  # fp32 >= 0, used when HAS_Z_LOSS
    BLOCK_V: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
):
    # d loss / d x = softmax(x) - onehot(y) = exp(x - lse) - onehot(y), times the token's
    # scale; zero for tokens that are not valid (ignored or out-of-range label).
    # Under the loss options (geko_core/loss_options.py), with z the transformed logits,
    # p = softmax(z) = exp(z - lse) (lse of z, from the forward) and W = sum_j w_j:
    #   d l / d z_k = w_y (1 - eps) (p_k - [k = y]) + (eps / V) (W p_k - w_k) + 2 zeta lse p_k
    #   d z / d x = (1 - (z / softcap)^2) / temperature
    # (1 / temperature for a -inf logit, which soft-capping leaves as it is). The constexprs
    # remove every term of an option that is off.

    # 1. locate the row; int64 before multiplying by strides
    row = tl.program_id(0).to(tl.int64)
    s = row // T
    t = row % T
    label = tl.load(labels_ptr + s * stride_ys + t * stride_yt).to(tl.int64)
    valid = (label != ignore_index) & (label >= 0) & (label < V)
    lse = tl.load(lse_ptr + s * stride_lse_s + t * stride_lse_t)
    # lse as a float32 pair hi + lo: (x - hi) - lo is x - lse to float32 precision however
    # large the logits (x - hi is exact near the max, where the probabilities are not small);
    # a float32 lse alone is off by up to half its ulp, a relative error of exp(x - lse).
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    scale = tl.load(scale_ptr + s * stride_scale_s + t * stride_scale_t)
    row_ptr = logits_ptr + s * stride_ls + t * stride_lt
    grad_row_ptr = grad_ptr + s * stride_gs + t * stride_gt
    if HAS_CLASS_WEIGHT:
        label_coef = tl.load(class_weight_ptr + tl.where(valid, label, 0))  # w_y
    else:
        label_coef = 1.0
    if HAS_SMOOTHING:
        label_coef = label_coef * (1.0 - label_smoothing)
        smooth_coef = label_smoothing / V
        if HAS_CLASS_WEIGHT:
            weight_sum = tl.load(weight_sum_ptr)
        else:
            weight_sum = V * 1.0
    if HAS_Z_LOSS:
        z_coef = 2.0 * z_loss * lse_hi

    # 2. one pass over V tiles; each tile is read before it is written, so in place is safe.
    #    The rows of tokens that are not valid are not read at all (masked loads).
    offsets = tl.arange(0, BLOCK_V)
    read_limit = tl.where(valid, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=cols < read_limit, other=0.0).to(tl.float32)
        if HAS_TEMPERATURE or HAS_SOFTCAP or HAS_SMOOTHING or HAS_Z_LOSS or HAS_CLASS_WEIGHT:
            z = _transformed_logits(x, temperature, softcap, HAS_TEMPERATURE, HAS_SOFTCAP)
            prob = tl.exp((z - lse_hi) - lse_lo)
            grad = label_coef * (prob - tl.where(cols == label, 1.0, 0.0))
            if HAS_SMOOTHING:
                if HAS_CLASS_WEIGHT:
                    w = tl.load(class_weight_ptr + cols, mask=cols < read_limit, other=0.0)
                else:
                    w = 1.0
                grad += smooth_coef * (weight_sum * prob - w)
            if HAS_Z_LOSS:
                grad += z_coef * prob
            if HAS_SOFTCAP:
                # d z / d u = 1 - tanh^2 = 1 - (z / softcap)^2; 1 for a -inf logit, which the
                # reference's torch.where passes through
                capped = z / softcap
                grad = grad * tl.where(z == -float("inf"), 1.0, 1.0 - capped * capped)
            if HAS_TEMPERATURE:
                grad = grad / temperature
            grad = grad * scale
        else:
            prob = tl.exp((x - lse_hi) - lse_lo)  # 0 for -inf logits (masked classes)
            grad = (prob - tl.where(cols == label, 1.0, 0.0)) * scale
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def launch_cross_entropy_backward(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    lse: torch.Tensor,
    token_scale: torch.Tensor,
    grad: torch.Tensor,
    *,
    ignore_index: int,
    temperature: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write ``(softmax(logits3[s, t]) - onehot(labels3[s, t])) * token_scale[s, t]`` into
    ``grad`` (zero rows for tokens that are not valid) and return it.

    Inputs as the caller checked them: ``[S, T, V]`` logits with stride 1 along V, ``[S, T]``
    labels, float64 ``[S, T]`` ``lse``, float32 ``[S, T]`` ``token_scale``, ``grad`` ``[S, T, V]`` in the
    logits' dtype with stride 1 along V and rows that do not overlap (it may be
    ``logits3`` itself: each tile is read before it is written).

    Args:
        temperature, softcap, label_smoothing, z_loss, class_weight: the loss options of
            ``geko_core/loss_options.py``, as given to the forward (``launch_token_stats``);
            ``lse`` is then the forward's log-sum-exp of ``z``. With any option set the
            gradient written is ``d l / d x`` of the option token loss ``l`` (its closed form
            there), times ``token_scale``; the defaults compile the kernel without options.

    Raises:
        TypeError, ValueError: a bad option (see ``check_kernel_options``).
    """
    num_samples, seq_len, vocab = logits3.shape
    num_tokens = num_samples * seq_len
    options = check_kernel_options(
        vocab=vocab,
        device=logits3.device,
        temperature=temperature,
        softcap=softcap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        class_weight=class_weight,
    )
    if num_tokens == 0:
        return grad
    block_v, num_warps = stats_launch_config(vocab)
    # W, summed on the device (no host synchronisation), only when the smoothing term reads it
    weight_sum = token_scale  # (float32, unused)
    if options.flags["HAS_SMOOTHING"] and class_weight is not None:
        weight_sum = class_weight.sum(dtype=torch.float32).reshape(1)
    with _device_guard(logits3.device):
        _cross_entropy_backward_kernel[(num_tokens,)](
            logits3,
            labels3,
            lse,
            token_scale,
            grad,
            seq_len,
            vocab,
            logits3.stride(0),
            logits3.stride(1),
            labels3.stride(0),
            labels3.stride(1),
            lse.stride(0),
            lse.stride(1),
            token_scale.stride(0),
            token_scale.stride(1),
            grad.stride(0),
            grad.stride(1),
            ignore_index,
            token_scale if class_weight is None else class_weight,  # unused without class weights
            weight_sum,
            options.temperature,
            options.softcap,
            options.label_smoothing,
            options.z_loss,
            BLOCK_V=block_v,
            **options.flags,
            num_warps=num_warps,
        )
    return grad
