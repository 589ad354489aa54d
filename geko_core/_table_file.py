"""The SampleTable's record format and checkpoint files (``SampleTable.save`` / ``load``).

The record layout is the compiled core's (``csrc/include/geko/sample_table.h``), one format
with one version, ``FORMAT_VERSION``, for state dicts and files alike; a change to a field
bumps it. File format (little-endian integers)::

    magic     8 bytes   b"GEKOTBL\\0"
    version   uint32    FORMAT_VERSION
    hlen      uint32    length of the header
    header    hlen      UTF-8 JSON: num_samples, record_size, byteorder, fields
                        [[name, numpy dtype, offset], ...], config, counters, geko_core
    payload   N * 32    the records, byte for byte as in memory
    crc32     uint32    zlib.crc32 of everything before it
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from ._backend import load_compiled_core
from .config import GekoConfig

_C = load_compiled_core()

#: Version of the record layout, of state dicts and of checkpoint files (the core's).
FORMAT_VERSION: int = _C.TABLE_FORMAT_VERSION
_LAYOUT: list[tuple[str, str, int]] = [tuple(entry) for entry in _C.SampleTable.layout()]
_FIELDS: tuple[str, ...] = tuple(name for name, _, _ in _LAYOUT)
#: numpy dtype of one record (32 bytes), as ``SampleTable.records()`` returns them.
RECORD_DTYPE = np.dtype(
    {
        "names": list(_FIELDS),
        "formats": [dtype for _, dtype, _ in _LAYOUT],
        "offsets": [offset for _, _, offset in _LAYOUT],
        "itemsize": _C.SAMPLE_RECORD_SIZE,
    }
)

_MAGIC = b"GEKOTBL\0"
_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_CRC = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 20
_CHUNK_RECORDS = 1 << 20  # 32 MiB per read/write: large tables are streamed, never copied whole

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be loaded: corrupt, truncated, of another
    format version or layout, or for another number of samples. The table is unchanged."""


def file_header(num_samples: int, config: GekoConfig, counters: dict[str, int]) -> bytes:
    """The JSON header of a checkpoint of ``num_samples`` records."""
    return json.dumps(
        {
            "num_samples": num_samples,
            "record_size": RECORD_DTYPE.itemsize,
            "byteorder": sys.byteorder,
            "fields": [list(entry) for entry in _LAYOUT],
            "config": config.to_dict(),
            "counters": counters,
            "geko_core": _package_version(),
        },
        sort_keys=True,
    ).encode("utf-8")


def _package_version() -> str:
    from . import __version__

    return __version__


def check_version(version: Any, source: str) -> None:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has format version {version!r}; this geko_core reads version {FORMAT_VERSION}"
        )


def parse_config(values: Any) -> GekoConfig:
    if not isinstance(values, Mapping):
        raise CheckpointError(f"config must be a mapping, got {type(values).__name__}")
    try:
        return GekoConfig.from_dict(dict(values))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid config: {exc}") from None


def parse_counters(values: Any) -> dict[str, int]:
    names = ("updates_applied", "nonfinite_skipped")
    if not isinstance(values, Mapping) or set(values) != set(names):
        raise CheckpointError(f"counters must be a mapping with keys {list(names)}, got {values!r}")
    counters = {}
    for name in names:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**64:
            raise CheckpointError(f"counter {name} must be an int in [0, 2**64), got {value!r}")
        counters[name] = int(value)
    return counters


def write_checkpoint(file, header: bytes, records: np.ndarray) -> None:
    """Preamble, header, the records chunk by chunk, then the CRC of all of it."""
    preamble = _PREAMBLE.pack(_MAGIC, FORMAT_VERSION, len(header))
    crc = zlib.crc32(header, zlib.crc32(preamble))
    file.write(preamble)
    file.write(header)
    for start in range(0, records.shape[0], _CHUNK_RECORDS):
        chunk = records[start : start + _CHUNK_RECORDS]
        crc = zlib.crc32(chunk, crc)
        file.write(chunk)
    file.write(_CRC.pack(crc))


def read_checkpoint(
    path: PathLike, expected_num_samples: int | None
) -> tuple[np.ndarray, GekoConfig, dict[str, int]]:
    """Read and verify a whole checkpoint; (records as uint8, config, counters)."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size

        def fail(reason: str) -> CheckpointError:
            return CheckpointError(f"{path}: {reason}")

        # 1. Preamble and header: enough to know the expected size.
        preamble = file.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size:
            raise fail(f"truncated: {size} bytes is too short for a SampleTable checkpoint")
        magic, version, header_length = _PREAMBLE.unpack(preamble)
        if magic != _MAGIC:
            raise fail("not a geko_core SampleTable checkpoint (wrong magic bytes)")
        if version != FORMAT_VERSION:
            raise fail(f"format version {version} is not supported; this geko_core reads version {FORMAT_VERSION}")
        if header_length > _MAX_HEADER_BYTES or _PREAMBLE.size + header_length + _CRC.size > size:
            raise fail(f"truncated or corrupt: header length {header_length} does not fit a {size}-byte file")
        header_bytes = file.read(header_length)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
            num_samples = header["num_samples"]
            record_size = header["record_size"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError):
            raise fail("corrupt header") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (num_samples, record_size)):
            raise fail("corrupt header: num_samples and record_size must be positive ints")
        expected_size = _PREAMBLE.size + header_length + num_samples * record_size + _CRC.size
        if size < expected_size:
            raise fail(f"truncated: expected {expected_size} bytes for {num_samples} samples, the file has {size}")
        if size > expected_size:
            raise fail(f"corrupt: expected {expected_size} bytes for {num_samples} samples, the file has {size}")
        if record_size != RECORD_DTYPE.itemsize:
            raise fail(f"record size {record_size} differs from this build's {RECORD_DTYPE.itemsize}")
        # 2. Payload and checksum, before any field of the header is trusted further.
        buffer = np.empty(num_samples * record_size, dtype=np.uint8)
        crc = zlib.crc32(header_bytes, zlib.crc32(preamble))
        view = memoryview(buffer)
        chunk_bytes = _CHUNK_RECORDS * record_size
        for start in range(0, buffer.size, chunk_bytes):
            chunk = view[start : start + chunk_bytes]
            if file.readinto(chunk) != len(chunk):
                raise fail("truncated while reading the records")
            crc = zlib.crc32(chunk, crc)
        stored = file.read(_CRC.size)
        if len(stored) != _CRC.size:
            raise fail("truncated: the checksum is missing")
        if _CRC.unpack(stored)[0] != crc:
            raise fail("checksum mismatch: the file is corrupt")
    # 3. Content.
    if header.get("byteorder") != sys.byteorder:
        raise CheckpointError(f"{path}: written on a {header.get('byteorder')}-endian machine, this one is {sys.byteorder}-endian")
    fields = header.get("fields")
    if not isinstance(fields, list) or [tuple(e) if isinstance(e, list) else e for e in fields] != _LAYOUT:
        raise CheckpointError(f"{path}: record layout {fields} differs from this build's {_LAYOUT}")
    if expected_num_samples is not None and num_samples != expected_num_samples:
        raise CheckpointError(f"{path}: holds {num_samples} samples but this table has {expected_num_samples}")
    try:
        config = parse_config(header.get("config"))
        counters = parse_counters(header.get("counters"))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return buffer, config, counters
