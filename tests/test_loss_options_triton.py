"""The loss options (geko_core/loss_options.py) in the Triton kernels, in the interpreter:
the statistics kernel's option token loss, log-sum-exp and statistics of ``z``, and the
backward's gradient, against ``options_token_loss_reference`` and its autograd."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from geko_core import GekoConfig  # noqa: E402
from geko_core._backend import triton_interpreter_enabled  # noqa: E402
from geko_core.kernels import sample_stats as stats_module  # noqa: E402
from geko_core.kernels.cross_entropy import launch_cross_entropy_backward  # noqa: E402
from geko_core.kernels.sample_stats import OPTION_LOSS_FIELD, launch_sample_stats, launch_token_stats  # noqa: E402
from geko_core.loss_options import LossOptions, options_token_loss_reference, transformed_logits  # noqa: E402
from geko_core.reference import sample_stats_reference  # noqa: E402
from geko_core.stats import _BUCKET_CODES  # noqa: E402

if triton_interpreter_enabled():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
# (dtype, forward tolerance, gradient tolerance) against the reference in float64 on the same
# (exactly upcast) values: the kernels compute in float32; the gradient is rounded once to
# the logits' dtype.
DTYPES = [
    pytest.param(torch.float32, dict(atol=2e-5, rtol=2e-5), dict(atol=1e-6, rtol=2e-5), id="fp32"),
    pytest.param(torch.bfloat16, dict(atol=2e-5, rtol=2e-5), dict(atol=1e-5, rtol=8e-3), id="bf16"),
]
CONFIG = GekoConfig()
THRESHOLDS = (CONFIG.correct_threshold, CONFIG.freeze_confidence, CONFIG.hard_confidence, CONFIG.correct_margin)


def class_weight(vocab: int) -> torch.Tensor:
    return (torch.rand(vocab) * 1.5 + 0.25).to(DEVICE)


def option_cases(vocab: int) -> dict[str, LossOptions]:
    return {
        "temperature": LossOptions(temperature=0.7),
        "softcap": LossOptions(softcap=4.0),
        "label_smoothing": LossOptions(label_smoothing=0.1),
        "z_loss": LossOptions(z_loss=1e-3),
        "class_weight": LossOptions(class_weight=class_weight(vocab)),
        "all": LossOptions(1.3, 4.0, 0.2, 1e-2, class_weight(vocab)),
    }


def kwargs(options: LossOptions) -> dict:
    return dict(options._asdict())


@pytest.fixture(params=["one_tile", "small_tiles"])
def tiles(request, monkeypatch) -> str:
    # small tiles: the online softmax (and the smoothing sum) crosses several V tiles
    if request.param == "small_tiles":
        monkeypatch.setattr(stats_module, "MAX_BLOCK_V", 16)
    return request.param


def make_batch(shape, dtype, *, scale=3.0, ignore_fraction=0.25):
    num_samples, seq_len, vocab = shape
    logits = (torch.randn(shape) * scale).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (num_samples, seq_len))
    labels[torch.rand(num_samples, seq_len) < ignore_fraction] = -100
    labels[0, 0] = 1  # every sample has a counted token in the first position at least
    return logits, labels.to(DEVICE)


def reference(logits, labels, options, ignore_index=-100):
    """(token loss, lse, d sum(scale * loss) / d logits) of the reference in float64."""
    weight = options.class_weight
    options64 = options._replace(class_weight=None if weight is None else weight.double())
    x = logits.detach().double().requires_grad_(True)
    vocab = logits.shape[-1]
    loss, lse, _ = options_token_loss_reference(x.reshape(-1, vocab), labels.reshape(-1), options64, ignore_index=ignore_index)
    return loss.reshape(labels.shape), lse.reshape(labels.shape), x


def reference_gradient(x, loss, scale):
    (grad,) = torch.autograd.grad((loss * scale.double()).sum(), x)
    return grad


def run(logits, labels, options, ignore_index=-100):
    """Forward (both kernels) and backward under ``options``."""
    sample_values, valid_tokens, bucket, token_values, valid, lse = launch_sample_stats(
        logits, labels, ignore_index=ignore_index, write_lse=True, thresholds=THRESHOLDS, buckets=_BUCKET_CODES, **kwargs(options)
    )
    scale = torch.rand(labels.shape, device=DEVICE)
    grad = launch_cross_entropy_backward(
        logits, labels, lse, scale, torch.empty_like(logits), ignore_index=ignore_index, **kwargs(options)
    )
    return sample_values, valid_tokens, bucket, token_values, valid, lse, scale, grad


def assert_statistics_of_z(logits, labels, options, sample_values, valid_tokens, bucket, token_values, fwd_tol):
    """The statistics are those of the reference on z (the transformed logits, float32)."""
    ref = sample_stats_reference(transformed_logits(logits, options), labels, per_token=True, config=CONFIG)
    valid = ref.tokens.valid
    for row, name in enumerate(FIELDS):
        expected = getattr(ref.tokens, name)
        torch.testing.assert_close(torch.where(valid, token_values[row], 0.0), torch.where(valid, expected, 0.0), **fwd_tol)
        got_mean = sample_values[row]
        if name == "correct":  # a ratio of small integers: exact
            assert torch.equal(got_mean.isnan(), ref.correct.isnan())
            assert torch.equal(torch.nan_to_num(got_mean), torch.nan_to_num(ref.correct))
        else:
            torch.testing.assert_close(got_mean, getattr(ref, name), equal_nan=True, **fwd_tol)
    assert torch.equal(token_values[3][valid], ref.tokens.correct[valid])
    assert torch.equal(valid_tokens, ref.valid_tokens)
    assert torch.equal(bucket, ref.bucket)


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("name", ["temperature", "softcap", "label_smoothing", "z_loss", "class_weight", "all"])
def test_options_match_the_reference(dtype, fwd_tol, grad_tol, name, tiles):
    shape = (3, 4, 37)  # V not a multiple of the tile; 3 tiles of 16 with small_tiles
    logits, labels = make_batch(shape, dtype)
    options = option_cases(shape[2])[name]
    sample_values, valid_tokens, bucket, token_values, valid, lse, scale, grad = run(logits, labels, options)
    ref_loss, ref_lse, x = reference(logits, labels, options)

    assert token_values.shape == (7, *labels.shape) and lse.dtype == torch.float64
    torch.testing.assert_close(token_values[OPTION_LOSS_FIELD].double(), ref_loss, **fwd_tol)
    assert bool((token_values[OPTION_LOSS_FIELD][labels == -100] == 0).all())
    torch.testing.assert_close(lse, ref_lse, **fwd_tol)
    if name in ("temperature", "softcap"):  # l is the statistics' -log p_y of z: the same value
        assert torch.equal(token_values[OPTION_LOSS_FIELD], token_values[0])
    assert_statistics_of_z(logits, labels, options, sample_values, valid_tokens, bucket, token_values, fwd_tol)

    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), reference_gradient(x, ref_loss, scale), **grad_tol)
    assert bool((grad[labels == -100] == 0).all())


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", DTYPES)
def test_large_logits(dtype, fwd_tol, grad_tol, softcap, tiles):
    # |x| ~ 50: lse ~ 50, z-loss ~ 2500 zeta; relative tolerances on those
    logits, labels = make_batch((2, 3, 41), dtype, scale=50.0)
    options = LossOptions(0.9, softcap, 0.1, 1e-4, class_weight(41))
    sample_values, valid_tokens, bucket, token_values, valid, lse, scale, grad = run(logits, labels, options)
    ref_loss, ref_lse, x = reference(logits, labels, options)
    tol = dict(atol=1e-4, rtol=2e-5)
    torch.testing.assert_close(token_values[OPTION_LOSS_FIELD].double(), ref_loss, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    assert_statistics_of_z(logits, labels, options, sample_values, valid_tokens, bucket, token_values, tol)
    torch.testing.assert_close(grad.double(), reference_gradient(x, ref_loss, scale), **grad_tol)


@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_minus_inf_logits_stay_masked(softcap, smoothing, tiles):
    # -inf logits (a masked vocabulary) have probability 0 under temperature and soft-capping;
    # with label smoothing their -log p is +inf, so is the token loss (as the reference)
    logits, labels = make_batch((2, 3, 40), torch.float32, ignore_fraction=0.0)
    logits[0, 1, :20] = float("-inf")  # more than a whole small tile before any finite value
    logits[1, 2, 7] = float("-inf")
    labels[0, 1], labels[1, 2] = 30, 3
    options = LossOptions(0.8, softcap, smoothing, 1e-3, class_weight(40))
    sample_values, valid_tokens, bucket, token_values, valid, lse, scale, grad = run(logits, labels, options)
    ref_loss, ref_lse, x = reference(logits, labels, options)
    option_loss = token_values[OPTION_LOSS_FIELD]
    assert torch.equal(torch.isinf(option_loss), torch.isinf(ref_loss)) and torch.equal(option_loss.isnan(), ref_loss.isnan())
    assert bool(torch.isinf(option_loss[0, 1])) == (smoothing > 0)
    finite = torch.isfinite(ref_loss)
    torch.testing.assert_close(option_loss.double()[finite], ref_loss[finite], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    assert bool(torch.isfinite(lse).all())
    assert_statistics_of_z(logits, labels, options, sample_values, valid_tokens, bucket, token_values, dict(atol=2e-5, rtol=2e-5))
    expected = reference_gradient(x, ref_loss, scale)
    assert bool(torch.isfinite(grad).all())
    torch.testing.assert_close(grad.double(), expected, atol=1e-6, rtol=2e-5)
    if smoothing == 0.0:
        assert bool((grad[0, 1, :20] == 0).all())


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", DTYPES)
def test_two_classes(dtype, fwd_tol, grad_tol):
    logits, labels = make_batch((3, 5, 2), dtype)
    options = LossOptions(0.6, 2.0, 0.3, 1e-2, class_weight(2))
    sample_values, valid_tokens, bucket, token_values, valid, lse, scale, grad = run(logits, labels, options)
    ref_loss, ref_lse, x = reference(logits, labels, options)
    torch.testing.assert_close(token_values[OPTION_LOSS_FIELD].double(), ref_loss, **fwd_tol)
    torch.testing.assert_close(lse, ref_lse, **fwd_tol)
    assert_statistics_of_z(logits, labels, options, sample_values, valid_tokens, bucket, token_values, fwd_tol)
    torch.testing.assert_close(grad.double(), reference_gradient(x, ref_loss, scale), **grad_tol)


def test_custom_ignore_index_and_out_of_range_label():
    logits, labels = make_batch((2, 4, 21), torch.float32, ignore_fraction=0.0)
    labels[0, 1] = 5
    options = LossOptions(1.5, 3.0, 0.1, 1e-3, class_weight(21))
    *_, token_values, valid, lse, scale, grad = run(logits, labels, options, ignore_index=5)
    ref_loss, ref_lse, x = reference(logits, labels, options, ignore_index=5)
    torch.testing.assert_close(token_values[OPTION_LOSS_FIELD].double(), ref_loss, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double(), reference_gradient(x, ref_loss, scale), atol=1e-6, rtol=2e-5)
    assert bool((grad[0, 1] == 0).all()) and not bool(valid[0, 1])
    # an out-of-range label: not valid, zero loss and gradient row (the reference has no such label)
    labels[1, 2] = 21
    *_, token_values, valid, lse, scale, grad = run(logits, labels, options, ignore_index=5)
    assert not bool(valid[1, 2]) and token_values[OPTION_LOSS_FIELD][1, 2].item() == 0.0
    assert bool((grad[1, 2] == 0).all())


def test_options_that_change_nothing_give_the_plain_numbers_bit_for_bit(tiles):
    # unit class weights take the option path (its own compiled kernel) with w = 1: every
    # statistic, the lse and the gradient are the plain kernel's to the bit, and l = -log p_y
    logits, labels = make_batch((2, 3, 37), torch.bfloat16)
    plain = launch_token_stats(logits, labels, ignore_index=-100, write_lse=True)
    ones = torch.ones(37, device=DEVICE)
    weighted = launch_token_stats(logits, labels, ignore_index=-100, write_lse=True, class_weight=ones)
    assert plain[0].shape[0] == 6 and weighted[0].shape[0] == 7
    assert torch.equal(weighted[0][:6], plain[0]) and torch.equal(weighted[0][OPTION_LOSS_FIELD], plain[0][0])
    assert torch.equal(weighted[1], plain[1]) and torch.equal(weighted[2], plain[2]) and torch.equal(weighted[3], plain[3])
    scale = torch.rand(labels.shape, device=DEVICE)
    grad_plain = launch_cross_entropy_backward(logits, labels, plain[3], scale, torch.empty_like(logits), ignore_index=-100)
    grad_ones = launch_cross_entropy_backward(
        logits, labels, plain[3], scale, torch.empty_like(logits), ignore_index=-100, class_weight=ones
    )
    assert torch.equal(grad_plain, grad_ones)
    # the defaults spelled out are the plain launch
    spelled = launch_token_stats(
        logits, labels, ignore_index=-100, write_lse=True, temperature=1.0, softcap=None, label_smoothing=0.0, z_loss=0.0
    )
    assert spelled[0].shape[0] == 6 and torch.equal(spelled[0], plain[0]) and torch.equal(spelled[3], plain[3])


def test_statistics_without_lse_under_options():
    logits, labels = make_batch((2, 3, 19), torch.float32)
    options = LossOptions(softcap=2.0, label_smoothing=0.3)
    token_values, valid, bad, lse = launch_token_stats(logits, labels, ignore_index=-100, write_lse=False, **kwargs(options))
    assert lse is None and token_values.shape == (7, 2, 3)
    ref_loss, _, _ = reference(logits, labels, options)
    torch.testing.assert_close(token_values[OPTION_LOSS_FIELD].double(), ref_loss, atol=2e-5, rtol=2e-5)


BAD_OPTIONS = [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-30.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
    (dict(z_loss=-1e-4), ValueError, "z_loss"),
    (dict(z_loss=float("inf")), ValueError, "z_loss"),
    (dict(z_loss=None), TypeError, "z_loss"),
    (dict(class_weight=[1.0] * 9), TypeError, "class_weight"),
    # (class weights made on the logits' device by the test, except the last)
    (dict(class_weight=lambda d: torch.ones(9, dtype=torch.float64, device=d)), TypeError, "class_weight"),
    (dict(class_weight=lambda d: torch.ones(8, device=d)), ValueError, r"class_weight must have shape \[9\]"),
    (dict(class_weight=lambda d: torch.ones(9, 1, device=d)), ValueError, "class_weight"),
    (dict(class_weight=lambda d: torch.ones(18, device=d)[::2]), ValueError, "contiguous"),
    (dict(class_weight=lambda d: torch.ones(9, device="meta")), ValueError, "class_weight is on meta"),
]


@pytest.mark.parametrize("bad,error,match", BAD_OPTIONS)
def test_bad_options_are_refused(bad, error, match):
    logits, labels = make_batch((1, 2, 9), torch.float32)
    if callable(bad.get("class_weight")):
        bad = dict(class_weight=bad["class_weight"](DEVICE))
    with pytest.raises(error, match=match):
        launch_token_stats(logits, labels, ignore_index=-100, write_lse=True, **bad)
    with pytest.raises(error, match=match):
        launch_sample_stats(
            logits, labels, ignore_index=-100, write_lse=True, thresholds=THRESHOLDS, buckets=_BUCKET_CODES, **bad
        )
    lse = torch.zeros(labels.shape, dtype=torch.float64, device=DEVICE)
    grad = torch.full_like(logits, 7.0)
    with pytest.raises(error, match=match):
        launch_cross_entropy_backward(logits, labels, lse, torch.ones(labels.shape, device=DEVICE), grad, ignore_index=-100, **bad)
    assert bool((grad == 7.0).all())  # nothing written
