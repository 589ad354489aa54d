"""The contracts of ``sample_stats`` and ``cross_entropy_with_stats``, each stated once and run
over every backend through the ``backend`` fixture: the torch reference, the compiled C++
kernels and the Triton kernels (in the CPU interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 for the session, so shapes stay small).

What a single backend does beyond these contracts is tested in its own file:
test_stats_cpu.py (large shapes, the binding), test_triton_stats.py and
test_triton_cross_entropy.py (V tiles, the launchers), test_reference.py (the oracle's own
rules), test_loss.py (gradcheck, float64 gradients on C++).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from geko_core import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_INVALID, BUCKET_LIGHT, GekoConfig
from geko_core._backend import backend_status, triton_interpreter_enabled
from geko_core.cross_entropy import cross_entropy_with_stats
from geko_core.reference import sample_stats_reference
from geko_core._inputs import MAX_VOCAB
from geko_core.stats import sample_stats
from geko_core.types import SampleStats

BACKENDS = ("reference", "cpp", "triton")
KERNELS = ("cpp", "triton")  # the fused backends; the reference is plain torch
FLOAT_FIELDS = SampleStats._fields[:6]


def _usable(name: str) -> str:
    status = backend_status()[name]
    if not status.available:
        pytest.skip(f"backend {name!r} cannot run here: {status.reason}")
    if name == "triton" and not triton_interpreter_enabled():
        pytest.skip("the contracts use CPU tensors: the Triton backend needs TRITON_INTERPRET=1 (tests/conftest.py)")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every statistics backend that can run here."""
    return _usable(request.param)


@pytest.fixture(params=KERNELS)
def kernel_backend(request) -> str:
    """The fused backends (compiled C++, Triton)."""
    return _usable(request.param)


def make_inputs(shape, dtype=torch.float32, *, scale=3.0, ignore_every=0):
    logits = (torch.randn(*shape) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return logits, labels


def dtype_id(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


# One classification shape with long odd rows (vector body and tail on the CPU), one of
# sequences, and the smallest vocabulary.
SHAPES = [(6, 1001), (2, 7, 129), (3, 2)]
LOW_AND_SINGLE_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


# -- sample_stats ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION, ids=dtype_id)
def test_stats_match_reference(backend, check_stats, shape, dtype):
    logits, labels = make_inputs(shape, dtype, ignore_every=7)
    got = sample_stats(logits, labels, per_token=True, backend=backend)
    check_stats(got, logits, labels, per_token=True)


def test_float64_logits(backend, check_stats):
    logits, labels = make_inputs((2, 7, 129), torch.float64, ignore_every=7)
    if backend == "triton":  # the kernels read float32, bfloat16 and float16 only
        with pytest.raises(TypeError, match="float64 logits run on the 'cpp' and 'reference' backends"):
            sample_stats(logits, labels, backend=backend)
        return
    check_stats(sample_stats(logits, labels, per_token=True, backend=backend), logits, labels, per_token=True)


def stats_by_definition(logits3, labels3, ignore_index=-100):
    """The statistics written out with torch's own functions, in float64 (independent of the
    reference implementation)."""
    x = logits3.double()
    samples, tokens, vocab = x.shape
    valid = labels3 != ignore_index
    target = torch.where(valid, labels3, 0)
    p = x.softmax(-1)
    per_token = {
        "loss": F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), reduction="none").reshape(samples, tokens),
        "confidence": p.amax(-1),
        "label_prob": p.gather(-1, target[..., None])[..., 0],
        "correct": (x.argmax(-1) == target).double(),
        "entropy": torch.special.entr(p).sum(-1),
        "el2n": (p - F.one_hot(target, vocab)).norm(dim=-1),
    }
    count = valid.sum(1)
    return {name: (value * valid).sum(1) / count for name, value in per_token.items()}, count


@pytest.mark.parametrize("shape", [(8, 37), (3, 4, 11)], ids=["classification", "sequences"])
def test_stats_follow_their_definitions(backend, shape):
    logits, labels = make_inputs(shape)
    if len(shape) == 3:
        labels[0, 2:] = -100
    got = sample_stats(logits, labels, backend=backend)
    logits3, labels3 = (logits[:, None], labels[:, None]) if len(shape) == 2 else (logits, labels)
    expected, count = stats_by_definition(logits3, labels3)
    assert got.valid_tokens.tolist() == count.tolist()
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, name).double(), expected[name], rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_peaked_and_flat_distributions(backend, check_stats, scale):
    logits, labels = make_inputs((6, 101), scale=scale)
    labels[::2] = logits[::2].argmax(-1)  # confident and correct rows reach FREEZE / LIGHT
    check_stats(sample_stats(logits, labels, backend=backend), logits, labels)


def test_ignored_tokens_and_samples_without_valid_tokens(backend, check_stats):
    logits, labels = make_inputs((4, 5, 50))
    labels[labels == 7] = 8
    labels[0] = -100  # no valid token
    labels[1, 3:] = -100
    labels[2, ::2] = 7  # ignored with ignore_index=7 below
    got = sample_stats(logits, labels, per_token=True, backend=backend)
    check_stats(got, logits, labels, per_token=True)
    assert got.valid_tokens.tolist() == [0, 3, 5, 5]
    assert got.bucket[0].item() == BUCKET_INVALID and math.isnan(got.loss[0].item())
    assert got.valid.tolist() == [False, True, True, True]
    for field in FLOAT_FIELDS:
        assert bool((getattr(got.tokens, field)[~got.tokens.valid] == 0).all()), field

    custom = labels.clone()
    custom[custom == -100] = 7
    custom[2, 1::2] = 1
    got_custom = sample_stats(logits, custom, ignore_index=7, backend=backend)
    check_stats(got_custom, logits, custom, ignore_index=7)
    assert got_custom.valid_tokens.tolist() == [0, 3, 2, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_shift_scores_each_token_against_the_next_label(backend, check_stats, dtype):
    logits, labels = make_inputs((2, 6, 61), dtype, ignore_every=5)
    shifted = sample_stats(logits, labels, shift=True, per_token=True, backend=backend)
    check_stats(shifted, logits, labels, shift=True, per_token=True)
    assert shifted.tokens.loss.shape == (2, 5)
    direct = sample_stats(logits[:, :-1].contiguous(), labels[:, 1:].contiguous(), backend=backend)
    assert torch.equal(shifted.bucket, direct.bucket)
    for field in FLOAT_FIELDS:  # the same computation on the same values
        torch.testing.assert_close(getattr(shifted, field), getattr(direct, field), rtol=0, atol=0, equal_nan=True)


# The Triton interpreter runs the kernels in numpy, which warns about inf - inf and overflows.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])  # -inf is probability 0: tests/test_numerics.py
@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION, ids=dtype_id)
def test_non_finite_logit_invalidates_only_its_sample(backend, check_stats, bad, dtype):
    logits, labels = make_inputs((3, 4, 37), dtype)
    logits[1, 2, 35] = bad  # a counted token
    logits[2, 0, 3] = bad  # an ignored token: does not count
    labels[2, 0] = -100
    got = sample_stats(logits, labels, per_token=True, backend=backend)
    check_stats(got, logits, labels, per_token=True)
    assert got.bucket[1].item() == BUCKET_INVALID and got.valid.tolist() == [True, False, True]
    assert all(math.isnan(getattr(got, field)[1].item()) for field in FLOAT_FIELDS)
    assert got.valid_tokens.tolist() == [4, 4, 3]  # the token counts; its row does not


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_finite_values_and_masked_vocabulary(backend, check_stats):
    logits, labels = make_inputs((4, 1001))
    logits[0, 100] = float("nan")
    logits[1, 16] = float("-inf")  # a masked class: probability 0
    logits[2, 500:] = -1e30  # masked vocabulary: finite, contributes nothing
    labels[2] = 3
    logits[3, 0] = 3e38
    logits[3, 1] = -3e38
    got = sample_stats(logits, labels, backend=backend)
    check_stats(got, logits, labels)
    assert got.valid.tolist() == [False, True, True, True]


def test_argmax_ties_take_the_lowest_index(backend, check_stats):
    logits = torch.zeros(5, 1001)
    logits[2, [17, 900]] = 5.0  # far apart
    logits[3, [999, 1000]] = 5.0  # at the end of the row
    logits[4, [3, 20, 49]] = 5.0
    labels = torch.tensor([0, 3, 900, 999, 20])
    got = sample_stats(logits, labels, per_token=True, backend=backend)
    assert got.correct.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    check_stats(got, logits, labels, per_token=True)
    tiny = sample_stats(torch.zeros(2, 2), torch.tensor([0, 1]), backend=backend)
    assert tiny.correct.tolist() == [1.0, 0.0]


def test_instant_bucket_rule(backend):
    # rows: confident right, unsure right, unsure wrong, confident wrong
    logits = torch.tensor([[10.0, 0, 0], [1.0, 0.8, 0], [0.2, 0.4, 0.3], [10.0, 0, 0]])
    labels = torch.tensor([0, 0, 2, 1])
    got = sample_stats(logits, labels, backend=backend)
    assert got.bucket.tolist() == [BUCKET_FREEZE, BUCKET_LIGHT, BUCKET_FOCUS, BUCKET_HARD]


def test_bucket_thresholds_follow_config_compared_in_float32(backend, check_stats):
    # sample 0: 9 of 10 tokens correct; 9/10 == float32(0.9) reaches a correct_threshold of
    # 0.9 only when compared in float32 (0.9f < 0.9 in double)
    logits = torch.zeros(4, 10, 5)
    logits[:, :, 0] = 4.0  # confidence e^4 / (e^4 + 4) ~ 0.93
    labels = torch.zeros(4, 10, dtype=torch.long)
    labels[0, 0] = 1  # 9/10 correct
    labels[1, :5] = 1  # 5/10 correct
    labels[2] = 1  # all wrong, confident -> HARD
    logits[3, :, 0] = 0.5  # unsure: confidence ~ 0.29
    labels[3] = 1  # wrong and unsure -> FOCUS
    got = sample_stats(logits, labels, config=GekoConfig(correct_threshold=0.9), backend=backend)
    assert got.correct[0].item() == pytest.approx(0.9)
    assert got.bucket.tolist() == [BUCKET_FREEZE, BUCKET_HARD, BUCKET_HARD, BUCKET_FOCUS]
    config = GekoConfig(correct_threshold=0.5, freeze_confidence=0.95, hard_confidence=0.2)
    got = sample_stats(logits, labels, config=config, backend=backend)
    assert got.bucket.tolist() == [BUCKET_LIGHT, BUCKET_LIGHT, BUCKET_HARD, BUCKET_HARD]

    logits, labels = make_inputs((9, 40), scale=4.0)
    labels[::3] = logits[::3].argmax(-1)
    config = GekoConfig(freeze_confidence=0.5, hard_confidence=0.2)
    check_stats(sample_stats(logits, labels, config=config, backend=backend), logits, labels, config=config)


def test_empty_batches(backend):
    empty = sample_stats(torch.randn(0, 10), torch.zeros(0, dtype=torch.int64), per_token=True, backend=backend)
    assert empty.loss.shape == (0,) and empty.bucket.shape == (0,) and empty.tokens.loss.shape == (0, 1)
    no_tokens = sample_stats(torch.randn(3, 0, 10), torch.zeros(3, 0, dtype=torch.int64), backend=backend)
    assert no_tokens.valid_tokens.tolist() == [0, 0, 0] and no_tokens.bucket.tolist() == [BUCKET_INVALID] * 3
    assert bool(no_tokens.loss.isnan().all())
    one = sample_stats(torch.randn(2, 1, 10), torch.zeros(2, 1, dtype=torch.int64), shift=True, backend=backend)
    assert one.bucket.tolist() == [BUCKET_INVALID] * 2


def test_strided_inputs(backend, check_stats):
    wide = torch.randn(8, 150) * 3
    view = wide[::2, 7:108]  # row stride 300, starting mid-row
    assert view.stride() == (300, 1)
    labels = torch.randint(0, 101, (4,))
    check_stats(sample_stats(view, labels, per_token=True, backend=backend), view, labels, per_token=True)

    seq = (torch.randn(2, 5, 120) * 2)[:, :, 10:110]  # [B, T, V] slice of a wider vocabulary
    seq_labels = torch.randint(0, 100, (5, 2)).t()  # non-contiguous labels
    seq_labels[1, 2] = -100
    check_stats(sample_stats(seq, seq_labels, backend=backend), seq, seq_labels)
    check_stats(sample_stats(seq, seq_labels, shift=True, backend=backend), seq, seq_labels, shift=True)

    transposed = (torch.randn(37, 6) * 3).t()  # stride(-1) != 1: copied once, never modified
    before = transposed.clone()
    labels = torch.randint(0, 37, (6,))
    check_stats(sample_stats(transposed, labels, backend=backend), transposed, labels)
    assert torch.equal(transposed, before)


def test_label_dtypes_and_logits_that_require_grad(backend):
    logits, labels = make_inputs((3, 2, 20))
    logits.requires_grad_(True)
    base = sample_stats(logits, labels, backend=backend)
    assert not base.loss.requires_grad
    for dtype in (torch.int32, torch.int16, torch.uint8):
        other = sample_stats(logits, labels.to(dtype), backend=backend)
        assert torch.equal(other.bucket, base.bucket)
        torch.testing.assert_close(other.loss, base.loss, rtol=0, atol=0)


def test_largest_vocabulary(backend, check_stats):
    logits = torch.randn(1, MAX_VOCAB)
    labels = torch.tensor([MAX_VOCAB - 1])
    logits[0, MAX_VOCAB - 1] = 50.0
    got = sample_stats(logits, labels, backend=backend)
    check_stats(got, logits, labels)
    assert got.correct.tolist() == [1.0]


def test_large_logits_keep_entropy_accurate(kernel_backend):
    # Logits around 1e4: lse - sum p x would cancel in float32; the kernels measure from the
    # row maximum. (The reference is plain torch and does cancel: about 4e-4 off.)
    logits = torch.randn(2, 3, 64) + 1e4
    labels = torch.randint(0, 64, (2, 3))
    got = sample_stats(logits, labels, backend=kernel_backend)
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # the same softmax, small values
    ref = sample_stats_reference(shifted.double(), labels)
    torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, ref.loss, atol=2e-3, rtol=1e-5)  # x - lse at 1e4 in float32


def test_out_of_range_labels_are_refused_on_cpu_tensors(backend):
    logits, labels = make_inputs((3, 4, 10))
    labels[2, 3] = 10
    with pytest.raises(ValueError, match=r"label 10 at \(sample, token\) \(2, 3\) is outside \[0, 10\)"):
        sample_stats(logits, labels, backend=backend)
    labels[2, 3] = -3
    with pytest.raises(ValueError, match="label -3"):
        sample_stats(logits, labels, backend=backend)
    labels[2, 3] = -100
    sample_stats(logits, labels, backend=backend)
    labels[1, 0] = 99  # dropped by the shift: not checked
    sample_stats(logits, labels, shift=True, backend=backend)
    with pytest.raises(ValueError, match="label 99"):
        sample_stats(logits, labels, backend=backend)


def test_bad_inputs_are_refused_at_the_door(backend):
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    bad_calls = [
        (TypeError, "logits must be float32, bfloat16, float16 or float64, got torch.int64", (torch.randint(0, 3, (4, 10)), labels), {}),
        (TypeError, "labels must be an integer tensor, got torch.float32", (logits, labels.float()), {}),
        (TypeError, "labels must be an integer tensor, got torch.bool", (logits, labels.bool()), {}),
        (TypeError, "logits must be a torch.Tensor", (logits.numpy(), labels), {}),
        (TypeError, "labels must be a torch.Tensor, got list", (logits, [1, 2, 3, 4]), {}),
        (TypeError, "ignore_index must be an int, got float", (logits, labels), {"ignore_index": 1.5}),
        (TypeError, "ignore_index must be an int, got bool", (logits, labels), {"ignore_index": True}),
        (TypeError, "shift must be a bool, got int", (logits, labels), {"shift": 1}),
        (TypeError, "per_token must be a bool, got NoneType", (logits, labels), {"per_token": None}),
        (TypeError, "config must be a geko_core.GekoConfig", (logits, labels), {"config": {"freeze_confidence": 0.9}}),
        (ValueError, r"labels shape \(3,\) does not match logits shape \(4, 10\)", (logits, labels[:3]), {}),
        (ValueError, "does not match", (logits.reshape(2, 2, 10), labels), {}),
        (ValueError, r"logits must be \[N, V\] or \[B, T, V\] \(2-D or 3-D\), got shape \(1, 2, 2, 10\)",
         (logits.reshape(1, 2, 2, 10), labels.reshape(1, 2, 2)), {}),
        (ValueError, r"vocabulary size \(logits.shape\[-1\]\) must be in \[2, 262144\], got 1",
         (torch.randn(4, 1), torch.zeros(4, dtype=torch.int64)), {}),
        (ValueError, "vocabulary size", (torch.empty(1, MAX_VOCAB + 1), torch.zeros(1, dtype=torch.int64)), {}),
        (ValueError, "shift=True needs", (logits, labels), {"shift": True}),
        (ValueError, "labels is on meta but logits is on cpu; they must be on the same device", (logits, labels.to("meta")), {}),
        (ValueError, "backend must be one of None, 'triton', 'cpp', 'reference', got 'cuda'", (logits, labels), {"backend": "cuda"}),
    ]
    for error, message, args, kwargs in bad_calls:
        with pytest.raises(error, match=message):
            sample_stats(*args, **{"backend": backend, **kwargs})
        with pytest.raises(error, match=message):
            cross_entropy_with_stats(*args, **{"backend": backend, **kwargs})


# -- cross_entropy_with_stats ------------------------------------------------------------------


def torch_loss(logits, labels, *, ignore_index=-100, shift=False, weight=None, reduction="mean"):
    """The documented loss written with F.cross_entropy (float32 compute)."""
    x = logits.float()
    if shift:
        x, labels = x[:, :-1], labels[:, 1:]
    if x.dim() == 2:
        x, labels = x.unsqueeze(1), labels.unsqueeze(1)
    samples, tokens, vocab = x.shape
    token_loss = F.cross_entropy(
        x.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).reshape(samples, tokens)
    valid = labels != ignore_index
    w = torch.ones(samples) if weight is None else weight.float()
    if reduction == "none":
        return (w[:, None] * token_loss).reshape(labels.shape if logits.dim() == 3 else -1)
    if reduction == "per_sample":
        return w * token_loss.sum(1) / valid.sum(1).clamp(min=1)
    total = (w[:, None] * token_loss).sum()
    return total if reduction == "sum" else total / valid.sum()


def loss_and_grad(fn, logits):
    """(loss, d(loss . upstream)/d logits, stats) with a non-uniform upstream gradient."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.0)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, stats


# Tolerances by logits dtype: (loss, gradient atol, gradient rtol). The loss is float32 from
# the input values; the gradient is rounded once to the logits' dtype, as torch's own is.
CE_TOLERANCES = {
    torch.float32: (1e-5, 1e-6, 1e-5),
    torch.bfloat16: (1e-5, 8e-3, 8e-3),
    torch.float16: (1e-5, 1e-6, 2e-3),
}
CE_SHAPES = [
    pytest.param((6, 101), False, id="6x101"),
    pytest.param((2, 7, 129), True, id="2x7x129-shift"),
    pytest.param((2, 3, 2), False, id="2x3x2"),
]
# Every reduction in float32; the low-precision gradients (the dtype changes how the kernels
# write it, not how the reduction scales it) with per-sample weights and scales.
CE_CASES = [
    pytest.param(torch.float32, "mean", False, id="float32-mean"),
    pytest.param(torch.float32, "mean", True, id="float32-mean-weighted"),
    pytest.param(torch.float32, "sum", True, id="float32-sum-weighted"),
    pytest.param(torch.float32, "none", True, id="float32-none-weighted"),
    pytest.param(torch.float32, "per_sample", True, id="float32-per_sample-weighted"),
    pytest.param(torch.bfloat16, "none", True, id="bfloat16-none-weighted"),
    pytest.param(torch.float16, "none", True, id="float16-none-weighted"),
]


@pytest.mark.parametrize("shape,shift", CE_SHAPES)
@pytest.mark.parametrize("dtype,reduction,weighted", CE_CASES)
def test_loss_and_gradient_match_torch(backend, shape, shift, dtype, reduction, weighted):
    loss_tol, grad_atol, grad_rtol = CE_TOLERANCES[dtype]
    logits, labels = make_inputs(shape, dtype, ignore_every=5 if len(shape) == 3 else 0)
    weight = torch.rand(shape[0]) * 2 if weighted else None
    kwargs = dict(shift=shift, sample_weight=weight, reduction=reduction)
    got_loss, got_grad, stats = loss_and_grad(lambda x: cross_entropy_with_stats(x, labels, backend=backend, **kwargs), logits)
    ref_loss, ref_grad, _ = loss_and_grad(lambda x: torch_loss(x, labels, shift=shift, weight=weight, reduction=reduction), logits)
    scale = float(labels.numel()) if reduction == "sum" else 1.0
    torch.testing.assert_close(got_loss.float(), ref_loss, rtol=loss_tol, atol=loss_tol * scale)
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape
    torch.testing.assert_close(got_grad.float(), ref_grad.float(), rtol=grad_rtol, atol=grad_atol)
    expected = sample_stats_reference(logits, labels, shift=shift)
    assert torch.equal(stats.bucket, expected.bucket) and torch.equal(stats.valid_tokens, expected.valid_tokens)
    assert not stats.loss.requires_grad


def test_stats_are_those_of_sample_stats(backend):
    logits, labels = make_inputs((2, 6, 77), ignore_every=4)
    loss, stats = cross_entropy_with_stats(logits.requires_grad_(), labels, shift=True, per_token=True, backend=backend)
    alone = sample_stats(logits, labels, shift=True, per_token=True, backend=backend)
    for a, b in zip(stats[:8], alone[:8]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(stats.tokens, alone.tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the per-sample loss statistic is the unweighted "per_sample" loss
    none, _ = cross_entropy_with_stats(logits, labels, shift=True, reduction="per_sample", backend=backend)
    torch.testing.assert_close(none.detach().float(), stats.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_logits_spoil_only_their_sample(backend):
    logits, labels = make_inputs((3, 4, 20))
    logits[1, 2, 5] = float("nan")
    x = logits.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(x, labels, reduction="per_sample", backend=backend)
    assert math.isnan(loss[1].item()) and bool(torch.isfinite(loss[[0, 2]]).all())
    assert stats.bucket[1].item() == BUCKET_INVALID and bool(stats.valid[[0, 2]].all())
    loss[[0, 2]].sum().backward()
    assert bool(torch.isfinite(x.grad[[0, 2]]).all())
    mean, _ = cross_entropy_with_stats(logits, labels, backend=backend)
    assert math.isnan(mean.item())  # as with torch: a NaN loss is visible


def test_no_valid_token(backend):
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    labels[1, 0] = 2
    none, stats = cross_entropy_with_stats(logits, labels, reduction="per_sample", backend=backend)
    assert none[0].item() == 0.0 and stats.bucket[0].item() == BUCKET_INVALID
    none.sum().backward()
    assert bool((logits.grad[0] == 0).all()) and bool((logits.grad[1, 1:] == 0).all())
    all_ignored = torch.full((2, 3), -100)
    mean, _ = cross_entropy_with_stats(logits, all_ignored, backend=backend)
    assert math.isnan(mean.item())  # 0 / 0, as F.cross_entropy
    total, _ = cross_entropy_with_stats(logits, all_ignored, reduction="sum", backend=backend)
    assert total.item() == 0.0


def test_no_gradient_to_sample_weight(backend):
    logits, labels = make_inputs((4, 10))
    weight = torch.rand(4, requires_grad=True)
    x = logits.clone().requires_grad_(True)
    loss, _ = cross_entropy_with_stats(x, labels, sample_weight=weight, backend=backend)
    loss.backward()
    assert weight.grad is None and x.grad is not None


@pytest.mark.parametrize("dtype", LOW_AND_SINGLE_PRECISION, ids=dtype_id)
def test_inplace_backward(backend, dtype):
    # The fused backends write the gradient into the logits' storage; the reference ignores
    # the option. Either way the gradient is the out-of-place one, bit for bit.
    logits, labels = make_inputs((2, 6, 131), dtype, ignore_every=4)
    _, expected, _ = loss_and_grad(lambda x: cross_entropy_with_stats(x, labels, shift=True, backend=backend), logits)
    x = logits.clone().requires_grad_(True)
    loss, _ = cross_entropy_with_stats(x, labels, shift=True, inplace_backward=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    if backend == "reference":
        assert torch.equal(x.detach(), logits)
    else:
        assert torch.equal(x.detach(), x.grad)  # a leaf's .grad is a copy made by autograd


def test_inplace_backward_on_strided_logits(backend):
    wide = torch.randn(4, 300)
    labels = torch.randint(0, 200, (4,))
    _, expected, _ = loss_and_grad(lambda x: torch_loss(x, labels, reduction="sum"), wide[:, 50:250])
    # a column slice: written in place, into the wide tensor's storage, and nowhere else
    leaf = wide.clone().requires_grad_(True)
    sliced = leaf[:, 50:250]
    sliced.retain_grad()
    loss, _ = cross_entropy_with_stats(sliced, labels, reduction="sum", inplace_backward=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(sliced.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad[:, 50:250], expected, rtol=1e-5, atol=1e-6)
    assert bool((leaf.grad[:, :50] == 0).all()) and bool((leaf.grad[:, 250:] == 0).all())
    # a non-contiguous last dimension: one copy; the caller's logits are not touched
    transposed = (torch.randn(200, 4) * 2).t().requires_grad_(True)
    before = transposed.detach().clone()
    loss, _ = cross_entropy_with_stats(transposed, labels, inplace_backward=True, backend=backend)
    loss.backward()
    _, expected, _ = loss_and_grad(lambda x: torch_loss(x, labels), before)
    torch.testing.assert_close(transposed.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(transposed.detach(), before)


def test_bad_loss_arguments_are_refused_at_the_door(backend):
    logits, labels = make_inputs((4, 10))
    bad_calls = [
        (ValueError, "reduction must be one of 'none', 'sum', 'mean', 'per_sample', got 'avg'", {"reduction": "avg"}),
        (ValueError, r"sample_weight must be \[S\] \(one weight per sample\) = \(4,\), got shape \(5,\)",
         {"sample_weight": torch.ones(5)}),
        (TypeError, "sample_weight must be a floating-point tensor, got torch.int64", {"sample_weight": torch.ones(4, dtype=torch.int64)}),
        (TypeError, "sample_weight must be None or a torch.Tensor", {"sample_weight": [1.0] * 4}),
        (ValueError, "sample_weight is on meta but logits is on cpu", {"sample_weight": torch.ones(4, device="meta")}),
        (TypeError, "inplace_backward must be a bool, got int", {"inplace_backward": 1}),
    ]
    for error, message, kwargs in bad_calls:
        with pytest.raises(error, match=message):
            cross_entropy_with_stats(logits, labels, backend=backend, **kwargs)
    seq = torch.randn(2, 5, 10)
    with pytest.raises(ValueError, match=r"= \(2,\), got shape \(10,\)"):
        cross_entropy_with_stats(seq, torch.zeros(2, 5, dtype=torch.int64), sample_weight=torch.ones(10), backend=backend)
