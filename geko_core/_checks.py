"""Argument checks of the public entry points, written once.

Every check takes the value and the argument's name, returns the value in the form the callee
expects, and raises ``TypeError`` (wrong kind), ``ValueError`` (wrong value, shape or device)
or ``IndexError`` (an index out of range) with a message naming the argument and the
offending value. Public functions call them at the door; the helpers behind the door trust
their callers and do not check again. The compiled core still refuses bad input on its own
(DEVELOPERS.md), so a Python check is only needed where C++ cannot say it as well: types,
conversions, and values that would not survive the conversion.
"""

from __future__ import annotations

import operator
from numbers import Real
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "check_array_1d",
    "check_bool",
    "check_choice",
    "check_float_array",
    "check_ignore_index",
    "check_index_array",
    "check_int",
    "check_real",
    "check_same_device",
    "check_seed",
    "check_shard",
    "check_tensor",
]

#: Largest seed: seeds are uint64 in the compiled core.
MAX_SEED = 2**64 - 1


# -- scalars ---------------------------------------------------------------------------------


def _is_bool(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    if isinstance(value, np.ndarray):
        return value.dtype == np.bool_
    return isinstance(value, (bool, np.bool_))


def _describe(value: object) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)}"
    return "bool" if isinstance(value, np.bool_) else type(value).__name__


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int, within ``[low, high]`` when given.

    Accepts ints, numpy integers and 0-d integer arrays or tensors; refuses bools (``True`` is
    an int to Python, never a count here).

    Raises:
        TypeError: not an integer, or a bool.
        ValueError: below ``low`` or above ``high``.
    """
    if _is_bool(value) or getattr(value, "ndim", 0) != 0:
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_describe(value)}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        if low is not None and high is not None:
            raise ValueError(f"{name} must be in [{low}, {high}], got {number}")
        if low is not None:
            raise ValueError(f"{name} must be >= {low}, got {number}")
        raise ValueError(f"{name} must be <= {high}, got {number}")
    return number


#: The label ``ignore_index=None`` stands for: torch's ``F.linear_cross_entropy`` maps its default
#: ``None`` to -100 for class-index targets, and ``F.cross_entropy`` defaults to -100.
DEFAULT_IGNORE_INDEX = -100


def check_ignore_index(value: object, name: str = "ignore_index") -> int:
    """The ``ignore_index`` of a loss or statistics call as an int: ``None`` is
    ``DEFAULT_IGNORE_INDEX`` (-100), as in ``torch.nn.functional.linear_cross_entropy``.

    Raises:
        TypeError: neither None nor an integer (a bool included).
    """
    if value is None:
        return DEFAULT_IGNORE_INDEX
    return check_int(value, name)


def check_real(value: object, name: str) -> float:
    """``value`` as a Python float (ints and numpy numbers accepted, bools refused).

    Ranges are the compiled core's to check: it knows each rule and names the value.

    Raises:
        TypeError: not a real number, or a bool.
    """
    if _is_bool(value) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    return float(value)


def check_bool(value: object, name: str) -> bool:
    """``value`` as a Python bool (numpy bools accepted; 0 and 1 are not bools).

    Raises:
        TypeError: anything else.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return bool(value)


def check_seed(value: object, name: str = "seed") -> int:
    """A seed: an int in ``[0, 2**64 - 1]``.

    Raises:
        TypeError, ValueError: as ``check_int``.
    """
    return check_int(value, name, low=0, high=MAX_SEED)


def check_shard(num_replicas: object, rank: object) -> tuple[int, int]:
    """``(num_replicas, rank)`` with ``num_replicas >= 1`` and ``0 <= rank < num_replicas``.

    Raises:
        TypeError, ValueError: as ``check_int``, or a rank beyond the last replica.
    """
    replicas = check_int(num_replicas, "num_replicas", low=1)
    rank = check_int(rank, "rank", low=0)
    if rank >= replicas:
        raise ValueError(f"rank must be in [0, num_replicas={replicas}), got {rank}")
    return replicas, rank


def check_choice(value: Any, name: str, choices: Sequence[str | None]) -> Any:
    """``value`` when it is one of ``choices`` (strings, or None).

    Compared by identity for None and by equality for strings only, so that neither
    ``True`` nor an array ever compares equal to a choice.

    Raises:
        ValueError: anything else.
    """
    for choice in choices:
        if value is choice or (isinstance(value, str) and value == choice):
            return value
    listed = ", ".join(repr(choice) for choice in choices)
    raise ValueError(f"{name} must be one of {listed}, got {value!r}")


# -- tensors ---------------------------------------------------------------------------------

_DTYPE_KINDS = ("floating", "integer", "integer_or_bool")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _either(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_tensor(
    value: Any,
    name: str,
    *,
    dtype: str | torch.dtype | tuple[torch.dtype, ...] | None = None,
    ndim: int | tuple[int, ...] | None = None,
    shape: tuple[int, ...] | None = None,
    layout: str | None = None,
    optional: bool = False,
) -> torch.Tensor | None:
    """``value`` when it is a tensor of the given kind, rank and shape (no copy, no device move).

    Args:
        value: the argument.
        name: its name in messages.
        dtype: ``"floating"``, ``"integer"`` (bool refused), ``"integer_or_bool"``, one
            ``torch.dtype`` or a tuple of them.
        ndim: the allowed number of dimensions, one or a tuple.
        shape: the exact shape.
        layout: how the docs write the shape (``"[B, T, d]"``), quoted in messages.
        optional: None is accepted (and returned).

    Raises:
        TypeError: not a tensor (nor None when optional), or of another dtype.
        ValueError: another number of dimensions or shape.
    """
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        expected = "None or a torch.Tensor" if optional else "a torch.Tensor"
        suffix = f" {layout}" if layout else ""
        raise TypeError(f"{name} must be {expected}{suffix}, got {type(value).__name__}")
    if dtype is not None:
        _check_dtype(value, name, dtype)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            dims = _either([f"{n}-D" for n in allowed])
            expected = f"{layout} ({dims})" if layout else dims
            raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        expected = f"{layout} = {tuple(shape)}" if layout else f"of shape {tuple(shape)}"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    return value


def _check_dtype(value: torch.Tensor, name: str, dtype: str | torch.dtype | tuple[torch.dtype, ...]) -> None:
    actual = value.dtype
    if isinstance(dtype, str):
        check_choice(dtype, "dtype", _DTYPE_KINDS)  # a caller's typo must not disable the check
        not_integer = actual.is_floating_point or actual.is_complex
        if dtype == "floating" and not actual.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {actual}")
        if dtype == "integer" and (not_integer or actual == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {actual}")
        if dtype == "integer_or_bool" and not_integer:
            raise TypeError(f"{name} must be bool or an integer tensor, got {actual}")
        return
    allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if actual not in allowed:
        raise TypeError(f"{name} must be {_either([_dtype_name(d) for d in allowed])}, got {actual}")


def check_same_device(value: torch.Tensor, name: str, other: torch.Tensor, other_name: str) -> None:
    """Both tensors on one device (nothing is moved: a copy would hide a synchronisation).

    Raises:
        ValueError: they are not.
    """
    if value.device != other.device:
        raise ValueError(f"{name} is on {value.device} but {other_name} is on {other.device}; they must be on the same device")


# -- 1-D arrays (numpy arrays, CPU tensors, sequences) ---------------------------------------


def check_array_1d(values: Any, name: str) -> np.ndarray:
    """A 1-D numpy view of a numpy array, CPU tensor or sequence (no copy when possible).

    A tensor is detached; a bfloat16 or float16 tensor becomes float32 (numpy has no
    bfloat16, and float16 -> float32 is exact).

    Raises:
        ValueError: a tensor on another device than the CPU (copying it here would hide a
            device synchronisation: the caller decides when to bring data to the host), or
            not 1-D.
    """
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"{name} is on device {values.device}; pass CPU data ({name}.cpu())")
        values = values.detach().resolve_conj().resolve_neg()
        if values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()
        array = values.numpy()
    else:
        device = getattr(values, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            raise ValueError(f"{name} is on device {device}; pass CPU data")
        array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    return array


def check_float_array(
    values: Any,
    name: str,
    *,
    dtype: type[np.floating] | None = None,
    allow_int: bool = False,
    allow_bool: bool = False,
) -> np.ndarray:
    """A 1-D contiguous float array (see ``check_array_1d`` for what is accepted).

    Args:
        dtype: the result's dtype (values beyond its range become inf, as numpy rounds them);
            None keeps float32 and float64 and converts other floats to float64.
        allow_int: integer arrays are accepted (and converted).
        allow_bool: bool arrays are accepted (and converted to 0.0 / 1.0).

    Raises:
        TypeError: another dtype.
        ValueError: as ``check_array_1d``.
    """
    array = check_array_1d(values, name)
    kind = array.dtype.kind
    if not (kind == "f" or (allow_int and kind in "iu") or (allow_bool and kind == "b")):
        accepted = ["a float"] + (["integer"] if allow_int else []) + (["bool"] if allow_bool else [])
        raise TypeError(f"{name} must be {_either(accepted)} array, got dtype {array.dtype}")
    if dtype is None:
        if array.dtype in (np.float32, np.float64):
            return np.ascontiguousarray(array)
        return array.astype(np.float64)
    with np.errstate(over="ignore"):
        return np.require(array, dtype=dtype, requirements=["C", "A"])


def check_index_array(
    values: Any,
    name: str,
    size: int,
    *,
    what: str | None = None,
    check_range: bool = True,
) -> np.ndarray:
    """A 1-D contiguous int32 or int64 array of indices into ``[0, size)``.

    int32 and int64 arrays are kept, other integer dtypes converted to int64.

    Args:
        size: the number of things indexed.
        what: how messages name them (default ``"[0, size)"``).
        check_range: False when the callee (the compiled core) checks the range itself;
            indices that int64 cannot hold are refused either way.

    Raises:
        TypeError: not an integer array (bool included).
        IndexError: an index out of range; the message names the first one and its position.
        ValueError: as ``check_array_1d``.
    """
    array = check_array_1d(values, name)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    bad: np.ndarray | None = None
    if check_range and array.size:
        bad = np.flatnonzero((array < 0) | (array >= size))
    elif array.dtype == np.uint64 and array.size:
        bad = np.flatnonzero(array > np.iinfo(np.int64).max)
    if bad is not None and bad.size:
        position = int(bad[0])
        target = what if what is not None else f"[0, {size})"
        raise IndexError(f"index {int(array[position])} at position {position} of {name} is out of range for {target}")
    if array.dtype not in (np.int32, np.int64):
        array = array.astype(np.int64)
    return np.require(array, requirements=["C", "A"])
