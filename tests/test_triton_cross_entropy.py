"""Fused Triton cross-entropy (forward with statistics, backward) against torch, in the interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from geko_core import BUCKET_INVALID, GekoConfig  # noqa: E402
from geko_core._backend import triton_interpreter_enabled  # noqa: E402
from geko_core.kernels import sample_stats as stats_module  # noqa: E402
from geko_core._cross_entropy_kernels import cross_entropy_backward_triton, cross_entropy_forward_triton  # noqa: E402
from geko_core.stats import sample_stats_triton  # noqa: E402
from geko_core.reference import sample_stats_reference  # noqa: E402

if triton_interpreter_enabled():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("the Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
# (dtype, forward tolerance, gradient tolerance). The forward computes in float32 from the
# input values; the gradient is rounded once to the logits' dtype.
CASES = [
    (torch.float32, dict(atol=1e-5, rtol=1e-5), dict(atol=1e-6, rtol=1e-5)),
    (torch.bfloat16, dict(atol=1e-5, rtol=1e-5), dict(atol=1e-5, rtol=8e-3)),
    (torch.float16, dict(atol=1e-5, rtol=1e-5), dict(atol=1e-6, rtol=1e-3)),
]


@pytest.fixture(params=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch) -> str:
    if request.param == "small_tiles":
        monkeypatch.setattr(stats_module, "MAX_BLOCK_V", 16)
        monkeypatch.setattr(stats_module, "MAX_BLOCK_T", 16)
    return request.param


def make_batch(shape, dtype, *, ignore_fraction=0.25):
    num_samples, seq_len, vocab = shape
    logits = (torch.randn(shape) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (num_samples, seq_len))
    labels[torch.rand(num_samples, seq_len) < ignore_fraction] = -100
    return logits, labels.to(DEVICE)


def valid_mask(labels, vocab, ignore_index=-100):
    return (labels != ignore_index) & (labels >= 0) & (labels < vocab)


def torch_token_loss(logits, labels, ignore_index=-100):
    """Per-token cross-entropy in float64 by torch; 0 for tokens that are not valid."""
    vocab = logits.shape[-1]
    valid = valid_mask(labels, vocab, ignore_index)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    loss = F.cross_entropy(logits.double().reshape(-1, vocab), safe.reshape(-1), reduction="none")
    return torch.where(valid, loss.reshape(labels.shape), torch.zeros((), dtype=torch.float64, device=logits.device))


def torch_gradient(logits, labels, token_scale, ignore_index=-100):
    """d sum(token_scale * token_loss) / d logits, by torch autograd in float64."""
    x = logits.detach().double().requires_grad_(True)
    loss = (torch_token_loss(x, labels, ignore_index) * token_scale.double()).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", CASES)
@pytest.mark.parametrize("shape", [(5, 1, 37), (2, 7, 129), (3, 2, 2)])
def test_forward_matches_torch(dtype, fwd_tol, grad_tol, shape, tiles):
    logits, labels = make_batch(shape, dtype)
    stats, token_loss, lse = cross_entropy_forward_triton(
        logits, labels, ignore_index=-100, config=GekoConfig(), per_token=True
    )
    assert token_loss.dtype == torch.float32 and token_loss.shape == labels.shape
    assert lse.dtype == torch.float64 and lse.shape == labels.shape
    expected_loss = torch_token_loss(logits, labels).float()
    torch.testing.assert_close(token_loss, expected_loss, **fwd_tol)
    assert bool((token_loss[~valid_mask(labels, shape[2])] == 0).all())
    torch.testing.assert_close(lse, torch.logsumexp(logits.double(), dim=-1), **fwd_tol)
    # the statistics are those of the plain statistics launcher, bit for bit
    plain = sample_stats_triton(logits, labels, ignore_index=-100, config=GekoConfig(), per_token=True)
    for name in FLOAT_FIELDS:
        assert torch.equal(getattr(stats, name).isnan(), getattr(plain, name).isnan())
        torch.testing.assert_close(getattr(stats, name), getattr(plain, name), equal_nan=True, atol=0, rtol=0)
    assert torch.equal(stats.bucket, plain.bucket) and torch.equal(stats.valid_tokens, plain.valid_tokens)
    assert torch.equal(stats.tokens.loss, token_loss)
    ref = sample_stats_reference(logits, labels)
    assert torch.equal(stats.bucket, ref.bucket)


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", CASES)
@pytest.mark.parametrize("shape", [(5, 1, 37), (2, 7, 129)])
def test_backward_matches_autograd(dtype, fwd_tol, grad_tol, shape, tiles):
    logits, labels = make_batch(shape, dtype)
    labels[0, 0] = shape[2] + 3  # out of range: zero gradient row, like an ignored token
    _, _, lse = cross_entropy_forward_triton(logits, labels, ignore_index=-100, config=GekoConfig(), per_token=False)
    token_scale = torch.rand(labels.shape, device=DEVICE)
    grad = cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=-100, inplace=False)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert grad.data_ptr() != logits.data_ptr()
    expected = torch_gradient(logits, labels, token_scale)
    torch.testing.assert_close(grad.double(), expected, **grad_tol)
    # the same as the closed form (softmax - onehot) * scale, rows of non-valid tokens zero
    valid = valid_mask(labels, shape[2])
    assert bool((grad[~valid] == 0).all())
    assert bool((grad[0, 0] == 0).all())


@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", CASES)
def test_backward_in_place_on_strided_views(dtype, fwd_tol, grad_tol, tiles):
    batch, seq_len, vocab = 2, 5, 37
    wide = (torch.randn(batch, seq_len, vocab + 6) * 3).to(dtype).to(DEVICE)
    original = wide.clone()
    # the causal shift of a column slice: rows of stride 43, the last position left out
    logits = wide[:, :-1, 2 : 2 + vocab]
    labels_full = torch.randint(0, vocab, (batch, seq_len), device=DEVICE)
    labels_full[1, 3] = -100
    labels = labels_full[:, 1:]
    _, _, lse = cross_entropy_forward_triton(logits, labels, ignore_index=-100, config=GekoConfig(), per_token=False)
    token_scale = torch.full(labels.shape, 0.125, device=DEVICE)
    expected = torch_gradient(logits, labels, token_scale)
    grad = cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=-100, inplace=True)
    assert grad is logits
    torch.testing.assert_close(wide[:, :-1, 2 : 2 + vocab].double(), expected, **grad_tol)
    # nothing outside the view was written
    assert torch.equal(wide[:, -1], original[:, -1])
    assert torch.equal(wide[:, :, :2], original[:, :, :2])
    assert torch.equal(wide[:, :, 2 + vocab :], original[:, :, 2 + vocab :])


def test_in_place_equals_out_of_place(tiles):
    logits, labels = make_batch((2, 4, 50), torch.float32)
    _, _, lse = cross_entropy_forward_triton(logits, labels, ignore_index=-100, config=GekoConfig(), per_token=False)
    token_scale = torch.randn(labels.shape, device=DEVICE)
    out_of_place = cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=-100, inplace=False)
    in_place = cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=-100, inplace=True)
    assert in_place.data_ptr() == logits.data_ptr()
    assert torch.equal(in_place, out_of_place)


def test_backward_writes_into_a_given_gradient_view(tiles):
    logits, labels = make_batch((2, 5, 40), torch.float32)
    shifted, shifted_labels = logits[:, :-1], labels[:, 1:]
    _, _, lse = cross_entropy_forward_triton(shifted, shifted_labels, ignore_index=-100, config=GekoConfig(), per_token=False)
    token_scale = torch.randn(shifted_labels.shape, device=DEVICE)
    expected = cross_entropy_backward_triton(shifted, shifted_labels, lse, token_scale, ignore_index=-100, inplace=False)
    grad = torch.full(logits.shape, 7.0, device=DEVICE)
    got = cross_entropy_backward_triton(
        shifted, shifted_labels, lse, token_scale, ignore_index=-100, inplace=False, out=grad[:, :-1]
    )
    assert got.data_ptr() == grad.data_ptr()
    assert torch.equal(grad[:, :-1], expected)
    assert torch.equal(grad[:, -1], torch.full_like(grad[:, -1], 7.0))  # nothing outside the view
    with pytest.raises(ValueError, match="exclude"):
        cross_entropy_backward_triton(shifted, shifted_labels, lse, token_scale, ignore_index=-100, inplace=True, out=grad[:, :-1])
    with pytest.raises(ValueError, match="out must be"):
        cross_entropy_backward_triton(shifted, shifted_labels, lse, token_scale, ignore_index=-100, inplace=False, out=grad)
    with pytest.raises(ValueError, match="overlap"):
        cross_entropy_backward_triton(
            shifted, shifted_labels, lse, token_scale, ignore_index=-100, inplace=False,
            out=torch.empty(1, 1, 40, device=DEVICE).expand(2, 4, 40),
        )


def test_masked_vocabulary_with_minus_inf_keeps_a_finite_loss(tiles):
    # -inf logits outside the label (a constrained vocabulary) are probability 0, as in
    # torch's cross-entropy: the loss, the gradient and the statistics are finite.
    logits, labels = make_batch((2, 3, 40), torch.float32, ignore_fraction=0.0)
    logits[0, 1, :20] = float("-inf")  # a whole tile of -inf before any finite value
    labels[0, 1] = 30
    stats, token_loss, lse = cross_entropy_forward_triton(
        logits, labels, ignore_index=-100, config=GekoConfig(), per_token=False
    )
    torch.testing.assert_close(token_loss, torch_token_loss(logits, labels).float(), atol=1e-5, rtol=1e-5)
    assert bool(torch.isfinite(lse).all())
    assert BUCKET_INVALID not in stats.bucket.tolist()
    token_scale = torch.ones(labels.shape, device=DEVICE)
    grad = cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=-100, inplace=False)
    torch.testing.assert_close(grad.double(), torch_gradient(logits, labels, token_scale), atol=1e-6, rtol=1e-5)
    assert bool((grad[0, 1, :20] == 0).all())


def test_custom_ignore_index(tiles):
    logits, labels = make_batch((2, 4, 21), torch.float32, ignore_fraction=0.0)
    labels[0, 1] = 5
    labels[1, 2] = -100  # out of range when ignore_index is 5
    _, token_loss, lse = cross_entropy_forward_triton(logits, labels, ignore_index=5, config=GekoConfig(), per_token=False)
    torch.testing.assert_close(token_loss, torch_token_loss(logits, labels, ignore_index=5).float(), atol=1e-5, rtol=1e-5)
    token_scale = torch.ones(labels.shape, device=DEVICE)
    grad = cross_entropy_backward_triton(logits, labels, lse, token_scale, ignore_index=5, inplace=False)
    torch.testing.assert_close(grad.double(), torch_gradient(logits, labels, token_scale, ignore_index=5), atol=1e-6, rtol=1e-5)
    assert bool((grad[0, 1] == 0).all()) and bool((grad[1, 2] == 0).all())


def test_empty_batch():
    logits = torch.randn(0, 3, 8, device=DEVICE)
    labels = torch.zeros(0, 3, dtype=torch.long, device=DEVICE)
    stats, token_loss, lse = cross_entropy_forward_triton(logits, labels, ignore_index=-100, config=GekoConfig(), per_token=False)
    assert token_loss.shape == (0, 3) and lse.shape == (0, 3) and stats.loss.shape == (0,)
    grad = cross_entropy_backward_triton(logits, labels, lse, token_loss, ignore_index=-100, inplace=False)
    assert grad.shape == (0, 3, 8)


def test_backward_rejects_bad_inputs():
    logits, labels = make_batch((2, 3, 8), torch.float32)
    lse = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    scale = torch.ones(2, 3, device=DEVICE)
    with pytest.raises(TypeError, match="lse must be float64"):
        cross_entropy_backward_triton(logits, labels, lse.float(), scale, ignore_index=-100, inplace=False)
    with pytest.raises(ValueError, match=r"token_scale must be \[S, T\]"):
        cross_entropy_backward_triton(logits, labels, lse, scale[:, :2], ignore_index=-100, inplace=False)
    with pytest.raises(TypeError, match="token_scale must be a torch.Tensor"):
        cross_entropy_backward_triton(logits, labels, lse, 1.0, ignore_index=-100, inplace=False)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        cross_entropy_backward_triton(logits, labels, lse, scale, ignore_index=-100, inplace=1)
    with pytest.raises(ValueError, match="stride 1 along V"):
        cross_entropy_backward_triton(logits.transpose(1, 2).contiguous().transpose(1, 2), labels, lse, scale, ignore_index=-100, inplace=False)
    shared_rows = torch.randn(1, 1, 8, device=DEVICE).expand(2, 3, 8)
    with pytest.raises(ValueError, match="do not overlap"):
        cross_entropy_backward_triton(shared_rows, labels, lse, scale, ignore_index=-100, inplace=True)
    # out of place, shared rows are only read: fine
    grad = cross_entropy_backward_triton(shared_rows, labels, lse, scale, ignore_index=-100, inplace=False)
    assert grad.shape == (2, 3, 8)
