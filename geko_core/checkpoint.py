"""Checksummed, atomically written ``torch.save`` files (the Selector's checkpoint state).

``torch.save`` archives carry no checksum that ``torch.load`` verifies: a flipped bit in a
tensor's bytes loads silently as a different value. These helpers add a CRC32 of the
object's content under one extra top-level key, so the file stays a plain dict that
``torch.load(path, weights_only=True)`` reads, and :func:`load_verified` refuses any file
whose content does not match it.

The CRC covers a canonical encoding of the content (keys, types, dtypes, shapes, tensor
bytes, exact ``repr`` of numbers), not the archive's bytes: a damaged archive either fails to
load (refused) or loads to content whose CRC differs (refused), or -- a flip in archive
metadata that carries no content -- loads to exactly what was saved.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write

__all__ = ["CHECKSUM_KEY", "content_crc32", "load_verified", "save_verified"]

#: Top-level key holding ``{"crc32": int, "encoding": 1}``.
CHECKSUM_KEY = "geko_checksum"
_ENCODING = 1


def _encode(value: Any, out: list[bytes]) -> None:
    """Append a type-tagged, unambiguous byte encoding of ``value`` to ``out``."""
    if isinstance(value, dict):
        out.append(b"d" + struct.pack("<Q", len(value)))
        for key in sorted(value, key=repr):
            _encode(key, out)
            _encode(value[key], out)
    elif isinstance(value, (list, tuple)):
        out.append((b"l" if isinstance(value, list) else b"t") + struct.pack("<Q", len(value)))
        for item in value:
            _encode(item, out)
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        raw = tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        head = f"{tensor.dtype}|{tuple(value.shape)}".encode()
        out.append(b"T" + struct.pack("<QQ", len(head), len(raw)) + head + raw)
    elif isinstance(value, np.ndarray):
        raw = np.ascontiguousarray(value).tobytes()
        head = f"{value.dtype.str}|{value.shape}".encode()
        out.append(b"A" + struct.pack("<QQ", len(head), len(raw)) + head + raw)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        text = repr(value).encode()
        out.append(b"s" + type(value).__name__.encode() + b":" + struct.pack("<Q", len(text)) + text)
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}")


def content_crc32(value: Any) -> int:
    """CRC32 of the canonical encoding of ``value`` (dicts, lists, tuples, tensors, numpy
    arrays, numbers, strings, None)."""
    parts: list[bytes] = []
    _encode(value, parts)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def save_verified(state: dict[str, Any], path: str) -> None:
    """``torch.save(state + checksum)`` to ``path`` atomically.

    The file is written under a temporary name in the same directory, flushed and fsynced,
    then renamed over ``path`` and the directory fsynced: a crash at any point leaves the
    previous file or the new one, never a mix (a killed writer may leave its temporary
    ``.geko_ckpt.*.tmp`` file behind).

    Args:
        state: a dict of what ``torch.load(weights_only=True)`` accepts; must not use
            ``CHECKSUM_KEY``.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if CHECKSUM_KEY in state:
        raise ValueError(f"state must not hold the reserved key {CHECKSUM_KEY!r}")
    framed = {**state, CHECKSUM_KEY: {"crc32": content_crc32(state), "encoding": _ENCODING}}
    with atomic_write(path) as handle:
        torch.save(framed, handle)


def load_verified(path: str) -> dict[str, Any]:
    """Load a file written by :func:`save_verified` and check its checksum.

    Returns:
        The saved dict (without the checksum entry).

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: the file cannot be opened.
        ValueError: the file is truncated or corrupt (it does not load, or its content does
            not match its checksum), or it carries no checksum.
    """
    with open(path, "rb") as handle:  # OSError for a missing/unreadable file, unchanged
        try:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip/pickle errors of a damaged archive come in many types
            raise ValueError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get(CHECKSUM_KEY), dict):
        raise ValueError(f"{path}: not a checksummed geko_core checkpoint (no {CHECKSUM_KEY!r} entry)")
    checksum = state.pop(CHECKSUM_KEY)
    if checksum.get("encoding") != _ENCODING or not isinstance(checksum.get("crc32"), int):
        raise ValueError(f"{path}: unknown checksum entry {checksum!r}")
    try:
        actual = content_crc32(state)
    except TypeError as exc:
        raise ValueError(f"{path}: corrupt checkpoint ({exc})") from None
    if actual != checksum["crc32"]:
        raise ValueError(f"{path}: checksum mismatch: the file is corrupt")
    return state
