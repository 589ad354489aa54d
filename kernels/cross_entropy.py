"""Fused cross-entropy with per-sample statistics, Triton GPU path.

The forward is the statistics kernel of ``sample_stats.py`` with ``WRITE_LSE=True``: one read
of the logits gives the loss of every token, the per-sample statistics and the log-sum-exp
the backward needs. The backward reads the logits a second time (unavoidably) and writes
``(softmax(x) - onehot(y)) * token_scale`` per token, optionally into the logits' storage,
so that no ``[S, T, V]`` buffer is allocated. Imports triton and torch only: the caller
(``geko_core.cross_entropy``) checks the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    BLOCK_V: tl.constexpr,
):
    # d loss / d x = softmax(x) - onehot(y) = exp(x - lse) - onehot(y), times the token's
    # scale; zero for tokens that are not valid (ignored or out-of-range label).

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

    # 2. one pass over V tiles; each tile is read before it is written, so in place is safe.
    #    The rows of tokens that are not valid are not read at all (masked loads).
    offsets = tl.arange(0, BLOCK_V)
    read_limit = tl.where(valid, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=cols < read_limit, other=0.0).to(tl.float32)
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
) -> torch.Tensor:
    """Write ``(softmax(logits3[s, t]) - onehot(labels3[s, t])) * token_scale[s, t]`` into
    ``grad`` (zero rows for tokens that are not valid) and return it.

    Inputs as the caller checked them: ``[S, T, V]`` logits with stride 1 along V, ``[S, T]``
    labels, float64 ``[S, T]`` ``lse``, float32 ``[S, T]`` ``token_scale``, ``grad`` ``[S, T, V]`` in the
    logits' dtype with stride 1 along V and rows that do not overlap (it may be
    ``logits3`` itself: each tile is read before it is written).
    """
    num_samples, seq_len, vocab = logits3.shape
    num_tokens = num_samples * seq_len
    if num_tokens == 0:
        return grad
    block_v, num_warps = stats_launch_config(vocab)
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
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return grad
