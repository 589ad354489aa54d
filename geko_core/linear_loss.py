"""Fused linear cross-entropy with per-sample statistics: ``linear_cross_entropy_with_stats``.

The loss of ``hidden @ weight.T + bias`` against the labels, and the statistics of
``sample_stats`` on those logits, without ever holding the ``[N, V]`` logits: the tokens are
processed in chunks, and one ``[chunk, V]`` buffer is reused for every chunk. Per chunk, torch's
matmul forms the logits in the input dtype; the fused kernel of ``cross_entropy_with_stats``
(C++ on CPU tensors, Triton on CUDA tensors) computes the token losses and statistics and then
overwrites the buffer with the logits' gradient; two more matmuls turn that gradient into the
chunk's share of the gradients of ``hidden``, ``weight`` and ``bias``. See docs/linear_loss.md.

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
from ._checks import check_bool, check_choice, check_int, check_same_device, check_tensor
from .config import GekoConfig, cpp_config_for_kernels, resolve_config
from .loss import _reduce, cross_entropy_with_stats
from .reference import instant_bucket
from .stats import LOGITS_DTYPES, MAX_VOCAB, TRITON_LOGITS_DTYPES
from .types import SampleStats, TokenStats

__all__ = ["MAX_CHUNK_BUFFER_BYTES", "MAX_CHUNK_BUFFER_BYTES_CUDA", "default_chunk_rows", "linear_cross_entropy_with_stats"]

#: Largest logits buffer the automatic chunk size allocates on the CPU (bytes). Larger buffers
#: gain little there (the matmuls are as fast from about 500 rows on) and cost peak memory.
MAX_CHUNK_BUFFER_BYTES = 64 * 2**20
#: The same on CUDA, where wider chunks keep the GPU's matmuls and kernel launches efficient.
MAX_CHUNK_BUFFER_BYTES_CUDA = 256 * 2**20
#: Share of the free memory the automatic chunk size may use for the buffer.
FREE_MEMORY_SHARE = 8
#: Free memory assumed when the system does not say (bytes).
_FALLBACK_FREE_BYTES = 2 * 2**30

#: Classes per block when a 16-bit chunk's weight gradient is added to the fp32 accumulator.
_CLASS_BLOCK = 4096

_NUM_FIELDS = 6  # loss, confidence, label_prob, correct, entropy, el2n (SampleStats order)
_REDUCTIONS = ("none", "sum", "mean")


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

    The logits buffer (``chunk * V`` elements of the input dtype) gets at most
    ``min(free / 8, cap)``: on the CPU, free memory is ``MemAvailable`` of ``/proc/meminfo``
    (``sysconf`` or 2 GiB when that cannot be read) and the cap 64 MiB; on CUDA, free memory
    is ``torch.cuda.mem_get_info`` and the cap 256 MiB. At least one token, at most ``rows``.
    """
    cap = MAX_CHUNK_BUFFER_BYTES_CUDA if device.type == "cuda" else MAX_CHUNK_BUFFER_BYTES
    budget = min(_free_memory_bytes(device) // FREE_MEMORY_SHARE, cap)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, min(budget // (vocab * itemsize), max(rows, 1)))


# -- inputs ----------------------------------------------------------------------------------


class _Inputs(NamedTuple):
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


def _prepare(
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
) -> _Inputs:
    check_tensor(hidden, "hidden", dtype=LOGITS_DTYPES, ndim=(2, 3), layout="[N, d] or [B, T, d]")
    check_tensor(weight, "weight", ndim=2, layout="[V, d]")
    check_tensor(labels, "labels", dtype="integer")
    check_tensor(bias, "bias", ndim=1, layout="[V]", optional=True)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and value.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}), got {value.dtype}")
    ignore_index = check_int(ignore_index, "ignore_index")
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
    if compiling:  # traced: the geko operators pick the kernel by device
        check_choice(backend, "backend", (None, "triton", "cpp", "reference"))
        name = "reference" if backend == "reference" else "op"
    else:
        name = resolve_backend(hidden.device.type, backend)
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
            itemsize = torch.empty((), dtype=hidden.dtype).element_size()
            chunk_size = max(1, min(MAX_CHUNK_BUFFER_BYTES // (vocab * itemsize), max(rows, 1)))
        else:
            chunk_size = default_chunk_rows(rows, vocab, hidden.dtype, hidden.device)
    return _Inputs(
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


class _TokenValues(NamedTuple):
    values: torch.Tensor  # float32 [6, R]
    valid: torch.Tensor  # bool [R]
    spoiled: torch.Tensor  # bool [R]: a counted row whose statistics are invalid (non-finite row, bad label)
    lse: torch.Tensor | None  # float32 [R]


class _Grads(NamedTuple):
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # weight and bias gradients are sums over every chunk: 16-bit inputs accumulate in fp32
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _chunk_logits(
    buffer: torch.Tensor, hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    rows = hidden_chunk.shape[0]
    logits = buffer[:rows]
    torch.mm(hidden_chunk, weight.t(), out=logits)
    if bias is not None:
        logits.add_(bias)  # as hidden @ weight.T + bias: the product, then the sum
    return logits


def _run_chunks(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    label_rows: torch.Tensor,
    *,
    backend: str,
    chunk: int,
    ignore_index: int,
    config: GekoConfig,
    stats: bool,
    keep_lse: bool,
    token_scale: torch.Tensor | None,
    lse_in: torch.Tensor | None,
    need: tuple[bool, bool, bool],
) -> tuple[_TokenValues | None, _Grads]:
    """One pass over the rows in chunks of ``chunk`` rows through one logits buffer.

    Args:
        stats: run the forward kernel (token values, validity); otherwise ``lse_in`` (a
            previous forward's) feeds the backward kernel.
        keep_lse: with ``stats``, also keep every row's log-sum-exp (``_TokenValues.lse``).
        token_scale: float32 ``[R]`` ``d loss / d token_loss``; None for no gradient.
        need: gradients wanted for (hidden, weight, bias), when ``token_scale`` is given.
    """
    rows, dim = hidden2.shape
    vocab = weight.shape[0]
    device, dtype = hidden2.device, hidden2.dtype
    with_grad = token_scale is not None
    need_h, need_w, need_b = need if with_grad else (False, False, False)
    acc = _accumulation_dtype(dtype)
    grad_h = torch.empty((rows, dim), dtype=dtype, device=device) if need_h else None
    grad_w = torch.zeros((vocab, dim), dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros((vocab,), dtype=torch.float32 if acc != torch.float64 else acc, device=device) if need_b else None

    tokens: _TokenValues | None = None
    if stats:
        tokens = _TokenValues(
            values=torch.zeros((_NUM_FIELDS, rows), dtype=torch.float32, device=device),
            valid=torch.zeros((rows,), dtype=torch.bool, device=device),
            spoiled=torch.zeros((rows,), dtype=torch.bool, device=device),
            lse=torch.zeros((rows,), dtype=torch.float32, device=device) if (keep_lse or with_grad) else None,
        )
    lse_all = tokens.lse if tokens is not None else lse_in

    core = load_compiled_core() if backend == "cpp" else None
    cpp_config = cpp_config_for_kernels(config) if backend == "cpp" else None
    if backend == "triton":
        from .kernels.cross_entropy import cross_entropy_backward_triton, cross_entropy_forward_triton

    buffer = torch.empty((min(chunk, rows), vocab), dtype=dtype, device=device) if rows else None
    sample_out: list[torch.Tensor] = []
    if core is not None and stats:
        size = min(chunk, rows)
        sample_out = [torch.empty(size, dtype=torch.float32) for _ in range(_NUM_FIELDS)]
        sample_out += [torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=torch.int8)]

    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        count = stop - start
        hidden_chunk = hidden2[start:stop]
        logits = _chunk_logits(buffer, hidden_chunk, weight, bias)
        logits3 = logits.view(count, 1, vocab)
        labels3 = label_rows[start:stop].view(count, 1)

        if stats:
            if tokens is None:  # an internal invariant of the chunk loop
                raise RuntimeError("linear_cross_entropy_with_stats: internal error (tokens is not None failed)")
            if core is not None:
                token_capsules = [to_dlpack(tokens.values[k, start:stop].view(count, 1)) for k in range(_NUM_FIELDS)]
                token_capsules.append(to_dlpack(tokens.valid[start:stop].view(count, 1)))
                lse_capsule = None if tokens.lse is None else to_dlpack(tokens.lse[start:stop].view(count, 1))
                core.stats_forward(
                    to_dlpack(logits3),
                    to_dlpack(labels3),
                    ignore_index,
                    cpp_config,
                    [to_dlpack(t[:count]) for t in sample_out],
                    token_capsules,
                    lse_capsule,
                )
                row_bucket = sample_out[7][:count]
            else:
                chunk_stats, _, chunk_lse = cross_entropy_forward_triton(
                    logits3, labels3, ignore_index=ignore_index, config=config, per_token=True
                )
                if chunk_stats.tokens is None:  # an internal invariant of the chunk loop
                    raise RuntimeError("linear_cross_entropy_with_stats: internal error (chunk_stats.tokens is not None failed)")
                for k in range(_NUM_FIELDS):
                    tokens.values[k, start:stop].copy_(chunk_stats.tokens[k].view(count))
                tokens.valid[start:stop].copy_(chunk_stats.tokens.valid.view(count))
                if tokens.lse is not None:
                    tokens.lse[start:stop].copy_(chunk_lse.view(count))
                row_bucket = chunk_stats.bucket
            # Each row is a one-token sample of the kernel: an invalid one that counts (its
            # label is not ignore_index) is a non-finite row or an out-of-range label, which
            # makes its whole sample invalid, as in sample_stats.
            tokens.spoiled[start:stop] = (row_bucket < 0) & (label_rows[start:stop] != ignore_index)

        if not with_grad:
            continue
        if lse_all is None or token_scale is None:  # an internal invariant of the chunk loop
            raise RuntimeError("linear_cross_entropy_with_stats: internal error (lse_all is not None and token_scale is not None failed)")
        lse3 = lse_all[start:stop].view(count, 1)
        scale3 = token_scale[start:stop].view(count, 1)
        # The logits become d loss / d logits in place (zero rows for tokens that do not count).
        if core is not None:
            core.cross_entropy_backward(
                to_dlpack(logits3), to_dlpack(labels3), to_dlpack(lse3), to_dlpack(scale3), None, ignore_index
            )
        else:
            cross_entropy_backward_triton(logits3, labels3, lse3, scale3, ignore_index=ignore_index, inplace=True)
        if grad_h is not None:
            torch.mm(logits, weight, out=grad_h[start:stop])
        if grad_w is not None:
            if acc == dtype:
                grad_w.addmm_(logits.t(), hidden_chunk)
            else:
                # 16-bit products added to the fp32 accumulator a block of classes at a
                # time: the temporary is [block, d], never [V, d]
                for low in range(0, vocab, _CLASS_BLOCK):
                    high = min(low + _CLASS_BLOCK, vocab)
                    grad_w[low:high].add_(torch.mm(logits[:, low:high].t(), hidden_chunk))
        if grad_b is not None:
            grad_b.add_(logits.sum(dim=0, dtype=grad_b.dtype))

    buffer = logits = logits3 = None  # freed before the accumulators are cast: not needed at once
    grads = _Grads(
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None or bias is None else grad_b.to(bias.dtype),
    )
    return tokens, grads


def _sample_statistics(
    tokens: _TokenValues, prepared: _Inputs, config: GekoConfig, per_token: bool
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
    token_loss_sum = values[0].sum(dim=1) if row_tokens > 0 else torch.zeros(samples, dtype=torch.float32, device=values.device)
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


def _row_scale(prepared: _Inputs, grad_output: torch.Tensor, reduction: str) -> torch.Tensor:
    """float32 ``[R]``: d loss / d token_loss of every row (the kernels zero the rows that do
    not count, so a sample's scale is simply repeated over its rows)."""
    valid_tokens = prepared.valid_tokens
    samples = valid_tokens.shape[0]
    g = grad_output.to(torch.float32)
    scale = torch.ones(samples, dtype=torch.float32, device=valid_tokens.device) if prepared.weight is None else prepared.weight
    if reduction == "none":
        scale = g * scale / valid_tokens.clamp(min=1).to(torch.float32)
    elif reduction == "sum":
        scale = g * scale
    else:
        scale = g * scale / valid_tokens.sum().to(torch.float32)
    return scale[:, None].expand(samples, prepared.row_tokens).reshape(-1).contiguous()


class _LinearCrossEntropy(torch.autograd.Function):
    """One autograd node; the statistics leave through ``out``.

    ``"mean"`` and ``"sum"``: the gradients are computed during the forward, when each chunk's
    logits are in the buffer, and the backward scales them by ``grad_output``. ``"none"``: the
    forward only scores; the backward forms each chunk's logits again.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden2: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        prepared: _Inputs,
        options: dict,
        out: list,
    ) -> torch.Tensor:
        reduction = options["reduction"]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        early = reduction != "none"
        one = torch.ones((), dtype=torch.float32, device=hidden2.device)
        tokens, grads = _run_chunks(
            hidden2,
            weight,
            bias,
            prepared.label_rows,
            backend=prepared.backend,
            chunk=prepared.chunk,
            ignore_index=prepared.ignore_index,
            config=options["config"],
            stats=True,
            keep_lse=not early,
            token_scale=_row_scale(prepared, one, reduction) if early else None,
            lse_in=None,
            need=need,
        )
        if tokens is None:  # an internal invariant of the chunk loop
            raise RuntimeError("linear_cross_entropy_with_stats: internal error (tokens is not None failed)")
        stats, token_loss_sum = _sample_statistics(tokens, prepared, options["config"], options["per_token"])
        out.append(stats)
        ctx.prepared = prepared
        ctx.options = options
        ctx.need = need
        if early:
            ctx.grads = grads  # owned by this node; handed to autograd (and dropped) by the backward
        else:
            # the forward's lse: the backward runs no statistics pass
            ctx.save_for_backward(hidden2, weight, bias, tokens.lse)
        return _reduce(token_loss_sum, prepared.valid_tokens, prepared.weight, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        prepared: _Inputs = ctx.prepared
        reduction = ctx.options["reduction"]
        if reduction != "none":
            grads = ctx.grads
            if grads is None:
                raise RuntimeError(
                    "linear_cross_entropy_with_stats: this loss's gradients were already handed out by a "
                    "previous backward (they are computed once, during the forward)"
                )
            ctx.grads = None
            scale_needed = grad_output.device.type != "cpu" or float(grad_output) != 1.0
            result = []
            for g in grads:
                if g is not None and scale_needed:
                    g.mul_(grad_output.to(g.dtype))
                result.append(g)
            return result[0], result[1], result[2], None, None, None
        hidden2, weight, bias, lse = ctx.saved_tensors
        _, grads = _run_chunks(
            hidden2.detach(),
            weight.detach(),
            None if bias is None else bias.detach(),
            prepared.label_rows,
            backend=prepared.backend,
            chunk=prepared.chunk,
            ignore_index=prepared.ignore_index,
            config=ctx.options["config"],
            stats=False,
            keep_lse=False,
            token_scale=_row_scale(prepared, grad_output, "none"),
            lse_in=lse,
            need=ctx.need,
        )
        return grads.hidden, grads.weight, grads.bias, None, None, None


def _compiled_linear_loss(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prepared: _Inputs,
    reduction: str,
    per_token: bool,
    config: GekoConfig,
    training: bool,
) -> tuple[torch.Tensor, SampleStats]:
    """The loss as torch.compile sees it: the ``geko::linear_token_forward`` operator (whose
    token losses carry the chunked backward, ``geko::linear_token_backward``) and the
    per-sample reduction in plain torch operations. The backward forms each chunk's logits
    again (the eager path computes the gradients during the forward instead)."""
    from .ops import config_values, linear_token_forward

    hidden2 = prepared.hidden2
    if not training:
        hidden2, weight = hidden2.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    values, valid, spoiled, lse = linear_token_forward(
        hidden2, weight, bias, prepared.label_rows, prepared.ignore_index, prepared.chunk, config_values(config)
    )
    stats, token_loss_sum = _sample_statistics(_TokenValues(values, valid, spoiled, lse), prepared, config, per_token)
    stats = SampleStats(
        *(field.detach() for field in stats[:8]),
        tokens=None if stats.tokens is None else TokenStats(*(field.detach() for field in stats.tokens)),
    )
    return _reduce(token_loss_sum, prepared.valid_tokens, prepared.weight, reduction), stats


def linear_cross_entropy_with_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
    grad: bool = True,
    per_token: bool = False,
    config: GekoConfig | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Cross-entropy of ``hidden @ weight.T + bias`` and its per-sample statistics, never
    holding the ``[N, V]`` logits.

    The loss, its reductions and ``sample_weight`` mean what they mean in
    ``cross_entropy_with_stats`` (``"mean"`` divides the weighted sum of token losses by the
    number of valid tokens in the batch; weights are constants), and the statistics are those
    of ``sample_stats`` on the materialised logits: discrete fields identical, floats to
    float32 rounding (bit-identical on the C++ path when the chunked matmul reproduces the
    full one's values). The tokens run in chunks of ``chunk_size`` rows through one reused
    ``[chunk_size, V]`` buffer (docs/linear_loss.md).

    Args:
        hidden: ``[N, d]`` or ``[B, T, d]``, float32/bfloat16/float16 (float64 on the
            ``"cpp"`` and ``"reference"`` backends); e.g. the last hidden states.
        weight: ``[V, d]``, the dtype and device of ``hidden``; e.g. an lm_head weight, which
            may be tied to an embedding (its gradient is returned to autograd, which adds it
            to whatever else reaches ``weight.grad``). ``2 <= V <= 262144``.
        labels: ``[N]`` or ``[B, T]``, integer.
        bias: optional ``[V]``, the dtype of ``hidden``.
        sample_weight: optional float ``[S]`` per-sample weights (``S = N`` or ``B``); no
            gradient flows to them.
        ignore_index: label of tokens that do not count.
        shift: causal-LM shift (3-D only): position ``t`` is scored against label ``t + 1``;
            the last position gets no gradient.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[S]`` per-sample means).
        chunk_size: tokens per chunk, ``>= 1``; None picks it from free memory: the logits
            buffer gets at most ``min(free / 8, 64 MiB)`` on the CPU, ``min(free / 8,
            256 MiB)`` on CUDA (``default_chunk_rows``).
        grad: False runs a scoring pass: no gradient is computed, and the loss has no
            ``grad_fn``. Also the case when no input requires grad, or grad mode is off.
        per_token: also return token-level statistics (``[S, T]``, ``T - 1`` with shift).
        config: thresholds of the instant bucket.
        backend: ``None`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or
            ``"reference"`` (plain torch on materialised logits, differentiable in float64;
            for gradcheck; ``chunk_size`` is checked but not used).

    Returns:
        (loss, stats): ``loss`` float32 (float64 on the reference path for float64 inputs),
        a scalar or ``[S]`` for ``"none"``. Gradients flow to ``hidden``, ``weight`` and
        ``bias`` in their dtype (16-bit inputs accumulate the weight and bias gradients over
        the chunks in float32). ``stats`` is a detached ``SampleStats``.

        On the fused paths a NaN or inf logit in a valid token's row (``-inf`` included, e.g.
        a masked class) makes that sample's loss NaN and the sample invalid, as in
        ``cross_entropy_with_stats``. With ``"mean"``/``"sum"`` the gradients are computed
        in the forward and handed out by the first backward; a second backward through the
        same loss (``retain_graph=True``) raises RuntimeError.

    Raises:
        TypeError: non-tensor inputs, a hidden dtype other than float32/bfloat16/float16/
            float64 (float64 on Triton), weight or bias of another dtype, non-integer labels,
            a non-int ignore_index or chunk_size, non-bool shift/grad/per_token, a config that
            is not a GekoConfig, a non-float sample_weight.
        ValueError: wrong ranks or shapes (weight not ``[V, d]`` with hidden's ``d``, bias not
            ``[V]``, labels not ``hidden.shape[:-1]``, sample_weight not ``[S]``), tensors on
            different devices, V outside [2, 262144], ``shift=True`` with 2-D hidden,
            ``chunk_size < 1``, an unknown reduction or unusable backend, and (CPU tensors) a
            label outside [0, V) that is not ``ignore_index``.
    """
    config = resolve_config(config)
    check_choice(reduction, "reduction", _REDUCTIONS)
    per_token = check_bool(per_token, "per_token")
    grad = check_bool(grad, "grad")
    prepared = _prepare(
        hidden,
        weight,
        labels,
        bias,
        sample_weight,
        ignore_index=ignore_index,
        shift=shift,
        chunk_size=chunk_size,
        backend=backend,
    )
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    training = grad and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if prepared.backend == "op":
        return _compiled_linear_loss(weight, bias, prepared, reduction, per_token, config, training)

    if prepared.backend == "reference":
        with torch.enable_grad() if training else torch.no_grad():
            logits = hidden @ weight.T
            if bias is not None:
                logits = logits + bias
            loss, stats = cross_entropy_with_stats(
                logits,
                labels,
                ignore_index=prepared.ignore_index,
                shift=prepared.shift,
                sample_weight=prepared.weight,
                reduction=reduction,
                per_token=per_token,
                config=config,
                backend="reference",
            )
        return loss, stats

    options = {"reduction": reduction, "per_token": per_token, "config": config}
    if not training:
        with torch.no_grad():
            tokens, _ = _run_chunks(
                prepared.hidden2.detach(),
                weight.detach(),
                None if bias is None else bias.detach(),
                prepared.label_rows,
                backend=prepared.backend,
                chunk=prepared.chunk,
                ignore_index=prepared.ignore_index,
                config=config,
                stats=True,
                keep_lse=False,
                token_scale=None,
                lse_in=None,
                need=(False, False, False),
            )
            if tokens is None:  # an internal invariant of the chunk loop
                raise RuntimeError("linear_cross_entropy_with_stats: internal error (tokens is not None failed)")
            stats, token_loss_sum = _sample_statistics(tokens, prepared, config, per_token)
            return _reduce(token_loss_sum, prepared.valid_tokens, prepared.weight, reduction), stats

    out: list = []
    loss = _LinearCrossEntropy.apply(prepared.hidden2, weight, bias, prepared, options, out)
    return loss, out[0]
