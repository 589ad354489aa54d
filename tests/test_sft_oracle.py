"""benchmarks/sft_oracle.py and sft_curves.py: the oracle schedules on hand-made curves, the token
accounting of a thinned run, the full variant against ``train_full`` + ``response_metrics``, and
that full training learns. Smoke scale, one seed, one thread."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geko_core.bench import sft, sft_data
from geko_core.bench.runner import sample_tokens
from geko_core.bench.tasks import make_task

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "sft_oracle.py"
# The research scripts import each other as they do when run from benchmarks/.
sys.path.insert(0, str(BENCHMARKS))
import sft_curves  # noqa: E402


def _load():
    spec = importlib.util.spec_from_file_location("sft_oracle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


oracle = _load()


pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


# -- schedules on hand-checkable cases (0-based epochs: row e of a mask is epoch e + 1) --

CURVES = np.array([
    # A     B     C    D
    [80.0, 70.0, 0.0, 10.0],
    [99.0, 60.0, 0.0, 20.0],
    [100.0, 69.5, 0.0, 30.0],
    [100.0, 70.0, 0.0, 40.0],
])


def test_family_settles_when_its_validation_curve_stays_within_the_threshold():
    # A: within 1 pt of 100 from the second epoch on (99 counts: |99 - 100| <= 1).
    # B: within 1 pt after the first epoch, but not after the second: settles after the third.
    # C: flat at 0: settles after the first epoch. D: still rising: settles only at the end.
    assert oracle.settle_epochs(CURVES, 1.0).tolist() == [1, 2, 0, 3]
    assert oracle.settle_epochs(CURVES, 0.4).tolist() == [2, 3, 0, 3]
    assert oracle.settle_epochs(CURVES, 100.0).tolist() == [0, 0, 0, 0]


def test_family_schedule_skips_whole_families_after_they_settle():
    family = np.array([0, 1, 2, 3, 0, 2])
    skip, settled = oracle.family_schedule(CURVES, family, 1.0)
    assert settled.tolist() == [1, 2, 0, 3]
    expected = np.array([
        # s0 (A) s1 (B) s2 (C) s3 (D) s4 (A) s5 (C)
        [0, 0, 0, 0, 0, 0],  # epoch 1: always full
        [0, 0, 1, 0, 0, 1],  # epoch 2: C skipped
        [1, 0, 1, 0, 1, 1],  # epoch 3: A and C
        [1, 1, 1, 0, 1, 1],  # epoch 4: A, B and C; D never
    ], dtype=bool)
    assert np.array_equal(skip, expected)
    # Even a threshold that settles everything after the first epoch leaves the first full.
    wide, _ = oracle.family_schedule(CURVES, family, 100.0)
    assert not wide[0].any() and wide[1:].all()


RIGHT = np.array([
    # s0 s1 s2 s3 s4 s5 s6 s7
    [1, 0, 0, 1, 0, 0, 1, 0],
    [1, 1, 0, 0, 0, 0, 1, 0],
    [1, 0, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 1],
], dtype=bool)
RIGHT_FAMILY = np.array([0, 0, 0, 0, 1, 0, 1, 1])  # family 1 is "unlearnable"
FINAL_VALIDATION = np.array([55.0, 3.0])


def test_sample_settles_after_the_epoch_from_which_it_stays_right():
    # s0 right throughout -> after epoch 1; s1 wrong again after epoch 3 -> only after epoch 4;
    # s2 -> after epoch 3; s7 -> after epoch 4; the others are wrong at the end.
    assert oracle.sample_settle_epochs(RIGHT).tolist() == [0, 3, 2, -1, -1, -1, -1, 3]


def test_sample_schedule_3a_and_3b():
    skip = oracle.sample_schedule(RIGHT)
    expected = np.array([
        # s0 s1 s2 s3 s4 s5 s6 s7
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0, 0],
    ], dtype=bool)
    assert np.array_equal(skip, expected)
    # 3b: s4 (never right, family below 5%) is skipped from epoch 2 on; s5 (never right, a
    # learnable family), s6 (right once in the unlearnable family) and s7 (right only at the
    # end) are not.
    skip_b = oracle.sample_schedule(RIGHT, RIGHT_FAMILY, FINAL_VALIDATION, 5.0)
    expected_b = expected.copy()
    expected_b[1:, 4] = True
    assert np.array_equal(skip_b, expected_b)
    # Below 3% nothing counts as unlearnable: 3b is 3a.
    assert np.array_equal(oracle.sample_schedule(RIGHT, RIGHT_FAMILY, FINAL_VALIDATION, 3.0), expected)
    # The ablation: 3b's extra skips alone (s4 from epoch 2 on, nothing else).
    alone = np.zeros_like(expected)
    alone[1:, 4] = True
    assert np.array_equal(oracle.unlearnable_schedule(RIGHT, RIGHT_FAMILY, FINAL_VALIDATION, 5.0), alone)


# -- training runs at smoke scale --


@pytest.fixture(scope="module")
def algo_task():
    return sft.make_sft_task("sft-algo", "smoke")


def test_a_run_counts_the_response_tokens_of_the_samples_it_trained(algo_task):
    task = algo_task
    n, epochs = task.num_samples, task.epochs
    tokens = oracle.train_split(task).response_tokens
    assert np.array_equal(tokens, sample_tokens(task))  # labels != -100 after the causal shift
    rng = np.random.default_rng(0)
    skip = np.zeros((epochs, n), dtype=bool)
    skip[1] = True
    skip[1, rng.choice(n, 301, replace=False)] = False  # 301 kept: a short last batch
    assert 301 % task.batch_size
    run = oracle.train_selected(task, 0, skip)
    assert np.array_equal(run.trained, (~skip).sum(axis=0))
    assert run.tokens == int((tokens * run.trained).sum())
    assert run.epoch_tokens == [int(tokens[~skip[e]].sum()) for e in range(epochs)]
    # An epoch with nothing kept takes no step and costs nothing.
    empty = np.zeros((epochs, n), dtype=bool)
    empty[1] = True
    run = oracle.train_selected(task, 0, empty)
    assert run.epoch_tokens == [int(tokens.sum()), 0]
    assert np.array_equal(run.trained, np.ones(n, dtype=np.int64))


def test_per_sample_exact_match_agrees_with_response_metrics(algo_task):
    task = algo_task
    split = oracle.train_split(task)
    model = oracle.train_selected(task, 0).model
    exact = oracle.sample_exact(model, split)
    figures = sft.response_metrics(model, split, task.families)
    assert 100.0 * float(exact.mean()) == figures["exact_match_%"]
    for k, name in enumerate(task.families):
        assert 100.0 * float(exact[split.family == k].mean()) == figures["families"][name]["exact_match_%"]


@pytest.mark.parametrize("name", ["sft-algo", "sft-stdlib"])
def test_the_full_variant_is_train_full_to_the_digit(name, tmp_path):
    out = tmp_path / "oracle.json"
    assert oracle.main(["--tasks", name, "--seeds", "1", "--scale", "smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["tasks"][name]["seeds"][0]
    full = result["runs"]["full"]

    task = sft.make_sft_task(name, "smoke")
    n_train, n_val, n_test, _ = (sft._ALGO_SCALES if name == "sft-algo" else sft._STDLIB_SCALES)["smoke"]
    data = sft_data.make_algo_sft(n_train, n_val, n_test) if name == "sft-algo" else sft_data.make_stdlib_sft(n_train, n_val, n_test)
    assert np.array_equal(data.train.inputs, task.inputs.numpy())
    curve = []
    model = sft_curves.train_full(
        task, 0, on_epoch=lambda e, m: curve.append(sft.response_metrics(m, data.validation, data.families)),
    )
    for split in ("test", "validation"):
        expected = sft.response_metrics(model, getattr(data, split), data.families)
        assert full[split]["exact_match_%"] == expected["exact_match_%"]
        assert full[split]["families"] == {f: expected["families"][f]["exact_match_%"] for f in data.families}
    assert result["full_validation_curve"] == {f: [c["families"][f]["exact_match_%"] for c in curve] for f in data.families}

    total = int(data.train.response_tokens.sum())
    assert result["total_response_tokens"] == total
    assert full["tokens"] == total * task.epochs and full["saved"] == 0.0
    for variant, run in result["runs"].items():
        assert run["skipped_per_epoch"][0] == 0, variant  # the first epoch is always full
        assert run["tokens"] == sum(run["epoch_tokens"])
        assert run["epoch_tokens"][0] == total
    # The family oracle's schedule is the rule applied to the recorded validation curve.
    values = np.array([result["full_validation_curve"][f] for f in data.families]).T
    settled = oracle.settle_epochs(values, 1.0)
    assert result["family_settle_epoch"] == {f: int(settled[k]) + 1 for k, f in enumerate(data.families)}
    skipped = [int(np.isin(data.train.family, np.flatnonzero(settled < e)).sum()) for e in range(task.epochs)]
    assert result["runs"]["family"]["skipped_per_epoch"] == skipped


def test_full_training_lowers_the_response_perplexity():
    task = make_task("sft-algo", "smoke")
    before = task.evaluate_detail(task.make_model(0), "validation")["perplexity"]
    seen = []
    sft_curves.train_full(task, 0, on_epoch=lambda epoch, model: seen.append(task.evaluate_detail(model, "validation")["perplexity"]))
    assert len(seen) == task.epochs and seen[-1] < before / 2


def test_learning_curves_print_every_family_after_every_epoch(capsys):
    assert sft_curves.main(["sft-algo", "--scale", "smoke", "--seeds", "0", "--split", "validation"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("epoch"))
    assert all(f in lines[header] for f in sft_data.ALGO_FAMILIES)
    rows = lines[header + 1 : header + 3]
    assert [int(r.split()[0]) for r in rows] == [0, 1] and all(len(r.split()) == len(sft_data.ALGO_FAMILIES) + 4 for r in rows)
