"""What every geko-bench task is built from: the ``Task`` record the runner trains, and the two
small models of the tasks (a 1-D CNN, a byte-level causal transformer)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["ByteLM", "CNN1D", "Task"]


@dataclass
class Task:
    """Everything a run needs, independent of the selection policy.

    ``inputs``/``targets`` are the training tensors indexed by dataset index;
    ``evaluate(model)`` returns the held-out (test) metric; ``higher_is_better`` says its
    direction. ``evaluate_validation(model)`` returns the same metric on a validation split
    disjoint from the training and test data, the one to tune defaults on.

    Language tasks with ``shift=True`` hold ``targets`` aligned with ``inputs`` (-100 on the
    prompt and the padding) and train with the causal shift,
    ``sel.loss(logits, targets, idx, shift=True)``. Fine-tuning tasks also give per-family
    figures (``evaluate_detail(model, split)`` with split ``"validation"`` or ``"test"``) and
    each training sample's family.
    """

    name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    make_model: Callable[[int], nn.Module]
    evaluate: Callable[[nn.Module], float]
    metric_name: str
    higher_is_better: bool
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    config_overrides: dict = field(default_factory=dict)
    #: per-policy constructor options for this task (policy name -> options)
    policy_options: dict = field(default_factory=dict)
    #: targets are aligned with inputs and the loss applies the causal shift
    shift: bool = False
    #: the metric on the validation split (None: the task has none)
    evaluate_validation: Callable[[nn.Module], float] | None = None
    #: ``(model, split) -> dict`` with the metric, perplexity and per-family figures
    evaluate_detail: Callable[..., dict] | None = None
    #: family names, and each training sample's family id (int64 ``[N]``)
    families: tuple[str, ...] = ()
    family: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])


class CNN1D(nn.Module):
    def __init__(self, length: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2, stride=2), nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2, stride=2), nn.ReLU(),
        )
        self.head = nn.Linear(width * math.ceil(math.ceil(length / 2) / 2), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class ByteLM(nn.Module):
    """A small causal transformer over bytes."""

    def __init__(self, seq_len: int, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.embed(tokens) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))
