"""Input preparation shared by the loss and statistics operations.

``prepare_inputs`` is the public door of ``sample_stats`` and ``cross_entropy_with_stats``:
it checks the logits and labels, views them as the kernels read them and asks
``_backend.resolve_backend`` which backend runs. The operators' configuration travels as a
list of numbers (``config_values``). Nothing here imports an operation module.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
from torch.utils.dlpack import to_dlpack

from ._backend import compiled_core_error, load_compiled_core, resolve_backend, triton_interpreter_enabled
from ._checks import check_bool, check_ignore_index, check_int, check_same_device, check_tensor
from .config import GekoConfig
from .reference import as_samples

__all__ = [
    "LOGITS_DTYPES",
    "MAX_VOCAB",
    "TRITON_LOGITS_DTYPES",
    "PreparedInputs",
    "check_cpu_labels",
    "check_triton_backward",
    "check_triton_inputs",
    "config_from_values",
    "config_values",
    "label_error",
    "prepare_inputs",
    "samples_view",
]

#: Largest vocabulary any backend accepts.
MAX_VOCAB = 262_144
#: Logits dtypes of the public functions, and those the Triton kernels read.
LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TRITON_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOGITS_DTYPE_SET = frozenset(LOGITS_DTYPES)
_LABEL_DTYPE_SET = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))

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


class PreparedInputs(NamedTuple):
    """Validated inputs, viewed as the kernels see them."""

    logits3: torch.Tensor  # [S, T, V], stride(-1) == 1
    labels3: torch.Tensor  # [S, T] int64
    backend: str  # "cpp", "triton", "reference" or "op" (traced by torch.compile)
    ignore_index: int
    shift: bool


def prepare_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    backend: str | None,
    check_labels: bool = True,
    flat: bool = False,
) -> PreparedInputs:
    """Validate ``logits`` / ``labels`` and view them as ``[S, T, V]`` / ``[S, T]`` int64.

    Everything is checked here, before any kernel runs, and nothing behind it checks again.
    A last dimension that is not contiguous costs one copy of the logits; every other layout
    (row slices, column slices of a wider tensor, the shift) is a view.

    Args:
        check_labels: refuse a CPU label outside ``[0, V)`` here (``check_cpu_labels``);
            False when the kernel that runs next refuses it itself, before writing anything.
        flat: on the ``"cpp"`` backend, hand ``[N, V]`` logits and ``[N]`` labels on as they
            are (the compiled kernels read them as ``[N, 1, V]`` / ``[N, 1]``), for a caller
            whose kernels all take either; the views cost more than the small step's kernel.

    Raises:
        TypeError: non-tensor inputs, logits that are not float32/bfloat16/float16/float64
            (float64 on the Triton backend), non-integer or bool labels, an
            ignore_index neither int nor None (None: -100, as torch's linear cross-entropy),
            non-bool shift.
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
        ignore_index = check_ignore_index(ignore_index)
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
    name = resolve_backend(
        logits.device.type, backend, traced=torch.compiler.is_compiling(), float64=logits.dtype is torch.float64
    )
    if name == "triton" and logits.dtype not in TRITON_LOGITS_DTYPES:
        raise TypeError(
            f"logits must be float32, bfloat16 or float16 on the Triton backend, got {logits.dtype} "
            "(float64 logits run on the 'cpp' and 'reference' backends)"
        )

    # The kernels' autograd Functions take the logits themselves and read these views as data:
    # views of the detached logits cost no autograd view nodes (the reference and the traced
    # operators differentiate through the views).
    if flat and name == "cpp" and logits.dim() == 2:
        logits3, labels3 = logits.detach(), labels
    else:
        logits3, labels3 = as_samples(logits if name in ("reference", "op") else logits.detach(), labels, shift=shift)
    if labels3.dtype != torch.int64:
        # Before comparing with ignore_index: torch would wrap a large ignore_index to the
        # labels' narrower dtype (2**63 - 1 becomes -1 for int32 labels).
        labels3 = labels3.to(torch.int64)
    if check_labels:
        check_cpu_labels(labels3, logits.shape[-1], ignore_index)
    if logits3.stride(-1) != 1:
        logits3 = logits3.contiguous()  # the kernels read rows as contiguous vectors
    return PreparedInputs(logits3, labels3, name, ignore_index, shift)


def check_cpu_labels(labels3: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Refuse an ``[S, T]`` int64 CPU label that is neither ignore_index nor in ``[0, vocab)``.

    On the GPU an out-of-range label only invalidates its sample (checking would cost a host
    sync); on the CPU it is almost always a bug, so say so. A compiled graph cannot read the
    labels while it is traced: there, as on the GPU, such a label invalidates its sample.

    Raises:
        ValueError: naming the first such label and its (sample, token).
    """
    if labels3.device.type != "cpu" or labels3.numel() == 0 or torch.compiler.is_compiling():
        return
    if compiled_core_error() is None and -(2**63) <= ignore_index < 2**63:
        flat = load_compiled_core().first_bad_label(to_dlpack(labels3), vocab, ignore_index)
        if flat >= 0:
            raise label_error(labels3, flat, vocab, ignore_index)
        return
    out_of_range = (labels3 != ignore_index) & ((labels3 < 0) | (labels3 >= vocab))
    if bool(out_of_range.any()):
        first = int(out_of_range.reshape(-1).nonzero()[0])
        raise label_error(labels3, first, vocab, ignore_index)


def label_error(labels3: torch.Tensor, flat: int, vocab: int, ignore_index: int) -> ValueError:
    """The ValueError of the label at row-major position ``flat`` of ``[S, T]`` (or ``[N]``)
    labels."""
    position = divmod(flat, labels3.shape[1]) if labels3.dim() == 2 else (flat, 0)
    value = labels3[position] if labels3.dim() == 2 else labels3[flat]
    return ValueError(
        f"label {int(value)} at (sample, token) {position} is outside [0, {vocab}) "
        f"and is not ignore_index ({ignore_index})"
    )


def samples_view(tensor: torch.Tensor, shift: bool) -> torch.Tensor:
    """``tensor`` (logits-shaped) viewed as the kernels' ``[S, T, V]``."""
    if tensor.dim() == 2:
        return tensor.unsqueeze(1)
    return tensor[:, :-1, :] if shift else tensor


# -- the Triton kernels' inputs (the kernels themselves check nothing) ------------------------


def check_triton_inputs(logits3: torch.Tensor, labels3: torch.Tensor, ignore_index: object = 0) -> None:
    """Validate the inputs of the Triton kernels (metadata only: no host synchronisation).

    Raises:
        TypeError: not tensors, unsupported logits dtype, non-integer labels, a non-int
            ignore_index.
        ValueError: wrong ranks or shapes, a non-unit stride along V, different devices,
            CPU tensors without the interpreter.
    """
    if not isinstance(logits3, torch.Tensor) or not isinstance(labels3, torch.Tensor):
        raise TypeError(
            f"logits3 and labels3 must be torch.Tensor, got {type(logits3).__name__} and {type(labels3).__name__}"
        )
    if logits3.dim() != 3:
        raise ValueError(f"logits3 must be [S, T, V], got shape {tuple(logits3.shape)}")
    if logits3.dtype not in TRITON_LOGITS_DTYPES:
        raise TypeError(f"logits3 must be float32, bfloat16 or float16, got {logits3.dtype}")
    if labels3.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels3 must be int64 (or int32), got {labels3.dtype}")
    if tuple(labels3.shape) != tuple(logits3.shape[:2]):
        raise ValueError(
            f"labels3 must be [S, T] = {tuple(logits3.shape[:2])} to match logits3 {tuple(logits3.shape)}, "
            f"got {tuple(labels3.shape)}"
        )
    if logits3.shape[2] < 1:
        raise ValueError("logits3 must have at least one class (V >= 1)")
    if logits3.stride(2) != 1 and logits3.shape[2] > 1:
        raise ValueError(f"logits3 must have stride 1 along V, got strides {logits3.stride()}")
    if labels3.device != logits3.device:
        raise ValueError(f"labels3 is on {labels3.device} but logits3 is on {logits3.device}")
    if logits3.device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {logits3.device} "
            "(TRITON_INTERPRET=1 runs them on the CPU, slowly, for tests)"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _rows_may_overlap(logits3: torch.Tensor) -> bool:
    """True when two (s, t) rows of V elements could share memory (e.g. an expand)."""
    num_samples, seq_len, vocab = logits3.shape
    dims = sorted(
        ((logits3.stride(i), size) for i, size in ((0, num_samples), (1, seq_len)) if size > 1),
        key=lambda stride_size: stride_size[0],
    )
    extent = vocab  # elements spanned by everything inside the current dimension
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def check_triton_backward(
    logits3: torch.Tensor,
    labels3: torch.Tensor,
    lse: object,
    token_scale: object,
    *,
    ignore_index: object,
    inplace: object,
    out: object,
) -> None:
    """Validate the arguments of ``cross_entropy.cross_entropy_backward_triton``.

    Raises:
        TypeError, ValueError: bad shapes, dtypes, devices or overlapping rows with inplace.
    """
    check_triton_inputs(logits3, labels3, ignore_index)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    rows = tuple(logits3.shape[:2])
    for name, value, dtype in (("lse", lse, torch.float64), ("token_scale", token_scale, torch.float32)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype != dtype:
            raise TypeError(f"{name} must be {str(dtype).removeprefix('torch.')}, got {value.dtype}")
        if tuple(value.shape) != rows:
            raise ValueError(f"{name} must be [S, T] = {rows}, got {tuple(value.shape)}")
        if value.device != logits3.device:
            raise ValueError(f"{name} is on {value.device} but logits3 is on {logits3.device}")
    if inplace and _rows_may_overlap(logits3):
        raise ValueError(f"inplace=True needs logits3 rows that do not overlap, got strides {logits3.stride()}")
    if out is not None:
        if inplace:
            raise ValueError("out= and inplace=True exclude each other")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != logits3.shape or out.dtype != logits3.dtype or out.device != logits3.device:
            raise ValueError(
                f"out must be {tuple(logits3.shape)} {logits3.dtype} on {logits3.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        if out.stride(-1) != 1 or _rows_may_overlap(out):
            raise ValueError(f"out needs stride 1 along V and rows that do not overlap, got strides {out.stride()}")
