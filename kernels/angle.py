"""Angle concentration of token hidden states (GAIN-RL, docs/design.md §4), Triton GPU path.

``Σ_{i<j} cos(xᵢ, xⱼ) = (‖Σ x̂ᵢ‖² − Σ ‖x̂ᵢ‖²) / 2`` needs each token's full norm before its
normalised vector can be summed, and the sum ``s`` is a d-vector (d up to 16384: 64 KB of
fp32, more than one program can hold in registers). Three launches, no host synchronisation,
no atomics (deterministic):

1. ``_angle_norms_kernel``, one program per (sequence, tile of ``BLOCK_T`` tokens): loops
   over d tiles, accumulating squares in fp32; writes each token's inverse norm (0 for a
   token that is masked out, a zero vector or not finite) and a status byte
   (0 masked out, 1 zero vector, 2 counted, 3 not finite). Masked-out rows are never read.
2. ``_angle_sums_kernel``, one program per (sequence, chunk of ``BLOCK_D`` features): loops
   over token tiles, accumulating ``x·inv_norm`` (and the prefix part) in a
   ``[BLOCK_T, BLOCK_D]`` fp32 register tile, reduces it once at the end, and writes two
   partial dot products per chunk: ``‖s_chunk‖²`` and ``s_P,chunk · s_Q,chunk``. The d-chunks
   partition d, so the partials add up to the full dot products.
3. ``_angle_finalize_kernel``, one program per sequence: counts (valid, nonzero, prefix,
   bad) from the status bytes, sums the partials over chunks, writes the outputs.

The hidden states are read twice (phase 1 and 2). Splitting d across programs in phase 2
gives ``B·d/BLOCK_D`` programs (512 for B = 8, d = 4096) where one program per sequence
would give B, and keeps every program's tile at 16 fp32 values per thread whatever d is,
so nothing spills (``kernels/aot.py``). A single-read variant (per-token-tile partial sums
of ``s``, reduced by a further pass) would trade the second read for ``4·d/BLOCK_T`` bytes of
partials per token tile; not worth the complexity for a signal computed once per sample.

The torch oracle is ``geko_core.angle.angle_concentration_reference``. This module imports
triton and torch only: ``geko_core.angle`` checks the inputs and wraps the tensors it returns.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["finalize_launch_config", "launch_angle_concentration", "norms_launch_config", "sums_launch_config"]

# Register tile of phases 1 and 2 (elements): 16 fp32 per thread with 4 warps.
TILE_ELEMENTS = 2048
NUM_WARPS = 4
# Largest feature tile of phase 1 (norms) and phase 2 (sums). Phase 2's is small so that
# d is split across many programs; 64 bf16 values are one 128-byte line per token.
MAX_BLOCK_D_NORMS = 512
MAX_BLOCK_D_SUMS = 64
# Largest token / chunk tile of the finalize kernel. Tests lower these to cross tiles.
MAX_BLOCK_T = 512
MAX_BLOCK_CHUNKS = 1024

# Token status written by phase 1.
_MASKED = tl.constexpr(0)
_ZERO = tl.constexpr(1)
_COUNTED = tl.constexpr(2)
_BAD = tl.constexpr(3)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _angle_norms_kernel(
    hidden_ptr,  # [B, T, D] fp32/bf16/fp16, stride along D == 1
    mask_ptr,  # [B, T] uint8/int32/int64 (nonzero = valid), any strides; read when HAS_MASK
    inv_norm_ptr,  # fp32 [B, T] contiguous: 1/||x|| for counted tokens, else 0
    status_ptr,  # int8 [B, T] contiguous: 0 masked out, 1 zero vector, 2 counted, 3 not finite
    T,
    D,
    stride_hb,
    stride_ht,
    stride_mb,
    stride_mt,
    HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # 1. which tokens; int64 before any stride product (B*T*D passes 2**31). One flat grid
    #    axis (sequence-major): the second grid axis is limited to 65535 tiles.
    pid = tl.program_id(0).to(tl.int64)
    num_tiles = tl.cdiv(T, BLOCK_T)
    b = pid // num_tiles
    offs_t = (pid % num_tiles).to(tl.int32) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    valid = in_t
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mb + offs_t.to(tl.int64) * stride_mt, mask=in_t, other=0)
        valid = in_t & (m != 0)
    rows = hidden_ptr + b * stride_hb + offs_t.to(tl.int64)[:, None] * stride_ht

    # 2. sum of squares over d tiles, per-lane fp32 accumulators, one reduction at the end.
    #    Rows of tokens that are not valid are not read (padding may hold NaN).
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(rows + offs_d[None, :], mask=valid[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        acc += x * x
    sumsq = tl.sum(acc, axis=1)

    # 3. inverse norm and status. NaN/inf entries, or squares overflowing fp32, make the
    #    sum not finite: the token is bad (its sequence invalid) and contributes nothing.
    finite = tl.abs(sumsq) < float("inf")  # False for NaN too
    nonzero = valid & finite & (sumsq > 0.0)
    inv_norm = tl.where(nonzero, 1.0 / tl.sqrt_rn(tl.where(nonzero, sumsq, 1.0)), 0.0)
    status = tl.where(valid, tl.where(finite, tl.where(nonzero, _COUNTED, _ZERO), _BAD), _MASKED)
    out = b * T + offs_t
    tl.store(inv_norm_ptr + out, inv_norm, mask=in_t)
    tl.store(status_ptr + out, status.to(tl.int8), mask=in_t)


@triton.jit
def _angle_sums_kernel(
    hidden_ptr,  # [B, T, D] fp32/bf16/fp16, stride along D == 1
    inv_norm_ptr,  # fp32 [B, T] contiguous (phase 1)
    prefix_ptr,  # int64 [B] contiguous, read when HAS_PREFIX
    partial_ptr,  # fp32 [B, num_chunks, 2] contiguous: ||s_c||^2, s_P,c . s_Q,c
    T,
    D,
    num_chunks,
    stride_hb,
    stride_ht,
    HAS_PREFIX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Maths: s = sum_t inv_norm_t x_t over counted tokens, s_P the same over positions
    # t < prefix, s_Q = s - s_P. This program owns features [chunk*BLOCK_D, +BLOCK_D).
    # 1. locate the feature chunk
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    base = hidden_ptr + b * stride_hb + offs_d[None, :]
    if HAS_PREFIX:
        prefix = tl.load(prefix_ptr + b)

    # 2. normalised sums over token tiles; [BLOCK_T, BLOCK_D] accumulators, reduced once
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    acc_prefix = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < T
        inv_norm = tl.load(inv_norm_ptr + b * T + offs_t, mask=in_t, other=0.0)
        counted = inv_norm != 0.0  # masked-out, zero and bad tokens are not read
        x = tl.load(
            base + offs_t.to(tl.int64)[:, None] * stride_ht, mask=counted[:, None] & in_d[None, :], other=0.0
        ).to(tl.float32)
        y = x * inv_norm[:, None]
        acc += y
        if HAS_PREFIX:
            acc_prefix += tl.where((offs_t < prefix)[:, None], y, 0.0)

    # 3. partial dot products of this chunk
    total = tl.sum(acc, axis=0)
    out = partial_ptr + (b * num_chunks + chunk) * 2
    tl.store(out, tl.sum(total * total, axis=0))
    if HAS_PREFIX:
        prefix_sum = tl.sum(acc_prefix, axis=0)
        tl.store(out + 1, tl.sum(prefix_sum * (total - prefix_sum), axis=0))


@triton.jit
def _angle_finalize_kernel(
    status_ptr,  # int8 [B, T] contiguous (phase 1)
    partial_ptr,  # fp32 [B, num_chunks, 2] contiguous (phase 2)
    prefix_ptr,  # int64 [B] contiguous, read when HAS_PREFIX
    concentration_ptr,  # fp32 [B]
    cross_ptr,  # fp32 [B], written when HAS_PREFIX
    valid_tokens_ptr,  # int32 [B]
    T,
    num_chunks,
    HAS_PREFIX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # concentration = (||s||^2 - n_nonzero) / (n (n - 1)),  cross = s_P . s_Q / (n_P n_Q)
    b = tl.program_id(0).to(tl.int64)
    if HAS_PREFIX:
        prefix = tl.load(prefix_ptr + b)

    # 1. token counts from the status bytes (per-lane int32 counters)
    n_valid = tl.zeros((BLOCK_T,), dtype=tl.int32)
    n_nonzero = tl.zeros((BLOCK_T,), dtype=tl.int32)
    n_bad = tl.zeros((BLOCK_T,), dtype=tl.int32)
    n_prefix = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        status = tl.load(status_ptr + b * T + offs_t, mask=offs_t < T, other=0).to(tl.int32)
        is_valid = status != _MASKED
        n_valid += is_valid.to(tl.int32)
        n_nonzero += (status == _COUNTED).to(tl.int32)
        n_bad += (status == _BAD).to(tl.int32)
        if HAS_PREFIX:
            n_prefix += (is_valid & (offs_t < prefix)).to(tl.int32)
    valid = tl.sum(n_valid, axis=0)
    nonzero = tl.sum(n_nonzero, axis=0)
    good = tl.sum(n_bad, axis=0) == 0

    # 2. the partial dot products over feature chunks
    sq_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cross_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, num_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ptrs = partial_ptr + (b * num_chunks + offs_c) * 2
        sq_acc += tl.load(ptrs, mask=offs_c < num_chunks, other=0.0)
        if HAS_PREFIX:
            cross_acc += tl.load(ptrs + 1, mask=offs_c < num_chunks, other=0.0)

    # 3. outputs; NaN for invalid sequences (fewer than 2 valid tokens, a bad token)
    n = valid.to(tl.float32)
    pairs = n * (n - 1.0)
    ok = (valid >= 2) & good
    concentration = (tl.sum(sq_acc, axis=0) - nonzero.to(tl.float32)) / tl.where(ok, pairs, 1.0)
    tl.store(concentration_ptr + b, tl.where(ok, concentration, float("nan")))
    tl.store(valid_tokens_ptr + b, valid)
    if HAS_PREFIX:
        in_prefix = tl.sum(n_prefix, axis=0)
        denominator = in_prefix.to(tl.float32) * (valid - in_prefix).to(tl.float32)
        cross_ok = (denominator > 0.0) & good & (prefix >= 0) & (prefix <= T)
        cross = tl.sum(cross_acc, axis=0) / tl.where(cross_ok, denominator, 1.0)
        tl.store(cross_ptr + b, tl.where(cross_ok, cross, float("nan")))


def norms_launch_config(dim: int, tokens: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_D)`` of phase 1: d tiles up to ``MAX_BLOCK_D_NORMS``, the rest of the
    ``TILE_ELEMENTS`` register tile spent on tokens."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), MAX_BLOCK_D_NORMS)
    block_t = min(max(TILE_ELEMENTS // block_d, 1), triton.next_power_of_2(max(tokens, 1)))
    return block_t, block_d


def sums_launch_config(dim: int, tokens: int) -> tuple[int, int]:
    """``(BLOCK_T, BLOCK_D)`` of phase 2: small feature chunks (many programs)."""
    block_d = min(triton.next_power_of_2(max(dim, 1)), MAX_BLOCK_D_SUMS)
    block_t = min(max(TILE_ELEMENTS // block_d, 1), triton.next_power_of_2(max(tokens, 1)))
    return block_t, block_d


def finalize_launch_config(tokens: int, num_chunks: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_C, num_warps)`` of the finalize kernel. Token tiles stop at 512:
    with 1024 (8 counters per thread) sm_80 spilled 16 bytes."""
    block_t = max(16, min(triton.next_power_of_2(max(tokens, 1)), MAX_BLOCK_T))
    block_c = max(16, min(triton.next_power_of_2(max(num_chunks, 1)), MAX_BLOCK_CHUNKS))
    return block_t, block_c, 1 if block_t < 512 else 4


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch_angle_concentration(
    hidden: torch.Tensor, mask: Optional[torch.Tensor], prefix: Optional[torch.Tensor], has_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-sequence angle concentration with the Triton kernels (three launches, no host sync),
    on inputs the caller checked (``geko_core.angle``).

    Args:
        hidden: ``[B, T, d]`` float32/bfloat16/float16 on a CUDA device (or the CPU under
            ``TRITON_INTERPRET=1``), stride 1 along d; other strides are free.
        mask: ``[B, T]`` bool or integer, nonzero = valid; None = all valid. Any strides.
        prefix: contiguous int64 ``[B]`` prefix lengths in ``[0, T]`` when ``has_prefix``.

    Returns:
        ``(concentration, valid_tokens, cross)``: float32 ``[B]``, int32 ``[B]``, float32
        ``[B]`` with a prefix else None (semantics of ``angle_concentration_reference``).
    """
    batch, tokens, dim = hidden.shape
    device = hidden.device

    concentration = torch.empty((batch,), dtype=torch.float32, device=device)
    valid_tokens = torch.empty((batch,), dtype=torch.int32, device=device)
    cross = torch.empty((batch,), dtype=torch.float32, device=device) if has_prefix else None
    if batch == 0:
        return concentration, valid_tokens, cross
    if tokens == 0:  # no token buffers to hand the kernels (null pointers): every sequence is empty
        concentration.fill_(float("nan"))
        valid_tokens.zero_()
        if cross is not None:
            cross.fill_(float("nan"))
        return concentration, valid_tokens, cross

    inv_norm = torch.empty((batch, tokens), dtype=torch.float32, device=device)
    status = torch.empty((batch, tokens), dtype=torch.int8, device=device)
    sums_block_t, sums_block_d = sums_launch_config(dim, tokens)
    num_chunks = triton.cdiv(dim, sums_block_d)
    partials = torch.empty((batch, num_chunks, 2), dtype=torch.float32, device=device)

    with _device_guard(device):
        block_t, block_d = norms_launch_config(dim, tokens)
        _angle_norms_kernel[(batch * triton.cdiv(tokens, block_t),)](
            hidden,
            hidden if mask is None else mask,  # unused when HAS_MASK is False
            inv_norm,
            status,
            tokens,
            dim,
            hidden.stride(0),
            hidden.stride(1),
            0 if mask is None else mask.stride(0),
            0 if mask is None else mask.stride(1),
            HAS_MASK=mask is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
        _angle_sums_kernel[(batch, num_chunks)](
            hidden,
            inv_norm,
            partials if prefix is None else prefix,  # unused when HAS_PREFIX is False
            partials,
            tokens,
            dim,
            num_chunks,
            hidden.stride(0),
            hidden.stride(1),
            HAS_PREFIX=has_prefix,
            BLOCK_T=sums_block_t,
            BLOCK_D=sums_block_d,
            num_warps=NUM_WARPS,
        )
        block_t, block_c, num_warps = finalize_launch_config(tokens, num_chunks)
        _angle_finalize_kernel[(batch,)](
            status,
            partials,
            partials if prefix is None else prefix,
            concentration,
            concentration if cross is None else cross,
            valid_tokens,
            tokens,
            num_chunks,
            HAS_PREFIX=has_prefix,
            BLOCK_T=block_t,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return concentration, valid_tokens, cross
