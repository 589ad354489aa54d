"""The geko torch operators: schema, fake and autograd registrations (``opcheck``), their
agreement with the eager functions, and ``torch.compile(fullgraph=True)`` of a model plus
the loss and the statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from geko_core import GekoConfig, cross_entropy_with_stats, linear_cross_entropy_with_stats, sample_stats
from geko_core._inputs import config_from_values, config_values
from geko_core.cross_entropy import cross_entropy_backward
from geko_core.linear_cross_entropy import linear_token_backward, linear_token_forward
from geko_core.stats import stats_forward, stats_forward_triton
from geko_core.reference import as_samples

CONFIG = config_values(GekoConfig())


def _inputs(shape, dtype=torch.float32, *, shift=False, ignore=True, requires_grad=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, generator=generator)).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=generator)
    if ignore and labels.dim() == 2:
        labels[0, : labels.shape[1] // 2] = -100
    logits3, labels3 = as_samples(logits, labels, shift=shift)
    # A leaf with the view's strides (the shift view is not contiguous).
    return logits, labels, logits3.detach().requires_grad_(requires_grad), labels3


def test_config_round_trips_through_numbers():
    config = GekoConfig(freeze_confidence=0.95, hard_confidence=0.6, correct_threshold=0.75, noise_guard_visits=4)
    assert config_from_values(config_values(config)) == config
    with pytest.raises(ValueError, match="config"):
        config_from_values(config_values(config)[:-1])


@pytest.mark.parametrize("per_token, write_lse", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("layout", ["2d", "3d", "shift"])
def test_stats_forward_passes_opcheck(per_token, write_lse, layout):
    shape = (5, 7) if layout == "2d" else (3, 6, 7)
    _, _, logits3, labels3 = _inputs(shape, shift=layout == "shift", requires_grad=write_lse)
    torch.library.opcheck(stats_forward, (logits3, labels3, -100, CONFIG, per_token, write_lse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_entropy_backward_passes_opcheck(dtype):
    _, _, logits3, labels3 = _inputs((3, 5, 11), dtype, shift=True)
    lse = torch.logsumexp(logits3.double(), dim=-1)
    scale = torch.rand(logits3.shape[:2])
    torch.library.opcheck(cross_entropy_backward, (logits3, labels3, lse, scale, -100))


def test_stats_forward_equals_sample_stats():
    _, _, logits3, labels3 = _inputs((4, 9, 13))
    blocks = stats_forward(logits3, labels3, -100, CONFIG, True, True)
    expected = sample_stats(logits3, labels3, per_token=True)
    fields = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
    for k, name in enumerate(fields):
        torch.testing.assert_close(blocks[0][k], getattr(expected, name), equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(blocks[3][k], getattr(expected.tokens, name), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(blocks[1], expected.valid_tokens) and torch.equal(blocks[2], expected.bucket)
    assert torch.equal(blocks[4], expected.tokens.valid)
    counted = labels3 != -100
    torch.testing.assert_close(blocks[5][counted], torch.logsumexp(logits3.double(), dim=-1)[counted])
    assert torch.equal(blocks[5][~counted], torch.zeros(int((~counted).sum()), dtype=torch.float64))  # rows never read


def test_token_loss_gradient_is_the_fused_backward():
    _, labels, logits3, labels3 = _inputs((3, 6, 9), shift=True, requires_grad=True)
    blocks = stats_forward(logits3, labels3, -100, CONFIG, False, True)
    scale = torch.rand(labels3.shape)
    (grad,) = torch.autograd.grad((blocks[3][0] * scale).sum(), logits3)
    x = logits3.detach().requires_grad_(True)
    token_loss = F.cross_entropy(x.reshape(-1, 9), labels3.reshape(-1), reduction="none").reshape(labels3.shape)
    (expected,) = torch.autograd.grad((token_loss * scale).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("write_lse", [False, True])
def test_statistics_outputs_are_marked_not_differentiable(write_lse):
    _, _, logits3, labels3 = _inputs((2, 4, 5), requires_grad=True)
    blocks = stats_forward(logits3, labels3, -100, CONFIG, True, write_lse)
    # The measurements say they carry no gradient, and differentiating one raises (it gave a
    # silent zero before); only the token losses of write_lse are differentiable.
    for k in (0, 5) if write_lse else (0, 3, 5):
        assert not blocks[k].requires_grad, k
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(blocks[k].sum(), logits3)
    assert blocks[3].requires_grad == write_lse


def test_public_statistics_are_not_differentiable():
    logits, labels, _, _ = _inputs((3, 6, 9), shift=True)
    x = logits.clone().requires_grad_(True)
    hidden, weight, bias, rows = _linear_inputs()
    h = hidden.clone().requires_grad_(True)
    for backend in ("cpp", "reference"):
        for per_token in (False, True):
            for reduction in ("mean", "none"):
                _, stats = cross_entropy_with_stats(x, labels, shift=True, per_token=per_token, reduction=reduction, backend=backend)
                _, linear = linear_cross_entropy_with_stats(h, weight, rows, bias=bias, per_token=per_token, reduction=reduction, backend=backend)
                for result in (stats, linear):
                    tensors = [*result[:8], *(result.tokens or ())]
                    assert not any(t.requires_grad for t in tensors)
                    with pytest.raises(RuntimeError, match="does not require grad"):
                        result.loss.sum().backward()


def test_linear_operator_log_sum_exp_is_not_differentiable():
    hidden, weight, bias, rows = _linear_inputs()
    h = hidden.clone().requires_grad_(True)
    values, _, _, lse = linear_token_forward(h, weight, bias, rows, -100, 4, CONFIG)
    assert values.requires_grad and not lse.requires_grad


def test_triton_kernel_of_the_operator_matches_the_cpu_kernel():
    pytest.importorskip("triton")
    from geko_core._backend import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 (the test session sets it)")
    for per_token, write_lse in [(False, False), (True, True), (False, True)]:
        _, _, logits3, labels3 = _inputs((3, 5, 17), shift=True)
        got = stats_forward_triton(logits3, labels3, -100, CONFIG, per_token, write_lse)
        want = stats_forward(logits3, labels3, -100, CONFIG, per_token, write_lse)
        counted = labels3 != -100
        for k, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and g.dtype == w.dtype
            if k == 5 and write_lse:  # the log-sum-exp of tokens that do not count is unspecified
                g, w = g[counted], w[counted]
            if g.dtype.is_floating_point:
                torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, equal_nan=True)
            else:
                assert torch.equal(g, w)


class _Tiny(torch.nn.Module):
    def __init__(self, vocab: int = 11, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def _train_step(model, tokens, labels, weight, reduction, shift):
    logits = model(tokens)
    loss, stats = cross_entropy_with_stats(logits, labels, shift=shift, sample_weight=weight, reduction=reduction)
    if reduction == "none":
        loss = loss.sum()
    scores = sample_stats(logits, labels, shift=shift)
    return loss, stats.bucket, stats.confidence, stats.valid_tokens, scores.loss, scores.bucket


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shift", [False, True])
def test_compiled_model_and_loss_trace_as_one_graph(reduction, shift):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Tiny()
    tokens = torch.randint(0, 11, (4, 8))
    labels = torch.randint(0, 11, (4, 8))
    labels[1, :5] = -100
    weight = torch.rand(4)
    compiled = torch.compile(_train_step, fullgraph=True, backend="aot_eager")
    got = compiled(model, tokens, labels, weight, reduction, shift)
    got[0].backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = _train_step(model, tokens, labels, weight, reduction, shift)
    want[0].backward()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:]):
        if g.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            assert torch.equal(g, w)
    for g, p in zip(got_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own import
def test_inductor_compiles_the_loss():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    x = torch.randn(7, 6)
    y = torch.randint(0, 5, (7,))

    def step(x, y):
        loss, stats = cross_entropy_with_stats(model(x), y)
        return loss, stats.bucket

    loss, bucket = torch.compile(step, fullgraph=True)(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_loss, ref_bucket = step(x, y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(bucket, ref_bucket)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_compiled_bad_input_is_refused_while_tracing():
    torch._dynamo.reset()

    def step(logits, labels):
        return cross_entropy_with_stats(logits, labels, reduction="average")

    with pytest.raises(Exception, match="reduction"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))


# -- the linear (hidden states -> loss) operators ---------------------------------------------


def _linear_inputs(rows=10, dim=6, vocab=9, *, bias=True, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=generator).to(dtype).requires_grad_(True)
    weight = torch.randn(vocab, dim, generator=generator).to(dtype).requires_grad_(True)
    b = torch.randn(vocab, generator=generator).to(dtype).requires_grad_(True) if bias else None
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::4] = -100
    return hidden, weight, b, labels


@pytest.mark.parametrize("bias", [True, False])
def test_linear_operators_pass_opcheck(bias):
    hidden, weight, b, labels = _linear_inputs(bias=bias)
    torch.library.opcheck(linear_token_forward, (hidden, weight, b, labels, -100, 3, CONFIG))
    values, _, _, lse = linear_token_forward(hidden, weight, b, labels, -100, 3, CONFIG)
    scale = torch.rand(labels.shape[0])
    args = (hidden.detach(), weight.detach(), None if b is None else b.detach(), labels, lse.detach(), scale, -100, 3)
    torch.library.opcheck(linear_token_backward, args)


def test_linear_operator_gradient_equals_autograd_through_the_logits():
    hidden, weight, b, labels = _linear_inputs()
    values, _, _, _ = linear_token_forward(hidden, weight, b, labels, -100, 4, CONFIG)
    scale = torch.rand(labels.shape[0])
    got = torch.autograd.grad((values[0] * scale).sum(), [hidden, weight, b])
    logits = hidden @ weight.T + b
    token_loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")
    want = torch.autograd.grad((token_loss * scale).sum(), [hidden, weight, b])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shift, bias", [(False, True), (True, False)])
def test_compiled_linear_loss_traces_as_one_graph(reduction, shift, bias):
    torch._dynamo.reset()
    torch.manual_seed(0)
    embed = torch.nn.Embedding(13, 8)
    head = torch.nn.Linear(8, 13, bias=bias)
    tokens = torch.randint(0, 13, (3, 7))
    labels = tokens.clone()
    labels[0, :3] = -100
    weight = torch.rand(3)

    def step(tokens, labels, weight):
        hidden = torch.tanh(embed(tokens))
        if not shift:
            hidden, labels = hidden.reshape(-1, 8), labels.reshape(-1)
            weight = weight.repeat_interleave(7)
        loss, stats = linear_cross_entropy_with_stats(
            hidden, head.weight, labels, bias=head.bias, shift=shift, sample_weight=weight, reduction=reduction, chunk_size=5
        )
        return loss.sum(), stats.bucket, stats.confidence, stats.valid_tokens

    params = [*embed.parameters(), *head.parameters()]
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(tokens, labels, weight)
    got_grads = torch.autograd.grad(got[0], params)
    want = step(tokens, labels, weight)
    want_grads = torch.autograd.grad(want[0], params)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-7, equal_nan=True)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compiled_scoring_pass_has_no_gradient():
    torch._dynamo.reset()
    hidden, weight, b, labels = _linear_inputs()

    def score(hidden, weight, labels):
        return linear_cross_entropy_with_stats(hidden, weight, labels, grad=False)

    loss, stats = torch.compile(score, fullgraph=True, backend="aot_eager")(hidden, weight, labels)
    assert loss.grad_fn is None
    assert torch.equal(stats.bucket, linear_cross_entropy_with_stats(hidden, weight, labels, grad=False)[1].bucket)
