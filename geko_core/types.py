"""Result types shared by every statistics backend."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class TokenStats(NamedTuple):
    """Token-level statistics, each ``[S, T]`` (``T = 1`` for ``[N, V]`` logits).

    Ignored tokens (label == ignore_index, or out of range) have ``valid == False`` and
    zero in every float field. Float fields are float32.
    """

    loss: torch.Tensor
    confidence: torch.Tensor
    label_prob: torch.Tensor
    correct: torch.Tensor  # float32, 0.0 or 1.0
    entropy: torch.Tensor
    el2n: torch.Tensor
    valid: torch.Tensor  # bool


class SampleStats(NamedTuple):
    """Per-sample statistics of one pass over the logits (docs/design.md §2), each ``[S]``.

    A sample's value is the mean of its valid tokens' values. A sample with no valid
    token, or with a non-finite logit in a valid token's row, is invalid: its float
    fields are NaN and its bucket is ``BUCKET_INVALID`` (-1).

    Attributes:
        loss: float32, mean cross-entropy.
        confidence: float32, mean max-probability.
        label_prob: float32, mean probability of the label.
        correct: float32, fraction of valid tokens whose argmax (ties: lowest index) is the label.
        entropy: float32, mean softmax entropy (nats).
        el2n: float32, mean ``||softmax - onehot||_2``.
        valid_tokens: int32, number of valid tokens.
        bucket: int8, instant bucket (FREEZE 0, LIGHT 1, FOCUS 2, HARD 3, INVALID -1).
        tokens: the token-level values when ``per_token=True``, else None.
    """

    loss: torch.Tensor
    confidence: torch.Tensor
    label_prob: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor
    el2n: torch.Tensor
    valid_tokens: torch.Tensor
    bucket: torch.Tensor
    tokens: Optional[TokenStats] = None

    @property
    def valid(self) -> torch.Tensor:
        """bool ``[S]``: the sample has statistics."""
        return self.bucket >= 0
