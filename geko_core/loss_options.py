"""The options of the fused losses (temperature, logit soft-capping, label smoothing, z-loss,
class weights) and their torch reference, written once.

Every backend of every loss computes, for a token with logits ``x`` (``[V]``) and label ``y``:

* ``u = x / temperature``; ``z = softcap * tanh(u / softcap)`` when ``softcap`` is set, else
  ``z = u``: the logits the model's distribution is ``softmax(z)`` of. An infinite logit
  stays infinite under soft-capping: ``-inf`` (a masked vocabulary entry) is probability 0,
  not ``-softcap``; ``+inf`` (a model that has blown up) spoils its sample as it does without
  the options, not ``softcap``;
* ``lse = logsumexp(z)``, ``logp = z - lse``;
* the token loss ``l = w_y (1 - eps) (-logp_y) + (eps / V) sum_j w_j (-logp_j) + zeta lse^2``,
  where ``eps`` is ``label_smoothing``, ``zeta`` is ``z_loss`` and ``w`` the class weights
  (all 1 without ``class_weight``);
* the token's weight ``w_y``: a ``"mean"`` reduction divides the sum of the token losses by the
  sum of the counted tokens' weights (their number without class weights), as
  ``F.cross_entropy`` does with ``weight=`` and ``label_smoothing=``.

The per-sample statistics (confidence, correctness, entropy, el2n, and their ``loss``, the
plain ``-logp_y``) describe ``softmax(z)`` and the label: the options change what is trained
on, the statistics stay a measure of the model's distribution.

With every option at its default the loss is the plain cross-entropy of ``x``. Without class
weights, label smoothing is ``F.cross_entropy``'s and z-loss is PaLM's ``zeta * lse^2`` (the
``lse_square_scale`` of other fused losses). The gradient (what the kernels write) is

``d l / d z_k = w_y (1 - eps) (p_k - [k = y]) + (eps / V) (W p_k - w_k) + 2 zeta lse p_k``

with ``p = softmax(z)`` and ``W = sum_j w_j``; then ``d z / d x = (1 - (z / softcap)^2) /
temperature`` (``1 / temperature`` without soft-capping).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "LossOptions", "check_loss_options", "class_weight_total", "counted_tokens", "cpp_kernel_options", "kernel_options",
    "options_given", "options_token_loss_reference", "public_lse", "transformed_logits",
]


class LossOptions(NamedTuple):
    """The fused losses' options; the defaults leave the plain cross-entropy."""

    temperature: float = 1.0
    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    class_weight: torch.Tensor | None = None  # float32 (float64 if given so) [V], on the logits' device

    @property
    def plain(self) -> bool:
        """True when every option is at its default (the plain cross-entropy)."""
        return (
            self.temperature == 1.0
            and self.softcap is None
            and self.label_smoothing == 0.0
            and self.z_loss == 0.0
            and self.class_weight is None
        )


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_loss_options(
    *,
    temperature: object = 1.0,
    softcap: object = None,
    label_smoothing: object = 0.0,
    z_loss: object = 0.0,
    class_weight: object = None,
    vocab: int,
    device: torch.device | None = None,
) -> LossOptions:
    """The options, checked: ``temperature`` finite and > 0; ``softcap`` None or finite and
    > 0; ``label_smoothing`` in [0, 1]; ``z_loss`` finite and >= 0; ``class_weight`` None or a
    floating ``[vocab]`` tensor of finite values >= 0 (on ``device`` when given), returned
    detached, contiguous, as float32 (float64 kept: the float64 reference path reads it).

    Raises:
        TypeError: an option of the wrong type.
        ValueError: an option out of range, a ``class_weight`` of the wrong shape or device.
    """
    temperature = _positive(temperature, "temperature")
    if softcap is not None:
        softcap = _positive(softcap, "softcap")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    label_smoothing, z_loss = float(label_smoothing), float(z_loss)  # type: ignore[arg-type]
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    weight = None
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor):
            raise TypeError(f"class_weight must be a torch.Tensor or None, got {type(class_weight).__name__}")
        if not class_weight.is_floating_point():
            raise TypeError(f"class_weight must be a floating tensor, got {class_weight.dtype}")
        if tuple(class_weight.shape) != (vocab,):
            raise ValueError(f"class_weight must have shape [{vocab}] (one weight per class), got {list(class_weight.shape)}")
        if device is not None and class_weight.device != torch.device(device):
            raise ValueError(f"class_weight is on {class_weight.device}, the logits on {device}")
        dtype = torch.float64 if class_weight.dtype == torch.float64 else torch.float32
        weight = class_weight.detach().to(dtype).contiguous()
        if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
            raise ValueError("class_weight must hold finite values >= 0")
    return LossOptions(temperature, softcap, label_smoothing, z_loss, weight)


def kernel_options(options: LossOptions) -> dict:
    """The compiled kernels' keyword arguments for ``options`` (none when plain): the same
    names, the class weights as float32."""
    if options.plain:
        return {}
    weight = options.class_weight
    return {
        "temperature": options.temperature, "softcap": options.softcap, "label_smoothing": options.label_smoothing,
        "z_loss": options.z_loss, "class_weight": None if weight is None else weight.to(torch.float32).contiguous(),
    }


def cpp_kernel_options(options: LossOptions) -> dict:
    """:func:`kernel_options` as the compiled CPU core takes them: ``softcap=0`` for none, the
    class weights as a DLPack capsule."""
    from torch.utils.dlpack import to_dlpack

    out = kernel_options(options)
    if out:
        out["softcap"] = 0.0 if out["softcap"] is None else out["softcap"]
        if out["class_weight"] is not None:
            out["class_weight"] = to_dlpack(out["class_weight"])
    return out


def options_given(temperature: object, softcap: object, label_smoothing: object, z_loss: object, class_weight: object) -> bool:
    """Whether any option differs from its default, before checking (the plain path skips the checks)."""
    return temperature != 1.0 or softcap is not None or label_smoothing != 0.0 or z_loss != 0.0 or class_weight is not None


def counted_tokens(labels: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """The tokens that count: a label in ``[0, vocab)`` that is not ``ignore_index``."""
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def class_weight_total(options: LossOptions, labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The divisor of ``"mean"`` under class weights: the counted tokens' summed class weights
    (None without class weights: the number of counted tokens)."""
    weight = options.class_weight
    if weight is None:
        return None
    vocab = weight.shape[0]
    picked = weight.to(torch.float32)[labels.clamp(0, vocab - 1)]
    zero = torch.zeros((), dtype=picked.dtype, device=picked.device)
    return torch.where(counted_tokens(labels, ignore_index, vocab), picked, zero).sum(dtype=torch.float64)


def public_lse(lse: torch.Tensor, labels: torch.Tensor, ignore_index: int, vocab: int, wide: bool) -> torch.Tensor:
    """The returned log-sum-exp: ``lse`` in ``labels``' layout, 0 where the token does not
    count, float32 (float64 when ``wide``), no gradient."""
    lse = lse.reshape(labels.shape)
    out = torch.where(counted_tokens(labels, ignore_index, vocab), lse, torch.zeros((), dtype=lse.dtype, device=lse.device))
    return out.to(torch.float64 if wide else torch.float32)


def transformed_logits(logits: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """``z``: the logits after temperature and soft-capping, in float32 (float64 for float64)."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    if options.temperature != 1.0:
        z = z / options.temperature
    if options.softcap is not None:
        capped = options.softcap * torch.tanh(z / options.softcap)
        z = torch.where(torch.isinf(z), z, capped)  # a masked entry keeps probability 0, +inf spoils
    return z


def options_token_loss_reference(
    logits: torch.Tensor, labels: torch.Tensor, options: LossOptions, *, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference of every backend: differentiable token losses of ``[N, V]`` logits and
    ``[N]`` labels under ``options``.

    Returns:
        ``(token_loss, lse, token_weight)``, each ``[N]``: the token losses (0 where the label
        is ``ignore_index``), the log-sum-exp of ``z`` and each token's weight in a ``"mean"``
        (``w_y``; 0 where ignored). The loss of ``"mean"`` is
        ``token_loss.sum() / token_weight.sum()``.
    """
    z = transformed_logits(logits, options)
    vocab = z.shape[-1]
    labels = labels.to(torch.int64)
    counted = labels != ignore_index
    safe = torch.where(counted, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse.unsqueeze(-1)
    # (a -inf logit has -logp = +inf: with label smoothing the loss is +inf, as in F.cross_entropy)
    neg = -logp
    if options.class_weight is None:
        w_label = torch.ones_like(lse)
        smooth = neg.sum(dim=-1)
    else:
        w = options.class_weight.to(z.dtype)
        w_label = w[safe]
        smooth = (neg * w).sum(dim=-1)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    eps = options.label_smoothing
    loss = w_label * (1.0 - eps) * nll
    if eps:
        loss = loss + (eps / vocab) * smooth
    if options.z_loss:
        loss = loss + options.z_loss * lse * lse
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(counted, loss, zero), lse, torch.where(counted, w_label, zero)
