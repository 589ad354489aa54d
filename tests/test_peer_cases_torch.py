"""PyTorch 2.13's ``linear_cross_entropy`` and ``cross_entropy`` cases (its OpInfo samples, its
ModuleInfo inputs of ``nn.LinearCrossEntropyLoss``, its own linear-loss tests), re-expressed
against ``cross_entropy_with_stats`` and ``linear_cross_entropy_with_stats`` (harness and
categories: ``test_peer_cases.py``; the list of documented reasons: docs/linear_loss.md,
"Peers' cases")."""

from __future__ import annotations

import math

import pytest
import torch
from test_peer_cases import (
    UNSUPPORTED,
    case,  # noqa: F401 - the fixture
    check,
    needs_float64,
    needs_for,
    needs_ignore_none,
    needs_neg_inf,
)

from geko_core import linear_cross_entropy_with_stats

# tiny matrices: one thread (two would spin against each other on a shared machine)
pytestmark = pytest.mark.usefixtures("one_thread")


# -- torch 2.13: OpInfo samples of nn.functional.linear_cross_entropy --------------------------------
# Its samples: each entry of a keyword list (reductions, class weights, ignore_index=1, a linear
# bias, and for the chunked variants batch chunk sizes 2/3 and a float32 accumulator for 16-bit
# inputs), crossed with class-index or probability targets and with linear samples: unbatched
# [d] inputs (re-expressed as one row), [8, d] inputs for (d, C) in {(3, 4), (8, 8)}, and
# K-dimensional linear weights (several softmaxes per row).

_OPINFO_ENTRIES = [
    # (variant, reduction, class weights, ignore_index, bias, chunk)
    ("plain", "mean", False, None, False, None), ("plain", "sum", False, None, False, None),
    ("plain", "none", False, None, False, None),
    ("plain", "mean", True, None, False, None), ("plain", "sum", True, None, False, None),
    ("plain", "none", True, None, False, None),
    ("plain", "mean", False, 1, False, None), ("plain", "mean", False, None, True, None),
    ("plain", "sum", True, None, True, None),
    ("chunked", "mean", False, None, False, 2), ("chunked", "sum", False, None, False, 2),
    ("chunked", "mean", False, None, False, 3), ("chunked", "sum", False, None, False, 3),
    ("chunked", "mean", True, None, False, 2), ("chunked", "sum", True, None, False, 2),
    ("chunked", "mean", False, 1, False, 2), ("chunked", "mean", True, 1, False, 2),
    ("chunked", "mean", False, None, True, 2), ("chunked", "sum", True, None, True, 2),
    ("chunked", "mean", False, 1, True, 2),
    ("chunked_none", "none", False, None, False, 2), ("chunked_none", "none", False, None, False, 3),
    ("chunked_none", "none", True, None, False, 2), ("chunked_none", "none", False, None, True, 2),
    ("chunked_none", "none", True, None, True, 2), ("chunked_none", "none", False, 1, True, 2),
]
_OPINFO_SHAPES = [("unbatched", 3, 4), ("unbatched", 8, 8), ("rows", 3, 4), ("rows", 8, 8), ("kdim", 0, 0)]


def _opinfo_params():
    for entry in _OPINFO_ENTRIES:
        variant, reduction, cw, ii, bias, chunk = entry
        ident = f"torch-opinfo-{variant}-{reduction}-{'cw' if cw else 'nocw'}-ii{ii}-{'bias' if bias else 'nobias'}-c{chunk}"
        # a feature we lack is one case per entry, whatever the dtypes and shapes it is crossed with
        if cw:
            yield pytest.param(entry, torch.float32, _OPINFO_SHAPES[3], "class", id=f"{ident}-classweights")
            continue
        yield pytest.param(entry, torch.float32, _OPINFO_SHAPES[4], "class", id=f"{ident}-kdim")
        if ii is None:
            yield pytest.param(entry, torch.float32, _OPINFO_SHAPES[3], "prob", id=f"{ident}-prob")
        for dtype in (torch.float32, torch.float64):
            for shape in _OPINFO_SHAPES[:4]:
                yield pytest.param(entry, dtype, shape, "class", id=f"{ident}-{str(dtype)[6:]}-{shape[0]}{shape[1]}x{shape[2]}",
                                   marks=needs_for(dtype, reduction, 2))
        if variant != "plain" and not bias and ii is None and chunk == 2:
            for dtype in (torch.bfloat16, torch.float16):  # the float32-accumulator entries of 16-bit inputs
                yield pytest.param(entry, dtype, _OPINFO_SHAPES[3], "class", id=f"{ident}-acc32-{str(dtype)[6:]}")


@pytest.mark.parametrize("entry, dtype, shape, target", list(_opinfo_params()))
def test_torch_opinfo_linear_cross_entropy(case, entry, dtype, shape, target):
    variant, reduction, cw, ii, bias, chunk = entry
    if target == "prob":
        case.unsupported("probability-targets")
    if shape[0] == "kdim":
        case.unsupported("k-dim-linear-weight")
    kind, d, C = shape
    options = {"class_weight": torch.empty(C, dtype=dtype).uniform_(0.1, 2)} if cw else None
    h = torch.empty(8 if kind == "rows" else 1, d, dtype=dtype).uniform_(-2, 2)
    w = torch.empty(C, d, dtype=dtype).uniform_(-2, 2)
    b = torch.randn(C, dtype=dtype) if bias else None
    y = torch.randint(0, C, (h.shape[0],))
    if ii is not None and bool((y == ii).all()):
        y[0] = (ii + 1) % C
    up = torch.rand(h.shape[0]) + 0.5 if reduction == "none" else None
    check(case, "linear", (h, w, b), y, ignore_index=-100 if ii is None else ii, reduction=reduction, chunk_size=chunk,
          upstream=up, options=options)


# -- torch 2.13: OpInfo samples of nn.functional.cross_entropy (logits [2, 3], class dimension 1) ----


def _ce_opinfo_params():
    entries = [((2, 3), "mean", False, None), ((2, 3, 1), "mean", False, None), ((2, 3, 1, 2), "mean", False, None),
               ((2, 3, 1, 2, 3), "mean", False, None), ((2, 3), "sum", False, None), ((2, 3), "none", False, None),
               ((2, 3), "mean", True, None), ((2, 3), "sum", True, None), ((2, 3), "none", True, None),
               ((2, 3), "mean", False, 1)]
    for shape, reduction, cw, ii in entries:
        ident = f"torch-opinfo-ce-{'x'.join(map(str, shape))}-{reduction}-{'cw' if cw else 'nocw'}-ii{ii}"
        if cw:
            yield pytest.param(shape, reduction, cw, ii, torch.float32, "class", id=f"{ident}-classweights")
            continue
        if ii is None:
            yield pytest.param(shape, reduction, cw, ii, torch.float32, "prob", id=f"{ident}-prob")
        for dtype in (torch.float32, torch.float64):
            yield pytest.param(shape, reduction, cw, ii, dtype, "class", id=f"{ident}-{str(dtype)[6:]}",
                               marks=needs_for(dtype, reduction, len(shape)))


@pytest.mark.parametrize("shape, reduction, cw, ii, dtype, target", list(_ce_opinfo_params()))
def test_torch_opinfo_cross_entropy(case, shape, reduction, cw, ii, dtype, target):
    if target == "prob":
        case.unsupported("probability-targets")
    options = {"class_weight": torch.empty(3, dtype=dtype).uniform_(0.1, 2)} if cw else None
    # torch's [N, C, d1, ...] layout is ours after moving the class dimension last and flattening
    # the K extra dimensions into one sequence axis (a non-contiguous view of the same values)
    x = torch.empty(shape, dtype=dtype).uniform_(-9, 9)
    y = torch.randint(0, 3, (shape[0], *shape[2:]))
    if ii is not None and bool((y == ii).all()):
        y.view(-1)[0] = 2
    logits = x.movedim(1, -1)
    if logits.dim() > 3:
        logits = logits.reshape(shape[0], -1, 3)
    labels = y.reshape(logits.shape[:-1])
    up = torch.rand(labels.shape) + 0.5 if reduction == "none" else None
    check(case, "ce", (logits,), labels, ignore_index=-100 if ii is None else ii, reduction=reduction, upstream=up,
          options=options)


# -- torch 2.13: ModuleInfo inputs of nn.LinearCrossEntropyLoss ------------------------------------------
# Sizes (rows, d, C) = (8, 5, 4) and unbatched (d, C) = (8, 4); reductions; ignore_index None,
# -100, (C - 1) // 2 and C + 5 (out of the class range), with targets random, half of them the
# ignored value, or all of it; default and 2-row chunks. Label smoothing and class weights are
# one case per reduction each; K-dimensional outputs and probability targets one documented
# unsupported case per reduction each.


def _module_params():
    for rows in (8, None):
        for chunk in ((None, 2) if rows else (None,)):
            for reduction in ("sum", "mean", "none"):
                for ii in (None, -100, 1, 9):
                    if ii is not None and reduction == "sum":
                        continue  # as torch's list, which thins these out
                    fills = ["random"] + (["half"] if ii is not None and rows else [])
                    if ii is not None and reduction != "mean":
                        fills.append("all")
                    for fill in fills:
                        for dtype in (torch.float32, torch.float64):
                            where = "rows8" if rows else "unbatched"
                            ident = f"torch-module-{where}-c{chunk}-{reduction}-ii{ii}-{fill}-{str(dtype)[6:]}"
                            yield pytest.param(rows, chunk, reduction, ii, fill, dtype, id=ident,
                                               marks=needs_for(dtype, reduction, 2, ignore_index=ii))
    for reduction in ("sum", "mean", "none"):
        for feature in ("label-smoothing", "class-weights", "k-dim-linear-weight", "probability-targets"):
            yield pytest.param(8, None, reduction, feature, "random", torch.float32, id=f"torch-module-{feature}-{reduction}")
    for chunk in (None, 2):  # the bias samples (torch's default ignore_index, None)
        yield pytest.param(8, chunk, "mean", "bias", "random", torch.float32, id=f"torch-module-bias-c{chunk}",
                           marks=needs_ignore_none)
    yield pytest.param(None, None, "mean", "bias", "random", torch.float32, id="torch-module-bias-unbatched",
                       marks=needs_ignore_none)


@pytest.mark.parametrize("rows, chunk, reduction, ii, fill, dtype", list(_module_params()))
def test_torch_module_linear_cross_entropy(case, rows, chunk, reduction, ii, fill, dtype):
    if isinstance(ii, str) and ii in UNSUPPORTED:
        case.unsupported(ii)
    d, C = (5, 4) if rows else (8, 4)
    options = {"label-smoothing": {"label_smoothing": 0.15}, "class-weights": {"class_weight": torch.rand(C) + 0.1}}.get(ii)
    if options is not None:
        ii = -100
    n = rows or 1
    h, w = torch.randn(n, d, dtype=dtype), torch.randn(C, d, dtype=dtype)
    b = torch.randn(C, dtype=dtype) if ii == "bias" else None
    ignore = None if ii == "bias" else ii
    y = torch.randint(0, C, (n,))
    if fill == "half":
        y[n // 2] = ignore
        if not 0 <= ignore < C:
            y[0] = 0
    elif fill == "all":
        y[:] = ignore
    elif ignore is not None and reduction == "mean" and 0 <= ignore < C and bool((y == ignore).all()):
        y[0] = (ignore + 1) % C
    up = torch.rand(n) + 0.5 if reduction == "none" else None
    check(case, "linear", (h, w, b), y, ignore_index=ignore, reduction=reduction, chunk_size=chunk, upstream=up,
          options=options)


# -- torch 2.13: its own linear_cross_entropy tests --------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_all_targets_ignored(case, reduction):
    h, w, b = torch.randn(512, 16), torch.randn(128, 16), torch.randn(128)
    y = torch.full((512,), -1)
    check(case, "linear", (h, w, b), y, ignore_index=-1, reduction=reduction, chunk_size=100)


def test_torch_refuses_unknown_reduction(case):
    x, w, y = torch.randn(2, 4), torch.randn(8, 4), torch.randint(0, 8, (2,))
    case.refused(ValueError, "reduction", lambda: linear_cross_entropy_with_stats(x, w, y, reduction="invalid"))


@pytest.mark.parametrize("chunk", [0, -5])
def test_torch_refuses_bad_chunk_size(case, chunk):
    x, w, y = torch.randn(2, 4), torch.randn(8, 4), torch.randint(0, 8, (2,))
    case.refused(ValueError, "chunk_size", lambda: linear_cross_entropy_with_stats(x, w, y, chunk_size=chunk))


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_torch_label_smoothing_range(case, value):
    x, w, y = torch.randn(2, 4), torch.randn(8, 4), torch.randint(0, 8, (2,))
    case.refused(ValueError, "label_smoothing", lambda: linear_cross_entropy_with_stats(x, w, y, label_smoothing=value))


@pytest.mark.parametrize("backend", [
    pytest.param(None, marks=needs_float64, id="default"), pytest.param("reference", id="reference"),
])
def test_torch_gradcheck(case, backend):
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (3,))

    def loss(h, w, b):
        return linear_cross_entropy_with_stats(h, w, y, bias=b, backend=backend)[0]

    assert torch.autograd.gradcheck(loss, (h, w, b), fast_mode=True)
    case.record("checked")


# -- torch 2.13: error inputs (OpInfo and ModuleInfo) --------------------------------------------------


@pytest.mark.parametrize("which", ["hidden-rank", "weight-rank", "feature-mismatch", "bias-shape", "float-target-shape"])
def test_torch_error_inputs(case, which):
    f, lin = torch.randn, linear_cross_entropy_with_stats
    calls = {
        "hidden-rank": (lambda: lin(f(2, 3, 3, 3), f(2, 3), torch.zeros(2, 3, 3, dtype=torch.long)), "hidden"),
        "weight-rank": (lambda: lin(f(2, 3), f(2), torch.zeros(2, dtype=torch.long)), "weight"),
        "feature-mismatch": (lambda: lin(f(2, 3), f(2, 4), torch.zeros(2, dtype=torch.long)), "weight"),
        "bias-shape": (lambda: lin(f(2, 3), f(2, 3), torch.zeros(2, dtype=torch.long), bias=f(3)), "bias"),
        "float-target-shape": (lambda: lin(f(4, 3), f(2, 3), torch.zeros(4, 2)), "labels"),
    }
    fn, pattern = calls[which]
    case.refused((ValueError, TypeError), pattern, fn)


# -- torch: -inf logits (a masked vocabulary), probability 0 in F.cross_entropy ------------------------


@needs_neg_inf
@pytest.mark.parametrize("kind", ["ce", "linear"])
def test_torch_masked_vocabulary(case, kind):
    V = 13
    if kind == "ce":
        x = torch.randn(6, V)
        x[:, 3:7] = -math.inf
        ts = (x,)
    else:
        b = torch.zeros(V)
        b[3:7] = -math.inf
        ts = (torch.randn(6, 5), torch.randn(V, 5), b)
    y = torch.tensor([0, 1, 2, 7, 12, 8])
    check(case, kind, ts, y)
