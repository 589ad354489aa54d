"""Fused per-sample statistics of ``[S, T, V]`` logits (docs/design.md §2), Triton GPU path.

Two launches, no host synchronisation:

1. ``_sample_stats_kernel``: one program per token (row of V logits). An online softmax over
   V tiles in fp32 gives, from a single read of the row, the log-sum-exp, the loss, the
   confidence, the label probability, the argmax, the entropy and the EL2N norm. It writes
   six fp32 values and two int8 flags per token (``O(S*T)`` bytes), and optionally the
   log-sum-exp for the backward of the fused cross-entropy (``WRITE_LSE``). Under the loss
   options (``loss_options.py``) it reads ``z``, the logits after temperature and
   soft-capping, and writes a seventh value, the option token loss.
2. ``_sample_reduce_kernel``: one program per sample. Masked mean over the sample's valid
   tokens, ``valid_tokens`` and the instant bucket. Plain tree sums, so the result is
   deterministic (no atomics).

The torch oracle is ``geko_core.reference.sample_stats_reference``; the semantics (what is
valid, what invalidates a sample) are its semantics. This module imports triton and torch
only: the caller (``geko_core.stats``) checks the inputs, passes the bucket thresholds and
codes, and wraps the plain tensors it gets back.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .loss_options import _transformed_logits, check_kernel_options

__all__ = [
    "OPTION_LOSS_FIELD",
    "launch_sample_stats",
    "launch_token_stats",
    "reduce_launch_config",
    "stats_launch_config",
]

# Largest V tile one program holds in registers. Tests lower it to exercise several tiles on
# tiny vocabularies.
MAX_BLOCK_V = 4096
# Logits per thread in a tile. 8 keeps the statistics kernel at 40-49 registers on sm_80 and
# sm_90 with no spills; 16 reaches 80-93 registers and spills on sm_90 (kernels/aot.py).
VALUES_PER_THREAD = 8
# Token tile of the per-sample reduction.
MAX_BLOCK_T = 512

# Order of the float fields in the token and sample buffers; matches SampleStats/TokenStats.
NUM_FIELDS = 6
# Under the loss options the token buffer has one more row: the option token loss l, what the
# loss reduces (row 0 stays the statistics' -log p_y of softmax(z)).
OPTION_LOSS_FIELD = NUM_FIELDS


@triton.jit
def _sample_stats_kernel(
    logits_ptr,  # [S, T, V] fp32/bf16/fp16, stride along V == 1
    labels_ptr,  # [S, T] int64 (or int32), any strides
    token_ptr,  # fp32 [6, S, T] contiguous: loss, confidence, label_prob, correct, entropy, el2n
    valid_ptr,  # int8 [S, T]: label != ignore_index and 0 <= label < V
    bad_ptr,  # int8 [S, T]: counted token with an out-of-range label, a NaN or +inf logit, or only -inf
    lse_ptr,  # fp64 [S, T] contiguous, written when WRITE_LSE
    T,
    V,
    stride_ls,
    stride_lt,
    stride_ys,
    stride_yt,
    field_stride,  # S * T, distance between two fields of token_ptr
    ignore_index,
    class_weight_ptr,  # fp32 [V], read when HAS_CLASS_WEIGHT
    temperature,  # fp32 > 0, used when HAS_TEMPERATURE
    softcap,  # fp32 > 0, used when HAS_SOFTCAP
    label_smoothing,  # fp32 in [0, 1], used when HAS_SMOOTHING
    z_loss,  # fp32 >= 0, used when HAS_Z_LOSS
    BLOCK_V: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_CLASS_WEIGHT: tl.constexpr,
):
    # Maths (docs/design.md §2), per row x of V logits with label y, all in fp32:
    #   m = max x, d = sum exp(x - m), lse = m + log d, p = exp(x - lse)
    #   loss = lse - x_y, confidence = max p = 1 / d, label_prob = exp(x_y - m) / d
    #   entropy = lse - sum p x = log d - sum exp(x - m) (x - m) / d
    #   el2n = ||p - onehot(y)|| = sqrt((1 - p_y)^2 + sum_{j != y} p_j^2)
    #        = sqrt(r^2 + q) / d  with  r = sum_{j != y} exp(x_j - m),  q = sum_{j != y} exp(2 (x_j - m))
    # The sums are kept relative to the running max and rescaled when it grows (online
    # softmax), so the row is read once. Entropy's sum is relative to m and EL2N's sums
    # leave the label out, so neither cancels: lse - sum p x loses digits for large logits,
    # and sqrt(sum p^2 - 2 p_y + 1) for p_y near 1 (a well-learned token).
    # Under the loss options (geko_core/loss_options.py) x is replaced by z, the logits after
    # temperature and soft-capping, as soon as it is read: the statistics describe softmax(z).
    # The option loss l = w_y (1 - eps) (lse - z_y) + (eps / V) sum_j w_j (lse - z_j)
    #   + zeta lse^2 goes to one more row; its smoothing sum is W log d - sum_j w_j (z_j - m)
    # (W = sum_j w_j), both terms >= 0, with sum_j w_j (z_j - m) kept relative to the running
    # max like the other sums. With every option off the constexprs remove all of it.
    OPTIONS: tl.constexpr = HAS_TEMPERATURE or HAS_SOFTCAP or HAS_SMOOTHING or HAS_Z_LOSS or HAS_CLASS_WEIGHT

    # 1. locate the row; int64 before multiplying by strides (S*T*V overflows int32)
    row = tl.program_id(0).to(tl.int64)
    s = row // T
    t = row % T
    row_ptr = logits_ptr + s * stride_ls + t * stride_lt
    label = tl.load(labels_ptr + s * stride_ys + t * stride_yt).to(tl.int64)
    counted = label != ignore_index
    in_range = (label >= 0) & (label < V)
    valid = counted & in_range
    # An out-of-range label is never used as an address.
    safe_label = tl.where(valid, label, 0)
    x_label = tl.load(row_ptr + safe_label).to(tl.float32)
    if HAS_TEMPERATURE or HAS_SOFTCAP:
        x_label = _transformed_logits(x_label, temperature, softcap, HAS_TEMPERATURE, HAS_SOFTCAP)

    # 2. online max / sums over V tiles
    offsets = tl.arange(0, BLOCK_V)
    m = -float("inf")  # running max
    shift = 0.0  # finite reference point: m once some finite value was seen
    sum_other = 0.0  # r: sum_{j != y} exp(x_j - shift)
    sum_other_sq = 0.0  # q: sum_{j != y} exp(2 (x_j - shift))
    sum_ex_other = 0.0  # sum_{j != y} exp(x_j - shift) (x_j - shift)
    argmax = 0
    n_nonfinite = 0
    if HAS_SMOOTHING:
        sum_w = 0.0  # sum_j w_j over the tiles read so far (their count without class weights)
        sum_wz = 0.0  # sum_j w_j (z_j - shift)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_TEMPERATURE or HAS_SOFTCAP:
            x = _transformed_logits(x, temperature, softcap, HAS_TEMPERATURE, HAS_SOFTCAP)
        # x < inf is false for NaN and +inf; -inf logits (a masked vocabulary) are probability
        # 0, as in torch
        n_nonfinite += tl.sum((mask & ~(x < float("inf"))).to(tl.int32), axis=0)
        # tie_break_left: the lowest index among equal maxima, like torch.argmax
        tile_max, tile_arg = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        # strict >: on a tie across tiles the earlier tile keeps the argmax
        argmax = tl.where(tile_max > m, start + tile_arg, argmax)
        m_new = tl.maximum(m, tile_max)
        # while every value so far is -inf (e.g. a masked vocabulary), measure from 0 so that
        # no -inf - -inf = NaN enters the sums
        shift_new = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - shift_new)  # 0 on the first finite tile
        e = tl.exp(x - shift_new)  # 0 for padding and -inf logits
        # the label's terms are added once, after the loop
        e_other = tl.where(cols == safe_label, 0.0, e)
        # 0 * -inf would be NaN: entries whose exp underflowed contribute nothing
        ex_other = e_other * tl.where(e_other > 0.0, x - shift_new, 0.0)
        sum_ex_other = alpha * (sum_ex_other - (shift_new - shift) * sum_other) + tl.sum(ex_other, axis=0)
        sum_other = alpha * sum_other + tl.sum(e_other, axis=0)
        sum_other_sq = alpha * alpha * sum_other_sq + tl.sum(e_other * e_other, axis=0)
        if HAS_SMOOTHING:
            # a -inf z_j makes the sum -inf (l = +inf, as the reference); padding adds nothing
            if HAS_CLASS_WEIGHT:
                w = tl.load(class_weight_ptr + cols, mask=mask, other=0.0)
                wz = w * tl.where(mask, x - shift_new, 0.0)  # (0 * -inf would be NaN in padding)
                tile_w = tl.sum(w, axis=0)
            else:
                wz = tl.where(mask, x - shift_new, 0.0)
                tile_w = tl.sum(mask.to(tl.float32), axis=0)
            sum_wz = sum_wz - (shift_new - shift) * sum_w + tl.sum(wz, axis=0)
            sum_w += tile_w
        m = m_new
        shift = shift_new

    # 3. token statistics (NaN/+inf rows give NaN/inf, as torch's cross-entropy does; a -inf
    #    label logit gives loss +inf and label_prob 0, as torch)
    e_label = tl.exp(x_label - shift)
    d = sum_other + e_label
    log_d = tl.log(d)
    lse = shift + log_d
    loss = log_d - (x_label - shift)
    confidence = 1.0 / d
    label_prob = e_label / d
    correct = (argmax == safe_label).to(tl.float32)
    sum_ex = sum_ex_other + e_label * tl.where(e_label > 0.0, x_label - shift, 0.0)
    entropy = log_d - sum_ex / d
    el2n = tl.sqrt(sum_other * sum_other + sum_other_sq) / d
    bad = counted & ((~in_range) | (n_nonfinite > 0) | (m == -float("inf")))

    # 4. write O(1) values per token; tokens that are not valid read as 0
    out = token_ptr + row
    tl.store(out, tl.where(valid, loss, 0.0))
    tl.store(out + field_stride, tl.where(valid, confidence, 0.0))
    tl.store(out + 2 * field_stride, tl.where(valid, label_prob, 0.0))
    tl.store(out + 3 * field_stride, tl.where(valid, correct, 0.0))
    tl.store(out + 4 * field_stride, tl.where(valid, entropy, 0.0))
    tl.store(out + 5 * field_stride, tl.where(valid, el2n, 0.0))
    tl.store(valid_ptr + row, valid.to(tl.int8))
    tl.store(bad_ptr + row, bad.to(tl.int8))
    if OPTIONS:
        option_loss = loss
        if HAS_CLASS_WEIGHT:
            option_loss = tl.load(class_weight_ptr + safe_label) * option_loss
        if HAS_SMOOTHING:
            smooth = sum_w * log_d - sum_wz  # sum_j w_j (lse - z_j)
            option_loss = (1.0 - label_smoothing) * option_loss + (label_smoothing / V) * smooth
        if HAS_Z_LOSS:
            option_loss += z_loss * lse * lse
        tl.store(out + 6 * field_stride, tl.where(valid, option_loss, 0.0))
    if WRITE_LSE:
        # in float64: the backward's exp(x - lse) needs lse to better than float32's half ulp
        # (5e-4 at |x| = 1e4); shift is a logit, log_d a float32 in [0, log V]
        tl.store(lse_ptr + row, shift.to(tl.float64) + log_d.to(tl.float64))


@triton.jit
def _sample_reduce_kernel(
    token_ptr,  # fp32 [6, S, T] from _sample_stats_kernel
    valid_ptr,  # int8 [S, T]
    bad_ptr,  # int8 [S, T]
    sample_ptr,  # fp32 [6, S] out: per-sample means, NaN when the sample is invalid
    valid_tokens_ptr,  # int32 [S] out
    bucket_ptr,  # int8 [S] out
    S,
    T,
    field_stride,  # S * T
    correct_threshold,  # fp32: the reference compares in float32, so do we
    freeze_confidence,
    hard_confidence,
    correct_margin,  # fp32; the margin rule applies when MARGIN
    BLOCK_T: tl.constexpr,
    MARGIN: tl.constexpr,
    FREEZE: tl.constexpr,  # the bucket codes (csrc/include/geko/config.h), from the caller
    LIGHT: tl.constexpr,
    FOCUS: tl.constexpr,
    HARD: tl.constexpr,
    INVALID: tl.constexpr,
):
    # 1. masked sums over the sample's tokens, in per-lane accumulators reduced once at the
    #    end: deterministic, no atomics
    sample = tl.program_id(0).to(tl.int64)
    base = sample * T
    offsets = tl.arange(0, BLOCK_T)
    acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_conf = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_label_prob = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_correct = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_entropy = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_el2n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_valid = tl.zeros([BLOCK_T], dtype=tl.int32)
    acc_bad = tl.zeros([BLOCK_T], dtype=tl.int32)
    acc_min_label_prob = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + offsets
        mask = cols < T
        ptrs = token_ptr + base + cols
        valid = tl.load(valid_ptr + base + cols, mask=mask, other=0) != 0
        acc_valid += valid.to(tl.int32)
        acc_bad += tl.load(bad_ptr + base + cols, mask=mask, other=0).to(tl.int32)
        acc_loss += tl.where(valid, tl.load(ptrs, mask=mask, other=0.0), 0.0)
        acc_conf += tl.where(valid, tl.load(ptrs + field_stride, mask=mask, other=0.0), 0.0)
        token_label_prob = tl.load(ptrs + 2 * field_stride, mask=mask, other=0.0)
        acc_label_prob += tl.where(valid, token_label_prob, 0.0)
        if MARGIN:
            acc_min_label_prob = tl.minimum(acc_min_label_prob, tl.where(valid, token_label_prob, float("inf")))
        acc_correct += tl.where(valid, tl.load(ptrs + 3 * field_stride, mask=mask, other=0.0), 0.0)
        acc_entropy += tl.where(valid, tl.load(ptrs + 4 * field_stride, mask=mask, other=0.0), 0.0)
        acc_el2n += tl.where(valid, tl.load(ptrs + 5 * field_stride, mask=mask, other=0.0), 0.0)

    # 2. means; a sample with no valid token or a bad token is invalid (NaN)
    valid_tokens = tl.sum(acc_valid, axis=0)
    invalid = (valid_tokens == 0) | (tl.sum(acc_bad, axis=0) > 0)
    denom = tl.maximum(valid_tokens, 1).to(tl.float32)
    nan = float("nan")
    loss = tl.where(invalid, nan, tl.sum(acc_loss, axis=0) / denom)
    confidence = tl.where(invalid, nan, tl.sum(acc_conf, axis=0) / denom)
    label_prob = tl.where(invalid, nan, tl.sum(acc_label_prob, axis=0) / denom)
    correct = tl.where(invalid, nan, tl.sum(acc_correct, axis=0) / denom)
    entropy = tl.where(invalid, nan, tl.sum(acc_entropy, axis=0) / denom)
    el2n = tl.where(invalid, nan, tl.sum(acc_el2n, axis=0) / denom)

    # 3. instant bucket from the float32 means, as geko::instant_bucket and the reference do
    is_correct = correct >= correct_threshold
    if MARGIN:
        # the margin rule: every valid token's label probability reaches the margin
        is_correct = is_correct & (tl.min(acc_min_label_prob, axis=0) >= correct_margin)
    bucket = tl.where(
        is_correct,
        tl.where(confidence > freeze_confidence, FREEZE, LIGHT),
        tl.where(confidence > hard_confidence, HARD, FOCUS),
    )
    bucket = tl.where(confidence != confidence, INVALID, bucket)

    # 4. write
    tl.store(sample_ptr + sample, loss)
    tl.store(sample_ptr + S + sample, confidence)
    tl.store(sample_ptr + 2 * S + sample, label_prob)
    tl.store(sample_ptr + 3 * S + sample, correct)
    tl.store(sample_ptr + 4 * S + sample, entropy)
    tl.store(sample_ptr + 5 * S + sample, el2n)
    tl.store(valid_tokens_ptr + sample, valid_tokens)
    tl.store(bucket_ptr + sample, bucket.to(tl.int8))


def stats_launch_config(vocab: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of the token kernel for a vocabulary of ``vocab``."""
    block_v = max(16, min(triton.next_power_of_2(vocab), MAX_BLOCK_V))
    num_warps = max(1, min(16, block_v // (32 * VALUES_PER_THREAD)))
    return block_v, num_warps


def reduce_launch_config(tokens: int) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)`` of the per-sample reduction for ``tokens`` tokens per sample."""
    block_t = max(16, min(triton.next_power_of_2(max(tokens, 1)), MAX_BLOCK_T))
    return block_t, 4 if block_t >= 512 else 1


def launch_token_stats(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    *,
    ignore_index: int,
    write_lse: bool,
    temperature: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the token kernel only, on inputs the caller checked (``[S, T, V]`` logits of a
    supported dtype with stride 1 along V, ``[S, T]`` int64 or int32 labels, one device).

    Args:
        temperature, softcap, label_smoothing, z_loss, class_weight: the loss options of
            ``geko_core/loss_options.py`` (``class_weight`` float32 ``[V]``, contiguous, on the
            logits' device, values finite and >= 0: not checked here). The defaults are the
            plain cross-entropy, computed by the kernel compiled without options.

    Returns:
        (token_values, valid, bad, lse): fp32 ``[6, S, T]`` (loss, confidence, label_prob,
        correct, entropy, el2n; 0 for tokens that are not valid), bool ``[S, T]`` valid
        tokens, bool ``[S, T]`` counted tokens whose label is out of range or whose row holds
        a NaN or +inf logit, or only -inf logits (they invalidate their sample), fp64 ``[S, T]``
        log-sum-exp when ``write_lse`` else None.

        With any option set, the statistics, their ``loss`` (row 0, ``-log p_y``), the
        validity flags (NaN/+inf tested on ``z``) and ``lse`` are those of ``z``, the logits
        after temperature and soft-capping, and ``token_values`` is ``[7, S, T]``: row
        ``OPTION_LOSS_FIELD`` (6) holds the option token loss ``l`` (0 for tokens that are not
        valid), the value a loss reduces; a ``"mean"`` divides by the valid tokens'
        ``class_weight[y]`` (their count without class weights).

    Raises:
        TypeError, ValueError: a bad option (see ``check_kernel_options``).
    """
    num_samples, seq_len, vocab = logits3.shape
    num_tokens = num_samples * seq_len
    device = logits3.device
    options = check_kernel_options(
        vocab=vocab,
        device=device,
        temperature=temperature,
        softcap=softcap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        class_weight=class_weight,
    )

    fields = NUM_FIELDS if options.plain else NUM_FIELDS + 1
    token_values = torch.empty((fields, num_samples, seq_len), dtype=torch.float32, device=device)
    # int8 0/1 so that valid can be viewed as bool without a copy
    token_valid = torch.empty((num_samples, seq_len), dtype=torch.int8, device=device)
    token_bad = torch.empty((num_samples, seq_len), dtype=torch.int8, device=device)
    lse = torch.empty((num_samples, seq_len), dtype=torch.float64, device=device) if write_lse else None
    if num_tokens > 0:
        block_v, num_warps = stats_launch_config(vocab)
        with _device_guard(device):
            _sample_stats_kernel[(num_tokens,)](
                logits3,
                labels3,
                token_values,
                token_valid,
                token_bad,
                lse if write_lse else token_values,  # unused when WRITE_LSE is False
                seq_len,
                vocab,
                logits3.stride(0),
                logits3.stride(1),
                labels3.stride(0),
                labels3.stride(1),
                num_tokens,
                ignore_index,
                token_values if class_weight is None else class_weight,  # unused without class weights
                options.temperature,
                options.softcap,
                options.label_smoothing,
                options.z_loss,
                BLOCK_V=block_v,
                WRITE_LSE=write_lse,
                **options.flags,
                num_warps=num_warps,
            )
    return token_values, token_valid.view(torch.bool), token_bad.view(torch.bool), lse


def launch_sample_stats(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    *,
    ignore_index: int,
    write_lse: bool,
    thresholds: tuple[float, float, float, float],
    buckets: tuple[int, int, int, int, int],
    temperature: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run both kernels on checked inputs (see ``launch_token_stats``, which also describes
    the loss options and the ``[7, S, T]`` token values they give).

    Args:
        thresholds: ``(correct_threshold, freeze_confidence, hard_confidence,
            correct_margin)``, compared in float32; the margin rule applies when the last
            is positive.
        buckets: the codes of FREEZE, LIGHT, FOCUS, HARD and INVALID.

    Returns:
        (sample_values, valid_tokens, bucket, token_values, token_valid, lse): fp32
        ``[6, S]`` per-sample means (NaN for invalid samples), int32 ``[S]``, int8 ``[S]``,
        fp32 ``[6, S, T]`` token values (0 for tokens that are not valid; row 0 the token
        losses; ``[7, S, T]`` under options, row 6 the option token losses), bool ``[S, T]``,
        fp64 ``[S, T]`` log-sum-exp when ``write_lse`` else None. The sample means and the
        bucket are the statistics of ``z`` under options.

    Raises:
        TypeError, ValueError: a bad option (see ``check_kernel_options``).
    """
    token_values, token_valid, token_bad, lse = launch_token_stats(
        logits3,
        labels3,
        ignore_index=ignore_index,
        write_lse=write_lse,
        temperature=temperature,
        softcap=softcap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        class_weight=class_weight,
    )
    num_samples, seq_len = labels3.shape
    num_tokens = num_samples * seq_len
    device = logits3.device
    sample_values = torch.empty((NUM_FIELDS, num_samples), dtype=torch.float32, device=device)
    valid_tokens = torch.empty((num_samples,), dtype=torch.int32, device=device)
    bucket = torch.empty((num_samples,), dtype=torch.int8, device=device)
    correct_threshold, freeze_confidence, hard_confidence, correct_margin = thresholds
    freeze, light, focus, hard, invalid = buckets

    if num_samples > 0:
        block_t, num_warps = reduce_launch_config(seq_len)
        with _device_guard(device):
            _sample_reduce_kernel[(num_samples,)](
                token_values,
                token_valid.view(torch.int8),
                token_bad.view(torch.int8),
                sample_values,
                valid_tokens,
                bucket,
                num_samples,
                seq_len,
                num_tokens,
                float(correct_threshold),
                float(freeze_confidence),
                float(hard_confidence),
                float(correct_margin),
                BLOCK_T=block_t,
                MARGIN=correct_margin > 0.0,
                FREEZE=freeze,
                LIGHT=light,
                FOCUS=focus,
                HARD=hard,
                INVALID=invalid,
                num_warps=num_warps,
            )
    return sample_values, valid_tokens, bucket, token_values, token_valid, lse


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the logits' GPU (Triton launches on the current device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
