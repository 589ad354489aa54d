"""SampleTable: the per-sample state of a whole dataset, 32 bytes per sample.

The records live in the compiled core (``csrc/sample_table.cpp``); this module converts
user input and holds the lock that makes multi-step operations (state dicts, checkpoints)
consistent. The record format and the checkpoint files are ``geko_core._table_file``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch

from ._backend import load_compiled_core
from ._checks import check_float_array, check_int
from ._record_table import RecordTable, restore_table, table_indices
from ._table_file import FORMAT_VERSION, RECORD_DTYPE, SAMPLE_FORMAT, CheckpointError
from .config import GekoConfig, resolve_config
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

ArrayLike = Union[np.ndarray, torch.Tensor]


def _floats(value: Any, name: str, *, allow_bool: bool = False) -> np.ndarray:
    # float64 beyond float32's range becomes inf: the update skips and counts it.
    return check_float_array(value, name, dtype=np.float32, allow_bool=allow_bool)


class SampleTable(RecordTable):
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

    Fields (``field``, ``gather``, ``records``, state dicts) and dtypes: ``q``, ``loss_ema``,
    ``loss_diff_ema``, ``last_loss``, ``last_confidence`` float32; ``visits`` uint32;
    ``last_step`` int32 (-1: never updated); ``last_correct`` uint8 (``round(255 * correct)``);
    ``bucket`` int8; ``hard_streak`` uint8; ``flags`` uint8 (``FLAG_SUSPECTED_NOISY``). Reads,
    state dicts and checkpoint files: ``geko_core._record_table.RecordTable``.

    Args:
        num_samples: N >= 1 (up to hundreds of millions: 32 B each).
        config: thresholds and rates; ``GekoConfig()`` when None.
        num_threads: OpenMP threads of updates and scans, 0 for OpenMP's default.

    Raises:
        TypeError: num_samples or num_threads not an int, or config not a GekoConfig.
        ValueError: num_samples < 1, num_threads outside [0, 1024].
        MemoryError: the records do not fit in memory.
    """

    _FORMAT = SAMPLE_FORMAT

    def __init__(self, num_samples: int, config: GekoConfig | None = None, *, num_threads: int = 1) -> None:
        num_samples = check_int(num_samples, "num_samples")
        config = resolve_config(config)
        super().__init__(_C.SampleTable(num_samples, config.to_cpp(), check_int(num_threads, "num_threads")), config)

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
        idx = table_indices(indices, self.num_samples)
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

    # -- reads (the rest: RecordTable) ----------------------------------------------------

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

    # -- what RecordTable asks ---------------------------------------------------------------

    def _counters(self) -> dict[str, int]:
        return {"updates_applied": self._c.updates, "nonfinite_skipped": self._c.nonfinite_skipped}

    def _load_compiled(self, buffer: np.ndarray, config: GekoConfig, counters: dict[str, int]) -> None:
        self._c.load(buffer, config.to_cpp(), counters["updates_applied"], counters["nonfinite_skipped"])


def _table_from_state(state: Mapping[str, Any]) -> SampleTable:
    """Unpickles a SampleTable pickled before the tables shared ``RecordTable``."""
    return restore_table(SampleTable, state)
