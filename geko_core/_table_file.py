"""The compiled tables' record formats, state dicts and checkpoint files.

Each table (``SampleTable``, ``RolloutTable``) has one record layout with one version, the
core's (``csrc/include/geko/sample_table.h``, ``rollout_table.h``), for state dicts and files
alike; a change to a field bumps it. A ``TableFormat`` names a table's magic bytes, version,
layout, config type and counters; one writer and one reader serve every format. File format
(little-endian integers)::

    magic     8 bytes   b"GEKOTBL\\0" (SampleTable), b"GEKORLT\\0" (RolloutTable)
    version   uint32    the format version
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
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ._backend import load_compiled_core
from .config import GekoConfig

_C = load_compiled_core()

_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_CRC = struct.Struct("<I")
_MAX_HEADER_BYTES = 1 << 20
_CHUNK_RECORDS = 1 << 20  # 32 MiB per read/write: large tables are streamed, never copied whole

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint file or state dict that cannot be loaded: corrupt, truncated, of another
    format version or layout, or for another number of samples. The table is unchanged."""


@dataclass(frozen=True)
class TableFormat:
    """What tells one table's records, state dicts and files from another's.

    Attributes:
        kind: the table's class name, in messages.
        magic: the file's first 8 bytes.
        version: the format version of records, state dicts and files.
        layout: ``[(name, numpy dtype str, byte offset)]`` of the record's fields (the core's).
        record_size: bytes per record.
        config_type: the config dataclass (``from_dict`` / ``to_dict``).
        counters: names of the counters saved with the records.
    """

    kind: str
    magic: bytes
    version: int
    layout: tuple[tuple[str, str, int], ...]
    record_size: int
    config_type: type
    counters: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.layout)

    @property
    def record_dtype(self) -> np.dtype:
        return np.dtype(
            {
                "names": list(self.fields),
                "formats": [dtype for _, dtype, _ in self.layout],
                "offsets": [offset for _, _, offset in self.layout],
                "itemsize": self.record_size,
            }
        )


def make_format(kind: str, magic: bytes, version: int, compiled: Any, config_type: type, counters: tuple[str, ...]) -> TableFormat:
    """The format of a compiled table class (its ``layout()``) and record size 32."""
    layout = tuple(tuple(entry) for entry in compiled.layout())
    return TableFormat(kind, magic, version, layout, _C.SAMPLE_RECORD_SIZE, config_type, counters)


#: SampleTable's format.
SAMPLE_FORMAT = make_format(
    "SampleTable", b"GEKOTBL\0", _C.TABLE_FORMAT_VERSION, _C.SampleTable, GekoConfig, ("updates_applied", "nonfinite_skipped")
)
#: Version of SampleTable's record layout, state dicts and files (the core's).
FORMAT_VERSION: int = SAMPLE_FORMAT.version
_LAYOUT: list[tuple[str, str, int]] = list(SAMPLE_FORMAT.layout)
_FIELDS: tuple[str, ...] = SAMPLE_FORMAT.fields
#: numpy dtype of one SampleTable record (32 bytes), as ``SampleTable.records()`` returns them.
RECORD_DTYPE = SAMPLE_FORMAT.record_dtype


def file_header(num_samples: int, config: Any, counters: dict[str, int], fmt: TableFormat = SAMPLE_FORMAT) -> bytes:
    """The JSON header of a checkpoint of ``num_samples`` records."""
    return json.dumps(
        {
            "num_samples": num_samples,
            "record_size": fmt.record_size,
            "byteorder": sys.byteorder,
            "fields": [list(entry) for entry in fmt.layout],
            "config": config.to_dict(),
            "counters": counters,
            "geko_core": _package_version(),
        },
        sort_keys=True,
    ).encode("utf-8")


def _package_version() -> str:
    from . import __version__

    return __version__


def check_version(version: Any, source: str, fmt: TableFormat = SAMPLE_FORMAT) -> None:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version != fmt.version:
        raise CheckpointError(f"{source} has format version {version!r}; this geko_core reads version {fmt.version}")


def parse_config(values: Any, fmt: TableFormat = SAMPLE_FORMAT) -> Any:
    if not isinstance(values, Mapping):
        raise CheckpointError(f"config must be a mapping, got {type(values).__name__}")
    try:
        return fmt.config_type.from_dict(dict(values))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid config: {exc}") from None


def parse_counters(values: Any, fmt: TableFormat = SAMPLE_FORMAT) -> dict[str, int]:
    names = fmt.counters
    if not isinstance(values, Mapping) or set(values) != set(names):
        raise CheckpointError(f"counters must be a mapping with keys {list(names)}, got {values!r}")
    counters = {}
    for name in names:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**64:
            raise CheckpointError(f"counter {name} must be an int in [0, 2**64), got {value!r}")
        counters[name] = int(value)
    return counters


# -- state dicts -----------------------------------------------------------------------------


def records_from_state(
    state_dict: Mapping[str, Any], num_samples: int, fmt: TableFormat
) -> tuple[np.ndarray, Any, dict[str, int]]:
    """Check a table's state dict whole; (records as uint8, config, counters).

    Raises:
        TypeError: state_dict is not a mapping.
        CheckpointError: keys, format version, number of samples, a field's dtype or shape,
            the config or the counters are wrong.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    expected = {"format_version", "num_samples", "config", "counters", *fmt.fields}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected, key=str)
    if missing or unexpected:
        raise CheckpointError(f"state dict keys do not match: missing {missing}, unexpected {unexpected}")
    check_version(state_dict["format_version"], "state dict", fmt)
    held = state_dict["num_samples"]
    if isinstance(held, bool) or not isinstance(held, (int, np.integer)):
        raise CheckpointError(f"num_samples must be an int, got {held!r}")
    if held != num_samples:
        raise CheckpointError(f"the state dict holds {held} samples but this table has {num_samples}")
    config = parse_config(state_dict["config"], fmt)
    counters = parse_counters(state_dict["counters"], fmt)
    dtype = fmt.record_dtype
    buffer = np.empty(num_samples * dtype.itemsize, dtype=np.uint8)
    records = buffer.view(dtype)
    for name in fmt.fields:
        records[name] = _field_from_state(name, state_dict[name], dtype.fields[name][0], num_samples)
    return buffer, config, counters


def _field_from_state(name: str, value: Any, expected: np.dtype, num_samples: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise CheckpointError(f"field {name!r} is on device {value.device}; load CPU data")
        value = value.detach().numpy()
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"field {name!r} must be a numpy array, got {type(value).__name__}")
    if value.dtype != expected or value.shape != (num_samples,):
        raise CheckpointError(
            f"field {name!r} must be {expected} of shape ({num_samples},), got {value.dtype} of shape {tuple(value.shape)}"
        )
    return value


# -- files -----------------------------------------------------------------------------------


def write_checkpoint(file, header: bytes, records: np.ndarray, fmt: TableFormat = SAMPLE_FORMAT) -> None:
    """Preamble, header, the records chunk by chunk, then the CRC of all of it."""
    preamble = _PREAMBLE.pack(fmt.magic, fmt.version, len(header))
    crc = zlib.crc32(header, zlib.crc32(preamble))
    file.write(preamble)
    file.write(header)
    for start in range(0, records.shape[0], _CHUNK_RECORDS):
        chunk = records[start : start + _CHUNK_RECORDS]
        crc = zlib.crc32(chunk, crc)
        file.write(chunk)
    file.write(_CRC.pack(crc))


def read_checkpoint(
    path: PathLike, expected_num_samples: int | None, fmt: TableFormat = SAMPLE_FORMAT
) -> tuple[np.ndarray, Any, dict[str, int]]:
    """Read and verify a whole checkpoint; (records as uint8, config, counters)."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size

        def fail(reason: str) -> CheckpointError:
            return CheckpointError(f"{path}: {reason}")

        # 1. Preamble and header: enough to know the expected size.
        preamble = file.read(_PREAMBLE.size)
        if len(preamble) < _PREAMBLE.size:
            raise fail(f"truncated: {size} bytes is too short for a {fmt.kind} checkpoint")
        magic, version, header_length = _PREAMBLE.unpack(preamble)
        if magic != fmt.magic:
            raise fail(f"not a geko_core {fmt.kind} checkpoint (wrong magic bytes)")
        if version != fmt.version:
            raise fail(f"format version {version} is not supported; this geko_core reads version {fmt.version}")
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
        if record_size != fmt.record_size:
            raise fail(f"record size {record_size} differs from this build's {fmt.record_size}")
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
    layout = list(fmt.layout)
    if not isinstance(fields, list) or [tuple(e) if isinstance(e, list) else e for e in fields] != layout:
        raise CheckpointError(f"{path}: record layout {fields} differs from this build's {layout}")
    if expected_num_samples is not None and num_samples != expected_num_samples:
        raise CheckpointError(f"{path}: holds {num_samples} samples but this table has {expected_num_samples}")
    try:
        config = parse_config(header.get("config"), fmt)
        counters = parse_counters(header.get("counters"), fmt)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return buffer, config, counters
