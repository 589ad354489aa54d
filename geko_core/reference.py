"""The torch reference: the oracle for every kernel, test and benchmark baseline.

Plain, readable torch. Inputs are assumed validated by the public API
(``geko_core.stats``); the reference nevertheless gives an out-of-range label (neither
``ignore_index`` nor in ``[0, V)``) the meaning the GPU kernels give it, which never read out
of bounds: the token is bad and its sample invalid, so the two agree on any input.
"""

from __future__ import annotations

import torch

from .config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_INVALID, BUCKET_LIGHT, GekoConfig, resolve_config
from .types import SampleStats, TokenStats

__all__ = ["as_samples", "instant_bucket", "sample_stats_reference", "token_stats_reference"]


def as_samples(
    logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """View logits as ``[S, T, V]`` and labels as ``[S, T]`` (``T = 1`` for ``[N, V]``).

    ``shift=True`` applies the causal-LM shift (token t predicts label t+1): views only,
    no copy.
    """
    if logits.dim() == 2:
        if shift:
            raise ValueError("shift=True needs [B, T, V] logits and [B, T] labels, got 2-D logits")
        return logits.unsqueeze(1), labels.unsqueeze(1)
    if shift:
        return logits[:, :-1, :], labels[:, 1:]
    return logits, labels


def token_stats_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100
) -> tuple[TokenStats, torch.Tensor]:
    """Token statistics of ``[S, T, V]`` logits and ``[S, T]`` labels.

    ``-inf`` logits (a masked vocabulary) are probability 0, as in ``F.cross_entropy``: a
    ``-inf`` label logit gives loss ``+inf`` and label probability 0.

    Returns:
        (TokenStats, good): ``good`` is bool ``[S, T]``, False where the token's row holds a
        NaN or ``+inf`` logit, or only ``-inf`` logits, or its label is out of range (not
        ignore_index, not in [0, V)). Such a token makes its sample invalid.
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype)
    vocab = x.shape[-1]
    labels = labels.to(torch.int64)
    in_range = (labels >= 0) & (labels < vocab)
    counted = labels != ignore_index
    valid = counted & in_range
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    # x < inf is False for NaN and +inf; a row of -inf only has no softmax (NaN in torch).
    good = (x < float("inf")).all(dim=-1) & (x > float("-inf")).any(dim=-1) & (in_range | ~counted)

    lse = torch.logsumexp(x, dim=-1)
    x_label = x.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(x, dim=-1)
    loss = lse - x_label
    confidence = probs.amax(dim=-1)
    label_prob = torch.exp(x_label - lse)
    correct = (x.argmax(dim=-1) == safe_labels).to(compute_dtype)  # argmax: first maximal index
    # p x with p = 0 for -inf logits is 0 (not 0 * -inf = NaN)
    entropy = lse - torch.where(probs > 0, probs * x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=-1)
    # ||p - onehot(y)||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2, with 1 - p_y summed from the
    # other classes: the textbook form sum p^2 - 2 p_y + 1 cancels catastrophically when p_y -> 1.
    others = probs.scatter(-1, safe_labels.unsqueeze(-1), 0.0)
    el2n = torch.sqrt(others.sum(dim=-1) ** 2 + (others * others).sum(dim=-1))

    def tok(value: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, value, torch.zeros_like(value)).to(torch.float32)

    stats = TokenStats(
        loss=tok(loss),
        confidence=tok(confidence),
        label_prob=tok(label_prob),
        correct=tok(correct),
        entropy=tok(entropy),
        el2n=tok(el2n),
        valid=valid,
    )
    return stats, good


def instant_bucket(
    confidence: torch.Tensor,
    correct: torch.Tensor,
    config: GekoConfig,
    min_label_prob: torch.Tensor | None = None,
) -> torch.Tensor:
    """Instant bucket (int8) from confidence and correct fraction; NaN confidence -> INVALID.

    A sample is correct when ``correct >= correct_threshold`` and, with a margin
    (``config.correct_margin > 0``), when also ``min_label_prob >= correct_margin``:
    ``min_label_prob`` is then the per-sample minimum of the label probability over the
    sample's valid tokens (float32), and required. Thresholds compare in float32.

    Raises:
        ValueError: a margin in the config and no ``min_label_prob``.
    """
    is_correct = correct >= config.correct_threshold
    if config.correct_margin > 0.0:
        if min_label_prob is None:
            raise ValueError(
                "GekoConfig.correct_margin > 0 needs the per-sample minimum label probability, "
                "which this statistics path does not compute"
            )
        is_correct = is_correct & (min_label_prob >= config.correct_margin)
    bucket = torch.where(
        is_correct,
        torch.where(confidence > config.freeze_confidence, BUCKET_FREEZE, BUCKET_LIGHT),
        torch.where(confidence > config.hard_confidence, BUCKET_HARD, BUCKET_FOCUS),
    )
    bucket = torch.where(torch.isnan(confidence), BUCKET_INVALID, bucket)
    return bucket.to(torch.int8)


def sample_stats_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    per_token: bool = False,
    config: GekoConfig | None = None,
) -> SampleStats:
    """Per-sample statistics (docs/design.md §2) in plain torch.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, any float dtype.
        labels: ``[N]`` or ``[B, T]``, integer.
        ignore_index: label value of tokens to skip.
        shift: apply the causal-LM shift (3-D only).
        per_token: also return the token-level values.
        config: thresholds of the instant bucket.

    Returns:
        SampleStats with one value per sample (``S = N`` or ``B``).
    """
    config = resolve_config(config)
    logits3, labels3 = as_samples(logits, labels, shift=shift)
    tokens, good = token_stats_reference(logits3, labels3, ignore_index=ignore_index)
    valid_tokens = tokens.valid.sum(dim=1)
    counted = labels3 != ignore_index
    bad = (~good & counted).any(dim=1) | (valid_tokens == 0)
    denom = valid_tokens.clamp(min=1).to(torch.float64)

    def mean(value: torch.Tensor) -> torch.Tensor:
        total = torch.where(tokens.valid, value.to(torch.float64), torch.zeros((), dtype=torch.float64, device=value.device)).sum(dim=1)
        out = (total / denom).to(torch.float32)
        return torch.where(bad, torch.full_like(out, float("nan")), out)

    confidence = mean(tokens.confidence)
    correct = mean(tokens.correct)
    min_label_prob = None
    if config.correct_margin > 0.0:
        inf = torch.full((), float("inf"), dtype=torch.float32, device=labels3.device)
        min_label_prob = torch.where(tokens.valid, tokens.label_prob, inf).amin(dim=1) if labels3.shape[1] else inf.expand(labels3.shape[0])
    return SampleStats(
        loss=mean(tokens.loss),
        confidence=confidence,
        label_prob=mean(tokens.label_prob),
        correct=correct,
        entropy=mean(tokens.entropy),
        el2n=mean(tokens.el2n),
        valid_tokens=valid_tokens.to(torch.int32),
        bucket=instant_bucket(confidence, correct, config, min_label_prob),
        tokens=tokens if per_token else None,
    )
