"""What only the compiled CPU statistics kernel does: realistic sizes, NaN token values in a
non-finite row, backend selection, and the binding itself. The contracts every backend meets
are in test_contracts.py."""

import math

import pytest
import torch

from geko_core import BUCKET_INVALID, GekoConfig
from geko_core._backend import load_compiled_core
from geko_core.reference import sample_stats_reference
from geko_core.stats import sample_stats

FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_inputs(shape, dtype, scale=3.0, ignore_every=0):
    logits = (torch.randn(*shape) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return logits, labels


@pytest.mark.parametrize("shape", [(64, 32000), (2, 64, 5000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_realistic_sizes_match_reference(check_stats, shape, dtype):
    # Rows long enough for the OpenMP split and many vector blocks: too slow for the Triton
    # interpreter, so not among the contracts' shapes.
    logits, labels = make_inputs(shape, dtype, ignore_every=7)
    got = sample_stats(logits, labels, per_token=True, backend="cpp")
    check_stats(got, logits, labels, per_token=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])  # -inf is probability 0: tests/test_numerics.py
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
def test_a_counted_non_finite_row_is_nan_in_every_token_field(bad, dtype):
    logits, labels = make_inputs((3, 4, 37), dtype)
    logits[1, 2, 35] = bad  # in the vector tail of a 37-wide row
    logits[1, 3, 3] = bad  # in the vector body
    got = sample_stats(logits, labels, per_token=True, backend="cpp")
    assert got.bucket[1].item() == BUCKET_INVALID
    for field in FLOAT_FIELDS:
        assert math.isnan(getattr(got.tokens, field)[1, 2].item()), field
        assert math.isnan(getattr(got.tokens, field)[1, 3].item()), field
        assert not bool(getattr(got.tokens, field)[1, :2].isnan().any()), field


def test_backend_choice_and_reference_backend():
    logits, labels = make_inputs((5, 33), torch.float32)
    via_reference = sample_stats(logits, labels, backend="reference")
    direct = sample_stats_reference(logits, labels)
    for a, b in zip(via_reference[:8], direct[:8]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    automatic = sample_stats(logits, labels)
    cpp = sample_stats(logits, labels, backend="cpp")
    for a, b in zip(automatic[:8], cpp[:8]):  # CPU tensors run the compiled kernel
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(cpp.bucket, direct.bucket)
    with pytest.raises(ValueError, match="backend"):
        sample_stats(logits, labels, backend="cuda")


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
    with pytest.raises(ValueError, match=r"3-D \[S, T, V\] or 2-D \[N, V\]"):
        call(x=logits[:, 0, 0])
    with pytest.raises(ValueError, match=r"labels: expected shape \[3\], got \[3, 2\]"):
        call(x=logits[:, 0])  # [N, V] logits take [N] labels
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
        call(lse=torch.empty(3, 3, dtype=torch.float64).__dlpack__())
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


def test_binding_takes_whole_blocks():
    # The fused loss passes one [6, S] block for the per-sample floats and one [K, S, T]
    # block for the token values: the same numbers as one buffer per field.
    core = load_compiled_core()
    cfg = GekoConfig().to_cpp()
    logits = torch.randn(3, 2, 10)
    labels = torch.randint(0, 10, (3, 2))
    labels[1, 1] = -100
    outs = _outputs(3)
    fields = [torch.empty(3, 2) for _ in range(6)] + [torch.empty(3, 2, dtype=torch.bool)]
    lse = torch.empty(3, 2, dtype=torch.float64)
    core.stats_forward(logits.__dlpack__(), labels.__dlpack__(), -100, cfg, [t.__dlpack__() for t in outs],
                       [t.__dlpack__() for t in fields], lse.__dlpack__())
    values, valid, bucket = torch.empty(6, 3), torch.empty(3, dtype=torch.int32), torch.empty(3, dtype=torch.int8)
    for rows in (1, 6):
        block, block_valid, block_lse = torch.empty(rows, 3, 2), torch.empty(3, 2, dtype=torch.bool), torch.empty(3, 2, dtype=torch.float64)
        core.stats_forward(logits.__dlpack__(), labels.__dlpack__(), -100, cfg,
                           (values.__dlpack__(), valid.__dlpack__(), bucket.__dlpack__()),
                           (block.__dlpack__(), block_valid.__dlpack__()), block_lse.__dlpack__())
        assert torch.equal(values, torch.stack(outs[:6])) and torch.equal(valid, outs[6]) and torch.equal(bucket, outs[7])
        assert torch.equal(block, torch.stack(fields[:rows])) and torch.equal(block_valid, fields[6])
        assert torch.equal(block_lse, lse)

    def call(sample=None, tokens=None):
        sample = sample if sample is not None else (torch.empty(6, 3), valid, bucket)
        core.stats_forward(logits.__dlpack__(), labels.__dlpack__(), -100, cfg, [t.__dlpack__() for t in sample],
                           None if tokens is None else [t if t is None else t.__dlpack__() for t in tokens], None)

    with pytest.raises(ValueError, match="sample values: expected shape"):
        call(sample=(torch.empty(5, 3), valid, bucket))
    with pytest.raises(ValueError, match="sample values: must be contiguous"):
        call(sample=(torch.empty(3, 6).t(), valid, bucket))
    with pytest.raises(TypeError, match="bucket: expected int8"):
        call(sample=(torch.empty(6, 3), valid, valid))
    with pytest.raises(ValueError, match="1 <= K <= 6"):
        call(tokens=(torch.empty(7, 3, 2), None))
    with pytest.raises(ValueError, match="1 <= K <= 6"):
        call(tokens=(torch.empty(3, 2), None))
    with pytest.raises(ValueError, match="token values: expected shape"):
        call(tokens=(torch.empty(1, 3, 3), None))
    with pytest.raises(ValueError, match="token values: must be contiguous"):
        call(tokens=(torch.empty(1, 2, 3).transpose(1, 2), None))
    with pytest.raises(ValueError, match="token valid: expected shape"):
        call(tokens=(torch.empty(1, 3, 2), torch.empty(3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="expected 8 tensors"):
        call(sample=(torch.empty(6, 3), valid))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_short_rows_and_row_tails_match_reference(check_stats, dtype):
    # Rows shorter than a vector block, and the last vocab % 16 elements of longer rows, go
    # through padded vector code: the argmax in every lane of the tail, and ties.
    for vocab in (2, 3, 7, 8, 9, 10, 15, 17, 31, 33):
        logits = (torch.randn(vocab, 3, vocab) * 3).to(dtype)
        for s in range(vocab):
            logits[s, 0, s] = 20.0  # argmax at every position
            logits[s, 1, (s + 1) % vocab] = logits[s, 1, s] = 15.0  # a tie: the first one counts
        labels = torch.randint(0, vocab, (vocab, 3))
        labels[:, 0] = torch.arange(vocab)
        check_stats(sample_stats(logits, labels, per_token=True, backend="cpp"), logits, labels, per_token=True)
        lse = torch.logsumexp(logits.double(), dim=-1).contiguous()
        scale = torch.linspace(-1.0, 2.0, vocab)
        grad = torch.empty_like(logits)
        load_compiled_core().cross_entropy_backward(logits.__dlpack__(), labels.__dlpack__(), lse.__dlpack__(),
                                                    scale.__dlpack__(), grad.__dlpack__(), -100, 0.5)
        expected = (torch.softmax(logits.float(), -1) - torch.nn.functional.one_hot(labels, vocab)) * 0.5 * scale[:, None, None]
        tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(grad.float(), expected, rtol=tolerance, atol=tolerance)


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


def test_backward_takes_one_scale_per_sample_or_per_token():
    core = load_compiled_core()
    logits = torch.randn(3, 4, 7)
    labels = torch.randint(0, 7, (3, 4))
    labels[1, 2] = -100
    lse = torch.logsumexp(logits.double(), dim=-1).contiguous()
    per_sample = torch.tensor([0.5, -2.0, 3.0])
    wide = per_sample[:, None].expand(3, 4).contiguous()
    grads = []
    for scale in (per_sample, wide):
        grad = torch.empty_like(logits)
        core.cross_entropy_backward(logits.__dlpack__(), labels.__dlpack__(), lse.__dlpack__(), scale.__dlpack__(),
                                    grad.__dlpack__(), -100)
        grads.append(grad)
    expected = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(labels.clamp(min=0), 7)) * wide[..., None]
    expected[1, 2] = 0
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(grads[0], grads[1])
    with pytest.raises(ValueError, match="token_scale"):
        core.cross_entropy_backward(logits.__dlpack__(), labels.__dlpack__(), lse.__dlpack__(),
                                    torch.ones(4).__dlpack__(), torch.empty_like(logits).__dlpack__(), -100)


@pytest.mark.parametrize("ignore_index", [-100, 5, 2**63 - 1])
def test_first_bad_label_finds_the_first_offender(ignore_index):
    core = load_compiled_core()
    labels = torch.randint(0, 7, (4, 6))
    labels[0, 1] = ignore_index
    assert core.first_bad_label(labels.__dlpack__(), 7, ignore_index) == -1
    labels[2, 3] = 7
    labels[3, 0] = -1
    assert core.first_bad_label(labels.__dlpack__(), 7, ignore_index) == 2 * 6 + 3
    # Strided views are read through their strides.
    assert core.first_bad_label(labels.t().__dlpack__(), 7, ignore_index) == 0 * 4 + 3
    with pytest.raises(TypeError, match="labels"):
        core.first_bad_label(labels.int().__dlpack__(), 7, ignore_index)


def test_binding_reads_2d_logits_as_one_token_samples():
    core = load_compiled_core()
    cfg = GekoConfig().to_cpp()
    logits = torch.randn(5, 7)[:, :6]  # a row stride wider than the row
    labels = torch.tensor([0, 5, -100, 3, 2])
    flat, viewed = _outputs(5), _outputs(5)
    lse_flat, lse_viewed = torch.empty(5, 1, dtype=torch.float64), torch.empty(5, 1, dtype=torch.float64)
    core.stats_forward(logits.__dlpack__(), labels.__dlpack__(), -100, cfg, [t.__dlpack__() for t in flat], None,
                       lse_flat.__dlpack__())
    core.stats_forward(logits.unsqueeze(1).__dlpack__(), labels.unsqueeze(1).__dlpack__(), -100, cfg,
                       [t.__dlpack__() for t in viewed], None, lse_viewed.__dlpack__())
    for a, b in zip(flat, viewed):
        assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    assert torch.equal(lse_flat, lse_viewed)
    grad_flat, grad_viewed = torch.full((5, 6), 7.0), torch.full((5, 1, 6), 7.0)
    scale = torch.ones(5)
    core.cross_entropy_backward(logits.__dlpack__(), labels.__dlpack__(), lse_flat.__dlpack__(), scale.__dlpack__(),
                                grad_flat.__dlpack__(), -100, 0.5)
    core.cross_entropy_backward(logits.unsqueeze(1).__dlpack__(), labels.unsqueeze(1).__dlpack__(),
                                lse_viewed.__dlpack__(), scale.__dlpack__(), grad_viewed.__dlpack__(), -100, 0.5)
    assert torch.equal(grad_flat, grad_viewed[:, 0])
    assert torch.equal(grad_flat[2], torch.zeros(6))  # the ignored row
    with pytest.raises(ValueError, match="grad: expected shape"):
        core.cross_entropy_backward(logits.__dlpack__(), labels.__dlpack__(), lse_flat.__dlpack__(),
                                    scale.__dlpack__(), torch.zeros(5, 7).__dlpack__(), -100, 1.0)


@pytest.mark.parametrize("vocab", [16, 17, 37, 2047, 2048, 2049, 4111, 5000])
def test_bf16_max_argmax_and_clamp_from_the_bits(check_stats, vocab):
    # bf16 rows find their max, finiteness and a lower bound from the 16-bit patterns, in
    # chunks of 2048 (the argmax search starts in the chunk where the running max last
    # grew), and skip the underflow clamp when no element can reach it: all-negative rows,
    # zero maxima (+0 and -0 compare equal), ties across chunks, the max in every chunk and
    # in the tail, and rows whose range needs the clamp.
    rows = []
    base = torch.randn(vocab) * 3
    for position in sorted({0, 15 % vocab, 16 % vocab, vocab // 2, 2047 % vocab, 2048 % vocab, 4095 % vocab, vocab - 1}):
        row = base.clone()
        row[position] = 30.0
        rows.append(row)
        tie = base.clone()
        tie[position] = 12.0
        tie[vocab - 1 - position] = 12.0  # a tie, earlier or later than `position`
        rows.append(tie)
    placed = len(rows)
    rows.append(base - 100.0)  # all negative
    wide = base.clone()
    wide[vocab // 3] = -300.0  # below the clamp: exp underflows to nothing
    rows.append(wide)
    rows.append(base - 50.0)  # all negative, no clamp needed
    big = base.clone() * 50.0  # range of hundreds: the clamp is needed
    rows.append(big)
    negative_wide = base - 1000.0
    negative_wide[vocab // 4] = -1200.0  # all negative, the clamp needed
    rows.append(negative_wide)
    zeros = -(base.abs() + 1.0)
    zeros[vocab // 2] = -0.0
    zeros[vocab - 1] = 0.0  # max 0: the first element equal to it is the -0
    rows.append(zeros)
    zeros_only_negative = -(base.abs() + 1.0)
    zeros_only_negative[vocab // 3] = -0.0
    rows.append(zeros_only_negative)
    logits = torch.stack(rows).to(torch.bfloat16)
    n = logits.shape[0]
    labels = torch.randint(0, vocab, (n,))
    labels[:placed] = logits.float().argmax(dim=-1)[:placed]  # the first max: correct tokens
    labels[-2] = vocab // 2  # the -0, first of the two zero maxima
    got = sample_stats(logits, labels, per_token=True, backend="cpp")
    check_stats(got, logits, labels, per_token=True)
    assert torch.equal(got.tokens.correct.view(-1), (logits.float().argmax(dim=-1) == labels).float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("nan")])  # -inf: tests/test_numerics.py
@pytest.mark.parametrize("position", [0, 2047, 2048, 4999])
def test_bf16_non_finite_anywhere_in_a_long_row_invalidates_it(bad, position):
    logits, labels = make_inputs((2, 3, 5000), torch.bfloat16)
    logits[0, 1, position] = bad
    logits[1, 2] = logits[1, 2] - 100.0  # all negative, finite
    logits[1, 2, position] = -float("nan") if bad == bad else bad  # a NaN in an all-negative row
    got = sample_stats(logits, labels, per_token=True, backend="cpp")
    assert got.bucket[0].item() == BUCKET_INVALID and got.bucket[1].item() == BUCKET_INVALID
    for field in FLOAT_FIELDS:
        assert math.isnan(getattr(got.tokens, field)[0, 1].item()), field
        assert math.isnan(getattr(got.tokens, field)[1, 2].item()), field
        assert not bool(getattr(got.tokens, field)[0, 0].isnan().any()), field


@pytest.mark.parametrize("vocab", [15, 16, 33, 4111])
def test_bf16_rows_carry_the_next_rows_max_pass(check_stats, vocab):
    # A bf16 row's exponential pass also does the max pass of the row its thread reads next
    # (across chunks of rows and threads): rows in between that are ignored, out of range or
    # not finite, rows that are views of a wider tensor, and a max in the vector tail.
    wide = (torch.randn(4, 70, vocab + 9) * 3).to(torch.bfloat16)
    logits = wide[:, :, 5 : 5 + vocab]  # rows 2 * (vocab + 9) bytes apart
    logits[0, 3, vocab - 1] = 40.0  # max in the tail (or the last element)
    logits[1, 11] = logits[1, 11] - 200.0  # all negative, the clamp needed
    logits[2, 21, vocab // 2] = float("nan")  # not finite: its sample is invalid
    labels = torch.randint(0, vocab, (4, 70))
    labels[:, ::5] = -100  # ignored rows: not read, nothing carried past them
    labels[0, 3] = vocab - 1
    got = sample_stats(logits, labels, per_token=True, backend="cpp")
    check_stats(got, logits, labels, per_token=True)
    assert got.bucket[2].item() == BUCKET_INVALID
    assert got.tokens.correct[0, 3].item() == 1.0
