"""angle_concentration (GAIN-RL): the O(T·d) reference against the explicit O(T²) definition,
and the C++ and Triton paths against the reference.

The Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, tests/conftest.py), so
their shapes stay tiny; half of their cases force tiny tiles so every loop crosses tiles.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from geko_core._backend import compiled_core_error, triton_interpreter_enabled
from geko_core.angle import (
    AngleStats,
    angle_concentration,
    angle_concentration_pairwise,
    angle_concentration_reference,
)

HAS_CPP = compiled_core_error() is None
try:
    import triton  # noqa: F401

    HAS_TRITON = triton_interpreter_enabled()
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAS_TRITON = False

BACKENDS = [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="geko_core._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs TRITON_INTERPRET=1")),
]
COMPILED = BACKENDS[1:]
# Every backend accumulates in float32 from the same input values; compared with the
# reference evaluated in float64 on those values (upcasting is exact), so the tolerance
# measures the backend's own rounding, whatever the input dtype.
TOLERANCE = dict(atol=2e-6, rtol=1e-5)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def use_small_tiles(monkeypatch) -> None:
    """Tiles of a few elements, so that every Triton kernel loop crosses several tiles
    (tokens, features, feature chunks) even on tiny shapes."""
    from geko_core.kernels import angle as kernel_module

    monkeypatch.setattr(kernel_module, "TILE_ELEMENTS", 32)
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_D_NORMS", 8)
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_D_SUMS", 4)
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_T", 16)
    monkeypatch.setattr(kernel_module, "MAX_BLOCK_CHUNKS", 16)


def run(backend: str, hidden, mask=None, prefix_len=0) -> AngleStats:
    return angle_concentration(hidden, mask, prefix_len, backend=backend)


def make_hidden(batch, tokens, dim, dtype=torch.float32, offset=0.3) -> torch.Tensor:
    """Random hidden states sharing a common direction (``offset``), so that the
    concentrations are spread out rather than all near 0."""
    common = torch.randn(dim)
    return (torch.randn(batch, tokens, dim) + offset * common).to(dtype)


def padding_mask(batch, tokens, *, seed=1) -> torch.Tensor:
    """Rows with right padding, left padding, holes, no padding and (when batch allows)
    a single valid token and no valid token."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    for b in range(batch):
        kind = b % 6
        cut = int(torch.randint(1, max(tokens, 2), (1,), generator=generator))
        if kind == 0:
            mask[b, cut:] = False  # right padding
        elif kind == 1:
            mask[b, :cut] = False  # left padding
        elif kind == 2:
            mask[b] = torch.rand(tokens, generator=generator) < 0.6  # holes
        elif kind == 4:
            mask[b] = False
            mask[b, tokens // 2] = True  # a single valid token
        elif kind == 5:
            mask[b] = False  # no valid token
    return mask


def assert_matches_reference(got: AngleStats, hidden, mask=None, prefix_len=0) -> None:
    """Discrete outputs exactly, floats against the float64 reference on the same values."""
    exact = angle_concentration_reference(hidden.double(), mask, prefix_len)
    assert got.concentration.dtype == torch.float32 and got.valid_tokens.dtype == torch.int32
    assert got.concentration.shape == got.valid_tokens.shape == (hidden.shape[0],)
    assert torch.equal(got.valid_tokens, exact.valid_tokens)
    torch.testing.assert_close(got.concentration, exact.concentration.float(), equal_nan=True, **TOLERANCE)
    if exact.cross is None:
        assert got.cross is None
    else:
        assert got.cross is not None and got.cross.dtype == torch.float32
        torch.testing.assert_close(got.cross, exact.cross.float(), equal_nan=True, **TOLERANCE)


# ------------------------------------------------------------------------------------------
# the O(T·d) identity against the explicit O(T²) definition


@pytest.mark.parametrize("shape", [(6, 9, 5), (4, 33, 70), (2, 2, 1)])
@pytest.mark.parametrize("prefix", ["none", "scalar", "per_sequence"])
def test_reference_equals_pairwise_definition(shape, prefix):
    batch, tokens, dim = shape
    hidden = make_hidden(batch, tokens, dim, torch.float64)
    hidden[0, 1] = 0.0  # a zero vector among valid tokens
    mask = padding_mask(batch, tokens)
    prefix_len = {
        "none": 0,
        "scalar": max(tokens // 3, 1),
        "per_sequence": torch.randint(0, tokens + 1, (batch,)),
    }[prefix]
    ref = angle_concentration_reference(hidden, mask, prefix_len)
    pairwise = angle_concentration_pairwise(hidden, mask, prefix_len)
    assert torch.equal(ref.valid_tokens, pairwise.valid_tokens)
    torch.testing.assert_close(ref.concentration, pairwise.concentration.float(), equal_nan=True, atol=1e-6, rtol=1e-6)
    if prefix == "none":
        assert ref.cross is None and pairwise.cross is None
    else:
        torch.testing.assert_close(ref.cross, pairwise.cross.float(), equal_nan=True, atol=1e-6, rtol=1e-6)


def test_reference_float64_is_exact_to_rounding():
    hidden = make_hidden(3, 40, 24, torch.float64)
    mask = padding_mask(3, 40)
    got = angle_concentration_reference(hidden, mask, 11)
    pairwise = angle_concentration_pairwise(hidden, mask, 11)
    # the reference returns float32; recompute its float64 value through the identity
    for b in range(3):
        x = hidden[b][mask[b]]
        x_hat = x / x.norm(dim=-1, keepdim=True)
        n = x.shape[0]
        via_identity = ((x_hat.sum(0) ** 2).sum() - n) / (n * (n - 1))
        assert math.isclose(via_identity.item(), pairwise.concentration[b].item(), rel_tol=1e-12, abs_tol=1e-14)
        assert math.isclose(got.concentration[b].item(), pairwise.concentration[b].item(), rel_tol=1e-6, abs_tol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_values(backend):
    basis = torch.eye(4)
    hidden = torch.stack(
        [
            torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(4, 1),  # identical directions: 1
            torch.stack([basis[0], -2 * basis[0], basis[0], -basis[0]]),  # +-e0: 2 pairs of 6 agree
            basis,  # orthogonal: 0
            torch.stack([basis[0], 3 * basis[0], torch.zeros(4), torch.zeros(4)]),  # zeros count with cos 0
        ]
    )
    got = run(backend, hidden, None, 2)
    torch.testing.assert_close(got.concentration, torch.tensor([1.0, -1 / 3, 0.0, 1 / 6]), atol=1e-6, rtol=0)
    # cross: prefix {0, 1}, rest {2, 3}
    torch.testing.assert_close(got.cross, torch.tensor([1.0, 0.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    assert got.valid_tokens.tolist() == [4, 4, 4, 4]


# ------------------------------------------------------------------------------------------
# backends against the reference


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(6, 37, 70), (3, 5, 3), (2, 1, 8)])
def test_backend_matches_reference(backend, dtype, shape):
    check_against_reference(backend, dtype, shape)


@pytest.mark.skipif(not HAS_TRITON, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(6, 37, 70), (3, 5, 3)])
def test_triton_small_tiles_match_reference(dtype, shape, monkeypatch):
    """70 features in chunks of 4 = 18 chunks, more than the 16-wide chunk tile of the
    finalize kernel; 37 tokens cross the 4-, 8- and 16-token tiles."""
    use_small_tiles(monkeypatch)
    check_against_reference("triton", dtype, shape)


def check_against_reference(backend, dtype, shape):
    batch, tokens, dim = shape
    hidden = make_hidden(batch, tokens, dim, dtype)
    mask = padding_mask(batch, tokens)
    prefix = torch.randint(0, tokens + 1, (batch,))
    for mask_arg, prefix_arg in ((None, 0), (mask, 0), (mask, tokens // 2), (mask, prefix)):
        got = run(backend, hidden, mask_arg, prefix_arg)
        assert_matches_reference(got, hidden, mask_arg, prefix_arg)


@pytest.mark.skipif(not HAS_CPP, reason="geko_core._C not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cpp_realistic_shape(dtype):
    """Several OpenMP threads, d not a multiple of the vector width, T beyond one tile."""
    hidden = make_hidden(9, 200, 389, dtype)
    mask = padding_mask(9, 200)
    prefix = torch.randint(0, 201, (9,))
    assert_matches_reference(run("cpp", hidden, mask, prefix), hidden, mask, prefix)
    assert_matches_reference(run("cpp", hidden, None, 0), hidden, None, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_backend_on_cpu_is_cpp(backend):
    hidden = make_hidden(3, 6, 10)
    auto = angle_concentration(hidden, None, 2)
    if HAS_CPP:
        chosen = run("cpp", hidden, None, 2)
        assert torch.equal(auto.concentration, chosen.concentration) and torch.equal(auto.cross, chosen.cross)
    assert_matches_reference(auto, hidden, None, 2)


# ------------------------------------------------------------------------------------------
# masks and prefixes


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_either_side_equals_the_unpadded_sequence(backend):
    core = make_hidden(1, 5, 12)
    garbage = torch.full((1, 3, 12), float("nan"))  # padding contents are never used
    left = torch.cat([garbage, core], dim=1)
    right = torch.cat([core, garbage], dim=1)
    hidden = torch.cat([left, right, torch.cat([core, core[:, :3]], dim=1)], dim=0)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    # prefix: the first 2 real tokens (positions count padding)
    prefix = torch.tensor([5, 2, 2])
    got = run(backend, hidden, mask, prefix)
    alone = run(backend, core, None, 2)
    for b in range(3):
        torch.testing.assert_close(got.concentration[b], alone.concentration[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.cross[b], alone.cross[0], atol=1e-6, rtol=1e-6)
    assert got.valid_tokens.tolist() == [5, 5, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_and_bool_masks_agree(backend):
    hidden = make_hidden(4, 9, 6)
    mask = padding_mask(4, 9)
    as_bool = run(backend, hidden, mask, 3)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        other = run(backend, hidden, mask.to(dtype) * 7 if dtype != torch.uint8 else mask.to(dtype), 3)
        assert torch.equal(other.valid_tokens, as_bool.valid_tokens)
        torch.testing.assert_close(other.concentration, as_bool.concentration, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(other.cross, as_bool.cross, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_edges(backend):
    hidden = make_hidden(4, 6, 5)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, :3] = False  # the prefix part of sequence 2 is all padding
    got = run(backend, hidden, mask, torch.tensor([0, 6, 3, 1]))
    assert math.isnan(got.cross[0])  # empty prefix
    assert math.isnan(got.cross[1])  # empty rest
    assert math.isnan(got.cross[2])  # prefix positions all masked out
    assert not math.isnan(got.cross[3])
    assert not got.concentration.isnan().any()
    # an int prefix of 0 means "no cross term"; a tensor of zeros asks for it
    assert run(backend, hidden, mask, 0).cross is None
    zeros = run(backend, hidden, mask, torch.zeros(4, dtype=torch.int32))
    assert zeros.cross is not None and zeros.cross.isnan().all()
    # the same int for the whole batch equals a per-sequence tensor of it
    scalar = run(backend, hidden, mask, 2)
    tensor = run(backend, hidden, mask, torch.full((4,), 2))
    torch.testing.assert_close(scalar.cross, tensor.cross, equal_nan=True, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# zero vectors, too few tokens, non-finite values


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vectors_count_with_cosine_zero(backend):
    hidden = make_hidden(3, 7, 9)
    hidden[0, 2] = 0.0
    hidden[1] = 0.0  # every token a zero vector: all cosines 0
    hidden[2, :2] = 0.0  # the whole prefix is zero vectors
    got = run(backend, hidden, None, 2)
    assert_matches_reference(got, hidden, None, 2)
    pairwise = angle_concentration_pairwise(hidden, None, 2)
    torch.testing.assert_close(got.concentration, pairwise.concentration.float(), atol=1e-6, rtol=1e-5)
    assert got.concentration[1] == 0.0 and got.cross[1] == 0.0 and got.cross[2] == 0.0
    # without the zero vector of sequence 0 the pair sum is the same over fewer pairs:
    # (n-1)(n-2) instead of n(n-1)
    kept = torch.cat([hidden[:1, :2], hidden[:1, 3:]], dim=1)
    without = run(backend, kept).concentration[0]
    torch.testing.assert_close(got.concentration[0], without * (6 * 5) / (7 * 6), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_than_two_tokens_is_invalid(backend):
    hidden = make_hidden(3, 4, 5)
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]])
    got = run(backend, hidden, mask, 1)
    assert got.valid_tokens.tolist() == [0, 1, 2]
    assert got.concentration[:2].isnan().all() and not got.concentration[2].isnan()
    assert got.valid.tolist() == [False, False, True]
    assert got.cross[:2].isnan().all() and not got.cross[2].isnan()
    single = run(backend, hidden[:, :1])  # T = 1
    assert single.concentration.isnan().all() and single.valid_tokens.tolist() == [1, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
# the Triton interpreter emulates fp32 with numpy, which warns when 1e30² overflows
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_non_finite_valid_token_invalidates_its_sequence(backend, bad):
    hidden = make_hidden(4, 6, 5)
    mask = torch.ones(4, 6, dtype=torch.bool)
    hidden[1, 4, 2] = bad  # valid token: sequence 1 invalid (1e30 overflows the fp32 squares)
    hidden[2, 0, 0] = bad  # masked-out token: ignored
    mask[2, 0] = False
    hidden[3, 1, 3] = bad  # valid token inside the prefix
    got = run(backend, hidden, mask, 3)
    assert got.valid_tokens.tolist() == [6, 6, 5, 6]  # still counted
    assert got.valid.tolist() == [True, False, True, False]
    assert got.cross.isnan().tolist() == [False, True, False, True]
    clean = hidden.clone()
    clean[2, 0] = 0.0
    expected = run("reference", clean, mask, 3)
    torch.testing.assert_close(got.concentration[2], expected.concentration[2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_specials(backend, dtype):
    hidden = make_hidden(3, 5, 8, dtype)
    hidden[0, 1, 1] = float("nan")
    hidden[1, 2, 0] = float("inf")
    # fp16: a subnormal half (6e-8, squares 3.6e-15); bf16: tiny but with normal fp32 squares
    hidden[2, 3] = torch.tensor(6e-8 if dtype == torch.float16 else 1e-18, dtype=dtype)
    got = run(backend, hidden, None, 2)
    assert got.valid.tolist() == [False, False, True]
    assert_matches_reference(got, hidden, None, 2)
    # documented limit: when every square underflows float32 (bf16 1e-30 -> 1e-60) the token
    # counts as a zero vector, exactly as the float32 reference says
    hidden[2, 3] = torch.tensor(1e-30, dtype=dtype) if dtype == torch.bfloat16 else 0.0
    got = run(backend, hidden, None, 2)
    ref32 = angle_concentration_reference(hidden, None, 2)
    torch.testing.assert_close(got.concentration, ref32.concentration, equal_nan=True, atol=2e-6, rtol=1e-5)
    exact = angle_concentration_pairwise(hidden, None, 2).concentration[2].item()
    zeroed = hidden.clone()
    zeroed[2, 3] = 0.0
    as_zero = angle_concentration_pairwise(zeroed).concentration[2].item()
    assert got.concentration[2].item() == pytest.approx(as_zero, abs=1e-5)
    if dtype == torch.bfloat16:
        assert abs(got.concentration[2].item() - exact) > 1e-3  # the exact value differs


# ------------------------------------------------------------------------------------------
# strides, dtypes of the outputs, empty inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    wide = make_hidden(3, 8, 20)
    mask_t = padding_mask(3, 8).T.contiguous().T  # [3, 8] with column-major strides
    mask = padding_mask(3, 8)
    views = {
        "column slice": wide[:, :, 3:14],
        "token step": wide[:, ::2, :11],
        "batch-second storage": wide[:, :, :11].transpose(0, 1).contiguous().transpose(0, 1),
        "last dim strided (copied)": wide[:, :, :11].transpose(1, 2).contiguous().transpose(1, 2),
    }
    for name, view in views.items():
        tokens = view.shape[1]
        m = mask[:, :tokens]
        got = run(backend, view, m, 2)
        want = run(backend, view.contiguous(), m.contiguous(), 2)
        close = dict(equal_nan=True, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(got.concentration, want.concentration, **close)
        torch.testing.assert_close(got.cross, want.cross, **close)
    got = run(backend, wide[:, :, :11], mask_t, 2)
    assert_matches_reference(got, wide[:, :, :11], mask_t.contiguous(), 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    empty_batch = run(backend, torch.zeros(0, 4, 3), None, 1)
    assert empty_batch.concentration.shape == (0,) and empty_batch.cross.shape == (0,)
    no_tokens = run(backend, torch.zeros(2, 0, 3), None, torch.zeros(2, dtype=torch.int64))
    assert no_tokens.valid_tokens.tolist() == [0, 0]
    assert no_tokens.concentration.isnan().all() and no_tokens.cross.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_states_requiring_grad(backend):
    hidden = make_hidden(2, 4, 6).requires_grad_(True)
    got = run(backend, hidden, None, 1)
    assert not got.concentration.requires_grad
    assert_matches_reference(got, hidden.detach(), None, 1)


# ------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(backend):
    hidden = make_hidden(2, 5, 4)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        run(backend, hidden.numpy())
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, d\]"):
        run(backend, hidden[0])
    with pytest.raises(TypeError, match="hidden must be float32"):
        run(backend, hidden.to(torch.int64))
    with pytest.raises(ValueError, match="hidden size d >= 1"):
        run(backend, hidden[:, :, :0])
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        run(backend, hidden, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool or an integer"):
        run(backend, hidden, torch.ones(2, 5))
    with pytest.raises(TypeError, match="mask must be None or a torch.Tensor"):
        run(backend, hidden, [[1] * 5] * 2)
    with pytest.raises(ValueError, match=r"prefix_len must be in \[0, T\]"):
        run(backend, hidden, None, 6)
    with pytest.raises(ValueError, match=r"prefix_len must be in \[0, T\]"):
        run(backend, hidden, None, -1)
    with pytest.raises(ValueError, match="prefix_len values must be in"):
        run(backend, hidden, None, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="prefix_len values must be in"):
        run(backend, hidden, None, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"prefix_len tensor must be \[B\]"):
        run(backend, hidden, None, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="prefix_len must be an int or an integer tensor"):
        run(backend, hidden, None, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="prefix_len must be an int"):
        run(backend, hidden, None, True)
    with pytest.raises(TypeError, match="prefix_len must be an int"):
        run(backend, hidden, None, 1.5)


def test_float64_is_reference_only():
    hidden = make_hidden(2, 5, 4, torch.float64)
    assert run("reference", hidden).concentration.dtype == torch.float32
    with pytest.raises(TypeError, match="float64: reference backend only"):
        angle_concentration(hidden)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        run("cuda", make_hidden(1, 2, 3))


@pytest.mark.skipif(not HAS_CPP, reason="geko_core._C not built")
def test_compiled_binding_validates_on_its_own():
    """_C never trusts the Python layer: shapes, dtypes and prefix ranges are checked in C++."""
    from geko_core._backend import load_compiled_core

    core = load_compiled_core()
    hidden = make_hidden(2, 5, 4)
    conc = torch.empty(2)
    counts = torch.empty(2, dtype=torch.int32)
    cross = torch.empty(2)

    def call(h=hidden, mask=None, prefix=None, c=conc, n=counts, x=None):
        core.angle_concentration(
            h.__dlpack__(),
            None if mask is None else mask.__dlpack__(),
            None if prefix is None else prefix.__dlpack__(),
            c.__dlpack__(),
            n.__dlpack__(),
            None if x is None else x.__dlpack__(),
        )

    call()
    with pytest.raises(ValueError, match="outside"):
        call(prefix=torch.tensor([0, 6]), x=cross)
    with pytest.raises(ValueError, match="cross output"):
        call(prefix=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="mask: expected bool"):
        call(mask=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask: expected shape"):
        call(mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="hidden: expected float32"):
        call(h=hidden.double())
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        call(h=hidden.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="3-D"):
        call(h=hidden[0])
    with pytest.raises(ValueError, match="concentration: expected shape"):
        call(c=torch.empty(3))
    with pytest.raises(TypeError, match="valid_tokens: expected int32"):
        call(n=torch.empty(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="must be contiguous"):
        call(c=torch.empty(4)[::2])
    with pytest.raises(TypeError, match="DLPack capsule"):
        core.angle_concentration(hidden, None, None, conc.__dlpack__(), counts.__dlpack__(), None)


@pytest.mark.skipif(not HAS_TRITON, reason="needs TRITON_INTERPRET=1")
def test_triton_launcher_never_synchronises():
    from geko_core import angle as angle_module
    from geko_core.kernels import angle as kernel_module

    source = inspect.getsource(kernel_module.launch_angle_concentration) + inspect.getsource(angle_module.angle_concentration_triton)
    for call in (".item(", ".tolist(", ".cpu(", "synchronize", ".nonzero(", "int(", "bool("):
        assert call not in source, call


@pytest.mark.parametrize("backend", COMPILED)
def test_large_hidden_size(backend):
    """d = 16384 (the largest hidden size the issue names): 256 feature chunks in Triton."""
    hidden = make_hidden(2, 3, 16384, torch.bfloat16)
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    got = run(backend, hidden, mask, 1)
    assert_matches_reference(got, hidden, mask, 1)
