"""What ``SampleTable`` and ``RolloutTable`` share: reads, state dicts and checkpoint files.

Each is a thin Python class over a compiled table (``_c``) of 32-byte records; this base
converts the arguments of the reads, holds the lock that makes multi-step operations (state
dicts, checkpoints) consistent, and stores and restores the whole state through
``geko_core._table_file``, parametrised by the subclass's ``TableFormat``. A subclass sets
``_FORMAT``, builds ``_c`` and ``_config``, and says how its counters are read and loaded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, TypeVar, Union

import numpy as np
import torch

from ._atomic import atomic_write
from ._checks import check_index_array, check_int
from ._table_file import CheckpointError, TableFormat, file_header, read_checkpoint, records_from_state, write_checkpoint
from .config import BUCKET_NAMES

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[np.ndarray, torch.Tensor]
_Table = TypeVar("_Table", bound="RecordTable")


def table_indices(value: Any, num_samples: int, *, check_range: bool = False) -> np.ndarray:
    """Indices into a table of ``num_samples`` as the compiled core takes them."""
    return check_index_array(value, "indices", num_samples, what=f"a table of {num_samples} samples", check_range=check_range)


def _field_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"field name must be a str, got {type(name).__name__}")
    return name


class RecordTable:
    """Base of the compiled tables' Python classes (not public)."""

    _FORMAT: TableFormat

    def __init__(self, compiled: Any, config: Any) -> None:
        self._c = compiled
        self._config = config
        self._lock = threading.RLock()
        # The records never move (loads copy into them), so one view serves every records() call.
        self._records: np.ndarray | None = None

    # -- what a subclass says --------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        raise NotImplementedError

    def _load_compiled(self, buffer: np.ndarray, config: Any, counters: dict[str, int]) -> None:
        raise NotImplementedError

    # -- reads -------------------------------------------------------------------------------

    def buckets(self, indices: ArrayLike) -> np.ndarray:
        """int8 ``[n]``: bucket code of each index (FREEZE 0, LIGHT 1, FOCUS 2, HARD 3, UNSEEN 4).

        Raises:
            IndexError: an index outside ``[0, N)``.
            TypeError: indices not integer.
        """
        idx = table_indices(indices, self.num_samples)
        with self._lock:
            return self._c.buckets(idx)

    def bucket_counts(self) -> dict[str, int]:
        """Number of entries per bucket, ``{"FREEZE": .., "LIGHT": .., "FOCUS": .., "HARD": .., "UNSEEN": ..}``.

        The counts sum to N. One parallel scan of the records.
        """
        return dict(zip(BUCKET_NAMES, (int(c) for c in self.bucket_counts_array())))

    def bucket_counts_array(self) -> np.ndarray:
        """int64 ``[5]``: entries per bucket code, indexed by the code."""
        with self._lock:
            return self._c.bucket_counts()

    def field(self, name: str) -> np.ndarray:
        """A copy of one field of every entry, ``[N]`` (the fields: the class docstring).

        Raises:
            ValueError: unknown field name.
        """
        name = _field_name(name)
        with self._lock:
            return self._c.copy_field(name)

    def gather(self, name: str, indices: ArrayLike) -> np.ndarray:
        """One field of the entries ``indices``, ``[n]`` (a copy; dtypes as in :meth:`field`).

        Raises:
            IndexError: an index outside ``[0, N)``.
            ValueError: unknown field name.
        """
        fields = self._FORMAT.fields
        if _field_name(name) not in fields:
            raise ValueError(f"unknown field {name!r}; the fields are {', '.join(fields)}")
        # numpy indexing would wrap a negative index around: checked here, not by the core
        idx = table_indices(indices, self.num_samples, check_range=True)
        with self._lock:
            return self.records()[name][idx]

    def records(self) -> np.ndarray:
        """Zero-copy read-only view ``[N]`` of the records (a structured dtype of the fields).

        The view keeps the table's memory alive and reflects later updates and loads. It
        reads without the table's lock: while another thread updates, it may show a batch
        half applied. Use ``field()`` or ``state_dict()`` for consistent copies.
        """
        if self._records is None:  # the structured view is the costly part: made once
            self._records = self._c.records_view().view(self._FORMAT.record_dtype)[:, 0]
        return self._records[:]  # a fresh array object: a caller's reshape never reaches another

    @property
    def num_samples(self) -> int:
        """N, the number of entries."""
        return self._c.num_samples

    def __len__(self) -> int:
        return self._c.num_samples

    @property
    def config(self) -> Any:
        """The thresholds and rates in use (replaced by ``load_state_dict`` / ``load``)."""
        return self._config

    @property
    def num_threads(self) -> int:
        """OpenMP threads of updates and scans (0: OpenMP's default); settable."""
        return self._c.num_threads

    @num_threads.setter
    def num_threads(self, value: int) -> None:
        self._c.num_threads = check_int(value, "num_threads")

    @property
    def nbytes(self) -> int:
        """Bytes of per-entry state: 32 * N."""
        return self._c.nbytes

    # -- state dicts ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain Python values and numpy arrays (torch convention).

        Returns:
            ``{"format_version": int, "num_samples": int, "config": dict, "counters": dict,
            <field>: np.ndarray [N] for every field of ``field()``}``. The arrays are copies.
            ``load_state_dict`` also takes them as CPU tensors: convert them with
            ``torch.from_numpy`` to store the state in a checkpoint that
            ``torch.load(..., weights_only=True)`` reads.
        """
        with self._lock:
            state: dict[str, Any] = {
                "format_version": self._FORMAT.version,
                "num_samples": self.num_samples,
                "config": self._config.to_dict(),
                "counters": self._counters(),
            }
            for name in self._FORMAT.fields:
                state[name] = self._c.copy_field(name)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the whole state (records, config and counters) by ``state_dict``.

        Everything is checked before anything is replaced: keys, format version, number of
        entries, field dtypes and shapes, the config, and that every record is one the
        update rule can produce.

        Raises:
            TypeError: state_dict is not a mapping.
            CheckpointError: anything else wrong; the table is unchanged.
        """
        self._install(*records_from_state(state_dict, self.num_samples, self._FORMAT))

    # -- files -------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the whole state to ``path`` atomically.

        The file is written next to ``path`` under a temporary name, flushed and fsynced,
        then renamed over ``path`` (and the directory fsynced): a crash or error at any
        point leaves either the previous file or the new one, never a mix. The records are
        streamed from the table's memory, never copied whole. Updates wait meanwhile.
        """
        with self._lock:
            header = file_header(self.num_samples, self._config, self._counters(), self._FORMAT)
            with atomic_write(path) as file:
                write_checkpoint(file, header, self._c.records_view(), self._FORMAT)

    def load(self, path: PathLike) -> None:
        """Replace the whole state (records, config, counters) by the checkpoint at ``path``.

        The file is read and verified completely (magic, format version, size, checksum,
        layout, number of entries, config, every record) before anything is replaced; this
        needs N * 32 bytes of temporary memory.

        Raises:
            CheckpointError: the file is not a checkpoint of this kind of table, is truncated
                or corrupt, has another format version or layout, or holds another number of
                entries. The table is unchanged.
            OSError: the file cannot be read.
        """
        self._install(*read_checkpoint(path, self.num_samples, self._FORMAT))

    @classmethod
    def from_file(cls: type[_Table], path: PathLike) -> _Table:
        """A new table holding the checkpoint at ``path`` (its size and config come from the file).

        Raises:
            CheckpointError, OSError: as ``load``.
        """
        buffer, config, counters = read_checkpoint(path, None, cls._FORMAT)
        table = cls(buffer.size // cls._FORMAT.record_size, config)
        table._install(buffer, config, counters)
        return table

    def __reduce__(self):
        return (restore_table, (type(self), self.state_dict()))

    def _install(self, buffer: np.ndarray, config: Any, counters: dict[str, int]) -> None:
        with self._lock:
            try:
                self._load_compiled(buffer, config, counters)
            except ValueError as exc:
                raise CheckpointError(f"invalid table state: {exc}") from None
            self._config = config


def restore_table(cls: type[_Table], state: Mapping[str, Any]) -> _Table:
    """A table of class ``cls`` holding ``state`` (unpickling)."""
    table = cls(int(state["num_samples"]), cls._FORMAT.config_type.from_dict(dict(state["config"])))
    table.load_state_dict(state)
    return table
