"""Triton statistics kernels against the torch reference, in the CPU interpreter.

The session runs with TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny; the V
tile is forced small in half of the cases so that the online softmax crosses several tiles.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from geko_core import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_INVALID, BUCKET_LIGHT, GekoConfig  # noqa: E402
from geko_core._backend import triton_interpreter_enabled  # noqa: E402
from geko_core.kernels import sample_stats as stats_module  # noqa: E402
from geko_core.kernels.sample_stats import sample_stats_triton  # noqa: E402
from geko_core.reference import sample_stats_reference, token_stats_reference  # noqa: E402

if triton_interpreter_enabled():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
# The kernel and the reference both compute in float32 from the same (possibly low-precision)
# input; only the summation order differs.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-5, rtol=1e-5),
}
DTYPES = list(TOLERANCES)


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch) -> str:
    """Run with the production tile sizes, then with 16-wide V and T tiles."""
    if request.param == "small_tiles":
        monkeypatch.setattr(stats_module, "MAX_BLOCK_V", 16)
        monkeypatch.setattr(stats_module, "MAX_BLOCK_T", 16)
    return request.param


def run(logits3, labels3, *, ignore_index=-100, config=None, per_token=False):
    return sample_stats_triton(
        logits3, labels3, ignore_index=ignore_index, config=config or GekoConfig(), per_token=per_token
    )


def assert_matches_reference(got, logits3, labels3, *, ignore_index=-100, config=None, per_token=False):
    """Exact for discrete outputs and validity, dtype tolerances for floats.

    Discrete outputs are compared with the reference on the same input; float values with
    the reference evaluated in float64 on the same input values (upcasting is exact), which
    measures the kernel's own float32 error. The float32 reference's EL2N formula,
    sqrt(sum p^2 - 2 p_y + 1), cancels for p_y near 1 (about 1e-5 off at p_y = 0.998), so
    it is no yardstick at 1e-5.
    """
    ref = sample_stats_reference(logits3, labels3, ignore_index=ignore_index, config=config, per_token=per_token)
    exact = sample_stats_reference(
        logits3.double(), labels3, ignore_index=ignore_index, config=config, per_token=per_token
    )
    tol = TOLERANCES[logits3.dtype]
    assert got.bucket.dtype == torch.int8 and got.valid_tokens.dtype == torch.int32
    assert got.bucket.device == logits3.device
    assert torch.equal(got.bucket, ref.bucket), (got.bucket, ref.bucket)
    assert torch.equal(got.valid_tokens, ref.valid_tokens)
    assert torch.equal(got.valid, ref.valid)
    assert torch.equal(got.correct.isnan(), ref.correct.isnan())
    for name in FLOAT_FIELDS:
        value = getattr(got, name)
        assert value.dtype == torch.float32 and value.shape == ref.bucket.shape, name
        torch.testing.assert_close(value, getattr(exact, name), equal_nan=True, **tol, msg=name)
    # the fraction of correct tokens is a ratio of small integers: exact
    torch.testing.assert_close(got.correct, ref.correct, equal_nan=True, atol=0, rtol=0)
    if per_token:
        assert got.tokens is not None and ref.tokens is not None
        assert got.tokens.valid.dtype == torch.bool
        assert torch.equal(got.tokens.valid, ref.tokens.valid)
        _, good = token_stats_reference(logits3, labels3, ignore_index=ignore_index)
        assert torch.equal(got.tokens.correct[good], ref.tokens.correct[good])
        for name in FLOAT_FIELDS:
            value, expected = getattr(got.tokens, name), getattr(exact.tokens, name)
            assert value.dtype == torch.float32 and value.shape == labels3.shape
            # tokens that are not valid read as zero
            assert bool((value[~got.tokens.valid] == 0).all()), name
            # the reference's values in a non-finite row are its own accident; compare the rest
            torch.testing.assert_close(value[good], expected[good], **tol, msg=name)
    else:
        assert got.tokens is None


def make_batch(shape, dtype, *, scale=3.0, ignore_fraction=0.2, empty_sample=None):
    num_samples, seq_len, vocab = shape
    logits = (torch.randn(shape) * scale).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (num_samples, seq_len))
    labels[torch.rand(num_samples, seq_len) < ignore_fraction] = -100
    if empty_sample is not None:
        labels[empty_sample] = -100
    return logits, labels.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,empty_sample",
    [
        ((5, 1, 37), None),  # [N, V] classification, odd V
        ((2, 7, 129), 1),  # sequences, several tiles of 16, one sample with no valid token
        ((3, 2, 2), None),  # the smallest vocabulary
    ],
)
def test_matches_reference(dtype, shape, empty_sample, tiles):
    logits, labels = make_batch(shape, dtype, empty_sample=empty_sample)
    got = run(logits, labels)
    assert_matches_reference(got, logits, labels)
    if empty_sample is not None:
        assert got.bucket[empty_sample].item() == BUCKET_INVALID
        assert got.valid_tokens[empty_sample].item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocabulary_wider_than_one_production_tile(dtype):
    logits, labels = make_batch((2, 3, 4500), dtype)  # tiles of 4096: a full one and a ragged one
    logits[0, 0, 4400] = 20.0  # the argmax in the second tile
    labels[0, 0] = 4400
    got = run(logits, labels, per_token=True)
    assert got.tokens.correct[0, 0].item() == 1.0
    assert_matches_reference(got, logits, labels, per_token=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token(dtype, tiles):
    logits, labels = make_batch((2, 7, 129), dtype, empty_sample=0)
    got = run(logits, labels, per_token=True)
    assert_matches_reference(got, logits, labels, per_token=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_logit_invalidates_only_its_sample(bad_value, dtype, tiles):
    logits, labels = make_batch((4, 3, 40), dtype, ignore_fraction=0.0)
    logits[1, 2, 33] = bad_value  # counted token: sample 1 is invalid
    logits[2, 0, 5] = bad_value  # ignored token: sample 2 stays valid
    labels[2, 0] = -100
    got = run(logits, labels, per_token=True)
    assert got.bucket[1].item() == BUCKET_INVALID
    assert got.valid_tokens[1].item() == 3  # as the reference counts: the token is valid, its row is not
    assert all(torch.isnan(getattr(got, name)[1]).item() for name in FLOAT_FIELDS)
    assert bool(got.valid[[0, 2, 3]].all())
    assert_matches_reference(got, logits, labels, per_token=True)


@pytest.mark.parametrize("bad_label", [40, 41, 10**12, -1, -7])
def test_out_of_range_label_invalidates_its_sample_without_reading_out_of_bounds(bad_label, tiles):
    # The logits are a slice of a wider buffer whose other columns are NaN: a read past the
    # row (or at a negative offset) would turn the *valid* samples' values into NaN.
    wide = torch.full((3, 4, 3 * 40), float("nan"), device=DEVICE)
    logits = wide[:, :, 40:80]
    logits.copy_(torch.randn(3, 4, 40))
    labels = torch.randint(0, 40, (3, 4), device=DEVICE)
    labels[0, 1] = bad_label
    got = run(logits, labels, per_token=True)
    assert got.bucket[0].item() == BUCKET_INVALID
    assert got.valid_tokens[0].item() == 3
    assert not got.tokens.valid[0, 1].item()
    assert bool(got.valid[1:].all())
    assert_matches_reference(got, logits, labels, per_token=True)


def test_custom_ignore_index_and_negative_labels(tiles):
    logits, labels = make_batch((3, 5, 23), torch.float32, ignore_fraction=0.0)
    labels[0, :2] = 7  # ignore_index=7: tokens with label 7 are skipped
    labels[1, 3] = -100  # no longer the ignore index: out of range, sample invalid
    got = run(logits, labels, ignore_index=7)
    assert got.bucket[1].item() == BUCKET_INVALID
    assert_matches_reference(got, logits, labels, ignore_index=7)


def test_argmax_ties_take_the_lowest_index(tiles):
    vocab = 50  # with 16-wide tiles: maxima in tiles 0, 1 and 3
    logits = torch.zeros(4, 1, vocab, device=DEVICE)
    for row in range(4):
        logits[row, 0, [3, 20, 49]] = 5.0
    labels = torch.tensor([[3], [20], [49], [0]], device=DEVICE)
    got = run(logits, labels, per_token=True)
    assert got.correct.tolist() == [1.0, 0.0, 0.0, 0.0]
    flat = torch.zeros(2, 1, 7, device=DEVICE)  # all equal: argmax is index 0
    got_flat = run(flat, torch.tensor([[0], [6]], device=DEVICE))
    assert got_flat.correct.tolist() == [1.0, 0.0]
    assert_matches_reference(got, logits, labels, per_token=True)


def test_strided_inputs_column_slice_and_shift_view(tiles):
    batch, seq_len, vocab = 3, 6, 37
    wide = torch.randn(batch, seq_len, vocab + 11, device=DEVICE) * 2
    logits = wide[:, :, 5 : 5 + vocab]  # row stride 48, not V
    labels_wide = torch.randint(0, vocab, (seq_len, batch), device=DEVICE)
    labels_wide[2, 1] = -100
    labels = labels_wide.t()  # non-contiguous labels
    got = run(logits, labels)
    assert_matches_reference(got, logits, labels)

    # the causal shift: token t predicts label t+1, as views
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    assert not shifted_logits.is_contiguous()
    got_shift = run(shifted_logits, shifted_labels, per_token=True)
    ref_shift = sample_stats_reference(logits, labels, shift=True, per_token=True)
    assert torch.equal(got_shift.bucket, ref_shift.bucket)
    torch.testing.assert_close(got_shift.loss, ref_shift.loss, equal_nan=True, atol=1e-5, rtol=1e-5)
    contiguous = run(shifted_logits.contiguous(), shifted_labels.contiguous(), per_token=True)
    for name in FLOAT_FIELDS:  # same values as on a contiguous copy, bit for bit
        assert torch.equal(getattr(got_shift.tokens, name), getattr(contiguous.tokens, name)), name


def test_large_logits_keep_entropy_accurate(tiles):
    # logits around 1e4 (fp32): lse - sum p x would cancel; the kernel measures from the max.
    logits = (torch.randn(2, 3, 64, device=DEVICE) + 1e4).contiguous()
    labels = torch.randint(0, 64, (2, 3), device=DEVICE)
    got = run(logits, labels)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # same softmax, small values
    ref = sample_stats_reference(shifted, labels)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=2e-3, rtol=1e-5)  # x - lse at 1e4 in fp32


def test_bucket_rule_and_config_thresholds_compared_in_float32(tiles):
    # sample 0: 9 of 10 tokens correct; 9/10 == float32(0.9) reaches the default
    # correct_threshold only when compared in float32 (0.9f < 0.9 in double)
    seq_len, vocab = 10, 5
    logits = torch.zeros(4, seq_len, vocab, device=DEVICE)
    logits[:, :, 0] = 4.0  # confidence e^4 / (e^4 + 4) ~ 0.93
    labels = torch.zeros(4, seq_len, dtype=torch.long, device=DEVICE)
    labels[0, 0] = 1  # 9/10 correct
    labels[1, :5] = 1  # 5/10 correct
    labels[2] = 1  # all wrong, confident -> HARD
    logits[3, :, 0] = 0.5  # unsure: confidence ~ 0.29
    labels[3] = 1  # wrong and unsure -> FOCUS
    got = run(logits, labels)
    assert got.correct[0].item() == pytest.approx(0.9)
    assert got.bucket.tolist() == [BUCKET_FREEZE, BUCKET_HARD, BUCKET_HARD, BUCKET_FOCUS]
    assert_matches_reference(got, logits, labels)

    config = GekoConfig(correct_threshold=0.5, freeze_confidence=0.95, hard_confidence=0.2)
    got = run(logits, labels, config=config)
    assert got.bucket.tolist() == [BUCKET_LIGHT, BUCKET_LIGHT, BUCKET_HARD, BUCKET_HARD]
    assert_matches_reference(got, logits, labels, config=config)


def test_empty_inputs():
    empty_samples = run(torch.randn(0, 3, 8, device=DEVICE), torch.zeros(0, 3, dtype=torch.long, device=DEVICE))
    assert empty_samples.loss.shape == (0,) and empty_samples.bucket.shape == (0,)
    no_tokens = run(torch.randn(2, 0, 8, device=DEVICE), torch.zeros(2, 0, dtype=torch.long, device=DEVICE))
    assert no_tokens.bucket.tolist() == [BUCKET_INVALID] * 2
    assert no_tokens.valid_tokens.tolist() == [0, 0]
    assert bool(no_tokens.loss.isnan().all())


def test_int32_labels():
    logits, labels = make_batch((2, 4, 19), torch.float32)
    got = run(logits, labels.to(torch.int32))
    assert_matches_reference(got, logits, labels)


@pytest.mark.parametrize(
    "logits,labels,error,match",
    [
        (torch.randn(4, 8), torch.zeros(4, dtype=torch.long), ValueError, r"\[S, T, V\]"),
        (torch.randn(2, 3, 8).double(), torch.zeros(2, 3, dtype=torch.long), TypeError, "float32, bfloat16 or float16"),
        (torch.randn(2, 3, 8), torch.zeros(2, 3), TypeError, "int64"),
        (torch.randn(2, 3, 8), torch.zeros(3, 2, dtype=torch.long), ValueError, r"\[S, T\]"),
        (torch.randn(2, 8, 3).transpose(1, 2), torch.zeros(2, 3, dtype=torch.long), ValueError, "stride 1 along V"),
        (torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long), ValueError, "at least one class"),
        ("logits", torch.zeros(2, 3, dtype=torch.long), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(logits, labels, error, match):
    with pytest.raises(error, match=match):
        run(logits, labels)


def test_bad_ignore_index_and_config():
    logits, labels = make_batch((1, 2, 5), torch.float32)
    with pytest.raises(TypeError, match="ignore_index"):
        run(logits, labels, ignore_index=-100.0)
    with pytest.raises(TypeError, match="GekoConfig"):
        sample_stats_triton(logits, labels, ignore_index=-100, config={"hard_confidence": 0.5}, per_token=False)


def test_launchers_never_synchronise_with_the_host():
    from geko_core.kernels import cross_entropy

    for module in (stats_module, cross_entropy):
        source = inspect.getsource(module)
        for call in (".item(", ".cpu(", ".tolist(", ".numpy(", "synchronize("):
            assert call not in source, f"{module.__name__} calls {call}"


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CUDA session")
    logits, labels = make_batch((1, 2, 5), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        run(logits, labels)
