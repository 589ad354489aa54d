import os

# Triton's @jit reads TRITON_INTERPRET when a kernel module is imported, so the whole test
# session runs the Triton kernels in the CPU interpreter; ahead-of-time compilation for GPU
# targets runs in subprocesses with it unset. Triton warns when FP fusion is unset, and the
# tests run with warnings as errors.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (training runs that must reproduce to the digit and not
    contend with each other); the previous count is restored. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """geko_core's cache (pre-trained models) in the test's own directory."""
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory):
    # Child processes (`python -m ...`, `python -c ...`) put their working directory first on
    # sys.path; from the repository root that would shadow the installed package with the
    # source folder, which has neither `_C` nor `geko_core.kernels`.
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(previous)


# -- the statistics contract, shared by tests/test_contracts.py and the backend-specific files --

STATS_FLOAT_FIELDS = ("loss", "confidence", "label_prob", "correct", "entropy", "el2n")
TOKEN_FLOAT_FIELDS = ("loss", "confidence", "label_prob", "entropy", "el2n")


def assert_stats_match_reference(got, logits, labels, *, atol=2e-5, rtol=2e-5, **options):
    """``got`` (a SampleStats) against the torch reference on the same input.

    Discrete outputs (bucket, valid_tokens, validity, the correct fraction, a ratio of small
    integers) equal the reference's exactly. Floats are compared with the reference evaluated
    in float64 on the same values (upcasting is exact): every backend reads low-precision
    logits as they are and accumulates in float32, so the tolerance is float32's whatever the
    input dtype. Token values are compared where the token's row is finite and its label in
    range; tokens that do not count read as zero.
    """
    from geko_core.reference import as_samples, sample_stats_reference, token_stats_reference

    ref = sample_stats_reference(logits, labels, **options)
    exact = sample_stats_reference(logits.double(), labels, **options)
    assert got.bucket.dtype == torch.int8 and got.valid_tokens.dtype == torch.int32
    assert got.bucket.device == logits.device
    assert torch.equal(got.bucket, ref.bucket), (got.bucket, ref.bucket)
    assert torch.equal(got.valid_tokens, ref.valid_tokens)
    assert torch.equal(got.valid, ref.valid)
    torch.testing.assert_close(got.correct, ref.correct, rtol=0, atol=0, equal_nan=True)
    for field in STATS_FLOAT_FIELDS:
        value = getattr(got, field)
        assert value.dtype == torch.float32 and value.shape == ref.bucket.shape, field
        torch.testing.assert_close(value, getattr(exact, field), rtol=rtol, atol=atol, equal_nan=True, msg=field)
    if not options.get("per_token"):
        assert got.tokens is None
        return ref
    assert got.tokens is not None and ref.tokens is not None
    assert got.tokens.valid.dtype == torch.bool
    assert torch.equal(got.tokens.valid, ref.tokens.valid)
    logits3, labels3 = as_samples(logits, labels, shift=options.get("shift", False))
    _, good = token_stats_reference(logits3, labels3, ignore_index=options.get("ignore_index", -100))
    assert torch.equal(got.tokens.correct[good], ref.tokens.correct[good])
    for field in TOKEN_FLOAT_FIELDS:
        value = getattr(got.tokens, field)
        assert value.dtype == torch.float32 and value.shape == labels3.shape, field
        assert bool((value[~got.tokens.valid] == 0).all()), field
        torch.testing.assert_close(value[good], getattr(exact.tokens, field)[good], rtol=rtol, atol=atol, msg=field)
    return ref


@pytest.fixture
def check_stats():
    """``assert_stats_match_reference``: the statistics contract every backend meets."""
    return assert_stats_match_reference
