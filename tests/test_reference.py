"""The oracle itself, checked against independent torch formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from geko_core import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_INVALID, BUCKET_LIGHT, GekoConfig
from geko_core.reference import sample_stats_reference


def test_classification_matches_torch():
    logits = torch.randn(64, 37) * 3
    labels = torch.randint(0, 37, (64,))
    st = sample_stats_reference(logits, labels)
    torch.testing.assert_close(st.loss, F.cross_entropy(logits, labels, reduction="none"))
    p = logits.softmax(-1)
    torch.testing.assert_close(st.confidence, p.max(-1).values)
    torch.testing.assert_close(st.label_prob, p.gather(1, labels[:, None]).squeeze(1))
    assert torch.equal(st.correct, (logits.argmax(-1) == labels).float())
    torch.testing.assert_close(st.entropy, -(p * p.log()).sum(-1))
    torch.testing.assert_close(st.el2n, (p - F.one_hot(labels, 37)).norm(dim=-1))
    assert st.valid_tokens.dtype == torch.int32 and bool((st.valid_tokens == 1).all())


def test_argmax_ties_take_lowest_index():
    logits = torch.zeros(2, 5)
    st = sample_stats_reference(logits, torch.tensor([0, 3]))
    assert st.correct.tolist() == [1.0, 0.0]


def test_sequences_masked_mean_and_shift():
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    labels[0, 2:] = -100
    labels[2, :] = -100
    st = sample_stats_reference(logits, labels, per_token=True)
    tok = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").reshape(B, T)
    assert st.valid_tokens.tolist() == [2, 6, 0]
    torch.testing.assert_close(st.loss[:2], torch.stack([tok[0, :2].mean(), tok[1].mean()]))
    assert math.isnan(st.loss[2].item()) and st.bucket[2].item() == BUCKET_INVALID
    assert st.tokens is not None and st.tokens.loss.shape == (B, T)
    shifted = sample_stats_reference(logits, labels, shift=True)
    direct = sample_stats_reference(logits[:, :-1].contiguous(), labels[:, 1:].contiguous())
    torch.testing.assert_close(shifted.loss, direct.loss, equal_nan=True)


def test_nonfinite_row_and_out_of_range_label_invalidate_only_their_sample():
    logits = torch.randn(4, 8)
    logits[1, 3] = float("nan")
    labels = torch.tensor([1, 2, 99, -100])
    st = sample_stats_reference(logits, labels)
    assert st.bucket.tolist()[1:] == [BUCKET_INVALID] * 3
    assert st.bucket[0].item() != BUCKET_INVALID


def test_instant_bucket_rule():
    cfg = GekoConfig()
    # rows: confident right, unsure right, unsure wrong, confident wrong
    logits = torch.tensor([[10.0, 0, 0], [1.0, 0.8, 0], [0.2, 0.4, 0.3], [10.0, 0, 0]])
    labels = torch.tensor([0, 0, 2, 1])
    st = sample_stats_reference(logits, labels, config=cfg)
    assert st.bucket.tolist() == [BUCKET_FREEZE, BUCKET_LIGHT, BUCKET_FOCUS, BUCKET_HARD]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs(dtype):
    logits = torch.randn(16, 50)
    labels = torch.randint(0, 50, (16,))
    st = sample_stats_reference(logits.to(dtype), labels)
    ref = sample_stats_reference(logits.to(dtype).float(), labels)
    torch.testing.assert_close(st.loss, ref.loss)
    assert st.loss.dtype == torch.float32
