"""Supervised fine-tuning tasks for geko-bench (docs/design.md §6).

Every sample is a byte sequence ``prompt + response`` padded to a fixed length, the response
bytes labelled and the prompt and padding -100 (``sft_data.py``); the loss applies the causal
shift (``sel.loss(logits, labels, idx, shift=True)``), so only the response is trained. Each
sample belongs to a family, and every task has disjoint train, validation and test splits.

* ``sft-algo``: string and number instructions generated from a seed (``len abc=`` → ``3``,
  ``rev abcde=`` → ``edcba``, ...), from a family learned in the first epoch to two never
  learned within the epoch budget (two-digit addition, a hash).
* ``sft-stdlib``: a small byte-level transformer pre-trained on the standard library's source
  (``pretrain.py``, cached on disk after the first run), then fine-tuned on instructions about
  the functions of the same source: whether a ``def`` is private, whether it is a method, its
  parameter count, its name repeated, and its name from its docstring. Validation and test
  functions come from files the pre-training never read.

Metrics (``response_metrics``): exact match of the response (every response token is the
argmax under teacher forcing, which is what greedy decoding reproduces) and response-token
perplexity, overall and per family. Each task runs GEKO with its own settings
(``settings.TASK_GEKO_OPTIONS``, docs/tuning.md).

``python benchmarks/sft_curves.py sft-algo --scale quick`` trains a task with plain full
training and prints the exact match of every family after every epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ByteLM, Task
from .pretrain import PretrainConfig, _byte_lm, pretrained_stdlib_lm
from .settings import task_geko_options
from .sft_data import IGNORE_INDEX, SFTSplit, make_algo_sft, make_stdlib_sft

__all__ = ["make_sft_task", "response_metrics", "sample_responses"]

# --------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def sample_responses(model: nn.Module, split: SFTSplit, *, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``split``: bool ``[N]``, every response token the argmax of the logits at
    the position before it (teacher forcing), and float64 ``[N]``, the summed negative
    log-likelihood of its response tokens."""
    was_training = model.training
    model.eval()
    inputs = torch.from_numpy(split.inputs)
    labels = torch.from_numpy(split.labels)
    exact = np.zeros(len(split), dtype=bool)
    nll = np.zeros(len(split), dtype=np.float64)
    for start in range(0, len(split), batch_size):
        x, y = inputs[start : start + batch_size], labels[start : start + batch_size]
        logits = model(x)[:, :-1].float()
        target = y[:, 1:]
        counted = target != IGNORE_INDEX
        token_nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
        right = (logits.argmax(-1) == target) | ~counted
        exact[start : start + len(x)] = right.all(dim=1).numpy()
        nll[start : start + len(x)] = token_nll.double().sum(dim=1).numpy()
    model.train(was_training)
    return exact, nll


def response_metrics(model: nn.Module, split: SFTSplit, families: tuple[str, ...], *, batch_size: int = 512) -> dict:
    """Exact match and response-token perplexity of a causal LM on a split.

    A response is an exact match when every response token is the argmax of the logits at
    the position before it (teacher forcing), which is exactly when greedy decoding from
    the prompt reproduces it. Perplexity is exp of the mean negative log-likelihood over
    response tokens.

    Returns:
        ``{"exact_match_%", "perplexity", "samples", "families": {name: {the same}}}``.
    """
    exact, nll = sample_responses(model, split, batch_size=batch_size)
    tokens = split.response_tokens

    def figures(mask: np.ndarray) -> dict:
        count = int(mask.sum())
        return {
            "exact_match_%": 100.0 * float(exact[mask].mean()) if count else float("nan"),
            "perplexity": math.exp(nll[mask].sum() / tokens[mask].sum()) if count else float("nan"),
            "samples": count,
        }

    result = figures(np.ones(len(split), dtype=bool))
    result["families"] = {name: figures(split.family == f) for f, name in enumerate(families)}
    return result


# --------------------------------------------------------------------------------------------
# Tasks


#: Per scale: (train, validation, test) samples and epochs. One full-training run with an
#: evaluation per epoch, one thread of the 2-core machine: sft-algo 1 s (smoke), 4 s (quick),
#: 14 s (default); sft-stdlib 1 s, 5 s, 20 s. Quick and default share one pre-trained model
#: (about 2 minutes, once); smoke pre-trains a rough one in a second or two.
_ALGO_SCALES = {"smoke": (480, 160, 160, 2), "quick": (1600, 512, 1024, 4), "default": (3200, 1024, 2048, 6)}
_STDLIB_SCALES = {"smoke": (250, 100, 100, 2), "quick": (1000, 500, 500, 4), "default": (2000, 1000, 1000, 6)}
_PRETRAIN = {"smoke": PretrainConfig(steps=20, batch_size=16), "quick": PretrainConfig(), "default": PretrainConfig()}


def make_sft_task(name: str, scale: str) -> Task:
    """``sft-algo`` or ``sft-stdlib`` at ``smoke``, ``quick`` or ``default`` scale: byte-level
    2-layer transformers (width 64), AdamW with the runner's cosine schedule. The batch sizes
    (16 and 8) give the first epoch enough steps for the easy families to be learned in it
    (measured: with twice the batch they come a good part of an epoch later)."""
    if name == "sft-algo":
        n_train, n_val, n_test, epochs = _ALGO_SCALES[scale]
        data = make_algo_sft(n_train, n_val, n_test)

        def make_model(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            model = ByteLM(data.seq_len)
            # Random positions: with zero-initialised ones the positional families
            # (first, rev, max) were learned about three epochs later (measured).
            nn.init.normal_(model.position, std=0.5)
            return model

        lr, batch_size = 3e-3, 16
    elif name == "sft-stdlib":
        n_train, n_val, n_test, epochs = _STDLIB_SCALES[scale]
        pretrain = _PRETRAIN[scale]
        data = make_stdlib_sft(n_train, n_val, n_test)
        state = pretrained_stdlib_lm(pretrain)

        def make_model(seed: int) -> nn.Module:
            torch.manual_seed(seed)
            model = _byte_lm(pretrain)
            model.load_state_dict(state)
            return model

        lr, batch_size = 3e-3, 8
    else:
        raise ValueError(f"unknown fine-tuning task {name!r}; choose sft-algo or sft-stdlib")

    def detail(model: nn.Module, split: str = "test") -> dict:
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        return response_metrics(model, getattr(data, split), data.families)

    return Task(
        name=name,
        inputs=torch.from_numpy(data.train.inputs),
        targets=torch.from_numpy(data.train.labels),
        make_model=make_model,
        evaluate=lambda model: detail(model, "test")["exact_match_%"],
        metric_name="exact_match_%",
        higher_is_better=True,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        shift=True,
        evaluate_validation=lambda model: detail(model, "validation")["exact_match_%"],
        evaluate_detail=detail,
        families=data.families,
        family=torch.from_numpy(data.train.family),
        policy_options={"geko": task_geko_options(name)},
    )
