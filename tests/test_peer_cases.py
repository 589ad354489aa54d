"""The peers' test parametrizations re-expressed against our losses: the shared harness, and
PyTorch 2.13's ``linear_cross_entropy`` / ``cross_entropy`` cases (its OpInfo samples, its
ModuleInfo inputs, its own linear-loss tests). Liger-Kernel's cases are in
``test_peer_cases_liger.py``, cut-cross-entropy's in ``test_peer_cases_cce.py``.

Every case ends in one of three ways (docs/linear_loss.md, "Peers' cases"):

* **checked**: the loss, the gradients and the statistics' consistency against one torch
  reference computed in float64 from the same input values, with dtype-aware tolerances
  (at least as accurate as torch's own same-dtype computation, up to a small factor);
* **refused**: our function raises a ValueError/TypeError whose message names the reason;
* **unsupported-documented**: a skip whose reason names an entry of the documented list.

Cases for features built in parallel (per-token ``reduction="none"``, ``ignore_index=None``,
float64 computed in float64, large logits, ``-inf`` logits) are skipped, with a reason starting
"needs", until a probe of our function finds the feature. ``benchmarks/peer_cases.py`` runs the
three files and prints the counts per peer and category.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from geko_core import cross_entropy_with_stats, linear_cross_entropy_with_stats

# tiny matrices: one thread (two would spin against each other on a shared machine)
pytestmark = pytest.mark.usefixtures("one_thread")

# -- documented reasons and categories ------------------------------------------------------------

UNSUPPORTED = {
    "probability-targets": "class-probability (soft) targets",
    "k-dim-linear-weight": "a K-dimensional linear weight [C, d1.., d] (several softmaxes per row)",
    "label-smoothing": "label smoothing (issue 24 item 2)",
    "soft-capping": "logit soft-capping (issue 24 item 2)",
    "z-loss": "z-loss and the log-sum-exp as an output (issue 24 item 2)",
    "class-weights": "per-class weights (issue 24 item 2)",
    "predicted-tokens": "the argmax token ids as an output (the statistics give correctness only)",
    "autocast": "inputs of different dtypes (autocast inside the call); cast them first",
}


@pytest.fixture
def case(request):
    """Records how a case ended (``user_properties``: ``category``), for benchmarks/peer_cases.py."""
    return _Case(request.node)


class _Case:
    def __init__(self, node) -> None:
        self.node = node

    def record(self, category: str) -> None:
        self.node.user_properties.append(("category", category))

    def unsupported(self, key: str) -> None:
        pytest.skip(f"unsupported-documented: {key} ({UNSUPPORTED[key]})")

    def refused(self, exc: type | tuple, pattern: str, fn) -> None:
        with pytest.raises(exc, match=pattern):
            fn()
        self.record("refused")


# -- feature probes (tiny calls of our functions) ---------------------------------------------------


def _probe(fn) -> bool:
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001 - a probe only asks whether the feature is there
        return False


def _token_none_ce() -> bool:
    x = torch.zeros(2, 3, 5, requires_grad=True)
    loss, _ = cross_entropy_with_stats(x, torch.zeros(2, 3, dtype=torch.long), reduction="none")
    return loss.shape == (2, 3) and loss.requires_grad


def _token_none_linear() -> bool:
    h = torch.zeros(2, 3, 4, requires_grad=True)
    loss, _ = linear_cross_entropy_with_stats(h, torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long), reduction="none")
    return loss.shape == (2, 3) and loss.requires_grad


def _ignore_none() -> bool:
    y = torch.tensor([0, 1])
    cross_entropy_with_stats(torch.zeros(2, 5), y, ignore_index=None)
    linear_cross_entropy_with_stats(torch.zeros(2, 4), torch.zeros(5, 4), y, ignore_index=None)
    return True


def _float64() -> bool:
    # 1e-10 is lost in float32: the loss log(1 + e^1e-10) - ... is exact only in float64
    x = torch.tensor([[0.0, 1e-10]], dtype=torch.float64)
    y = torch.tensor([0])
    exact = F.cross_entropy(x, y)
    ce, _ = cross_entropy_with_stats(x, y)
    lin, _ = linear_cross_entropy_with_stats(torch.ones(1, 1, dtype=torch.float64), x.T.contiguous(), y)
    return all(v.dtype == torch.float64 and abs(float(v - exact)) < 1e-14 for v in (ce, lin))


def _large_logits() -> bool:
    g = torch.Generator().manual_seed(1)
    x = 1e4 + torch.randn(8, 64, generator=g)
    y = torch.randint(0, 64, (8,), generator=g)
    x64 = x.double().requires_grad_()
    (g64,) = torch.autograd.grad(F.cross_entropy(x64, y), x64)
    xt = x.clone().requires_grad_()
    (gt,) = torch.autograd.grad(F.cross_entropy(xt, y), xt)
    xo = x.clone().requires_grad_()
    (go,) = torch.autograd.grad(cross_entropy_with_stats(xo, y)[0], xo)
    return float((go.double() - g64).abs().max()) <= 2 * float((gt.double() - g64).abs().max()) + 1e-9


def _neg_inf() -> bool:
    x = torch.tensor([[0.0, -math.inf, 1.0]], requires_grad=True)
    loss, _ = cross_entropy_with_stats(x, torch.tensor([0]))
    loss.backward()
    return bool(torch.isfinite(loss)) and bool(torch.isfinite(x.grad).all())


# GEKO_PEER_CASES_ALL=1 runs the waiting cases too, to see how the current code fares on them
_ALL = os.environ.get("GEKO_PEER_CASES_ALL") == "1"
HAS_TOKEN_NONE = _ALL or (_probe(_token_none_ce) and _probe(_token_none_linear))
HAS_IGNORE_NONE = _ALL or _probe(_ignore_none)
HAS_FLOAT64 = _ALL or _probe(_float64)
HAS_LARGE_LOGITS = _ALL or _probe(_large_logits)
HAS_NEG_INF = _ALL or _probe(_neg_inf)

needs_token_none = pytest.mark.skipif(not HAS_TOKEN_NONE, reason="needs per-token reduction='none' (issue 24 item 1)")
needs_ignore_none = pytest.mark.skipif(not HAS_IGNORE_NONE, reason="needs ignore_index=None (issue 24 item 2)")
needs_float64 = pytest.mark.skipif(not HAS_FLOAT64, reason="needs float64 computed in float64 (issue 24 item 4)")
needs_large_logits = pytest.mark.skipif(not HAS_LARGE_LOGITS, reason="needs large-logit gradients as accurate as torch's (issue 24 item 4)")
needs_neg_inf = pytest.mark.skipif(not HAS_NEG_INF, reason="needs -inf logits as probability 0 (issue 24 item 2)")


def needs_for(dtype: torch.dtype, reduction: str, ndim: int, ignore_index="unset") -> list:
    """The feature marks a case with these settings waits for."""
    marks = []
    if dtype == torch.float64:
        marks.append(needs_float64)
    if reduction == "none" and ndim == 3:
        marks.append(needs_token_none)
    if ignore_index is None:
        marks.append(needs_ignore_none)
    return marks


# -- the reference, written once --------------------------------------------------------------------

# relative tolerance of a value computed (or rounded at the end) in each dtype
REL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _logits(kind: str, ts) -> torch.Tensor:
    return ts[0] if kind == "ce" else F.linear(ts[0], ts[1], ts[2])


def torch_loss(kind, ts, labels, *, ignore_index, reduction, shift, work_dtype) -> torch.Tensor:
    """torch's loss on ``ts``: ``F.cross_entropy`` of the logits (formed in the inputs' dtype,
    then cast to ``work_dtype``), reduced with our conventions (``"none"``: token losses, 0
    where ignored; ``"mean"``: over the counted tokens, NaN without any)."""
    logits = _logits(kind, ts).to(work_dtype)
    y = labels
    if shift:
        logits, y = logits[:, :-1], y[:, 1:]
    ii = -100 if ignore_index is None else ignore_index
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=ii, reduction="none")
    tok = tok.reshape(y.shape)
    if reduction == "none":
        return tok
    total = tok.sum()
    return total if reduction == "sum" else total / (y != ii).sum()


def ours(kind, ts, labels, *, ignore_index=-100, reduction="mean", shift=False, chunk_size=None, backend=None):
    kw = dict(ignore_index=ignore_index, reduction=reduction, shift=shift, backend=backend)
    if kind == "ce":
        return cross_entropy_with_stats(ts[0], labels, **kw)
    return linear_cross_entropy_with_stats(ts[0], ts[1], labels, bias=ts[2], chunk_size=chunk_size, **kw)


def _leaves(ts, dtype=None, grad=True):
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(t.requires_grad_(grad))
    return tuple(out)


def _close(name, got, ref, torch_val, dtype, *, scale_floor=0.0, slack=0.0, norm=False):
    """``|got - ref| <= 2 |torch - ref| + REL |ref| + REL/10 max|ref| + slack`` element-wise, or
    with ``norm`` for the whole tensor's 2-norms (16-bit logits formed by a matmul: both sides
    round them, differently, and an element's error is then noise); NaN where the reference is
    NaN (and only there)."""
    got, ref, torch_val = got.detach().double(), ref.detach().double(), torch_val.detach().double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    nan_ref = torch.isnan(ref)
    bad_nan = torch.isnan(got) != nan_ref
    assert not bad_nan.any(), f"{name}: NaN mismatch at {bad_nan.nonzero()[:4].tolist()} (ours {got[bad_nan][:4].tolist()})"
    got, ref, torch_val = got[~nan_ref], ref[~nan_ref], torch_val[~nan_ref]
    if ref.numel() == 0:
        return
    rel = REL[dtype]
    if norm:
        err, mine = float((got - ref).norm()), float((torch_val - ref).norm())
        bound = 2 * mine + rel * float(ref.norm()) + slack
        assert err <= bound, f"{name}: ||ours - ref|| = {err:.3e} > {bound:.3e} (torch's {mine:.3e}, ||ref|| {float(ref.norm()):.3e})"
        return
    scale = max(float(ref.abs().max()), scale_floor)
    bound = 2 * (torch_val - ref).abs() + rel * ref.abs() + rel / 10 * scale + slack + 1e-30
    err = (got - ref).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{name}: |ours - ref| = {float(err.flatten()[worst]):.3e} > bound {float(bound.flatten()[worst]):.3e} "
        f"(ours {float(got.flatten()[worst]):.6e}, ref {float(ref.flatten()[worst]):.6e}, "
        f"torch {float(torch_val.flatten()[worst]):.6e}, max err {float(err.max()):.3e}, scale {scale:.3e})"
    )


def _align_none(loss, ref, shift):
    """Our ``"none"`` token losses with the reference's shape (a shifted ``[B, T]`` output's last
    position, which predicts nothing, must be 0)."""
    if shift and loss.dim() == 2 and loss.shape[1] == ref.shape[1] + 1:
        assert bool((loss[:, -1] == 0).all()), "the last position of a shifted 'none' loss is not 0"
        return loss[:, :-1]
    return loss


def check(case, kind, ts, labels, *, ignore_index=-100, reduction="mean", shift=False, upstream=None,
          chunk_size=None, backend=None, grad=True, post=None):
    """Runs one case through our function and the reference and compares everything.

    ``upstream``: a float (the loss is multiplied by it before backward, a "not last layer"
    factor) or, for ``"none"``, a tensor of the reference's shape; None means 1 / ones.
    ``post``: optional ``f(loss, stats) -> tensor`` applied to ours and ``f(loss, probs)`` to
    the references (e.g. Liger's token scaling), replacing the loss compared."""
    dtype = next(t for t in ts if t is not None).dtype
    kw = dict(ignore_index=ignore_index, reduction=reduction, shift=shift)
    mine = _leaves(ts, grad=grad)
    if grad:
        loss, stats = ours(kind, mine, labels, chunk_size=chunk_size, backend=backend, **kw)
    else:
        with torch.no_grad():
            loss, stats = ours(kind, mine, labels, chunk_size=chunk_size, backend=backend, **kw)
        assert not loss.requires_grad
    ref_in, same_in = _leaves(ts, torch.float64), _leaves(ts)
    ref = torch_loss(kind, ref_in, labels, work_dtype=torch.float64, **kw)
    same = torch_loss(kind, same_in, labels, work_dtype=torch.float32 if dtype != torch.float64 else dtype, **kw)
    if reduction == "none":
        loss = _align_none(loss, ref, shift)
    if post is not None:
        loss = post(loss, stats, None)
        ref = post(ref, None, (kind, ref_in, labels, kw))
        same = post(same, None, (kind, same_in, labels, kw))
    # 16-bit logits formed by a matmul (and a bias added) are rounded to the dtype on both sides,
    # not necessarily the same way: a rounding-sized difference of the logits is allowed for
    low = kind == "linear" and dtype in (torch.bfloat16, torch.float16)
    eps = torch.finfo(dtype).eps if low else 0.0
    _close("loss", loss, ref, same, torch.float64 if dtype == torch.float64 else torch.float32,
           slack=eps * float(ref.detach().abs().nan_to_num().max()) if ref.numel() else 0.0)
    _check_stats(kind, stats, same_in, labels, **kw)
    if grad:
        if upstream is None:
            g = torch.ones_like(ref)
        elif isinstance(upstream, float):
            g = torch.full_like(ref, upstream)
        else:
            g = upstream.to(torch.float64)
        for out, inputs in ((loss, mine), (ref, ref_in), (same, same_in)):
            out.backward((g.to(out.dtype)) if out.dim() else g.to(out.dtype).reshape(()))
        nothing_counted = reduction == "mean" and bool(torch.isnan(ref))
        for name, a, r, s in zip(("grad 0", "grad 1", "grad 2"), mine, ref_in, same_in):
            if a is None:
                continue
            assert a.grad is not None, f"{name}: no gradient"
            assert a.grad.dtype == a.dtype, f"{name}: gradient dtype {a.grad.dtype} != input dtype {a.dtype}"
            if nothing_counted:  # F.cross_entropy's gradient is 0 when no token counts
                assert bool((a.grad == 0).all()), f"{name}: nonzero gradient though no token counts"
                continue
            _close(name, a.grad, r.grad, s.grad, dtype, norm=low)
    case.record("checked")


def _check_stats(kind, stats, same_in, labels, *, ignore_index, reduction, shift):
    """The statistics' counts exactly, their per-sample mean loss to the reference's on the
    logits materialised in the inputs' dtype (what the statistics describe)."""
    ii = -100 if ignore_index is None else ignore_index
    y = labels[:, 1:] if shift else labels
    with torch.no_grad():
        logits = _logits(kind, same_in).double()
        if shift:
            logits = logits[:, :-1]
        V = logits.shape[-1]
        valid = (y != ii) & (y >= 0) & (y < V)
        tok = torch.zeros(y.shape, dtype=torch.float64)
        lse = torch.logsumexp(logits, -1)
        picked = logits.gather(-1, y.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
        tok = torch.where(valid, lse - picked, tok)
    counts = valid.reshape(valid.shape[0], -1).sum(1) if y.dim() == 2 else valid.to(torch.int64)
    assert torch.equal(stats.valid_tokens.to(torch.int64), counts), "stats.valid_tokens differ from the labels' counts"
    per_sample = tok.reshape(counts.shape[0], -1).sum(1) / counts
    have = counts > 0
    got = stats.loss.double()
    assert bool(torch.isnan(got[~have]).all()), "a sample without counted tokens has a finite statistic"
    err = (got[have] - per_sample[have]).abs()
    # the statistics are float32 token values; 16-bit linear inputs add the matmul's rounding
    if kind == "linear" and same_in[0].dtype in (torch.bfloat16, torch.float16):
        # the logits are rounded to the dtype on both sides, possibly differently (bias added apart)
        tol = 2 * torch.finfo(same_in[0].dtype).eps * float(logits.abs().max()) + 1e-2 * per_sample[have].abs()
    else:
        tol = 1e-4 * per_sample[have].abs() + 1e-5
    assert bool((err <= tol).all()), f"stats.loss: max error {float(err.max()):.3e}"


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
    if cw:
        case.unsupported("class-weights")
    kind, d, C = shape
    h = torch.empty(8 if kind == "rows" else 1, d, dtype=dtype).uniform_(-2, 2)
    w = torch.empty(C, d, dtype=dtype).uniform_(-2, 2)
    b = torch.randn(C, dtype=dtype) if bias else None
    y = torch.randint(0, C, (h.shape[0],))
    if ii is not None and bool((y == ii).all()):
        y[0] = (ii + 1) % C
    up = torch.rand(h.shape[0]) + 0.5 if reduction == "none" else None
    check(case, "linear", (h, w, b), y, ignore_index=-100 if ii is None else ii, reduction=reduction, chunk_size=chunk,
          upstream=up)


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
    if cw:
        case.unsupported("class-weights")
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
    check(case, "ce", (logits,), labels, ignore_index=-100 if ii is None else ii, reduction=reduction, upstream=up)


# -- torch 2.13: ModuleInfo inputs of nn.LinearCrossEntropyLoss ------------------------------------------
# Sizes (rows, d, C) = (8, 5, 4) and unbatched (d, C) = (8, 4); reductions; ignore_index None,
# -100, (C - 1) // 2 and C + 5 (out of the class range), with targets random, half of them the
# ignored value, or all of it; default and 2-row chunks. Label smoothing, class weights,
# K-dimensional outputs and probability targets are one documented case per reduction each.


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
                            ident = f"torch-module-{'rows8' if rows else 'unbatched'}-c{chunk}-{reduction}-ii{ii}-{fill}-{str(dtype)[6:]}"
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
    check(case, "linear", (h, w, b), y, ignore_index=ignore, reduction=reduction, chunk_size=chunk, upstream=up)


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


def test_torch_label_smoothing_range(case):
    case.unsupported("label-smoothing")


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
    f = torch.randn
    calls = {
        "hidden-rank": (lambda: linear_cross_entropy_with_stats(f(2, 3, 3, 3), f(2, 3), torch.zeros(2, 3, 3, dtype=torch.long)), "hidden"),
        "weight-rank": (lambda: linear_cross_entropy_with_stats(f(2, 3), f(2), torch.zeros(2, dtype=torch.long)), "weight"),
        "feature-mismatch": (lambda: linear_cross_entropy_with_stats(f(2, 3), f(2, 4), torch.zeros(2, dtype=torch.long)), "weight"),
        "bias-shape": (lambda: linear_cross_entropy_with_stats(f(2, 3), f(2, 3), torch.zeros(2, dtype=torch.long), bias=f(3)), "bias"),
        "float-target-shape": (lambda: linear_cross_entropy_with_stats(f(4, 3), f(2, 3), torch.zeros(4, 2)), "labels"),
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
