"""The statistics and the fused cross-entropy as torch operators (``torch.ops.geko.*``).

Registered with ``torch.library.custom_op``, each with a CPU kernel (the compiled C++ core),
a CUDA kernel (the Triton kernels), a fake implementation (shapes only, for tracing) and,
for the forward, an autograd formula. ``torch.compile`` therefore sees them as single
graph nodes: a model plus ``cross_entropy_with_stats`` or ``sample_stats`` compiles with
``fullgraph=True``, and the device of the logits picks the kernel.

Operators:

* ``geko::stats_forward(logits3, labels3, ignore_index, config, per_token, write_lse)``
  -> ``(sample_values [6, S], valid_tokens [S], bucket [S], token_values [K, S, T],
  token_valid [S, T or 0], lse)`` (K = 6 with ``per_token``, 1 with ``write_lse``, else 0): the statistics of ``[S, T, V]`` logits and ``[S, T]`` int64
  labels; with ``write_lse`` row 0 of ``token_values`` holds the token losses and ``lse``
  the log-sum-exp (unspecified at tokens that do not count), and the token losses are
  differentiable (the gradient is
  ``(softmax - onehot) * grad``, computed by the next operator).
* ``geko::cross_entropy_backward(logits3, labels3, lse, token_scale, ignore_index)`` ->
  ``grad [S, T, V]``.
* ``geko::linear_token_forward(hidden2, weight, bias, label_rows, ignore_index, chunk, config)``
  -> ``(token_values [6, R], valid [R], spoiled [R], lse [R])``: the token values of
  ``hidden2 @ weight.T + bias`` (``R`` rows) computed chunk by chunk without the ``[R, V]``
  logits (``geko_core.linear_loss``); the token losses (row 0) are differentiable.
* ``geko::linear_token_backward(hidden2, weight, bias, label_rows, lse, row_scale,
  ignore_index, chunk)`` -> the gradients of ``sum(row_scale * token_loss)`` with respect to
  ``hidden2``, ``weight`` and ``bias`` (an empty tensor without bias), chunk by chunk again.

``config`` is the ``GekoConfig`` as a list of numbers (``config_values``). The public
functions (``sample_stats``, ``cross_entropy_with_stats``) call these operators when torch
is compiling; in eager mode they call the same per-device kernels directly, because a
Python operator call costs tens of microseconds of dispatch, which small training steps
would pay twice per step (forward and backward).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.dlpack import to_dlpack

from ._backend import load_compiled_core
from .config import GekoConfig, resolve_config
from .stats import ForwardBlocks, forward_blocks_cpp, token_rows

__all__ = [
    "config_from_values",
    "config_values",
    "cross_entropy_backward",
    "linear_token_backward",
    "linear_token_forward",
    "stats_forward",
]

_FIELDS = tuple(field.name for field in dataclasses.fields(GekoConfig))
_INT_FIELDS = frozenset(field.name for field in dataclasses.fields(GekoConfig) if field.type in ("int", int))


def config_values(config: GekoConfig) -> list[float]:
    """``config`` as the list of numbers the operators take (field order of GekoConfig)."""
    return [float(getattr(config, name)) for name in _FIELDS]


@functools.lru_cache(maxsize=64)
def _config_from_tuple(values: tuple[float, ...]) -> GekoConfig:
    if len(values) != len(_FIELDS):
        raise ValueError(f"config: expected {len(_FIELDS)} numbers ({', '.join(_FIELDS)}), got {len(values)}")
    return GekoConfig(**{name: int(v) if name in _INT_FIELDS else v for name, v in zip(_FIELDS, values)})


def config_from_values(values: list[float]) -> GekoConfig:
    """The GekoConfig of ``config_values`` (checked)."""
    return _config_from_tuple(tuple(float(v) for v in values))


# -- geko::stats_forward --------------------------------------------------------------------


@torch.library.custom_op("geko::stats_forward", mutates_args=())
def stats_forward(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    ignore_index: int,
    config: list[float],
    per_token: bool,
    write_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    raise NotImplementedError(f"geko::stats_forward has no kernel for {logits3.device.type} tensors (CPU and CUDA only)")


@stats_forward.register_kernel("cpu")
def _stats_forward_cpu(logits3, labels3, ignore_index, config, per_token, write_lse):
    return tuple(
        forward_blocks_cpp(
            logits3,
            labels3,
            ignore_index=ignore_index,
            config=config_from_values(config),
            per_token=per_token,
            write_lse=write_lse,
        )
    )


def stats_forward_triton(logits3, labels3, ignore_index, config, per_token, write_lse) -> ForwardBlocks:
    """The CUDA kernel of ``geko::stats_forward`` (also runs under ``TRITON_INTERPRET=1``)."""
    from .kernels.sample_stats import launch_sample_stats

    stats, _, lse = launch_sample_stats(
        logits3, labels3, ignore_index=ignore_index, config=config_from_values(config), per_token=True, write_lse=write_lse
    )
    samples, tokens = labels3.shape
    device = logits3.device
    # The launcher's views share two blocks; rebuild them as the operator's separate outputs.
    sample_values = torch.stack([stats.loss, stats.confidence, stats.label_prob, stats.correct, stats.entropy, stats.el2n])
    token_fields = stats.tokens
    rows = [token_fields.loss, token_fields.confidence, token_fields.label_prob, token_fields.correct, token_fields.entropy, token_fields.el2n]
    count = token_rows(per_token, write_lse)
    if count:
        token_values = torch.stack(rows[:count])
    else:
        token_values = torch.empty((0, samples, tokens), dtype=torch.float32, device=device)
    token_valid = token_fields.valid.clone() if per_token else torch.empty((samples, 0), dtype=torch.bool, device=device)
    if lse is None:
        lse = torch.empty((0, 0), dtype=torch.float32, device=device)
    return ForwardBlocks(sample_values, stats.valid_tokens, stats.bucket, token_values, token_valid, lse)


@stats_forward.register_kernel("cuda")
def _stats_forward_cuda(logits3, labels3, ignore_index, config, per_token, write_lse):
    return tuple(stats_forward_triton(logits3, labels3, ignore_index, config, per_token, write_lse))


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
        torch.empty((samples, tokens) if write_lse else (0, 0), **f32),
    )


def _stats_forward_setup(ctx, inputs, output) -> None:
    logits3, labels3, ignore_index, _config, _per_token, write_lse = inputs
    ctx.ignore_index = ignore_index
    ctx.write_lse = write_lse
    ctx.save_for_backward(logits3, labels3, output[5])


def _stats_forward_backward(ctx, g_sample, g_valid_tokens, g_bucket, g_tokens, g_token_valid, g_lse):
    # Only the token losses (row 0 of token_values) are differentiable; the statistics are
    # read-only measurements.
    if g_tokens is None:
        return None, None, None, None, None, None
    if not ctx.write_lse:
        raise RuntimeError("geko::stats_forward is differentiable only with write_lse=True")
    logits3, labels3, lse = ctx.saved_tensors
    token_scale = g_tokens[0].to(torch.float32).contiguous()
    grad = cross_entropy_backward(logits3, labels3, lse, token_scale, ctx.ignore_index)
    return grad, None, None, None, None, None


stats_forward.register_autograd(_stats_forward_backward, setup_context=_stats_forward_setup)


# -- geko::cross_entropy_backward -----------------------------------------------------------


@torch.library.custom_op("geko::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
    logits3: torch.Tensor, labels3: torch.Tensor, lse: torch.Tensor, token_scale: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    raise NotImplementedError(
        f"geko::cross_entropy_backward has no kernel for {logits3.device.type} tensors (CPU and CUDA only)"
    )


@cross_entropy_backward.register_kernel("cpu")
def _cross_entropy_backward_cpu(logits3, labels3, lse, token_scale, ignore_index):
    grad = torch.empty(logits3.shape, dtype=logits3.dtype)
    load_compiled_core().cross_entropy_backward(
        to_dlpack(logits3.detach()),
        to_dlpack(labels3),
        to_dlpack(lse.contiguous()),
        to_dlpack(token_scale.contiguous()),
        to_dlpack(grad),
        ignore_index,
    )
    return grad


@cross_entropy_backward.register_kernel("cuda")
def _cross_entropy_backward_cuda(logits3, labels3, lse, token_scale, ignore_index):
    from .kernels.cross_entropy import cross_entropy_backward_triton

    return cross_entropy_backward_triton(
        logits3.detach(), labels3, lse, token_scale.contiguous(), ignore_index=ignore_index, inplace=False
    )


@cross_entropy_backward.register_fake
def _cross_entropy_backward_fake(logits3, labels3, lse, token_scale, ignore_index):
    return torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)


# -- geko::linear_token_forward / geko::linear_token_backward --------------------------------


def _linear_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpp"


@torch.library.custom_op("geko::linear_token_forward", mutates_args=())
def linear_token_forward(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    label_rows: torch.Tensor,
    ignore_index: int,
    chunk: int,
    config: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .linear_loss import _run_chunks

    tokens, _ = _run_chunks(
        hidden2.detach(),
        weight.detach(),
        None if bias is None else bias.detach(),
        label_rows,
        backend=_linear_backend(hidden2.device),
        chunk=chunk,
        ignore_index=ignore_index,
        config=config_from_values(config),
        stats=True,
        keep_lse=True,
        token_scale=None,
        lse_in=None,
        need=(False, False, False),
    )
    return tokens.values, tokens.valid, tokens.spoiled, tokens.lse


@linear_token_forward.register_fake
def _linear_token_forward_fake(hidden2, weight, bias, label_rows, ignore_index, chunk, config):
    rows = hidden2.shape[0]
    device = hidden2.device
    return (
        torch.empty((6, rows), dtype=torch.float32, device=device),
        torch.empty((rows,), dtype=torch.bool, device=device),
        torch.empty((rows,), dtype=torch.bool, device=device),
        torch.empty((rows,), dtype=torch.float32, device=device),
    )


def _linear_forward_setup(ctx, inputs, output) -> None:
    hidden2, weight, bias, label_rows, ignore_index, chunk, _config = inputs
    ctx.ignore_index, ctx.chunk, ctx.has_bias = ignore_index, chunk, bias is not None
    ctx.save_for_backward(hidden2, weight, bias if bias is not None else hidden2.new_empty(0), label_rows, output[3])


def _linear_forward_backward(ctx, g_values, g_valid, g_spoiled, g_lse):
    if g_values is None:
        return None, None, None, None, None, None, None
    hidden2, weight, bias, label_rows, lse = ctx.saved_tensors
    grad_h, grad_w, grad_b = linear_token_backward(
        hidden2, weight, bias if ctx.has_bias else None, label_rows, lse,
        g_values[0].to(torch.float32).contiguous(), ctx.ignore_index, ctx.chunk,
    )
    return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


linear_token_forward.register_autograd(_linear_forward_backward, setup_context=_linear_forward_setup)


@torch.library.custom_op("geko::linear_token_backward", mutates_args=())
def linear_token_backward(
    hidden2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    label_rows: torch.Tensor,
    lse: torch.Tensor,
    row_scale: torch.Tensor,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .linear_loss import _run_chunks

    _, grads = _run_chunks(
        hidden2.detach(),
        weight.detach(),
        None if bias is None else bias.detach(),
        label_rows,
        backend=_linear_backend(hidden2.device),
        chunk=chunk,
        ignore_index=ignore_index,
        config=resolve_config(None),  # not read without statistics
        stats=False,
        keep_lse=False,
        token_scale=row_scale.detach().contiguous(),
        lse_in=lse.detach(),
        need=(True, True, bias is not None),
    )
    grad_b = grads.bias.to(bias.dtype) if bias is not None else torch.empty(0, dtype=hidden2.dtype, device=hidden2.device)
    return grads.hidden, grads.weight.to(weight.dtype), grad_b


@linear_token_backward.register_fake
def _linear_token_backward_fake(hidden2, weight, bias, label_rows, lse, row_scale, ignore_index, chunk):
    grad_b = torch.empty(bias.shape if bias is not None else (0,), dtype=hidden2.dtype, device=hidden2.device)
    return torch.empty_like(hidden2, memory_format=torch.contiguous_format), torch.empty_like(weight, memory_format=torch.contiguous_format), grad_b
