"""cross_entropy_with_stats: loss and gradient against torch.nn.functional.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from geko_core import BUCKET_INVALID
from geko_core.loss import cross_entropy_with_stats
from geko_core.reference import sample_stats_reference
from geko_core.stats import sample_stats

# (dtype, loss tolerance, gradient tolerance): gradients are compared in the logits' dtype.
DTYPES = [
    (torch.float32, 1e-5, 1e-6),
    (torch.bfloat16, 1e-5, 8e-3),
]
SHAPES = [(64, 3000), (2, 16, 501), (37, 1001), (3, 2)]
BACKENDS = ["cpp", "reference"]


def torch_loss(logits, labels, *, ignore_index=-100, shift=False, weight=None, reduction="mean"):
    """The same loss written with F.cross_entropy (float32 compute)."""
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
        return w * token_loss.sum(1) / valid.sum(1).clamp(min=1)
    total = (w[:, None] * token_loss).sum()
    return total if reduction == "sum" else total / valid.sum()


def make(shape, dtype, ignore_every=0):
    logits = (torch.randn(*shape) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return logits, labels


def loss_and_grad(fn, logits, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, **kwargs)
    if isinstance(loss, tuple):
        loss, stats = loss
    else:
        stats = None
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape) if loss.dim() else torch.tensor(1.0)
    (loss * upstream).sum().backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPES, ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_torch_cross_entropy(backend, shape, dtype, loss_tol, grad_tol, reduction, weighted):
    logits, labels = make(shape, dtype, ignore_every=5 if len(shape) == 3 else 0)
    weight = torch.rand(shape[0]) * 2 if weighted else None
    shift = len(shape) == 3
    got_loss, got_grad, stats = loss_and_grad(
        lambda x: cross_entropy_with_stats(x, labels, shift=shift, sample_weight=weight, reduction=reduction, backend=backend),
        logits,
    )
    ref_loss, ref_grad, _ = loss_and_grad(
        lambda x: torch_loss(x, labels, shift=shift, weight=weight, reduction=reduction), logits
    )
    scale = 1.0 if reduction != "sum" else float(labels.numel())
    torch.testing.assert_close(got_loss.float(), ref_loss, rtol=loss_tol, atol=loss_tol * scale)
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape
    torch.testing.assert_close(got_grad.float(), ref_grad.float(), rtol=grad_tol, atol=grad_tol)
    expected = sample_stats_reference(logits, labels, shift=shift)
    assert torch.equal(stats.bucket, expected.bucket) and torch.equal(stats.valid_tokens, expected.valid_tokens)
    assert not stats.loss.requires_grad


def test_stats_are_those_of_sample_stats():
    logits, labels = make((3, 9, 77), torch.float32, ignore_every=4)
    loss, stats = cross_entropy_with_stats(logits.requires_grad_(), labels, shift=True, per_token=True)
    alone = sample_stats(logits, labels, shift=True, per_token=True)
    for a, b in zip(stats[:8], alone[:8]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(stats.tokens, alone.tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The per-sample loss statistic is the unweighted "none" loss.
    none, _ = cross_entropy_with_stats(logits, labels, shift=True, reduction="none")
    torch.testing.assert_close(none.detach(), stats.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [False, True])
def test_gradcheck_reference_fp64(reduction, shift):
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (3, 4))
    labels[0, 1] = -100
    labels[2] = -100
    weight = torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x):
        return cross_entropy_with_stats(x, labels, shift=shift, sample_weight=weight, reduction=reduction, backend="reference")[0]

    assert torch.autograd.gradcheck(fn, (logits,))
    flat = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    flat_labels = torch.randint(0, 7, (5,))
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy_with_stats(x, flat_labels, reduction=reduction, backend="reference")[0], (flat,)
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpp_gradient_matches_reference_in_fp64(reduction):
    logits = torch.randn(4, 5, 33, dtype=torch.float64)
    labels = torch.randint(0, 33, (4, 5))
    labels[1, :3] = -100
    weight = torch.rand(4, dtype=torch.float64)
    kwargs = dict(shift=True, sample_weight=weight, reduction=reduction)
    a_loss, a_grad, _ = loss_and_grad(lambda x: cross_entropy_with_stats(x, labels, backend="cpp", **kwargs), logits)
    b_loss, b_grad, _ = loss_and_grad(lambda x: cross_entropy_with_stats(x, labels, backend="reference", **kwargs), logits)
    assert a_grad.dtype == torch.float64
    torch.testing.assert_close(a_loss.double(), b_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_grad, b_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inplace_backward_overwrites_logits_with_the_gradient(dtype):
    logits, labels = make((2, 6, 131), dtype, ignore_every=4)
    _, expected_grad, _ = loss_and_grad(lambda x: cross_entropy_with_stats(x, labels, shift=True), logits)
    x = logits.clone().requires_grad_(True)
    loss, _ = cross_entropy_with_stats(x, labels, shift=True, inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)
    # The logits buffer now holds the gradient (a leaf's .grad is a copy made by autograd).
    assert torch.equal(x.detach(), x.grad)
    ref_loss, ref_grad, _ = loss_and_grad(lambda t: torch_loss(t, labels, shift=True), logits)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(x.grad.float(), ref_grad.float(), rtol=tol, atol=tol)


def test_inplace_backward_on_strided_logits():
    wide = torch.randn(8, 300)
    labels = torch.randint(0, 200, (8,))
    view = wide[:, 50:250]
    _, expected, _ = loss_and_grad(lambda x: torch_loss(x, labels, reduction="sum"), view)
    # Column slice: written in place, into the wide tensor's storage.
    leaf = wide.clone().requires_grad_(True)
    sliced = leaf[:, 50:250]
    sliced.retain_grad()
    loss, _ = cross_entropy_with_stats(sliced, labels, reduction="sum", inplace_backward=True)
    loss.backward()
    torch.testing.assert_close(sliced.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad[:, 50:250], expected, rtol=1e-5, atol=1e-6)
    assert bool((leaf.grad[:, :50] == 0).all())
    # Non-contiguous last dimension: one copy; the caller's logits are not touched.
    transposed = (torch.randn(200, 8) * 2).t().requires_grad_(True)
    before = transposed.detach().clone()
    loss, _ = cross_entropy_with_stats(transposed, labels, inplace_backward=True)
    loss.backward()
    _, expected, _ = loss_and_grad(lambda x: torch_loss(x, labels), before)
    torch.testing.assert_close(transposed.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(transposed.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_spoil_only_their_sample(backend):
    logits, labels = make((3, 4, 20), torch.float32)
    logits[1, 2, 5] = float("nan")
    x = logits.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(x, labels, reduction="none", backend=backend)
    assert math.isnan(loss[1].item()) and bool(torch.isfinite(loss[[0, 2]]).all())
    assert stats.bucket[1].item() == BUCKET_INVALID and bool(stats.valid[[0, 2]].all())
    loss[[0, 2]].sum().backward()
    assert bool(torch.isfinite(x.grad[[0, 2]]).all())
    mean, _ = cross_entropy_with_stats(logits, labels, backend=backend)
    assert math.isnan(mean.item())  # as with torch: a NaN loss is visible


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_token(backend):
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.full((2, 3), -100)
    labels[1, 0] = 2
    none, stats = cross_entropy_with_stats(logits, labels, reduction="none", backend=backend)
    assert none[0].item() == 0.0 and stats.bucket[0].item() == BUCKET_INVALID
    none.sum().backward()
    assert bool((logits.grad[0] == 0).all()) and bool((logits.grad[1, 1:] == 0).all())
    all_ignored = torch.full((2, 3), -100)
    mean, _ = cross_entropy_with_stats(logits, all_ignored, backend=backend)
    assert math.isnan(mean.item())  # 0 / 0, as F.cross_entropy
    total, _ = cross_entropy_with_stats(logits, all_ignored, reduction="sum", backend=backend)
    assert total.item() == 0.0


def test_no_gradient_to_sample_weight():
    logits, labels = make((4, 10), torch.float32)
    weight = torch.rand(4, requires_grad=True)
    for backend in BACKENDS:
        x = logits.clone().requires_grad_(True)
        loss, _ = cross_entropy_with_stats(x, labels, sample_weight=weight, backend=backend)
        loss.backward()
        assert weight.grad is None and x.grad is not None


def test_fp16_gradient_rounding():
    logits, labels = make((16, 257), torch.float16)
    _, grad, _ = loss_and_grad(lambda x: cross_entropy_with_stats(x, labels, reduction="sum"), logits)
    _, ref_grad, _ = loss_and_grad(lambda x: torch_loss(x, labels, reduction="sum"), logits)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(grad, ref_grad.to(torch.float16), rtol=2e-3, atol=1e-6)


def test_bad_inputs():
    logits, labels = make((4, 10), torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_with_stats(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match=r"sample_weight must have shape \[4\]"):
        cross_entropy_with_stats(logits, labels, sample_weight=torch.ones(5))
    with pytest.raises(TypeError, match="floating-point"):
        cross_entropy_with_stats(logits, labels, sample_weight=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="sample_weight"):
        cross_entropy_with_stats(logits, labels, sample_weight=[1.0] * 4)
    with pytest.raises(ValueError, match="sample_weight is on"):
        cross_entropy_with_stats(logits, labels, sample_weight=torch.ones(4, device="meta"))
    with pytest.raises(TypeError, match="inplace_backward"):
        cross_entropy_with_stats(logits, labels, inplace_backward=1)
    with pytest.raises(TypeError, match="floating-point"):
        cross_entropy_with_stats(logits.long(), labels)
    with pytest.raises(TypeError, match="integer"):
        cross_entropy_with_stats(logits, labels.float())
    with pytest.raises(ValueError, match="does not match"):
        cross_entropy_with_stats(logits, labels[:2])
    labels[1] = 10
    with pytest.raises(ValueError, match="label 10"):
        cross_entropy_with_stats(logits, labels)
    seq = torch.randn(2, 5, 10)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \[2\]"):
        cross_entropy_with_stats(seq, torch.zeros(2, 5, dtype=torch.int64), sample_weight=torch.ones(10))


# ---------------------------------------------------------------- the Triton path through the public API


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_backend_matches_torch(reduction, inplace):
    pytest.importorskip("geko_core.kernels.cross_entropy")
    logits, labels = make((2, 5, 19), torch.float32, ignore_every=3)
    weight = torch.rand(2) + 0.5
    got_loss, got_grad, stats = loss_and_grad(
        lambda x: cross_entropy_with_stats(
            x, labels, shift=True, sample_weight=weight, reduction=reduction, backend="triton", inplace_backward=inplace
        ),
        logits,
    )
    ref_loss, ref_grad, _ = loss_and_grad(
        lambda x: torch_loss(x, labels, shift=True, weight=weight, reduction=reduction), logits
    )
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.bucket, sample_stats_reference(logits, labels, shift=True).bucket)


def _fake_triton_cross_entropy():
    """A torch stand-in that honours the Triton launchers' contract, to test the glue of
    the autograd Function (views, shift, in place, reductions) before the kernels land."""
    import types

    module = types.ModuleType("geko_core.kernels.cross_entropy")
    calls = {"forward": 0, "backward": 0}

    def forward(logits3, labels3, *, ignore_index, config, per_token):
        assert logits3.dim() == 3 and logits3.stride(-1) == 1 and labels3.dtype == torch.int64
        calls["forward"] += 1
        stats = sample_stats_reference(logits3, labels3, ignore_index=ignore_index, per_token=True, config=config)
        token_loss = torch.where(stats.tokens.valid, stats.tokens.loss, torch.zeros(()))
        lse = torch.logsumexp(logits3.float(), dim=-1)
        return stats._replace(tokens=stats.tokens if per_token else None), token_loss, lse

    def backward(logits3, labels3, lse, token_scale, *, ignore_index, inplace):
        calls["backward"] += 1
        vocab = logits3.shape[-1]
        valid = (labels3 != ignore_index) & (labels3 >= 0) & (labels3 < vocab)
        onehot = F.one_hot(torch.where(valid, labels3, 0), vocab).float()
        grad = (torch.exp(logits3.float() - lse[..., None]) - onehot) * (token_scale * valid)[..., None]
        grad = grad.to(logits3.dtype)
        if inplace:
            return logits3.copy_(grad)
        return grad

    module.cross_entropy_forward_triton = forward
    module.cross_entropy_backward_triton = backward
    return module, calls


@pytest.mark.parametrize("shape,shift", [((6, 13), False), ((2, 5, 19), True), ((2, 5, 19), False)])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_glue_with_a_stand_in_kernel(monkeypatch, shape, shift, inplace, reduction):
    pytest.importorskip("triton")
    import sys

    import geko_core.kernels  # noqa: F401 - the parent package must exist

    module, calls = _fake_triton_cross_entropy()
    monkeypatch.setitem(sys.modules, "geko_core.kernels.cross_entropy", module)
    logits, labels = make(shape, torch.float32, ignore_every=4)
    weight = torch.rand(shape[0]) + 0.5
    kwargs = dict(shift=shift, sample_weight=weight, reduction=reduction)
    got_loss, got_grad, stats = loss_and_grad(
        lambda x: cross_entropy_with_stats(x, labels, backend="triton", inplace_backward=inplace, **kwargs), logits
    )
    assert calls == {"forward": 1, "backward": 1}
    ref_loss, ref_grad, _ = loss_and_grad(lambda x: torch_loss(x, labels, weight=weight, shift=shift, reduction=reduction), logits)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.bucket, sample_stats_reference(logits, labels, shift=shift).bucket)
