"""The byte LM ``sft-stdlib`` fine-tunes: pre-trained once on the standard library's source
(its training files only, ``sft_data._file_split``) and cached on disk."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ByteLM
from .data import _stdlib_files, cache_dir, load_checked, save_checked
from .runner import _lr_at
from .sft_data import _file_split, _stdlib_root

__all__ = ["PretrainConfig", "pretrained_stdlib_lm"]


def _stdlib_fingerprint() -> str:
    """Changes when the standard library's file list, sizes or Python version change."""
    root = _stdlib_root()
    digest = hashlib.sha256(f"{sys.version_info[0]}.{sys.version_info[1]}".encode())
    for path in _stdlib_files():
        try:
            size = path.stat().st_size
        except OSError:
            continue
        digest.update(f"{path.relative_to(root).as_posix()}:{size}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PretrainConfig:
    """The pre-trained byte LM: its architecture and its pre-training run."""

    seq_len: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 2000
    batch_size: int = 16
    lr: float = 6e-3
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True) + _stdlib_fingerprint() + torch.__version__.split("+")[0]
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pretrain_text() -> np.ndarray:
    """uint8 bytes of the training files only (``_file_split``), joined by newlines."""
    root = _stdlib_root()
    chunks = []
    for path in _stdlib_files():
        if _file_split(path.relative_to(root).as_posix()) != "train":
            continue
        try:
            chunks.append(path.read_bytes())
        except OSError:
            continue
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


def _byte_lm(config: PretrainConfig) -> nn.Module:
    return ByteLM(config.seq_len, width=config.width, layers=config.layers, heads=config.heads)


def _pretrain(config: PretrainConfig, progress: bool) -> dict[str, torch.Tensor]:
    """Next-byte pre-training on random windows of the training files; returns the state."""
    stream = _pretrain_text()
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model = _byte_lm(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    width = config.seq_len + 1
    offsets = np.arange(width)
    started = time.perf_counter()
    loss_ema = float("nan")
    for step in range(config.steps):
        starts = rng.integers(0, len(stream) - width, size=config.batch_size)
        batch = torch.from_numpy(stream[starts[:, None] + offsets].astype(np.int64))
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(config.lr, step / config.steps)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
        if progress and (step % 10 == 0 or step == config.steps - 1):
            done = (step + 1) / config.steps
            bar = "#" * int(28 * done)
            sys.stderr.write(
                f"\r[{bar:.<28}] pre-training the stdlib byte LM (once; cached)  step {step + 1}/{config.steps}"
                f"  loss {loss_ema:.2f}  {time.perf_counter() - started:4.0f}s"
            )
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def pretrained_stdlib_lm(config: PretrainConfig = PretrainConfig(), *, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a byte LM pre-trained on the standard library's training files.

    Trained once per configuration (and standard library, and torch version), then read from
    ``cache_dir()``. The cache file carries a SHA-256 of its content: a truncated or
    corrupted file is refused with a warning and rebuilt. The default configuration reaches
    a held-out byte perplexity of about 5.0 in about 2 minutes on one core of the 2-core
    machine.

    Args:
        config: architecture and pre-training run.
        progress: a progress bar on stderr; by default one when stderr is a terminal, and
            otherwise a line when pre-training starts and one when it ends.
    """
    path = cache_dir() / f"stdlib_lm_{config.key()}.pt.ck"
    payload = load_checked(path)
    if payload is not None:
        cached = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if cached.get("config") == asdict(config):
            return cached["state"]
        warnings.warn(f"{path} holds another configuration; pre-training again", RuntimeWarning, stacklevel=2)
    announce = progress is None and not sys.stderr.isatty()
    if announce:
        sys.stderr.write(f"pre-training the stdlib byte LM ({config.steps} steps; once, cached in {path.parent})\n")
    started = time.perf_counter()
    state = _pretrain(config, bool(progress) if progress is not None else sys.stderr.isatty())
    if announce:
        sys.stderr.write(f"pre-trained in {time.perf_counter() - started:.0f}s\n")
    buffer = io.BytesIO()
    torch.save({"config": asdict(config), "state": state}, buffer)
    save_checked(path, buffer.getvalue())
    return state
