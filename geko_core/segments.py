"""Packed rows: per-sample statistics and loss of several samples sharing a row
(docs/design.md §2, "Packed rows").

A row of ``[B, T]`` labels may hold several samples one after the other (padding-free
packing). ``segments`` says which sample each token belongs to: an int ``[B, T]`` tensor
numbering the batch's samples ``0..K-1`` (any order of rows and positions, each sample one
contiguous run of tokens inside one row), negative for tokens of no sample (padding).
``position_ids`` (restarting at 0 at each sample, as padding-free collators write them) give
the same information: a sample starts at every 0 and at every row start, negative positions
are padding, and samples are numbered in row-major order.

Boundary rule (the causal shift): the token at position ``t`` is scored against the label at
``t + 1``, and that score belongs to the sample of the label position, but only when position
``t`` belongs to the same sample. The first token of a packed sample is predicted by the last
token of the previous one, so it is never a target, exactly as when the sample is scored
alone (where the shift drops its first label) and as padding-free collators mask it with
-100. Without the shift each token belongs to its own position's sample.

Everything here runs on the per-token outputs of the ordinary kernels (labels of tokens that
belong to no sample are set to ``ignore_index`` first, so the kernels neither score them nor
send them a gradient), reduced per sample with ``index_add`` in float64 as the reference
averages, and the instant bucket is ``reference.instant_bucket`` on the sample means: the
result equals ``sample_stats`` of the unpacked samples.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_int, check_same_device, check_tensor
from .config import GekoConfig
from .reference import instant_bucket
from .types import SampleStats, TokenStats

__all__ = ["SegmentMap", "prepare_segments", "segment_loss", "segment_stats"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class SegmentMap(NamedTuple):
    """Where each scored token goes, in the kernels' ``[B, T']`` token coordinates."""

    owner: torch.Tensor  # int64 [B, T']: the sample of the token's score, -1 for none
    labels3: torch.Tensor  # int64 [B, T']: labels, ignore_index where owner is -1
    num_segments: int  # K


def prepare_segments(
    segments: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    num_segments: int | None,
    *,
    labels: torch.Tensor,
    labels3: torch.Tensor,
    shift: bool,
    ignore_index: int,
) -> SegmentMap:
    """Check ``segments`` / ``position_ids`` against the (already checked) labels and map
    every scored token to its sample.

    Args:
        segments, position_ids: exactly one of them, int ``[B, T]`` like ``labels``.
        num_segments: ``K``; None: the largest segment + 1 (or the number of samples the
            position ids start), which reads the tensor on the host.
        labels: the caller's ``[B, T]`` labels; ``labels3`` their prepared ``[B, T']`` int64 view.

    Raises:
        TypeError: not an integer tensor, a non-int ``num_segments``.
        ValueError: both or neither given, 2-D logits, another shape or device than the
            labels, an ignore_index outside int64; on CPU tensors also a segment
            ``>= num_segments``, a sample split into several runs of tokens, position ids
            that start another number of samples than ``num_segments``. (On a GPU these are
            not checked, which would cost a host synchronisation: tokens of a segment
            ``>= num_segments`` count for no sample.)
    """
    if (segments is None) == (position_ids is None):
        if segments is None:
            raise ValueError("num_segments needs segments= or position_ids=")
        raise ValueError("pass segments= or position_ids=, not both")
    name = "segments" if segments is not None else "position_ids"
    value = segments if segments is not None else position_ids
    check_tensor(value, name, dtype="integer", layout="[B, T]")
    if labels.dim() != 2:
        raise ValueError(f"{name} needs [B, T, V] logits and [B, T] labels (packed rows), got labels of shape {tuple(labels.shape)}")
    if tuple(value.shape) != tuple(labels.shape):
        raise ValueError(f"{name} shape {tuple(value.shape)} does not match labels shape {tuple(labels.shape)}")
    check_same_device(value, name, labels, "labels")
    if num_segments is not None:
        num_segments = check_int(num_segments, "num_segments", low=0)
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index {ignore_index} must fit in int64 with {name}= (it marks the tokens of no sample)")

    rows, width = value.shape
    compiling = torch.compiler.is_compiling()
    if compiling and num_segments is None:
        raise ValueError(f"pass num_segments= with {name}= under torch.compile (counting the samples reads the tensor)")
    host_checks = value.device.type == "cpu" and not compiling
    if position_ids is not None:
        positions = value.to(torch.int64)
        padding = positions < 0
        starts = positions == 0
        if width:
            starts[:, 0] = True
        starts &= ~padding
        numbered = torch.cumsum(starts.reshape(-1), 0).reshape(rows, width) - 1
        seg = torch.where(padding, torch.full_like(numbered, -1), numbered)
        if num_segments is None or host_checks:
            started = int(starts.sum())
            if num_segments is None:
                num_segments = started
            elif started != num_segments:
                raise ValueError(f"position_ids start {started} samples but num_segments is {num_segments}")
    else:
        seg = value.to(torch.int64)
        seg = torch.where(seg < 0, torch.full_like(seg, -1), seg)
        if num_segments is None:
            num_segments = int(seg.max()) + 1 if seg.numel() else 0
        elif host_checks and seg.numel() and int(seg.max()) >= num_segments:
            raise ValueError(f"segments holds sample {int(seg.max())}, out of range for num_segments={num_segments}")
        if host_checks and seg.numel():
            _check_contiguous(seg, num_segments)
    if not host_checks:
        seg = torch.where(seg >= num_segments, torch.full_like(seg, -1), seg)

    if shift:
        before, after = seg[:, :-1], seg[:, 1:]
        owner = torch.where(before == after, after, torch.full_like(after, -1))
    else:
        owner = seg
    masked = torch.where(owner >= 0, labels3, torch.full_like(labels3, ignore_index))
    return SegmentMap(owner, masked, num_segments)


def _check_contiguous(seg: torch.Tensor, num_segments: int) -> None:
    """ValueError when a sample's tokens are not one run inside one row."""
    previous = torch.nn.functional.pad(seg[:, :-1], (1, 0), value=-1)
    run_start = (seg >= 0) & (seg != previous)
    runs = torch.bincount(seg[run_start], minlength=num_segments)
    split = (runs > 1).nonzero()
    if split.numel():
        sample = int(split[0, 0])
        raise ValueError(
            f"segments: sample {sample} is split into {int(runs[sample])} runs of tokens; a packed sample must be one "
            "contiguous run inside one row"
        )


def segment_stats(
    token_values: torch.Tensor,
    valid: torch.Tensor,
    bad: torch.Tensor,
    owner: torch.Tensor,
    num_segments: int,
    config: GekoConfig,
    per_token: bool,
) -> SampleStats:
    """SampleStats of ``K`` samples from the rows' token values.

    Args:
        token_values: float32 ``[6, B, T']`` (loss, confidence, label_prob, correct, entropy,
            el2n; 0 where not valid), detached.
        valid: bool ``[B, T']``, only tokens with ``owner >= 0``.
        bad: bool ``[B, T']``: counted tokens that invalidate their sample.
        owner: int64 ``[B, T']``.
    """
    device = token_values.device
    index = owner.clamp(min=0).reshape(-1)
    valid_flat = valid.reshape(-1)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=device)
    counts.index_add_(0, index, valid_flat.to(torch.int64))
    spoiled = torch.zeros(num_segments, dtype=torch.int64, device=device)
    spoiled.index_add_(0, index, (bad & (owner >= 0)).reshape(-1).to(torch.int64))
    invalid = (spoiled > 0) | (counts == 0)
    denom = counts.clamp(min=1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    nan = torch.full((), float("nan"), dtype=torch.float32, device=device)

    def mean(value: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(num_segments, dtype=torch.float64, device=device)
        total.index_add_(0, index, torch.where(valid_flat, value.reshape(-1).to(torch.float64), zero))
        return torch.where(invalid, nan, (total / denom).to(torch.float32))

    means = [mean(token_values[k]) for k in range(6)]
    min_label_prob = None
    if config.correct_margin > 0.0:
        inf = torch.full((), float("inf"), dtype=torch.float32, device=device)
        min_label_prob = torch.full((num_segments,), float("inf"), dtype=torch.float32, device=device)
        min_label_prob.scatter_reduce_(0, index, torch.where(valid_flat, token_values[2].reshape(-1), inf), "amin")
    tokens = TokenStats(*token_values.unbind(0), valid=valid) if per_token else None
    return SampleStats(
        *means,
        valid_tokens=counts.to(torch.int32),
        bucket=instant_bucket(means[1], means[3], config, min_label_prob),
        tokens=tokens,
    )


def segment_loss(
    token_loss: torch.Tensor,
    valid: torch.Tensor,
    owner: torch.Tensor,
    valid_tokens: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """The reductions of ``cross_entropy_with_stats`` over samples instead of rows,
    differentiable through ``token_loss`` (``[B, T']``); summed in float64, returned in
    ``token_loss``'s dtype. ``"none"`` keeps the row layout: each counted token's loss
    times its sample's weight, 0 at the others."""
    num_segments = valid_tokens.shape[0]
    out_dtype = token_loss.dtype
    values = torch.where(valid, token_loss, torch.zeros((), dtype=out_dtype, device=token_loss.device))
    if reduction == "none":
        if weight is None:
            return values
        # (a zero appended for the tokens of no sample: owner -1 reads it)
        padded = torch.cat((weight.to(out_dtype), torch.zeros(1, dtype=out_dtype, device=weight.device)))
        return values * padded[torch.where(owner >= 0, owner, num_segments)]
    per_sample = torch.zeros(num_segments, dtype=torch.float64, device=token_loss.device).index_add(
        0, owner.clamp(min=0).reshape(-1), values.reshape(-1).to(torch.float64)
    )
    if weight is not None:
        per_sample = per_sample * weight.to(torch.float64)
    if reduction == "per_sample":
        return (per_sample / valid_tokens.clamp(min=1).to(torch.float64)).to(out_dtype)
    total = per_sample.sum()
    if reduction == "mean":
        total = total / valid_tokens.sum().to(torch.float64)  # 0 / 0 = NaN, as F.cross_entropy
    return total.to(out_dtype)
