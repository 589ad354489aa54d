"""The chunk loop of ``linear_cross_entropy_with_stats`` (docs/linear_loss.md): input
checks, the chunk size, one pass over the rows through one reused ``[chunk, V]`` logits
buffer with the kernels of ``cross_entropy_with_stats`` (``_CHUNK_KERNELS``, keyed by the
backend name), and the exact per-sample statistics from the token values.

Per-sample statistics are exact: each chunk yields token values, and a sample's means are
accumulated over its tokens in the order and the precision (float64, sequential) the C++
kernel uses, whatever the chunks, so a sample cut by a chunk boundary gets the same values and
the same bucket as ``sample_stats`` on the materialised logits.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch.utils.dlpack import to_dlpack

from ._backend import load_compiled_core, resolve_backend
from ._checks import check_bool, check_ignore_index, check_int, check_same_device, check_tensor
from ._inputs import LOGITS_DTYPES, MAX_VOCAB, TRITON_LOGITS_DTYPES
from ._reduction import reduce_samples, weight_tokens
from ._reduction import token_scale as tokens_scale
from ._chunk_products import ChunkProducts, wide_products
from .config import GekoConfig, cpp_config_for_kernels
from .loss_options import LossOptions, cpp_kernel_options, kernel_options
from ._cross_entropy_kernels import cross_entropy_backward_triton
from .reference import instant_bucket
from .stats import forward_triton
from .types import SampleStats, TokenStats

__all__ = [
    "MAX_CHUNK_BUFFER_BYTES",
    "MAX_CHUNK_BUFFER_BYTES_CUDA",
    "Inputs",
    "Rows",
    "TokenValues",
    "default_chunk_rows",
    "prepare",
    "reduce_rows",
    "row_scale",
    "run_chunks",
    "sample_statistics",
]

#: Largest logits buffer the automatic chunk size allocates on the CPU (bytes). Larger buffers
#: gain little there (the matmuls are as fast from about 500 rows on) and cost peak memory.
MAX_CHUNK_BUFFER_BYTES = 64 * 2**20
#: The same on CUDA, where wider chunks keep the GPU's matmuls and kernel launches efficient.
MAX_CHUNK_BUFFER_BYTES_CUDA = 256 * 2**20
#: Share of the free memory the automatic chunk size may use for the buffer.
FREE_MEMORY_SHARE = 8
#: Free memory assumed when the system does not say (bytes).
_FALLBACK_FREE_BYTES = 2 * 2**30

_NUM_FIELDS = 6  # loss, confidence, label_prob, correct, entropy, el2n (SampleStats order)


# -- chunk size ------------------------------------------------------------------------------


def _free_memory_bytes(device: torch.device) -> int:
    """Memory available for new allocations on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return _FALLBACK_FREE_BYTES


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk when ``chunk_size=None``.

    The logits buffer (``chunk * V`` elements of the input dtype, and as many float32 ones
    where 16-bit products run in float32) gets at most
    ``min(free / 8, cap)``: on the CPU, free memory is ``MemAvailable`` of ``/proc/meminfo``
    (``sysconf`` or 2 GiB when that cannot be read) and the cap 64 MiB; on CUDA, free memory
    is ``torch.cuda.mem_get_info`` and the cap 256 MiB. At least one token, at most ``rows``.
    """
    cap = MAX_CHUNK_BUFFER_BYTES_CUDA if device.type == "cuda" else MAX_CHUNK_BUFFER_BYTES
    budget = min(_free_memory_bytes(device) // FREE_MEMORY_SHARE, cap)
    return max(1, min(budget // (vocab * _element_bytes(dtype, device)), max(rows, 1)))


def _element_bytes(dtype: torch.dtype, device: torch.device) -> int:
    """Buffer bytes per logit of a chunk: the input dtype's, plus a float32 scratch where the
    products run wide (``_chunk_products``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize + (4 if wide_products(dtype, device) else 0)


# -- inputs ----------------------------------------------------------------------------------


class Inputs(NamedTuple):
    """Validated inputs, as the chunk loop reads them."""

    hidden2: torch.Tensor  # [R, d], R = S * T rows (a view of hidden when its layout allows)
    label_rows: torch.Tensor  # [R] int64, already shifted: the label each row is scored against
    samples: int  # S
    row_tokens: int  # T: rows per sample (with shift, the last one is always ignored)
    out_tokens: int  # tokens per sample in the per-token output (T - 1 with shift)
    valid_tokens: torch.Tensor  # [S] int64
    weight: torch.Tensor | None  # sample_weight, detached (float32 on the fused paths)
    backend: str
    chunk: int
    ignore_index: int
    shift: bool

    def rows(self, options: LossOptions | None = None) -> "Rows":
        """What the chunk loop reads (``options``: the loss options, None: plain)."""
        return Rows(self.hidden2, self.label_rows, self.backend, self.chunk, self.ignore_index, options or _PLAIN)


def prepare(
    hidden: Any,
    weight: Any,
    labels: Any,
    bias: Any,
    sample_weight: Any,
    *,
    ignore_index: Any,
    shift: Any,
    chunk_size: Any,
    backend: Any,
) -> Inputs:
    check_tensor(hidden, "hidden", dtype=LOGITS_DTYPES, ndim=(2, 3), layout="[N, d] or [B, T, d]")
    check_tensor(weight, "weight", ndim=2, layout="[V, d]")
    check_tensor(labels, "labels", dtype="integer")
    check_tensor(bias, "bias", ndim=1, layout="[V]", optional=True)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {value.dtype}")
    ignore_index = check_ignore_index(ignore_index)
    shift = check_bool(shift, "shift")
    vocab = check_int(weight.shape[0], "vocabulary size (weight.shape[0])", low=2, high=MAX_VOCAB)
    dim = hidden.shape[-1]
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight must be [V, d] with d = hidden.shape[-1] = {dim}, got shape {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != vocab:
        raise ValueError(f"bias must be [V] with V = weight.shape[0] = {vocab}, got shape {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match hidden shape {tuple(hidden.shape)} "
            f"(expected {tuple(hidden.shape[:-1])})"
        )
    check_same_device(weight, "weight", hidden, "hidden")
    check_same_device(labels, "labels", hidden, "hidden")
    if bias is not None:
        check_same_device(bias, "bias", hidden, "hidden")
    if shift and hidden.dim() != 3:
        raise ValueError("shift=True needs [B, T, d] hidden and [B, T] labels, got 2-D hidden")
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    compiling = torch.compiler.is_compiling()
    name = resolve_backend(hidden.device.type, backend, traced=compiling, float64=hidden.dtype is torch.float64)
    if name == "triton" and hidden.dtype not in TRITON_LOGITS_DTYPES:
        raise TypeError(
            f"hidden must be float32, bfloat16 or float16 on the Triton backend, got {hidden.dtype} "
            "(float64 runs on the 'cpp' and 'reference' backends)"
        )

    samples = hidden.shape[0]
    labels2 = labels.unsqueeze(1) if labels.dim() == 1 else labels
    labels2 = labels2.to(torch.int64)  # before comparing with a large ignore_index (see prepare_inputs)
    row_tokens = labels2.shape[1]
    scored = labels2[:, 1:] if shift else labels2  # the labels the tokens are scored against
    in_range = (scored >= 0) & (scored < vocab)
    counted = scored != ignore_index
    if hidden.device.type == "cpu" and scored.numel() > 0 and not compiling:
        out_of_range = counted & ~in_range
        if bool(out_of_range.any()):
            position = tuple(int(i) for i in out_of_range.nonzero()[0])
            value = int(scored[position])
            raise ValueError(
                f"label {value} at (sample, token) {position} is outside [0, {vocab}) "
                f"and is not ignore_index ({ignore_index})"
            )
    valid_tokens = (counted & in_range).sum(dim=1)

    weight_s = check_tensor(
        sample_weight,
        "sample_weight",
        dtype="floating",
        shape=(samples,),
        layout="[S] (one weight per sample)",
        optional=True,
    )
    if weight_s is not None:
        check_same_device(weight_s, "sample_weight", hidden, "hidden")
        weight_s = weight_s.detach()
        if name != "reference":
            weight_s = weight_s.to(torch.float32)

    if shift:
        # Row t of a sample is scored against label t + 1; its last row predicts nothing and
        # is given ignore_index, so every position of hidden is a row (no copy of hidden).
        label_rows = torch.full_like(labels2, ignore_index)
        label_rows[:, :-1] = labels2[:, 1:]
    else:
        label_rows = labels2
    rows = samples * row_tokens
    if chunk_size is None:
        if compiling:  # no free-memory probe while tracing: the buffer cap alone
            itemsize = _element_bytes(hidden.dtype, hidden.device)
            chunk_size = max(1, min(MAX_CHUNK_BUFFER_BYTES // (vocab * itemsize), max(rows, 1)))
        else:
            chunk_size = default_chunk_rows(rows, vocab, hidden.dtype, hidden.device)
    return Inputs(
        hidden2=hidden.reshape(rows, dim),
        label_rows=label_rows.reshape(rows),
        samples=samples,
        row_tokens=row_tokens,
        out_tokens=max(row_tokens - 1, 0) if shift else row_tokens,
        valid_tokens=valid_tokens,
        weight=weight_s,
        backend=name,
        chunk=min(chunk_size, max(rows, 1)),
        ignore_index=ignore_index,
        shift=shift,
    )


# -- the chunk loop --------------------------------------------------------------------------


class TokenValues(NamedTuple):
    values: torch.Tensor  # float32 [6, R]
    valid: torch.Tensor  # bool [R]
    spoiled: torch.Tensor  # bool [R]: a counted row whose statistics are invalid (non-finite row, bad label)
    lse: torch.Tensor | None  # float64 [R] (the backward needs it past float32's precision)
    #: float32 [R]: the token loss trained on under the loss options (None: ``values[0]``)
    loss: torch.Tensor | None = None

    @property
    def trained_loss(self) -> torch.Tensor:
        """Every row's token loss as the reduction reads it."""
        return self.values[0] if self.loss is None else self.loss


class _Grads(NamedTuple):
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # weight and bias gradients are sums over every chunk: 16-bit inputs accumulate in fp32
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _chunk_logits(
    buffer: torch.Tensor, hidden_chunk: torch.Tensor, products: ChunkProducts, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = products.logits(hidden_chunk, buffer[: hidden_chunk.shape[0]])
    if bias is not None:
        logits.add_(bias)  # as hidden @ weight.T + bias: the product, then the sum
    return logits


class Rows(NamedTuple):
    """The rows of a linear cross-entropy as the chunk loop reads them."""

    hidden2: torch.Tensor  # [R, d]
    label_rows: torch.Tensor  # [R] int64, already shifted
    backend: str  # "cpp" or "triton": the key of _CHUNK_KERNELS
    chunk: int
    ignore_index: int
    options: LossOptions = LossOptions()


class _CppChunk:
    """The C++ kernels of ``cross_entropy_with_stats`` on one chunk (each row a one-token sample)."""

    def __init__(self, config: GekoConfig | None, rows: int, chunk: int, options: LossOptions) -> None:
        self.options = cpp_kernel_options(options)
        self.core = load_compiled_core()
        self.config = None if config is None else cpp_config_for_kernels(config)
        self.sample_out: list[torch.Tensor] = []
        if config is not None:
            size = min(chunk, rows)
            self.sample_out = [torch.empty(size, dtype=torch.float32) for _ in range(_NUM_FIELDS)]
            self.sample_out += [torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=torch.int8)]

    def score(self, logits3, labels3, ignore_index, tokens, start, stop) -> torch.Tensor:
        """Token values (and log-sum-exp) of rows ``start:stop`` into ``tokens``; the rows' buckets."""
        count = stop - start
        token_capsules = [to_dlpack(tokens.values[k, start:stop].view(count, 1)) for k in range(_NUM_FIELDS)]
        token_capsules.append(to_dlpack(tokens.valid[start:stop].view(count, 1)))
        lse_capsule = None if tokens.lse is None else to_dlpack(tokens.lse[start:stop].view(count, 1))
        loss_capsule = None if tokens.loss is None else to_dlpack(tokens.loss[start:stop].view(count, 1))
        self.core.stats_forward(
            to_dlpack(logits3), to_dlpack(labels3), ignore_index, self.config,
            [to_dlpack(t[:count]) for t in self.sample_out], token_capsules, lse_capsule,
            loss_out=loss_capsule, **self.options,
        )
        return self.sample_out[7][:count]

    def backward_in_place(self, logits3, labels3, lse3, scale3, ignore_index) -> None:
        self.core.cross_entropy_backward(
            to_dlpack(logits3), to_dlpack(labels3), to_dlpack(lse3), to_dlpack(scale3), None, ignore_index, **self.options
        )


class _TritonChunk:
    """The Triton kernels of ``cross_entropy_with_stats`` on one chunk."""

    def __init__(self, config: GekoConfig | None, rows: int, chunk: int, options: LossOptions) -> None:
        self.config = config
        self.options = kernel_options(options)

    def score(self, logits3, labels3, ignore_index, tokens, start, stop) -> torch.Tensor:
        count = stop - start
        _, _, bucket, token_values, token_valid, lse = forward_triton(
            logits3, labels3, ignore_index=ignore_index, config=self.config, write_lse=True, options=self.options
        )
        if tokens.loss is not None:
            tokens.loss[start:stop].copy_(token_values[-1].view(count))
        for k in range(_NUM_FIELDS):
            tokens.values[k, start:stop].copy_(token_values[k].view(count))
        tokens.valid[start:stop].copy_(token_valid.view(count))
        if tokens.lse is not None:
            tokens.lse[start:stop].copy_(lse.view(count))
        return bucket

    def backward_in_place(self, logits3, labels3, lse3, scale3, ignore_index) -> None:
        cross_entropy_backward_triton(
            logits3, labels3, lse3, scale3, ignore_index=ignore_index, inplace=True, options=self.options
        )


_CHUNK_KERNELS = {"cpp": _CppChunk, "triton": _TritonChunk}
_PLAIN = LossOptions()


def run_chunks(
    rows: Rows,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: GekoConfig | None,
    keep_lse: bool = False,
    token_scale: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    need: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[TokenValues | None, _Grads]:
    """One pass over the rows in chunks of ``rows.chunk`` rows through one logits buffer.

    Args:
        config: score the rows (token values, validity) with these thresholds; None: no
            statistics pass, ``lse`` (a previous forward's) feeds the backward kernel.
        keep_lse: when scoring, also keep every row's log-sum-exp (``TokenValues.lse``).
        token_scale: float32 ``[R]`` ``d loss / d token_loss``; None for no gradient.
        need: gradients wanted for (hidden, weight, bias), when ``token_scale`` is given.
    """
    hidden2, label_rows, chunk, ignore_index = rows.hidden2, rows.label_rows, rows.chunk, rows.ignore_index
    count_rows, dim = hidden2.shape
    vocab = weight.shape[0]
    device, dtype = hidden2.device, hidden2.dtype
    with_grad = token_scale is not None
    need_h, need_w, need_b = need if with_grad else (False, False, False)
    acc = _accumulation_dtype(dtype)
    grad_h = torch.empty((count_rows, dim), dtype=dtype, device=device) if need_h else None
    grad_w = torch.zeros((vocab, dim), dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros((vocab,), dtype=torch.float32 if acc != torch.float64 else acc, device=device) if need_b else None

    tokens: TokenValues | None = None
    if config is not None:
        tokens = TokenValues(
            values=torch.zeros((_NUM_FIELDS, count_rows), dtype=torch.float32, device=device),
            valid=torch.zeros((count_rows,), dtype=torch.bool, device=device),
            spoiled=torch.zeros((count_rows,), dtype=torch.bool, device=device),
            lse=torch.zeros((count_rows,), dtype=torch.float64, device=device) if (keep_lse or with_grad) else None,
            loss=None if rows.options.plain else torch.zeros((count_rows,), dtype=torch.float32, device=device),
        )
        lse = tokens.lse
    kernels = _CHUNK_KERNELS[rows.backend](config, count_rows, chunk, rows.options)
    products = ChunkProducts(weight, min(chunk, count_rows))
    buffer = torch.empty((min(chunk, count_rows), vocab), dtype=dtype, device=device) if count_rows else None

    for start in range(0, count_rows, chunk):
        stop = min(start + chunk, count_rows)
        count = stop - start
        hidden_chunk = hidden2[start:stop]
        logits = _chunk_logits(buffer, hidden_chunk, products, bias)
        logits3 = logits.view(count, 1, vocab)
        labels3 = label_rows[start:stop].view(count, 1)

        if tokens is not None:
            row_bucket = kernels.score(logits3, labels3, ignore_index, tokens, start, stop)
            # Each row is a one-token sample of the kernel: an invalid one that counts (its
            # label is not ignore_index) is a non-finite row or an out-of-range label, which
            # makes its whole sample invalid, as in sample_stats.
            tokens.spoiled[start:stop] = (row_bucket < 0) & (label_rows[start:stop] != ignore_index)

        if not with_grad:
            continue
        if lse is None:  # an internal invariant of the chunk loop
            raise RuntimeError("linear_cross_entropy_with_stats: internal error (no log-sum-exp for the backward)")
        lse3 = lse[start:stop].view(count, 1)
        scale3 = token_scale[start:stop].view(count, 1)
        # The logits become d loss / d logits in place (zero rows for tokens that do not count).
        kernels.backward_in_place(logits3, labels3, lse3, scale3, ignore_index)
        products.add_gradients(logits, hidden_chunk, None if grad_h is None else grad_h[start:stop], grad_w, grad_b)

    buffer = logits = logits3 = products = None  # freed before the accumulators are cast: not needed at once
    grads = _Grads(
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None or bias is None else grad_b.to(bias.dtype),
    )
    return tokens, grads


def sample_statistics(
    tokens: TokenValues, prepared: Inputs, config: GekoConfig, per_token: bool
) -> tuple[SampleStats, torch.Tensor]:
    """Per-sample statistics from the token values, and the per-sample sums of token losses.

    A sample's means are float64 sums of its valid tokens' float32 values, added in token
    order, divided by the count and rounded to float32: the C++ kernel's arithmetic, so the
    result does not depend on where the chunks cut the sample.
    """
    samples, row_tokens = prepared.samples, prepared.row_tokens
    values = tokens.values.view(_NUM_FIELDS, samples, row_tokens)
    valid = tokens.valid.view(samples, row_tokens)
    count = prepared.valid_tokens
    invalid = tokens.spoiled.view(samples, row_tokens).any(dim=1) | (count == 0)
    if row_tokens > 0:
        kept = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
        sums = kept.double().cumsum(dim=2)[:, :, -1]  # sequential: the order of the C++ loop
    else:
        sums = torch.zeros((_NUM_FIELDS, samples), dtype=torch.float64, device=values.device)
    means = (sums / count.clamp(min=1).to(torch.float64)).to(torch.float32)
    means = torch.where(invalid, torch.full_like(means, float("nan")), means)
    loss, confidence, label_prob, correct, entropy, el2n = means.unbind(0)
    token_out = None
    if per_token:
        t = prepared.out_tokens
        fields = [values[k, :, :t].contiguous() for k in range(_NUM_FIELDS)]
        token_out = TokenStats(*fields, valid=valid[:, :t].contiguous())
    stats = SampleStats(
        loss=loss,
        confidence=confidence,
        label_prob=label_prob,
        correct=correct,
        entropy=entropy,
        el2n=el2n,
        valid_tokens=count.to(torch.int32),
        bucket=_bucket(confidence, correct, values[2], valid, config),
        tokens=token_out,
    )
    trained = tokens.trained_loss.view(samples, row_tokens)
    token_loss_sum = trained.sum(dim=1) if row_tokens > 0 else torch.zeros(samples, dtype=torch.float32, device=values.device)
    return stats, token_loss_sum


def _bucket(
    confidence: torch.Tensor, correct: torch.Tensor, label_prob: torch.Tensor, valid: torch.Tensor, config: GekoConfig
) -> torch.Tensor:
    """The instant bucket from the per-sample means, by the reference's rule (float32
    thresholds, as the kernels compare them). A configuration with a positive
    ``correct_margin`` also needs each sample's lowest label probability over its valid
    tokens (``label_prob`` and ``valid`` are ``[S, T]``), a minimum, so chunk-independent."""
    if getattr(config, "correct_margin", 0.0) > 0.0:
        inf = torch.full((), float("inf"), dtype=torch.float32, device=label_prob.device)
        lowest = torch.where(valid, label_prob, inf).amin(dim=1) if valid.shape[1] else inf.expand(valid.shape[0])
        return instant_bucket(confidence, correct, config, lowest)
    return instant_bucket(confidence, correct, config)


def reduce_rows(
    token_loss: torch.Tensor, token_loss_sum: torch.Tensor, prepared: Inputs, reduction: str,
    mean_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of ``reduction`` from every row's token loss (``[R]``, 0 where the row does
    not count) and the per-sample sums of ``sample_statistics``: ``"none"`` gives the
    ``[S, T]`` token losses (``T - 1`` with shift: the last row of a sample predicts nothing)
    times the sample weights, the others reduce the sums."""
    if reduction != "none":
        return reduce_samples(token_loss_sum, prepared.valid_tokens, prepared.weight, reduction, mean_total)
    per_token = token_loss.view(prepared.samples, prepared.row_tokens)[:, : prepared.out_tokens]
    return weight_tokens(per_token, prepared.weight)


def row_scale(prepared: Inputs, grad_output: torch.Tensor, reduction: str, mean_total: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[R]``: d loss / d token_loss of every row (the kernels zero the rows that do
    not count, so a sample's scale is simply repeated over its rows). For ``"none"``,
    ``grad_output`` is the upstream gradient of ``reduce_rows``' token losses."""
    if reduction == "none":
        scale = torch.zeros((prepared.samples, prepared.row_tokens), dtype=torch.float32, device=grad_output.device)
        upstream = grad_output.reshape(prepared.samples, prepared.out_tokens)
        scale[:, : prepared.out_tokens] = tokens_scale(
            upstream, prepared.valid_tokens, prepared.weight, "none", prepared.out_tokens
        )
        return scale.reshape(-1)
    return tokens_scale(
        grad_output, prepared.valid_tokens, prepared.weight, reduction, prepared.row_tokens, mean_total
    ).reshape(-1)


