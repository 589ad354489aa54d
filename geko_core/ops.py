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
* ``geko::linear_stats_forward`` (see ``geko_core.linear_loss``): registered there.

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
from .config import GekoConfig
from .stats import ForwardBlocks, forward_blocks_cpp, token_rows

__all__ = ["config_from_values", "config_values", "cross_entropy_backward", "stats_forward"]

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
