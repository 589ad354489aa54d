"""Numerics of the two losses and the statistics on every backend: float64 inputs computed in
float64 (gradcheck on the default backend), gradients of large logits as accurate as torch's,
and -inf logits (a masked vocabulary) as probability 0, as torch treats them.

The session runs the Triton kernels in the CPU interpreter (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from geko_core import BUCKET_INVALID, cross_entropy_with_stats, linear_cross_entropy_with_stats, sample_stats
from geko_core._backend import resolve_backend
from geko_core.cross_entropy import _loss_and_stats
from geko_core.reference import sample_stats_reference

# The Triton interpreter runs the kernels in numpy, which warns about log(0), inf - inf and
# overflows of the masked rows (whose results the kernels then drop, as on the GPU).
pytestmark = [
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

triton_available = True
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - the Triton cases skip
    triton_available = False

# (backend, options): the C++ one-call forward (the default CPU step), the C++ forward with
# per-token values (its own forward and a separate backward kernel), the Triton kernels and the
# reference.
LOSS_PATHS = [
    pytest.param(None, {}, id="cpp-one-call"),
    pytest.param("cpp", {"per_token": True}, id="cpp-per-token"),
    pytest.param("cpp", {"reduction": "per_sample"}, id="cpp-per-sample"),
    pytest.param("triton", {}, id="triton", marks=pytest.mark.skipif(not triton_available, reason="no triton")),
    pytest.param("reference", {}, id="reference"),
]
STAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")


def _batch(shape, dtype=torch.float32, *, scale=3.0, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_every:
        labels.view(-1)[2::ignore_every] = -100
    return logits, labels


def _torch_loss_and_grad(logits, labels, reduction, upstream=None):
    """F.cross_entropy in the logits' own dtype (what a user would compare against) and its
    gradient; ``reduction`` "per_sample": the mean over the sample's valid tokens."""
    valid = labels != -100
    # (an ignored token's row does not count: zeros, since torch's gradient of an ignored row of
    # -inf only is 0 * NaN)
    x = torch.where(valid.unsqueeze(-1), logits.detach(), torch.zeros((), dtype=logits.dtype)).requires_grad_(True)
    vocab = x.shape[-1]
    token = F.cross_entropy(x.reshape(-1, vocab), labels.reshape(-1), reduction="none").reshape(labels.shape)
    if reduction == "sum":
        loss = token.sum()
    elif reduction == "mean":
        loss = token.sum() / valid.sum()
    else:
        per_sample = token.sum(dim=-1) if token.dim() == 2 else token
        count = valid.sum(dim=-1) if token.dim() == 2 else valid.to(token.dtype)
        loss = per_sample / count.clamp(min=1)
    (loss * (1.0 if upstream is None else upstream.to(loss.dtype))).sum().backward()
    return loss.detach(), x.grad


def _our_loss_and_grad(logits, labels, backend, options, upstream=None):
    options = dict(options)
    reduction = options.pop("reduction", "sum")
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(x, labels, backend=backend, reduction=reduction, **options)
    (loss * (1.0 if upstream is None else upstream.to(loss.dtype))).sum().backward()
    return loss.detach(), x.grad, stats, reduction


# -- 1. float64 ------------------------------------------------------------------------------


def test_float64_runs_on_the_float64_path():
    # One path for float64: the reference, which computes in float64 (the compiled kernels
    # accumulate in float32); the Triton backend refuses float64.
    assert resolve_backend("cpu", None, float64=True) == "reference"
    assert resolve_backend("cpu", "cpp", float64=True) == "reference"
    assert resolve_backend("cpu", None, traced=True, float64=True) == "reference"
    assert resolve_backend("cpu", None) == "cpp"
    logits, labels = _batch((3, 4, 9), torch.float64)
    loss, stats, host = _loss_and_stats(
        logits, labels, ignore_index=-100, shift=False, sample_weight=None, reduction="mean", per_token=False,
        config=None, backend=None, inplace_backward=False, segments=None, position_ids=None, num_segments=None,
    )
    assert host is None and stats is not None and loss.dtype == torch.float64  # the Selector's seam takes it too
    expected = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_float64_default_backend(reduction, shift, weighted):
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (3, 4))
    labels[0, 1] = -100
    labels[2, 2] = -100
    weight = torch.rand(3, dtype=torch.float64) + 0.5 if weighted else None

    def fn(x):
        return cross_entropy_with_stats(x, labels, shift=shift, sample_weight=weight, reduction=reduction)[0]

    assert torch.autograd.gradcheck(fn, (logits,))
    flat = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    flat_labels = torch.tensor([0, 6, -100, 3, 2])
    assert torch.autograd.gradcheck(lambda x: cross_entropy_with_stats(x, flat_labels, reduction=reduction)[0], (flat,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
@pytest.mark.parametrize("shift", [False, True])
def test_gradcheck_float64_linear_loss_default_backend(reduction, shift):
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3] = -100
    sample_weight = torch.tensor([0.5, 2.0], dtype=torch.float64)

    def fn(h, w, b):
        return linear_cross_entropy_with_stats(
            h, w, labels, bias=b, shift=shift, sample_weight=sample_weight, reduction=reduction, chunk_size=3
        )[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_float64_statistics_equal_the_reference():
    logits, labels = _batch((4, 6, 33), torch.float64, scale=2.0)
    logits[0, 0, 3] = logits[0, 0].max()  # a tie: the first maximal index counts
    want = sample_stats_reference(logits, labels, per_token=True)
    for got in (sample_stats(logits, labels, per_token=True), cross_entropy_with_stats(logits, labels, per_token=True)[1]):
        assert torch.equal(got.bucket, want.bucket) and torch.equal(got.valid_tokens, want.valid_tokens)
        for field in STAT_FIELDS:
            assert torch.equal(getattr(got, field).nan_to_num(-7), getattr(want, field).nan_to_num(-7)), field
    # the linear loss's statistics are those of its materialised logits
    hidden = torch.randn(4, 6, 5, dtype=torch.float64)
    weight = torch.randn(33, 5, dtype=torch.float64)
    got = linear_cross_entropy_with_stats(hidden, weight, labels)[1]
    want = sample_stats_reference(hidden @ weight.T, labels)
    assert torch.equal(got.bucket, want.bucket) and torch.equal(got.correct, want.correct)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)


def test_float64_torch_samples_to_float64_precision():
    # torch's own float64 samples: ours to float64 rounding, not float32's.
    logits, labels = _batch((6, 40), torch.float64, ignore_every=0)
    x = logits.clone().requires_grad_(True)
    loss, _ = cross_entropy_with_stats(x, labels)
    loss.backward()
    want_loss, want_grad = _torch_loss_and_grad(logits, labels, "mean")
    torch.testing.assert_close(loss, want_loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-12, atol=1e-15)


# -- 2. large logits -------------------------------------------------------------------------


def _relative_error(got, exact):
    """Largest error relative to the element, over the elements float32 can hold normally."""
    exact = exact.double()
    keep = exact.abs() > 1e-30
    return float(((got.double() - exact).abs()[keep] / exact.abs()[keep]).max())


@pytest.mark.parametrize("backend,options", LOSS_PATHS)
@pytest.mark.parametrize("dtype,scale", [
    (torch.float32, 40.0), (torch.float32, 1000.0), (torch.float32, 1e4),
    (torch.bfloat16, 40.0), (torch.bfloat16, 1000.0),
])
def test_large_logit_gradients_as_accurate_as_torch(backend, options, dtype, scale):
    # The logits' softmax in the backward, exp(x - lse), with lse rounded to float32 lost
    # half an ulp of lse (|x| 6e-8) relative in every probability; torch computes from x - max.
    vocab = 96 if backend == "triton" else 1000
    logits, labels = _batch((2, 4, vocab), dtype, scale=scale / 3, ignore_every=3)
    upstream = torch.tensor([0.75, -1.5]) if options.get("reduction") == "per_sample" else None
    reduction = options.get("reduction", "sum")
    _, exact = _torch_loss_and_grad(logits.double(), labels, reduction, upstream)
    _, torch_grad = _torch_loss_and_grad(logits, labels, reduction, upstream)
    _, grad, _, _ = _our_loss_and_grad(logits, labels, backend, options, upstream)
    ours, theirs = _relative_error(grad, exact), _relative_error(torch_grad, exact)
    floor = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -8  # one rounding of the gradient
    assert ours <= 4 * max(theirs, floor), (ours, theirs)


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=pytest.mark.skipif(not triton_available, reason="no triton"))])
@pytest.mark.parametrize("scale", [40.0, 1000.0])
def test_large_logit_gradients_of_the_linear_loss(backend, scale):
    # hidden @ W.T of magnitude ~scale: the gradients of hidden and W against float64 torch on
    # the same inputs, no worse than torch's own float32 path (materialised logits).
    g = torch.Generator().manual_seed(1)
    vocab = 64 if backend == "triton" else 500
    hidden = torch.randn(12, 8, generator=g) * (scale / 8)
    weight = torch.randn(vocab, 8, generator=g)
    labels = torch.randint(0, vocab, (12,), generator=g)

    def grads(fn, dtype):
        h = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        fn(h, w).backward()
        return h.grad, w.grad

    exact = grads(lambda h, w: F.cross_entropy(h @ w.T, labels, reduction="sum"), torch.float64)
    theirs = grads(lambda h, w: F.cross_entropy(h @ w.T, labels, reduction="sum"), torch.float32)
    ours = grads(
        lambda h, w: linear_cross_entropy_with_stats(h, w, labels, reduction="sum", chunk_size=5, backend=backend)[0],
        torch.float32,
    )
    for got, torch_got, want in zip(ours, theirs, exact):
        # matmul rounding dominates both: compare the largest errors relative to the largest entry
        ours_err = float((got.double() - want).abs().max() / want.abs().max())
        torch_err = float((torch_got.double() - want).abs().max() / want.abs().max())
        assert ours_err <= 4 * max(torch_err, 2.0 ** -23), (ours_err, torch_err)


# -- 3. -inf logits ----------------------------------------------------------------------------


def _masked_batch(dtype, vocab=37):
    logits, labels = _batch((3, 4, vocab), dtype, ignore_every=0)
    logits[0, 0, ::3] = float("-inf")  # masked classes in the vector body and the tail
    logits[0, 1, : min(20, vocab - 2)] = float("-inf")  # a whole tile of -inf before any finite value
    labels[0, 1] = vocab - 1
    logits[1, 2, :] = float("-inf")  # a single class left
    logits[1, 2, 5] = 2.0
    labels[1, 2] = 5
    logits[2, 3, 4] = float("-inf")  # the label's own logit: loss +inf, as torch
    labels[2, 3] = 4
    labels[2, 0] = -100
    logits[2, 0, ::2] = float("-inf")  # an ignored token's row: does not count
    return logits, labels


@pytest.mark.parametrize("backend,options", LOSS_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("vocab", [9, 37, 300])
def test_minus_inf_logits_are_probability_zero(backend, options, dtype, vocab, check_stats):
    logits, labels = _masked_batch(dtype, vocab)
    upstream = torch.tensor([0.5, 1.0, 2.0]) if options.get("reduction") == "per_sample" else None
    loss, grad, stats, reduction = _our_loss_and_grad(logits, labels, backend, options, upstream)
    want_loss, want_grad = _torch_loss_and_grad(logits.double(), labels, reduction, upstream)
    assert math.isinf(float(want_loss.sum())) and want_loss.sum() > 0  # torch: the -inf label logit
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)
    assert bool(torch.isfinite(grad).all())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)
    label_position = F.one_hot(labels.clamp(min=0), vocab).bool() & (labels != -100).unsqueeze(-1)
    # exactly 0, not a clamped exponential (the -inf label's own entry is p - 1 = -1 times its scale)
    assert bool((grad[(logits == float("-inf")) & ~label_position] == 0).all())
    # the statistics: the reference's (which treats -inf as probability 0), every sample valid
    check_stats(stats, logits, labels, per_token=bool(options.get("per_token")))
    assert BUCKET_INVALID not in stats.bucket.tolist()
    assert math.isinf(stats.loss[2].item()) and stats.label_prob[2].item() < 1.0
    for field in ("confidence", "label_prob", "correct", "entropy", "el2n"):
        assert bool(torch.isfinite(getattr(stats, field)).all()), field


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not triton_available, reason="no triton")), "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
def test_minus_inf_statistics(backend, dtype, check_stats):
    logits, labels = _masked_batch(dtype, 37)
    got = sample_stats(logits, labels, per_token=True, backend=backend)
    check_stats(got, logits, labels, per_token=True)
    assert got.valid.tolist() == [True, True, True]
    # a row of -inf only has no softmax (torch: NaN): its sample is invalid, as for NaN
    logits[1, 0, :] = float("-inf")
    got = sample_stats(logits, labels, per_token=True, backend=backend)
    check_stats(got, logits, labels, per_token=True)
    assert got.bucket[1].item() == BUCKET_INVALID and got.valid.tolist() == [True, False, True]


@pytest.mark.parametrize("position", [0, 2047, 2048, 4999])
def test_bf16_minus_inf_anywhere_in_a_long_row(position, check_stats):
    # The bf16 max pass reads bits: -inf is 0xff80, the largest "negative" pattern, next to the
    # negative NaNs (which still invalidate; tests/test_stats_cpu.py).
    logits, labels = _batch((2, 3, 5000), torch.bfloat16, ignore_every=0)
    logits[0, 1, position] = float("-inf")
    logits[1, 2] = logits[1, 2] - 100.0  # all negative
    logits[1, 2, position] = float("-inf")
    labels[1, 2] = (position + 1) % 5000
    got = sample_stats(logits, labels, per_token=True, backend="cpp")
    check_stats(got, logits, labels, per_token=True)
    assert BUCKET_INVALID not in got.bucket.tolist()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend,options", LOSS_PATHS)
def test_nan_and_plus_inf_keep_invalidating_their_sample(backend, options, bad):
    logits, labels = _batch((3, 4, 37), ignore_every=0)
    logits[1, 2, 35] = bad
    logits[0, 0, 3] = float("-inf")  # beside a masked class, which does not
    x = logits.clone().requires_grad_(True)
    opts = dict(options)
    reduction = opts.pop("reduction", "sum")
    loss, stats = cross_entropy_with_stats(x, labels, backend=backend, reduction=reduction, **opts)
    assert stats.bucket.tolist()[1] == BUCKET_INVALID and BUCKET_INVALID not in stats.bucket.tolist()[::2]
    assert all(math.isnan(getattr(stats, field)[1].item()) for field in STAT_FIELDS)
    assert math.isnan(float(loss.detach().sum()))


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=pytest.mark.skipif(not triton_available, reason="no triton")), "reference"])
def test_linear_loss_with_a_masking_bias(backend, check_stats):
    # A -inf bias masks classes of the linear loss's logits (its only way to get -inf logits).
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(40, 8, generator=g)
    bias = torch.zeros(40)
    bias[::4] = float("-inf")
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[0, 0] = 1
    labels[1, 1] = 4  # a masked label: loss +inf
    args = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    loss, stats = linear_cross_entropy_with_stats(*args, labels, bias=bias, reduction="sum", chunk_size=3, backend=backend)
    loss.backward()
    h = hidden.double().requires_grad_(True)
    w = weight.double().requires_grad_(True)
    want = F.cross_entropy((h @ w.T + bias.double()).reshape(-1, 40), labels.reshape(-1), reduction="sum")
    want.backward()
    assert math.isinf(float(loss.detach())) and float(loss.detach()) > 0 and math.isinf(float(want.detach()))
    torch.testing.assert_close(args[0].grad.double(), h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args[1].grad.double(), w.grad, rtol=1e-5, atol=1e-5)
    check_stats(stats, (hidden @ weight.T + bias), labels)
    assert BUCKET_INVALID not in stats.bucket.tolist()
