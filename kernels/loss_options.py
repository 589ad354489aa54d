"""The loss options of the fused kernels (temperature, soft-capping, label smoothing, z-loss,
class weights): their checks and the transformed logits ``z``, shared by the statistics
kernel (``sample_stats.py``) and the backward (``cross_entropy.py``).

The definitions (formulas of ``z``, of the token loss and of its gradient) are
``geko_core/loss_options.py``'s; this module imports triton and torch only, so it checks the
options again, for the kernels (ranges and the ``class_weight`` layout).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["KernelOptions", "check_kernel_options"]


@triton.jit
def _tanh(a):
    # tanh from exp (the interpreter has no tanh, and libdevice's is not portable to it): a
    # Taylor polynomial below 0.5, where 1 - exp(-2|a|) would lose digits, (1 - e) / (1 + e)
    # above (1 - e >= 0.63: no cancellation). The dropped a^19 term is < 1e-9 of tanh(0.5).
    b = tl.abs(a)
    b2 = b * b
    poly = 6404582.0 / 10854718875.0
    poly = poly * b2 - 929569.0 / 638512875.0
    poly = poly * b2 + 21844.0 / 6081075.0
    poly = poly * b2 - 1382.0 / 155925.0
    poly = poly * b2 + 62.0 / 2835.0
    poly = poly * b2 - 17.0 / 315.0
    poly = poly * b2 + 2.0 / 15.0
    poly = poly * b2 - 1.0 / 3.0
    near = b + b * b2 * poly
    e = tl.exp(-2.0 * b)  # 0 for |a| = inf: tanh = 1; NaN stays NaN
    far = (1.0 - e) / (1.0 + e)
    t = tl.where(b < 0.5, near, far)
    return tl.where(a < 0.0, -t, t)


@triton.jit
def _transformed_logits(x, temperature, softcap, HAS_TEMPERATURE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    # z = softcap * tanh((x / temperature) / softcap); -inf stays -inf (a masked class) and +inf
    # becomes NaN: a row that spoils its sample, as without the options
    z = x
    if HAS_TEMPERATURE:
        z = z / temperature
    if HAS_SOFTCAP:
        # (+inf made NaN by a select, not by inf - inf: no arithmetic on infinities)
        spoil = tl.where(z == float("inf"), float("nan"), 0.0)
        z = tl.where(z == -float("inf"), z, softcap * _tanh(z / softcap) + spoil)
    return z


class KernelOptions(NamedTuple):
    """The loss options as the kernels take them: runtime floats and the constexpr flags."""

    temperature: float
    softcap: float
    label_smoothing: float
    z_loss: float
    class_weight: torch.Tensor | None
    flags: dict[str, bool]  # HAS_TEMPERATURE, HAS_SOFTCAP, HAS_SMOOTHING, HAS_Z_LOSS, HAS_CLASS_WEIGHT

    @property
    def plain(self) -> bool:
        """True when every option is off: the kernels compile exactly as without options."""
        return not any(self.flags.values())


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_kernel_options(
    *,
    vocab: int,
    device: torch.device,
    temperature: float = 1.0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> KernelOptions:
    """The loss options (``geko_core/loss_options.py``), checked for the kernels: the
    definitions' ranges, and a ``class_weight`` the kernels can read without a copy. Its
    values (finite, >= 0) are the caller's to check: reading them would synchronise a GPU.

    Raises:
        TypeError: an option of the wrong type, a ``class_weight`` that is not float32.
        ValueError: an option out of range (named in the message), a ``class_weight`` of the
            wrong shape, device or layout.
    """
    temperature = _real(temperature, "temperature")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if softcap is not None:
        softcap = _real(softcap, "softcap")
        if not (math.isfinite(softcap) and softcap > 0.0):
            raise ValueError(f"softcap must be None or finite and > 0, got {softcap}")
    label_smoothing = _real(label_smoothing, "label_smoothing")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    z_loss = _real(z_loss, "z_loss")
    if not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor):
            raise TypeError(f"class_weight must be a torch.Tensor or None, got {type(class_weight).__name__}")
        if class_weight.dtype != torch.float32:
            raise TypeError(f"class_weight must be float32, got {class_weight.dtype}")
        if tuple(class_weight.shape) != (vocab,):
            raise ValueError(f"class_weight must have shape [{vocab}], got {list(class_weight.shape)}")
        if class_weight.device != device:
            raise ValueError(f"class_weight is on {class_weight.device}, the logits on {device}")
        if not class_weight.is_contiguous():
            raise ValueError("class_weight must be contiguous")
    flags = {
        "HAS_TEMPERATURE": temperature != 1.0,
        "HAS_SOFTCAP": softcap is not None,
        "HAS_SMOOTHING": label_smoothing != 0.0,
        "HAS_Z_LOSS": z_loss != 0.0,
        "HAS_CLASS_WEIGHT": class_weight is not None,
    }
    return KernelOptions(temperature, 1.0 if softcap is None else softcap, label_smoothing, z_loss, class_weight, flags)
