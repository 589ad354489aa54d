"""``reduction="none"``: per-token losses that back-propagate, for ``cross_entropy_with_stats``
and ``linear_cross_entropy_with_stats``, on every backend (compiled C++, Triton in the
interpreter, the reference), against ``F.cross_entropy(..., reduction="none")`` written once
below; ``"per_sample"`` (the per-sample means ``"none"`` gave before); ``ignore_index=None``.

The fused kernels compute in float32 from the input values, so the forward is compared with
the float64 torch loss of the same (rounded) values; the gradient is rounded once to the
input dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geko_core import cross_entropy_with_stats, linear_cross_entropy_with_stats, sample_stats
from geko_core._backend import backend_status, triton_interpreter_enabled

BACKENDS = ("cpp", "triton", "reference")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LAYOUTS = ("2d", "3d", "3d-shift")
#: Loss tolerance (float32 compute from the input values) and gradient tolerance relative to
#: the largest reference gradient (one rounding to the dtype; float64 is computed in float32
#: by the C++ kernels).
LOSS_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 2e-5}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float64: 2e-5}
#: The linear loss rounds the logits (and the matmuls) to the dtype too.
LINEAR_LOSS_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 2e-5}
LINEAR_GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 2e-5}
V, D = 23, 6


def usable(backend: str, dtype: torch.dtype = torch.float32) -> None:
    status = backend_status()[backend]
    if not status.available:
        pytest.skip(f"backend {backend!r} cannot run here: {status.reason}")
    if backend == "triton":
        if not triton_interpreter_enabled():
            pytest.skip("CPU tensors: the Triton backend needs TRITON_INTERPRET=1 (tests/conftest.py)")
        if dtype == torch.float64:
            pytest.skip("the Triton kernels do not read float64")


def torch_token_loss(logits, labels, *, shift=False, weight=None, ignore_index=-100):
    """The documented ``"none"`` loss, once: F.cross_entropy on the (shifted) pair, in float64,
    times each sample's weight; ``[N]``, ``[B, T]`` or ``[B, T - 1]``."""
    x = logits.double()
    if shift:
        x, labels = x[:, :-1], labels[:, 1:]
    if x.dim() == 3:
        token_loss = F.cross_entropy(x.transpose(1, 2), labels, ignore_index=ignore_index, reduction="none")
    else:
        token_loss = F.cross_entropy(x, labels, ignore_index=ignore_index, reduction="none")
    if weight is None:
        return token_loss
    w = weight.double()
    return token_loss * (w[:, None] if token_loss.dim() == 2 else w)


def make_batch(layout, dtype, *, batch=3, tokens=6, vocab=V, seed=0):
    """Logits (scale 3) and labels with ignored tokens, a fully ignored sample in 3-D."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch * tokens, vocab) if layout == "2d" else (batch, tokens, vocab)
    logits = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, vocab, shape[:-1], generator=g)
    if layout == "2d":
        labels[::4] = -100
    else:
        labels[0, 2] = -100
        labels[1, 4:] = -100
        labels[-1] = -100  # every token ignored
    return logits, labels


def upstream_like(loss):
    """A non-uniform upstream weighting of the token losses, signs included."""
    g = torch.Generator().manual_seed(7)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) * 3 - 1).to(loss.dtype)


def assert_grad_close(got, want, tol):
    assert got.shape == want.shape
    scale = max(float(want.abs().max()) if want.numel() else 1.0, 1e-3)
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale)


# -- cross_entropy_with_stats -------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_losses_and_their_gradient_match_torch(backend, dtype, layout, weighted):
    usable(backend, dtype)
    logits, labels = make_batch(layout, dtype)
    shift = layout == "3d-shift"
    weight = torch.linspace(0.25, 2.0, logits.shape[0]) if weighted else None
    x = logits.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(x, labels, shift=shift, sample_weight=weight, reduction="none", backend=backend)
    ref_x = logits.double().requires_grad_(True)
    ref = torch_token_loss(ref_x, labels, shift=shift, weight=weight)
    assert loss.shape == ref.shape == (labels.shape if not shift else (labels.shape[0], labels.shape[1] - 1))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # float64 runs on the float64 path
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
    scored = labels[:, 1:] if shift else labels
    assert bool((loss.detach()[scored == -100] == 0).all())  # exactly 0, as torch
    up = upstream_like(ref)
    (loss * up.to(loss.dtype)).sum().backward()
    (ref * up).sum().backward()
    assert x.grad.dtype == dtype
    assert_grad_close(x.grad, ref_x.grad, GRAD_TOL[dtype])
    # the statistics beside the token losses are those of sample_stats
    alone = sample_stats(logits, labels, shift=shift, backend=backend)
    assert torch.equal(stats.bucket, alone.bucket) and torch.equal(stats.valid_tokens, alone.valid_tokens)
    torch.testing.assert_close(stats.loss, alone.loss, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert not stats.loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_statistics_and_in_place_backward_beside_the_token_losses(backend):
    usable(backend)
    logits, labels = make_batch("3d", torch.float32)
    weight = torch.rand(3) + 0.5
    ref_x = logits.double().requires_grad_(True)
    ref = torch_token_loss(ref_x, labels, shift=True, weight=weight)
    up = upstream_like(ref)
    (ref * up).sum().backward()
    x = logits.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(
        x * 1.0, labels, shift=True, sample_weight=weight, reduction="none", per_token=True, inplace_backward=True,
        backend=backend,
    )
    (loss * up.float()).sum().backward()
    assert_grad_close(x.grad, ref_x.grad, GRAD_TOL[torch.float32])
    assert stats.tokens.loss.shape == loss.shape
    # the per-token loss statistic is the unweighted token loss, detached
    torch.testing.assert_close(stats.tokens.loss * weight[:, None], loss.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_is_the_weighted_mean_of_the_token_losses(backend):
    usable(backend)
    logits, labels = make_batch("3d", torch.float32)
    weight = torch.rand(3) + 0.5
    x = logits.clone().requires_grad_(True)
    per_sample, stats = cross_entropy_with_stats(x, labels, shift=True, sample_weight=weight, reduction="per_sample", backend=backend)
    tokens, _ = cross_entropy_with_stats(logits, labels, shift=True, sample_weight=weight, reduction="none", backend=backend)
    assert per_sample.shape == (3,)
    expected = tokens.sum(dim=1) / stats.valid_tokens.clamp(min=1)
    torch.testing.assert_close(per_sample.detach(), expected, rtol=1e-6, atol=1e-6)
    assert per_sample[-1].item() == 0.0  # no valid token
    up = torch.tensor([0.5, -1.0, 2.0])
    (per_sample * up).sum().backward()
    ref_x = logits.double().requires_grad_(True)
    ref = torch_token_loss(ref_x, labels, shift=True, weight=weight)
    (ref.sum(dim=1) / stats.valid_tokens.clamp(min=1) * up.double()).sum().backward()
    assert_grad_close(x.grad, ref_x.grad, GRAD_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches_and_rows_without_a_target(backend):
    usable(backend)
    for shape, shift, out in [((0, 5), False, (0,)), ((0, 4, 5), True, (0, 3)), ((2, 0, 5), False, (2, 0)), ((2, 1, 5), True, (2, 0))]:
        x = torch.randn(shape, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.int64)
        loss, stats = cross_entropy_with_stats(x, labels, shift=shift, reduction="none", backend=backend)
        assert loss.shape == out and stats.bucket.shape == (shape[0],)
        loss.sum().backward()
        assert x.grad.shape == x.shape and bool((x.grad == 0).all())
    x = torch.randn(2, 3, 5, requires_grad=True)
    loss, _ = cross_entropy_with_stats(x, torch.full((2, 3), -100), reduction="none", backend=backend)
    assert bool((loss == 0).all())
    (loss * 3).sum().backward()
    assert bool((x.grad == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_rows_keep_the_row_layout(backend):
    usable(backend)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, V, generator=g, dtype=torch.float64).float()
    labels = torch.randint(0, V, (2, 9), generator=g)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1, -1], [2, 2, 2, 2, 3, 3, 3, 3, 3]])
    labels[0, 4] = -100
    weight = torch.tensor([0.5, 1.0, 1.5, 2.0])
    x = logits.clone().requires_grad_(True)
    loss, stats = cross_entropy_with_stats(
        x, labels, shift=True, segments=segments, sample_weight=weight, reduction="none", backend=backend
    )
    # a position counts when it and the label it is scored against belong to the same sample
    owner = torch.where(segments[:, :-1] == segments[:, 1:], segments[:, 1:], -1)
    masked = torch.where(owner >= 0, labels[:, 1:], -100)
    ref_x = logits.double().requires_grad_(True)
    ref = torch_token_loss(ref_x[:, :-1], masked) * torch.where(owner >= 0, weight[owner.clamp(min=0)].double(), 0.0)
    assert loss.shape == (2, 8) and stats.bucket.shape == (4,)
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    up = upstream_like(ref)
    (loss * up.float()).sum().backward()
    (ref * up).sum().backward()
    assert_grad_close(x.grad, ref_x.grad, GRAD_TOL[torch.float32])
    per_sample, _ = cross_entropy_with_stats(
        logits, labels, shift=True, segments=segments, sample_weight=weight, reduction="per_sample", backend=backend
    )
    assert per_sample.shape == (4,)


# -- linear_cross_entropy_with_stats ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_losses_and_their_gradients_match_torch(backend, dtype, layout, chunk_size):
    usable(backend, dtype)
    g = torch.Generator().manual_seed(1)
    batch, tokens = 3, 5
    shape = (batch * tokens, D) if layout == "2d" else (batch, tokens, D)
    hidden = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    _, labels = make_batch(layout, torch.float32, batch=batch, tokens=tokens)
    shift = layout == "3d-shift"
    sample_weight = torch.linspace(0.5, 2.0, shape[0])
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss, stats = linear_cross_entropy_with_stats(
        h, w, labels, bias=b, shift=shift, sample_weight=sample_weight, reduction="none", chunk_size=chunk_size,
        backend=backend,
    )
    rh, rw, rb = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    ref = torch_token_loss(rh @ rw.T + rb, labels, shift=shift, weight=sample_weight)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=LINEAR_LOSS_TOL[dtype], atol=LINEAR_LOSS_TOL[dtype])
    up = upstream_like(ref)
    got = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), (h, w, b))
    want = torch.autograd.grad((ref * up).sum(), (rh, rw, rb))
    for a, e in zip(got, want):
        assert a.dtype == dtype
        assert_grad_close(a, e, LINEAR_GRAD_TOL[dtype])
    if shift:
        assert bool((got[0][:, -1] == 0).all())  # the last position predicts nothing
    assert stats.bucket.shape == (shape[0],) and not stats.loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_per_sample_and_scoring_pass(backend):
    usable(backend)
    hidden = torch.randn(2, 5, D, requires_grad=True)
    weight = torch.randn(V, D)
    labels = torch.randint(0, V, (2, 5))
    labels[1] = -100
    per_sample, stats = linear_cross_entropy_with_stats(hidden, weight, labels, reduction="per_sample", backend=backend)
    tokens, _ = linear_cross_entropy_with_stats(hidden, weight, labels, reduction="none", grad=False, backend=backend)
    assert per_sample.shape == (2,) and tokens.shape == (2, 5) and tokens.grad_fn is None
    torch.testing.assert_close(per_sample.detach(), tokens.sum(dim=1) / stats.valid_tokens.clamp(min=1), rtol=1e-6, atol=1e-6)
    assert per_sample[1].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_empty_batches(backend):
    usable(backend)
    weight = torch.randn(V, D, requires_grad=True)
    for shape, shift, out in [((0, D), False, (0,)), ((2, 1, D), True, (2, 0)), ((2, 0, D), False, (2, 0))]:
        hidden = torch.randn(shape, requires_grad=True)
        labels = torch.zeros(shape[:-1], dtype=torch.int64)
        loss, _ = linear_cross_entropy_with_stats(hidden, weight, labels, shift=shift, reduction="none", backend=backend)
        assert loss.shape == out
        loss.sum().backward()
        assert hidden.grad.shape == hidden.shape and bool((hidden.grad == 0).all())


# -- ignore_index=None ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_none_is_torch_s_default(backend):
    """None means -100, as in F.linear_cross_entropy (its default for class indices)."""
    usable(backend)
    logits, labels = make_batch("3d", torch.float32)
    hidden = torch.randn(3, 6, D)
    weight = torch.randn(V, D)
    for reduction in ("mean", "sum", "none", "per_sample"):
        got, got_stats = cross_entropy_with_stats(logits, labels, ignore_index=None, reduction=reduction, backend=backend)
        want, want_stats = cross_entropy_with_stats(logits, labels, ignore_index=-100, reduction=reduction, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got_stats.bucket, want_stats.bucket)
        got, _ = linear_cross_entropy_with_stats(hidden, weight, labels, ignore_index=None, reduction=reduction, backend=backend)
        want, _ = linear_cross_entropy_with_stats(hidden, weight, labels, reduction=reduction, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    stats = sample_stats(logits, labels, ignore_index=None, backend=backend)
    assert torch.equal(stats.valid_tokens, sample_stats(logits, labels, backend=backend).valid_tokens)
    # against torch's own linear cross-entropy with its default ignore_index=None
    flat_h, flat_y = hidden.reshape(-1, D), labels.reshape(-1)
    got, _ = linear_cross_entropy_with_stats(flat_h, weight, flat_y, ignore_index=None, reduction="none", backend=backend)
    torch.testing.assert_close(got, F.linear_cross_entropy(flat_h, weight, flat_y, reduction="none"), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_ignore_index_none_still_refuses_out_of_range_labels(backend):
    logits, labels = make_batch("3d", torch.float32)
    labels[0, 0] = V
    with pytest.raises(ValueError, match=f"label {V} at \\(sample, token\\) \\(0, 0\\) is outside \\[0, {V}\\)"):
        cross_entropy_with_stats(logits, labels, ignore_index=None, reduction="none", backend=backend)
    with pytest.raises(ValueError, match=f"label {V} at"):
        linear_cross_entropy_with_stats(torch.randn(3, 6, D), torch.randn(V, D), labels, ignore_index=None, backend=backend)
    with pytest.raises(ValueError, match=f"label {V} at"):
        sample_stats(logits, labels, ignore_index=None, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        cross_entropy_with_stats(logits, labels, ignore_index=1.5, backend=backend)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_cross_entropy_with_stats(torch.randn(3, 6, D), torch.randn(V, D), labels, ignore_index="x", backend=backend)


# -- torch.compile ------------------------------------------------------------------------------


def test_compiled_token_losses_match_eager():
    torch._dynamo.reset()
    logits, labels = make_batch("3d", torch.float32)
    hidden = torch.randn(3, 6, D)
    weight = torch.randn(V, D)
    sample_weight = torch.rand(3) + 0.5

    def step(x, h, w):
        a, _ = cross_entropy_with_stats(x, labels, shift=True, sample_weight=sample_weight, reduction="none")
        b, _ = linear_cross_entropy_with_stats(h, w, labels, shift=True, sample_weight=sample_weight, reduction="none", chunk_size=5)
        c, _ = cross_entropy_with_stats(x, labels, shift=True, sample_weight=sample_weight, reduction="per_sample")
        return a, b, c

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaves = [t.clone().requires_grad_(True) for t in (logits, hidden, weight)]
        a, b, c = fn(*leaves)
        assert a.shape == b.shape == (3, 5) and c.shape == (3,)
        up = upstream_like(a)
        ((a * up).sum() + (b * up).sum() + (c * torch.tensor([1.0, -2.0, 0.5])).sum()).backward()
        results.append((a.detach(), b.detach(), c.detach(), *(t.grad for t in leaves)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- the Selector -------------------------------------------------------------------------------


@pytest.mark.parametrize("head", [False, True], ids=["logits", "lm_head"])
def test_selector_loss_gives_the_plan_weighted_token_losses(head):
    from geko_core import Selector

    selector = Selector(8, "uniform", epochs=1, seed=0)
    idx = torch.tensor(list(selector.sampler))[:4]
    weights = selector.weights(idx)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 5, D, generator=g)
    head_weight = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (4, 5), generator=g)
    labels[0, :2] = -100
    x = (hidden if head else hidden @ head_weight.T).requires_grad_(True)
    kwargs = dict(lm_head=head_weight) if head else {}
    tokens = selector.loss(x, labels, idx, shift=True, reduction="none", **kwargs)
    ref_x = x.detach().double().requires_grad_(True)
    ref = torch_token_loss(ref_x @ head_weight.double().T if head else ref_x, labels, shift=True, weight=weights)
    assert tokens.shape == (4, 4)
    torch.testing.assert_close(tokens.detach().double(), ref.detach(), rtol=2e-5, atol=2e-5)
    up = upstream_like(ref)
    (tokens * up.float()).sum().backward()
    (ref * up).sum().backward()
    assert_grad_close(x.grad, ref_x.grad, GRAD_TOL[torch.float32])
    per_sample = selector.loss(x.detach(), labels, idx, shift=True, reduction="per_sample", observe=False, **kwargs)
    assert per_sample.shape == (4,)
