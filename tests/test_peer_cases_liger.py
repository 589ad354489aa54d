"""Liger-Kernel's cross-entropy and fused-linear-cross-entropy cases, re-expressed against
``cross_entropy_with_stats`` and ``linear_cross_entropy_with_stats`` (harness and categories:
``test_peer_cases.py``; the list of documented reasons: docs/linear_loss.md, "Peers' cases").

Liger's CE cases use flat ``[B*T, V]`` logits; its shapes are scaled down here with their odd
sizes kept in spirit (V not a multiple of 16, odd T). A feature we lack is one documented case
per test and reduction, whatever else it is crossed with.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_peer_cases import (
    _close,
    _leaves,
    _logits,
    case,  # noqa: F401 - the fixture
    check,
    check_z_loss,
    needs_large_logits,
    needs_neg_inf,
    torch_loss,
)

from geko_core import cross_entropy_with_stats, linear_cross_entropy_with_stats

# tiny matrices: one thread (two would spin against each other on a shared machine)
pytestmark = pytest.mark.usefixtures("one_thread")

CE_SHAPES = [(2, 32, 509), (3, 47, 331)]  # Liger: (2, 4096, 32000) "llama", (3, 423, 32000) "weird"
FLCE_SHAPES = [(4, 32, 64, 257), (4, 47, 31, 123)]  # Liger: (8, 128, 1024, 4096), (4, 47, 31, 123)
DTYPES = [torch.bfloat16, torch.float32]
REDUCTIONS = ["sum", "mean", "none"]


def _ids(shape):
    return "x".join(map(str, shape))


def _logits_input(B, T, V, dtype, scalar=1.0):
    return (torch.randn(B * T, V) * scalar).to(dtype)


def _ignore_some(y, ignore_index):
    """Liger's pattern: a random number (1 to half) of the targets set to the ignored value."""
    n = y.numel()
    k = int(torch.randint(1, max(2, n // 2), (1,)))
    y[torch.randperm(n)[:k]] = ignore_index
    return y


# -- LigerCrossEntropyLoss ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=_ids)
def test_liger_ce_correctness(case, shape, reduction, dtype):
    B, T, V = shape
    up = torch.rand(B * T) + 0.5 if reduction == "none" else None
    check(case, "ce", (_logits_input(B, T, V, dtype),), torch.randint(0, V, (B * T,)), reduction=reduction, upstream=up)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, ignore_index", [(CE_SHAPES[0], 2), (CE_SHAPES[1], -123)], ids=["509-ii2", "331-ii-123"])
def test_liger_ce_ignore_index(case, shape, ignore_index, reduction, dtype):
    B, T, V = shape
    y = _ignore_some(torch.randint(0, V, (B * T,)), ignore_index)
    check(case, "ce", (_logits_input(B, T, V, dtype),), y, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", CE_SHAPES, ids=_ids)
def test_liger_ce_not_last_layer(case, shape, reduction, dtype):
    """The loss times 3 before backward: the gradient carries the upstream factor."""
    B, T, V = shape
    check(case, "ce", (_logits_input(B, T, V, dtype),), torch.randint(0, V, (B * T,)), reduction=reduction,
          upstream=3.0 * float(torch.rand(())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, ignore_index", [(CE_SHAPES[0], -100), (CE_SHAPES[1], 2)], ids=["509", "331-ii2"])
def test_liger_ce_forward_only(case, shape, ignore_index, reduction, dtype):
    B, T, V = shape
    check(case, "ce", (_logits_input(B, T, V, dtype),), torch.randint(0, V, (B * T,)), ignore_index=ignore_index,
          reduction=reduction, grad=False)


def _class_weight(V):
    return torch.rand(V)  # Liger's class weights: uniform in [0, 1)


# Liger's option rows: (feature, reduction) -> (ignore_index, options, logits scale, upstream factor)
_CE_OPTION_CASES = {
    ("label-smoothing", "mean"): (-100, {"label_smoothing": 0.1}, 1.0, None),
    ("label-smoothing-ignore-index", "mean"): (-300, {"label_smoothing": 0.2}, 1.0, None),
    ("soft-capping", "sum"): (-100, {"softcap": 30.0}, 1.0, None),
    ("soft-capping", "mean"): (-100, {"softcap": 30.0}, 1.0, None),
    ("soft-capping", "none"): (-100, {"softcap": 30.0}, 1.0, None),
    ("z-loss", "mean"): (-100, {"z_loss": 1e-4}, 1.0, None),
    ("z-loss-other-params", "mean"): (2, {"z_loss": 1e-4, "label_smoothing": 0.1}, 1.0, None),
    ("z-loss-other-params", "sum"): (-123, {"z_loss": 1e-5, "label_smoothing": 0.2}, 1.0, None),
    ("class-weights", "sum"): (-100, {"class_weight": "w"}, 1.0, None),
    ("class-weights", "mean"): (-100, {"class_weight": "w"}, 1.0, None),
    ("class-weights", "none"): (-100, {"class_weight": "w"}, 1.0, None),
    ("class-weights-other-params", "sum"): (2, {"class_weight": "w", "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, 1.0, None),
    ("class-weights-other-params", "mean"): (2, {"class_weight": "w", "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, 1.0, None),
    ("class-weights-other-params", "none"): (2, {"class_weight": "w", "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, 1.0, None),
    ("not-last-layer-other-params", "sum"): (-100, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, 1.0, 3.0),
    ("not-last-layer-other-params", "mean"): (-100, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}, 1.0, 3.0),
    ("confident-label-smoothing", "sum"): (-100, {"label_smoothing": 0.1}, 10.0, None),
    ("confident-label-smoothing", "mean"): (-100, {"label_smoothing": 0.1}, 10.0, None),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("feature, reduction", list(_CE_OPTION_CASES), ids=lambda v: v)
def test_liger_ce_options(case, feature, reduction, dtype):
    """Liger's label smoothing, soft-capping, z-loss (``lse_square_scale``) and class weights,
    alone and together, with its ignore indices; the upstream factor of its "not last layer"
    rows."""
    B, T, V = CE_SHAPES[1]
    ignore_index, options, scalar, factor = _CE_OPTION_CASES[feature, reduction]
    options = {k: (_class_weight(V) if v == "w" else v) for k, v in options.items()}
    y = torch.randint(0, V, (B * T,))
    if ignore_index != -100:
        y = _ignore_some(y, ignore_index)
    up = torch.rand(B * T) + 0.5 if reduction == "none" else factor
    check(case, "ce", (_logits_input(B, T, V, dtype, scalar),), y, ignore_index=ignore_index, reduction=reduction,
          upstream=up, options=options)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("feature", ["functional-all-options", "structured-output-z-loss"])
def test_liger_ce_returned_z_loss(case, feature, dtype):
    """Liger's ``return_z_loss=True``: its functional row (ignore_index 0, ``lse_square_scale``
    1e-4, label smoothing 0.1) and its structured output; the z-loss from ``return_lse``."""
    B, T, V = CE_SHAPES[0]
    x = _logits_input(B, T, V, dtype)
    y = torch.randint(0, V, (B * T,))
    if feature == "functional-all-options":
        check_z_loss(case, "ce", (x,), y, ignore_index=0, options={"label_smoothing": 0.1})
    else:
        check_z_loss(case, "ce", (x,), y)


@pytest.mark.parametrize("feature, reduction", [("structured-output-predicted-tokens", "mean"), ("predicted-tokens", "mean")])
def test_liger_ce_unsupported(case, feature, reduction):
    case.unsupported("predicted-tokens")


def test_liger_ce_float32_internal(case):
    """16-bit logits are computed in float32: bfloat16 logits give the loss of the same values
    upcast to float32."""
    x = torch.randn(4, 4099).to(torch.bfloat16)
    y = torch.randint(0, 4099, (4,))
    a, _ = cross_entropy_with_stats(x, y)
    b, _ = cross_entropy_with_stats(x.float(), y)
    assert a.dtype == torch.float32
    assert float((a - b).abs()) <= 1e-6 * float(b.abs())
    case.record("checked")


@pytest.mark.parametrize("shape, ignore_index", [(CE_SHAPES[0], 2), (CE_SHAPES[1], -123)], ids=["509-ii2", "331-ii-123"])
def test_liger_ce_out_of_bounds_target(case, shape, ignore_index):
    B, T, V = shape
    x = _logits_input(B, T, V, torch.bfloat16).requires_grad_()
    y = _ignore_some(torch.randint(0, V, (B * T,)), ignore_index)
    k = int(torch.randint(1, B * T // 2, (1,)))
    y[torch.randperm(B * T)[:k]] = torch.randint(V, 2 * V, (k,))
    case.refused(ValueError, r"outside \[0, \d+\)", lambda: cross_entropy_with_stats(x, y, ignore_index=ignore_index))


def _accuracy_ok(stats, logits, y, ignore_index):
    """stats.correct against the argmax of the materialised logits, rows with a clear winner."""
    with torch.no_grad():
        lg = logits.double()
        top2 = lg.topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * top2.abs().max()
        valid = y != ignore_index
        expect = (lg.argmax(-1) == y).double()
    rows = valid & clear
    assert torch.equal(stats.correct.double()[rows], expect[rows]), "stats.correct differs from argmax == label"
    assert bool(torch.isnan(stats.correct[~valid]).all())


@pytest.mark.parametrize("accuracy", [False, True], ids=["loss", "loss+accuracy"])
def test_liger_ce_structured_output(case, accuracy):
    x = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.7, -0.2, 0.9]])
    y = torch.tensor([0, 1, 2])
    if accuracy:
        _, stats = cross_entropy_with_stats(x, y)
        _accuracy_ok(stats, x, y, -100)
        assert float(stats.correct.mean()) == 1.0
    check(case, "ce", (x,), y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_liger_ce_confident_predictions(case, dtype, reduction):
    """softmax(x_y) close to 1: the label's gradient p_y - 1 is a small difference that must be
    formed before rounding to the 16-bit gradient."""
    N, V = 2 * 32, 1031
    x = torch.randn(N, V)
    y = torch.randint(0, V, (N,))
    x[torch.arange(N), y] = x.max(-1).values + 10.0
    check(case, "ce", (x.to(dtype),), y, reduction=reduction)


@pytest.mark.parametrize("shape, dtype", [((2, 2, 8), torch.float32), ((2, 2, 8), torch.bfloat16), ((3, 5, 41), torch.bfloat16)],
                         ids=["2x2x8-float32", "2x2x8-bfloat16", "3x5x41-bfloat16"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_liger_ce_other_backends(case, backend, shape, dtype):
    """The functional test's shapes (the larger one cut to 15 rows), through the Triton kernels in
    the interpreter and through the plain-torch reference backend."""
    if backend == "triton":
        pytest.importorskip("triton")
    B, T, V = shape
    check(case, "ce", (_logits_input(B, T, V, dtype),), torch.randint(0, V, (B * T,)), backend=backend)


@pytest.mark.parametrize("scalar", [10.0, 1e2, 1e4])
def test_liger_ce_scaled_logits(case, scalar):
    """Liger's ``scalar`` axis: logits ``randn * scalar`` (widely spread, near one-hot softmax)."""
    check(case, "ce", (_logits_input(2, 32, 509, torch.float32, scalar),), torch.randint(0, 509, (64,)))


@needs_large_logits
@pytest.mark.parametrize("offset", [40.0, 1e2, 1e4])
def test_liger_ce_large_logits(case, offset):
    """The scalar axis's hard end: close logits far from 0 (``offset + randn``), where the
    gradient's ``exp(x - lse)`` in float32 loses what ``exp(x - max) / sum`` keeps."""
    x = (offset + torch.randn(64, 509)).to(torch.float32)
    check(case, "ce", (x,), torch.randint(0, 509, (64,)))


@needs_neg_inf
def test_liger_ce_masked_vocabulary(case):
    x = torch.randn(64, 509)
    x[:, 400:] = -math.inf
    check(case, "ce", (x,), torch.randint(0, 400, (64,)))


# -- LigerFusedLinearCrossEntropyLoss ----------------------------------------------------------------


def _head(B, T, H, V, dtype, bias, scalar=1.0):
    h = (torch.randn(B * T, H) * scalar).to(dtype)
    w = torch.rand(V, H).to(dtype)  # Liger's head weights are uniform in [0, 1)
    b = torch.rand(V).to(dtype) if bias else None
    return h, w, b


FLCE_GRID = [("mean", torch.bfloat16), ("mean", torch.float32), ("sum", torch.bfloat16), ("sum", torch.float32)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction, dtype", FLCE_GRID, ids=lambda v: v if isinstance(v, str) else str(v)[6:])
@pytest.mark.parametrize("shape", FLCE_SHAPES, ids=_ids)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "forward-only"])
def test_liger_flce_correctness(case, grad, shape, reduction, dtype, bias):
    B, T, H, V = shape
    y = _ignore_some(torch.randint(0, V, (B * T,)), -100)
    check(case, "linear", _head(B, T, H, V, dtype, bias), y, reduction=reduction, grad=grad, chunk_size=37)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction, dtype", FLCE_GRID, ids=lambda v: v if isinstance(v, str) else str(v)[6:])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "forward-only"])
def test_liger_flce_all_options(case, grad, reduction, dtype, bias):
    """Liger's second parameter row: class weights, label smoothing 0.1, ignore_index 42,
    z-loss 1e-4, soft-capping 30 (its returned z-loss: ``test_liger_flce_unsupported``)."""
    B, T, H, V = FLCE_SHAPES[1]
    y = _ignore_some(torch.randint(0, V, (B * T,)), 42)
    options = {"class_weight": _class_weight(V), "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}
    check(case, "linear", _head(B, T, H, V, dtype, bias), y, ignore_index=42, reduction=reduction, grad=grad,
          chunk_size=37, options=options)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("feature", ["functional-all-options", "structured-output-z-loss"])
def test_liger_flce_returned_z_loss(case, feature, dtype):
    B, T, H, V = FLCE_SHAPES[1]
    y = _ignore_some(torch.randint(0, V, (B * T,)), 42)
    options = {"class_weight": _class_weight(V), "label_smoothing": 0.1, "softcap": 30.0} if feature == "functional-all-options" else None
    check_z_loss(case, "linear", _head(B, T, H, V, dtype, True), y, ignore_index=42, options=options, chunk_size=37)


def test_liger_flce_unsupported(case):
    case.unsupported("predicted-tokens")


@pytest.mark.parametrize("accuracy", [True, False], ids=["accuracy", "loss"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", FLCE_SHAPES, ids=_ids)
def test_liger_flce_token_accuracy(case, shape, dtype, bias, accuracy):
    """The token accuracy is our statistics' ``correct`` (per row of [N, d] inputs)."""
    B, T, H, V = shape
    ts = _head(B, T, H, V, dtype, bias)
    y = _ignore_some(torch.randint(0, V, (B * T,)), -100)
    if accuracy:
        with torch.no_grad():
            _, stats = linear_cross_entropy_with_stats(*ts[:2], y, bias=ts[2])
            _accuracy_ok(stats, _logits("linear", ts), y, -100)
    check(case, "linear", ts, y)


@pytest.mark.parametrize("accum", ["default", "float32"])
@pytest.mark.parametrize("bias, cast", [(True, torch.bfloat16), (True, torch.float16),
                                        (False, torch.bfloat16), (False, torch.float16)],
                         ids=["bias-bf16", "bias-fp16", "nobias-bf16", "nobias-fp16"])
@pytest.mark.parametrize("shape", FLCE_SHAPES, ids=_ids)
def test_liger_flce_autocast(case, shape, bias, cast, accum):
    """float32 head and hidden states under CPU autocast; ours must be at least as close to the
    float64 loss and gradients as torch's autocast path (Liger's accumulator dtype is ours
    already: float32)."""
    B, T, H, V = shape
    ts = _head(B, T, H, V, torch.float32, bias)
    y = torch.randint(0, V, (B * T,))
    mine, ref_in, same_in = _leaves(ts), _leaves(ts, torch.float64), _leaves(ts)
    with torch.autocast("cpu", dtype=cast):
        loss, _ = linear_cross_entropy_with_stats(mine[0], mine[1], y, bias=mine[2])
        same = F.cross_entropy(_logits("linear", same_in).float(), y)
    ref = torch_loss("linear", ref_in, y, ignore_index=-100, reduction="mean", shift=False, work_dtype=torch.float64)
    _close("loss", loss, ref, same, torch.float32)
    for out in (loss, ref, same):
        out.backward()
    for name, a, r, s in zip(("grad 0", "grad 1", "grad 2"), mine, ref_in, same_in):
        if a is not None:
            _close(name, a.grad, r.grad, s.grad, torch.float32)
    case.record("checked")


def _token_scaled(total: bool):
    """Liger's token scaling: each token loss times its label probability, a constant.
    Ours: the ``"none"`` token losses of ``[N, d]`` rows times ``stats.label_prob``."""

    def post(loss, stats, info):
        if stats is not None:
            p = torch.nan_to_num(stats.label_prob, nan=0.0).to(loss.dtype)
        else:
            kind, ts, labels, kw = info
            with torch.no_grad():
                valid = labels != kw["ignore_index"]
                probs = torch.softmax(_logits(kind, ts).double(), -1)
                p = probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
                p = p.to(loss.dtype)
        out = loss * p
        return out.sum() if total else out

    return post


@pytest.mark.parametrize("variant", ["none", "sum-functional-vs-module", "sum-functional", "sum-module", "none-ignore-index"])
def test_liger_flce_token_scaling(case, variant):
    B, T, H, V = 2, 4, 8, 16
    h, w, b = torch.randn(B * T, H), torch.randn(V, H), torch.randn(V)
    y = torch.randint(0, V, (B * T,))
    if variant == "none-ignore-index":
        y[::3] = -100
    check(case, "linear", (h, w, b), y, reduction="none", post=_token_scaled(variant.startswith("sum")))


@pytest.mark.parametrize("accuracy", [False, True], ids=["loss", "loss+accuracy"])
def test_liger_flce_structured_output(case, accuracy):
    h = torch.tensor([[0.2, -0.1], [1.0, 0.5], [-0.3, 0.7]])
    w = torch.tensor([[0.5, -0.4], [-0.2, 0.3], [0.1, 0.6]])
    b = torch.tensor([0.1, -0.2, 0.05])
    y = torch.tensor([0, 1, 2])
    if accuracy:
        _, stats = linear_cross_entropy_with_stats(h, w, y, bias=b)
        _accuracy_ok(stats, F.linear(h, w, b), y, -100)
    check(case, "linear", (h, w, b), y)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(2, 16, 32, 64), (1, 32, 64, 128)], ids=_ids)
def test_liger_flce_none_per_token_upstream(case, shape, bias):
    """A non-uniform upstream gradient of the ``"none"`` losses reaches every row's share of the
    weight and bias gradients."""
    B, T, H, V = shape
    h, w = torch.randn(B * T, H) * 0.1, torch.randn(V, H) * 0.1
    b = torch.randn(V) * 0.1 if bias else None
    check(case, "linear", (h, w, b), torch.randint(0, V, (B * T,)), reduction="none",
          upstream=torch.rand(B * T) + 0.5, chunk_size=7)


@pytest.mark.parametrize("shape, dtype", [((2, 2, 8, 8), torch.float32), ((2, 2, 8, 8), torch.bfloat16),
                                          ((3, 5, 41, 41), torch.float32)],
                         ids=["2x2x8x8-float32", "2x2x8x8-bfloat16", "3x5x41x41-float32"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_liger_flce_other_backends(case, backend, shape, dtype):
    """The functional test's shapes (the larger one cut to 15 rows), the chunk loop running the
    Triton kernels in the interpreter, and the plain-torch reference backend."""
    if backend == "triton":
        pytest.importorskip("triton")
    B, T, H, V = shape
    check(case, "linear", _head(B, T, H, V, dtype, True), torch.randint(0, V, (B * T,)), backend=backend, chunk_size=16)


