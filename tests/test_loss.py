"""What only one backend of cross_entropy_with_stats does: the reference is differentiable in
float64 (gradcheck), the C++ kernels return float64 gradients for float64 logits. The
contracts every backend meets (loss and gradient against F.cross_entropy, reductions,
weights, in-place backward, invalid samples) are in test_contracts.py."""

import pytest
import torch

from geko_core.cross_entropy import cross_entropy_with_stats


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
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


@pytest.mark.parametrize("reduction", ["mean", "none", "per_sample"])
def test_cpp_gradient_matches_reference_in_fp64(reduction):
    logits = torch.randn(4, 5, 33, dtype=torch.float64)
    labels = torch.randint(0, 33, (4, 5))
    labels[1, :3] = -100
    weight = torch.rand(4, dtype=torch.float64)
    results = {}
    for backend in ("cpp", "reference"):
        x = logits.clone().requires_grad_(True)
        loss, _ = cross_entropy_with_stats(x, labels, shift=True, sample_weight=weight, reduction=reduction, backend=backend)
        upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * upstream).sum().backward()
        results[backend] = loss.detach(), x.grad
    (a_loss, a_grad), (b_loss, b_grad) = results["cpp"], results["reference"]
    assert a_grad.dtype == torch.float64
    torch.testing.assert_close(a_loss.double(), b_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_grad, b_grad, rtol=1e-5, atol=1e-7)


# -- the one-call C++ forward (the Selector's usual CPU step) -------------------------------------

import math  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from geko_core import sample_stats  # noqa: E402
from geko_core.cross_entropy import _loss_and_stats  # noqa: E402

HOST_DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # float64 runs on the reference: tests/test_numerics.py
HOST_TOL = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # the kernels compute in fp32


def _host_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if labels.numel() > 2:
        labels.view(-1)[1::3] = -100
    return logits, labels


def _host_step(x, labels, weight=None, *, shift=False, reduction="mean", inplace=False):
    return _loss_and_stats(
        x, labels, ignore_index=-100, shift=shift, sample_weight=weight, reduction=reduction, per_token=False,
        config=None, backend=None, inplace_backward=inplace, segments=None, position_ids=None, num_segments=None,
    )


def _host_reference(logits, labels, weight, *, shift, reduction):
    x = logits.detach().double().clone().requires_grad_(True)
    w = None if weight is None else weight.double()
    loss, stats = cross_entropy_with_stats(x, labels, shift=shift, sample_weight=w, reduction=reduction, backend="reference")
    loss.backward()
    return loss.detach(), x.grad, stats


@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("shape,shift", [((7, 5), False), ((6, 300), False), ((3, 4, 11), False), ((3, 5, 11), True), ((2, 1, 4), True)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_host_forward_matches_the_reference(dtype, shape, shift, reduction, weighted):
    logits, labels = _host_inputs(shape, dtype)
    weight = torch.linspace(0.5, 2.0, shape[0]) if weighted else None
    x = logits.clone().requires_grad_(True)
    loss, stats, host = _host_step(x, labels, weight, shift=shift, reduction=reduction)
    assert host is not None and stats is None  # the C++ backend's one-call forward served it
    stats = host.stats()
    loss.backward()
    ref_loss, ref_grad, ref_stats = _host_reference(logits, labels, weight, shift=shift, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    if ref_stats.valid_tokens.sum() == 0 and reduction == "mean":
        assert math.isnan(float(loss.detach()))
    else:
        torch.testing.assert_close(loss.double(), ref_loss, rtol=HOST_TOL[dtype], atol=HOST_TOL[dtype])
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=HOST_TOL[dtype], atol=HOST_TOL[dtype])
    expected = sample_stats(logits, labels, shift=shift, backend="cpp")
    for field, row in (("loss", 0), ("confidence", 1), ("label_prob", 2), ("correct", 3), ("entropy", 4), ("el2n", 5)):
        want = getattr(expected, field).nan_to_num(-7)
        assert torch.equal(getattr(stats, field).nan_to_num(-7), want), field
        assert torch.equal(torch.from_numpy(host.values[row]).nan_to_num(-7), want), field  # the same block
    assert torch.equal(stats.bucket, expected.bucket) and np.array_equal(host.bucket, expected.bucket.numpy())
    assert torch.equal(stats.valid_tokens, expected.valid_tokens)
    assert host.valid_total == int(expected.valid_tokens.sum())


def test_host_forward_inplace_writes_the_gradient_into_the_logits():
    logits, labels = _host_inputs((9, 13), torch.float32)
    x = logits.clone().requires_grad_(True)
    y = x * 1  # a non-leaf, as the model's output is
    loss, _, host = _host_step(y, labels, inplace=True)
    assert host is not None
    loss.backward()
    _, ref_grad, _ = _host_reference(logits, labels, None, shift=False, reduction="mean")
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_host_forward_refuses_an_out_of_range_label_as_the_other_paths():
    # The one-call forward checks the labels inside the compiled call; the message is the one
    # every other path gives.
    logits = torch.zeros(3, 2, 4)
    labels = torch.tensor([[0, 1], [2, 9], [0, 0]])
    with pytest.raises(ValueError) as per_token:
        cross_entropy_with_stats(logits, labels, per_token=True)
    with pytest.raises(ValueError) as host:
        _host_step(logits, labels)
    assert str(host.value) == str(per_token.value) and "label 9 at (sample, token) (1, 1)" in str(host.value)
    with pytest.raises(ValueError, match=r"label -5 at \(sample, token\) \(2, 0\)"):
        _host_step(torch.zeros(3, 4), torch.tensor([0, 1, -5]), reduction="sum")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(0, 5),
    tokens=st.integers(0, 4),
    vocab=st.sampled_from([2, 3, 7, 16, 33]),
    flat=st.booleans(),
    shift=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
    dtype=st.sampled_from(HOST_DTYPES),
    specials=st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 50.0]), max_size=2),
    seed=st.integers(0, 1000),
)
def test_host_forward_fuzz(batch, tokens, vocab, flat, shift, reduction, dtype, specials, seed):
    shape = (batch, vocab) if flat else (batch, tokens, vocab)
    shift = shift and not flat
    logits, labels = _host_inputs(shape, dtype, seed=seed)
    flat_view = logits.view(-1)
    for k, value in enumerate(specials):
        if flat_view.numel():
            flat_view[(k * 7) % flat_view.numel()] = value
    x = logits.clone().requires_grad_(True)
    loss, stats, host = _host_step(x, labels, shift=shift, reduction=reduction)
    assert host is not None and stats is None
    stats = host.stats()
    loss.backward()
    expected = sample_stats(logits, labels, shift=shift, backend="reference")
    assert torch.equal(stats.bucket.long(), expected.bucket.long())
    assert torch.equal(stats.valid_tokens.long(), expected.valid_tokens.long())
    if torch.isfinite(logits.double()).all():
        ref_loss, ref_grad, _ = _host_reference(logits, labels, None, shift=shift, reduction=reduction)
        torch.testing.assert_close(loss.double(), ref_loss.to(torch.float32).double(), rtol=2e-3, atol=2e-3, equal_nan=True)
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert x.grad.shape == x.shape


# -- the gradient written by the one-call forward -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,shift", [((7, 5), False), ((3, 5, 11), True)])
def test_host_forward_scales_its_gradient_by_the_incoming_one(dtype, shape, shift):
    logits, labels = _host_inputs(shape, dtype)
    weight = torch.linspace(0.5, 2.0, shape[0])
    x = logits.clone().requires_grad_(True)
    loss, _, host = _host_step(x, labels, weight, shift=shift)
    assert host is not None
    (loss * -2.5).backward()
    _, ref_grad, _ = _host_reference(logits, labels, weight, shift=shift, reduction="mean")
    torch.testing.assert_close(x.grad.double(), -2.5 * ref_grad, rtol=HOST_TOL[dtype], atol=HOST_TOL[dtype])
    if shift:
        assert torch.equal(x.grad[:, -1], torch.zeros_like(x.grad[:, -1]))


def test_host_forward_gradient_survives_a_retained_graph():
    logits, labels = _host_inputs((6, 9), torch.float32)
    x = logits.clone().requires_grad_(True)
    loss, _, _ = _host_step(x, labels)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (3 * loss).backward()  # the saved gradient is still the forward's, unscaled
    torch.testing.assert_close(x.grad, 4 * first, rtol=1e-6, atol=1e-7)
    _, ref_grad, _ = _host_reference(logits, labels, None, shift=False, reduction="mean")
    torch.testing.assert_close(first.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_host_forward_gradient_is_once_differentiable():
    logits, labels = _host_inputs((4, 6), torch.float32)
    x = logits.clone().requires_grad_(True)
    loss, _, _ = _host_step(x, labels)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    _, ref_grad, _ = _host_reference(logits, labels, None, shift=False, reduction="mean")
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not require grad"):  # never a silent zero second derivative
        grad.sum().backward()


def test_host_forward_without_grad_matches_with_grad():
    logits, labels = _host_inputs((5, 4, 7), torch.float32)
    with torch.no_grad():
        loss_ng, _, host_ng = _host_step(logits, labels, shift=True)
    x = logits.clone().requires_grad_(True)
    loss, _, host = _host_step(x, labels, shift=True)
    assert torch.equal(loss.detach(), loss_ng) and np.array_equal(host.values, host_ng.values, equal_nan=True)


def test_compiled_loss_forward_gradient_equals_its_backward():
    from torch.utils.dlpack import to_dlpack

    from geko_core._backend import load_compiled_core
    from geko_core.config import cpp_config_for_kernels, resolve_config

    core = load_compiled_core()
    config = cpp_config_for_kernels(resolve_config(None))
    logits, labels = _host_inputs((5, 3, 9), torch.float32)
    weight = torch.linspace(0.5, 2.0, 5)
    n = 5

    def buffers():
        return np.empty((6, n), np.float32), np.empty(n, np.int32), np.empty(n, np.int8)

    values, valid, bucket = buffers()
    lse = np.empty((n, 3), np.float64)
    args = (to_dlpack(logits), to_dlpack(labels), -100, config, to_dlpack(weight), "mean")
    _, loss_a, total = core.loss_forward(*args, values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__(), lse.__dlpack__(), None)
    expected = torch.empty_like(logits)
    core.cross_entropy_backward(args[0], args[1], lse.__dlpack__(), args[4], to_dlpack(expected), -100, 1.0 / total)
    values_b, valid_b, bucket_b = buffers()
    grad = torch.full_like(logits, 7.0)
    _, loss_b, _ = core.loss_forward(*args, values_b.__dlpack__(), valid_b.__dlpack__(), bucket_b.__dlpack__(), None, to_dlpack(grad))
    assert loss_a == loss_b and np.array_equal(values, values_b, equal_nan=True) and np.array_equal(bucket, bucket_b)
    assert torch.equal(grad, expected)
    with pytest.raises(ValueError, match="grad"):
        core.loss_forward(*args, values_b.__dlpack__(), valid_b.__dlpack__(), bucket_b.__dlpack__(), None, to_dlpack(torch.empty(5, 3, 8)))
    with pytest.raises(TypeError, match="grad"):
        core.loss_forward(*args, values_b.__dlpack__(), valid_b.__dlpack__(), bucket_b.__dlpack__(), None, to_dlpack(torch.empty(5, 3, 9, dtype=torch.float64)))
