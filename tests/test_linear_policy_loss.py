"""linear_policy_loss: the clipped policy-gradient loss made in one chunked pass, against the
same loss written in torch on the plain log-softmax of the materialised logits."""

from __future__ import annotations

import pytest
import torch

import geko_core
from geko_core import linear_logprobs, linear_policy_loss

LOSS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: dict(rtol=1e-10, atol=1e-12)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=5e-2, atol=5e-3), torch.float64: dict(rtol=1e-9, atol=1e-12)}


def make(shape=(4, 6), vocab=41, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, dim, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    bias = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    advantages = torch.randn(shape[0], generator=g)
    return hidden, weight, bias, ids, mask, advantages, g


def plain_loss(hidden, weight, ids, advantages, *, bias=None, old=None, mask=None, temperature=1.0, low=0.2, high=None):
    """The loss written in torch: materialised logits, log_softmax, gather, clipped ratio, token mean."""
    high = low if high is None else high
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(work) / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    a = advantages[:, None].to(work) if advantages.dim() == 1 and logp.dim() == 2 else advantages.to(work)
    ratio = torch.exp(logp - (logp.detach() if old is None else old.to(work)))
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - low, 1 + high) * a)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    return (per_token * keep).sum() / keep.sum().clamp(min=1), torch.where(keep, logp, torch.zeros((), dtype=work)).detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("chunk", [3, None])
def test_loss_logprobs_and_gradients_match_torch(dtype, with_old, chunk):
    hidden, weight, bias, ids, mask, advantages, g = make(dtype=dtype)
    old = (torch.randn(ids.shape, generator=g) * 0.4 - 3.7) if with_old else None  # some ratios clipped
    loss, logprobs = linear_policy_loss(
        hidden, weight, ids, advantages, old_logprobs=old, bias=bias, mask=mask, temperature=0.9, chunk_size=chunk
    )
    ref, ref_lp = plain_loss(hidden, weight, ids, advantages, bias=bias, old=old, mask=mask, temperature=0.9)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == work and logprobs.dtype == work and not logprobs.requires_grad
    torch.testing.assert_close(loss, ref.to(work), **LOSS_TOL[dtype])
    torch.testing.assert_close(logprobs, ref_lp, **LOSS_TOL[dtype])
    assert bool((logprobs[~mask] == 0).all())
    got = torch.autograd.grad(loss, (hidden, weight, bias))
    want = torch.autograd.grad(ref, (hidden, weight, bias))
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), b.float(), **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert bool((got[0][~mask] == 0).all())  # left-out tokens pass no gradient


def test_clipping_takes_the_gradient_away_where_torch_does():
    """Ratios far outside the range on the side the advantage favours: no gradient from those
    tokens; inside, or on the other side, the unclipped gradient -A ρ ∇log p."""
    hidden, weight, bias, ids, _, _, g = make(shape=(2, 5))
    logp, _ = linear_logprobs(hidden, weight, ids, bias=bias, entropy=False)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.5], [1.0, -1.0, 2.0, -2.0, 0.0]])
    shift = torch.tensor([[-1.0, 1.0, -1.0, 1.0, 0.0], [0.05, -0.05, -2.0, 2.0, 1.0]])
    old = logp.detach() + shift  # ρ = exp(-shift)
    loss, _ = linear_policy_loss(hidden, weight, ids, advantages, old_logprobs=old, bias=bias, clip_eps=0.2, clip_eps_high=0.28)
    ref, _ = plain_loss(hidden, weight, ids, advantages, bias=bias, old=old, low=0.2, high=0.28)
    torch.testing.assert_close(loss, ref, **LOSS_TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(ref, (hidden, weight))):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float32])
    # ρ = e (A > 0) and ρ = e^-1 (A < 0) are clipped: those rows get no gradient at all
    grad_h = torch.autograd.grad(linear_policy_loss(hidden, weight, ids, advantages, old_logprobs=old, bias=bias)[0], hidden)[0]
    assert bool((grad_h[0, 0] == 0).all()) and bool((grad_h[0, 3] == 0).all()) and bool((grad_h[0, 1] != 0).any())


def test_per_token_advantages_and_ignore_index():
    hidden, weight, bias, ids, mask, _, g = make()
    advantages = torch.randn(ids.shape, generator=g)
    ids = torch.where(mask, ids, torch.full_like(ids, -100))
    loss, lp = linear_policy_loss(hidden, weight, ids, advantages, bias=bias, ignore_index=-100)
    ref, ref_lp = plain_loss(hidden, weight, ids.clamp(min=0), advantages, bias=bias, mask=mask)
    torch.testing.assert_close(loss, ref, **LOSS_TOL[torch.float32])
    torch.testing.assert_close(lp, ref_lp, **LOSS_TOL[torch.float32])


def test_reference_backend_and_gradcheck_in_float64():
    hidden, weight, bias, ids, mask, advantages, g = make(shape=(2, 3), vocab=7, dim=4, dtype=torch.float64)
    old = torch.randn(ids.shape, generator=g, dtype=torch.float64) * 0.3 - 2.0
    fused = linear_policy_loss(hidden, weight, ids, advantages, old_logprobs=old, bias=bias, mask=mask)[0]
    reference = linear_policy_loss(hidden, weight, ids, advantages, old_logprobs=old, bias=bias, mask=mask, backend="reference")[0]
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_policy_loss(h, w, ids, advantages, old_logprobs=old, bias=b, mask=mask, chunk_size=2)[0],
        (hidden, weight, bias),
    )


def test_incoming_gradient_scales_and_graph_composes():
    hidden, weight, bias, ids, mask, advantages, _ = make()
    loss, _ = linear_policy_loss(hidden, weight, ids, advantages, bias=bias, mask=mask)
    ref, _ = plain_loss(hidden, weight, ids, advantages, bias=bias, mask=mask)
    total = 3.0 * loss + (weight**2).sum()  # a KL or weight-decay term beside it
    want = 3.0 * ref + (weight**2).sum()
    for a, b in zip(torch.autograd.grad(total, (hidden, weight, bias)), torch.autograd.grad(want, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float32])


def test_no_grad_and_frozen_inputs():
    hidden, weight, bias, ids, mask, advantages, _ = make()
    with torch.no_grad():
        loss, _ = linear_policy_loss(hidden, weight, ids, advantages, bias=bias, mask=mask)
    ref, _ = plain_loss(hidden, weight, ids, advantages, bias=bias, mask=mask)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref.detach(), **LOSS_TOL[torch.float32])
    frozen = weight.detach()
    loss, _ = linear_policy_loss(hidden, frozen, ids, advantages, mask=mask)
    (grad_h,) = torch.autograd.grad(loss, hidden)
    ref, _ = plain_loss(hidden, frozen, ids, advantages, mask=mask)
    torch.testing.assert_close(grad_h, torch.autograd.grad(ref, hidden)[0], **GRAD_TOL[torch.float32])


def test_everything_masked_gives_zero():
    hidden, weight, bias, ids, _, advantages, _ = make()
    loss, lp = linear_policy_loss(hidden, weight, ids, advantages, bias=bias, mask=torch.zeros(ids.shape, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and bool((lp == 0).all())
    grads = torch.autograd.grad(loss, (hidden, weight, bias), allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(advantages=torch.zeros(3)), ValueError, "advantages must have shape"),
        (dict(advantages=torch.zeros(4, dtype=torch.int64)), TypeError, "advantages"),
        (dict(old_logprobs=torch.zeros(4)), ValueError, "old_logprobs must have shape"),
        (dict(clip_eps=1.0), ValueError, "clip_eps must be in"),
        (dict(clip_eps=-0.1), ValueError, "clip_eps must be in"),
        (dict(clip_eps_high=float("inf")), ValueError, "clip_eps_high"),
        (dict(clip_eps="0.2"), TypeError, "clip_eps"),
        (dict(temperature=0.0), ValueError, "temperature"),
    ],
)
def test_bad_input_raises_a_clear_error(change, error, match):
    hidden, weight, bias, ids, mask, advantages, _ = make()
    kwargs = dict(advantages=advantages, bias=bias, mask=mask)
    kwargs.update(change)
    with pytest.raises(error, match=match):
        linear_policy_loss(hidden, weight, ids, **kwargs)


def test_public_api():
    assert geko_core.linear_policy_loss is linear_policy_loss
    assert "linear_policy_loss" in geko_core.__all__
