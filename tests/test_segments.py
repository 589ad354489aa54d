"""Packed rows: ``segments=`` / ``position_ids=`` give per-sample statistics, losses and
gradients equal to those of each sample computed alone, on every backend."""

from __future__ import annotations

import math

import pytest
import torch

import geko_core
from geko_core import GekoConfig, Selector, cross_entropy_with_stats, sample_stats

BACKENDS = ("reference", "cpp", "triton")
FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
VOCAB = 13


def packed_batch(rows: list[list[int]], width: int, *, vocab: int = VOCAB, dtype=torch.float32, seed: int = 0, shift: bool = True):
    """Rows of packed samples (lengths per row), padded to ``width`` with segment -1.

    Returns logits [B, width, V], labels [B, width] (a masked prompt token in some samples,
    -100 on padding), segments [B, width], position ids (-1 on padding) and the (row, start,
    length) of every sample in segment order."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(rows)
    logits = (3 * torch.randn(batch, width, vocab, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, (batch, width), generator=generator)
    segments = torch.full((batch, width), -1, dtype=torch.int64)
    positions = torch.full((batch, width), -1, dtype=torch.int64)
    places = []
    k = 0
    for r, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            segments[r, start : start + length] = k
            positions[r, start : start + length] = torch.arange(length)
            if k % 3 == 1 and length > 2:
                labels[r, start + 1] = -100  # a masked prompt token inside a sample
            places.append((r, start, length))
            start += length
            k += 1
        labels[r, start:] = -100
    # Even samples: every token right and confident; odd ones: some tokens right, so that
    # several buckets occur. (With the shift, the label of token t + 1 is made likely at t.)
    sure = (segments % 2 == 0) | (torch.rand(batch, width, generator=generator) < 0.3)
    lag = 1 if shift else 0
    boost = torch.where(sure[:, lag:], 12.0, 0.0).to(dtype)
    safe = labels[:, lag:].clamp(min=0)
    logits[:, : width - lag].scatter_add_(-1, safe.unsqueeze(-1), boost.unsqueeze(-1))
    return logits, labels, segments, positions, places


def alone(tensor: torch.Tensor, place: tuple[int, int, int]) -> torch.Tensor:
    r, start, length = place
    return tensor[r : r + 1, start : start + length]


def assert_equal_stats(packed, singles, *, rtol=2e-6, atol=2e-6):
    assert packed.valid_tokens.tolist() == [int(s.valid_tokens[0]) for s in singles]
    assert packed.bucket.tolist() == [int(s.bucket[0]) for s in singles]
    for name in FLOAT_FIELDS:
        want = torch.cat([getattr(s, name) for s in singles])
        got = getattr(packed, name)
        assert torch.equal(got.isnan(), want.isnan()), name
        if name == "correct":  # a ratio of small integers: exact
            assert torch.equal(got.nan_to_num(-1), want.nan_to_num(-1))
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=name)


ROWS = [[5, 3, 1, 6], [7, 2, 4]]  # a one-token sample: no target with the shift (invalid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [True, False])
def test_packed_statistics_equal_each_sample_alone(backend, shift):
    logits, labels, segments, positions, places = packed_batch(ROWS, width=18, shift=shift)
    got = sample_stats(logits, labels, shift=shift, segments=segments, backend=backend)
    singles = [sample_stats(alone(logits, p), alone(labels, p), shift=shift, backend=backend) for p in places]
    assert len(got.loss) == len(places)
    assert_equal_stats(got, singles)
    assert set(got.bucket.tolist()) >= {0, 2}  # the test data reach several buckets
    if shift:
        assert int(got.bucket[2]) == -1 and int(got.valid_tokens[2]) == 0  # the one-token sample
    # position ids restarting at each sample give the same samples, numbered row-major
    by_position = sample_stats(logits, labels, shift=shift, position_ids=positions, backend=backend)
    assert_equal_stats(by_position, singles)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_low_precision_and_custom_ignore_index(backend):
    logits, labels, segments, _, places = packed_batch([[4, 6, 5]], width=16, dtype=torch.bfloat16, seed=3)
    labels = torch.where(labels == -100, 7, labels)  # ignore_index 7 instead of -100
    labels[0, 2] = 7
    got = sample_stats(logits, labels, shift=True, segments=segments, ignore_index=7, backend=backend)
    singles = [sample_stats(alone(logits, p), alone(labels, p), shift=True, ignore_index=7, backend=backend) for p in places]
    assert_equal_stats(got, singles)


@pytest.mark.parametrize("backend", BACKENDS)
def test_boundary_token_is_no_target(backend):
    """With the shift, the first token of a packed sample is predicted by the previous
    sample's last token: it never counts, whatever its label."""
    logits, labels, segments, _, places = packed_batch([[4, 4, 4]], width=12)
    labels[0] = torch.arange(12) % VOCAB  # every label counts
    shifted = sample_stats(logits, labels, shift=True, segments=segments, per_token=True, backend=backend)
    assert shifted.valid_tokens.tolist() == [3, 3, 3]
    # per-token values stay in row layout; the boundary positions 3 and 7 (predicting labels 4
    # and 8) and the last position of the row count for no sample
    assert shifted.tokens.valid.tolist() == [[True, True, True, False, True, True, True, False, True, True, True]]
    plain = sample_stats(logits, labels, segments=segments, backend=backend)
    assert plain.valid_tokens.tolist() == [4, 4, 4]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_segments(backend):
    logits, labels, segments, _, places = packed_batch([[5, 4, 6]], width=17, seed=5)
    segments = torch.where(segments >= 1, segments + 1, segments)  # sample 1 never occurs
    labels[0, 5:9] = -100  # ... and the sample now numbered 2 has no target
    logits[0, 10, 3] = float("nan")  # a NaN logit in a counted token of the last sample
    logits[0, 1, 2] = float("inf")  # a +inf logit in a counted row of the first sample (-inf would be a masked class)
    got = sample_stats(logits, labels, shift=True, segments=segments, backend=backend)
    assert got.bucket.tolist() == [-1, -1, -1, -1]
    assert got.valid_tokens.tolist()[:3] == [4, 0, 0] and int(got.valid_tokens[3]) == 5
    assert all(math.isnan(float(v)) for v in got.loss)
    # each equals the sample alone
    singles = [sample_stats(alone(logits, p), alone(labels, p), shift=True, backend=backend) for p in places]
    assert [int(s.bucket[0]) for s in singles] == [-1, -1, -1]
    # the finite samples of the same batch stay valid
    finite = logits.clone()
    finite[0, 10, 3] = 0.0
    finite[0, 1, 2] = 0.0
    ok = sample_stats(finite, labels, shift=True, segments=segments, backend=backend)
    assert [b >= 0 for b in ok.bucket.tolist()] == [True, False, False, True]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["per_sample", "sum", "mean"])
def test_packed_loss_and_gradient_equal_each_sample_alone(backend, reduction):
    logits, labels, segments, _, places = packed_batch(ROWS, width=18, seed=1)
    count = len(places)
    weights = torch.linspace(0.5, 2.0, count)
    mix = torch.linspace(1.0, 3.0, count)  # a different gradient weight per sample for "per_sample"
    if backend == "reference":
        logits = logits.double()
    leaf = logits.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(
        leaf, labels, shift=True, segments=segments, sample_weight=weights, reduction=reduction, backend=backend
    )
    (loss * mix if reduction == "per_sample" else loss).sum().backward()

    pieces = [alone(logits, p).clone().requires_grad_(True) for p in places]
    sums, singles = [], []
    for piece, place, w in zip(pieces, places, weights):
        piece_loss, piece_stats = cross_entropy_with_stats(
            piece, alone(labels, place), shift=True, sample_weight=w.reshape(1), reduction="per_sample" if reduction == "per_sample" else "sum",
            backend=backend,
        )
        sums.append(piece_loss.reshape(()))
        singles.append(piece_stats)
    assert_equal_stats(stats, singles)
    total_tokens = sum(int(s.valid_tokens[0]) for s in singles)
    if reduction == "per_sample":
        expected = torch.stack(sums)
        (expected * mix).sum().backward()
    else:
        expected = torch.stack(sums).sum()
        if reduction == "mean":
            expected = expected / total_tokens
        expected.backward()
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    expected_grad = torch.zeros_like(logits)
    for piece, (r, start, length) in zip(pieces, places):
        expected_grad[r, start : start + length] = piece.grad[0]
    torch.testing.assert_close(leaf.grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unweighted_mean_is_torch_cross_entropy_of_the_targets(backend):
    logits, labels, segments, _, places = packed_batch([[6, 5], [9]], width=11, seed=2)
    leaf = logits.clone().requires_grad_(True)
    loss, _ = cross_entropy_with_stats(leaf, labels, shift=True, segments=segments, backend=backend)
    # the targets packed rows count: shifted labels inside one sample
    target = labels[:, 1:].clone()
    target[segments[:, 1:] != segments[:, :-1]] = -100
    target[segments[:, 1:] < 0] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), target.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused():
    logits, labels, segments, positions, _ = packed_batch([[4, 5]], width=10)
    with pytest.raises(ValueError, match="not both"):
        sample_stats(logits, labels, segments=segments, position_ids=positions)
    with pytest.raises(ValueError, match="num_segments needs"):
        sample_stats(logits, labels, num_segments=2)
    with pytest.raises(TypeError, match="segments must be an integer tensor"):
        sample_stats(logits, labels, segments=segments.float())
    with pytest.raises(TypeError, match="segments must be"):
        sample_stats(logits, labels, segments=[0, 1])
    with pytest.raises(ValueError, match="segments shape"):
        sample_stats(logits, labels, segments=segments[:, :-1])
    with pytest.raises(ValueError, match="packed rows"):
        sample_stats(logits[0], labels[0], segments=segments[0])
    with pytest.raises(ValueError, match="out of range for num_segments=1"):
        sample_stats(logits, labels, segments=segments, num_segments=1)
    with pytest.raises(ValueError, match="num_segments must be >= 0"):
        sample_stats(logits, labels, segments=segments, num_segments=-1)
    with pytest.raises(TypeError, match="num_segments must be an int"):
        sample_stats(logits, labels, segments=segments, num_segments=2.0)
    split = segments.clone()
    split[0, 2] = 1  # sample 0 now has two runs
    with pytest.raises(ValueError, match="sample 0 is split into 2 runs"):
        sample_stats(logits, labels, segments=split)
    with pytest.raises(ValueError, match="position_ids start 2 samples but num_segments is 3"):
        sample_stats(logits, labels, position_ids=positions, num_segments=3)
    with pytest.raises(ValueError, match="sample_weight"):
        cross_entropy_with_stats(logits, labels, segments=segments, sample_weight=torch.ones(1))
    # a gap in the numbering is an invalid (empty) sample, not an error
    gapped = torch.where(segments == 1, 2, segments)
    assert sample_stats(logits, labels, segments=gapped).bucket.tolist()[1] == -1


def test_segments_under_torch_compile_match_eager():
    logits, labels, segments, _, places = packed_batch([[4, 5], [6]], width=10, seed=4)
    weights = torch.tensor([1.0, 2.0, 0.5])

    def step(x):
        return cross_entropy_with_stats(x, labels, shift=True, segments=segments, num_segments=3, sample_weight=weights)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # traces the operators and their autograd
    leaf = logits.clone().requires_grad_(True)
    loss, stats = compiled(leaf)
    loss.backward()
    eager_leaf = logits.clone().requires_grad_(True)
    eager_loss, eager_stats = step(eager_leaf)
    eager_loss.backward()
    assert stats.bucket.tolist() == eager_stats.bucket.tolist()
    assert stats.valid_tokens.tolist() == eager_stats.valid_tokens.tolist()
    torch.testing.assert_close(stats.confidence, eager_stats.confidence)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad)


def test_selector_scores_each_packed_sample():
    logits, labels, segments, positions, places = packed_batch([[5, 4], [6, 3]], width=10, seed=6)
    idx = torch.tensor([7, 2, 9, 4])
    selector = Selector(12, policy="uniform", epochs=1, seed=0)
    with pytest.raises(ValueError, match="out of range for num_segments=4"):
        selector.loss(logits, labels, idx, shift=True, segments=segments + 1)
    assert selector.table.field("visits").sum() == 0 and selector.metrics()["forwarded"] == 0
    loss = selector.loss(logits.clone().requires_grad_(True), labels, idx, shift=True, segments=segments)
    assert loss.dim() == 0
    expected = sample_stats(logits, labels, shift=True, segments=segments)
    table = selector.table
    visits = table.field("visits")
    assert visits[idx.numpy()].tolist() == [1, 1, 1, 1] and int(visits.sum()) == 4
    # one visit cannot pass the Q gate (q <= 0.65 < 0.8): an instant FREEZE is stored as LIGHT
    assert table.field("bucket")[idx.numpy()].tolist() == [1 if b == 0 else b for b in expected.bucket.tolist()]
    torch.testing.assert_close(torch.from_numpy(table.field("last_loss")[idx.numpy()]), expected.loss)
    assert selector.metrics()["backpropagated_tokens"] == int(expected.valid_tokens.sum())
    observed = selector.observe(torch.tensor([0, 1, 3, 5]), logits, labels, shift=True, position_ids=positions)
    assert observed.valid_tokens.tolist() == expected.valid_tokens.tolist()
