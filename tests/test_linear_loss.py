"""linear_cross_entropy_with_stats: the loss and the gradients of hidden, weight and bias against
torch autograd through F.cross_entropy on the materialised logits, the statistics against
sample_stats on those logits, the chunking, the scoring pass, the backends and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import geko_core
import geko_core._linear_chunks as chunks
import geko_core.linear_cross_entropy as linear_module
from geko_core import GekoConfig, linear_cross_entropy_with_stats, sample_stats
from geko_core.config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT
import geko_core._chunk_products as chunk_products
from geko_core._chunk_products import wide_products
from geko_core.types import SampleStats

B, T, D, V = 3, 5, 8, 37
CHUNKS = [1, 3, 7, 1000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: Gradient tolerance relative to the largest reference gradient, and loss tolerance.
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float64: 1e-6}
LOSS_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float64: 1e-6}


def make_case(layout: str, dtype: torch.dtype = torch.float32, *, vocab: int = V, exact: bool = False):
    """hidden, weight, bias, labels (with ignored tokens and, in 3-D, an all-ignored sample)."""
    shape = (B * T, D) if layout == "2d" else (B, T, D)
    if exact:
        # multiples of 1/4 and 1/8 with few terms: every logit is exact in any dtype and any
        # summation order, so the chunked matmul equals the full one bit for bit
        hidden = torch.randint(-3, 4, shape).to(dtype) / 4
        weight = torch.randint(-3, 4, (vocab, D)).to(dtype) / 4
        bias = torch.randint(-4, 5, (vocab,)).to(dtype) / 8
    else:
        hidden = torch.randn(shape).to(dtype)
        weight = (torch.randn(vocab, D) * 0.7).to(dtype)
        bias = (torch.randn(vocab) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, shape[:-1])
    if layout == "2d":
        labels[::4] = -100
    else:
        labels[0, 1] = -100
        labels[1, 3:] = -100
        labels[2] = -100  # a sample without valid tokens
    return hidden, weight, bias, labels


def reference_loss(hidden, weight, bias, labels, *, shift=False, sample_weight=None, reduction="mean", ignore_index=-100):
    """The loss in float64 with torch autograd through F.cross_entropy on the full logits."""
    logits = hidden @ weight.T
    flat = logits.dim() == 2
    if bias is not None:
        logits = logits + bias
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    samples, tokens, vocab = logits.shape
    token_loss = F.cross_entropy(
        logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).reshape(samples, tokens)
    count = (labels != ignore_index).sum(dim=1)
    weights = torch.ones(samples, dtype=token_loss.dtype) if sample_weight is None else sample_weight.to(token_loss.dtype)
    if reduction == "none":
        token_loss = token_loss * weights[:, None]
        return token_loss.reshape(-1) if flat else token_loss
    per_sample = token_loss.sum(dim=1) * weights
    if reduction == "per_sample":
        return per_sample / count.clamp(min=1)
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / count.sum()


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_grads_close(got, want, dtype):
    for g, w in zip(got, want):
        assert g is not None and g.dtype == dtype and g.shape == w.shape
        scale = float(w.abs().max()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w, rtol=GRAD_TOL[dtype], atol=GRAD_TOL[dtype] * max(scale, 1e-3))


# -- loss and gradients against torch -----------------------------------------------------------


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d-shift"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_match_torch(dtype, layout, reduction, chunk_size):
    hidden, weight, bias, labels = make_case(layout, dtype)
    shift = layout == "3d-shift"
    samples = hidden.shape[0]
    sample_weight = torch.linspace(0.5, 2.0, samples)
    h, w, b = leaves(hidden, weight, bias)
    loss, stats = linear_cross_entropy_with_stats(
        h, w, labels, bias=b, shift=shift, sample_weight=sample_weight, reduction=reduction, chunk_size=chunk_size
    )
    rh, rw, rb = leaves(hidden.double(), weight.double(), bias.double())
    ref = reference_loss(rh, rw, rb, labels, shift=shift, sample_weight=sample_weight, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape and loss.grad_fn is not None
    torch.testing.assert_close(loss.double(), ref, rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
    upstream = torch.linspace(-1.0, 2.0, ref.numel()).reshape(ref.shape) if ref.dim() else torch.tensor(1.7)
    got = torch.autograd.grad(loss, (h, w, b), upstream)
    want = torch.autograd.grad(ref, (rh, rw, rb), upstream.double())
    assert_grads_close(got, want, dtype)
    if shift:
        assert bool((got[0][:, -1] == 0).all())  # the last position predicts nothing
    assert isinstance(stats, SampleStats) and stats.bucket.shape == (samples,)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_products_in_either_dtype_match_torch(monkeypatch, dtype, wide):
    """16-bit chunk products run in the inputs' dtype (a GPU, a CPU with 16-bit matrix
    instructions) or in float32 (other CPUs): both give torch's loss and gradients."""
    monkeypatch.setattr(chunk_products, "wide_products", lambda dtype, device: wide)
    hidden, weight, bias, labels = make_case("3d-shift", dtype)
    h, w, b = leaves(hidden, weight, bias)
    assert chunk_products.ChunkProducts(weight, 4).wide is wide
    loss, stats = linear_cross_entropy_with_stats(h, w, labels, bias=b, shift=True, chunk_size=4)
    rh, rw, rb = leaves(hidden.double(), weight.double(), bias.double())
    ref = reference_loss(rh, rw, rb, labels, shift=True)
    torch.testing.assert_close(loss.double(), ref, rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
    got = torch.autograd.grad(loss, (h, w, b))
    assert [g.dtype for g in got] == [dtype] * 3
    assert_grads_close(got, torch.autograd.grad(ref, (rh, rw, rb)), dtype)
    # the statistics are those of the 16-bit logits
    logits = (hidden.float() @ weight.float().T).to(dtype) + bias
    assert_stats_identical(stats, sample_stats(logits, labels, shift=True))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unweighted_loss_is_f_cross_entropy(reduction):
    hidden, weight, bias, labels = make_case("2d")
    h, w = leaves(hidden, weight)
    loss, _ = linear_cross_entropy_with_stats(h, w, labels, bias=bias, reduction=reduction, chunk_size=4)
    rh, rw = leaves(hidden, weight)
    ref = F.cross_entropy(rh @ rw.T + bias, labels, reduction=reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(torch.autograd.grad(loss, (h, w)), [g.double() for g in torch.autograd.grad(ref, (rh, rw))], torch.float32)


def test_float64_cpp_gradients_match_reference_backend():
    hidden, weight, bias, labels = make_case("3d", torch.float64)
    results = {}
    for backend in ("cpp", "reference"):
        h, w, b = leaves(hidden, weight, bias)
        loss, _ = linear_cross_entropy_with_stats(h, w, labels, bias=b, shift=True, reduction="none", chunk_size=4, backend=backend)
        upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        results[backend] = (loss, *torch.autograd.grad(loss, (h, w, b), upstream))
    assert all(g.dtype == torch.float64 for g in results["cpp"][1:])
    for got, want in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def test_only_the_inputs_that_require_grad_get_one():
    hidden, weight, bias, labels = make_case("3d")
    h = hidden.clone().requires_grad_(True)
    loss, _ = linear_cross_entropy_with_stats(h, weight, labels, bias=bias, chunk_size=3)
    (gh,) = torch.autograd.grad(loss, (h,))
    rh = hidden.double().requires_grad_(True)
    (want,) = torch.autograd.grad(reference_loss(rh, weight.double(), bias.double(), labels), (rh,))
    assert_grads_close([gh], [want], torch.float32)
    w = weight.clone().requires_grad_(True)
    loss, _ = linear_cross_entropy_with_stats(hidden, w, labels, chunk_size=3, reduction="none")
    loss.sum().backward()
    rw = weight.double().requires_grad_(True)
    reference_loss(hidden.double(), rw, None, labels, reduction="none").sum().backward()
    assert_grads_close([w.grad], [rw.grad], torch.float32)


def test_tied_weight_accumulates_with_the_embedding():
    torch.manual_seed(1)
    ids = torch.randint(0, V, (B, T))
    labels = torch.randint(0, V, (B, T))
    labels[1, :2] = -100
    grads = {}
    for kind in ("ours", "torch"):
        torch.manual_seed(2)
        embedding = torch.nn.Embedding(V, D)
        mix = torch.nn.Linear(D, D)
        for _ in range(2):  # two steps: the second adds to the .grad of the first
            hidden = torch.tanh(mix(embedding(ids)))
            if kind == "ours":
                loss, _ = linear_cross_entropy_with_stats(hidden, embedding.weight, labels, shift=True, chunk_size=4)
            else:
                logits = hidden @ embedding.weight.T
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
            loss.backward()
        grads[kind] = (embedding.weight.grad.clone(), mix.weight.grad.clone())
    for got, want in zip(grads["ours"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_second_backward_through_a_mean_loss_is_refused():
    hidden, weight, bias, labels = make_case("2d")
    h = hidden.clone().requires_grad_(True)
    loss, _ = linear_cross_entropy_with_stats(h, weight, labels, chunk_size=5)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match="already handed out"):
        loss.backward()
    assert torch.equal(h.grad, first)


def test_gradients_scale_with_the_upstream_gradient():
    hidden, weight, bias, labels = make_case("3d")
    results = []
    for factor in (1.0, -2.5):
        h, w, b = leaves(hidden, weight, bias)
        loss, _ = linear_cross_entropy_with_stats(h, w, labels, bias=b, reduction="sum", chunk_size=2)
        (loss * factor).backward()
        results.append((h.grad, w.grad, b.grad))
    for one, scaled in zip(*results):
        torch.testing.assert_close(scaled, one * -2.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [False, True])
def test_gradcheck_reference_fp64(reduction, shift):
    hidden = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4))
    labels[0, 2] = -100
    sample_weight = torch.tensor([0.5, 1.5], dtype=torch.float64)

    def fn(h, w, b):
        return linear_cross_entropy_with_stats(
            h, w, labels, bias=b, shift=shift, sample_weight=sample_weight, reduction=reduction, backend="reference"
        )[0]

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


# -- statistics --------------------------------------------------------------------------------


def assert_stats_identical(got: SampleStats, want: SampleStats) -> None:
    for field in ("loss", "confidence", "label_prob", "correct", "entropy", "el2n", "valid_tokens", "bucket"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(a.nan_to_num(123.0), b.nan_to_num(123.0)), (field, a, b)
        assert torch.equal(a.isnan(), b.isnan()), field
    assert (got.tokens is None) == (want.tokens is None)
    if got.tokens is not None:
        for field in got.tokens._fields:
            a, b = getattr(got.tokens, field), getattr(want.tokens, field)
            assert a.shape == b.shape and torch.equal(a, b), field


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("layout", ["2d", "3d", "3d-shift"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_bit_identical_to_sample_stats_on_exact_logits(dtype, layout, chunk_size):
    hidden, weight, bias, labels = make_case(layout, dtype, vocab=11, exact=True)
    shift = layout == "3d-shift"
    for grad in (True, False):
        h = hidden.clone().requires_grad_(grad)
        _, got = linear_cross_entropy_with_stats(h, weight, labels, bias=bias, shift=shift, chunk_size=chunk_size, per_token=True)
        want = sample_stats(hidden @ weight.T + bias, labels, shift=shift, per_token=True)
        assert_stats_identical(got, want)
    assert bool((want.bucket == -1).any())  # the all-ignored sample (or a 2-D ignored token) is invalid


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("layout", ["2d", "3d-shift"])
def test_stats_match_sample_stats_on_random_logits(layout, chunk_size, check_stats):
    hidden, weight, bias, labels = make_case(layout)
    shift = layout == "3d-shift"
    _, got = linear_cross_entropy_with_stats(hidden, weight, labels, bias=bias, shift=shift, chunk_size=chunk_size, per_token=True)
    logits = hidden @ weight.T + bias
    check_stats(got, logits, labels, shift=shift, per_token=True)
    want = sample_stats(logits, labels, shift=shift)
    for field in ("bucket", "valid_tokens", "correct"):
        assert torch.equal(getattr(got, field).nan_to_num(9), getattr(want, field).nan_to_num(9)), field


def test_long_sequence_is_chunked_and_stats_are_exact():
    hidden = torch.randint(-3, 4, (1, 1200, 4)).float() / 4
    weight = torch.randint(-3, 4, (9, 4)).float() / 4
    labels = torch.randint(0, 9, (1, 1200))
    labels[0, ::7] = -100
    calls = []
    original = chunks._chunk_logits

    def spy(buffer, hidden_chunk, w, b):
        calls.append(hidden_chunk.shape[0])
        return original(buffer, hidden_chunk, w, b)

    chunks._chunk_logits = spy
    try:
        h = hidden.clone().requires_grad_(True)
        loss, got = linear_cross_entropy_with_stats(h, weight, labels, shift=True, chunk_size=128)
        loss.backward()
    finally:
        chunks._chunk_logits = original
    assert len(calls) == math.ceil(1200 / 128) and max(calls) == 128
    assert_stats_identical(got, sample_stats(hidden @ weight.T, labels, shift=True))


def test_default_chunk_size_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert chunks._free_memory_bytes(cpu) > 0
    rows = chunks.default_chunk_rows(8192, 32000, torch.float32, cpu)
    assert 1 <= rows < 8192  # a long sequence is cut
    assert rows * 32000 * 4 <= chunks.MAX_CHUNK_BUFFER_BYTES
    monkeypatch.setattr(chunks, "_free_memory_bytes", lambda device: 2**40)
    cap = chunks.MAX_CHUNK_BUFFER_BYTES
    assert chunks.default_chunk_rows(8192, 32000, torch.float32, cpu) == cap // (32000 * 4)
    # 16-bit products that run in float32 (a CPU without 16-bit matrix instructions) add a
    # float32 scratch to each logit of the buffer
    bf16_bytes = 2 + (4 if wide_products(torch.bfloat16, cpu) else 0)
    assert chunks.default_chunk_rows(8192, 32000, torch.bfloat16, cpu) == cap // (32000 * bf16_bytes)
    monkeypatch.setattr(chunks, "_free_memory_bytes", lambda device: 8 * 1000 * 4 * 10)
    assert chunks.default_chunk_rows(500, 1000, torch.float32, torch.device("cpu")) == 10
    assert chunks.default_chunk_rows(5, 1000, torch.float32, torch.device("cpu")) == 5
    monkeypatch.setattr(chunks, "_free_memory_bytes", lambda device: 0)
    assert chunks.default_chunk_rows(500, 1000, torch.float32, torch.device("cpu")) == 1
    hidden, weight, bias, labels = make_case("3d")
    loss, stats = linear_cross_entropy_with_stats(hidden, weight, labels)  # one row per chunk
    want = linear_cross_entropy_with_stats(hidden, weight, labels, chunk_size=1000)
    torch.testing.assert_close(loss, want[0])
    assert torch.equal(stats.bucket, want[1].bucket)


def _threshold_logits(threshold: float) -> torch.Tensor:
    """float32 offsets t around log(thr / (1 - thr)) for which [0, -t] has confidence exactly
    float32(threshold) on the C++ kernel, with their neighbours."""
    center = np.float32(math.log(threshold / (1 - threshold)))
    offsets = [center]
    up = down = center
    for _ in range(2000):
        up, down = np.nextafter(up, np.float32(10)), np.nextafter(down, np.float32(-10))
        offsets += [up, down]
    return torch.tensor(np.array(offsets, dtype=np.float32))


@pytest.mark.parametrize(("threshold", "label", "at", "above"), [(0.85, 0, BUCKET_LIGHT, BUCKET_FREEZE), (0.6, 1, BUCKET_FOCUS, BUCKET_HARD)])
def test_bucket_thresholds_compare_like_the_kernels(threshold, label, at, above):
    """Confidence exactly at a threshold is not above it, in float32, on both paths."""
    offsets = _threshold_logits(threshold)
    hidden = torch.stack([torch.ones_like(offsets), offsets], dim=1)
    weight = torch.tensor([[0.0, 0.0], [0.0, -1.0]])  # logits [0, -t], exactly
    labels = torch.full((offsets.shape[0],), label)
    _, got = linear_cross_entropy_with_stats(hidden, weight, labels, chunk_size=7)
    want = sample_stats(hidden @ weight.T, labels)
    assert_stats_identical(got, want)
    exact = got.confidence == np.float32(threshold)
    assert bool(exact.any()), "no offset gives the threshold exactly"
    assert bool((got.bucket[exact] == at).all())
    assert bool((got.bucket[got.confidence > np.float32(threshold)] == above).all())


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_correct_margin_uses_the_lowest_label_probability(chunk_size):
    hidden = torch.randint(-3, 4, (4, 6, 4)).float() / 2
    weight = torch.randint(-3, 4, (9, 4)).float() / 2
    labels = (hidden @ weight.T).argmax(dim=-1)  # every token right: the samples are correct
    labels[0, 0] = -100
    labels[1] = -100
    config = GekoConfig(correct_margin=0.95)
    _, got = linear_cross_entropy_with_stats(hidden, weight, labels, config=config, chunk_size=chunk_size)
    want = sample_stats(hidden @ weight.T, labels, config=config)
    assert_stats_identical(got, want)
    plain = sample_stats(hidden @ weight.T, labels)
    assert not torch.equal(want.bucket, plain.bucket)  # the margin changed some bucket


def test_non_finite_hidden_invalidates_its_sample():
    hidden, weight, bias, labels = make_case("3d", exact=True)
    hidden[1, 2, 0] = math.nan
    hidden[0, 4, 1] = math.inf
    _, got = linear_cross_entropy_with_stats(hidden, weight, labels, bias=bias, chunk_size=3)
    want = sample_stats(hidden @ weight.T + bias, labels)
    assert_stats_identical(got, want)
    assert bool((got.bucket[:2] == -1).all())


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("tokens", [0, 1])
def test_empty_and_tokenless_batches(tokens, shift):
    hidden = torch.zeros(2, tokens, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    labels = torch.zeros(2, tokens, dtype=torch.int64)
    loss, stats = linear_cross_entropy_with_stats(hidden, weight, labels, shift=shift, reduction="sum")
    loss.backward()
    if tokens == 0 or shift:  # no token is scored
        assert float(loss.detach()) == 0.0 and bool((stats.bucket == -1).all())
        assert bool((hidden.grad == 0).all()) and bool((weight.grad == 0).all())
    else:  # zero hidden states: uniform logits
        torch.testing.assert_close(loss, torch.tensor(2 * math.log(V)))
        assert bool((stats.bucket >= 0).all())
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    empty, stats = linear_cross_entropy_with_stats(torch.zeros(0, D), weight.detach(), torch.zeros(0, dtype=torch.int64), reduction="none")
    assert empty.shape == (0,) and stats.bucket.shape == (0,)


# -- the scoring pass ----------------------------------------------------------------------------


class _CoreSpy:
    def __init__(self, core):
        self.core = core
        self.backward_calls = 0

    def __getattr__(self, name):
        return getattr(self.core, name)

    def cross_entropy_backward(self, *args):
        self.backward_calls += 1
        return self.core.cross_entropy_backward(*args)


@pytest.mark.parametrize("how", ["grad=False", "no_grad", "nothing requires grad"])
def test_scoring_pass_computes_no_gradient(how, monkeypatch):
    hidden, weight, bias, labels = make_case("3d")
    spy = _CoreSpy(chunks.load_compiled_core())
    monkeypatch.setattr(chunks, "load_compiled_core", lambda: spy)
    requires = how != "nothing requires grad"
    h, w, b = (t.clone().requires_grad_(requires) for t in (hidden, weight, bias))
    if requires:
        w.grad = torch.full_like(w, 0.25)
    grad_before = None if w.grad is None else w.grad.clone()
    if how == "no_grad":
        with torch.no_grad():
            loss, stats = linear_cross_entropy_with_stats(h, w, labels, bias=b, chunk_size=4)
    else:
        loss, stats = linear_cross_entropy_with_stats(h, w, labels, bias=b, chunk_size=4, grad=how != "grad=False")
    assert loss.grad_fn is None and not loss.requires_grad
    assert spy.backward_calls == 0
    assert h.grad is None and b.grad is None
    assert (w.grad is None) == (grad_before is None) and (grad_before is None or torch.equal(w.grad, grad_before))
    trained_loss, trained_stats = linear_cross_entropy_with_stats(hidden, weight.clone().requires_grad_(True), labels, bias=bias, chunk_size=4)
    assert spy.backward_calls > 0
    torch.testing.assert_close(loss, trained_loss.detach())
    assert_stats_identical(stats, trained_stats)


# -- the Triton backend in the interpreter --------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_cpp(dtype, reduction):
    pytest.importorskip("triton")
    hidden, weight, bias, labels = make_case("3d", dtype, vocab=19)
    results = {}
    for backend in ("cpp", "triton"):
        h, w, b = leaves(hidden, weight, bias)
        loss, stats = linear_cross_entropy_with_stats(
            h, w, labels, bias=b, shift=True, reduction=reduction, chunk_size=3, per_token=True, backend=backend
        )
        grads = torch.autograd.grad(loss, (h, w, b), torch.ones_like(loss))
        results[backend] = (loss, stats, grads)
    (loss_c, stats_c, grads_c), (loss_t, stats_t, grads_t) = results["cpp"], results["triton"]
    torch.testing.assert_close(loss_t, loss_c, rtol=1e-5, atol=1e-5)
    for field in ("bucket", "valid_tokens", "correct"):
        assert torch.equal(getattr(stats_t, field).nan_to_num(9), getattr(stats_c, field).nan_to_num(9)), field
    for field in ("loss", "confidence", "label_prob", "entropy", "el2n"):
        torch.testing.assert_close(getattr(stats_t, field), getattr(stats_c, field), rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.equal(stats_t.tokens.valid, stats_c.tokens.valid)
    assert_grads_close(grads_t, [g.double() for g in grads_c], dtype)


def test_triton_backend_refuses_float64():
    pytest.importorskip("triton")
    hidden, weight, bias, labels = make_case("2d", torch.float64)
    with pytest.raises(TypeError, match="hidden must be float32, bfloat16 or float16 on the Triton backend"):
        linear_cross_entropy_with_stats(hidden, weight, labels, backend="triton")


# -- refusals ------------------------------------------------------------------------------------


def _bad_inputs():
    hidden, weight, bias, labels = make_case("3d")
    ok = dict(hidden=hidden, weight=weight, labels=labels)
    return [
        (dict(ok, hidden=hidden.numpy()), {}, TypeError, "hidden must be a torch.Tensor"),
        (dict(ok, hidden=hidden.to(torch.int32)), {}, TypeError, "hidden must be"),
        (dict(ok, hidden=hidden[0, 0]), {}, ValueError, "hidden must be"),
        (dict(ok, weight=weight.double()), {}, TypeError, "weight must have the dtype of hidden"),
        (dict(ok, weight=weight[:, :-1]), {}, ValueError, "d = hidden.shape"),
        (dict(ok, weight=weight[0]), {}, ValueError, "weight must be"),
        (dict(ok, weight=weight[:1]), {}, ValueError, "vocabulary size"),
        (dict(ok, weight=torch.zeros(262_145, D)), {}, ValueError, "vocabulary size"),
        (dict(ok, labels=labels.float()), {}, TypeError, "labels must be an integer tensor"),
        (dict(ok, labels=labels[:, :-1]), {}, ValueError, "labels shape"),
        (dict(ok, labels=torch.full_like(labels, V)), {}, ValueError, f"label {V}"),
        (ok, dict(bias=bias.double()), TypeError, "bias must have the dtype of hidden"),
        (ok, dict(bias=bias[:-1]), ValueError, "bias must be"),
        (ok, dict(bias=bias.numpy()), TypeError, "bias must be"),
        (ok, dict(sample_weight=torch.ones(B + 1)), ValueError, "sample_weight"),
        (ok, dict(sample_weight=torch.ones(B, dtype=torch.int64)), TypeError, "sample_weight"),
        (ok, dict(ignore_index=1.5), TypeError, "ignore_index"),
        (ok, dict(shift=1), TypeError, "shift"),
        (dict(ok, hidden=hidden[0], labels=labels[0]), dict(shift=True), ValueError, "shift=True needs"),
        (ok, dict(reduction="avg"), ValueError, "reduction"),
        (ok, dict(chunk_size=0), ValueError, "chunk_size"),
        (ok, dict(chunk_size=-3), ValueError, "chunk_size"),
        (ok, dict(chunk_size=2.0), TypeError, "chunk_size"),
        (ok, dict(chunk_size=True), TypeError, "chunk_size"),
        (ok, dict(grad=1), TypeError, "grad"),
        (ok, dict(grad=None), TypeError, "grad"),
        (ok, dict(per_token="yes"), TypeError, "per_token"),
        (ok, dict(config={"freeze_confidence": 0.9}), TypeError, "config"),
        (ok, dict(backend="cuda"), ValueError, "backend"),
        (dict(ok, hidden=hidden.to("meta")), {}, ValueError, "same device"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_input_is_refused_before_anything_runs(index, monkeypatch):
    tensors, options, error, match = _bad_inputs()[index]
    called = []
    monkeypatch.setattr(linear_module, "run_chunks", lambda *a, **k: called.append(1))
    leaves_ = {k: v.clone().requires_grad_(v.dtype.is_floating_point) if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dim() else v for k, v in tensors.items()}
    before = {k: v.detach().clone() for k, v in leaves_.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises(error, match=match):
        linear_cross_entropy_with_stats(leaves_["hidden"], leaves_["weight"], leaves_["labels"], **options)
    assert not called
    for name, value in before.items():
        assert torch.equal(leaves_[name].detach(), value), name
        assert leaves_[name].grad is None


def test_package_exports_the_function():
    assert geko_core.linear_cross_entropy_with_stats is linear_cross_entropy_with_stats
    assert "linear_cross_entropy_with_stats" in geko_core.__all__
    assert isinstance(GekoConfig(), GekoConfig)
