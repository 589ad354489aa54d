"""The peers' test parametrizations re-expressed against our losses: the shared harness.
PyTorch 2.13's ``linear_cross_entropy`` / ``cross_entropy`` cases (its OpInfo samples, its
ModuleInfo inputs, its own linear-loss tests) are in ``test_peer_cases_torch.py``,
Liger-Kernel's in ``test_peer_cases_liger.py``, cut-cross-entropy's in ``test_peer_cases_cce.py``.

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
needs_large_logits = pytest.mark.skipif(
    not HAS_LARGE_LOGITS, reason="needs large-logit gradients as accurate as torch's (issue 24 item 4)"
)
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


def _capped(logits: torch.Tensor, options: dict | None) -> torch.Tensor:
    """The peers' temperature and soft-capping (``softcap * tanh(x / softcap)``; a ``-inf``
    logit stays masked)."""
    if not options:
        return logits
    z = logits / options.get("temperature", 1.0)
    cap = options.get("softcap")
    if cap is not None:
        z = torch.where(torch.isneginf(z), z, cap * torch.tanh(z / cap))
    return z


def torch_loss(kind, ts, labels, *, ignore_index, reduction, shift, work_dtype, options=None) -> torch.Tensor:
    """torch's loss on ``ts``: ``F.cross_entropy`` of the logits (formed in the inputs' dtype,
    then cast to ``work_dtype``), reduced with our conventions (``"none"``: token losses, 0
    where ignored; ``"mean"``: over the counted tokens, NaN without any). ``options``: the
    peers' temperature, soft-capping, ``label_smoothing`` and class ``weight`` as torch
    composes them, and z-loss as the peers define it (``z_loss * lse**2`` per counted token);
    ``"mean"`` then divides by the counted tokens' class weights, as torch does."""
    logits = _capped(_logits(kind, ts).to(work_dtype), options)
    y = labels
    if shift:
        logits, y = logits[:, :-1], y[:, 1:]
    ii = -100 if ignore_index is None else ignore_index
    options = options or {}
    weight = options.get("class_weight")
    weight = None if weight is None else weight.to(work_dtype)
    flat = logits.reshape(-1, logits.shape[-1])
    tok = F.cross_entropy(
        flat, y.reshape(-1), ignore_index=ii, reduction="none", weight=weight,
        label_smoothing=options.get("label_smoothing", 0.0),
    )
    counted = y.reshape(-1) != ii
    if options.get("z_loss", 0.0):
        tok = tok + torch.where(counted, options["z_loss"] * torch.logsumexp(flat, -1) ** 2, 0.0)
    tok = tok.reshape(y.shape)
    if reduction == "none":
        return tok
    total = tok.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / counted.sum()
    return total / torch.where(counted, weight[y.reshape(-1).clamp(min=0)], 0.0).sum()


def ours(kind, ts, labels, *, ignore_index=-100, reduction="mean", shift=False, chunk_size=None, backend=None, options=None):
    kw = dict(ignore_index=ignore_index, reduction=reduction, shift=shift, backend=backend, **(options or {}))
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
        assert err <= bound, (
            f"{name}: ||ours - ref|| = {err:.3e} > {bound:.3e} (torch's {mine:.3e}, ||ref|| {float(ref.norm()):.3e})"
        )
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
          chunk_size=None, backend=None, grad=True, post=None, options=None):
    """Runs one case through our function and the reference and compares everything.

    ``options``: the loss options (``temperature``, ``softcap``, ``label_smoothing``,
    ``z_loss``, ``class_weight``), given to our function and composed in torch for the reference.

    ``upstream``: a float (the loss is multiplied by it before backward, a "not last layer"
    factor) or, for ``"none"``, a tensor of the reference's shape; None means 1 / ones.
    ``post``: optional ``f(loss, stats) -> tensor`` applied to ours and ``f(loss, probs)`` to
    the references (e.g. Liger's token scaling), replacing the loss compared."""
    dtype = next(t for t in ts if t is not None).dtype
    # GEKO_PEER_CASES_BACKEND=triton (or reference) runs the cases that name no backend on that one
    backend = backend or os.environ.get("GEKO_PEER_CASES_BACKEND") or None
    kw = dict(ignore_index=ignore_index, reduction=reduction, shift=shift)
    mine = _leaves(ts, grad=grad)
    if grad:
        loss, stats = ours(kind, mine, labels, chunk_size=chunk_size, backend=backend, options=options, **kw)
    else:
        with torch.no_grad():
            loss, stats = ours(kind, mine, labels, chunk_size=chunk_size, backend=backend, options=options, **kw)
        assert not loss.requires_grad
    ref_in, same_in = _leaves(ts, torch.float64), _leaves(ts)
    ref = torch_loss(kind, ref_in, labels, work_dtype=torch.float64, options=options, **kw)
    same = torch_loss(kind, same_in, labels, work_dtype=torch.float32 if dtype != torch.float64 else dtype, options=options, **kw)
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
    _check_stats(kind, stats, same_in, labels, options=options, **kw)
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


def check_z_loss(case, kind, ts, labels, *, ignore_index=-100, shift=False, z_loss=1e-4, options=None, chunk_size=None):
    """A peer's returned z-loss (``z_loss * lse**2`` over the counted tokens, their mean) and
    log-sum-exp: ours from ``return_lse=True`` against torch's ``logsumexp`` of the (capped)
    logits in float64; the loss itself as :func:`check` does."""
    options = {**(options or {}), "z_loss": z_loss}
    kw = dict(ignore_index=ignore_index, reduction="mean", shift=shift, **options)
    mine = _leaves(ts, grad=False)
    if kind == "ce":
        _, _, lse = cross_entropy_with_stats(mine[0], labels, return_lse=True, **kw)
    else:
        _, _, lse = linear_cross_entropy_with_stats(mine[0], mine[1], labels, bias=mine[2], chunk_size=chunk_size,
                                                    return_lse=True, **kw)
    with torch.no_grad():
        logits = _capped(_logits(kind, _leaves(ts, torch.float64, grad=False)), options)
        y = labels
        if shift:
            logits, y = logits[:, :-1], y[:, 1:]
        counted = y != (-100 if ignore_index is None else ignore_index)
        ref = torch.where(counted, torch.logsumexp(logits, -1), torch.zeros((), dtype=torch.float64))
    dtype = next(t for t in ts if t is not None).dtype
    same = torch.logsumexp(_capped(_logits(kind, _leaves(ts, grad=False)).float(), options), -1)
    if shift:
        same = same[:, :-1]
    same = torch.where(counted, same, torch.zeros((), dtype=same.dtype))
    _close("lse", lse.reshape(ref.shape), ref, same, torch.float32, slack=torch.finfo(dtype).eps * float(ref.abs().max()))
    z_ours, z_ref, z_same = (float(z_loss * (v.double() ** 2).sum() / counted.sum()) for v in (lse, ref, same))
    # 16-bit logits formed by a matmul: both sides round them, each its own way
    rel = torch.finfo(dtype).eps if kind == "linear" and dtype in (torch.bfloat16, torch.float16) else 1e-5
    bound = 2 * abs(z_same - z_ref) + rel * abs(z_ref) + 1e-12
    assert abs(z_ours - z_ref) <= bound, f"z-loss {z_ours} != {z_ref} (torch's same-dtype {z_same})"
    check(case, kind, ts, labels, ignore_index=ignore_index, shift=shift, chunk_size=chunk_size, options=options)


def _check_stats(kind, stats, same_in, labels, *, ignore_index, reduction, shift, options=None):
    """The statistics' counts exactly, their per-sample mean loss to the reference's on the
    logits materialised in the inputs' dtype (what the statistics describe: under the options,
    the tempered, soft-capped distribution, its plain ``-log p_y``)."""
    ii = -100 if ignore_index is None else ignore_index
    y = labels[:, 1:] if shift else labels
    with torch.no_grad():
        logits = _capped(_logits(kind, same_in).double(), options)
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
