"""The C++ CPU statistics kernel and the public ``sample_stats`` against the torch reference."""

import math

import pytest
import torch

from geko_core import BUCKET_INVALID, GekoConfig
from geko_core._backend import load_compiled_core
from geko_core.reference import as_samples, sample_stats_reference
from geko_core.stats import MAX_VOCAB, sample_stats

FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
TOKEN_FLOATS = ("loss", "confidence", "label_prob", "entropy", "el2n")
SHAPES = [(64, 32000), (2, 64, 5000), (37, 1001), (3, 2)]
# (dtype, rtol, atol) against the float64 reference of the same values: every path
# accumulates in float32, so the tolerance is set by float32 sums over V terms.
DTYPES = [
    (torch.float32, 2e-5, 2e-5),
    (torch.bfloat16, 2e-5, 2e-5),
    (torch.float16, 2e-5, 2e-5),
    (torch.float64, 2e-5, 2e-5),
]


def make_inputs(shape, dtype, scale=3.0, ignore_every=0):
    logits = (torch.randn(*shape) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return logits, labels


def assert_matches_reference(got, logits, labels, rtol, atol, **kwargs):
    """Discrete outputs equal the reference on the same input; floats match the float64
    reference of the same values (the float32 reference loses digits in the entropy)."""
    ref = sample_stats_reference(logits, labels, **kwargs)
    exact = sample_stats_reference(logits.double(), labels, **kwargs)
    assert torch.equal(got.valid_tokens, ref.valid_tokens)
    assert torch.equal(got.bucket, ref.bucket)
    assert torch.equal(got.correct.isnan(), ref.correct.isnan())
    torch.testing.assert_close(got.correct, ref.correct, rtol=0, atol=0, equal_nan=True)
    for field in FLOAT_FIELDS:
        value = getattr(got, field)
        assert value.dtype == torch.float32 and value.shape == ref.loss.shape
        torch.testing.assert_close(value, getattr(exact, field), rtol=rtol, atol=atol, equal_nan=True, msg=field)
    assert got.valid_tokens.dtype == torch.int32 and got.bucket.dtype == torch.int8
    if kwargs.get("per_token"):
        assert got.tokens is not None and ref.tokens is not None
        assert torch.equal(got.tokens.valid, ref.tokens.valid)
        x3, _ = as_samples(logits, labels, shift=kwargs.get("shift", False))
        finite = torch.isfinite(x3).all(dim=-1)
        # The C++ kernel writes NaN in every float field of a counted non-finite row.
        spoiled = ~finite & got.tokens.valid
        for field in FLOAT_FIELDS:
            assert bool(getattr(got.tokens, field)[spoiled].isnan().all()), field
        assert torch.equal(got.tokens.correct[finite], ref.tokens.correct[finite])
        for field in TOKEN_FLOATS:
            torch.testing.assert_close(
                getattr(got.tokens, field)[finite], getattr(exact.tokens, field)[finite], rtol=rtol, atol=atol, msg=field
            )
    return ref


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES, ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else "")
def test_matches_reference(shape, dtype, rtol, atol):
    logits, labels = make_inputs(shape, dtype, ignore_every=7)
    got = sample_stats(logits, labels, per_token=True)
    assert_matches_reference(got, logits, labels, rtol, atol, per_token=True)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_peaked_and_flat_distributions(scale):
    logits, labels = make_inputs((37, 1001), torch.float32, scale=scale)
    labels[::2] = logits[::2].argmax(-1)  # confident and correct rows reach FREEZE / LIGHT
    got = sample_stats(logits, labels)
    assert_matches_reference(got, logits, labels, 2e-5, 2e-5)


def test_backend_choice_and_reference_backend():
    logits, labels = make_inputs((5, 33), torch.float32)
    via_reference = sample_stats(logits, labels, backend="reference")
    direct = sample_stats_reference(logits, labels)
    for a, b in zip(via_reference[:8], direct[:8]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cpp = sample_stats(logits, labels, backend="cpp")
    assert torch.equal(cpp.bucket, direct.bucket)
    with pytest.raises(ValueError, match="backend"):
        sample_stats(logits, labels, backend="cuda")


def test_column_slice_and_row_stride_are_read_in_place():
    wide = torch.randn(40, 1500) * 3
    labels = torch.randint(0, 1001, (20,))
    view = wide[::2, 7:1008]  # row stride 3000, starts mid-row
    assert view.stride() == (3000, 1)
    got = sample_stats(view, labels, per_token=True)
    assert_matches_reference(got, view, labels, 2e-5, 2e-5, per_token=True)
    seq = torch.randn(3, 10, 600)[:, :, 50:550]  # [B, T, V] slice of a wider vocabulary
    seq_labels = torch.randint(0, 500, (3, 10))
    assert_matches_reference(sample_stats(seq, seq_labels), seq, seq_labels, 2e-5, 2e-5)


def test_non_contiguous_last_dim_is_copied_once():
    logits = (torch.randn(1001, 37) * 3).t()  # [37, 1001] with stride(-1) == 37
    labels = torch.randint(0, 1001, (37,))
    before = logits.clone()
    got = sample_stats(logits, labels)
    assert_matches_reference(got, logits, labels, 2e-5, 2e-5)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_matches_explicit_slices(dtype):
    logits, labels = make_inputs((3, 17, 301), dtype, ignore_every=5)
    shifted = sample_stats(logits, labels, shift=True, per_token=True)
    ref = assert_matches_reference(shifted, logits, labels, 2e-5, 2e-5, shift=True, per_token=True)
    assert shifted.tokens.loss.shape == (3, 16)
    direct = sample_stats(logits[:, :-1].contiguous(), labels[:, 1:].contiguous())
    assert torch.equal(shifted.bucket, direct.bucket)
    torch.testing.assert_close(shifted.loss, direct.loss, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(shifted.valid_tokens, ref.valid_tokens)


def test_ignored_tokens_and_samples_without_valid_tokens():
    logits, labels = make_inputs((4, 9, 50), torch.float32)
    labels[0] = -100  # no valid token
    labels[1, 3:] = -100
    labels[2, ::2] = 7  # custom ignore_index below
    got = sample_stats(logits, labels, per_token=True)
    ref = assert_matches_reference(got, logits, labels, 2e-5, 2e-5, per_token=True)
    assert got.valid_tokens.tolist() == [0, 3, 9, 9]
    assert got.bucket[0].item() == BUCKET_INVALID and math.isnan(got.loss[0].item())
    assert not got.valid[0] and bool(got.valid[1:].all())
    tokens = got.tokens
    for field in (*FLOAT_FIELDS,):
        assert bool((getattr(tokens, field)[~tokens.valid] == 0).all()), field
    custom_labels = labels.clone()
    custom_labels[custom_labels == -100] = 7
    custom_labels[2, 1::2] = 1
    custom = sample_stats(logits, custom_labels, ignore_index=7)
    assert_matches_reference(custom, logits, custom_labels, 2e-5, 2e-5, ignore_index=7)
    assert custom.valid_tokens[2].item() == 9 - 5
    assert torch.equal(ref.valid_tokens, got.valid_tokens)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_logits_invalidate_only_their_sample(bad, dtype):
    logits, labels = make_inputs((3, 4, 37), dtype)
    logits[1, 2, 35] = bad  # in the vector tail of a 37-wide row
    logits[2, 0, 3] = bad  # ignored token: does not count
    labels[2, 0] = -100
    got = sample_stats(logits, labels, per_token=True)
    assert_matches_reference(got, logits, labels, 2e-5, 2e-5, per_token=True)
    assert got.bucket.tolist()[1] == BUCKET_INVALID and got.bucket[0] >= 0 and got.bucket[2] >= 0
    assert all(math.isnan(getattr(got, f)[1].item()) for f in FLOAT_FIELDS)
    assert got.valid_tokens.tolist() == [4, 4, 3]
    assert all(math.isnan(getattr(got.tokens, f)[1, 2].item()) for f in FLOAT_FIELDS)


def test_non_finite_in_vector_body_and_huge_finite_values():
    logits, labels = make_inputs((4, 1001), torch.float32)
    logits[0, 100] = float("nan")
    logits[1, 16] = float("-inf")
    logits[2, 500:] = -1e30  # masked vocabulary: finite, contributes nothing
    logits[3, 0] = 3e38
    logits[3, 1] = -3e38
    labels[2] = 3
    got = sample_stats(logits, labels)
    assert_matches_reference(got, logits, labels, 2e-5, 2e-5)
    assert got.valid.tolist() == [False, False, True, True]


def test_argmax_ties_take_the_lowest_index():
    logits = torch.zeros(4, 1001)
    logits[2, 17] = logits[2, 900] = 5.0  # tie across vector blocks
    logits[3, 999] = logits[3, 1000] = 5.0  # tie in the scalar tail
    labels = torch.tensor([0, 3, 900, 999])
    got = sample_stats(logits, labels, per_token=True)
    assert got.correct.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert_matches_reference(got, logits, labels, 2e-5, 2e-5)
    tiny = sample_stats(torch.zeros(2, 2), torch.tensor([0, 1]))
    assert tiny.correct.tolist() == [1.0, 0.0]


def test_bucket_thresholds_follow_config():
    logits, labels = make_inputs((200, 40), torch.float32, scale=4.0)
    labels[::3] = logits[::3].argmax(-1)
    for config in (GekoConfig(), GekoConfig(freeze_confidence=0.5, hard_confidence=0.2), GekoConfig(correct_threshold=0.5)):
        got = sample_stats(logits, labels, config=config)
        ref = sample_stats_reference(logits, labels, config=config)
        assert torch.equal(got.bucket, ref.bucket)
    seq_logits, seq_labels = make_inputs((50, 6, 8), torch.float32, scale=4.0)
    seq_labels[:25] = seq_logits[:25].argmax(-1)
    seq_labels[25:, :2] = seq_logits[25:, :2].argmax(-1)
    for threshold in (0.3, 0.9, 1.0):
        config = GekoConfig(correct_threshold=threshold)
        got = sample_stats(seq_logits, seq_labels, config=config)
        assert torch.equal(got.bucket, sample_stats_reference(seq_logits, seq_labels, config=config).bucket)


def test_label_dtypes_and_grad_logits():
    logits, labels = make_inputs((6, 3, 20), torch.float32)
    logits.requires_grad_(True)
    base = sample_stats(logits, labels)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        other = sample_stats(logits, labels.to(dtype))
        assert torch.equal(other.bucket, base.bucket)
        torch.testing.assert_close(other.loss, base.loss, rtol=0, atol=0)
    assert not base.loss.requires_grad


def test_empty_batches():
    empty = sample_stats(torch.randn(0, 10), torch.zeros(0, dtype=torch.int64), per_token=True)
    assert empty.loss.shape == (0,) and empty.bucket.shape == (0,) and empty.tokens.loss.shape == (0, 1)
    no_tokens = sample_stats(torch.randn(3, 0, 10), torch.zeros(3, 0, dtype=torch.int64))
    assert no_tokens.valid_tokens.tolist() == [0, 0, 0] and no_tokens.bucket.tolist() == [BUCKET_INVALID] * 3
    one = sample_stats(torch.randn(2, 1, 10), torch.zeros(2, 1, dtype=torch.int64), shift=True)
    assert one.bucket.tolist() == [BUCKET_INVALID] * 2
    ref = sample_stats_reference(torch.randn(3, 0, 10), torch.zeros(3, 0, dtype=torch.int64))
    assert torch.equal(ref.bucket, no_tokens.bucket)


def test_out_of_range_labels_are_refused_on_cpu():
    logits, labels = make_inputs((4, 5, 10), torch.float32)
    labels[2, 3] = 10
    with pytest.raises(ValueError, match=r"label 10 at \(sample, token\) \(2, 3\) is outside \[0, 10\)"):
        sample_stats(logits, labels)
    labels[2, 3] = -3
    with pytest.raises(ValueError, match="label -3"):
        sample_stats(logits, labels)
    with pytest.raises(ValueError, match="label -3"):
        sample_stats(logits, labels, backend="reference")
    labels[2, 3] = -100
    sample_stats(logits, labels)
    labels[1, 0] = 99  # dropped by the shift: not checked
    sample_stats(logits, labels, shift=True)
    with pytest.raises(ValueError, match="label 99"):
        sample_stats(logits, labels)


def test_bad_inputs():
    logits = torch.randn(4, 10)
    labels = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="floating-point"):
        sample_stats(torch.randint(0, 3, (4, 10)), labels)
    with pytest.raises(TypeError, match="integer"):
        sample_stats(logits, labels.float())
    with pytest.raises(TypeError, match="integer"):
        sample_stats(logits, labels.bool())
    with pytest.raises(TypeError, match="torch.Tensor"):
        sample_stats(logits.numpy(), labels)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sample_stats(logits, [1, 2, 3, 4])
    with pytest.raises(TypeError, match="ignore_index"):
        sample_stats(logits, labels, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        sample_stats(logits, labels, ignore_index=True)
    with pytest.raises(TypeError, match="shift"):
        sample_stats(logits, labels, shift=1)
    with pytest.raises(TypeError, match="per_token"):
        sample_stats(logits, labels, per_token=None)
    with pytest.raises(TypeError, match="config"):
        sample_stats(logits, labels, config={"freeze_confidence": 0.9})
    with pytest.raises(ValueError, match="does not match"):
        sample_stats(logits, labels[:3])
    with pytest.raises(ValueError, match="does not match"):
        sample_stats(logits.reshape(2, 2, 10), labels)
    with pytest.raises(ValueError, match=r"\[N, V\] or \[B, T, V\]"):
        sample_stats(logits.reshape(1, 2, 2, 10), labels.reshape(1, 2, 2))
    with pytest.raises(ValueError, match="vocabulary size"):
        sample_stats(torch.randn(4, 1), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="vocabulary size"):
        sample_stats(torch.empty(1, MAX_VOCAB + 1), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="shift=True"):
        sample_stats(logits, labels, shift=True)
    with pytest.raises(ValueError, match="same device"):
        sample_stats(logits, labels.to("meta"))


def test_largest_vocabulary():
    logits = torch.randn(2, MAX_VOCAB)
    labels = torch.tensor([0, MAX_VOCAB - 1])
    logits[1, MAX_VOCAB - 1] = 50.0
    got = sample_stats(logits, labels)
    assert_matches_reference(got, logits, labels, 2e-5, 2e-5)
    assert got.correct.tolist()[1] == 1.0


# ---------------------------------------------------------------- the binding itself


def _outputs(samples):
    floats = [torch.empty(samples) for _ in range(6)]
    return floats + [torch.empty(samples, dtype=torch.int32), torch.empty(samples, dtype=torch.int8)]


def test_binding_validates_every_buffer():
    core = load_compiled_core()
    cfg = GekoConfig().to_cpp()
    logits = torch.randn(3, 2, 10)
    labels = torch.randint(0, 10, (3, 2))
    outs = _outputs(3)

    def call(x=logits, y=labels, sample=None, tokens=None, lse=None):
        sample = [t.__dlpack__() for t in (outs if sample is None else sample)]
        core.stats_forward(x.__dlpack__(), y.__dlpack__(), -100, cfg, sample, tokens, lse)

    call()
    ref = sample_stats_reference(logits, labels)
    torch.testing.assert_close(outs[0], ref.loss, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="DLPack capsule"):
        core.stats_forward(logits, labels.__dlpack__(), -100, cfg, [t.__dlpack__() for t in outs], None, None)
    with pytest.raises(ValueError, match="3-D"):
        call(x=logits[:, 0])
    with pytest.raises(ValueError, match="stride 1"):
        call(x=logits.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :10])
    with pytest.raises(TypeError, match="labels: expected int64, got int32"):
        call(y=labels.int())
    with pytest.raises(ValueError, match="labels: expected shape"):
        call(y=labels[:2])
    with pytest.raises(TypeError, match="logits: expected float32"):
        call(x=logits.int())
    bad = list(outs)
    bad[6] = torch.empty(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="valid_tokens: expected int32"):
        call(sample=bad)
    bad = list(outs)
    bad[0] = torch.empty(4)
    with pytest.raises(ValueError, match="loss: expected shape"):
        call(sample=bad)
    bad = list(outs)
    bad[1] = torch.empty(6)[::2]
    with pytest.raises(ValueError, match="confidence: must be contiguous"):
        call(sample=bad)
    with pytest.raises(ValueError, match="expected 8 tensors"):
        call(sample=outs[:7])
    with pytest.raises(ValueError, match="lse: expected shape"):
        call(lse=torch.empty(3, 3).__dlpack__())
    with pytest.raises(ValueError, match="expected 7 tensors"):
        call(tokens=[None] * 6)
    capsule = logits.__dlpack__()
    torch.from_dlpack(capsule)  # consumes it
    with pytest.raises(ValueError, match="unconsumed"):
        core.stats_forward(capsule, labels.__dlpack__(), -100, cfg, [t.__dlpack__() for t in outs], None, None)
    config = GekoConfig().to_cpp()
    config.hard_confidence = 2.0
    with pytest.raises(ValueError, match="hard_confidence"):
        core.stats_forward(logits.__dlpack__(), labels.__dlpack__(), -100, config, [t.__dlpack__() for t in outs], None, None)


def test_binding_never_reads_out_of_range_labels():
    # Called directly, the kernel gives out-of-range labels the reference meaning
    # (sample invalid) instead of indexing with them.
    core = load_compiled_core()
    logits = torch.randn(3, 2, 10)
    labels = torch.tensor([[0, 1 << 40], [-5, 2], [3, -100]])
    outs = _outputs(3)
    core.stats_forward(
        logits.__dlpack__(), labels.__dlpack__(), -100, GekoConfig().to_cpp(), [t.__dlpack__() for t in outs], None, None
    )
    ref = sample_stats_reference(logits, labels)
    assert torch.equal(outs[7], ref.bucket) and outs[7].tolist()[:2] == [BUCKET_INVALID] * 2
    assert torch.equal(outs[6], ref.valid_tokens)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_scalar_conversions_round_like_torch(kind):
    core = load_compiled_core()
    dtype, fn = (torch.bfloat16, core.bf16_round) if kind == "bf16" else (torch.float16, core.fp16_round)
    finfo = torch.finfo(dtype)
    values = torch.cat(
        [
            torch.randn(2000) * 10,
            torch.randn(500) * finfo.tiny,  # subnormals
            torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.max * 1.001, 1e30, -1e30, float("inf"), float("-inf")]),
            torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65520.0, 65519.0, 2.0**-25, 3 * 2.0**-26]),
        ]
    ).float()
    expected = values.to(dtype).float()
    got = torch.tensor([fn(float(v)) for v in values])
    assert torch.equal(got, expected)
    assert math.isnan(fn(float("nan")))


# ---------------------------------------------------------------- the Triton path through the public API
# Runs once the Triton kernels are merged; conftest sets TRITON_INTERPRET=1, so tiny shapes.


@pytest.mark.parametrize("shape,shift", [((5, 33), False), ((2, 4, 17), True)], ids=["5x33", "2x4x17-shift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_backend_matches_reference(shape, shift, dtype):
    pytest.importorskip("geko_core.kernels.sample_stats")
    logits, labels = make_inputs(shape, dtype, ignore_every=3)
    logits.view(-1, shape[-1])[1, 4] = float("nan")
    got = sample_stats(logits, labels, shift=shift, per_token=True, backend="triton")
    ref = sample_stats_reference(logits, labels, shift=shift, per_token=True)
    cpp = sample_stats(logits, labels, shift=shift, per_token=True, backend="cpp")
    assert torch.equal(got.valid_tokens, ref.valid_tokens) and torch.equal(got.bucket, ref.bucket)
    assert torch.equal(got.bucket, cpp.bucket)
    torch.testing.assert_close(got.correct, ref.correct, rtol=0, atol=0, equal_nan=True)
    for field in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(got, field), getattr(cpp, field), rtol=1e-4, atol=1e-4, equal_nan=True, msg=field)
    assert torch.equal(got.tokens.valid, ref.tokens.valid)
