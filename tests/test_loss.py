"""What only one backend of cross_entropy_with_stats does: the reference is differentiable in
float64 (gradcheck), the C++ kernels return float64 gradients for float64 logits. The
contracts every backend meets (loss and gradient against F.cross_entropy, reductions,
weights, in-place backward, invalid samples) are in test_contracts.py."""

import pytest
import torch

from geko_core.loss import cross_entropy_with_stats


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
    upstream = torch.linspace(0.5, 1.5, 4) if reduction == "none" else torch.tensor(1.0)
    results = {}
    for backend in ("cpp", "reference"):
        x = logits.clone().requires_grad_(True)
        loss, _ = cross_entropy_with_stats(x, labels, shift=True, sample_weight=weight, reduction=reduction, backend=backend)
        (loss * upstream.to(loss.dtype)).sum().backward()
        results[backend] = loss.detach(), x.grad
    (a_loss, a_grad), (b_loss, b_grad) = results["cpp"], results["reference"]
    assert a_grad.dtype == torch.float64
    torch.testing.assert_close(a_loss.double(), b_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_grad, b_grad, rtol=1e-5, atol=1e-7)
