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
