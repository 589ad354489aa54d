"""What only the Triton statistics kernels do, in the CPU interpreter: the online softmax
across V tiles (forced to 16 wide here, so that tiny vocabularies cross several), the
launcher's own input handling, no host synchronisation. The contracts every backend meets
(the Triton one included, with its production tiles) are in test_contracts.py.

The session runs with TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay tiny.
"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("triton")

from geko_core import BUCKET_INVALID, GekoConfig  # noqa: E402
from geko_core._backend import triton_interpreter_enabled  # noqa: E402
from geko_core.kernels import sample_stats as stats_module  # noqa: E402
from geko_core.stats import sample_stats_triton  # noqa: E402
from geko_core.reference import sample_stats_reference  # noqa: E402

if triton_interpreter_enabled():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The kernel and the reference both compute in float32 from the same (possibly
# low-precision) input; only the summation order differs.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch) -> str:
    """Run with the production tile sizes, then with 16-wide V and T tiles."""
    if request.param == "small_tiles":
        monkeypatch.setattr(stats_module, "MAX_BLOCK_V", 16)
        monkeypatch.setattr(stats_module, "MAX_BLOCK_T", 16)
    return request.param


@pytest.fixture
def small_tiles(monkeypatch) -> None:
    """16-wide V and T tiles (the production tiles run in test_contracts.py)."""
    monkeypatch.setattr(stats_module, "MAX_BLOCK_V", 16)
    monkeypatch.setattr(stats_module, "MAX_BLOCK_T", 16)


def run(logits3, labels3, *, ignore_index=-100, config=None, per_token=False):
    return sample_stats_triton(
        logits3, labels3, ignore_index=ignore_index, config=config or GekoConfig(), per_token=per_token
    )


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
        ((5, 1, 37), None),  # [N, V] classification, odd V: three tiles, the last ragged
        ((2, 7, 129), 1),  # sequences, nine tiles, one sample with no valid token
        ((3, 2, 2), None),  # the smallest vocabulary
    ],
)
def test_online_softmax_across_tiles(check_stats, small_tiles, dtype, shape, empty_sample):
    logits, labels = make_batch(shape, dtype, empty_sample=empty_sample)
    got = run(logits, labels, per_token=True)
    check_stats(got, logits, labels, per_token=True, **TOL)
    if empty_sample is not None:
        assert got.bucket[empty_sample].item() == BUCKET_INVALID
        assert got.valid_tokens[empty_sample].item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_vocabulary_wider_than_one_production_tile(check_stats, dtype):
    logits, labels = make_batch((2, 3, 4500), dtype)  # tiles of 4096: a full one and a ragged one
    logits[0, 0, 4400] = 20.0  # the argmax in the second tile
    labels[0, 0] = 4400
    got = run(logits, labels, per_token=True)
    assert got.tokens.correct[0, 0].item() == 1.0
    check_stats(got, logits, labels, per_token=True, **TOL)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])  # -inf is probability 0: tests/test_numerics.py
def test_nonfinite_logit_across_tiles(check_stats, small_tiles, bad_value):
    # in the last, ragged tile of a row (each dtype's reading is a contract: test_contracts.py)
    logits, labels = make_batch((4, 3, 40), torch.float32, ignore_fraction=0.0)
    logits[1, 2, 33] = bad_value  # counted token: sample 1 is invalid
    logits[2, 0, 5] = bad_value  # ignored token: sample 2 stays valid
    labels[2, 0] = -100
    got = run(logits, labels, per_token=True)
    assert got.bucket[1].item() == BUCKET_INVALID
    assert got.valid_tokens[1].item() == 3  # as the reference counts: the token is valid, its row is not
    assert all(torch.isnan(getattr(got, name)[1]).item() for name in FLOAT_FIELDS)
    assert bool(got.valid[[0, 2, 3]].all())
    check_stats(got, logits, labels, per_token=True, **TOL)


@pytest.mark.parametrize("bad_label", [40, 41, 10**12, -1, -7])
def test_out_of_range_label_invalidates_its_sample_without_reading_out_of_bounds(check_stats, bad_label, tiles):
    # What the kernels do with CUDA tensors (sample_stats refuses such labels on CPU tensors).
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
    check_stats(got, logits, labels, per_token=True, **TOL)


def test_custom_ignore_index_and_negative_labels(check_stats, tiles):
    logits, labels = make_batch((3, 5, 23), torch.float32, ignore_fraction=0.0)
    labels[0, :2] = 7  # ignore_index=7: tokens with label 7 are skipped
    labels[1, 3] = -100  # no longer the ignore index: out of range, sample invalid
    got = run(logits, labels, ignore_index=7)
    assert got.bucket[1].item() == BUCKET_INVALID
    check_stats(got, logits, labels, ignore_index=7, **TOL)


def test_argmax_ties_across_tiles_take_the_lowest_index(check_stats, small_tiles):
    vocab = 50  # maxima in tiles 0, 1 and 3
    logits = torch.zeros(4, 1, vocab, device=DEVICE)
    for row in range(4):
        logits[row, 0, [3, 20, 49]] = 5.0
    labels = torch.tensor([[3], [20], [49], [0]], device=DEVICE)
    got = run(logits, labels, per_token=True)
    assert got.correct.tolist() == [1.0, 0.0, 0.0, 0.0]
    flat = torch.zeros(2, 1, 7, device=DEVICE)  # all equal: argmax is index 0
    got_flat = run(flat, torch.tensor([[0], [6]], device=DEVICE))
    assert got_flat.correct.tolist() == [1.0, 0.0]
    check_stats(got, logits, labels, per_token=True, **TOL)


def test_strided_inputs_across_tiles(check_stats, small_tiles):
    batch, seq_len, vocab = 3, 6, 37
    wide = torch.randn(batch, seq_len, vocab + 11, device=DEVICE) * 2
    logits = wide[:, :, 5 : 5 + vocab]  # row stride 48, not V
    labels_wide = torch.randint(0, vocab, (seq_len, batch), device=DEVICE)
    labels_wide[2, 1] = -100
    labels = labels_wide.t()  # non-contiguous labels
    got = run(logits, labels)
    check_stats(got, logits, labels, **TOL)

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


def test_large_logits_keep_entropy_accurate_across_tiles(small_tiles):
    # logits around 1e4 (fp32): lse - sum p x would cancel; the kernel measures from the max.
    logits = (torch.randn(2, 3, 64, device=DEVICE) + 1e4).contiguous()
    labels = torch.randint(0, 64, (2, 3), device=DEVICE)
    got = run(logits, labels)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # same softmax, small values
    ref = sample_stats_reference(shifted, labels)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=2e-3, rtol=1e-5)  # x - lse at 1e4 in fp32


def test_int32_labels(check_stats):
    logits, labels = make_batch((2, 4, 19), torch.float32)
    got = run(logits, labels.to(torch.int32))
    check_stats(got, logits, labels, **TOL)


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
