"""Per-sample statistics of one training step: ``sample_stats`` (docs/design.md §2).

One pass over the logits gives, per token, the cross-entropy, the max-probability
(confidence), the probability of the label, whether the argmax is the label, the softmax
entropy and the EL2N score ``||softmax - onehot||_2``; per sample, their means over the
sample's valid tokens and the instant GEKO bucket.

Backends (the name comes from ``geko_core._backend.resolve_backend``; each is an entry of
``_SAMPLE_STATS`` and of ``_TOKEN_VALUES``, one signature per table): the Triton kernels for
CUDA tensors, the compiled OpenMP kernels for CPU tensors, the torch reference on request
(``backend="reference"``), and under torch.compile the ``geko::stats_forward`` operator
registered here. Discrete outputs (``valid_tokens``, ``correct``, ``bucket`` and invalidity)
are identical on every path; the float outputs agree with the reference to about 1e-5
relative for float32 logits (float32 accumulation). Low-precision logits (bfloat16, float16)
are read as they are and accumulated in float32 everywhere. Float64 logits are computed in
float64, on the reference path: ``_backend.resolve_backend`` sends them there from the
default and ``"cpp"`` backends (the compiled kernels accumulate in float32); the Triton
kernels do not read them (TypeError). ``-inf`` logits (a masked vocabulary) are probability
0 on every path, as in torch; a NaN or ``+inf`` logit, or a row of ``-inf`` only, makes the
token's sample invalid.

The operator's statistics are measurements: they are marked non-differentiable. Its token
losses (row 0 of ``token_values`` with ``write_lse``) are differentiable once
``geko_core.cross_entropy`` (which owns the backward kernel) has registered its autograd
formula; ``import geko_core`` imports both.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils.dlpack import to_dlpack

from ._backend import load_compiled_core
from ._checks import check_bool
from ._inputs import check_triton_inputs, config_from_values, config_values, prepare_inputs
from .config import (
    BUCKET_FOCUS,
    BUCKET_FREEZE,
    BUCKET_HARD,
    BUCKET_INVALID,
    BUCKET_LIGHT,
    GekoConfig,
    cpp_config_for_kernels,
    resolve_config,
)
from .reference import sample_stats_reference, token_stats_reference
from .segments import prepare_segments, segment_stats
from .types import SampleStats, TokenStats

__all__ = ["ForwardBlocks", "sample_stats", "sample_stats_triton", "stats_forward", "stats_forward_triton", "table_correct"]

#: The bucket codes, in the order the Triton reduction takes them.
_BUCKET_CODES = (BUCKET_FREEZE, BUCKET_LIGHT, BUCKET_FOCUS, BUCKET_HARD, BUCKET_INVALID)


class ForwardBlocks(NamedTuple):
    """Raw outputs of one forward pass, as the operators return them (no two alias)."""

    sample_values: torch.Tensor  # float32 [6, S]: loss, confidence, label_prob, correct, entropy, el2n
    valid_tokens: torch.Tensor  # int32 [S]
    bucket: torch.Tensor  # int8 [S]
    token_values: torch.Tensor  # float32 [K, S, T]: K = 6 with per-token values, 1 (the loss) with write_lse, else 0
    token_valid: torch.Tensor  # bool [S, T'] (T' = T with per-token values, else 0)
    lse: torch.Tensor  # float64 [S, T] with write_lse, else [0, 0] (see _cross_entropy_kernels)


def token_rows(per_token: bool, write_lse: bool) -> int:
    """Rows of ``ForwardBlocks.token_values``."""
    return 6 if per_token else (1 if write_lse else 0)


def stats_from_blocks(blocks: ForwardBlocks | tuple, per_token: bool) -> SampleStats:
    """SampleStats whose fields are views of the blocks."""
    sample_values, valid_tokens, bucket, token_values, token_valid = blocks[:5]
    tokens = TokenStats(*token_values.unbind(0), valid=token_valid) if per_token else None
    return SampleStats(*sample_values.unbind(0), valid_tokens=valid_tokens, bucket=bucket, tokens=tokens)


# -- the kernels ------------------------------------------------------------------------------


def forward_blocks_cpp(
    logits3: torch.Tensor, labels3: torch.Tensor, *, ignore_index: int, config: GekoConfig, per_token: bool, write_lse: bool,
    options: dict | None = None, loss_out: torch.Tensor | None = None,
) -> ForwardBlocks:
    """The C++ forward kernel on validated ``[S, T, V]`` / ``[S, T]`` int64 CPU views: one
    float32 block per level instead of a tensor per field. Row 0 of ``token_values`` holds
    the token losses (0 for tokens that are not valid); it has the other five fields with
    ``per_token``, only the loss with ``write_lse``, no row otherwise. ``options``: the loss
    options as the core takes them (``loss_options.cpp_kernel_options``); ``loss_out``: float32
    ``[S, T]`` that receives the token loss trained on (the options' loss)."""
    core = load_compiled_core()
    samples, tokens = labels3.shape
    sample_values = torch.empty((6, samples), dtype=torch.float32)
    valid_tokens = torch.empty(samples, dtype=torch.int32)
    bucket = torch.empty(samples, dtype=torch.int8)
    token_values = torch.empty((token_rows(per_token, write_lse), samples, tokens), dtype=torch.float32)
    token_valid = torch.empty((samples, tokens if per_token else 0), dtype=torch.bool)
    lse = torch.empty((samples, tokens) if write_lse else (0, 0), dtype=torch.float64)
    # Whole blocks, one capsule each (the binding addresses the rows itself).
    token_capsules = None
    if per_token or write_lse:
        token_capsules = (to_dlpack(token_values), to_dlpack(token_valid) if per_token else None)
    core.stats_forward(
        to_dlpack(logits3.detach()),
        to_dlpack(labels3),
        ignore_index,
        cpp_config_for_kernels(config),
        (to_dlpack(sample_values), to_dlpack(valid_tokens), to_dlpack(bucket)),
        token_capsules,
        to_dlpack(lse) if write_lse else None,
        loss_out=None if loss_out is None else to_dlpack(loss_out),
        **(options or {}),
    )
    return ForwardBlocks(sample_values, valid_tokens, bucket, token_values, token_valid, lse)


def triton_token_values(
    logits3: torch.Tensor, labels3: torch.Tensor, *, ignore_index: int, write_lse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The Triton token kernel (``kernels.sample_stats.launch_token_stats``), checked."""
    from .kernels.sample_stats import launch_token_stats

    check_triton_inputs(logits3, labels3, ignore_index)
    return launch_token_stats(logits3, labels3, ignore_index=ignore_index, write_lse=write_lse)


def forward_triton(
    logits3: torch.Tensor, labels3: torch.Tensor, *, ignore_index: int, config: GekoConfig, write_lse: bool,
    options: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Both Triton kernels, checked: ``(sample_values [6, S], valid_tokens, bucket,
    token_values [6, S, T], token_valid [S, T], lse or None)``. ``options``: the loss
    options' kernel arguments (``loss_options.kernel_options``); then ``token_values`` is
    ``[7, S, T]``, its last row the options' token loss."""
    from .kernels.sample_stats import launch_sample_stats

    check_triton_inputs(logits3, labels3, ignore_index)
    config = resolve_config(config)
    thresholds = (config.correct_threshold, config.freeze_confidence, config.hard_confidence, config.correct_margin)
    return launch_sample_stats(
        logits3, labels3, ignore_index=ignore_index, write_lse=write_lse, thresholds=thresholds, buckets=_BUCKET_CODES,
        **(options or {}),
    )


def sample_stats_triton(
    logits3: torch.Tensor, labels3: torch.Tensor, *, ignore_index: int, config: GekoConfig, per_token: bool
) -> SampleStats:
    """Per-sample statistics of ``[S, T, V]`` logits with the fused Triton kernels.

    Reads the logits once, writes ``O(S*T)`` bytes, never synchronises with the host.

    Args:
        logits3: ``[S, T, V]`` float32/bfloat16/float16 on a CUDA device (or the CPU under
            ``TRITON_INTERPRET=1``), stride 1 along V; other strides are free (a slice of a
            wider tensor, the causal shift view ``logits[:, :-1]``), nothing is copied.
        labels3: ``[S, T]`` int64 (int32 accepted), any strides, same device.
        ignore_index: label of tokens to skip.
        config: bucket thresholds (compared in float32).
        per_token: also return the token-level values (``SampleStats.tokens``).

    Returns:
        SampleStats on the logits' device: float32 fields ``[S]`` (NaN for invalid samples),
        int32 ``valid_tokens``, int8 ``bucket`` (-1 for invalid samples). A sample is invalid
        when it has no valid token, a counted token whose label is out of range, or a NaN or
        ``+inf`` logit (or only ``-inf`` logits) in a counted token's row; other ``-inf``
        logits are probability 0.

    Raises:
        TypeError, ValueError: see ``check_triton_inputs``; a config that is not a GekoConfig.
    """
    blocks = forward_triton(logits3, labels3, ignore_index=ignore_index, config=config, write_lse=False)
    return stats_from_blocks(blocks, per_token)


# -- geko::stats_forward ----------------------------------------------------------------------


@torch.library.custom_op("geko::stats_forward", mutates_args=())
def stats_forward(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    ignore_index: int,
    config: list[float],
    per_token: bool,
    write_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sample_values [6, S], valid_tokens [S], bucket [S], token_values [K, S, T],
    token_valid [S, T or 0], lse)`` of ``[S, T, V]`` logits and ``[S, T]`` int64 labels
    (``ForwardBlocks``; K = 6 with ``per_token``, 1 with ``write_lse``, else 0); ``config``
    is ``config_values(GekoConfig)``."""
    raise NotImplementedError(f"geko::stats_forward has no kernel for {logits3.device.type} tensors (CPU and CUDA only)")


@stats_forward.register_kernel("cpu")
def _stats_forward_cpu(logits3, labels3, ignore_index, config, per_token, write_lse):
    return tuple(
        forward_blocks_cpp(
            logits3, labels3, ignore_index=ignore_index, config=config_from_values(config), per_token=per_token,
            write_lse=write_lse,
        )
    )


@stats_forward.register_kernel("cuda")
def stats_forward_triton(logits3, labels3, ignore_index, config, per_token, write_lse):
    """The CUDA kernel of ``geko::stats_forward`` (also runs under ``TRITON_INTERPRET=1``)."""
    sample_values, valid_tokens, bucket, token_values, token_valid, lse = forward_triton(
        logits3, labels3, ignore_index=ignore_index, config=config_from_values(config), write_lse=write_lse
    )
    samples, tokens = labels3.shape
    device = logits3.device
    # Separate outputs: no view of a buffer another output shares.
    count = token_rows(per_token, write_lse)
    token_values = token_values[:count].clone() if count else torch.empty((0, samples, tokens), dtype=torch.float32, device=device)
    token_valid = token_valid.clone() if per_token else torch.empty((samples, 0), dtype=torch.bool, device=device)
    if lse is None:
        lse = torch.empty((0, 0), dtype=torch.float64, device=device)
    return sample_values, valid_tokens, bucket, token_values, token_valid, lse


@stats_forward.register_fake
def _stats_forward_fake(logits3, labels3, ignore_index, config, per_token, write_lse):
    samples, tokens = logits3.shape[0], logits3.shape[1]
    f32 = dict(dtype=torch.float32, device=logits3.device)
    return (
        torch.empty((6, samples), **f32),
        torch.empty((samples,), dtype=torch.int32, device=logits3.device),
        torch.empty((samples,), dtype=torch.int8, device=logits3.device),
        torch.empty((token_rows(per_token, write_lse), samples, tokens), **f32),
        torch.empty((samples, tokens if per_token else 0), dtype=torch.bool, device=logits3.device),
        torch.empty((samples, tokens) if write_lse else (0, 0), dtype=torch.float64, device=logits3.device),
    )


# -- the backend tables -----------------------------------------------------------------------
# _SAMPLE_STATS[name](logits3, labels3, *, ignore_index, config, per_token) -> SampleStats
# _TOKEN_VALUES[name](logits3, labels3, *, ignore_index, config, write_lse)
#     -> (token_values [6, S, T], valid [S, T], bad [S, T], lse [S, T] or None)
# on validated views (``prepare_inputs``); ``bad`` marks the counted tokens that invalidate
# their sample (a non-finite logit in the row, a label out of range).


def _stats_cpp(logits3, labels3, *, ignore_index, config, per_token) -> SampleStats:
    blocks = forward_blocks_cpp(logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token, write_lse=False)
    return stats_from_blocks(blocks, per_token)


def _stats_triton(logits3, labels3, *, ignore_index, config, per_token) -> SampleStats:
    with torch.no_grad():
        return sample_stats_triton(logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token)


def _stats_reference(logits3, labels3, *, ignore_index, config, per_token) -> SampleStats:
    with torch.no_grad():
        return sample_stats_reference(logits3, labels3, ignore_index=ignore_index, per_token=per_token, config=config)


def _stats_op(logits3, labels3, *, ignore_index, config, per_token) -> SampleStats:
    blocks = stats_forward(logits3, labels3, ignore_index, config_values(config), per_token, False)
    return stats_from_blocks(blocks, per_token)


_SAMPLE_STATS: dict[str, Callable[..., SampleStats]] = {
    "cpp": _stats_cpp,
    "triton": _stats_triton,
    "reference": _stats_reference,
    "op": _stats_op,
}


def _tokens_cpp(logits3, labels3, *, ignore_index, config, write_lse):
    blocks = forward_blocks_cpp(logits3, labels3, ignore_index=ignore_index, config=config, per_token=True, write_lse=write_lse)
    # The C++ kernel writes NaN in every field of a valid token whose row is not finite (an
    # out-of-range label on a CPU tensor was refused before anything ran).
    bad = blocks.token_valid & torch.isnan(blocks.token_values[0])
    return blocks.token_values, blocks.token_valid, bad, blocks.lse if write_lse else None


def _tokens_triton(logits3, labels3, *, ignore_index, config, write_lse):
    return triton_token_values(logits3, labels3, ignore_index=ignore_index, write_lse=write_lse)


def _tokens_reference(logits3, labels3, *, ignore_index, config, write_lse):
    tokens, good = token_stats_reference(logits3, labels3, ignore_index=ignore_index)
    return torch.stack(tokens[:6]), tokens.valid, ~good & (labels3 != ignore_index), None


def _tokens_op(logits3, labels3, *, ignore_index, config, write_lse):
    # Under torch.compile row 0 of the token values is differentiable when write_lse.
    blocks = ForwardBlocks(*stats_forward(logits3, labels3, ignore_index, config_values(config), True, write_lse))
    valid = blocks.token_valid
    counted = labels3 != ignore_index
    vocab = logits3.shape[-1]
    # A row that invalidates its sample (NaN or +inf, or -inf only) has a NaN loss on every
    # kernel; a -inf label logit gives +inf, a valid token.
    bad = (valid & torch.isnan(blocks.token_values[0].detach())) | (counted & ((labels3 < 0) | (labels3 >= vocab)))
    if logits3.device.type != "cpu":
        # The same rule from the logits themselves (one more read, compiled GPU paths only).
        usable = (logits3 < float("inf")).all(dim=-1) & (logits3 > float("-inf")).any(dim=-1)
        bad = bad | (valid & ~usable)
    return blocks.token_values, valid, bad, blocks.lse if write_lse else None


_TOKEN_VALUES: dict[str, Callable[..., tuple]] = {
    "cpp": _tokens_cpp,
    "triton": _tokens_triton,
    "reference": _tokens_reference,
    "op": _tokens_op,
}


def segment_token_values(
    logits3: torch.Tensor, labels3: torch.Tensor, *, name: str, ignore_index: int, config: GekoConfig, write_lse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token values of validated ``[S, T, V]`` / ``[S, T]`` views on backend ``name``,
    for the per-sample reduction of packed rows (``geko_core.segments``).

    Returns:
        (token_values, valid, bad, lse): float32 ``[6, S, T]`` (loss, confidence, label_prob,
        correct, entropy, el2n; 0 where not valid), bool ``[S, T]`` valid tokens, bool
        ``[S, T]`` counted tokens that invalidate their sample (a non-finite logit in the row,
        a label out of range), and the float32 ``[S, T]`` log-sum-exp with ``write_lse``
        (else None; never on the reference path). Under torch.compile (``name == "op"``) row 0
        of ``token_values`` is differentiable when ``write_lse``.
    """
    return _TOKEN_VALUES[name](logits3, labels3, ignore_index=ignore_index, config=config, write_lse=write_lse)


def table_correct(stats: SampleStats, config: GekoConfig) -> torch.Tensor:
    """The ``correct`` a sample table should store for these statistics.

    The table recomputes the instant bucket from ``(confidence, correct)`` and keeps no label
    probabilities, so it cannot apply the margin rule (``config.correct_margin > 0``)
    itself. A sample that reaches ``correct_threshold`` but fails the margin (its instant
    bucket is FOCUS or HARD) is therefore stored just below the threshold (the largest
    float32 below it), and the table's bucket equals the statistics' bucket. Without a
    margin ``stats.correct`` itself.
    """
    if config.correct_margin <= 0.0:
        return stats.correct
    threshold = torch.tensor(config.correct_threshold, dtype=torch.float32, device=stats.correct.device)
    below = torch.nextafter(threshold, torch.zeros_like(threshold))
    failed = (stats.bucket == BUCKET_FOCUS) | (stats.bucket == BUCKET_HARD)
    return torch.where(failed & (stats.correct >= threshold), torch.minimum(stats.correct, below), stats.correct)


def sample_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    per_token: bool = False,
    config: GekoConfig | None = None,
    backend: str | None = None,
    segments: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
) -> SampleStats:
    """Per-sample statistics of a batch, in one pass over the logits.

    Args:
        logits: ``[N, V]`` (classification) or ``[B, T, V]`` (sequences); float32,
            bfloat16, float16 or float64 (not on the Triton backend); any strides (a column slice of a wider tensor is
            read in place; only a non-contiguous last dimension costs one copy);
            ``2 <= V <= 262144``. Never modified; gradients are not tracked.
        labels: ``[N]`` or ``[B, T]``, any integer dtype, on the logits' device.
        ignore_index: label of tokens that do not count (padding, prompt).
        shift: causal-LM shift: token ``t`` is scored against label ``t + 1``
            (``logits[:, :-1]`` with ``labels[:, 1:]``, as views); 3-D only.
        per_token: also return the token-level values (``SampleStats.tokens``, each
            ``[S, T]``; ``T = 1`` for 2-D logits, ``T - 1`` with ``shift``).
        config: thresholds of the instant bucket (defaults: ``GekoConfig()``).
        backend: ``None`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or
            ``"reference"``.
        segments: packed rows (docs/design.md §2): int ``[B, T]``, the sample
            (``0..K-1``, numbered across the batch) of every token, negative for padding;
            each sample one contiguous run inside one row. The statistics are then per
            sample, ``K`` entries in segment order, equal to those of each sample scored
            alone; with ``shift`` the first token of a packed sample is no target (see
            ``geko_core.segments``). ``per_token`` values stay in row layout ``[B, T']``,
            with the tokens that count for no sample marked not valid.
        position_ids: instead of ``segments``: int ``[B, T]`` positions restarting at 0 at
            each sample (negative: padding); samples are numbered in row-major order.
        num_segments: ``K`` with ``segments`` / ``position_ids`` (default: counted from them,
            which reads them on the host; required under torch.compile).

    Returns:
        SampleStats with one entry per sample (``S = N`` or ``B``; ``K`` with segments). A sample with no valid
        token, or whose counted tokens include a row with a NaN or ``+inf`` logit or only ``-inf``
        logits (or, on the GPU, a label out of range), is invalid: NaN floats, bucket
        ``BUCKET_INVALID``. Other ``-inf`` logits (a masked vocabulary) are probability 0, as in
        torch: a ``-inf`` label logit gives loss ``+inf`` and label probability 0.
        ``valid_tokens`` still counts its tokens with an in-range label. In the per-token
        output, tokens that do not count are 0 (``valid`` False); on the C++ path a counted
        token with a non-finite row is NaN in every float field.

        Empty inputs: ``S == 0`` gives empty outputs; ``T == 0`` (or ``T == 1`` with
        ``shift``) gives ``S`` invalid samples.

    Raises:
        TypeError, ValueError: see ``prepare_inputs``; on CPU tensors a label outside
            ``[0, V)`` other than ``ignore_index`` is a ValueError naming it.
    """
    config = resolve_config(config)
    per_token = check_bool(per_token, "per_token")
    logits3, labels3, name, ignore_index, _ = prepare_inputs(
        logits, labels, ignore_index=ignore_index, shift=shift, backend=backend
    )
    logits3 = logits3.detach()
    if segments is not None or position_ids is not None or num_segments is not None:
        packed = prepare_segments(
            segments, position_ids, num_segments, labels=labels, labels3=labels3, shift=shift, ignore_index=ignore_index
        )
        with torch.no_grad():
            values, valid, bad, _ = segment_token_values(
                logits3, packed.labels3, name=name, ignore_index=ignore_index, config=config, write_lse=False
            )
            return segment_stats(values, valid, bad, packed.owner, packed.num_segments, config, per_token)
    return _SAMPLE_STATS[name](logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token)
