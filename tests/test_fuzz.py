"""Property-based fuzzing of every public entry point that reaches C++ or a kernel.

Each call gets adversarial input (empty arrays, huge and negative indices, NaN/inf, odd and
wrong dtypes, non-contiguous arrays, duplicates, zero sizes, extreme configurations) and
must either work (and then agree with the reference or with its documented invariants) or
raise one of the documented errors (TypeError, ValueError, IndexError) without changing any
state. A crash of the interpreter fails the run; under ``.ci/sanitize`` so does any
out-of-bounds access or undefined behaviour in the compiled core.

The default run is short (``GEKO_FUZZ_EXAMPLES``, default 40 examples per test); raise it
for long runs, e.g. ``GEKO_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geko_core import GekoConfig
from geko_core._backend import load_compiled_core
from geko_core.curriculum import MountainCurriculum
from geko_core.cross_entropy import cross_entropy_with_stats
from geko_core.linear_cross_entropy import linear_cross_entropy_with_stats
from geko_core.planner import (
    EpochPlanner,
    gainrl_update_mu,
    gaussian_window_plan,
    infobatch_plan,
    random_permutation,
    weighted_sample,
)
from geko_core.reference_table import ReferenceTable
from geko_core.selector import Selector
from geko_core.stats import sample_stats
from geko_core.table import MAX_STEP, SampleTable
from geko_core.types import SampleStats

settings.register_profile(
    "geko-fuzz",
    max_examples=int(os.environ.get("GEKO_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ = settings.get_profile("geko-fuzz")

#: The documented errors of bad input. CheckpointError is a ValueError.
DOCUMENTED = (TypeError, ValueError, IndexError)
_C = load_compiled_core()

# -- strategies ------------------------------------------------------------------------------

_INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
_FLOAT_DTYPES = [np.float16, np.float32, np.float64]
_SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1e300, -1e300]
_SPECIAL_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]


def _cast(values: list, dtype: Any) -> np.ndarray:
    """values as dtype, wrapping/saturating the way numpy does, without warnings."""
    with np.errstate(all="ignore"):
        if np.issubdtype(dtype, np.integer):
            return np.array([int(v) % 2**64 for v in values], dtype=np.uint64).astype(dtype)
        return np.array(values, dtype=np.float64).astype(dtype)


@st.composite
def layouts(draw, array: np.ndarray) -> Any:
    """The same values as a contiguous array, a strided view, a torch tensor or a list."""
    kind = draw(st.sampled_from(["plain", "strided", "reversed", "torch", "list"]))
    if kind == "strided":
        wide = np.zeros(array.shape[0] * 2, dtype=array.dtype)
        wide[::2] = array
        return wide[::2]
    if kind == "reversed":
        return array[::-1].copy()[::-1]
    if kind == "torch" and array.dtype not in (np.uint16, np.uint32, np.uint64):
        return torch.from_numpy(array.copy())
    if kind == "list":
        return array.tolist()
    return array


@st.composite
def index_arrays(draw, n: int, length: int | None = None) -> Any:
    size = draw(st.integers(0, 12)) if length is None else length
    element = st.one_of(st.integers(0, max(n - 1, 0)), st.sampled_from(_SPECIAL_INTS), st.integers(-5, n + 5))
    values = draw(st.lists(element, min_size=size, max_size=size))
    if draw(st.integers(0, 9)) == 0:  # occasionally a non-integer dtype
        dtype = draw(st.sampled_from([np.float32, np.float64, np.bool_]))
        return np.array(values, dtype=np.float64).astype(dtype)
    dtype = draw(st.sampled_from(_INT_DTYPES))
    return draw(layouts(_cast(values, dtype)))


@st.composite
def float_arrays(draw, length: int, low: float = -3.0, high: float = 6.0) -> Any:
    element = st.one_of(st.floats(low, high), st.sampled_from(_SPECIAL_FLOATS))
    values = draw(st.lists(element, min_size=length, max_size=length))
    dtype = draw(st.sampled_from(_FLOAT_DTYPES + [np.int32, np.bool_]))
    if dtype is np.int32:
        return np.array([0 if not math.isfinite(v) else int(max(min(v, 1e9), -1e9)) for v in values], dtype=dtype)
    if dtype is np.bool_:
        return np.array([bool(v == v and v > 0.5) for v in values])
    return draw(layouts(_cast(values, dtype)))


def steps() -> st.SearchStrategy:
    return st.one_of(
        st.integers(0, 100),
        st.sampled_from([-1, MAX_STEP, MAX_STEP + 1, 2**63, -(2**63), 2**70]),
        st.sampled_from([1.5, True, None, "3", np.int64(7), np.uint8(3)]),
    )


# -- state comparison --------------------------------------------------------------------------


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Deep equality of state dicts: numpy arrays bit for bit (NaN equal), floats NaN-equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for key in a:
            if isinstance(key, str) and key.endswith("_seconds"):
                continue  # wall-clock measurements
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, f"{where}: arrays differ"
        assert a.tobytes() == b.tobytes(), f"{where}: array contents differ"
    elif isinstance(a, torch.Tensor):
        assert_same(a.numpy(), b.numpy(), where)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {a!r} != {b!r}"
    else:
        assert not isinstance(b, (np.ndarray, torch.Tensor, dict, list)), f"{where}: {a!r} != {b!r}"
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(value: Any) -> Any:
    """A deep copy of an input (arrays, tensors, lists) to check that a call did not modify it."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return list(value)
    return value


def assert_unmodified(before: Any, after: Any) -> None:
    if isinstance(before, torch.Tensor):
        assert before.shape == after.shape and before.dtype == after.dtype
        if before.numel():
            assert torch.equal(before.contiguous().view(torch.uint8), after.detach().contiguous().view(torch.uint8))
        return
    if isinstance(before, np.ndarray):
        assert before.tobytes() == np.ascontiguousarray(after).tobytes()
        return
    assert_same(before, after, "input")


# -- SampleTable ----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data(), n=st.integers(1, 24), threads=st.sampled_from([1, 2]))
def test_table_update_fuzz(data, n, threads):
    config = GekoConfig(noise_guard_visits=2)
    table = SampleTable(n, config, num_threads=threads)
    reference = ReferenceTable(n, config)
    for _ in range(data.draw(st.integers(1, 4))):
        length = data.draw(st.integers(0, 10))
        idx = data.draw(index_arrays(n, length if data.draw(st.booleans()) else None))
        loss = data.draw(float_arrays(length))
        confidence = data.draw(float_arrays(length if data.draw(st.integers(0, 7)) else length + 1, 0.0, 1.0))
        correct = data.draw(float_arrays(length, 0.0, 1.0))
        step = data.draw(steps())
        inputs = [snapshot(v) for v in (idx, loss, confidence, correct)]
        before = table.state_dict()
        try:
            table.update(idx, loss, confidence, correct, step)
        except DOCUMENTED:
            assert_same(before, table.state_dict())
        else:
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, as in the table
                reference.update(
                    np.asarray(idx).astype(np.int64),
                    np.asarray(loss, dtype=np.float64).astype(np.float32),
                    np.asarray(confidence, dtype=np.float64).astype(np.float32),
                    np.asarray(correct, dtype=np.float64).astype(np.float32),
                    int(step),
                )
        for original, now in zip(inputs, (idx, loss, confidence, correct)):
            assert_unmodified(original, now)
        for name, values in reference.fields.items():
            np.testing.assert_array_equal(table.field(name), values, err_msg=name)
        assert table.updates_applied == reference.updates_applied
        assert table.nonfinite_skipped == reference.nonfinite_skipped


@st.composite
def counter_arrays(draw, n: int, dtype: Any, fill: float) -> Any:
    """A per-sample or per-row array for the table's report or GEKO's counters: usually
    right, sometimes of another dtype, length, layout or read-only, or None."""
    kind = draw(st.sampled_from(["right"] * 18 + ["dtype", "length", "strided", "readonly", "none", "list"]))
    if kind == "none":
        return None
    if kind == "list":
        return [fill] * n
    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in _INT_DTYPES + _FLOAT_DTYPES if d is not dtype]))
    length = n + draw(st.sampled_from([-1, 1])) if kind == "length" and n > 1 else n
    if np.issubdtype(dtype, np.floating):
        value = fill
    else:
        value = 0 if math.isnan(fill) or (fill < 0 and np.issubdtype(dtype, np.unsignedinteger)) else int(fill)
    array = np.full(length, value, dtype=dtype)
    if kind == "strided":
        wide = np.zeros(2 * length, dtype=dtype)
        return wide[::2]
    if kind == "readonly":
        array.setflags(write=False)
    return array


def _unchanged(arrays: dict[str, Any], copies: dict[str, Any]) -> None:
    for key, value in arrays.items():
        if isinstance(value, np.ndarray):
            assert value.tobytes() == copies[key].tobytes(), key


@FUZZ
@given(data=st.data(), n=st.integers(1, 16))
def test_table_update_report_and_counters_fuzz(data, n):
    """The table's update with its report (each row's bucket before and after) and GEKO's
    compiled visit counters on that report: whatever arrays and indices arrive, either a
    documented error with the table and every array unchanged, or a result."""
    table = SampleTable(n, GekoConfig())
    plain = SampleTable(n, GekoConfig())
    counters = {
        "seen_epoch": data.draw(counter_arrays(n, np.int32, -1)),
        "streak": data.draw(counter_arrays(n, np.uint8, 0)),
        "stall": data.draw(counter_arrays(n, np.uint8, 0)),
        "ref_loss": data.draw(counter_arrays(n, np.float32, math.nan)),
    }
    for _ in range(data.draw(st.integers(1, 3))):
        length = data.draw(st.integers(0, 10))
        idx = np.array(data.draw(st.lists(st.integers(-3, n + 2), min_size=length, max_size=length)), dtype=np.int64)
        if data.draw(st.booleans()):
            idx = np.clip(idx, 0, n - 1)
        values = st.lists(st.one_of(st.floats(0.0, 5.0), st.sampled_from(_SPECIAL_FLOATS)), min_size=length, max_size=length)
        loss, confidence, correct = (_cast(data.draw(values), np.float32) for _ in range(3))
        report = {"before": data.draw(counter_arrays(length, np.int8, 0)), "after": data.draw(counter_arrays(length, np.int8, 0))}
        epoch = data.draw(st.sampled_from([0, 1, 2, 3, 2**31 - 1, -1, 2**31]))
        freeze_streak = data.draw(st.sampled_from([0, 1, 2, 3, 255, 256, -1]))
        stall_drop = data.draw(st.sampled_from([0.0, 0.1, 0.2, 1.0, -0.1, 1.5, math.nan]))
        state = table.state_dict()
        copies = {key: value.copy() if isinstance(value, np.ndarray) else value for key, value in {**counters, **report}.items()}
        try:
            table.update_arrays(idx, loss, confidence, correct, 0, **report)
        except DOCUMENTED:
            assert_same(state, table.state_dict())
            _unchanged(report, copies)
            continue
        prior = plain.records()["bucket"].copy()
        plain.update_arrays(idx, loss, confidence, correct, 0)  # the table's part is update()
        np.testing.assert_array_equal(table.records(), plain.records())
        expected = {"before": prior[idx], "after": plain.records()["bucket"][idx]}
        for key, value in report.items():
            if value is not None:
                np.testing.assert_array_equal(value, expected[key], err_msg=key)
        if report["before"] is None or report["after"] is None:
            continue
        for key in ("before", "after"):
            copies[key] = report[key].copy()
        try:
            revisits, failed = _C.count_visits(
                idx, loss, confidence, correct, report["before"], report["after"], epoch, *counters.values(),
                freeze_streak, 0.85, stall_drop,
            )
        except DOCUMENTED:
            _unchanged({**counters, **report}, copies)
        else:
            assert 0 <= failed <= revisits <= length


@FUZZ
@given(data=st.data(), n=st.integers(1, 16))
def test_table_reads_fuzz(data, n):
    table = SampleTable(n)
    table.update(np.arange(n), np.linspace(0, 3, n), np.linspace(0, 1, n), np.arange(n) % 2 == 0, 1)
    idx = data.draw(index_arrays(n))
    before = table.state_dict()
    for call in (lambda: table.buckets(idx), lambda: table.gather("q", idx), lambda: table.gather("visits", idx)):
        try:
            out = call()
        except DOCUMENTED:
            pass
        else:
            as_int = np.asarray(idx).astype(np.int64)
            assert out.shape == as_int.shape and ((as_int >= 0) & (as_int < n)).all()
    assert_same(before, table.state_dict())


@pytest.mark.parametrize("n", [0, -1, -(2**63), 2**63, 2**64, True, 2.0, "3", None])
def test_table_bad_sizes_refused(n):
    with pytest.raises(DOCUMENTED):
        SampleTable(n)


@FUZZ
@given(data=st.data(), n=st.integers(1, 8))
def test_table_load_state_dict_fuzz(data, n):
    """A state dict with one field replaced by garbage is refused and changes nothing."""
    table = SampleTable(n)
    table.update(np.arange(n), np.full(n, 0.5), np.full(n, 0.9), np.ones(n), 3)
    before = table.state_dict()
    state = table.state_dict()
    key = data.draw(st.sampled_from(sorted(state)))
    if isinstance(state[key], np.ndarray):
        array = state[key].copy()
        mutation = data.draw(st.sampled_from(["byte", "shape", "dtype", "tensor"]))
        if mutation == "byte":
            raw = array.view(np.uint8)
            raw[data.draw(st.integers(0, raw.size - 1))] ^= np.uint8(1 << data.draw(st.integers(0, 7)))
        elif mutation == "shape":
            array = np.concatenate([array, array[:1]])
        elif mutation == "dtype":
            array = array.astype(np.float64 if array.dtype.kind != "f" else np.int64)
        else:
            array = torch.from_numpy(array.astype(np.float64))
        state[key] = array
    else:
        state[key] = data.draw(st.sampled_from([None, -1, 2**64, math.nan, "x", {}, [], {"q_alpha": 2.0}]))
    try:
        table.load_state_dict(state)
    except DOCUMENTED:
        assert_same(before, table.state_dict())
    else:
        # only a mutation the update rule could have produced may be accepted
        assert table.state_dict()["num_samples"] == n


# -- EpochPlanner and the plan functions ------------------------------------------------------------


def rates_strategy() -> st.SearchStrategy:
    rate = st.one_of(st.floats(0, 5), st.sampled_from([math.nan, math.inf, -1.0, 5.0000001, 1e300, 0.0]))
    return st.one_of(st.lists(rate, min_size=5, max_size=5), st.lists(rate, min_size=0, max_size=7))


def check_plan(plan, n: int) -> None:
    indices, weights = plan.indices, plan.weights
    assert indices.dtype == np.int64 and weights.dtype == np.float32 and indices.shape == weights.shape
    if n == 0:
        assert indices.size == 0
    if indices.size:
        assert indices.min() >= 0 and indices.max() < n
        assert np.isfinite(weights).all() and (weights >= 0).all()  # 0 marks padding entries


@FUZZ
@given(
    data=st.data(),
    n=st.integers(0, 40),
    replicas=st.integers(1, 4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.sampled_from([0, 1, 2**64 - 1]),
)
def test_planner_fuzz(data, n, replicas, shuffle, drop_last, seed):
    planner = EpochPlanner(n, seed=seed, num_replicas=replicas, rank=replicas - 1, shuffle=shuffle, drop_last=drop_last)
    length = n if data.draw(st.integers(0, 5)) else data.draw(st.integers(0, 45))
    codes = data.draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([-1, 5, 127, 255, 2**40])), min_size=length, max_size=length))
    dtype = data.draw(st.sampled_from([np.int8, np.uint8, np.int32, np.int64, np.uint64, np.float32]))
    buckets = data.draw(layouts(_cast(codes, dtype) if dtype is not np.float32 else np.array(codes, dtype=np.float32)))
    rates = data.draw(rates_strategy())
    last_visit = None
    if data.draw(st.booleans()):
        visits = data.draw(st.lists(st.sampled_from([-1, 0, 5, 2**31 - 1, 2**63 - 1, -(2**63)]), min_size=length, max_size=length))
        last_visit = data.draw(layouts(_cast(visits, data.draw(st.sampled_from([np.int32, np.int64, np.uint64, np.int16])))))
    kwargs = {
        "epoch": data.draw(st.sampled_from([0, 1, 2**62, -1, 2**64])),
        "last_visit_step": last_visit,
        "freeze_revisit": data.draw(st.sampled_from([None, 0.0, 0.5, 1.0, math.nan, -0.1, 1.5])),
        "chunk_size": data.draw(st.sampled_from([None, 0, 1, 7, 10**9, -1])),
    }
    inputs = [snapshot(buckets), snapshot(last_visit)]
    try:
        plan = planner.plan(buckets, rates, **kwargs)
    except DOCUMENTED:
        pass
    else:
        check_plan(plan, n)
        again = planner.plan(buckets, rates, **kwargs)  # deterministic in (seed, epoch, inputs)
        np.testing.assert_array_equal(plan.indices, again.indices)
        np.testing.assert_array_equal(plan.weights, again.weights)
    assert_unmodified(inputs[0], buckets)
    if last_visit is not None:
        assert_unmodified(inputs[1], last_visit)


@FUZZ
@given(data=st.data(), n=st.integers(0, 30))
def test_plan_functions_fuzz(data, n):
    weights = data.draw(float_arrays(n, 0.0, 10.0))
    k = data.draw(st.sampled_from([0, 1, n // 2, n, n + 1, -1, 2**63]))
    method = data.draw(st.sampled_from(["systematic", "exponential", "bogus"]))
    seed = data.draw(st.sampled_from([0, 2**64 - 1, 2**64, -1]))
    original = snapshot(weights)
    try:
        indices, probability = weighted_sample(weights, k, seed=seed, epoch=0, method=method)
    except DOCUMENTED:
        pass
    else:
        assert indices.shape == (k,) and len(np.unique(indices)) == k
        if k:
            assert indices.min() >= 0 and indices.max() < n
            assert ((probability > 0) & (probability <= 1)).all()
            assert (np.asarray(weights, dtype=np.float64)[indices] > 0).all()
    assert_unmodified(original, weights)

    try:
        perm = random_permutation(data.draw(st.sampled_from([0, 1, n, -1])), seed=seed)
    except DOCUMENTED:
        pass
    else:
        np.testing.assert_array_equal(np.sort(perm), np.arange(perm.size))

    scores = data.draw(float_arrays(n, -1e3, 1e3))
    try:
        plan = infobatch_plan(
            scores,
            epoch=data.draw(st.sampled_from([0, 3, -1])),
            num_epochs=data.draw(st.sampled_from([1, 4, 0])),
            prune_ratio=data.draw(st.sampled_from([0.0, 0.5, 0.999, 1.0, math.nan, -0.5])),
            delta=data.draw(st.sampled_from([0.0, 0.875, 1.0, math.inf])),
            num_replicas=2,
            rank=1,
        )
    except DOCUMENTED:
        pass
    else:
        check_plan(plan, n)

    order = data.draw(index_arrays(max(n, 1), n))
    try:
        plan = gaussian_window_plan(
            order,
            mu=data.draw(st.sampled_from([0.0, n / 2, -1e300, math.nan, math.inf])),
            sigma=data.draw(st.sampled_from([1e-300, 1.0, 1000.0, 0.0, -1.0, math.inf, math.nan])),
            num_samples_to_draw=data.draw(st.sampled_from([0, 1, n, n + 1])),
            method=data.draw(st.sampled_from(["systematic", "exponential"])),
        )
    except DOCUMENTED:
        pass
    else:
        assert plan.indices.size == 0 or set(plan.indices.tolist()) <= set(np.asarray(order).astype(np.int64).tolist())
        assert np.isfinite(plan.weights).all()

    extreme = st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308])
    try:
        mu = gainrl_update_mu(
            data.draw(extreme), data.draw(extreme), data.draw(extreme),
            num_positions=data.draw(st.sampled_from([1, 100, 0, -5])),
            n=data.draw(extreme), alpha=data.draw(extreme), beta=data.draw(extreme),
            acc_scale=data.draw(extreme),
        )
    except DOCUMENTED:
        pass
    else:
        assert math.isfinite(mu)


# -- MountainCurriculum ---------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_curriculum_fuzz(data):
    weight = st.one_of(st.floats(0, 10), st.sampled_from([math.nan, math.inf, -1.0, 0.0, 1e308]))
    end = st.one_of(st.floats(0, 1), st.sampled_from([1.0, 0.0, math.nan, math.inf, -0.5, 1.5]))
    phase = st.tuples(st.sampled_from(["A", "B", ""]), end, weight, weight, weight, st.sampled_from([1.0, 0.5, math.nan, -1.0]))
    phases = data.draw(st.one_of(st.none(), st.lists(phase, min_size=0, max_size=6)))
    if phases and data.draw(st.booleans()):  # make the last phase valid more often
        phases[-1] = ("Z", 1.0, 1.0, 1.0, 1.0, 1.0)
    option = st.sampled_from([0.0, 1e-6, 1e-7, 0.5, 1.0, 5.0, 5.1, math.nan, math.inf, -1.0])
    try:
        curriculum = MountainCurriculum(
            phases,
            smooth=data.draw(st.booleans()),
            max_rate=data.draw(st.sampled_from([1.0, 3.0, 5.0, 0.5, 6.0, math.nan])),
            min_rate=data.draw(option),
            freeze_revisit=data.draw(option),
        )
    except DOCUMENTED:
        return
    for p in data.draw(st.lists(st.one_of(st.floats(0, 1), st.sampled_from([math.nan, -1.0, 2.0, math.inf, -0.0])), min_size=1, max_size=4)):
        try:
            rates = curriculum.rates(p)
        except DOCUMENTED:
            continue
        assert len(rates) == 5 and all(math.isfinite(r) for r in rates)
        assert 0 <= rates[0] <= 1
        assert all(0 <= r <= curriculum.max_rate for r in rates[1:])
        assert curriculum.phase(p).index in range(len(curriculum.phases))
        assert math.isfinite(curriculum.lr_multiplier(p))


# -- sample_stats and cross_entropy_with_stats --------------------------------------------------------


@st.composite
def logits_and_labels(draw):
    shape = draw(st.sampled_from(["2d", "3d"]))
    batch, vocab = draw(st.integers(0, 4)), draw(st.sampled_from([0, 1, 2, 3, 5, 17]))
    tokens = draw(st.integers(0, 4))
    dims = (batch, vocab) if shape == "2d" else (batch, tokens, vocab)
    count = int(np.prod(dims))
    values = draw(st.lists(st.one_of(st.floats(-30, 30, width=32), st.sampled_from([math.nan, math.inf, -math.inf, 1e4, -1e4])), min_size=count, max_size=count))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32]))
    logits = torch.tensor(values, dtype=torch.float64).reshape(dims)
    logits = logits.to(dtype) if dtype != torch.int32 else torch.zeros(dims, dtype=torch.int32)
    layout = draw(st.sampled_from(["contiguous", "column_slice", "transposed", "expanded"]))
    if layout == "column_slice" and vocab:
        wide = torch.zeros((*dims[:-1], vocab * 2), dtype=logits.dtype)
        wide[..., ::2] = logits
        logits = wide[..., ::2]
    elif layout == "transposed" and logits.dim() == 3:
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "expanded" and batch == 1:
        logits = logits.expand(3, *dims[1:])
    label_shape = tuple(logits.shape[:-1])
    label_count = int(np.prod(label_shape))
    label = st.one_of(st.integers(0, max(vocab - 1, 0)), st.sampled_from([-100, -1, vocab, 2**31, -(2**63), 2**63 - 1]))
    labels = draw(st.lists(label, min_size=label_count, max_size=label_count))
    label_dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.uint8, torch.int16, torch.float32, torch.bool]))
    labels_t = torch.tensor(_cast(labels, np.int64)).reshape(label_shape)
    with np.errstate(all="ignore"):
        labels_t = labels_t.to(label_dtype)
    if draw(st.booleans()) and labels_t.dim() == 2 and labels_t.shape[1] > 1:
        labels_t = labels_t.t().contiguous().t()
    shift = draw(st.sampled_from([False, False, True]))
    return logits, labels_t, shift


def _assert_stats_match(stats: SampleStats, expected: SampleStats) -> None:
    for name in ("loss", "confidence", "correct", "entropy", "el2n"):
        got, want = getattr(stats, name), getattr(expected, name)
        if got is None or want is None:
            continue
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-3, equal_nan=True, msg=name)
    torch.testing.assert_close(stats.bucket.long(), expected.bucket.long())
    torch.testing.assert_close(stats.valid_tokens.long(), expected.valid_tokens.long())


@FUZZ
@given(case=logits_and_labels(), per_token=st.booleans(), ignore_index=st.sampled_from([-100, 0, 2**63 - 1]))
def test_sample_stats_fuzz(case, per_token, ignore_index):
    logits, labels, shift = case
    logits_before, labels_before = logits.clone(), labels.clone()
    try:
        stats = sample_stats(logits, labels, ignore_index=ignore_index, shift=shift, per_token=per_token, backend="cpp")
    except DOCUMENTED:
        pass
    else:
        expected = sample_stats(logits, labels, ignore_index=ignore_index, shift=shift, per_token=per_token, backend="reference")
        _assert_stats_match(stats, expected)
    assert torch.equal(labels, labels_before)
    assert torch.equal(logits.double().nan_to_num(0), logits_before.double().nan_to_num(0))  # never modified


@FUZZ
@given(
    case=logits_and_labels(),
    reduction=st.sampled_from(["mean", "sum", "none", "per_sample", "bogus"]),
    weight_kind=st.sampled_from(["none", "ok", "nan", "short", "int", "2d"]),
    backward=st.booleans(),
)
def test_cross_entropy_fuzz(case, reduction, weight_kind, backward):
    logits, labels, shift = case
    samples = logits.shape[0]
    weight = {
        "none": None,
        "ok": torch.linspace(0.5, 2.0, samples),
        "nan": torch.full((samples,), math.nan),
        "short": torch.ones(samples + 1),
        "int": torch.ones(samples, dtype=torch.int64),
        "2d": torch.ones(samples, 1),
    }[weight_kind]
    differentiable = logits.dtype.is_floating_point
    x = logits.detach().clone().requires_grad_(differentiable)
    try:
        loss, stats = cross_entropy_with_stats(x, labels, shift=shift, sample_weight=weight, reduction=reduction, backend="cpp")
    except DOCUMENTED:
        return
    x_ref = logits.detach().double().clone().requires_grad_(True)
    loss_ref, stats_ref = cross_entropy_with_stats(
        x_ref, labels, shift=shift, sample_weight=weight, reduction=reduction, backend="reference"
    )
    _assert_stats_match(stats, stats_ref)
    if torch.isfinite(logits.double()).all():
        # With an inf logit the fused path documents a NaN loss while torch's cross-entropy
        # (the reference) can return a finite one: the values are compared on finite logits.
        torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=2e-3, atol=2e-3, equal_nan=True)
    if backward and differentiable and loss.numel():
        loss.sum().backward()
        loss_ref.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
        if torch.isfinite(x_ref.grad).all() and logits.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-3, atol=1e-3)


@st.composite
def linear_inputs(draw):
    """hidden, weight, bias, labels, shift for linear_cross_entropy_with_stats. Finite values are
    small multiples of 1/4 (bias 1/8), so every logit is exact in any dtype and summation
    order and the statistics can be compared with the reference exactly."""
    shape = draw(st.sampled_from(["2d", "3d"]))
    batch, tokens, dim = draw(st.integers(0, 3)), draw(st.integers(0, 4)), draw(st.integers(1, 4))
    vocab = draw(st.sampled_from([0, 1, 2, 3, 5, 17]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32]))
    element = st.one_of(st.integers(-3, 3).map(lambda k: k / 4), st.sampled_from([math.nan, math.inf, -math.inf]))

    def tensor(dims, scale=1.0):
        count = int(np.prod(dims))
        values = draw(st.lists(element, min_size=count, max_size=count))
        return (torch.tensor(values, dtype=torch.float64).reshape(dims) * scale).to(dtype)

    dims = (batch, dim) if shape == "2d" else (batch, tokens, dim)
    hidden = tensor(dims)
    weight_dim = dim if draw(st.integers(0, 9)) else dim + 1  # occasionally a d mismatch
    weight = tensor((vocab, weight_dim))
    bias = tensor((vocab,), 0.5) if draw(st.booleans()) else None
    label = st.one_of(st.integers(0, max(vocab - 1, 0)), st.sampled_from([-100, -1, vocab, 2**63 - 1]))
    label_shape = dims[:-1]
    labels = draw(st.lists(label, min_size=int(np.prod(label_shape)), max_size=int(np.prod(label_shape))))
    label_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32]))
    with np.errstate(all="ignore"):
        labels_t = torch.tensor(_cast(labels, np.int64)).reshape(label_shape).to(label_dtype)
    shift = draw(st.sampled_from([False, False, True]))
    return hidden, weight, bias, labels_t, shift


@FUZZ
@given(
    case=linear_inputs(),
    reduction=st.sampled_from(["mean", "sum", "none", "per_sample", "bogus"]),
    chunk_size=st.sampled_from([None, 1, 2, 3, 100, 0, -1, 2.0, True]),
    grad=st.sampled_from([True, False, 1]),
    backward=st.booleans(),
)
def test_linear_cross_entropy_fuzz(case, reduction, chunk_size, grad, backward):
    hidden, weight, bias, labels, shift = case
    floating = hidden.dtype.is_floating_point
    h = hidden.detach().clone().requires_grad_(floating)
    w = weight.detach().clone().requires_grad_(weight.dtype.is_floating_point)
    before = [t.clone() for t in (hidden, weight, labels)]
    try:
        loss, stats = linear_cross_entropy_with_stats(
            h, w, labels, bias=bias, shift=shift, reduction=reduction, chunk_size=chunk_size, grad=grad, backend="cpp"
        )
    except DOCUMENTED:
        assert h.grad is None and w.grad is None
        for t, b in zip((h, w, labels), before):
            assert torch.equal(t.detach().double().nan_to_num(0), b.double().nan_to_num(0))
        return
    assert (loss.grad_fn is None) == (not grad)
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    loss_ref, stats_ref = cross_entropy_with_stats(logits, labels, shift=shift, reduction=reduction, backend="reference")
    _assert_stats_match(stats, stats_ref)
    if torch.isfinite(logits).all():
        torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=2e-3, atol=2e-3, equal_nan=True)
    if backward and grad and loss.numel():
        loss.sum().backward()
        assert h.grad is not None and h.grad.shape == h.shape and w.grad is not None and w.grad.shape == w.shape


# -- Selector -------------------------------------------------------------------------------------------


@st.composite
def selector_calls(draw, n: int):
    kind = draw(st.sampled_from(["observe_stats", "loss", "observe", "weights", "set_epoch", "plan", "load_state", "step"]))
    length = draw(st.integers(0, 6))
    idx = draw(index_arrays(n, length if draw(st.integers(0, 4)) else None))
    return kind, idx, length, draw(st.data())


@FUZZ
@given(
    data=st.data(),
    n=st.integers(1, 12),
    policy=st.sampled_from(["geko", "infobatch", "uniform", "random_subset", "es", "eswp"]),
)
def test_selector_fuzz(data, n, policy):
    selector = Selector(n, policy, epochs=3, seed=1)
    for _ in range(data.draw(st.integers(1, 5))):
        kind, idx, length, more = data.draw(selector_calls(n))
        if isinstance(idx, list) and not idx:
            idx = np.zeros(0, dtype=np.int64)
        before = selector.state_dict()
        vocab = 3
        logits = torch.tensor(more.draw(st.lists(st.sampled_from([0.0, 1.0, -2.0, math.nan, math.inf]), min_size=length * vocab, max_size=length * vocab))).reshape(length, vocab)
        labels = torch.tensor(more.draw(st.lists(st.sampled_from([0, 1, 2, -100, 3]), min_size=length, max_size=length)), dtype=torch.int64)
        try:
            if kind == "observe_stats":
                stats = sample_stats(logits, labels.clamp(-100, 2), backend="cpp")
                selector.observe_stats(idx, stats)
            elif kind == "loss":
                selector.loss(logits, labels, idx)
            elif kind == "observe":
                selector.observe(idx, logits, labels)
            elif kind == "weights":
                w = selector.weights(idx)
                assert torch.isfinite(w).all() and (w >= 0).all()
            elif kind == "set_epoch":
                selector.set_epoch(more.draw(st.sampled_from([0, 1, 2, 5, -1, True, 1.5])))
            elif kind == "plan":
                indices, weights = selector.plan()
                assert indices.size == 0 or (indices.min() >= 0 and indices.max() < n)
                assert np.isfinite(weights).all()
            elif kind == "step":
                selector.step()
            else:
                state = selector.state_dict()
                key = more.draw(st.sampled_from(sorted(state)))
                state[key] = more.draw(st.sampled_from([None, -1, 10**30, "x", [], {}, np.arange(3)]))
                selector.load_state_dict(state)
        except DOCUMENTED:
            assert_same(before, selector.state_dict())


# -- regressions found by the fuzzers above ----------------------------------------------------------


def test_gather_refuses_negative_indices():
    table = SampleTable(3)
    with pytest.raises(IndexError, match="index -1 at position 1"):
        table.gather("q", np.array([0, -1]))  # numpy indexing would have wrapped to sample 2


def test_selector_loss_with_bad_labels_does_not_plan_the_epoch():
    selector = Selector(6, "geko", epochs=2)
    with pytest.raises(ValueError, match="label 7"):
        selector.loss(torch.zeros(2, 3), torch.tensor([0, 7]), torch.tensor([0, 1]))
    assert selector.state_dict()["epoch_plan"] is None  # planned later, from the table as it is then


def test_selector_select_with_bad_labels_does_not_plan_the_epoch():
    selector = Selector(6, "es", epochs=2)
    with pytest.raises(ValueError, match="label 7"):
        selector.select(torch.tensor([0, 1]), torch.zeros(2, 3), torch.tensor([0, 7]))
    assert selector.state_dict()["epoch_plan"] is None


_MALFORMED = [
    (key, value)
    for key in ["counters", "history", "epoch", "step", "epoch_plan", "table", "policy_state"]
    for value in ["missing", {}, -1, None]
    if not (key == "policy_state" and value in ({}, None))  # the valid empty state of geko
    and not (key == "epoch_plan" and value is None)  # a state saved before the epoch was planned
] + [
    ("policy_state", {}),
    ("policy_state", {"low_streak": np.zeros(8, np.int32)}),
    ("epoch_plan", {"indices": np.array([0, 9]), "weights": np.ones(2, np.float32), "position": 0, "epoch": 0}),
    ("epoch_plan", {"indices": np.array([0, 1]), "weights": np.ones(2, np.float32), "position": 3, "epoch": 0}),
    ("epoch_plan", {"indices": np.array([0, 1]), "weights": np.array([1, -1], np.float32), "position": 0, "epoch": 0}),
    ("epoch_plan", {"indices": np.array([0, 1]), "weights": np.ones(2, np.float32), "position": 0, "epoch": 1}),
]


@pytest.mark.parametrize(("key", "value"), _MALFORMED)
def test_selector_load_state_dict_refuses_malformed_entries_and_changes_nothing(key, value):
    policy = "eswp" if key == "policy_state" and isinstance(value, dict) else "geko"
    source = Selector(8, policy, epochs=2, seed=3)
    source.observe_stats(np.arange(4), sample_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, 0])))
    target = Selector(8, policy, epochs=2, seed=3)
    before = target.state_dict()
    state = source.state_dict()
    if value == "missing":
        del state[key]
    else:
        state[key] = value
    with pytest.raises((ValueError, TypeError, IndexError)):
        target.load_state_dict(state)
    assert_same(before, target.state_dict())


def test_int32_labels_with_a_huge_ignore_index_are_checked_as_int64():
    """torch wrapped ignore_index=2**63-1 to -1 when comparing with int32 labels, so the
    label -1 passed the range check as if ignored and the C++ path disagreed with the reference."""
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="label -1"):
        sample_stats(logits, torch.tensor([0, -1], dtype=torch.int32), ignore_index=2**63 - 1, backend="cpp")


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("batch", [0, 2])
def test_cross_entropy_backward_with_no_tokens(batch, shift):
    """[B, 0, V] logits: the backward used to refuse its own empty token_scale buffer
    ("token_scale: must be contiguous": an expanded empty tensor keeps stride 0), and with
    shift=True to index the last position of an empty token dimension."""
    x = torch.zeros(batch, 0, 3, requires_grad=True)
    loss, _ = cross_entropy_with_stats(x, torch.zeros(batch, 0, dtype=torch.int64), shift=shift, reduction="sum", backend="cpp")
    loss.backward()
    assert x.grad is not None and x.grad.shape == (batch, 0, 3)
