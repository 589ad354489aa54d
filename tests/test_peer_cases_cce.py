"""Apple's cut-cross-entropy (CCE) cases, re-expressed against
``linear_cross_entropy_with_stats`` (harness and categories: ``test_peer_cases.py``; the list of
documented reasons: docs/linear_loss.md, "Peers' cases").

CCE scores ``[4, N/4, D]`` embeddings against a ``[V, D]`` classifier whose first rows copy some
embeddings (confident rows), with 20% of the targets ignored in the "invalids" cases. Its
shapes (N, V, D) = (256, 512, 128), (252, 507, 128), (252, 507, 123) are scaled down keeping
an N not a multiple of 16 and odd V and D. Its ``shift`` is an offset: 1 is our ``shift=True``,
2 is re-expressed by slicing the inputs. Internal kernels (its indexed dot product) and its
multi-process vocabulary-parallel tests have no counterpart here and are not counted.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_peer_cases import (
    _close,
    _leaves,
    case,  # noqa: F401 - the fixture
    check,
    check_z_loss,
    needs_neg_inf,
    needs_token_none,
    torch_loss,
)

from geko_core import linear_cross_entropy_with_stats

# tiny matrices: one thread (two would spin against each other on a shared machine)
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(64, 128, 32), (60, 127, 32), (60, 127, 31)]  # (N, V, D)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IGNORE = -100


def _inputs(shape, dtype, bias, invalids):
    N, V, D = shape
    e = torch.randn(N, D) / D**0.5
    c = torch.randn(V, D)
    c[: min(N, V) // 2] = e[: min(N, V) // 2]
    b = torch.randn(V) * 0.02 if bias else None
    y = torch.randint(0, V, (N,))
    if invalids:
        y[torch.randperm(N)[: int(0.2 * N)]] = IGNORE
    e, y = e.view(4, -1, D), y.view(4, -1)
    return (e.to(dtype), c.to(dtype), None if b is None else b.to(dtype)), y


def _ids(v):
    if isinstance(v, torch.dtype):
        return str(v)[6:]
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


@needs_token_none
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("invalids", [False, True], ids=["all-valid", "invalids"])
@pytest.mark.parametrize("shift", [0, 2], ids=["shift0", "shift2"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cce_loss_forward(case, dtype, bias, shift, invalids, shape):
    """Token losses (``reduction="none"``) of ``[4, T]`` inputs, no gradient."""
    (e, c, b), y = _inputs(shape, dtype, bias, invalids)
    if shift:
        e, y = e[:, :-shift], y[:, shift:]
    check(case, "linear", (e, c, b), y, reduction="none", grad=False)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("reduction", [pytest.param("none", marks=needs_token_none), "mean", "sum"])
@pytest.mark.parametrize("invalids", [False, True], ids=["all-valid", "invalids"])
@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_cce_loss_backward(case, dtype, bias, shift, invalids, reduction, shape):
    """CCE's objective: the loss, divided by the counted tokens for ``"sum"``, then averaged;
    gradients of the embeddings, the classifier and the bias."""
    (e, c, b), y = _inputs(shape, dtype, bias, invalids)
    scored = y[:, 1:] if shift else y
    counted = int((scored != IGNORE).sum())
    if reduction == "none":
        up = torch.full(scored.shape, 1.0 / scored.numel())
    elif reduction == "sum":
        up = 1.0 / counted
    else:
        up = None
    check(case, "linear", (e, c, b), y, reduction=reduction, shift=shift, upstream=up, chunk_size=29)


@pytest.mark.parametrize("feature, reduction", [
    ("soft-capping", "forward"), ("soft-capping", "none"), ("soft-capping", "mean"), ("soft-capping", "sum"),
    ("z-loss", "none"), ("z-loss", "mean"), ("z-loss", "sum"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_cce_options(case, dtype, feature, reduction):
    """CCE's soft-capped logits (``softcap``) and its z-loss term (``lse**2`` per counted token,
    scaled), with its invalid targets and shift; ``"forward"`` is the loss without gradient."""
    (e, c, b), y = _inputs(SHAPES[1], dtype, False, True)
    options = {"softcap": 20.0} if feature == "soft-capping" else {"z_loss": 1e-4}
    grad = reduction != "forward"
    red = "none" if reduction == "forward" else reduction
    scored = y[:, 1:]
    up = torch.full(scored.shape, 1.0 / scored.numel()) if red == "none" and grad else None
    check(case, "linear", (e, c, b), y, reduction=red, shift=True, upstream=up, chunk_size=29, grad=grad, options=options)


@pytest.mark.parametrize("feature", ["lse-kernel", "compute-z-loss"])
def test_cce_returned_lse(case, feature):
    """CCE's log-sum-exp output and the z-loss computed from it (shifted, invalid targets)."""
    (e, c, b), y = _inputs(SHAPES[1], torch.float32, False, True)
    check_z_loss(case, "linear", (e, c, b), y, shift=True, chunk_size=29, options={"softcap": 20.0} if feature == "compute-z-loss" else None)


@pytest.mark.parametrize("de, dc, dbias", [(True, False, True), (False, True, False), (False, False, True)],
                         ids=["hidden+bias", "weight", "bias"])
def test_cce_loss_partials(case, de, dc, dbias):
    """Only the inputs that require a gradient get one, and it is right."""
    (e, c, b), y = _inputs((64, 128, 32), torch.bfloat16, True, False)
    b = b * 0.5
    mine = [t.detach().clone().requires_grad_(g) for t, g in zip((e, c, b), (de, dc, dbias))]
    loss, _ = linear_cross_entropy_with_stats(mine[0], mine[1], y, bias=mine[2])
    loss.backward()
    assert [t.grad is not None for t in mine] == [de, dc, dbias]
    ref_in, same_in = _leaves((e, c, b), torch.float64), _leaves((e, c, b))
    kw = dict(ignore_index=IGNORE, reduction="mean", shift=False)
    torch_loss("linear", ref_in, y, work_dtype=torch.float64, **kw).backward()
    torch_loss("linear", same_in, y, work_dtype=torch.float32, **kw).backward()
    for t, r, s in zip(mine, ref_in, same_in):
        if t.grad is not None:
            _close("grad", t.grad, r.grad, s.grad, torch.bfloat16, norm=True)
    case.record("checked")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
def test_cce_other_backends(case, dtype, backend):
    """A tiny backward case through the chunk loop's Triton kernels in the interpreter, and
    through the plain-torch reference backend."""
    if backend == "triton":
        pytest.importorskip("triton")
    (e, c, b), y = _inputs((12, 19, 8), dtype, True, True)
    check(case, "linear", (e, c, b), y, reduction="mean", shift=True, chunk_size=8, backend=backend)


@needs_neg_inf
def test_cce_masked_vocabulary(case):
    (e, c, b), y = _inputs((64, 128, 32), torch.float32, True, True)
    b[100:] = -math.inf
    y[y >= 100] = IGNORE
    check(case, "linear", (e, c, b), y, shift=True)
