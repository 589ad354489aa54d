"""Fused cross-entropy with per-sample statistics, Triton GPU path.

The forward is the statistics kernel of ``sample_stats.py`` with ``WRITE_LSE=True``: one read
of the logits gives the loss of every token, the per-sample statistics and the log-sum-exp
the backward needs. The backward reads the logits a second time (unavoidably) and writes
``(softmax(x) - onehot(y)) * token_scale`` per token, optionally into the logits' storage,
so that no ``[S, T, V]`` buffer is allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from geko_core.config import GekoConfig
from geko_core.types import SampleStats

from .sample_stats import _device_guard, check_inputs, launch_sample_stats, stats_launch_config

__all__ = ["cross_entropy_backward_triton", "cross_entropy_forward_triton"]


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr,  # [S, T, V] fp32/bf16/fp16, stride along V == 1
    labels_ptr,  # [S, T] int64 (or int32)
    lse_ptr,  # fp32 [S, T] from the forward
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
        prob = tl.exp(x - lse)
        grad = (prob - tl.where(cols == label, 1.0, 0.0)) * scale
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def cross_entropy_forward_triton(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    *,
    ignore_index: int,
    config: GekoConfig,
    per_token: bool,
) -> tuple[SampleStats, torch.Tensor, torch.Tensor]:
    """Forward of the fused cross-entropy: token losses, statistics and log-sum-exp, one read.

    Args:
        logits3: ``[S, T, V]`` float32/bfloat16/float16, stride 1 along V, other strides free.
        labels3: ``[S, T]`` int64 (int32 accepted), any strides.
        ignore_index: label of tokens to skip.
        config: bucket thresholds.
        per_token: also return token-level statistics in ``SampleStats.tokens``.

    Returns:
        (stats, token_loss, lse): ``stats`` as ``sample_stats_triton``; ``token_loss`` float32
        ``[S, T]``, ``lse - x[y]`` for valid tokens and 0 for the others; ``lse`` float32
        ``[S, T]``, the log-sum-exp of every row (valid or not), input of the backward.
    """
    stats, token_loss, lse = launch_sample_stats(
        logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token, write_lse=True
    )
    if lse is None:  # write_lse=True asks for it: an internal invariant, kept under python -O
        raise RuntimeError("cross_entropy_forward_triton: internal error (the kernel wrote no log-sum-exp)")
    return stats, token_loss, lse


def _rows_may_overlap(logits3: torch.Tensor) -> bool:
    """True when two (s, t) rows of V elements could share memory (e.g. an expand)."""
    num_samples, seq_len, vocab = logits3.shape
    dims = sorted(
        ((logits3.stride(i), size) for i, size in ((0, num_samples), (1, seq_len)) if size > 1),
        key=lambda stride_size: stride_size[0],
    )
    extent = vocab  # elements spanned by everything inside the current dimension
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def cross_entropy_backward_triton(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    lse: torch.Tensor,
    token_scale: torch.Tensor,
    *,
    ignore_index: int,
    inplace: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of ``sum(token_scale * token_loss)`` with respect to the logits.

    ``grad[s, t, :] = (softmax(logits3[s, t]) - onehot(labels3[s, t])) * token_scale[s, t]``,
    zero rows for tokens that are not valid.

    Args:
        logits3: the forward's ``[S, T, V]`` logits, stride 1 along V.
        labels3: the forward's ``[S, T]`` labels.
        lse: float32 ``[S, T]`` from ``cross_entropy_forward_triton``.
        token_scale: float32 ``[S, T]``, e.g. ``grad_output / num_valid_tokens`` times
            per-sample importance weights.
        ignore_index: as in the forward.
        inplace: write the gradient into the logits' storage and return ``logits3`` (the
            logits are overwritten; their rows must not overlap).
        out: write the gradient here instead of a new tensor (not with ``inplace``):
            ``[S, T, V]`` in the logits' dtype and device, stride 1 along V, rows that do
            not overlap, e.g. the ``[S, T, V]`` view of a logits-shaped gradient, so that
            the backward allocates nothing logits-sized besides it.

    Returns:
        The gradient, ``[S, T, V]`` in the logits' dtype (``logits3`` itself when inplace).

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices or overlapping rows with inplace.
    """
    check_inputs(logits3, labels3)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    rows = tuple(logits3.shape[:2])
    for name, value in (("lse", lse), ("token_scale", token_scale)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {value.dtype}")
        if tuple(value.shape) != rows:
            raise ValueError(f"{name} must be [S, T] = {rows}, got {tuple(value.shape)}")
        if value.device != logits3.device:
            raise ValueError(f"{name} is on {value.device} but logits3 is on {logits3.device}")
    if inplace and _rows_may_overlap(logits3):
        raise ValueError(f"inplace=True needs logits3 rows that do not overlap, got strides {logits3.stride()}")

    if out is not None:
        if inplace:
            raise ValueError("out= and inplace=True exclude each other")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != logits3.shape or out.dtype != logits3.dtype or out.device != logits3.device:
            raise ValueError(
                f"out must be {tuple(logits3.shape)} {logits3.dtype} on {logits3.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if out.stride(-1) != 1 or _rows_may_overlap(out):
            raise ValueError(f"out needs stride 1 along V and rows that do not overlap, got strides {out.stride()}")
    num_samples, seq_len, vocab = logits3.shape
    if inplace:
        grad = logits3
    elif out is not None:
        grad = out
    else:
        grad = torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)
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
