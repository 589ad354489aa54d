"""Per-sample statistics of one training step: ``sample_stats`` (docs/design.md §2).

One pass over the logits gives, per token, the cross-entropy, the max-probability
(confidence), the probability of the label, whether the argmax is the label, the softmax
entropy and the EL2N score ``||softmax - onehot||_2``; per sample, their means over the
sample's valid tokens and the instant GEKO bucket.

Backends (chosen by ``geko_core._backend.resolve_backend``): the Triton kernels for CUDA
tensors, the compiled OpenMP kernels for CPU tensors, the torch reference on request
(``backend="reference"``). Discrete outputs (``valid_tokens``, ``correct``, ``bucket`` and
invalidity) are identical on every path; the float outputs agree with the reference to
about 1e-5 relative for float32 logits (float32 accumulation). Low-precision logits
(bfloat16, float16) are read as they are and accumulated in float32 everywhere. Float64
logits are exact on the reference path; the C++ path computes them in float32 (a float64
value beyond the float32 range therefore reads as infinite and invalidates its sample); the
Triton kernels do not read them (TypeError).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.dlpack import to_dlpack

from ._backend import compiled_core_error, load_compiled_core, resolve_backend
from ._checks import check_bool, check_choice, check_int, check_same_device, check_tensor
from .config import BUCKET_FOCUS, BUCKET_HARD, GekoConfig, cpp_config_for_kernels, resolve_config
from .reference import as_samples, sample_stats_reference, token_stats_reference
from .segments import prepare_segments, segment_stats
from .types import SampleStats, TokenStats

__all__ = ["MAX_VOCAB", "sample_stats"]

#: Largest vocabulary any backend accepts.
MAX_VOCAB = 262_144
#: Logits dtypes of the public functions, and those the Triton kernels read.
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOGITS_DTYPE_SET = frozenset(LOGITS_DTYPES)
_LABEL_DTYPE_SET = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


class PreparedInputs(NamedTuple):
    """Validated inputs, viewed as the kernels see them."""

    logits3: torch.Tensor  # [S, T, V], stride(-1) == 1
    labels3: torch.Tensor  # [S, T] int64
    backend: str  # "cpp", "triton" or "reference"
    ignore_index: int
    shift: bool


def prepare_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    backend: str | None,
) -> PreparedInputs:
    """Validate ``logits`` / ``labels`` and view them as ``[S, T, V]`` / ``[S, T]`` int64.

    The public door of ``sample_stats`` and ``cross_entropy_with_stats``: everything is
    checked here, before any kernel runs, and nothing behind it checks again. A last
    dimension that is not contiguous costs one copy of the logits; every other layout (row
    slices, column slices of a wider tensor, the shift) is a view.

    Raises:
        TypeError: non-tensor inputs, logits that are not float32/bfloat16/float16/float64
            (float64 on the Triton backend), non-integer or bool labels, non-int
            ignore_index, non-bool shift.
        ValueError: mismatched shapes or devices, a vocabulary outside [2, 262144],
            ``shift=True`` on 2-D logits, an unknown or unusable backend, and (CPU tensors)
            a label outside [0, V) that is not ``ignore_index``.
    """
    # The usual call passes plain tensors of accepted dtypes and matching shapes: recognise it
    # in a few attribute reads; anything else goes through the full checks, which name the
    # problem (or accept, e.g., tensor subclasses).
    if not (
        type(logits) is torch.Tensor
        and type(labels) is torch.Tensor
        and type(ignore_index) is int
        and type(shift) is bool
        and logits.dtype in _LOGITS_DTYPE_SET
        and labels.dtype in _LABEL_DTYPE_SET
        and 2 <= logits.dim() <= 3
        and 2 <= logits.shape[-1] <= MAX_VOCAB
        and labels.shape == logits.shape[:-1]
        and labels.device == logits.device
        and not (shift and logits.dim() != 3)
    ):
        check_tensor(logits, "logits", dtype=LOGITS_DTYPES, ndim=(2, 3), layout="[N, V] or [B, T, V]")
        check_tensor(labels, "labels", dtype="integer")
        ignore_index = check_int(ignore_index, "ignore_index")
        shift = check_bool(shift, "shift")
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)} "
                f"(expected {tuple(logits.shape[:-1])})"
            )
        check_int(logits.shape[-1], "vocabulary size (logits.shape[-1])", low=2, high=MAX_VOCAB)
        check_same_device(labels, "labels", logits, "logits")
        if shift and logits.dim() != 3:
            raise ValueError("shift=True needs [B, T, V] logits and [B, T] labels, got 2-D logits")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64 (labels are compared as int64), got {ignore_index}")
    vocab = logits.shape[-1]
    if torch.compiler.is_compiling():
        # Traced by torch.compile: the geko operators pick the kernel by device ("op").
        check_choice(backend, "backend", (None, "triton", "cpp", "reference"))
        name = "reference" if backend == "reference" else "op"
    elif backend is None and logits.is_cpu and compiled_core_error() is None:
        name = "cpp"  # what resolve_backend answers for CPU tensors when the core is built
    else:
        name = resolve_backend(logits.device.type, backend)
    if name == "triton" and logits.dtype not in TRITON_LOGITS_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16 or float16 on the Triton backend, got {logits.dtype} "
            "(float64 logits run on the 'cpp' and 'reference' backends)"
        )

    logits3, labels3 = as_samples(logits, labels, shift=shift)
    if labels3.dtype != torch.int64:
        # Before comparing with ignore_index: torch would wrap a large ignore_index to the
        # labels' narrower dtype (2**63 - 1 becomes -1 for int32 labels).
        labels3 = labels3.to(torch.int64)
    if logits.device.type == "cpu" and labels3.numel() > 0 and not torch.compiler.is_compiling():
        # On the GPU an out-of-range label only invalidates its sample (checking would cost
        # a host sync); on the CPU it is almost always a bug, so say so. (A compiled graph
        # cannot read the labels while it is traced: there, as on the GPU, such a label
        # invalidates its sample.)
        position = _first_bad_label(labels3, vocab, ignore_index)
        if position is not None:
            value = int(labels3[position])
            raise ValueError(
                f"label {value} at (sample, token) {position} is outside [0, {vocab}) "
                f"and is not ignore_index ({ignore_index})"
            )
    if logits3.stride(-1) != 1:
        logits3 = logits3.contiguous()  # the kernels read rows as contiguous vectors
    return PreparedInputs(logits3, labels3, name, ignore_index, shift)


def _first_bad_label(labels3: torch.Tensor, vocab: int, ignore_index: int) -> tuple[int, int] | None:
    """(sample, token) of the first ``[S, T]`` int64 CPU label that is neither ignore_index
    nor in ``[0, vocab)``, or None."""
    if compiled_core_error() is None and -(2**63) <= ignore_index < 2**63:
        flat = load_compiled_core().first_bad_label(to_dlpack(labels3), vocab, ignore_index)
        return None if flat < 0 else divmod(flat, labels3.shape[1])
    out_of_range = (labels3 != ignore_index) & ((labels3 < 0) | (labels3 >= vocab))
    if not bool(out_of_range.any()):
        return None
    return tuple(int(i) for i in out_of_range.nonzero()[0])  # type: ignore[return-value]


class ForwardBlocks(NamedTuple):
    """Raw outputs of one forward pass, as the operators return them (no two alias)."""

    sample_values: torch.Tensor  # float32 [6, S]: loss, confidence, label_prob, correct, entropy, el2n
    valid_tokens: torch.Tensor  # int32 [S]
    bucket: torch.Tensor  # int8 [S]
    token_values: torch.Tensor  # float32 [K, S, T]: K = 6 with per-token values, 1 (the loss) with write_lse, else 0
    token_valid: torch.Tensor  # bool [S, T'] (T' = T with per-token values, else 0)
    lse: torch.Tensor  # float32 [S, T] with write_lse, else [0, 0]


def token_rows(per_token: bool, write_lse: bool) -> int:
    """Rows of ``ForwardBlocks.token_values``."""
    return 6 if per_token else (1 if write_lse else 0)


def forward_blocks_cpp(
    logits3: torch.Tensor, labels3: torch.Tensor, *, ignore_index: int, config: GekoConfig, per_token: bool, write_lse: bool
) -> ForwardBlocks:
    """The C++ forward kernel on validated ``[S, T, V]`` / ``[S, T]`` int64 CPU views: one
    float32 block per level instead of a tensor per field. Row 0 of ``token_values`` holds
    the token losses (0 for tokens that are not valid); it has the other five fields with
    ``per_token``, only the loss with ``write_lse``, no row otherwise."""
    core = load_compiled_core()
    samples, tokens = labels3.shape
    sample_values = torch.empty((6, samples), dtype=torch.float32)
    valid_tokens = torch.empty(samples, dtype=torch.int32)
    bucket = torch.empty(samples, dtype=torch.int8)
    token_values = torch.empty((token_rows(per_token, write_lse), samples, tokens), dtype=torch.float32)
    token_valid = torch.empty((samples, tokens if per_token else 0), dtype=torch.bool)
    lse = torch.empty((samples, tokens) if write_lse else (0, 0), dtype=torch.float32)
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
    )
    return ForwardBlocks(sample_values, valid_tokens, bucket, token_values, token_valid, lse)


def stats_from_blocks(blocks: ForwardBlocks | tuple, per_token: bool) -> SampleStats:
    """SampleStats whose fields are views of the blocks."""
    sample_values, valid_tokens, bucket, token_values, token_valid, _ = blocks
    tokens = TokenStats(*token_values.unbind(0), valid=token_valid) if per_token else None
    return SampleStats(*sample_values.unbind(0), valid_tokens=valid_tokens, bucket=bucket, tokens=tokens)


def stats_cpp(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    *,
    ignore_index: int,
    config: GekoConfig,
    per_token: bool,
    token_loss: bool = False,
) -> tuple[SampleStats, torch.Tensor | None, torch.Tensor | None]:
    """Run the C++ forward kernel on validated ``[S, T, V]`` / ``[S, T]`` int64 CPU views.

    Returns:
        (SampleStats, token_loss, lse): the last two are float32 ``[S, T]`` when
        ``token_loss=True`` (0 for non-valid tokens), else None.
    """
    blocks = forward_blocks_cpp(
        logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token, write_lse=token_loss
    )
    stats = stats_from_blocks(blocks, per_token)
    if not token_loss:
        return stats, None, None
    return stats, blocks.token_values[0], blocks.lse


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
    if name == "reference":
        tokens, good = token_stats_reference(logits3, labels3, ignore_index=ignore_index)
        return torch.stack(tokens[:6]), tokens.valid, ~good & (labels3 != ignore_index), None
    if name == "triton":
        from .kernels.sample_stats import launch_token_stats

        return launch_token_stats(logits3, labels3, ignore_index=ignore_index, write_lse=write_lse)
    if name == "op":
        from .ops import config_values, stats_forward

        blocks = ForwardBlocks(*stats_forward(logits3, labels3, ignore_index, config_values(config), True, write_lse))
        valid = blocks.token_valid
        counted = labels3 != ignore_index
        vocab = logits3.shape[-1]
        bad = (valid & ~torch.isfinite(blocks.token_values[0].detach())) | (counted & ((labels3 < 0) | (labels3 >= vocab)))
        if logits3.device.type != "cpu":
            # The GPU kernel keeps a finite loss for a row with -inf logits, which still
            # invalidates its sample: ask the logits (one more read, compiled paths only).
            bad = bad | (valid & ~torch.isfinite(logits3).all(dim=-1))
        return blocks.token_values, valid, bad, blocks.lse if write_lse else None
    blocks = forward_blocks_cpp(logits3, labels3, ignore_index=ignore_index, config=config, per_token=True, write_lse=write_lse)
    # The C++ kernel writes NaN in every field of a valid token whose row is not finite (an
    # out-of-range label on a CPU tensor was refused before anything ran).
    bad = blocks.token_valid & torch.isnan(blocks.token_values[0])
    return blocks.token_values, blocks.token_valid, bad, blocks.lse if write_lse else None


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
        token, or whose counted tokens include a row with a NaN/inf logit (or, on the GPU, a
        label out of range), is invalid: NaN floats, bucket ``BUCKET_INVALID``.
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
    if name != "reference" and torch.compiler.is_compiling():
        from .ops import config_values, stats_forward

        blocks = stats_forward(logits3, labels3, ignore_index, config_values(config), per_token, False)
        return stats_from_blocks(blocks, per_token)
    with torch.no_grad():
        if name == "reference":
            return sample_stats_reference(logits3, labels3, ignore_index=ignore_index, per_token=per_token, config=config)
        if name == "triton":
            from .kernels.sample_stats import sample_stats_triton

            return sample_stats_triton(logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token)
    stats, _, _ = stats_cpp(logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token)
    return stats
