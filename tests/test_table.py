"""SampleTable: the update rule against the numpy oracle, bad input, state dicts, files, threads."""

from __future__ import annotations

import copy
import io
import json
import pickle
import struct
import threading
import types
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geko_core._table_file as table_file
from geko_core import GekoConfig
from geko_core.config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_LIGHT, BUCKET_NAMES, BUCKET_UNSEEN
from geko_core.reference import sample_stats_reference
from geko_core.reference_table import FIELD_DTYPES, ReferenceTable
from geko_core.table import FLAG_SUSPECTED_NOISY, MAX_STEP, RECORD_DTYPE, CheckpointError, SampleTable

FLOAT32_MAX = float(np.finfo(np.float32).max)


# -- helpers ---------------------------------------------------------------------------


def random_batch(rng: np.random.Generator, num_samples: int, size: int, *, nonfinite: float = 0.0):
    """Indices with duplicates, losses over several scales, and some NaN/inf values."""
    indices = rng.integers(0, num_samples, size)
    loss = (rng.exponential(1.0, size) * rng.choice([1e-3, 1.0, 30.0], size) - 0.05).astype(np.float32)
    confidence = rng.random(size).astype(np.float32)
    correct = rng.choice([0.0, 1.0, 0.5, 0.9, 0.95], size).astype(np.float32)
    if nonfinite:
        for values in (loss, confidence, correct):
            hit = rng.random(size) < nonfinite / 3
            values[hit] = rng.choice([np.nan, np.inf, -np.inf], int(hit.sum()))
    return indices, loss, confidence, correct


def assert_matches_reference(table: SampleTable, reference: ReferenceTable) -> None:
    # The compiled rule is bit-exact with the oracle by construction (float32 coefficients,
    # exact float64 products), so floats are compared exactly too.
    for name, dtype in FIELD_DTYPES.items():
        got = table.field(name)
        assert got.dtype == dtype, name
        np.testing.assert_array_equal(got, reference.fields[name], err_msg=name)
    assert table.nonfinite_skipped == reference.nonfinite_skipped
    assert table.updates_applied == reference.updates_applied


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == after[key].dtype and value.tobytes() == after[key].tobytes(), key
        else:
            assert value == after[key], key


def trained_table(num_samples: int = 500, config: GekoConfig | None = None, seed: int = 1) -> SampleTable:
    table = SampleTable(num_samples, config)
    rng = np.random.default_rng(seed)
    for step in range(6):
        table.update(*random_batch(rng, num_samples, num_samples // 2, nonfinite=0.05), step=step)
    return table


def one_update(table: SampleTable, index: int, loss: float, confidence: float, correct: float, step: int) -> None:
    f32 = np.float32
    table.update(np.array([index]), np.array([loss], f32), np.array([confidence], f32), np.array([correct], f32), step)


# -- layout and construction -------------------------------------------------------------


def test_record_layout_is_32_bytes():
    assert RECORD_DTYPE.itemsize == 32
    assert list(RECORD_DTYPE.names) == list(FIELD_DTYPES)
    for name, dtype in FIELD_DTYPES.items():
        assert RECORD_DTYPE.fields[name][0] == dtype


def test_memory_of_a_million_samples_is_at_most_32_mb():
    table = SampleTable(1_000_000)
    assert table.nbytes == 32 * 1_000_000 <= 32_000_000
    assert table.records().nbytes == table.nbytes


def test_new_table_is_unseen():
    config = GekoConfig(q_init=0.25)
    table = SampleTable(1000, config)
    assert len(table) == table.num_samples == 1000
    assert table.config == config
    assert table.bucket_counts() == {"FREEZE": 0, "LIGHT": 0, "FOCUS": 0, "HARD": 0, "UNSEEN": 1000}
    assert np.all(table.field("q") == np.float32(0.25))
    assert np.all(table.field("last_step") == -1)
    assert np.all(table.field("visits") == 0)
    assert table.nonfinite_skipped == 0 and table.updates_applied == 0
    assert "num_samples=1000" in repr(table)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((0,), ValueError, "num_samples"),
        ((-5,), ValueError, "-5"),
        ((2.5,), TypeError, "float"),
        ((True,), TypeError, "bool"),
        ((10, {"q_alpha": 0.1}), TypeError, "GekoConfig"),
    ],
)
def test_construction_refuses_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        SampleTable(*args)


# -- the update rule -----------------------------------------------------------------------

CONFIGS = {
    "default": GekoConfig(),
    "fast": GekoConfig(q_alpha=0.37, loss_scale=0.7, loss_ema_beta=0.3, loss_diff_ema_beta=0.77, noise_guard_visits=2),
    "no_guard": GekoConfig(noise_guard_visits=0, freeze_q=0.3, q_init=0.9, correct_threshold=0.5),
    "alpha_one": GekoConfig(q_alpha=1.0, loss_ema_beta=0.0, loss_diff_ema_beta=0.0, freeze_confidence=0.5, hard_confidence=0.2),
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_update_matches_reference(config_name, index_dtype):
    config = CONFIGS[config_name]
    num_samples = 3000
    table, reference = SampleTable(num_samples, config), ReferenceTable(num_samples, config)
    rng = np.random.default_rng(7)
    for step in range(40):
        batch = random_batch(rng, num_samples, int(rng.integers(1, 2000)), nonfinite=0.03)
        table.update(batch[0].astype(index_dtype), *batch[1:], step=step)
        reference.update(*batch, step=step)
    assert_matches_reference(table, reference)
    assert reference.nonfinite_skipped > 0
    counts = table.bucket_counts_array()
    np.testing.assert_array_equal(counts, reference.bucket_counts())
    assert counts.sum() == num_samples


@pytest.mark.parametrize("num_threads", [2, 3, 0])
def test_parallel_updates_match_reference(num_threads):
    # Batches from 32768 on are split over the threads, each owning a range of the table.
    num_samples, size = 60_000, 80_000
    table = SampleTable(num_samples, num_threads=num_threads)
    serial, reference = SampleTable(num_samples, num_threads=1), ReferenceTable(num_samples)
    rng = np.random.default_rng(3)
    for step in range(4):
        batch = random_batch(rng, num_samples, size, nonfinite=0.01)
        for target in (table, serial, reference):
            target.update(*batch, step=step)
    assert_matches_reference(table, reference)
    assert_same_state(serial.state_dict(), table.state_dict())
    np.testing.assert_array_equal(table.bucket_counts_array(), reference.bucket_counts())
    indices = rng.integers(0, num_samples, 40_000)
    np.testing.assert_array_equal(table.buckets(indices), reference.fields["bucket"][indices])


def test_num_threads_setting():
    table = SampleTable(10)
    assert table.num_threads == 1
    table.num_threads = 4
    assert table.num_threads == 4
    with pytest.raises(ValueError, match="num_threads must be in"):
        table.num_threads = -1
    with pytest.raises(TypeError, match="num_threads"):
        table.num_threads = 2.0
    with pytest.raises(ValueError, match="5000"):
        SampleTable(10, num_threads=5000)
    assert table.num_threads == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 7),
                st.floats(-1.0, 50.0, width=32) | st.sampled_from([np.nan, np.inf]),
                st.floats(0.0, 1.0, width=32) | st.just(np.nan),
                st.sampled_from([0.0, 0.5, 0.9, 1.0]),
            ),
            max_size=12,
        ),
        max_size=12,
    ),
    noise_guard=st.integers(0, 3),
)
def test_update_matches_reference_on_generated_batches(batches, noise_guard):
    config = GekoConfig(noise_guard_visits=noise_guard, q_alpha=0.5, freeze_q=0.6)
    table, reference = SampleTable(8, config), ReferenceTable(8, config)
    for step, batch in enumerate(batches):
        columns = [np.array(column) for column in zip(*batch)] if batch else [np.array([], np.int64)] + [np.array([], np.float32)] * 3
        indices = columns[0].astype(np.int64)
        values = [c.astype(np.float32) for c in columns[1:]]
        table.update(indices, *values, step=step)
        reference.update(indices, *values, step=step)
    assert_matches_reference(table, reference)


def test_duplicate_indices_apply_in_batch_order():
    config = GekoConfig(loss_ema_beta=0.5, loss_diff_ema_beta=0.5)
    table = SampleTable(4, config)
    losses = np.array([1.0, 3.0, 2.0, 7.0], np.float32)
    table.update(np.array([2, 2, 2, 2]), losses, np.full(4, 0.3, np.float32), np.zeros(4, np.float32), step=5)
    # 1.0 seeds the EMAs, then 3.0, 2.0, 7.0 in that order.
    ema, diff_ema, last = 1.0, 0.0, 1.0
    for loss in (3.0, 2.0, 7.0):
        diff_ema = 0.5 * diff_ema + 0.5 * (loss - last)
        ema = 0.5 * ema + 0.5 * loss
        last = loss
    assert table.field("loss_ema")[2] == np.float32(ema)
    assert table.field("loss_diff_ema")[2] == np.float32(diff_ema)
    assert table.field("last_loss")[2] == 7.0 and table.field("visits")[2] == 4
    assert table.updates_applied == 4


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_update_reports_each_rows_bucket_before_and_after_the_batch(index_dtype):
    rng = np.random.default_rng(5)
    table, plain = SampleTable(30, GekoConfig(q_alpha=0.5)), SampleTable(30, GekoConfig(q_alpha=0.5))
    for step in range(8):
        idx = rng.integers(0, 30, 40).astype(index_dtype)  # duplicates included
        loss = rng.uniform(0, 3, 40).astype(np.float32)
        conf = rng.uniform(0.3, 1, 40).astype(np.float32)
        correct = (rng.random(40) < 0.7).astype(np.float32)
        loss[rng.random(40) < 0.1] = np.nan  # skipped rows keep their bucket
        before, after = np.full(40, 9, np.int8), np.full(40, 9, np.int8)
        expected_before = plain.records()["bucket"][idx]
        plain.update_arrays(idx, loss, conf, correct, step)
        table.update_arrays(idx, loss, conf, correct, step, before=before, after=after)
        np.testing.assert_array_equal(before, expected_before)
        np.testing.assert_array_equal(after, plain.records()["bucket"][idx])
        np.testing.assert_array_equal(table.records(), plain.records())
    table.update_arrays(idx, loss, conf, correct, 9, after=after)  # either one alone
    assert (after != 9).all()


@pytest.mark.parametrize(
    "report, error, match",
    [
        ({"before": np.zeros(2, np.int8)}, ValueError, "before must have one entry per row"),
        ({"after": np.zeros(3, np.int16)}, TypeError, "after must have dtype int8"),
        ({"after": np.zeros(6, np.int8)[::2]}, ValueError, "after must be contiguous"),
        ({"before": [0, 0, 0]}, TypeError, "before must be a numpy array"),
        ({"before": np.zeros(3, np.int8), "indices": np.array([0, 1, 4])}, IndexError, "out of range"),
        ({"after": np.zeros(3, np.int8), "step": -1}, ValueError, "step"),
    ],
)
def test_update_report_refuses_bad_input_and_writes_nothing(report, error, match):
    table = SampleTable(4)
    ones = np.ones(3, np.float32)
    table.update_arrays(np.array([0, 1, 2]), ones, ones, ones, 1)
    records = table.records().copy()
    indices, step = report.pop("indices", np.array([0, 1, 2])), report.pop("step", 2)
    if "before" in report and isinstance(report["before"], np.ndarray):
        report["before"].fill(7)
    with pytest.raises(error, match=match):
        table.update_arrays(indices, ones, ones, ones, step, **report)
    assert np.array_equal(records, table.records())
    for value in report.values():
        if isinstance(value, np.ndarray) and value.dtype == np.int8:
            assert (value == 7).all() or (value == 0).all()


def test_a_read_only_report_array_is_refused():
    table = SampleTable(4)
    ones = np.ones(2, np.float32)
    after = np.zeros(2, np.int8)
    after.setflags(write=False)
    with pytest.raises(ValueError, match="after must be writable"):
        table.update_arrays(np.array([0, 1]), ones, ones, ones, 1, after=after)
    assert (table.records()["visits"] == 0).all()


def test_first_visit_seeds_the_emas_and_later_visits_follow_the_rule():
    config = GekoConfig(q_alpha=0.5, loss_scale=2.0, loss_ema_beta=0.75, loss_diff_ema_beta=0.5)
    table = SampleTable(3, config)
    one_update(table, 1, 1.0, 0.7, 1.0, step=3)
    assert table.field("q")[1] == np.float32(0.5 * 0.5 + 0.5 * 0.5)  # reward 1 - 1/2
    assert table.field("loss_ema")[1] == 1.0 and table.field("loss_diff_ema")[1] == 0.0
    one_update(table, 1, 3.0, 0.7, 1.0, step=9)  # reward 0 (loss >= loss_scale)
    assert table.field("q")[1] == np.float32(0.25)
    assert table.field("loss_ema")[1] == np.float32(0.75 * 1.0 + 0.25 * 3.0)
    assert table.field("loss_diff_ema")[1] == np.float32(0.5 * 2.0)
    record = table.records()[1]
    assert (record["visits"], record["last_step"], record["last_loss"], record["last_correct"]) == (2, 9, 3.0, 255)
    assert record["last_confidence"] == np.float32(0.7)
    one_update(table, 1, -4.0, 0.7, 0.5, step=10)  # a negative loss earns the full reward
    assert table.field("q")[1] == np.float32(0.5 * 0.25 + 0.5 * 1.0)
    assert table.field("last_correct")[1] == 128  # round(127.5) -> even
    assert table.field("visits")[[0, 2]].tolist() == [0, 0]


def test_freeze_needs_q_at_least_freeze_q():
    config = GekoConfig(q_alpha=0.1, q_init=0.5, freeze_q=0.8, loss_scale=2.0)
    table, reference = SampleTable(1, config), ReferenceTable(1, config)
    seen = []
    for step in range(30):
        one_update(table, 0, 0.0, 0.99, 1.0, step)  # correct, confident, reward 1
        reference.update(np.array([0]), np.array([0.0], np.float32), np.array([0.99], np.float32), np.array([1.0], np.float32), step)
        q = table.field("q")[0]
        expected = BUCKET_FREEZE if q >= np.float32(0.8) else BUCKET_LIGHT
        assert table.field("bucket")[0] == expected
        seen.append(expected)
    # q = 1 - 0.5 * 0.9^k crosses 0.8 after 9 visits.
    assert seen.index(BUCKET_FREEZE) == 8 and set(seen[8:]) == {BUCKET_FREEZE} and set(seen[:8]) == {BUCKET_LIGHT}
    assert_matches_reference(table, reference)
    # A wrong answer leaves FREEZE at once.
    one_update(table, 0, 5.0, 0.99, 0.0, 30)
    assert table.field("bucket")[0] == BUCKET_HARD


def test_instant_buckets_and_correct_threshold():
    config = GekoConfig(freeze_q=0.0, correct_threshold=0.9)
    table = SampleTable(5, config)
    confidence = np.array([0.9, 0.7, 0.7, 0.5, 0.9], np.float32)
    correct = np.array([1.0, 1.0, 0.0, 0.0, 0.85], np.float32)  # 0.85 < 0.9: wrong
    table.update(np.arange(5), np.ones(5, np.float32), confidence, correct, step=0)
    assert table.field("bucket").tolist() == [BUCKET_FREEZE, BUCKET_LIGHT, BUCKET_HARD, BUCKET_FOCUS, BUCKET_HARD]


def test_noise_guard_lowers_persistent_hard_samples_and_clears():
    table = SampleTable(2, GekoConfig(noise_guard_visits=3))
    history = []
    for step in range(5):
        one_update(table, 0, 3.0, 0.95, 0.0, step)  # confidently wrong: HARD
        history.append((int(table.field("bucket")[0]), int(table.field("hard_streak")[0]), int(table.field("flags")[0])))
    noisy = FLAG_SUSPECTED_NOISY
    assert history == [
        (BUCKET_HARD, 1, 0), (BUCKET_HARD, 2, 0), (BUCKET_FOCUS, 3, noisy), (BUCKET_FOCUS, 4, noisy), (BUCKET_FOCUS, 5, noisy)
    ]
    one_update(table, 0, 3.0, 0.3, 0.0, 5)  # unconfident and wrong: leaves HARD
    assert (table.field("bucket")[0], table.field("hard_streak")[0], table.field("flags")[0]) == (BUCKET_FOCUS, 0, 0)
    one_update(table, 0, 3.0, 0.95, 0.0, 6)
    assert (table.field("bucket")[0], table.field("hard_streak")[0]) == (BUCKET_HARD, 1)


def test_noise_guard_disabled_keeps_hard_and_saturates_the_streak():
    table = SampleTable(1, GekoConfig(noise_guard_visits=0))
    for step in range(260):
        one_update(table, 0, 3.0, 0.95, 0.0, step)
    assert table.field("bucket")[0] == BUCKET_HARD and table.field("hard_streak")[0] == 255
    assert table.field("flags")[0] == 0 and table.field("visits")[0] == 260


def test_nonfinite_statistics_skip_the_sample_and_are_counted():
    table = trained_table(100)
    before = table.state_dict()
    indices = np.array([3, 4, 5, 6, 7])
    loss = np.array([np.nan, 1.0, 1.0, np.inf, 0.5], np.float32)
    confidence = np.array([0.5, -np.inf, 0.5, 0.5, 0.5], np.float32)
    correct = np.array([1.0, 1.0, np.nan, 1.0, 1.0], np.float32)
    table.update(indices, loss, confidence, correct, step=50)
    after = table.state_dict()
    assert after["counters"]["nonfinite_skipped"] == before["counters"]["nonfinite_skipped"] + 4
    assert after["counters"]["updates_applied"] == before["counters"]["updates_applied"] + 1
    for name in FIELD_DTYPES:
        unchanged = np.setdiff1d(np.arange(100), [7])
        assert after[name][unchanged].tobytes() == before[name][unchanged].tobytes(), name
    assert after["last_step"][7] == 50 and after["last_loss"][7] == 0.5


def test_extreme_losses_stay_finite_and_match_reference():
    table, reference = SampleTable(2), ReferenceTable(2)
    for step, loss in enumerate([FLOAT32_MAX, -FLOAT32_MAX, FLOAT32_MAX, 1e-30, -FLOAT32_MAX]):
        args = (np.array([0, 1]), np.array([loss, -loss], np.float32), np.array([0.5, 0.5], np.float32), np.array([0.0, 1.0], np.float32))
        table.update(*args, step=step)
        reference.update(*args, step=step)
    assert_matches_reference(table, reference)
    for name in ("loss_ema", "loss_diff_ema", "q"):
        assert np.isfinite(table.field(name)).all()
    assert SampleTable(2).load_state_dict(table.state_dict()) is None  # still a valid state


def test_update_from_stats_skips_invalid_samples():
    logits = torch.randn(6, 5)
    logits[2, 1] = float("nan")  # invalid sample
    labels = torch.tensor([0, 1, 2, 3, 4, -100])  # the last sample has no valid token
    stats = sample_stats_reference(logits, labels)
    table, reference = SampleTable(10), ReferenceTable(10)
    indices = torch.tensor([9, 0, 4, 4, 1, 2])
    table.update_from_stats(indices, stats, step=3)
    reference.update(indices.numpy(), stats.loss.numpy(), stats.confidence.numpy(), stats.correct.numpy(), 3)
    assert_matches_reference(table, reference)
    assert table.nonfinite_skipped == 2 and table.updates_applied == 4
    # After one visit q <= 0.55 < freeze_q: the instant FREEZE is gated to LIGHT.
    valid = stats.valid.numpy()
    instant = stats.bucket.numpy()[valid]
    expected = np.where(instant == BUCKET_FREEZE, BUCKET_LIGHT, instant)
    np.testing.assert_array_equal(table.buckets(indices[valid]), expected)


def test_empty_batch_and_extreme_steps():
    table = SampleTable(3)
    before = table.state_dict()
    table.update(np.array([], np.int64), np.array([], np.float32), np.array([], np.float32), np.array([], np.float32), step=0)
    assert_same_state(before, table.state_dict())
    one_update(table, 2, 1.0, 0.5, 1.0, step=MAX_STEP)
    assert table.field("last_step")[2] == MAX_STEP == 2**31 - 1


def test_visit_count_saturates():
    table = trained_table(20)
    state = table.state_dict()
    seen = np.flatnonzero(state["visits"] > 0)[0]
    state["visits"][seen] = np.iinfo(np.uint32).max - 1
    table.load_state_dict(state)
    one_update(table, int(seen), 1.0, 0.5, 1.0, step=7)
    one_update(table, int(seen), 1.0, 0.5, 1.0, step=8)
    assert table.field("visits")[seen] == np.iinfo(np.uint32).max


# -- input types ---------------------------------------------------------------------------


def test_torch_and_numpy_inputs_give_the_same_state():
    rng = np.random.default_rng(11)
    indices, loss, confidence, correct = random_batch(rng, 200, 300, nonfinite=0.05)
    from_numpy, from_torch = SampleTable(200), SampleTable(200)
    from_numpy.update(indices, loss.astype(np.float64), confidence, correct > 0.5, step=1)
    from_torch.update(
        torch.from_numpy(indices),
        torch.from_numpy(loss).double().requires_grad_(),
        torch.from_numpy(confidence),
        torch.from_numpy(correct > 0.5),
        step=torch.tensor(1),
    )
    assert_same_state(from_numpy.state_dict(), from_torch.state_dict())


def test_half_precision_and_other_integer_types_are_converted():
    rng = np.random.default_rng(2)
    indices, loss, confidence, correct = random_batch(rng, 100, 50)
    loss = loss.astype(np.float16).astype(np.float32)  # exactly representable in half
    confidence = torch.from_numpy(confidence).to(torch.bfloat16).float().numpy()
    expected = SampleTable(100)
    expected.update(indices, loss, confidence, correct, step=0)
    got = SampleTable(100)
    got.update(indices.astype(np.uint16), loss.astype(np.float16), torch.from_numpy(confidence).to(torch.bfloat16), correct, step=np.int64(0))
    assert_same_state(expected.state_dict(), got.state_dict())
    big_endian = SampleTable(100)
    big_endian.update(indices.astype(">i8"), loss.astype(">f4"), confidence.astype(">f8"), correct, step=0)
    assert_same_state(expected.state_dict(), big_endian.state_dict())


def test_non_contiguous_inputs():
    rng = np.random.default_rng(5)
    indices, loss, confidence, correct = random_batch(rng, 300, 400, nonfinite=0.02)
    contiguous = SampleTable(300)
    contiguous.update(indices[::2], loss[::2], confidence[::2], correct[::2], step=4)
    strided = SampleTable(300)
    strided.update(
        np.stack([indices, indices])[0, ::2],
        torch.from_numpy(np.stack([loss, loss], axis=1))[::2, 1],
        confidence[::-1][::-2],  # a negative stride
        np.asfortranarray(np.stack([correct, correct], axis=1))[::2, 0],
        step=4,
    )
    assert_same_state(contiguous.state_dict(), strided.state_dict())
    np.testing.assert_array_equal(strided.buckets(indices[::-3]), contiguous.field("bucket")[indices[::-3]])


# -- bad input: right error, offending value named, nothing written -----------------------

N_BAD = 50
f32 = np.float32
GOOD = (np.array([1, 2, 3]), np.array([0.5, 1.0, 2.0], f32), np.array([0.2, 0.7, 0.9], f32), np.array([1.0, 0.0, 1.0], f32))

BAD_UPDATES = {
    "index_too_large": ((np.array([1, 2, N_BAD]), *GOOD[1:]), {}, IndexError, f"index {N_BAD} at position 2"),
    "index_negative": ((np.array([-1, 2, 3]), *GOOD[1:]), {}, IndexError, "index -1 at position 0"),
    "index_int32_negative": ((np.array([0, -7, 3], np.int32), *GOOD[1:]), {}, IndexError, "index -7"),
    "index_uint64_huge": ((np.array([1, 2**64 - 1, 3], np.uint64), *GOOD[1:]), {}, IndexError, str(2**64 - 1)),
    "index_float": ((np.array([1.0, 2.0, 3.0]), *GOOD[1:]), {}, TypeError, "float64"),
    "index_bool": ((np.array([True, False, True]), *GOOD[1:]), {}, TypeError, "bool"),
    "index_2d": ((np.array([[1, 2, 3]]), *GOOD[1:]), {}, ValueError, r"1-D, got shape \(1, 3\)"),
    "loss_int": ((GOOD[0], np.array([1, 2, 3]), *GOOD[2:]), {}, TypeError, "loss must be a float array, got dtype int64"),
    "loss_complex": ((GOOD[0], np.ones(3, np.complex64), *GOOD[2:]), {}, TypeError, "complex64"),
    "correct_int": ((*GOOD[:3], np.array([1, 0, 1])), {}, TypeError, "correct must be a float or bool array"),
    "confidence_bool": ((GOOD[0], GOOD[1], np.array([True, False, True]), GOOD[3]), {}, TypeError, "confidence must be a float array"),
    "length_mismatch": ((GOOD[0], GOOD[1][:2], *GOOD[2:]), {}, ValueError, "same length, got 3, 2, 3, 3"),
    "confidence_above_one": ((GOOD[0], GOOD[1], np.array([0.2, 1.5, 0.9], f32), GOOD[3]), {}, ValueError, r"confidence\[1\] = 1.5"),
    "correct_negative": ((*GOOD[:3], np.array([1.0, 0.0, -0.25], f32)), {}, ValueError, r"correct\[2\] = -0.25"),
    "step_negative": (GOOD, {"step": -1}, ValueError, "got -1"),
    "step_too_large": (GOOD, {"step": 2**31}, ValueError, str(2**31)),
    "step_float": (GOOD, {"step": 1.5}, TypeError, "float"),
    "step_bool": (GOOD, {"step": True}, TypeError, "bool"),
    "tensor_not_on_cpu": ((GOOD[0], torch.ones(3, device="meta"), *GOOD[2:]), {}, ValueError, r"loss.cpu\(\)"),
    "list_of_strings": ((["a", "b", "c"], *GOOD[1:]), {}, TypeError, "dtype <U1"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_bad_update_raises_and_writes_nothing(case):
    args, kwargs, error, message = BAD_UPDATES[case]
    table = trained_table(N_BAD)
    before = table.state_dict()
    with pytest.raises(error, match=message):
        table.update(*args, **{"step": 9, **kwargs})
    assert_same_state(before, table.state_dict())


def test_a_bad_index_late_in_a_large_batch_writes_nothing():
    table = trained_table(1000)
    before = table.state_dict()
    rng = np.random.default_rng(0)
    indices, loss, confidence, correct = random_batch(rng, 1000, 100_000)
    indices[-1] = 1000
    with pytest.raises(IndexError, match="index 1000 at position 99999 is out of range for a table of 1000 samples"):
        table.update(indices, loss, confidence, correct, step=99)
    assert_same_state(before, table.state_dict())


def test_compiled_core_checks_its_arrays_itself():
    # What the Python layer converts, the bindings refuse: no path reads out of bounds.
    table = SampleTable(10)
    core = table._c
    idx, loss, conf, cor = GOOD
    with pytest.raises(ValueError, match="contiguous"):
        core.update(np.arange(6)[::2], loss, conf, cor, 0)
    with pytest.raises(TypeError, match="int32 or int64"):
        core.update(idx.astype(np.int16), loss, conf, cor, 0)
    with pytest.raises(TypeError, match="float32"):
        core.update(idx, loss.astype(np.float64), conf, cor, 0)
    misaligned = np.frombuffer(np.zeros(13, np.uint8).tobytes(), dtype=np.float32, offset=1)[:3]
    with pytest.raises(ValueError, match="aligned"):
        core.update(idx, misaligned, conf, cor, 0)
    with pytest.raises(ValueError, match="same length"):
        core.update(idx, loss[:1], conf, cor, 0)
    with pytest.raises(IndexError, match="index 10"):
        core.update(np.array([10]), loss[:1], conf[:1], cor[:1], 0)
    with pytest.raises(ValueError, match="step"):
        core.update(idx, loss, conf, cor, -3)
    with pytest.raises(IndexError, match="index -2"):
        core.buckets(np.array([-2], np.int32))
    with pytest.raises(ValueError, match="expected 320 bytes"):
        core.load(np.zeros(32, np.uint8), GekoConfig().to_cpp(), 0, 0)
    assert table.bucket_counts()["UNSEEN"] == 10


# -- reads ---------------------------------------------------------------------------------


def test_buckets_and_bucket_counts():
    table = trained_table(400)
    buckets = table.field("bucket")
    indices = np.array([0, 399, 5, 5, 17])
    np.testing.assert_array_equal(table.buckets(indices), buckets[indices])
    assert table.buckets(indices.astype(np.int32)).dtype == np.int8
    counts = table.bucket_counts()
    assert list(counts) == list(BUCKET_NAMES)
    assert counts == {name: int((buckets == code).sum()) for code, name in enumerate(BUCKET_NAMES)}
    assert sum(counts.values()) == 400 and counts["UNSEEN"] == int((table.field("visits") == 0).sum()) > 0
    with pytest.raises(IndexError, match="index 400"):
        table.buckets(np.array([1, 400]))


def test_fields_are_copies_and_records_is_a_live_read_only_view():
    table = trained_table(64)
    q = table.field("q")
    q[:] = 7.0
    assert table.field("q").max() <= 1.0
    view = table.records()
    assert view.dtype == RECORD_DTYPE and view.shape == (64,) and not view.flags.writeable
    with pytest.raises(ValueError):
        view["q"][0] = 0.0
    for name in FIELD_DTYPES:
        np.testing.assert_array_equal(view[name], table.field(name))
    one_update(table, 63, 0.0, 0.99, 1.0, step=1000)
    assert view["last_step"][63] == 1000
    del table  # the view keeps the records alive
    assert view["last_step"][63] == 1000 and view["visits"].sum() > 0
    with pytest.raises(ValueError, match="unknown field 'bogus'; the fields are q, loss_ema"):
        SampleTable(3).field("bogus")


# -- state dicts -----------------------------------------------------------------------------


def test_state_dict_roundtrip_continues_identically():
    config = CONFIGS["fast"]
    table = trained_table(300, config)
    state = table.state_dict()
    assert state["format_version"] == 1 and state["num_samples"] == 300 and state["config"] == config.to_dict()
    assert set(state["counters"]) == {"updates_applied", "nonfinite_skipped"}
    restored = SampleTable(300)  # default config: replaced by the state's
    restored.load_state_dict(state)
    assert restored.config == config
    assert_same_state(state, restored.state_dict())
    rng = np.random.default_rng(9)
    batch = random_batch(rng, 300, 500, nonfinite=0.05)
    table.update(*batch, step=10)
    restored.update(*batch, step=10)
    assert_same_state(table.state_dict(), restored.state_dict())


def test_state_dict_of_tensors_survives_torch_save_with_weights_only_load():
    table = trained_table(30)
    state = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in table.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = SampleTable(30)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(table.state_dict(), restored.state_dict())


def _bad_state(change):
    def apply(state):
        change(state)
        return state

    return apply


BAD_STATES = {
    "version": (_bad_state(lambda s: s.update(format_version=2)), "format version 2"),
    "missing_key": (_bad_state(lambda s: s.pop("q")), r"missing \['q'\]"),
    "extra_key": (_bad_state(lambda s: s.update(extra=1)), r"unexpected \['extra'\]"),
    "num_samples": (_bad_state(lambda s: s.update(num_samples=41)), "holds 41 samples but this table has 40"),
    "dtype": (_bad_state(lambda s: s.update(q=s["q"].astype(np.float64))), "field 'q' must be float32"),
    "shape": (_bad_state(lambda s: s.update(visits=s["visits"][:-1])), r"shape \(40,\), got uint32 of shape \(39,\)"),
    "not_array": (_bad_state(lambda s: s.update(flags=[0] * 40)), "must be a numpy array"),
    "bucket_code": (_bad_state(lambda s: s["bucket"].__setitem__(3, 7)), "sample 3: bucket code 7"),
    "unseen_with_visits": (_bad_state(lambda s: s["bucket"].__setitem__(np.flatnonzero(s["visits"])[0], BUCKET_UNSEEN)), "has bucket UNSEEN"),
    "q_out_of_range": (_bad_state(lambda s: s["q"].__setitem__(5, 1.5)), r"sample 5: q 1.5"),
    "unknown_flag": (_bad_state(lambda s: s["flags"].__setitem__(2, 0x80)), "unknown bits"),
    "config": (_bad_state(lambda s: s["config"].update(hard_confidence=0.95)), "invalid config: .*hard_confidence"),
    "config_unknown_field": (_bad_state(lambda s: s["config"].update(bogus=1)), "unknown fields"),
    "counter": (_bad_state(lambda s: s["counters"].update(updates_applied=-1)), "updates_applied"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_state_dict_is_refused_and_changes_nothing(case):
    make_bad, message = BAD_STATES[case]
    table = trained_table(40, CONFIGS["fast"])
    before = table.state_dict()
    with pytest.raises(CheckpointError, match=message):
        table.load_state_dict(make_bad(table.state_dict()))
    assert_same_state(before, table.state_dict())
    assert table.config == CONFIGS["fast"]
    with pytest.raises(TypeError, match="mapping"):
        table.load_state_dict([("q", 1)])


def test_pickle_and_deepcopy():
    table = trained_table(50, CONFIGS["no_guard"])
    for clone in (pickle.loads(pickle.dumps(table)), copy.deepcopy(table)):
        assert clone.config == table.config
        assert_same_state(table.state_dict(), clone.state_dict())


# -- files -------------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    table = trained_table(700, CONFIGS["fast"])
    path = tmp_path / "table.geko"
    table.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["table.geko"]  # no temporary left behind
    restored = SampleTable(700)
    restored.load(str(path))
    assert restored.config == CONFIGS["fast"]
    assert_same_state(table.state_dict(), restored.state_dict())
    from_file = SampleTable.from_file(path)
    assert_same_state(table.state_dict(), from_file.state_dict())
    table.save(path)  # overwrite in place
    assert_same_state(table.state_dict(), SampleTable.from_file(path).state_dict())


def test_save_streams_large_tables_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(table_file, "_CHUNK_RECORDS", 7)  # many chunks, a partial last one
    table = trained_table(100)
    table.save(tmp_path / "t")
    assert_same_state(table.state_dict(), SampleTable.from_file(tmp_path / "t").state_dict())


class _FailingZlib(types.SimpleNamespace):
    """zlib whose crc32 raises after a few calls: the write fails midway."""

    def __init__(self, calls_before_failure: int) -> None:
        super().__init__(calls=0, limit=calls_before_failure)

    def crc32(self, data, value=0):
        self.calls += 1
        if self.calls > self.limit:
            raise OSError("disk full (simulated)")
        return zlib.crc32(data, value)


@pytest.mark.parametrize("failure", ["midway", "replace", "fsync"])
def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / "table.geko"
    old = trained_table(100, seed=1)
    old.save(path)
    new = trained_table(100, seed=2)
    if failure == "midway":
        monkeypatch.setattr(table_file, "_CHUNK_RECORDS", 10)
        monkeypatch.setattr(table_file, "zlib", _FailingZlib(calls_before_failure=5))
    elif failure == "replace":
        monkeypatch.setattr(table_file.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
    else:
        monkeypatch.setattr(table_file.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError, match="simulated"):
        new.save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["table.geko"]
    assert_same_state(old.state_dict(), SampleTable.from_file(path).state_dict())


def _rewrite_crc(data: bytearray) -> bytearray:
    data[-4:] = struct.pack("<I", zlib.crc32(bytes(data[:-4])))
    return data


def _header_end(data: bytes) -> int:
    return 16 + struct.unpack_from("<I", data, 12)[0]


def _rewrite_header(data: bytes, change) -> bytes:
    """The file with its JSON header edited and a valid checksum: only content checks can refuse it."""
    header = json.loads(data[16 : _header_end(data)])
    change(header)
    encoded = json.dumps(header).encode()
    rebuilt = data[:8] + struct.pack("<II", 1, len(encoded)) + encoded + data[_header_end(data) :]
    return bytes(_rewrite_crc(bytearray(rebuilt)))


CORRUPTIONS = {
    "empty": (lambda d, other: b"", "too short"),
    "truncated_preamble": (lambda d, other: d[:10], "too short"),
    "truncated_header": (lambda d, other: d[:30], "truncated or corrupt"),
    "truncated_payload": (lambda d, other: d[: len(d) // 2], "truncated: expected"),
    "missing_checksum": (lambda d, other: d[:-4], "truncated: expected"),
    "trailing_bytes": (lambda d, other: d + b"\0", "corrupt: expected"),
    "bit_flip_payload": (lambda d, other: d[:-100] + bytes([d[-100] ^ 0x04]) + d[-99:], "checksum mismatch"),
    "bit_flip_header": (lambda d, other: d[:20] + bytes([d[20] ^ 0x01]) + d[21:], "corrupt|checksum"),
    "bit_flip_checksum": (lambda d, other: d[:-1] + bytes([d[-1] ^ 0x80]), "checksum mismatch"),
    "wrong_magic": (lambda d, other: b"NOTGEKO\0" + d[8:], "wrong magic"),
    "wrong_version": (lambda d, other: d[:8] + struct.pack("<I", 99) + d[12:], "format version 99 is not supported"),
    "other_num_samples": (lambda d, other: other, "holds 90 samples but this table has 80"),
    "valid_checksum_bad_config": (
        lambda d, other: _rewrite_header(d, lambda h: h["config"].update(q_alpha=0.0)), "invalid config: .*q_alpha"
    ),
    "valid_checksum_other_layout": (
        lambda d, other: _rewrite_header(d, lambda h: h["fields"][0].__setitem__(1, "<f8")), "record layout"
    ),
    "valid_checksum_fields_not_lists": (lambda d, other: _rewrite_header(d, lambda h: h.update(fields=[1, 2])), "record layout"),
    "valid_checksum_bad_counters": (
        lambda d, other: _rewrite_header(d, lambda h: h.update(counters={"updates_applied": "many"})), "counters must be"
    ),
    "valid_checksum_other_byteorder": (
        lambda d, other: _rewrite_header(d, lambda h: h.update(byteorder="middle")), "middle-endian"
    ),
    "valid_checksum_bad_record": (
        lambda d, other: bytes(_rewrite_crc(bytearray(d[: _header_end(d) + 29] + bytes([9]) + d[_header_end(d) + 30 :]))),
        "sample 0: bucket code 9",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_are_refused_and_change_nothing(tmp_path, case):
    corrupt, message = CORRUPTIONS[case]
    good_path, other_path, bad_path = tmp_path / "good", tmp_path / "other", tmp_path / "bad"
    trained_table(80).save(good_path)
    trained_table(90).save(other_path)
    bad_path.write_bytes(corrupt(good_path.read_bytes(), other_path.read_bytes()))
    table = trained_table(80, CONFIGS["fast"], seed=5)
    before = table.state_dict()
    with pytest.raises(CheckpointError, match=message):
        table.load(bad_path)
    assert_same_state(before, table.state_dict())
    assert table.config == CONFIGS["fast"]
    if case != "other_num_samples":
        with pytest.raises(CheckpointError, match=message):
            SampleTable.from_file(bad_path)


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        SampleTable(3).load(tmp_path / "absent")


# -- threads -----------------------------------------------------------------------------------


def test_concurrent_updates_equal_serial_application():
    num_samples, workers, rounds = 4000, 4, 6
    rng = np.random.default_rng(21)
    owner = rng.integers(0, workers, num_samples)
    plans = []
    for worker in range(workers):
        mine = np.flatnonzero(owner == worker)
        plans.append([(step, random_batch(rng, 1, 3000)) for step in range(rounds)])
        for _, batch in plans[-1]:
            batch[0][:] = rng.choice(mine, batch[0].size)  # disjoint index sets, duplicates inside
    concurrent, serial = SampleTable(num_samples), SampleTable(num_samples)
    barrier = threading.Barrier(workers + 1)
    errors = []

    def work(plan):
        try:
            barrier.wait()
            for step, batch in plan:
                concurrent.update(*batch, step=step)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    barrier.wait()
    for _ in range(20):  # readers in the meantime see whole tables
        assert sum(concurrent.bucket_counts().values()) == num_samples
        state = concurrent.state_dict()
        assert state["counters"]["updates_applied"] == int(state["visits"].sum())
    for thread in threads:
        thread.join()
    assert not errors
    for plan in plans:
        for step, batch in plan:
            serial.update(*batch, step=step)
    assert_same_state(serial.state_dict(), concurrent.state_dict())
