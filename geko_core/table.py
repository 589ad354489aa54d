"""SampleTable: the per-sample state of a whole dataset, 32 bytes per sample.

The records live in the compiled core (``csrc/sample_table.cpp``); this module converts
user input and holds the lock that makes multi-step operations (state dicts, checkpoints)
consistent. The record format and the checkpoint files are ``geko_core._table_file``'s.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch

from ._atomic import atomic_write
from ._backend import load_compiled_core
from ._checks import check_float_array, check_index_array, check_int
from ._table_file import (
    _FIELDS,
    FORMAT_VERSION,
    RECORD_DTYPE,
    CheckpointError,
    check_version,
    file_header,
    parse_config,
    parse_counters,
    read_checkpoint,
    write_checkpoint,
)
from .config import BUCKET_NAMES, GekoConfig, resolve_config
from .types import SampleStats

__all__ = [
    "FLAG_SUSPECTED_NOISY",
    "FORMAT_VERSION",
    "MAX_STEP",
    "RECORD_DTYPE",
    "CheckpointError",
    "SampleTable",
]

_C = load_compiled_core()

#: Largest step a table stores (steps are int32; ``last_step`` is -1 before the first update).
MAX_STEP: int = _C.MAX_STEP
#: Bit of the ``flags`` field: the noise guard lowered this HARD sample to FOCUS.
FLAG_SUSPECTED_NOISY: int = _C.FLAG_SUSPECTED_NOISY

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[np.ndarray, torch.Tensor]


# ---------------------------------------------------------------------------------------
# Input conversion. The compiled core takes 1-D, contiguous, aligned, native arrays of
# exact dtypes (and checks them again, indices included); everything else is converted
# here, once, by the shared checks.


def _indices(value: Any, num_samples: int, *, check_range: bool = False) -> np.ndarray:
    return check_index_array(
        value, "indices", num_samples, what=f"a table of {num_samples} samples", check_range=check_range
    )


def _floats(value: Any, name: str, *, allow_bool: bool = False) -> np.ndarray:
    # float64 beyond float32's range becomes inf: the update skips and counts it.
    return check_float_array(value, name, dtype=np.float32, allow_bool=allow_bool)


def _field_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"field name must be a str, got {type(name).__name__}")
    return name


# ---------------------------------------------------------------------------------------


class SampleTable:
    """Per-sample state of N samples, 32 bytes each (docs/design.md §3).

    Each sample holds its Q-value, an EMA of its loss and of its loss differences, its
    latest loss, confidence and correct fraction, its bucket, visit count, last-visit step
    and consecutive-HARD count (noise guard). Never-updated samples are in bucket UNSEEN.

    Per update of sample i with finite (loss, confidence, correct) at ``step``:

    * ``r = 1 - min(max(loss, 0) / loss_scale, 1)``, ``q <- (1 - q_alpha) q + q_alpha r``;
    * first visit: ``loss_ema = loss``, ``loss_diff_ema = 0``; later
      ``loss_diff_ema <- b2 loss_diff_ema + (1 - b2)(loss - last_loss)`` and
      ``loss_ema <- b1 loss_ema + (1 - b1) loss``;
    * bucket = the instant bucket of (confidence, correct); FREEZE also needs the new
      ``q >= freeze_q`` (else LIGHT); a sample HARD for ``noise_guard_visits`` consecutive
      visits becomes FOCUS and carries ``FLAG_SUSPECTED_NOISY`` until it leaves HARD;
    * ``visits += 1`` (saturating), ``last_step = step``, latest values stored
      (``last_correct`` as ``round(255 * correct)``).

    Parallelism: ``num_threads`` OpenMP threads apply large batches and run scans. One
    thread with software prefetch already exceeds 20 M random updates/s, and a parallel
    region waits for its slowest thread when the machine's cores are busy (data-loader
    workers, other jobs), so the default is 1. With more, each thread owns a range of the
    table and applies only its indices: the result never depends on the thread count.

    Thread safety: every method may be called from several threads. Calls are serialised
    by one lock per table (a Python lock here, plus a mutex in the compiled core); the
    compiled work runs with the GIL released, so other Python threads keep running.
    ``records()`` views read the memory without the lock.

    Args:
        num_samples: N >= 1 (up to hundreds of millions: 32 B each).
        config: thresholds and rates; ``GekoConfig()`` when None.
        num_threads: OpenMP threads of updates and scans, 0 for OpenMP's default.

    Raises:
        TypeError: num_samples or num_threads not an int, or config not a GekoConfig.
        ValueError: num_samples < 1, num_threads outside [0, 1024].
        MemoryError: the records do not fit in memory.
    """

    def __init__(self, num_samples: int, config: GekoConfig | None = None, *, num_threads: int = 1) -> None:
        num_samples = check_int(num_samples, "num_samples")
        config = resolve_config(config)
        self._c = _C.SampleTable(num_samples, config.to_cpp(), check_int(num_threads, "num_threads"))
        self._config = config
        self._lock = threading.RLock()
        # The records never move (loads copy into them), so one view serves every records() call.
        self._records: np.ndarray | None = None

    # -- updates ---------------------------------------------------------------------

    def update(
        self,
        indices: ArrayLike,
        loss: ArrayLike,
        confidence: ArrayLike,
        correct: ArrayLike,
        step: int,
    ) -> None:
        """Apply one batch of per-sample statistics, in batch order.

        Everything is validated before any record changes; on error the table is as it was.
        Input may be numpy arrays or CPU torch tensors, any stride.

        Args:
            indices: integer ``[n]`` (int32/int64 used as is, other integer types
                converted), each in ``[0, N)``; a repeated index is applied once per
                occurrence, in order.
            loss: float ``[n]`` (float64 is converted to float32 once).
            confidence: float ``[n]``, in ``[0, 1]``.
            correct: float or bool ``[n]``: correct fraction in ``[0, 1]`` (token accuracy for
                sequences, 0/1 for classification).
            step: training step in ``[0, MAX_STEP]``, stored as ``last_step``.

        A sample whose loss, confidence or correct is NaN or infinite is left unchanged and
        counted in ``nonfinite_skipped``; the rest of the batch applies.

        Raises:
            IndexError: an index outside ``[0, N)`` (the message names the first one).
            TypeError: indices not integer, values not float (bool for correct), step not int.
            ValueError: not 1-D, lengths differ, a non-CPU tensor, a finite confidence or
                correct outside [0, 1], or a step out of range.
        """
        step = check_int(step, "step", low=0, high=MAX_STEP)
        idx = _indices(indices, self.num_samples)
        loss_a = _floats(loss, "loss")
        conf_a = _floats(confidence, "confidence")
        correct_a = _floats(correct, "correct", allow_bool=True)
        lengths = (idx.shape[0], loss_a.shape[0], conf_a.shape[0], correct_a.shape[0])
        if len(set(lengths)) != 1:
            raise ValueError(
                "indices, loss, confidence and correct must have the same length, got "
                + ", ".join(str(n) for n in lengths)
            )
        with self._lock:
            self._c.update(idx, loss_a, conf_a, correct_a, step)

    def update_arrays(
        self,
        indices: np.ndarray,
        loss: np.ndarray,
        confidence: np.ndarray,
        correct: np.ndarray,
        step: int,
        *,
        before: np.ndarray | None = None,
        after: np.ndarray | None = None,
    ) -> None:
        """:meth:`update` for callers that already hold contiguous numpy arrays of the exact
        dtypes (indices int64 or int32, the rest float32), e.g. the Selector on every step,
        with an optional report for policies that keep per-sample state of their own.

        Skips the Python-side conversions only: the compiled table still checks dtypes,
        shapes, lengths, every index and every value before it writes anything, and raises
        the same errors.

        Args:
            before, after: None, or writable contiguous int8 arrays of the batch's length:
                the same compiled call writes into them each row's bucket code just before
                the batch and just after it (a repeated index reports the same pair on each
                of its rows; a row the table skipped for a non-finite value keeps its bucket).
                Checked with the rest, before anything is written.
        """
        with self._lock:
            self._c.update(indices, loss, confidence, correct, step, before, after)

    def update_from_stats(self, indices: ArrayLike, stats: SampleStats, step: int) -> None:
        """``update(indices, stats.loss, stats.confidence, stats.correct, step)``.

        Invalid samples of ``stats`` (NaN fields) are skipped and counted in
        ``nonfinite_skipped``. The statistics must be on the CPU.
        """
        self.update(indices, stats.loss, stats.confidence, stats.correct, step)

    # -- reads -----------------------------------------------------------------------

    def buckets(self, indices: ArrayLike) -> np.ndarray:
        """int8 ``[n]``: bucket code of each index (FREEZE 0, LIGHT 1, FOCUS 2, HARD 3, UNSEEN 4).

        Raises:
            IndexError: an index outside ``[0, N)``.
            TypeError: indices not integer.
        """
        idx = _indices(indices, self.num_samples)
        with self._lock:
            return self._c.buckets(idx)

    def bucket_counts(self) -> dict[str, int]:
        """Number of samples per bucket, ``{"FREEZE": .., "LIGHT": .., "FOCUS": .., "HARD": .., "UNSEEN": ..}``.

        The counts sum to N. One parallel scan of the records.
        """
        return dict(zip(BUCKET_NAMES, (int(c) for c in self.bucket_counts_array())))

    def bucket_counts_array(self) -> np.ndarray:
        """int64 ``[5]``: samples per bucket code, indexed by the code."""
        with self._lock:
            return self._c.bucket_counts()

    def field(self, name: str) -> np.ndarray:
        """A copy of one field of every sample, ``[N]``.

        Fields and dtypes: ``q``, ``loss_ema``, ``loss_diff_ema``, ``last_loss``,
        ``last_confidence`` float32; ``visits`` uint32; ``last_step`` int32 (-1: never
        updated); ``last_correct`` uint8 (``round(255 * correct)``); ``bucket`` int8;
        ``hard_streak`` uint8; ``flags`` uint8 (``FLAG_SUSPECTED_NOISY``).

        Raises:
            ValueError: unknown field name.
        """
        name = _field_name(name)
        with self._lock:
            return self._c.copy_field(name)

    def gather(self, name: str, indices: ArrayLike) -> np.ndarray:
        """One field of the samples ``indices``, ``[n]`` (a copy; dtypes as in :meth:`field`).

        Raises:
            IndexError: an index outside ``[0, N)``.
            ValueError: unknown field name.
        """
        if _field_name(name) not in _FIELDS:
            raise ValueError(f"unknown field {name!r}; the fields are {', '.join(_FIELDS)}")
        # numpy indexing would wrap a negative index around: checked here, not by the core
        idx = _indices(indices, self.num_samples, check_range=True)
        with self._lock:
            return self.records()[name][idx]

    def records(self) -> np.ndarray:
        """Zero-copy read-only view ``[N]`` of the records, dtype ``RECORD_DTYPE``.

        The view keeps the table's memory alive and reflects later updates and loads. It
        reads without the table's lock: while another thread updates, it may show a batch
        half applied. Use ``field()`` or ``state_dict()`` for consistent copies.
        """
        if self._records is None:  # the structured view is the costly part: made once
            self._records = self._c.records_view().view(RECORD_DTYPE)[:, 0]
        return self._records[:]  # a fresh array object: a caller's reshape never reaches another

    @property
    def num_samples(self) -> int:
        """N, the number of samples."""
        return self._c.num_samples

    def __len__(self) -> int:
        return self._c.num_samples

    @property
    def config(self) -> GekoConfig:
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
        """Bytes of per-sample state: 32 * N."""
        return self._c.nbytes

    @property
    def nonfinite_skipped(self) -> int:
        """Sample-updates skipped because loss, confidence or correct was NaN or infinite."""
        return self._c.nonfinite_skipped

    @property
    def updates_applied(self) -> int:
        """Sample-updates applied since the table was created (saved with its state)."""
        return self._c.updates

    def __repr__(self) -> str:
        return (
            f"SampleTable(num_samples={self.num_samples}, nbytes={self.nbytes}, "
            f"updates_applied={self.updates_applied}, nonfinite_skipped={self.nonfinite_skipped})"
        )

    # -- state dicts -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain Python values and numpy arrays (torch convention).

        Returns:
            ``{"format_version": int, "num_samples": int, "config": dict,
            "counters": {"updates_applied": int, "nonfinite_skipped": int},
            <field>: np.ndarray [N] for every field of ``field()``}``. The arrays are copies.
            ``load_state_dict`` also takes them as CPU tensors: convert them with
            ``torch.from_numpy`` to store the state in a checkpoint that
            ``torch.load(..., weights_only=True)`` reads.
        """
        with self._lock:
            state: dict[str, Any] = {
                "format_version": FORMAT_VERSION,
                "num_samples": self.num_samples,
                "config": self._config.to_dict(),
                "counters": self._counters(),
            }
            for name in _FIELDS:
                state[name] = self._c.copy_field(name)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the whole state (records, config and counters) by ``state_dict``.

        Everything is checked before anything is replaced: keys, format version, number of
        samples, field dtypes and shapes, the config, and that every record is one the
        update rule can produce (bucket codes, flags, visit/step consistency, q in [0, 1]).

        Raises:
            TypeError: state_dict is not a mapping.
            CheckpointError: anything else wrong; the table is unchanged.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = {"format_version", "num_samples", "config", "counters", *_FIELDS}
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected, key=str)
        if missing or unexpected:
            raise CheckpointError(f"state dict keys do not match: missing {missing}, unexpected {unexpected}")
        check_version(state_dict["format_version"], "state dict")
        num_samples = state_dict["num_samples"]
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
            raise CheckpointError(f"num_samples must be an int, got {num_samples!r}")
        self._check_num_samples(int(num_samples), "the state dict")
        config = parse_config(state_dict["config"])
        counters = parse_counters(state_dict["counters"])
        buffer = np.empty(self.num_samples * RECORD_DTYPE.itemsize, dtype=np.uint8)
        records = buffer.view(RECORD_DTYPE)
        for name in _FIELDS:
            records[name] = self._field_from_state(name, state_dict[name])
        self._install(buffer, config, counters)

    def _field_from_state(self, name: str, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                raise CheckpointError(f"field {name!r} is on device {value.device}; load CPU data")
            value = value.detach().numpy()
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"field {name!r} must be a numpy array, got {type(value).__name__}")
        expected = RECORD_DTYPE.fields[name][0]
        if value.dtype != expected or value.shape != (self.num_samples,):
            raise CheckpointError(
                f"field {name!r} must be {expected} of shape ({self.num_samples},), "
                f"got {value.dtype} of shape {tuple(value.shape)}"
            )
        return value

    # -- files -----------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the whole state to ``path`` atomically.

        The file is written next to ``path`` under a temporary name, flushed and fsynced,
        then renamed over ``path`` (and the directory fsynced): a crash or error at any
        point leaves either the previous file or the new one, never a mix. The records are
        streamed from the table's memory, never copied whole. Updates wait meanwhile.
        """
        with self._lock:
            header = file_header(self.num_samples, self._config, self._counters())
            with atomic_write(path) as file:
                write_checkpoint(file, header, self._c.records_view())

    def load(self, path: PathLike) -> None:
        """Replace the whole state (records, config, counters) by the checkpoint at ``path``.

        The file is read and verified completely (magic, format version, size, checksum,
        layout, number of samples, config, every record) before anything is replaced; this
        needs N * 32 bytes of temporary memory.

        Raises:
            CheckpointError: the file is not a table checkpoint, is truncated or corrupt, has
                another format version or layout, or holds another number of samples. The
                table is unchanged.
            OSError: the file cannot be read.
        """
        buffer, config, counters = read_checkpoint(path, expected_num_samples=self.num_samples)
        self._install(buffer, config, counters)

    @classmethod
    def from_file(cls, path: PathLike) -> "SampleTable":
        """A new table holding the checkpoint at ``path`` (its size and config come from the file).

        Raises:
            CheckpointError, OSError: as ``load``.
        """
        buffer, config, counters = read_checkpoint(path, expected_num_samples=None)
        table = cls(buffer.size // RECORD_DTYPE.itemsize, config)
        table._install(buffer, config, counters)
        return table

    def __reduce__(self):
        return (_table_from_state, (self.state_dict(),))

    # -- helpers ---------------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {"updates_applied": self._c.updates, "nonfinite_skipped": self._c.nonfinite_skipped}

    def _check_num_samples(self, num_samples: int, source: str) -> None:
        if num_samples != self.num_samples:
            raise CheckpointError(
                f"{source} holds {num_samples} samples but this table has {self.num_samples}"
            )

    def _install(self, buffer: np.ndarray, config: GekoConfig, counters: dict[str, int]) -> None:
        with self._lock:
            try:
                self._c.load(buffer, config.to_cpp(), counters["updates_applied"], counters["nonfinite_skipped"])
            except ValueError as exc:
                raise CheckpointError(f"invalid table state: {exc}") from None
            self._config = config


def _table_from_state(state: Mapping[str, Any]) -> SampleTable:
    table = SampleTable(int(state["num_samples"]), parse_config(state["config"]))
    table.load_state_dict(state)
    return table


