"""Benchmark tasks: data, model, optimiser and evaluation, the same for every policy."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from .base import ByteLM, CNN1D, Task
from .data import make_mnist1d, make_stdlib_text
from .settings import task_geko_options
from .sft import make_sft_task

__all__ = ["TASK_NAMES", "Task", "make_task"]


#: generator seed of MNIST-1D's validation samples (the training and test data use 42)
_MNIST1D_VALIDATION_SEED = 1042


def _mnist1d_task(scale: str, label_noise: float) -> Task:
    sizes = {"smoke": 2_000, "quick": 10_000, "default": 40_000}
    epochs = {"smoke": 2, "quick": 6, "default": 12}
    data = make_mnist1d(sizes[scale], label_noise=label_noise)
    # Validation: as many fresh samples as the test set, drawn from the same generator with
    # another seed and clean labels. Carving them out of the training set would change the
    # training data behind the README's figures; a fresh draw leaves train and test as they are.
    held = make_mnist1d(len(data.y_test), seed=_MNIST1D_VALIDATION_SEED, test_fraction=0.0)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CNN1D(data.x_train.shape[1], data.num_classes)

    def accuracy_on(x: np.ndarray, y: np.ndarray) -> Callable[[nn.Module], float]:
        x_eval, y_eval = torch.from_numpy(x), torch.from_numpy(y)

        @torch.no_grad()
        def evaluate(model: nn.Module) -> float:
            model.eval()
            correct = sum(int((model(x_eval[i : i + 2048]).argmax(-1) == y_eval[i : i + 2048]).sum()) for i in range(0, len(y_eval), 2048))
            model.train()
            return 100.0 * correct / len(y_eval)

        return evaluate

    suffix = f"-noise{int(round(label_noise * 100))}" if label_noise else ""
    return Task(
        name=f"mnist1d{suffix}",
        inputs=torch.from_numpy(data.x_train),
        targets=torch.from_numpy(data.y_train),
        make_model=make_model,
        evaluate=accuracy_on(data.x_test, data.y_test),
        evaluate_validation=accuracy_on(held.x_train, held.y_train),
        metric_name="accuracy_%",
        higher_is_better=True,
        epochs=epochs[scale],
        batch_size=128,
        lr=3e-3,
        weight_decay=1e-4,
    )


def _stdlib_lm_task(scale: str) -> Task:
    sizes = {"smoke": (256, 64), "quick": (768, 256), "default": (3072, 512)}
    epochs = {"smoke": 2, "quick": 4, "default": 8}
    seq_len = 64
    n_train, n_test = sizes[scale]
    # Validation: as many windows as the test set, from the training files' unused windows
    # (train and test are the same as without them).
    data = make_stdlib_text(n_train, n_test, seq_len=seq_len, num_validation=n_test)
    train = torch.from_numpy(data.train.astype(np.int64))

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return ByteLM(seq_len)

    def perplexity_on(windows: np.ndarray) -> Callable[[nn.Module], float]:
        held = torch.from_numpy(windows.astype(np.int64))

        @torch.no_grad()
        def evaluate(model: nn.Module) -> float:
            model.eval()
            total, count = 0.0, 0
            for i in range(0, len(held), 256):
                chunk = held[i : i + 256]
                logits = model(chunk[:, :-1])
                total += float(nn.functional.cross_entropy(logits.reshape(-1, 256), chunk[:, 1:].reshape(-1), reduction="sum"))
                count += chunk[:, 1:].numel()
            model.train()
            return math.exp(total / count)

        return evaluate

    return Task(
        name="stdlib-lm",
        inputs=train[:, :-1].contiguous(),
        targets=train[:, 1:].contiguous(),
        make_model=make_model,
        evaluate=perplexity_on(data.test),
        evaluate_validation=perplexity_on(data.validation),
        metric_name="perplexity",
        higher_is_better=False,
        epochs=epochs[scale],
        batch_size=32,
        lr=3e-3,
        weight_decay=0.0,
        # A byte-level sequence is "correct" when most of its bytes are predicted.
        config_overrides={"correct_threshold": 0.6},
        # Its own GEKO budget (settings.py, docs/tuning.md).
        policy_options={"geko": task_geko_options("stdlib-lm")},
    )


TASK_NAMES = ("mnist1d", "mnist1d-noise20", "mnist1d-noise40", "stdlib-lm", "sft-algo", "sft-stdlib")


def make_task(name: str, scale: str) -> Task:
    """A task by name: ``mnist1d``, ``mnist1d-noise20``, ``mnist1d-noise40``, ``stdlib-lm``,
    and the fine-tuning tasks ``sft-algo`` and ``sft-stdlib`` (``geko_core/bench/sft.py``)."""
    if scale not in ("smoke", "quick", "default"):
        raise ValueError(f"scale must be smoke, quick or default, got {scale!r}")
    if name == "mnist1d":
        return _mnist1d_task(scale, 0.0)
    if name.startswith("mnist1d-noise"):
        rate = int(name.removeprefix("mnist1d-noise"))
        return _mnist1d_task(scale, rate / 100.0)
    if name == "stdlib-lm":
        return _stdlib_lm_task(scale)
    if name in ("sft-algo", "sft-stdlib"):
        return make_sft_task(name, scale)
    raise ValueError(f"unknown task {name!r}; choose " + ", ".join(TASK_NAMES[:-1]) + f" or {TASK_NAMES[-1]}")
