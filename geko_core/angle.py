"""Angle concentration of token hidden states: the GAIN-RL signal (docs/design.md §4).

GAIN-RL observes that the more the hidden states of a sequence's tokens point the same way,
the larger that sequence's gradient. Per sequence we measure the mean pairwise cosine
similarity of its valid tokens' hidden states, in ``O(T·d)`` instead of ``O(T²·d)``:

    with x̂ᵢ = xᵢ / ‖xᵢ‖ and s = Σᵢ x̂ᵢ,   Σ_{i<j} cos(xᵢ, xⱼ) = (‖s‖² − Σᵢ ‖x̂ᵢ‖²) / 2

and, when a prompt/prefix is given, the mean cosine between prefix and non-prefix tokens,
``(s_P · s_Q) / (n_P n_Q)`` with s_P, s_Q the sums of the normalised vectors of each part.

Definitions (every backend follows them; ``angle_concentration_pairwise`` spells them out
with an explicit ``O(T²)`` Gram matrix):

* A token is *valid* when its mask entry is nonzero (all tokens when ``mask`` is None).
  Values of tokens that are not valid are never used (padding may hold anything, even NaN).
* ``x̂ = x / ‖x‖``, and ``x̂ = 0`` when ``‖x‖ = 0``: a zero vector stays a valid token, and its
  cosine with any token is 0 (as ``torch.nn.functional.cosine_similarity`` gives), so it
  lowers the mean. Norms are computed from an fp32 sum of squares: a token whose squares all
  underflow (entries below ~1e-19) counts as a zero vector.
* ``concentration = (‖s‖² − n_nonzero) / (n (n − 1))`` over the ``n`` valid tokens: the mean
  of ``cos(xᵢ, xⱼ)`` over all pairs ``i ≠ j``. NaN when ``n < 2``.
* ``cross = (s_P · s_Q) / (n_P n_Q)``: the mean of ``cos(xᵢ, xⱼ)`` over pairs with ``i`` among
  the valid tokens at positions ``< prefix_len`` and ``j`` among the valid tokens at positions
  ``>= prefix_len``. ``prefix_len`` counts positions, padding included (with left padding,
  pass the pad length plus the prompt length). NaN when either part has no valid token.
* A valid token whose fp32 sum of squares is not finite (a NaN or infinite entry, or entries
  beyond ~1e19) makes its sequence invalid: NaN ``concentration`` and ``cross``.
  ``valid_tokens`` still counts it.

Accumulation is in fp32 for fp32/bf16/fp16 input (float64 input, accepted by the reference
only, is computed in float64).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch.utils.dlpack import to_dlpack

from ._backend import load_compiled_core, resolve_backend, triton_interpreter_enabled
from ._checks import check_same_device, check_tensor

__all__ = [
    "AngleStats",
    "angle_concentration",
    "angle_concentration_pairwise",
    "angle_concentration_reference",
]

PrefixLen = Union[int, torch.Tensor]

_COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AngleStats(NamedTuple):
    """Per-sequence angle concentration of token hidden states, each ``[B]``.

    Attributes:
        concentration: float32, mean pairwise cosine similarity of the valid tokens' hidden
            states, in ``[-1/(n-1), 1]``; NaN when the sequence is invalid (fewer than 2
            valid tokens, or a non-finite hidden state in a valid token).
        valid_tokens: int32, number of valid (mask != 0) tokens.
        cross: float32, mean cosine between prefix and non-prefix valid tokens, when a
            prefix length was given (None otherwise); NaN when the sequence is invalid or one
            of the two parts has no valid token.
    """

    concentration: torch.Tensor
    valid_tokens: torch.Tensor
    cross: Optional[torch.Tensor] = None

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[B]``: the sequence has a concentration (at least 2 valid, finite tokens)."""
        return ~torch.isnan(self.concentration)


# ----------------------------------------------------------------------------------------
# validation


def _has_prefix(prefix_len: PrefixLen) -> bool:
    return isinstance(prefix_len, torch.Tensor) or prefix_len != 0


def check_angle_inputs(
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor],
    prefix_len: PrefixLen,
    *,
    allow_float64: bool = False,
) -> None:
    """Validate the arguments of ``angle_concentration`` (metadata only, plus the values of a
    CPU ``prefix_len`` tensor; a CUDA one is not read, to avoid a host synchronisation).

    Raises:
        TypeError: not tensors, non-float hidden states, non-integer/bool mask or prefix.
        ValueError: wrong ranks or shapes, different devices, prefix out of ``[0, T]``.
    """
    if isinstance(hidden, torch.Tensor) and hidden.dtype == torch.float64 and not allow_float64:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype} (float64: reference backend only)")
    allowed = _COMPILED_DTYPES + ((torch.float64,) if allow_float64 else ())
    check_tensor(hidden, "hidden", dtype=allowed, ndim=3, layout="[B, T, d]")
    batch, tokens, dim = hidden.shape
    if dim < 1:
        raise ValueError(f"hidden must have a hidden size d >= 1, got shape {tuple(hidden.shape)}")
    if check_tensor(mask, "mask", dtype="integer_or_bool", shape=(batch, tokens), layout="[B, T]", optional=True) is not None:
        check_same_device(mask, "mask", hidden, "hidden")
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dtype.is_floating_point or prefix_len.dtype.is_complex or prefix_len.dtype == torch.bool:
            raise TypeError(f"prefix_len must be an int or an integer tensor [B], got {prefix_len.dtype}")
        if tuple(prefix_len.shape) != (batch,):
            raise ValueError(f"prefix_len tensor must be [B] = ({batch},), got {tuple(prefix_len.shape)}")
        check_same_device(prefix_len, "prefix_len", hidden, "hidden")
        if prefix_len.device.type == "cpu" and batch > 0:
            low, high = int(prefix_len.min()), int(prefix_len.max())
            if low < 0 or high > tokens:
                raise ValueError(f"prefix_len values must be in [0, T] = [0, {tokens}], got min {low}, max {high}")
    elif isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be an int or an integer tensor [B], got {type(prefix_len).__name__}")
    elif not 0 <= prefix_len <= tokens:
        raise ValueError(f"prefix_len must be in [0, T] = [0, {tokens}], got {prefix_len}")


def prefix_tensor(prefix_len: PrefixLen, batch: int, device: torch.device) -> torch.Tensor:
    """``prefix_len`` as a contiguous int64 ``[B]`` tensor (no host synchronisation)."""
    if isinstance(prefix_len, torch.Tensor):
        return prefix_len.to(torch.int64).contiguous()
    return torch.full((batch,), prefix_len, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------
# torch reference and explicit definition


def angle_concentration_reference(
    hidden: torch.Tensor, mask: Optional[torch.Tensor] = None, prefix_len: PrefixLen = 0
) -> AngleStats:
    """The ``O(T·d)`` torch reference (the oracle of the kernels; see the module docstring).

    Args:
        hidden: ``[B, T, d]`` float32/bfloat16/float16 (computed in float32) or float64.
        mask: ``[B, T]`` bool or integer, nonzero = valid token; None = all valid.
        prefix_len: int or integer ``[B]`` tensor; 0 (the int) means no cross term. A
            per-sequence value outside ``[0, T]`` gives a NaN cross term, as the kernels do.

    Returns:
        AngleStats on hidden's device (float32 values even for float64 input).
    """
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    batch, tokens, _ = hidden.shape
    device = hidden.device
    valid = torch.ones((batch, tokens), dtype=torch.bool, device=device) if mask is None else mask != 0
    x = torch.where(valid.unsqueeze(-1), hidden.to(compute), 0.0)
    sumsq = (x * x).sum(dim=-1)
    finite = torch.isfinite(sumsq)
    bad = (~finite).any(dim=1)
    nonzero = valid & finite & (sumsq > 0)
    inv_norm = torch.where(nonzero, torch.rsqrt(torch.where(nonzero, sumsq, 1.0)), 0.0)
    x_hat = torch.where(nonzero.unsqueeze(-1), x * inv_norm.unsqueeze(-1), 0.0)
    total = x_hat.sum(dim=1)  # [B, d]
    n = valid.sum(dim=1).to(compute)
    n_nonzero = nonzero.sum(dim=1).to(compute)
    nan = torch.full_like(n, float("nan"))
    pairs = n * (n - 1)
    concentration = ((total * total).sum(dim=-1) - n_nonzero) / torch.where(pairs > 0, pairs, 1.0)
    concentration = torch.where((n >= 2) & ~bad, concentration, nan)
    valid_tokens = valid.sum(dim=1).to(torch.int32)
    if not _has_prefix(prefix_len):
        return AngleStats(concentration.to(torch.float32), valid_tokens, None)

    prefix = prefix_tensor(prefix_len, batch, device)
    in_prefix = torch.arange(tokens, device=device).unsqueeze(0) < prefix.unsqueeze(1)
    in_prefix_f = in_prefix.unsqueeze(-1).to(compute)
    prefix_sum = (x_hat * in_prefix_f).sum(dim=1)
    rest_sum = (x_hat * (1 - in_prefix_f)).sum(dim=1)
    n_prefix = (valid & in_prefix).sum(dim=1).to(compute)
    n_rest = (valid & ~in_prefix).sum(dim=1).to(compute)
    denominator = n_prefix * n_rest
    cross = (prefix_sum * rest_sum).sum(dim=-1) / torch.where(denominator > 0, denominator, 1.0)
    prefix_ok = (prefix >= 0) & (prefix <= tokens)
    cross = torch.where((denominator > 0) & ~bad & prefix_ok, cross, nan)
    return AngleStats(concentration.to(torch.float32), valid_tokens, cross.to(torch.float32))


def angle_concentration_pairwise(
    hidden: torch.Tensor, mask: Optional[torch.Tensor] = None, prefix_len: PrefixLen = 0
) -> AngleStats:
    """The explicit ``O(T²·d)`` definition in float64, one sequence at a time (tests only).

    Builds the Gram matrix of the normalised valid tokens and averages it over pairs.
    Returns float64 values (the definition, not a kernel).
    """
    batch, tokens, _ = hidden.shape
    prefix = prefix_tensor(prefix_len, batch, hidden.device).tolist() if _has_prefix(prefix_len) else None
    valid = torch.ones((batch, tokens), dtype=torch.bool) if mask is None else (mask != 0).cpu()
    concentration, cross, counts = [], [], []
    nan = float("nan")
    for b in range(batch):
        positions = valid[b].nonzero().flatten()
        x = hidden[b].cpu().to(torch.float64)[positions]  # [n, d]
        n = x.shape[0]
        counts.append(n)
        if not torch.isfinite(x).all():
            concentration.append(nan)
            cross.append(nan)
            continue
        norms = x.norm(dim=-1, keepdim=True)
        x_hat = torch.where(norms > 0, x / torch.where(norms > 0, norms, 1.0), 0.0)
        cosines = x_hat @ x_hat.T
        off_diagonal = ~torch.eye(n, dtype=torch.bool)
        concentration.append(cosines[off_diagonal].mean().item() if n >= 2 else nan)
        if prefix is not None:
            p = prefix[b]
            left = positions < p
            block = cosines[left][:, ~left]
            cross.append(block.mean().item() if 0 <= p <= tokens and block.numel() > 0 else nan)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64, device=hidden.device)  # noqa: E731
    return AngleStats(
        as_tensor(concentration),
        torch.tensor(counts, dtype=torch.int32, device=hidden.device),
        as_tensor(cross) if prefix is not None else None,
    )


# ----------------------------------------------------------------------------------------
# compiled CPU path


def angle_concentration_cpp(hidden: torch.Tensor, mask: Optional[torch.Tensor], prefix_len: PrefixLen) -> AngleStats:
    """The C++ (OpenMP) path on CPU tensors; arguments validated by ``angle_concentration``."""
    core = load_compiled_core()
    batch = hidden.shape[0]
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()  # documented copy: the kernels read rows with unit stride
    mask_arg = None
    if mask is not None:
        mask_arg = mask if mask.dtype == torch.bool else mask != 0
    concentration = torch.empty((batch,), dtype=torch.float32)
    valid_tokens = torch.empty((batch,), dtype=torch.int32)
    cross = prefix = None
    if _has_prefix(prefix_len):
        cross = torch.empty((batch,), dtype=torch.float32)
        prefix = prefix_tensor(prefix_len, batch, hidden.device)
    core.angle_concentration(
        to_dlpack(hidden),
        None if mask_arg is None else to_dlpack(mask_arg),
        None if prefix is None else to_dlpack(prefix),
        to_dlpack(concentration),
        to_dlpack(valid_tokens),
        None if cross is None else to_dlpack(cross),
    )
    return AngleStats(concentration, valid_tokens, cross)


def angle_concentration_triton(
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    prefix_len: PrefixLen = 0,
) -> AngleStats:
    """Per-sequence angle concentration with the Triton kernels (``kernels/angle.py``: three
    launches, no host sync).

    Args:
        hidden: ``[B, T, d]`` float32/bfloat16/float16 on a CUDA device (or the CPU under
            ``TRITON_INTERPRET=1``); any strides with stride 1 along d (otherwise copied once).
        mask: ``[B, T]`` bool or integer, nonzero = valid; None = all valid. Any strides.
        prefix_len: int or integer ``[B]`` tensor (see ``angle_concentration``).

    Returns:
        AngleStats on hidden's device (semantics of ``angle_concentration_reference``).

    Raises:
        TypeError, ValueError: bad arguments (``check_angle_inputs``), or CPU tensors without
            the interpreter.
    """
    from .kernels.angle import launch_angle_concentration

    check_angle_inputs(hidden, mask, prefix_len)
    if hidden.device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {hidden.device} "
            "(TRITON_INTERPRET=1 runs them on the CPU, slowly, for tests)"
        )
    if hidden.shape[-1] > 1 and hidden.stride(-1) != 1:
        hidden = hidden.contiguous()  # documented copy: rows are read with unit stride
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes, a pointer type every Triton version loads
    has_prefix = _has_prefix(prefix_len)
    prefix = prefix_tensor(prefix_len, hidden.shape[0], hidden.device) if has_prefix and hidden.shape[0] else None
    return AngleStats(*launch_angle_concentration(hidden, mask, prefix, has_prefix))


#: The backends of ``angle_concentration``, keyed by ``resolve_backend``'s answer; one signature.
_BACKENDS = {
    "cpp": angle_concentration_cpp,
    "triton": angle_concentration_triton,
    "reference": angle_concentration_reference,
}


# ----------------------------------------------------------------------------------------
# public entry point


def angle_concentration(
    hidden: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    prefix_len: PrefixLen = 0,
    *,
    backend: Optional[str] = None,
) -> AngleStats:
    """Per-sequence angle concentration of token hidden states (GAIN-RL), in ``O(T·d)``.

    Args:
        hidden: ``[B, T, d]`` float32/bfloat16/float16 hidden states (float64 with
            ``backend="reference"`` only), any strides; a view whose last dimension is not
            contiguous is copied once. Accumulation is in float32.
        mask: ``[B, T]`` bool or integer attention mask, nonzero = valid token; None = all
            tokens valid. Tokens that are not valid are never read into the result.
        prefix_len: number of leading positions forming the prompt/prefix, an int for the
            whole batch or an integer ``[B]`` tensor per sequence, in ``[0, T]``; positions
            count padding. 0 (the int) skips the cross term. Values of a CUDA tensor are not
            checked (that would synchronise with the host): out-of-range ones give NaN.
        backend: None (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or ``"reference"``.

    The result carries no gradient (hidden states that require grad are detached).

    Returns:
        AngleStats on hidden's device: float32 ``concentration`` ``[B]`` (mean pairwise
        cosine of the valid tokens; NaN with fewer than 2 valid tokens or a non-finite
        value), int32 ``valid_tokens`` ``[B]``, float32 ``cross`` ``[B]`` (mean
        prefix-to-rest cosine) when a prefix length is given, else None. See the module
        docstring for zero vectors and non-finite values.

    Raises:
        TypeError: non-tensor or non-float hidden states, float mask or prefix.
        ValueError: wrong ranks or shapes, mismatched devices, prefix out of ``[0, T]``, a
            backend that cannot take these tensors.
        CompiledCoreError: the C++ backend is needed but not built.
    """
    check_angle_inputs(hidden, mask, prefix_len, allow_float64=backend == "reference")
    chosen = resolve_backend(hidden.device.type, backend)
    hidden = hidden.detach()  # a measurement, not a loss: no graph (and DLPack refuses grads)
    return _BACKENDS[chosen](hidden, mask, prefix_len)
