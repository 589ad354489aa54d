"""The losses' options and their torch reference (geko_core.loss_options): the reference
equals F.cross_entropy where torch has the option, and its gradient the closed form the
kernels write."""

import pytest
import torch
import torch.nn.functional as F

from geko_core.loss_options import LossOptions, check_loss_options, options_token_loss_reference

V = 11


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, V, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, V, (9,), generator=g)
    y[2] = -100
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.1
    return x, y, w


def test_defaults_are_plain_cross_entropy() -> None:
    x, y, _ = _inputs()
    options = check_loss_options(vocab=V)
    assert options.plain and options == LossOptions()
    loss, lse, weight = options_token_loss_reference(x, y, options)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, reduction="none"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1))
    assert weight.tolist() == [0.0 if t == -100 else 1.0 for t in y.tolist()]


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_and_class_weights_match_torch(eps: float, weighted: bool) -> None:
    x, y, w = _inputs()
    options = LossOptions(label_smoothing=eps, class_weight=w if weighted else None)
    loss, _, weight = options_token_loss_reference(x, y, options)
    expected = F.cross_entropy(x, y, weight=w if weighted else None, label_smoothing=eps)
    torch.testing.assert_close(loss.sum() / weight.sum(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, weight=w if weighted else None, label_smoothing=eps, reduction="none"))


def test_temperature_softcap_and_z_loss() -> None:
    x, y, _ = _inputs(1)
    options = LossOptions(temperature=0.7, softcap=3.0, z_loss=1e-2)
    loss, lse, _ = options_token_loss_reference(x, y, options)
    z = 3.0 * torch.tanh(x / 0.7 / 3.0)
    expected = F.cross_entropy(z, y, reduction="none") + 1e-2 * torch.logsumexp(z, -1) ** 2 * (y != -100)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))


def test_gradient_is_the_documented_closed_form() -> None:
    x, y, w = _inputs(2)
    x.requires_grad_(True)
    eps, zeta, tau, cap = 0.2, 0.05, 0.7, 3.0
    options = LossOptions(temperature=tau, softcap=cap, label_smoothing=eps, z_loss=zeta, class_weight=w)
    loss, _, _ = options_token_loss_reference(x, y, options)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    z = cap * torch.tanh(x.detach() / tau / cap)
    p = torch.softmax(z, -1)
    lse = torch.logsumexp(z, -1, keepdim=True)
    safe = y.clamp(min=0)
    dz = w[safe][:, None] * (1 - eps) * (p - F.one_hot(safe, V).double()) + eps / V * (w.sum() * p - w) + 2 * zeta * lse * p
    expected = dz * (1 - (z / cap) ** 2) / tau
    expected[y == -100] = 0
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": "1"}, TypeError, "temperature"),
        ({"softcap": -1.0}, ValueError, "softcap"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": True}, TypeError, "label_smoothing"),
        ({"z_loss": -1e-4}, ValueError, "z_loss"),
        ({"z_loss": float("nan")}, ValueError, "z_loss"),
        ({"class_weight": [1.0] * V}, TypeError, "class_weight"),
        ({"class_weight": torch.ones(V, dtype=torch.int64)}, TypeError, "class_weight"),
        ({"class_weight": torch.ones(V + 1)}, ValueError, "class_weight"),
        ({"class_weight": torch.full((V,), -1.0)}, ValueError, "class_weight"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        check_loss_options(vocab=V, **kwargs)


def test_masked_logits_stay_masked_under_softcap() -> None:
    x, y, _ = _inputs(3)
    x[:, 5] = float("-inf")
    y[y == 5] = 0
    options = LossOptions(softcap=2.0)
    loss, lse, _ = options_token_loss_reference(x, y, options)
    z = 2.0 * torch.tanh(x / 2.0)
    z[:, 5] = float("-inf")
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none"), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(loss).all()


# -- the options through cross_entropy_with_stats, every backend -------------------------------

from geko_core import cross_entropy_with_stats  # noqa: E402


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True

from geko_core.loss_options import transformed_logits  # noqa: E402
from geko_core.reference import sample_stats_reference  # noqa: E402

API_BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.skipif(not _has_triton(), reason="triton is not installed"))]
ALL_ON = {"temperature": 0.7, "softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3}
OPTION_CASES = [
    {"temperature": 0.5},
    {"temperature": 2.0},
    {"softcap": 2.5},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"class_weight": "w"},
    ALL_ON,
    {**ALL_ON, "class_weight": "w"},
]
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _api_inputs(dtype, seed=0, shape=(3, 5, 37)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 4).to(dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[::7] = -100
    w = torch.rand(shape[-1], generator=g) + 0.25
    return x, y, w


def _expected(x, y, options, reduction, sample_weight=None):
    """The reference written once, reduced by hand (float64)."""
    vocab = x.shape[-1]
    opts = options._replace(class_weight=None if options.class_weight is None else options.class_weight.double())
    xd = x.detach().double().requires_grad_(True)
    loss, _, tw = options_token_loss_reference(xd.reshape(-1, vocab), y.reshape(-1), opts)
    loss = loss.reshape(y.shape)
    sw = torch.ones(y.shape[0], dtype=torch.float64) if sample_weight is None else sample_weight.double()
    weighted = loss * sw.view(-1, *([1] * (y.dim() - 1)))
    if reduction == "none":
        out = weighted
    elif reduction == "per_sample":
        counted = (y != -100).reshape(y.shape[0], -1).sum(dim=1).clamp(min=1)
        out = weighted.reshape(y.shape[0], -1).sum(dim=1) / counted
    elif reduction == "sum":
        out = weighted.sum()
    else:
        out = weighted.sum() / tw.sum()
    return out, xd


@pytest.mark.parametrize("backend", API_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(OPTION_CASES)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
def test_options_match_the_reference_forward_and_backward(backend, dtype, case, reduction):
    x, y, w = _api_inputs(dtype, seed=case)
    kwargs = {k: (w if v == "w" else v) for k, v in OPTION_CASES[case].items()}
    options = check_loss_options(vocab=x.shape[-1], **kwargs)
    sample_weight = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(9)) + 0.5
    xg = x.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(xg, y, backend=backend, reduction=reduction, sample_weight=sample_weight, **kwargs)
    expected, xd = _expected(x, y, options, reduction, sample_weight)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), expected, **tol)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss.double() * upstream).sum(), xg)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), xd)
    grad_tol = dict(rtol=1.6e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, **grad_tol)
    # the statistics are those of softmax(z): buckets and correctness exactly
    ref = sample_stats_reference(transformed_logits(x, options), y)
    assert torch.equal(stats.bucket, ref.bucket) and torch.equal(stats.correct.isnan(), ref.correct.isnan())
    torch.testing.assert_close(stats.correct, ref.correct, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats.confidence, ref.confidence, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", API_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_and_class_weights_equal_torch(backend, reduction):
    x, y, w = _api_inputs(torch.float32, seed=4, shape=(40, 23))
    loss, _ = cross_entropy_with_stats(x, y, backend=backend, reduction=reduction, label_smoothing=0.15, class_weight=w)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, weight=w, label_smoothing=0.15, reduction=reduction), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not _has_triton(), reason="triton is not installed"))])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_in_place_backward(backend, reduction):
    x, y, w = _api_inputs(torch.float32, seed=7)
    kwargs = {**ALL_ON, "class_weight": w}
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, _ = cross_entropy_with_stats(xa, y, backend=backend, reduction=reduction, **kwargs)
    lb, _ = cross_entropy_with_stats(xb * 1.0, y, backend=backend, reduction=reduction, inplace_backward=True, **kwargs)
    upstream = torch.rand(la.shape)
    (la * upstream).sum().backward()
    (lb * upstream).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", API_BACKENDS)
def test_default_options_change_nothing(backend):
    x, y, _ = _api_inputs(torch.float32, seed=5)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, sa = cross_entropy_with_stats(xa, y, backend=backend)
    lb, sb = cross_entropy_with_stats(xb, y, backend=backend, temperature=1.0, softcap=None, label_smoothing=0.0, z_loss=0.0)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(xa.grad, xb.grad) and torch.equal(sa.confidence, sb.confidence)


def test_options_are_refused_where_unsupported_and_checked():
    x, y, w = _api_inputs(torch.float32, seed=6, shape=(2, 6, 11))
    segments = torch.zeros(2, 6, dtype=torch.int64)
    with pytest.raises(ValueError, match="packed rows"):
        cross_entropy_with_stats(x, y, segments=segments, num_segments=1, softcap=5.0)
    with pytest.raises(ValueError, match="class_weight must have shape"):
        cross_entropy_with_stats(x, y, class_weight=torch.ones(12))
    with pytest.raises(ValueError, match="temperature"):
        cross_entropy_with_stats(x, y, temperature=-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_with_stats(x, y, label_smoothing=2.0)


def test_float64_options_pass_gradcheck_on_the_default_backend():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (4, 3), generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda t: cross_entropy_with_stats(t, y, reduction=reduction, class_weight=w, **ALL_ON)[0], (x,)
        )


# -- the options through linear_cross_entropy_with_stats ----------------------------------------

from geko_core import linear_cross_entropy_with_stats  # noqa: E402

LINEAR_BACKENDS = API_BACKENDS


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("case", [2, 5, 6, 7])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum", "per_sample"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_options_equal_the_options_on_materialised_logits(backend, case, reduction, chunk_size):
    g = torch.Generator().manual_seed(case)
    hidden = torch.randn(2, 6, 16, generator=g)
    weight = torch.randn(37, 16, generator=g) * 0.5
    labels = torch.randint(0, 37, (2, 6), generator=g)
    labels[0, 2] = -100
    w = torch.rand(37, generator=g) + 0.25
    kwargs = {k: (w if v == "w" else v) for k, v in OPTION_CASES[case].items()}
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = linear_cross_entropy_with_stats(
        h1, w1, labels, shift=True, reduction=reduction, backend=backend, chunk_size=chunk_size, **kwargs
    )
    with torch.no_grad():  # the scoring pass (no gradient) gives the same loss
        scored, _ = linear_cross_entropy_with_stats(
            hidden, weight, labels, shift=True, reduction=reduction, backend=backend, chunk_size=chunk_size, **kwargs
        )
    expected, expected_stats = cross_entropy_with_stats(h2 @ w2.T, labels, shift=True, reduction=reduction, backend="reference", **kwargs)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(scored, expected.detach(), rtol=2e-5, atol=2e-6)
    upstream = torch.randn(loss.shape, generator=g)
    (loss * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(stats.bucket, expected_stats.bucket)


@pytest.mark.parametrize("backend", API_BACKENDS)
def test_infinite_logits_keep_their_meaning_under_softcap(backend):
    """-inf stays a masked class (probability 0) and +inf spoils its sample, as without the
    options, on every backend."""
    x, y, _ = _api_inputs(torch.float32, seed=11, shape=(4, 3, 37))
    y[y == 5] = 6
    x[:, :, 5] = float("-inf")
    x[2, 1, 9] = float("inf")
    y[2, 1] = 0
    import warnings

    with warnings.catch_warnings():
        # the Triton interpreter computes inf - inf in numpy, which warns (a GPU does not)
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, stats = cross_entropy_with_stats(x, y, backend=backend, reduction="none", softcap=4.0)
    assert torch.isnan(loss[2, 1]) or torch.isinf(loss[2, 1])
    assert bool(torch.isfinite(loss[[0, 1, 3]]).all())
    assert int(stats.bucket[2]) == -1 and torch.isnan(stats.confidence[2])
    assert bool((stats.bucket[[0, 1, 3]] >= 0).all())


@pytest.mark.parametrize("backend", API_BACKENDS)
@pytest.mark.parametrize("case", [0, 2, 7])
@pytest.mark.parametrize("shape, shift", [((3, 5, 37), False), ((3, 5, 37), True), ((11, 37), False)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_lse_is_the_log_sum_exp_of_z(backend, case, shape, shift, reduction):
    x, y, w = _api_inputs(torch.float32, seed=12 + case, shape=shape)
    kwargs = {k: (w if v == "w" else v) for k, v in OPTION_CASES[case].items()}
    xg = x.clone().requires_grad_(True)
    loss, stats, lse = cross_entropy_with_stats(xg, y, backend=backend, shift=shift, reduction=reduction, return_lse=True, **kwargs)
    options = check_loss_options(vocab=x.shape[-1], **kwargs)
    xs, ys = (x[:, :-1], y[:, 1:]) if shift else (x, y)
    expected = torch.logsumexp(transformed_logits(xs, options).double(), -1)
    expected = torch.where(ys != -100, expected, torch.zeros((), dtype=torch.float64))
    assert lse.dtype == torch.float32 and not lse.requires_grad and lse.shape == ys.shape
    torch.testing.assert_close(lse.double(), expected, rtol=1e-6, atol=1e-6)
    plain, _ = cross_entropy_with_stats(x.clone(), y, backend=backend, shift=shift, reduction=reduction, **kwargs)
    torch.testing.assert_close(loss.detach(), plain, rtol=0, atol=0)  # asking for the lse changes nothing
    if "z_loss" in kwargs and reduction == "mean" and "class_weight" not in kwargs:
        # the z-loss part of the loss, as a recipe logs it
        z_part = kwargs["z_loss"] * (lse.double() ** 2).sum() / (ys != -100).sum()
        assert float(z_part) > 0


def test_return_lse_refused_with_packed_rows():
    x, y, _ = _api_inputs(torch.float32, seed=13, shape=(2, 6, 11))
    with pytest.raises(ValueError, match="return_lse"):
        segments = torch.tensor([[0] * 6, [1] * 6])
        cross_entropy_with_stats(x, y, segments=segments, num_segments=2, return_lse=True)


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("shift", [False, True])
def test_linear_return_lse_equals_the_materialised_one(backend, reduction, grad, shift):
    g = torch.Generator().manual_seed(21)
    hidden = torch.randn(3, 7, 16, generator=g)
    weight = torch.randn(37, 16, generator=g) * 0.5
    labels = torch.randint(0, 37, (3, 7), generator=g)
    labels[1, 3] = -100
    h = hidden.clone().requires_grad_(grad)
    loss, _, lse = linear_cross_entropy_with_stats(
        h, weight, labels, shift=shift, reduction=reduction, backend=backend, chunk_size=5, softcap=4.0, z_loss=1e-3,
        return_lse=True,
    )
    _, _, expected = cross_entropy_with_stats(
        hidden @ weight.T, labels, shift=shift, reduction=reduction, backend="reference", softcap=4.0, z_loss=1e-3,
        return_lse=True,
    )
    assert lse.shape == expected.shape and lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-5)
    if grad:
        loss.sum().backward()
        assert h.grad is not None and torch.isfinite(h.grad).all()
