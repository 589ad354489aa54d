"""linear_logprobs: per-token log-probabilities and entropy of a linear head, chunked.

Every value and gradient is checked against the plain path written once here:
``log_softmax((hidden @ W.T + b) / τ).gather(...)`` and ``-Σ p log p`` on the materialised logits.
"""

from __future__ import annotations

import pytest
import torch

import geko_core
import geko_core._chunk_products as chunk_products
from geko_core import linear_logprobs

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float64: dict(rtol=1e-10, atol=1e-10)}
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2), torch.float64: dict(rtol=1e-9, atol=1e-10)}


def plain(hidden, weight, ids, bias=None, temperature=1.0, keep=None):
    """The unfused reference: materialised logits, torch's log_softmax, in float32 for 16-bit inputs."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(work) / temperature, dim=-1)
    safe_ids = ids if keep is None else torch.where(keep, ids, 0)
    lp = logp.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if keep is not None:
        lp, ent = lp * keep, ent * keep
    return lp, ent


def make(shape, vocab=37, dim=16, dtype=torch.float32, bias=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, dim, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_() if bias else None
    ids = torch.randint(0, vocab, shape, generator=g)
    return hidden, weight, b, ids


def grads_of(fn, tensors, g_lp, g_h):
    for t in tensors:
        t.grad = None
    lp, ent = fn()
    (lp.float() * g_lp).sum().add((ent.float() * g_h).sum()).backward()
    return lp.detach(), ent.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("shape,chunk", [((13,), 4), ((3, 7), 5), ((2, 9), None), ((4, 5), 64)])
def test_values_and_gradients_match_the_plain_path(dtype, temperature, shape, chunk):
    hidden, weight, bias, ids = make(shape, dtype=dtype, scale=3.0)
    tensors = [hidden, weight, bias]
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    lp, ent, grads = grads_of(
        lambda: linear_logprobs(hidden, weight, ids, bias=bias, temperature=temperature, chunk_size=chunk), tensors, g_lp, g_h
    )
    ref_lp, ref_ent, ref_grads = grads_of(lambda: plain(hidden, weight, ids, bias, temperature), tensors, g_lp, g_h)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == work and ent.dtype == work and lp.shape == shape and ent.shape == shape
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOL[dtype])
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want.float(), **GRAD_TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_in_either_dtype_match_the_plain_path(monkeypatch, dtype, wide):
    """16-bit chunk products run in the inputs' dtype (a GPU, a CPU with 16-bit matrix
    instructions) or in float32 (other CPUs): both give the plain path's values and gradients."""
    monkeypatch.setattr(chunk_products, "wide_products", lambda dtype, device: wide)
    shape = (3, 7)
    hidden, weight, bias, ids = make(shape, dtype=dtype, scale=3.0)
    assert chunk_products.ChunkProducts(weight, 4).wide is wide
    tensors = [hidden, weight, bias]
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    lp, ent, grads = grads_of(lambda: linear_logprobs(hidden, weight, ids, bias=bias, chunk_size=4), tensors, g_lp, g_h)
    ref_lp, ref_ent, ref_grads = grads_of(lambda: plain(hidden, weight, ids, bias, 1.0), tensors, g_lp, g_h)
    torch.testing.assert_close(lp, ref_lp, **TOL[torch.bfloat16])
    torch.testing.assert_close(ent, ref_ent, **TOL[torch.bfloat16])
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.float(), want.float(), **GRAD_TOL[torch.bfloat16], msg=lambda m: f"{name}: {m}")


def test_the_reference_backend_is_the_plain_path():
    hidden, weight, bias, ids = make((3, 6), dtype=torch.float64)
    got = linear_logprobs(hidden, weight, ids, bias=bias, temperature=0.7, backend="reference")
    want = plain(hidden, weight, ids, bias, 0.7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gradcheck_in_float64(backend, temperature):
    hidden, weight, bias, ids = make((2, 5), vocab=11, dim=6, dtype=torch.float64)
    keep = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])

    def f(h, w, b):
        return linear_logprobs(h, w, ids, bias=b, temperature=temperature, mask=keep, chunk_size=3, backend=backend)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_gradcheck_of_each_output_alone():
    hidden, weight, bias, ids = make((7,), vocab=9, dim=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_logprobs(h, w, ids, bias=b, chunk_size=2)[0], (hidden, weight, bias))
    assert torch.autograd.gradcheck(lambda h, w, b: linear_logprobs(h, w, ids, bias=b, chunk_size=2)[1], (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_logprobs(h, w, ids, bias=b, chunk_size=4, entropy=False)[0], (hidden, weight, bias)
    )


def test_float64_is_computed_in_float64():
    hidden, weight, bias, ids = make((5,), dtype=torch.float64)
    lp, ent = linear_logprobs(hidden, weight, ids, bias=bias)
    want_lp, want_ent = plain(hidden, weight, ids, bias)
    assert lp.dtype == torch.float64
    assert torch.allclose(lp, want_lp, rtol=1e-13, atol=1e-13)  # float32 would miss by ~1e-7
    assert torch.allclose(ent, want_ent, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("how", ["mask", "ignore_index", "both"])
def test_left_out_tokens_give_zero_and_no_gradient(how):
    hidden, weight, bias, ids = make((3, 6), dtype=torch.float32)
    keep = torch.rand(3, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[0, 0] = False
    ids = ids.clone()
    kwargs = {}
    if how in ("mask", "both"):
        kwargs["mask"] = keep
    if how in ("ignore_index", "both"):
        ids[~keep] = -100  # out of range: must not be checked or gathered
        kwargs["ignore_index"] = -100
    g_lp, g_h = torch.randn(3, 6), torch.randn(3, 6)
    tensors = [hidden, weight, bias]
    lp, ent, grads = grads_of(lambda: linear_logprobs(hidden, weight, ids, bias=bias, chunk_size=4, **kwargs), tensors, g_lp, g_h)
    ref_lp, ref_ent, ref_grads = grads_of(lambda: plain(hidden, weight, ids, bias, keep=keep), tensors, g_lp, g_h)
    assert torch.all(lp[~keep] == 0) and torch.all(ent[~keep] == 0)
    assert torch.all(grads[0][~keep] == 0)
    torch.testing.assert_close(lp, ref_lp, **TOL[torch.float32])
    torch.testing.assert_close(ent, ref_ent, **TOL[torch.float32])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL[torch.float32])


def test_everything_masked():
    hidden, weight, bias, ids = make((2, 3))
    lp, ent = linear_logprobs(hidden, weight, ids, bias=bias, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(lp == 0) and torch.all(ent == 0)
    (lp.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0) and torch.all(bias.grad == 0)


def test_without_entropy_and_without_bias():
    hidden, weight, _, ids = make((9,), bias=False)
    lp, ent = linear_logprobs(hidden, weight, ids, entropy=False, temperature=1.5, chunk_size=4)
    assert ent is None
    torch.testing.assert_close(lp, plain(hidden, weight, ids, None, 1.5)[0], **TOL[torch.float32])
    lp.sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain(hidden, weight, ids, None, 1.5)[0].sum().backward()
    torch.testing.assert_close(got[0], hidden.grad, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(got[1], weight.grad, **GRAD_TOL[torch.float32])


def test_only_some_inputs_require_grad():
    hidden, weight, bias, ids = make((6,))
    weight.requires_grad_(False)
    lp, ent = linear_logprobs(hidden, weight, ids, bias=bias, chunk_size=4)
    (lp + ent).sum().backward()
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None


def test_no_grad_is_a_scoring_pass():
    hidden, weight, bias, ids = make((6,))
    with torch.no_grad():
        lp, ent = linear_logprobs(hidden, weight, ids, bias=bias)
    assert lp.grad_fn is None and ent.grad_fn is None
    torch.testing.assert_close(lp, plain(hidden, weight, ids, bias)[0].detach(), **TOL[torch.float32])


def test_large_logits_and_minus_inf_bias():
    hidden, weight, bias, ids = make((8,), scale=40.0)  # logits of a few hundred
    bias = bias.detach().clone()
    bias[3] = float("-inf")  # a class that can never be drawn
    ids = torch.where(ids == 3, 4, ids)
    bias.requires_grad_()
    lp, ent = linear_logprobs(hidden, weight, ids, bias=bias, chunk_size=3)
    want_lp, _ = plain(hidden, weight, ids, bias)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp, want_lp, rtol=1e-4, atol=1e-4)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert bias.grad[3] == 0


def test_second_backward_with_retain_graph():
    hidden, weight, bias, ids = make((5,))
    lp, ent = linear_logprobs(hidden, weight, ids, bias=bias, chunk_size=2)
    total = lp.sum() + ent.sum()
    total.backward(retain_graph=True)
    first = hidden.grad.clone()
    total.backward()
    torch.testing.assert_close(hidden.grad, 2 * first)


def test_public_api():
    assert "linear_logprobs" in geko_core.__all__
    assert geko_core.linear_logprobs is linear_logprobs


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(hidden=torch.ones(4, dtype=torch.float32)), ValueError, "hidden must be"),
        (dict(hidden=torch.ones(4, 8, dtype=torch.int64)), TypeError, "hidden must be"),
        (dict(weight=torch.ones(11, 8, dtype=torch.float64)), TypeError, "weight must have the dtype"),
        (dict(weight=torch.ones(11, 5)), ValueError, "weight must be"),
        (dict(token_ids=torch.zeros(4, dtype=torch.float32)), TypeError, "token_ids must be an integer"),
        (dict(token_ids=torch.zeros(5, dtype=torch.int64)), ValueError, "token_ids must have shape"),
        (dict(token_ids=torch.tensor([0, 1, 11, 2])), ValueError, "token id 11 at \\(2,\\) is outside"),
        (dict(token_ids=torch.tensor([0, -1, 1, 2])), ValueError, "token id -1"),
        (dict(bias=torch.ones(10)), ValueError, "bias must be"),
        (dict(mask=torch.ones(4, dtype=torch.int64)), TypeError, "mask must be"),
        (dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(temperature=0.0), ValueError, "temperature must be"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(temperature=float("inf")), ValueError, "temperature must be"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
        (dict(temperature="1"), TypeError, "temperature must be"),
        (dict(temperature=True), TypeError, "temperature must be"),
        (dict(chunk_size=0), ValueError, "chunk_size must be"),
        (dict(chunk_size=2.0), TypeError, "chunk_size must be"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be"),
        (dict(entropy=1), TypeError, "entropy must be"),
        (dict(backend="fast"), ValueError, "backend must be"),
        (dict(weight=torch.ones(1, 8)), ValueError, "vocabulary size"),
    ],
)
def test_bad_input_raises_a_clear_error(change, error, match):
    args = dict(hidden=torch.ones(4, 8), weight=torch.ones(11, 8), token_ids=torch.tensor([0, 1, 2, 3]))
    args.update(change)
    hidden, weight, ids = args.pop("hidden"), args.pop("weight"), args.pop("token_ids")
    with pytest.raises(error, match=match):
        linear_logprobs(hidden, weight, ids, **args)


def test_an_out_of_range_id_is_fine_where_masked():
    hidden, weight, _, _ = make((4,), vocab=11, dim=8, bias=False)
    ids = torch.tensor([0, 99, 2, -7])
    lp, _ = linear_logprobs(hidden, weight, ids, mask=torch.tensor([True, False, True, False]))
    assert lp[1] == 0 and lp[3] == 0 and lp[0] < 0


# -- the torch operators and torch.compile ---------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("entropy", [True, False])
def test_operators_pass_opcheck(with_bias, entropy):
    from geko_core.linear_logprobs import linear_logprobs_backward, linear_logprobs_forward

    hidden, weight, bias, ids = make((7,), vocab=9, dim=5, bias=with_bias)
    torch.library.opcheck(linear_logprobs_forward, (hidden, weight, bias, ids, 0.7, 3, entropy))
    _, ent, lse = linear_logprobs_forward(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), ids, 0.7, 3, entropy)
    args = (hidden.detach(), weight.detach(), None if bias is None else bias.detach(), ids, lse, ent, torch.randn(7), torch.randn(7 if entropy else 0), 0.7, 3)
    torch.library.opcheck(linear_logprobs_backward, args)


@pytest.mark.parametrize("masked", [False, True])
def test_compiled_call_traces_as_one_graph_and_matches_eager(masked):
    hidden, weight, bias, ids = make((2, 5), vocab=13, dim=6)
    keep = torch.tensor([[True, False, True, True, True], [True, True, True, False, False]]) if masked else None
    g_lp, g_h = torch.randn(2, 5), torch.randn(2, 5)

    def step(h, w, b):
        lp, ent = linear_logprobs(h, w, ids, bias=b, temperature=0.8, mask=keep, chunk_size=4)
        return lp, ent

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    tensors = [hidden, weight, bias]
    got = grads_of(lambda: compiled(hidden, weight, bias), tensors, g_lp, g_h)
    want = grads_of(lambda: step(hidden, weight, bias), tensors, g_lp, g_h)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float32])
