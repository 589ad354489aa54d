"""Benchmark data made locally: nothing is downloaded.

* MNIST-1D, generated with the ``mnist1d`` package's ``make_dataset`` (its ``get_dataset``
  downloads, so it is never called), scaled up and optionally with label noise.
* Byte-level text of Python's own standard library (``sysconfig`` stdlib path), split by file
  into training and held-out sets.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._atomic import atomic_write

__all__ = ["ClassificationData", "TextData", "cache_dir", "load_checked", "make_mnist1d", "make_stdlib_text", "save_checked"]


def cache_dir() -> Path:
    """Where generated data sets are cached (``GEKO_CACHE_DIR`` or ``~/.cache/geko_core``)."""
    root = os.environ.get("GEKO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "geko_core")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ClassificationData:
    x_train: np.ndarray  # float32 [N, L]
    y_train: np.ndarray  # int64 [N] (possibly noisy)
    y_train_clean: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def noisy(self) -> np.ndarray:
        """bool [N]: the training label was flipped."""
        return self.y_train != self.y_train_clean


_CHECKED_MAGIC = b"GEKO-CACHE-1\n"


def save_checked(path: Path, payload: bytes) -> None:
    """Write ``payload`` atomically behind a header and its SHA-256 (see ``load_checked``)."""
    with atomic_write(path) as handle:
        handle.write(_CHECKED_MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checked(path: Path) -> bytes | None:
    """The payload ``save_checked`` wrote, or None when the file is missing or damaged.

    A damaged file (wrong header, truncated, any changed byte) is reported with a
    ``RuntimeWarning`` and ignored, so the caller rebuilds it and writes it again.
    """
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    head = len(_CHECKED_MAGIC)
    payload = blob[head + 32 :]
    if blob[:head] != _CHECKED_MAGIC or len(blob) < head + 32 or hashlib.sha256(payload).digest() != blob[head : head + 32]:
        warnings.warn(f"ignoring damaged cache file {path} (checksum mismatch); rebuilding it", RuntimeWarning, stacklevel=2)
        return None
    return payload


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)


def make_mnist1d(num_samples: int = 40_000, *, label_noise: float = 0.0, seed: int = 42, test_fraction: float = 0.2) -> ClassificationData:
    """MNIST-1D (40-sample 1-D signals, 10 classes) generated locally.

    Args:
        num_samples: total samples before the train/test split.
        label_noise: fraction of training labels replaced by a different random class.
        seed: generator seed (the data set and the noise are deterministic in it).
        test_fraction: held-out share.
    """
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    if num_samples < 100:
        raise ValueError(f"num_samples must be at least 100, got {num_samples}")
    path = cache_dir() / f"mnist1d_n{num_samples}_s{seed}_t{test_fraction}.npz"
    if path.exists():
        with np.load(path) as cached:
            x, y = cached["x"], cached["y"]
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_samples
        args.seed = seed
        args.train_split = 1.0 - test_fraction
        # make_dataset seeds numpy's global RNG; keep the caller's stream as it was.
        saved = np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(saved)
        x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
        y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
        _atomic_save_npz(path, x=x, y=y)
    split = int(round(len(y) * (1.0 - test_fraction)))
    x_train, y_clean = x[:split], y[:split]
    y_train = y_clean.copy()
    if label_noise > 0:
        rng = np.random.default_rng(seed + 1)
        flip = rng.random(len(y_train)) < label_noise
        shift = rng.integers(1, 10, size=int(flip.sum()))
        y_train[flip] = (y_train[flip] + shift) % 10
    return ClassificationData(x_train, y_train, y_clean, x[split:], y[split:], num_classes=10)


@dataclass
class TextData:
    train: np.ndarray  # uint8 [N, T + 1] byte sequences (inputs = [:, :-1], targets = [:, 1:])
    test: np.ndarray
    num_train_files: int
    num_test_files: int
    #: windows of the training files that ``train`` does not use (``num_validation``)
    validation: np.ndarray | None = None


#: A standard-library file is held out (test) when its bucket is below this: about 10% of files.
_HELD_OUT_BUCKETS = 26


def _stdlib_file_bucket(relative: str) -> int:
    """0..255 from a hash of a file's path relative to the standard library: the file's split
    (``make_stdlib_text`` holds out buckets below ``_HELD_OUT_BUCKETS``)."""
    return hashlib.sha256(relative.encode()).digest()[0]


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    files = []
    # os.walk pruning the skipped directories: the files of root.rglob("*.py") outside them,
    # without listing site-packages (seconds on a machine with many packages installed).
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if d not in skip]
        files += [Path(directory, name) for name in names if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def make_stdlib_text(num_train: int = 4096, num_test: int = 512, *, seq_len: int = 128, seed: int = 0, num_validation: int = 0) -> TextData:
    """Byte sequences of the standard library's source, split by file.

    A file goes to the held-out set when a hash of its relative path says so (about 10%), so
    train and test never share a file. Sequences are non-overlapping windows of
    ``seq_len + 1`` bytes, sampled deterministically in ``seed``. ``num_validation`` windows
    are carved out of the training files' windows that ``train`` does not use (drawn after
    train and test, so those stay the same for any ``num_validation``); they share files
    with ``train``, so validation perplexity runs a little below test perplexity.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    files = _stdlib_files()
    if not files:
        raise RuntimeError("no standard-library source files found")
    root = Path(sysconfig.get_paths()["stdlib"])
    train_chunks: list[bytes] = []
    test_chunks: list[bytes] = []
    n_train_files = n_test_files = 0
    for path in files:
        bucket = _stdlib_file_bucket(path.relative_to(root).as_posix())
        try:
            blob = path.read_bytes()
        except OSError:
            continue
        if bucket < _HELD_OUT_BUCKETS:
            test_chunks.append(blob)
            n_test_files += 1
        else:
            train_chunks.append(blob)
            n_train_files += 1

    width = seq_len + 1

    def windows(chunks: list[bytes], count: int, rng: np.random.Generator, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        stream = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
        candidates = np.arange(len(stream) // width)
        if exclude is not None:
            candidates = np.setdiff1d(candidates, exclude)
        if len(candidates) < count:
            raise ValueError(f"only {len(candidates)} sequences of {width} bytes available, {count} requested")
        chosen = candidates[np.sort(rng.choice(len(candidates), size=count, replace=False))]
        return np.stack([stream[s : s + width] for s in chosen * width]), chosen

    rng = np.random.default_rng(seed)
    train, used = windows(train_chunks, num_train, rng)
    test, _ = windows(test_chunks, num_test, rng)
    validation = None
    if num_validation:
        validation, _ = windows(train_chunks, num_validation, np.random.default_rng([seed, 1]), exclude=used)
    return TextData(train, test, n_train_files, n_test_files, validation)
