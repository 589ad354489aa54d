"""The loss options in the compiled CPU core (stats_forward, cross_entropy_backward and
loss_forward called directly), against geko_core.loss_options.options_token_loss_reference
(token loss, lse, the mean's denominator), the autograd of it (gradient), and
geko_core.reference's statistics of z (the statistics describe softmax(z))."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from geko_core import BUCKET_INVALID, GekoConfig
from geko_core._backend import load_compiled_core
from geko_core.config import cpp_config_for_kernels
from geko_core.loss_options import LossOptions, options_token_loss_reference, transformed_logits
from geko_core.reference import sample_stats_reference

CONFIG = GekoConfig()
IGNORE = -100

# Each option alone, and all together (softcap and temperature as the kernels take them: 0 = off).
OPTION_SETS = {
    "temperature": {"temperature": 0.7},
    "softcap": {"softcap": 15.0},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "class_weight": {"class_weight": True},
    "all": {"temperature": 1.3, "softcap": 30.0, "label_smoothing": 0.2, "z_loss": 1e-4, "class_weight": True},
}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def core():
    return load_compiled_core()


def _class_weight(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(vocab, generator=g) * 2 + 0.25


def _options(kwargs: dict, vocab: int) -> tuple[dict, LossOptions]:
    """The binding's keyword arguments (class_weight as a capsule) and the reference's options."""
    kwargs = dict(kwargs)
    weight = _class_weight(vocab) if kwargs.pop("class_weight", False) else None
    reference = LossOptions(
        temperature=kwargs.get("temperature", 1.0),
        softcap=kwargs.get("softcap") or None,
        label_smoothing=kwargs.get("label_smoothing", 0.0),
        z_loss=kwargs.get("z_loss", 0.0),
        class_weight=weight,
    )
    if weight is not None:
        kwargs["class_weight"] = weight.__dlpack__()
    return kwargs, reference


def _inputs(shape, dtype, *, seed=0, scale=4.0, ignored=True, masked=False, large=False):
    S, T, V = shape
    g = torch.Generator().manual_seed(seed)
    if large:  # |x| up to 50, spread so that no two top logits tie after rounding
        x = (torch.rand(S, T, V, generator=g, dtype=torch.float64) * 100 - 50)
    else:
        x = torch.randn(S, T, V, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, V, (S, T), generator=g)
    if ignored:
        y[0, -1] = IGNORE
        if S > 2:
            y[2, :] = IGNORE  # a sample without a counted token
    if masked:
        # A masked vocabulary: some classes at -inf, never the label.
        mask = torch.rand(S, T, V, generator=g) < 0.3
        mask.scatter_(-1, y.clamp(min=0).unsqueeze(-1), False)
        x = x.masked_fill(mask, float("-inf"))
    return x.to(dtype), y


def _forward(x, y, kwargs, ignore_index=IGNORE):
    S, T, _ = x.shape
    values = torch.full((6, S), 7.0)
    valid = torch.full((S,), 7, dtype=torch.int32)
    bucket = torch.full((S,), 7, dtype=torch.int8)
    tokens = torch.full((6, S, T), 7.0)
    token_valid = torch.zeros(S, T, dtype=torch.bool)
    lse = torch.full((S, T), 7.0, dtype=torch.float64)
    loss = torch.full((S, T), 7.0)
    core().stats_forward(
        x.__dlpack__(), y.__dlpack__(), ignore_index, cpp_config_for_kernels(CONFIG),
        [values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__()],
        [tokens.__dlpack__(), token_valid.__dlpack__()], lse.__dlpack__(), loss_out=loss.__dlpack__(), **kwargs,
    )
    return dict(values=values, valid=valid, bucket=bucket, tokens=tokens, token_valid=token_valid, lse=lse, loss=loss)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tolerance(dtype):
    # The kernels compute in float whatever the input (the inputs are exact in float):
    # float64 logits are compared at float precision too.
    return dict(rtol=2e-5, atol=2e-5)


def _grad_tolerance(dtype, scale):
    # The gradient is written in the logits' dtype: its rounding on top of float's.
    rel = {torch.bfloat16: 2**-8, torch.float16: 2**-11}.get(dtype, 0.0)
    return dict(rtol=max(rel, 1e-4), atol=1e-6 * scale + (6e-8 if dtype == torch.float16 else 0.0))


def _check_forward(x, y, kwargs, options):
    out = _forward(x, y, kwargs)
    S, T, V = x.shape
    xr = x.to(_compute_dtype(x.dtype)).reshape(-1, V)
    loss, lse, weight = options_token_loss_reference(xr, y.reshape(-1), options)
    counted = (y != IGNORE).reshape(-1)
    tol = _tolerance(x.dtype)
    torch.testing.assert_close(out["loss"].reshape(-1)[counted], loss[counted].float(), **tol, equal_nan=True)
    assert bool((out["loss"].reshape(-1)[~counted] == 0).all())
    torch.testing.assert_close(out["lse"].reshape(-1)[counted], lse[counted].double(), **tol)
    assert bool((out["lse"].reshape(-1)[~counted] == 0).all())
    # The statistics are those of softmax(z): the reference's on z, discrete ones exactly.
    z = transformed_logits(x, options)
    ref = sample_stats_reference(z, y, ignore_index=IGNORE, per_token=True, config=CONFIG)
    assert torch.equal(out["valid"], ref.valid_tokens)
    assert torch.equal(out["bucket"], ref.bucket)
    assert torch.equal(out["token_valid"], ref.tokens.valid)
    assert torch.equal(out["tokens"][3], ref.tokens.correct)
    names = ["loss", "confidence", "label_prob", "correct", "entropy", "el2n"]
    for k, name in enumerate(names):
        torch.testing.assert_close(out["tokens"][k], getattr(ref.tokens, name), **tol, equal_nan=True)
        torch.testing.assert_close(out["values"][k], getattr(ref, name), **tol, equal_nan=True)
    return out, (loss, lse, weight)


def _check_backward(x, y, kwargs, options, lse):
    S, T, V = x.shape
    g = torch.Generator().manual_seed(5)
    scale = torch.rand(S, T, generator=g) + 0.5
    xr = x.to(_compute_dtype(x.dtype)).reshape(-1, V).detach().requires_grad_()
    loss, _, _ = options_token_loss_reference(xr, y.reshape(-1), options)
    (loss * scale.reshape(-1).to(loss.dtype)).sum().backward()
    expected = xr.grad.reshape(S, T, V)
    grad = torch.full_like(x, 7.0)
    core().cross_entropy_backward(
        x.__dlpack__(), y.__dlpack__(), lse.__dlpack__(), scale.__dlpack__(), grad.__dlpack__(), IGNORE, **kwargs
    )
    top = float(expected.abs().max())
    torch.testing.assert_close(grad.to(expected.dtype), expected, **_grad_tolerance(x.dtype, top))
    # In place (grad=None: into the logits storage) writes the same bits.
    inplace = x.clone()
    core().cross_entropy_backward(
        inplace.__dlpack__(), y.__dlpack__(), lse.__dlpack__(), scale.__dlpack__(), None, IGNORE, **kwargs
    )
    assert _same(inplace, grad)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(3, 1, 3), (4, 2, 10), (3, 4, 1000), (3, 3, 1037)]


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_the_reference(name, dtype, shape) -> None:
    kwargs, options = _options(OPTION_SETS[name], shape[-1])
    x, y = _inputs(shape, dtype, seed=zlib.crc32(f"{name}{shape}".encode()) % 1000)
    out, _ = _check_forward(x, y, kwargs, options)
    _check_backward(x, y, kwargs, options, out["lse"])


@pytest.mark.parametrize("name", ["softcap", "temperature", "all", "label_smoothing", "class_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 10), (3, 3, 1037)], ids=str)
def test_masked_logits(name, dtype, shape) -> None:
    """-inf logits stay probability 0 (with and without softcap); with label smoothing their
    -logp is +inf and so is the token loss (NaN under a class weight of 0, as the reference)."""
    kwargs, options = _options(OPTION_SETS[name], shape[-1])
    x, y = _inputs(shape, dtype, masked=True)
    out, (loss, _, _) = _check_forward(x, y, kwargs, options)
    counted = (y != IGNORE).reshape(-1)
    if options.label_smoothing:
        assert bool(torch.isinf(loss[counted]).all()) and bool(torch.isinf(out["loss"].reshape(-1)[counted]).all())
    else:
        assert bool(torch.isfinite(out["loss"]).all())
    _check_backward(x, y, kwargs, options, out["lse"])


@pytest.mark.parametrize("name", ["softcap", "z_loss", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_large_logits(name, dtype) -> None:
    shape = (2, 3, 1037)
    kwargs, options = _options(OPTION_SETS[name], shape[-1])
    x, y = _inputs(shape, dtype, large=True)
    assert float(x[torch.isfinite(x)].abs().max()) > 45
    out, _ = _check_forward(x, y, kwargs, options)
    _check_backward(x, y, kwargs, options, out["lse"])


def test_flat_logits() -> None:
    """[N, V] logits take [N] labels and give what [N, 1, V] logits give."""
    kwargs, options = _options(OPTION_SETS["all"], 37)
    x, y = _inputs((5, 1, 37), torch.float64)
    out3 = _forward(x, y, kwargs)
    N = x.shape[0]
    values = torch.empty(6, N)
    valid = torch.empty(N, dtype=torch.int32)
    bucket = torch.empty(N, dtype=torch.int8)
    loss = torch.empty(N, 1)  # per-token outputs of flat logits are [N, 1]
    lse = torch.empty(N, 1, dtype=torch.float64)
    kwargs2, _ = _options(OPTION_SETS["all"], 37)
    core().stats_forward(
        x[:, 0].__dlpack__(), y[:, 0].__dlpack__(), IGNORE, cpp_config_for_kernels(CONFIG),
        [values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__()], None, lse.__dlpack__(),
        loss_out=loss.__dlpack__(), **kwargs2,
    )
    assert _same(loss, out3["loss"]) and _same(lse, out3["lse"]) and _same(values, out3["values"])
    assert torch.equal(bucket, out3["bucket"])


def test_plain_options_are_the_plain_path() -> None:
    """Explicit defaults are the plain path bit for bit; loss_out is then the statistic -logp_y;
    options whose values change nothing (class weights of 1) agree with it to rounding."""
    x, y = _inputs((4, 3, 1037), torch.float32)
    plain = _forward(x, y, {})
    explicit = _forward(x, y, dict(temperature=1.0, softcap=0.0, label_smoothing=0.0, z_loss=0.0, class_weight=None))
    for key in plain:
        assert _same(plain[key], explicit[key]), key
    assert torch.equal(plain["loss"], plain["tokens"][0])
    ones = _forward(x, y, dict(class_weight=torch.ones(1037).__dlpack__()))
    for key in ("loss", "lse", "values", "tokens"):
        torch.testing.assert_close(ones[key], plain[key], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(ones["bucket"], plain["bucket"])


def test_positive_infinity_spoils_the_row_under_softcap() -> None:
    """A +inf logit is a broken model output: its row is refused (NaN statistics, invalid
    bucket) under softcap as without it, where the reference would cap it to softcap."""
    x, y = _inputs((3, 2, 10), torch.float32, ignored=False)
    x[1, 0, 3] = float("inf")
    out = _forward(x, y, dict(softcap=5.0))
    assert out["bucket"][1] == BUCKET_INVALID and math.isnan(float(out["values"][0, 1]))
    assert math.isnan(float(out["loss"][1, 0])) and math.isnan(float(out["lse"][1, 0]))
    assert out["bucket"][0] != BUCKET_INVALID


def _loss_forward(x, y, reduction, kwargs, *, weight=None, grad=None, lse=None):
    S = x.shape[0]
    values = torch.full((6, S), 7.0)
    valid = torch.full((S,), 7, dtype=torch.int32)
    bucket = torch.full((S,), 7, dtype=torch.int8)
    result = core().loss_forward(
        x.__dlpack__(), y.__dlpack__(), IGNORE, cpp_config_for_kernels(CONFIG),
        None if weight is None else weight.__dlpack__(), reduction, values.__dlpack__(), valid.__dlpack__(),
        bucket.__dlpack__(), None if lse is None else lse.__dlpack__(), None if grad is None else grad.__dlpack__(),
        **kwargs,
    )
    return result, values, bucket


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("sample_weight", [False, True])
def test_loss_forward_reduction_and_gradient(name, reduction, sample_weight) -> None:
    shape = (4, 3, 1000)
    kwargs, options = _options(OPTION_SETS[name], shape[-1])
    x, y = _inputs(shape, torch.float32, seed=3)
    S, T, V = shape
    weight = torch.rand(S) + 0.5 if sample_weight else None
    grad = torch.full_like(x, 7.0)
    (bad, value, valid_total, weight_total, z_part), values, bucket = _loss_forward(
        x, y, reduction, dict(kwargs, return_totals=True), weight=weight, grad=grad
    )
    assert bad == -1
    xr = x.double().reshape(-1, V).requires_grad_()
    loss, lse, token_weight = options_token_loss_reference(xr, y.reshape(-1), options)
    per_token = 1.0 if weight is None else weight.double().repeat_interleave(T)
    total = (loss * per_token).sum()
    counted = y.reshape(-1) != IGNORE
    z_total = (options.z_loss * lse * lse * per_token)[counted].sum()
    if reduction == "mean":
        total = total / token_weight.sum()
        z_total = z_total / token_weight.sum()
    total.backward()
    assert valid_total == int(counted.sum())
    assert weight_total == pytest.approx(float(token_weight.detach().sum()), rel=1e-6)
    if options.class_weight is None:
        assert weight_total == float(valid_total)
    assert value == pytest.approx(float(total.detach()), rel=2e-5)
    assert z_part == pytest.approx(float(z_total.detach()), rel=2e-5, abs=1e-12)
    if not options.z_loss:
        assert z_part == 0.0
    top = float(xr.grad.abs().max())
    torch.testing.assert_close(grad.double(), xr.grad.reshape(S, T, V), rtol=1e-4, atol=1e-6 * top)
    # The three-element return of existing callers, and lse_out instead of the gradient.
    lse_out = torch.empty(S, T, dtype=torch.float64)
    result, values3, bucket3 = _loss_forward(x, y, reduction, kwargs, weight=weight, lse=lse_out)
    assert result == (-1, value, valid_total)
    assert _same(values3, values) and torch.equal(bucket3, bucket)
    stats = _forward(x, y, kwargs)
    assert _same(lse_out, stats["lse"]) and _same(values, stats["values"])


def test_loss_forward_zero_class_weights_mean_is_nan() -> None:
    x, y = _inputs((2, 2, 10), torch.float32, ignored=False)
    (bad, value, _, weight_total, _), _, _ = _loss_forward(
        x, y, "mean", dict(class_weight=torch.zeros(10).__dlpack__(), return_totals=True)
    )
    assert bad == -1 and weight_total == 0.0 and math.isnan(value)


def test_loss_forward_bad_label_returns_zero_totals() -> None:
    x, y = _inputs((2, 2, 10), torch.float32, ignored=False)
    y[1, 0] = 10
    result, values, _ = _loss_forward(x, y, "mean", dict(label_smoothing=0.1, return_totals=True))
    assert result == (2, 0.0, 0, 0.0, 0.0)
    assert bool((values == 7.0).all())


BAD_OPTIONS = [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softcap": float("nan")}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ({"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
    ({"z_loss": -1e-4}, ValueError, "z_loss"),
    ({"z_loss": float("inf")}, ValueError, "z_loss"),
    ({"z_loss": float("nan")}, ValueError, "z_loss"),
    ({"class_weight": torch.ones(10, dtype=torch.float64)}, TypeError, "class_weight: expected float32"),
    ({"class_weight": torch.ones(11)}, ValueError, r"class_weight: expected shape \[10\]"),
    ({"class_weight": torch.ones(2, 10)}, ValueError, r"class_weight: expected shape \[10\]"),
    ({"class_weight": torch.tensor([1.0] * 9 + [-1.0])}, ValueError, "class_weight must hold finite values >= 0"),
    ({"class_weight": torch.tensor([1.0] * 9 + [float("nan")])}, ValueError, "class_weight must hold finite"),
    ({"class_weight": [1.0] * 10}, TypeError, "class_weight: expected a DLPack capsule"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_OPTIONS)
def test_bad_options_are_refused_with_outputs_untouched(kwargs, error, match) -> None:
    kwargs = {k: (v.__dlpack__() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    x, y = _inputs((3, 2, 10), torch.float32)
    S, T, V = x.shape
    values = torch.full((6, S), 7.0)
    valid = torch.full((S,), 7, dtype=torch.int32)
    bucket = torch.full((S,), 7, dtype=torch.int8)
    lse = torch.full((S, T), 7.0, dtype=torch.float64)
    loss = torch.full((S, T), 7.0)
    grad = torch.full_like(x, 7.0)
    config = cpp_config_for_kernels(CONFIG)
    sample = [values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__()]
    with pytest.raises(error, match=match):
        core().stats_forward(x.__dlpack__(), y.__dlpack__(), IGNORE, config, sample, None, lse.__dlpack__(),
                             loss_out=loss.__dlpack__(), **kwargs)
    with pytest.raises(error, match=match):
        core().cross_entropy_backward(x.__dlpack__(), y.__dlpack__(), lse.__dlpack__(), torch.ones(S).__dlpack__(),
                                      grad.__dlpack__(), IGNORE, **kwargs)
    with pytest.raises(error, match=match):
        core().cross_entropy_backward(x.clone().__dlpack__(), y.__dlpack__(), lse.__dlpack__(),
                                      torch.ones(S).__dlpack__(), None, IGNORE, **kwargs)
    with pytest.raises(error, match=match):
        core().loss_forward(x.__dlpack__(), y.__dlpack__(), IGNORE, config, None, "mean", values.__dlpack__(),
                            valid.__dlpack__(), bucket.__dlpack__(), lse.__dlpack__(), grad.__dlpack__(), **kwargs)
    for t in (values, lse, loss, grad):
        assert bool((t == 7.0).all())
    assert bool((valid == 7).all()) and bool((bucket == 7).all())


def test_options_are_keyword_only() -> None:
    x, y = _inputs((2, 1, 10), torch.float32)
    lse = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(TypeError):
        core().cross_entropy_backward(x.__dlpack__(), y.__dlpack__(), lse.__dlpack__(), torch.ones(2).__dlpack__(),
                                      None, IGNORE, 1.0, 2.0)


@pytest.mark.parametrize("name", ["softcap", "all", "z_loss"])
def test_masked_label_logit(name) -> None:
    """A -inf label logit: token loss +inf (as F.cross_entropy), the gradient finite."""
    kwargs, options = _options(OPTION_SETS[name], 10)
    x, y = _inputs((3, 2, 10), torch.float32, ignored=False, masked=True)
    x[1, 1, y[1, 1]] = float("-inf")
    out, (loss, _, _) = _check_forward(x, y, kwargs, options)
    assert math.isinf(float(out["loss"][1, 1])) and math.isinf(float(loss[3]))
    _check_backward(x, y, kwargs, options, out["lse"])


def test_full_label_smoothing() -> None:
    """label_smoothing = 1: the label's own term is gone, the uniform target remains."""
    kwargs, options = _options({"label_smoothing": 1.0, "class_weight": True}, 1037)
    x, y = _inputs((3, 2, 1037), torch.float32)
    out, _ = _check_forward(x, y, kwargs, options)
    _check_backward(x, y, kwargs, options, out["lse"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threaded_rows(dtype) -> None:
    """Enough logits for the kernels' thread team: the same values as the reference."""
    kwargs, options = _options(OPTION_SETS["all"], 2053)
    x, y = _inputs((64, 3, 2053), dtype)
    out, _ = _check_forward(x, y, kwargs, options)
    _check_backward(x, y, kwargs, options, out["lse"])
