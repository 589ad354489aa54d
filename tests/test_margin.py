"""The margin rule of "correct" (``GekoConfig.correct_margin``): a sample is correct only when
the lowest label probability over its valid tokens reaches the margin; every backend gives the
reference's buckets exactly, packed rows included, and the table stores the same bucket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import geko_core
from geko_core import GekoConfig, Selector, cross_entropy_with_stats, sample_stats
from geko_core._backend import load_compiled_core
from geko_core.reference import instant_bucket

BACKENDS = ("reference", "cpp", "triton")
FREEZE, LIGHT, FOCUS, HARD, INVALID = 0, 1, 2, 3, -1


def confident_batch(samples: int = 12, tokens: int = 6, vocab: int = 9, seed: int = 0):
    """Sequences whose tokens are all argmax-right (after the shift), with label
    probabilities spread over about [0.35, 0.99]; labels of some tokens ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(samples, tokens, vocab, generator=generator)
    labels = torch.randint(0, vocab, (samples, tokens), generator=generator)
    labels[::4, 2] = -100
    boost = 3.0 + 5.0 * torch.rand(samples, tokens - 1, generator=generator)
    safe = labels[:, 1:].clamp(min=0)
    logits[:, :-1].scatter_add_(-1, safe.unsqueeze(-1), boost.unsqueeze(-1))
    # an ignored token's row may be anything: give it a very unsure prediction
    logits[::4, 1] = 0.0
    return logits, labels


def expected_buckets(logits, labels, config: GekoConfig) -> list[int]:
    """The rule written out from torch's softmax, independently of the library."""
    probs = torch.softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    valid = target != -100
    label_prob = probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    right = probs.argmax(-1) == target
    out = []
    for s in range(len(labels)):
        v = valid[s]
        confidence = probs[s].amax(-1)[v].mean().float()
        accuracy = right[s][v].double().mean().float()
        correct = bool(accuracy >= config.correct_threshold) and bool(label_prob[s][v].min() >= np.float32(config.correct_margin))
        if correct:
            out.append(FREEZE if confidence > np.float32(config.freeze_confidence) else LIGHT)
        else:
            out.append(HARD if confidence > np.float32(config.hard_confidence) else FOCUS)
    return out


def test_config_field():
    assert GekoConfig().correct_margin == 0.0 == load_compiled_core().Config().correct_margin
    config = GekoConfig(correct_margin=0.9)
    assert GekoConfig.from_dict(config.to_dict()) == config and config.to_cpp().correct_margin == 0.9
    from geko_core._inputs import config_from_values, config_values

    assert config_from_values(config_values(config)) == config
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="correct_margin"):
            GekoConfig(correct_margin=bad)
    with pytest.raises(TypeError, match="correct_margin"):
        GekoConfig(correct_margin="0.5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_rule(backend):
    logits, labels = confident_batch()
    config = GekoConfig(correct_margin=0.8)
    want = expected_buckets(logits, labels, config)
    # the data exercise the rule: the margin makes some right sequences wrong
    plain = sample_stats(logits, labels, shift=True, backend=backend)
    assert set(plain.bucket.tolist()) <= {FREEZE, LIGHT} and float(plain.correct.min()) == 1.0
    assert {FREEZE, LIGHT} & set(want) and {FOCUS, HARD} & set(want)
    got = sample_stats(logits, labels, shift=True, config=config, backend=backend)
    assert got.bucket.tolist() == want
    reference = sample_stats(logits, labels, shift=True, config=config, backend="reference")
    assert torch.equal(got.bucket, reference.bucket) and torch.equal(got.valid_tokens, reference.valid_tokens)
    assert torch.equal(got.correct, plain.correct)  # the margin changes the bucket, not the accuracy
    _, fused = cross_entropy_with_stats(logits, labels, shift=True, config=config, backend=backend)
    assert fused.bucket.tolist() == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [0.3, 0.6, 0.95, 1.0])
def test_margins_and_a_lower_accuracy_threshold(backend, margin):
    logits, labels = confident_batch(seed=1)
    logits[1, 3] = -logits[1, 3]  # one token wrong in sample 1: below an accuracy of 1
    config = GekoConfig(correct_margin=margin, correct_threshold=0.75)
    got = sample_stats(logits, labels, shift=True, config=config, backend=backend)
    assert got.bucket.tolist() == expected_buckets(logits, labels, config)


def test_default_is_the_accuracy_rule():
    logits, labels = confident_batch(seed=2)
    for backend in BACKENDS:
        default = sample_stats(logits, labels, shift=True, backend=backend)
        zero = sample_stats(logits, labels, shift=True, config=GekoConfig(correct_margin=0.0), backend=backend)
        assert torch.equal(default.bucket, zero.bucket)
        assert default.bucket.tolist() == expected_buckets(logits, labels, GekoConfig())


def test_instant_bucket_needs_the_minimum():
    ones = torch.ones(3)
    with pytest.raises(ValueError, match="minimum label probability"):
        instant_bucket(ones, ones, GekoConfig(correct_margin=0.5))
    got = instant_bucket(ones, ones, GekoConfig(correct_margin=0.5), torch.tensor([0.4, 0.5, 0.9]))
    assert got.tolist() == [HARD, FREEZE, FREEZE]


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_follow_the_margin(backend):
    logits, labels = confident_batch(samples=6, tokens=5, seed=3)
    config = GekoConfig(correct_margin=0.8)
    singles = sample_stats(logits, labels, shift=True, config=config, backend=backend)
    # two rows of three samples each, in order
    packed_logits = logits.reshape(2, 15, -1)
    packed_labels = labels.reshape(2, 15)
    segments = torch.arange(6).repeat_interleave(5).reshape(2, 15)
    got = sample_stats(packed_logits, packed_labels, shift=True, segments=segments, config=config, backend=backend)
    assert got.bucket.tolist() == singles.bucket.tolist()
    assert {FOCUS, HARD} & set(got.bucket.tolist())


def test_the_table_stores_the_margin_bucket():
    logits, labels = confident_batch(seed=4)
    config = GekoConfig(correct_margin=0.8, freeze_q=0.0)  # no Q gate: the table bucket is the instant one
    selector = Selector(len(labels), policy="uniform", epochs=1, seed=0, config=config)
    idx = torch.arange(len(labels))
    stats = selector.observe(idx, logits, labels, shift=True)
    selector.metrics()  # applies the pending statistics
    want = expected_buckets(logits, labels, config)
    assert stats.bucket.tolist() == want
    assert selector.table.field("bucket").tolist() == want
    # without the margin the same batch is stored correct everywhere
    plain = Selector(len(labels), policy="uniform", epochs=1, seed=0, config=GekoConfig(freeze_q=0.0))
    plain.observe(idx, logits, labels, shift=True)
    plain.metrics()
    assert set(plain.table.field("bucket").tolist()) <= {FREEZE, LIGHT}
