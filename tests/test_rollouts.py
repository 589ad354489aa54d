"""RolloutTable and rollout_stats: the compiled rule against the numpy oracle, the device path
against the compiled one, bad input, state dicts, files, threads."""

from __future__ import annotations

import json
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import geko_core
from geko_core import CheckpointError, RolloutConfig, RolloutStats, RolloutTable, SampleTable, rollout_stats
from geko_core.config import BUCKET_FOCUS, BUCKET_FREEZE, BUCKET_HARD, BUCKET_UNSEEN
from geko_core.policies.base import TableView
from geko_core.reference_rollouts import ROLLOUT_FIELD_DTYPES, ReferenceRolloutTable, reference_group_stats
from geko_core.rollouts import ROLLOUT_FORMAT_VERSION, ROLLOUT_RECORD_DTYPE, _device_stats, _groups
from geko_core.table import MAX_STEP

GRADED = RolloutConfig(right_at=0.9, wrong_at=0.1, alpha=0.3, light_above=0.6, flat_tol=0.05)
STAT_NAMES = ("pass_rate", "spread", "zero_variance", "all_right", "all_wrong", "mean_length")


# -- helpers -------------------------------------------------------------------------------------


def random_rewards(rng: np.random.Generator, count: int, group: int, kind: str) -> np.ndarray:
    """Binary, graded, or binary with whole groups right or wrong (zero variance) often."""
    if kind == "binary":
        solve = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], count)[:, None]
        return (rng.random((count, group)) < solve).astype(np.float32)
    if kind == "graded":
        rewards = rng.choice([-0.5, 0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5], (count, group)).astype(np.float32)
        flat = rng.random(count) < 0.3  # some groups with one reward throughout
        rewards[flat] = rewards[flat, :1]
        return rewards
    return rng.normal(0.5, 0.5, (count, group)).astype(np.float32)


def random_lengths(rng: np.random.Generator, count: int, group: int, kind: str):
    if kind == "none":
        return None
    lengths = rng.integers(1, 4000, (count, group))
    return lengths if kind == "int" else (lengths + rng.random((count, group))).astype(np.float32)


def assert_matches_reference(table: RolloutTable, reference: ReferenceRolloutTable) -> None:
    for name, dtype in ROLLOUT_FIELD_DTYPES.items():
        got = table.field(name)
        assert got.dtype == dtype, name
        if name == "last_spread":  # a compiler may fuse the squares' multiply-adds
            np.testing.assert_allclose(got, reference.fields[name], rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(got, reference.fields[name], err_msg=name)
    assert table.updates == reference.updates


def assert_stats_equal(got: RolloutStats, expected: dict, *, rtol: float = 0.0) -> None:
    for name in STAT_NAMES:
        value = getattr(got, name).cpu().numpy()
        if name == "spread" or (rtol and value.dtype == np.float32):
            np.testing.assert_allclose(value, expected[name], rtol=max(rtol, 1e-6), atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(value, expected[name], err_msg=name)


def trained_table(num_samples: int = 60, config: RolloutConfig | None = None, seed: int = 1) -> RolloutTable:
    table = RolloutTable(num_samples, config)
    rng = np.random.default_rng(seed)
    for step in range(5):
        idx = rng.integers(0, num_samples, num_samples // 2)
        table.update(idx, random_rewards(rng, idx.size, 4, "binary"), rng.integers(1, 50, (idx.size, 4)), step)
    return table


def snapshot(table: RolloutTable) -> tuple[bytes, int, RolloutConfig]:
    return table.records().tobytes(), table.updates, table.config


# -- the rule against the oracle -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "graded", "normal"])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("lengths", ["none", "int", "float"])
def test_update_matches_the_reference(kind, group, lengths):
    rng = np.random.default_rng(zlib.crc32(repr((kind, group, lengths)).encode()))
    config = RolloutConfig() if kind == "binary" else GRADED
    table, reference = RolloutTable(50, config), ReferenceRolloutTable(50, config)
    for step in range(8):
        count = int(rng.integers(0, 80))
        idx = rng.integers(0, 50, count)  # many duplicates: applied in batch order
        rewards, lens = random_rewards(rng, count, group, kind), random_lengths(rng, count, group, lengths)
        got = table.update(idx, rewards, lens, step=3 * step)
        expected = reference.update(idx, rewards, None if lens is None else lens.astype(np.float32), 3 * step)
        assert_stats_equal(got, expected)
        assert_matches_reference(table, reference)
    counts = table.bucket_counts_array()
    np.testing.assert_array_equal(counts, np.bincount(reference.fields["bucket"], minlength=5))
    assert counts.sum() == 50


def test_the_rule_on_hand_made_groups():
    table = RolloutTable(6)
    rewards = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    stats = table.update([0, 1, 2, 3, 4], rewards, np.array([[10, 20, 30, 40]] * 5), step=7)
    assert stats.pass_rate.tolist() == [1.0, 0.0, 0.25, 0.75, 0.5]
    assert stats.zero_variance.tolist() == [True, True, False, False, False]
    assert stats.keep.tolist() == [False, False, True, True, True]
    assert stats.all_right.tolist() == [True, False, False, False, False]
    assert stats.all_wrong.tolist() == [False, True, False, False, False]
    assert stats.mean_length.tolist() == [25.0] * 5
    # 0.75 is not above light_above = 0.75: FOCUS
    assert table.buckets(np.arange(6)).tolist() == [BUCKET_FREEZE, BUCKET_HARD, BUCKET_FOCUS, BUCKET_FOCUS, BUCKET_FOCUS, BUCKET_UNSEEN]
    table.update([3, 3, 0], np.array([[1, 1, 1, 0.9], [1, 1, 1, 1], [1, 1, 1, 0]], np.float32), step=9)
    assert table.gather("flat_run", [0, 3]).tolist() == [0, 1]
    assert table.gather("solved_run", [0, 3]).tolist() == [0, 1]
    assert table.gather("visits", [0, 3, 5]).tolist() == [2, 3, 0]
    assert table.gather("last_step", [0, 5]).tolist() == [9, -1]
    assert table.gather("pass_ema", [0]).tolist() == [np.float32(0.5 * 1.0 + 0.5 * 0.75)]
    assert table.gather("bucket", [0, 3]).tolist() == [BUCKET_FOCUS, BUCKET_FREEZE]


def test_runs_saturate_as_the_reference():
    table, reference = RolloutTable(2), ReferenceRolloutTable(2)
    idx = np.zeros(70_000, dtype=np.int64)
    rewards = np.zeros((70_000, 1), np.float32)
    table.update(idx, rewards, None, 1)
    reference.update(idx, rewards, None, 1)
    assert_matches_reference(table, reference)
    assert table.gather("flat_run", [0])[0] == table.gather("failed_run", [0])[0] == 65535


def test_update_stats_is_the_same_rule():
    rng = np.random.default_rng(3)
    by_rewards, by_stats = RolloutTable(40, GRADED), RolloutTable(40, GRADED)
    for step in range(6):
        idx = rng.integers(0, 40, 30)
        rewards = random_rewards(rng, 30, 6, "graded")
        stats = by_rewards.update(idx, rewards, rng.integers(1, 9, (30, 6)), step)
        by_stats.update_stats(idx, stats.pass_rate, stats.spread, stats.zero_variance, stats.all_right, stats.all_wrong, stats.mean_length, step)
    assert by_rewards.records().tobytes() == by_stats.records().tobytes()
    assert by_rewards.updates == by_stats.updates == 180


def test_before_and_after_report_the_buckets():
    table = trained_table()
    idx = np.array([0, 1, 1, 59])
    before, after = np.empty(4, np.int8), np.empty(4, np.int8)
    expected_before = table.buckets(idx)
    table.update(idx, np.ones((4, 3), np.float32), step=9, before=before, after=after)
    np.testing.assert_array_equal(before, expected_before)
    np.testing.assert_array_equal(after, table.buckets(idx))


# -- rollout_stats -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["binary", "graded", "normal"])
@pytest.mark.parametrize("group", [1, 3, 16])
def test_rollout_stats_compiled_reference_and_torch_agree(kind, group):
    rng = np.random.default_rng(group)
    config = RolloutConfig() if kind == "binary" else GRADED
    rewards = random_rewards(rng, 64, group, kind)
    lengths = rng.integers(0, 300, (64, group))
    compiled = rollout_stats(torch.from_numpy(rewards), torch.from_numpy(lengths), config)
    expected = reference_group_stats(rewards, lengths.astype(np.float32), config)
    assert_stats_equal(compiled, expected)
    assert_stats_equal(rollout_stats(rewards, lengths, config), expected)  # numpy accepted
    # The device path (torch operations, float32), run here on the CPU.
    on_device = _device_stats(*_groups(torch.from_numpy(rewards), torch.from_numpy(lengths)), config)
    assert_stats_equal(on_device, expected, rtol=1e-5)
    for name in STAT_NAMES:
        assert getattr(on_device, name).dtype == getattr(compiled, name).dtype, name
    none = rollout_stats(rewards, None, config)
    assert none.mean_length.tolist() == [0.0] * 64


def test_rollout_stats_on_another_device_never_reads_values():
    # A meta tensor has no values: any host synchronisation or value check would raise.
    stats = rollout_stats(torch.empty(5, 8, device="meta"), torch.empty(5, 8, dtype=torch.int64, device="meta"))
    assert all(getattr(stats, name).device.type == "meta" and getattr(stats, name).shape == (5,) for name in STAT_NAMES)
    assert stats.keep.dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_stats_on_cuda_match_the_cpu():
    rewards = torch.rand(32, 8).round()
    got = rollout_stats(rewards.cuda())
    assert_stats_equal(got, reference_group_stats(rewards.numpy(), None, RolloutConfig()), rtol=1e-5)


@pytest.mark.parametrize(
    "rewards, lengths, error, message",
    [
        (np.ones(4, np.float32), None, ValueError, r"\[B, G\]"),
        (np.ones((2, 0), np.float32), None, ValueError, "G >= 1"),
        (np.ones((2, 3), np.int64), None, TypeError, "floating-point"),
        ([[1.0]], None, TypeError, "torch.Tensor or numpy"),
        (np.array([[1.0, np.nan]], np.float32), None, ValueError, r"rewards\[0, 1\] = nan is not finite"),
        (np.array([[1.0], [-np.inf]], np.float32), None, ValueError, r"rewards\[1, 0\] = -inf"),
        (np.ones((2, 3), np.float32), np.ones((3, 2)), ValueError, "shape of rewards"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), bool), TypeError, "lengths must be an integer or float"),
        (np.ones((1, 2), np.float32), np.array([[1.0, -2.0]]), ValueError, r"lengths\[0, 1\] = -2"),
    ],
)
def test_rollout_stats_refuses_bad_input(rewards, lengths, error, message):
    with pytest.raises(error, match=message):
        rollout_stats(rewards, lengths)


# -- bad input leaves the table as it was ---------------------------------------------------------

BAD_UPDATES = {
    "rewards_1d": (lambda: ([0, 1], np.ones(2, np.float32), None, 1), ValueError, r"\[B, G\]"),
    "rows_differ": (lambda: ([0, 1], np.ones((3, 2), np.float32), None, 1), ValueError, "same length B"),
    "nan_reward": (lambda: ([0, 1], np.array([[1, 0], [np.nan, 1]], np.float32), None, 1), ValueError, "not finite"),
    "inf_reward": (lambda: ([0, 1], np.array([[1, 0], [1, np.inf]], np.float32), None, 1), ValueError, "not finite"),
    "lengths_shape": (lambda: ([0, 1], np.ones((2, 2), np.float32), np.ones((2, 3)), 1), ValueError, "shape of rewards"),
    "nan_length": (lambda: ([0, 1], np.ones((2, 2), np.float32), np.array([[1, 2], [np.nan, 3]]), 1), ValueError, "lengths"),
    "index_high": (lambda: ([0, 60], np.ones((2, 2), np.float32), None, 1), IndexError, "index 60 at position 1"),
    "index_negative": (lambda: ([-1, 3], np.ones((2, 2), np.float32), None, 1), IndexError, "index -1 at position 0"),
    "step_negative": (lambda: ([0], np.ones((1, 2), np.float32), None, -1), ValueError, "step"),
    "step_high": (lambda: ([0], np.ones((1, 2), np.float32), None, MAX_STEP + 1), ValueError, "step"),
    "step_float": (lambda: ([0], np.ones((1, 2), np.float32), None, 1.0), TypeError, "step"),
    "index_float": (lambda: (np.array([0.0]), np.ones((1, 2), np.float32), None, 1), TypeError, "integer"),
    "rewards_int": (lambda: ([0], np.ones((1, 2), np.int32), None, 1), TypeError, "floating-point"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_bad_update_raises_and_changes_nothing(case):
    make, error, message = BAD_UPDATES[case]
    table = trained_table()
    before = snapshot(table)
    with pytest.raises(error, match=message):
        table.update(*make())
    assert snapshot(table) == before


def _stats_args(n=2):
    return [np.full(n, 0.5, np.float32), np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.ones(n, np.float32)]


def _with(position, value):
    args = _stats_args()
    args[position] = value
    return args


BAD_STATS = {
    "pass_above_one": (_with(0, np.array([0.5, 1.5], np.float32)), ValueError, r"pass_rate\[1\] = 1.5"),
    "pass_nan": (_with(0, np.array([np.nan, 0.5], np.float32)), ValueError, r"pass_rate\[0\]"),
    "spread_negative": (_with(1, np.array([0, -1], np.float32)), ValueError, r"spread\[1\]"),
    "length_inf": (_with(5, np.array([np.inf, 1], np.float32)), ValueError, r"mean_length\[0\]"),
    "right_and_wrong": (_with(3, np.ones(2, bool))[:4] + [np.ones(2, bool), np.ones(2, np.float32)], ValueError, "both all right and all wrong"),
    "flags_not_bool": (_with(2, np.zeros(2, np.int64)), TypeError, "zero_variance must be a bool"),
    "length_differs": (_with(1, np.zeros(3, np.float32)), ValueError, "one entry per index"),
    "pass_int": (_with(0, np.zeros(2, np.int64)), TypeError, "pass_rate must be a float"),
}


@pytest.mark.parametrize("case", list(BAD_STATS))
def test_bad_update_stats_raises_and_changes_nothing(case):
    args, error, message = BAD_STATS[case]
    table = trained_table()
    before = snapshot(table)
    with pytest.raises(error, match=message):
        table.update_stats([3, 4], *args, 5)
    assert snapshot(table) == before


def test_the_bindings_check_arrays_themselves():
    table = trained_table()
    before = snapshot(table)
    c = table._c
    idx = np.array([0, 1])
    rewards = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        c.update(idx, np.ones((2, 8), np.float32)[:, ::2], None, 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        c.update(idx, np.ones((4, 4), np.float32)[::2], None, 1)
    with pytest.raises(TypeError, match="float32"):
        c.update(idx, rewards.astype(np.float64), None, 1)
    with pytest.raises(TypeError, match="int32 or int64"):
        c.update(idx.astype(np.uint8), rewards, None, 1)
    with pytest.raises(ValueError, match="contiguous"):
        c.update(np.arange(4)[::2], rewards, None, 1)
    with pytest.raises(ValueError, match="shape of rewards"):
        c.update(idx, rewards, np.ones((2, 3), np.float32), 1)
    with pytest.raises(IndexError):
        c.update(np.array([0, 2**40]), rewards, None, 1)
    with pytest.raises(ValueError, match="before must have one entry per row"):
        c.update(idx, rewards, None, 1, np.empty(3, np.int8))
    with pytest.raises(ValueError, match="writable"):
        c.update(idx, rewards, None, 1, None, _readonly(2))
    with pytest.raises(TypeError, match="bool"):
        c.update_stats(idx, *_stats_args()[:2], np.zeros(2, np.uint8), *_stats_args()[3:], 1)
    with pytest.raises(ValueError, match="contiguous"):
        c.update_stats(idx, np.zeros(4, np.float32)[::2], *_stats_args()[1:], 1)
    assert snapshot(table) == before


def _readonly(n):
    array = np.empty(n, np.int8)
    array.setflags(write=False)
    return array


def test_an_empty_batch_changes_nothing_but_is_checked():
    table = trained_table()
    before = snapshot(table)
    stats = table.update(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros((0, 4)), 3)
    assert stats.pass_rate.shape == (0,) and snapshot(table) == before
    with pytest.raises(ValueError, match="G >= 1"):
        table.update(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))


def test_strided_and_converted_input_gives_the_same_result():
    rng = np.random.default_rng(5)
    rewards = random_rewards(rng, 20, 4, "graded")
    lengths = rng.integers(1, 90, (20, 4))
    idx = rng.integers(0, 30, 20)
    plain, strided = RolloutTable(30), RolloutTable(30)
    plain.update(idx, rewards, lengths, 2)
    wide = np.zeros((20, 8), np.float64)
    wide[:, ::2] = rewards
    strided.update(torch.from_numpy(idx.astype(np.int32)), torch.from_numpy(wide)[:, ::2], lengths.T.copy().T, 2)
    assert plain.records().tobytes() == strided.records().tobytes()


def test_device_rewards_are_refused_by_update():
    table = RolloutTable(4)
    with pytest.raises(ValueError, match="rollout_stats on the device and update_stats"):
        table.update([0], torch.empty(1, 2, device="meta"))


# -- config ----------------------------------------------------------------------------------------


def test_config_defaults_come_from_cpp_and_round_trip():
    cfg = RolloutConfig()
    cpp = geko_core.rollouts._C.RolloutConfig()
    assert (cfg.right_at, cfg.wrong_at, cfg.alpha, cfg.light_above, cfg.flat_tol) == (1.0, 0.0, 0.5, 0.75, 1e-6)
    assert cfg.alpha == cpp.alpha and cfg.flat_tol == cpp.flat_tol
    assert RolloutConfig.from_dict(GRADED.to_dict()) == GRADED


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"right_at": 0.0}, ValueError, "right_at"),
        ({"wrong_at": float("nan")}, ValueError, "finite"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"light_above": 1.5}, ValueError, "light_above"),
        ({"flat_tol": -1.0}, ValueError, "flat_tol"),
        ({"alpha": "high"}, TypeError, "RolloutConfig.alpha"),
    ],
)
def test_config_refuses_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        RolloutConfig(**kwargs)


def test_constructor_and_reads_refuse_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        RolloutTable(0)
    with pytest.raises(TypeError, match="RolloutConfig"):
        RolloutTable(3, geko_core.GekoConfig())
    with pytest.raises(ValueError, match="num_threads"):
        RolloutTable(3, num_threads=-1)
    table = RolloutTable(3)
    with pytest.raises(ValueError, match="unknown field"):
        table.field("q")
    with pytest.raises(IndexError):
        table.gather("visits", [-1])
    with pytest.raises(IndexError):
        table.buckets([3])


# -- policies read it as they read a SampleTable ----------------------------------------------------


def test_table_view_reads_a_rollout_table():
    table = trained_table()
    view = TableView(table)
    assert view.num_samples == 60 and view.config == table.config
    np.testing.assert_array_equal(view.field("pass_ema"), table.field("pass_ema"))
    np.testing.assert_array_equal(view.gather("last_step", [1, 2]), table.field("last_step")[[1, 2]])
    np.testing.assert_array_equal(view.buckets([4, 5]), table.field("bucket")[[4, 5]])
    assert view.bucket_counts() == table.bucket_counts() and sum(view.bucket_counts().values()) == 60
    np.testing.assert_array_equal(view.bucket_counts_array(), table.bucket_counts_array())
    assert table.records().dtype == ROLLOUT_RECORD_DTYPE and ROLLOUT_RECORD_DTYPE.itemsize == 32
    assert list(ROLLOUT_RECORD_DTYPE.names) == list(ROLLOUT_FIELD_DTYPES)


# -- state dicts and files ---------------------------------------------------------------------------


def assert_same_table(a: RolloutTable, b: RolloutTable) -> None:
    assert snapshot(a) == snapshot(b)


def test_state_dict_pickle_and_file_round_trip(tmp_path):
    table = trained_table(70, GRADED)
    state = table.state_dict()
    assert state["format_version"] == ROLLOUT_FORMAT_VERSION == 1 and state["counters"] == {"updates": 175}
    restored = RolloutTable(70)
    restored.load_state_dict(state)
    assert_same_table(table, restored)
    assert_same_table(table, pickle.loads(pickle.dumps(table)))
    path = tmp_path / "rollouts.geko"
    table.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["rollouts.geko"]
    loaded = RolloutTable(70)
    loaded.load(path)
    assert_same_table(table, loaded)
    assert_same_table(table, RolloutTable.from_file(path))
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
    from_tensors = RolloutTable(70)
    from_tensors.load_state_dict(tensors)
    assert_same_table(table, from_tensors)


def _set(state, name, position, value):
    state[name][position] = value
    return state


BAD_STATES = {
    "version": (lambda s: {**s, "format_version": 2}, "format version 2"),
    "num_samples": (lambda s: {**s, "num_samples": 61}, "holds 61 samples but this table has 60"),
    "missing": (lambda s: {k: v for k, v in s.items() if k != "flat_run"}, r"missing \['flat_run'\]"),
    "dtype": (lambda s: {**s, "visits": s["visits"].astype(np.int64)}, "field 'visits' must be uint32"),
    "counters": (lambda s: {**s, "counters": {"updates_applied": 1}}, "counters must be"),
    "config": (lambda s: {**s, "config": {**s["config"], "alpha": 2.0}}, "invalid config: .*alpha"),
    "bucket_without_run": (lambda s: _set(s, "flat_run", int(np.flatnonzero(s["bucket"] == BUCKET_FREEZE)[0]), 0), "zero-variance run"),
    "pass_rate": (lambda s: _set(s, "last_pass", int(np.flatnonzero(s["visits"])[0]), 1.5), "not in \\[0, 1\\]"),
    "unseen_not_blank": (lambda s: _set(s, "length_ema", int(np.flatnonzero(s["visits"] == 0)[0]), 3.0), "not blank"),
    "flags": (lambda s: _set(s, "flags", 0, 1), "unknown bits"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_state_dict_is_refused_and_changes_nothing(case):
    change, message = BAD_STATES[case]
    table = trained_table(60, seed=4)
    assert (table.field("bucket") == BUCKET_FREEZE).any() and (table.field("visits") == 0).any()
    before = snapshot(table)
    with pytest.raises(CheckpointError, match=message):
        table.load_state_dict(change(table.state_dict()))
    assert snapshot(table) == before


def _header_end(data: bytes) -> int:
    return 16 + struct.unpack_from("<I", data, 12)[0]


def _with_crc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


CORRUPTIONS = {
    "truncated": (lambda d, other: d[: len(d) // 2], "truncated"),
    "bit_flip": (lambda d, other: d[:-40] + bytes([d[-40] ^ 0x10]) + d[-39:], "checksum mismatch"),
    "wrong_version": (lambda d, other: d[:8] + struct.pack("<I", 7) + d[12:], "format version 7 is not supported"),
    "other_num_samples": (lambda d, other: other, "holds 50 samples but this table has 60"),
    "sample_table_file": (None, "not a geko_core RolloutTable checkpoint"),
    "bad_record_valid_crc": (lambda d, other: _with_crc(d[: _header_end(d) + 30] + bytes([9]) + d[_header_end(d) + 31 :]), "sample 0: bucket code 9"),
    "other_layout_valid_crc": (None, "record layout"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_are_refused_and_change_nothing(tmp_path, case):
    corrupt, message = CORRUPTIONS[case]
    good, other, bad = tmp_path / "good", tmp_path / "other", tmp_path / "bad"
    trained_table(60).save(good)
    trained_table(50).save(other)
    data = good.read_bytes()
    if case == "sample_table_file":
        SampleTable(60).save(bad)
    elif case == "other_layout_valid_crc":
        header = json.loads(data[16 : _header_end(data)])
        header["fields"][0][1] = "<f8"
        encoded = json.dumps(header).encode()
        bad.write_bytes(_with_crc(data[:12] + struct.pack("<I", len(encoded)) + encoded + data[_header_end(data) :]))
    else:
        bad.write_bytes(corrupt(data, other.read_bytes()))
    table = trained_table(60, GRADED, seed=8)
    before = snapshot(table)
    with pytest.raises(CheckpointError, match=message):
        table.load(bad)
    assert snapshot(table) == before
    with pytest.raises(CheckpointError):
        SampleTable(60).load(good)  # and a SampleTable refuses a RolloutTable's file


# -- threads ---------------------------------------------------------------------------------------


def test_thread_count_does_not_change_the_result():
    rng = np.random.default_rng(11)
    idx = rng.integers(0, 3000, 40_000)  # above the size where a batch goes parallel
    rewards = random_rewards(rng, 40_000, 2, "graded")
    lengths = rng.integers(1, 100, (40_000, 2))
    results = []
    for threads in (1, 2, 0):
        table = RolloutTable(3000, GRADED, num_threads=threads)
        for step in range(2):
            stats = table.update(idx, rewards, lengths, step)
        results.append((table.records().tobytes(), *(getattr(stats, n).numpy().tobytes() for n in STAT_NAMES)))
        assert table.num_threads == threads
    assert results[0] == results[1] == results[2]
    reference = ReferenceRolloutTable(3000, GRADED)
    for step in range(2):
        reference.update(idx, rewards, lengths.astype(np.float32), step)
    assert_matches_reference(table, reference)


# -- fuzz: any input is either applied as the reference applies it or refused, table unchanged ---

_SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 1e-45, 3.4e38, -3.4e38]


@st.composite
def rollout_batches(draw, n: int):
    count = draw(st.integers(0, 6))
    group = draw(st.integers(0, 4))
    index = st.one_of(st.integers(0, n - 1), st.integers(-3, n + 3), st.sampled_from([2**31, -(2**63), 2**63 - 1]))
    indices = np.array(draw(st.lists(index, min_size=count, max_size=count)), dtype=np.int64)
    with np.errstate(all="ignore"):
        indices = indices.astype(draw(st.sampled_from([np.int64, np.int32, np.uint16, np.float64])))
    reward = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(-2, 3, width=32), st.sampled_from(_SPECIAL))
    values = draw(st.lists(reward, min_size=count * group, max_size=count * group))
    rewards = np.array(values, dtype=np.float64).reshape(count, group)
    with np.errstate(all="ignore"):
        rewards = rewards.astype(draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64])))
    if draw(st.booleans()):
        rewards = torch.from_numpy(rewards)
    lengths = draw(st.sampled_from([None, "int", "float", "negative", "shape"]))
    if lengths == "shape":
        lengths = np.ones((count + 1, group))
    elif lengths is not None:
        lengths = np.arange(count * group, dtype=np.int64 if lengths == "int" else np.float32).reshape(count, group) - (lengths == "negative")
    step = draw(st.one_of(st.integers(0, 50), st.sampled_from([-1, MAX_STEP + 1, 1.5, None])))
    return indices, rewards, lengths, step


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n=st.integers(1, 8))
def test_update_fuzz(data, n):
    table, reference = RolloutTable(n), ReferenceRolloutTable(n)
    for _ in range(3):
        indices, rewards, lengths, step = data.draw(rollout_batches(n))
        before = snapshot(table)
        try:
            table.update(indices, rewards, lengths, step)
        except (TypeError, ValueError, IndexError):
            assert snapshot(table) == before
            continue
        r = rewards.numpy() if isinstance(rewards, torch.Tensor) else rewards
        reference.update(indices.astype(np.int64), r.astype(np.float32), None if lengths is None else lengths.astype(np.float32), step)
        assert_matches_reference(table, reference)
