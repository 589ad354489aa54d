"""The tuning tool: its smoke mode, its choice rule, and that it never evaluates the test split."""

import dataclasses
import json

import pytest

pytest.importorskip("mnist1d")

from geko_core import GekoConfig, MountainCurriculum, Selector  # noqa: E402
from geko_core.bench import tasks as bench_tasks  # noqa: E402
from geko_core.bench import tune  # noqa: E402

HIB = {"a": True, "b": True}
DEFAULTS = {"q_alpha": 0.3, "min_rate": 0.5}


def records(task, setting, validations, saved):
    return [{"task": task, "setting": setting, "seed": s, "validation": v, "saved_%": saved} for s, v in enumerate(validations)]


def hand_made_table():
    current = {"q_alpha": 0.3, "min_rate": 0.5}
    greedy = {"q_alpha": 0.5, "min_rate": 0.25}  # saves most, but 0.6 pt short on task b
    two_changes = {"q_alpha": 0.5, "min_rate": 0.35}  # eligible, 45% saved
    one_change = {"q_alpha": 0.3, "min_rate": 0.35}  # eligible, 44.7% saved: tied, fewer changes
    runs = []
    for task in ("a", "b"):
        runs += records(task, None, [98.0, 98.2, 98.1], 0.0)  # full: mean 98.1
        runs += records(task, current, [97.9, 98.0, 98.1], 38.0)
        runs += records(task, greedy, [97.8, 97.9, 98.0] if task == "a" else [97.4, 97.5, 97.6], 55.0)
        runs += records(task, two_changes, [97.7, 97.7, 97.7], 45.0)
        runs += records(task, one_change, [97.8, 97.8, 97.8], 44.7)
    return runs, current, greedy, two_changes, one_change


def test_summarise_gives_mean_std_and_shortfall_per_task():
    runs, current, greedy, *_ = hand_made_table()
    rows = tune.summarise(runs, ["a", "b"], HIB, DEFAULTS)
    assert rows[0]["setting"] == "full" and len(rows) == 5
    by = {json.dumps(r["setting"], sort_keys=True): r for r in rows}
    row = by[json.dumps(greedy, sort_keys=True)]
    assert row["changed"] == ["min_rate", "q_alpha"]
    mean, std = row["tasks"]["b"]["validation"]
    assert mean == pytest.approx(97.5) and std == pytest.approx(0.1)
    assert row["tasks"]["b"]["shortfall"] == pytest.approx(0.6)
    assert row["worst_shortfall"] == pytest.approx(0.6) and row["mean_saved_%"] == pytest.approx(55.0)
    assert by[json.dumps(current, sort_keys=True)]["changed"] == []


def test_choice_rule_on_a_hand_made_table():
    runs, current, greedy, two_changes, one_change = hand_made_table()
    rows = tune.summarise(runs, ["a", "b"], HIB, DEFAULTS)
    # The greedy setting fails the 0.5 pt rule on task b; the two others tie on savings (0.3
    # pt apart) and the tie goes to the one that changes fewer defaults.
    chosen, met = tune.choose(rows, HIB, tolerance=0.5, tie=0.5)
    assert met and chosen["setting"] == one_change
    # Without the tie margin the larger saving wins.
    chosen, met = tune.choose(rows, HIB, tolerance=0.5, tie=0.0)
    assert met and chosen["setting"] == two_changes
    # A looser tolerance admits the greedy setting.
    chosen, met = tune.choose(rows, HIB, tolerance=0.7)
    assert met and chosen["setting"] == greedy
    # Nothing within 0.1 pt except... nothing: the smallest worst shortfall is returned, flagged.
    chosen, met = tune.choose(rows, HIB, tolerance=0.05)
    assert not met and chosen["setting"] == current


def test_choice_rule_reads_perplexity_as_lower_is_better():
    hib = {"lm": False}
    runs = records("lm", None, [10.0, 10.0], 0.0)
    runs += records("lm", {"q_alpha": 0.5}, [10.2, 10.2], 50.0)  # 2% worse
    runs += records("lm", {"q_alpha": 0.1}, [10.05, 10.05], 30.0)  # 0.5% worse
    rows = tune.summarise(runs, ["lm"], hib, DEFAULTS)
    chosen, met = tune.choose(rows, hib, ppl_tolerance=1.0)
    assert met and chosen["setting"] == {"q_alpha": 0.1}
    assert chosen["tasks"]["lm"]["shortfall"] == pytest.approx(0.5)


def test_settings_reach_the_config_the_curriculum_and_the_guard():
    task = bench_tasks.make_task("stdlib-lm", "smoke")  # has its own config and GEKO options
    view, options = tune.geko_arguments(tune.validation_view(task), {"q_alpha": 0.45, "min_rate": 0.3, "min_revisit": 0.07})
    config = GekoConfig(**view.config_overrides)
    assert config.q_alpha == 0.45 and config.correct_threshold == task.config_overrides["correct_threshold"]
    assert options["budget"] == task.policy_options["geko"]["budget"] and options["min_revisit"] == 0.07
    assert isinstance(options["curriculum"], MountainCurriculum) and options["curriculum"].min_rate == 0.3
    assert task.config_overrides == {"correct_threshold": 0.6}  # the task itself is not changed
    selector = Selector(64, policy="geko", epochs=2, config=config, policy_options=options)
    assert selector.policy.min_revisit == 0.07 and selector.policy.curriculum.min_rate == 0.3
    with pytest.raises(ValueError, match="unknown settings"):
        tune.geko_arguments(view, {"loss_scale": 1.0})


def test_current_defaults_are_read_from_the_code():
    from geko_core.policies.geko import GekoPolicy

    defaults = tune.current_defaults()
    policy = GekoPolicy()
    assert defaults == {
        "q_alpha": GekoConfig().q_alpha, "min_rate": MountainCurriculum().min_rate,
        "min_revisit": policy.min_revisit, "revisit_gain": policy.revisit_gain, "final_full": policy.final_full,
        "freeze_streak": policy.freeze_streak, "stall_visits": policy.stall_visits,
        "stall_drop": policy.stall_drop, "stall_rate": policy.stall_rate,
    }


def test_count_settings_reach_the_policy_as_ints():
    task = bench_tasks.make_task("mnist1d", "smoke")
    _, options = tune.geko_arguments(tune.validation_view(task), {"freeze_streak": 2.0, "stall_visits": 1.0, "stall_drop": 0.3})
    assert options["freeze_streak"] == 2 and isinstance(options["freeze_streak"], int)
    assert options["stall_visits"] == 1 and isinstance(options["stall_visits"], int) and options["stall_drop"] == 0.3
    selector = Selector(64, policy="geko", epochs=2, policy_options=options)
    assert selector.policy.freeze_streak == 2 and selector.policy.stall_visits == 1


def test_budget_runs_are_cached_apart_from_unbudgeted_ones(tmp_path):
    path = tmp_path / "runs.jsonl"
    plain = tune._Cache(path, "smoke")
    plain.add({"task": "t", "scale": "smoke", "setting": None, "seed": 0, "validation": 1.0})
    plain.add({"task": "t", "scale": "smoke", "setting": {"q_alpha": 0.1}, "seed": 0, "validation": 2.0})
    budgeted = tune._Cache(path, "smoke", 0.6)
    budgeted.add({"task": "t", "scale": "smoke", "setting": {"q_alpha": 0.1}, "seed": 0, "validation": 3.0, "budget": 0.6})
    again = tune._Cache(path, "smoke", 0.6)
    assert again.find("t", None, 0)["validation"] == 1.0  # full training is shared
    assert again.find("t", {"q_alpha": 0.1}, 0)["validation"] == 3.0
    assert tune._Cache(path, "smoke").find("t", {"q_alpha": 0.1}, 0)["validation"] == 2.0


def test_validation_view_has_no_test_evaluator():
    task = bench_tasks.make_task("mnist1d", "smoke")
    view = tune.validation_view(task)
    assert view.evaluate is task.evaluate_validation and view.evaluate_detail is None
    with pytest.raises(ValueError, match="no validation split"):
        tune.validation_view(dataclasses.replace(task, evaluate_validation=None))


def test_smoke_mode_runs_and_never_evaluates_the_test_split(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    real_make_task = bench_tasks.make_task
    validated = []

    def test_split(*_args):
        raise AssertionError("the test split was evaluated")

    def guarded_make_task(name, scale):
        task = real_make_task(name, scale)
        inner = task.evaluate_validation

        def validation(model):
            validated.append(name)
            return inner(model)

        return dataclasses.replace(task, evaluate=test_split, evaluate_detail=test_split, evaluate_validation=validation)

    monkeypatch.setattr(bench_tasks, "make_task", guarded_make_task)
    out = tmp_path / "out"
    assert tune.main(["--smoke", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert validated  # the validation split was what each run was measured on
    printed = capsys.readouterr().out
    assert "chosen" in printed and "full training" in printed

    result = json.loads((out / "tuning.json").read_text())
    assert result["meta"]["scale"] == "smoke" and result["meta"]["metric"] == "validation split only"
    rows = result["rows"]
    values = sorted({GekoConfig().q_alpha, 0.5})  # the smoke stage: the default and 0.5
    assert rows[0]["setting"] == "full" and [r["setting"] for r in rows[1:]] == [{"q_alpha": v} for v in values]
    assert result["chosen"]["setting"] in [r["setting"] for r in rows[1:]]
    for row in rows:
        entry = row["tasks"]["mnist1d"]
        assert 0.0 <= entry["validation"][0] <= 100.0 and 0.0 <= entry["saved_%"][0] < 100.0
    assert rows[0]["tasks"]["mnist1d"]["saved_%"][0] == 0.0
    lines = (out / "tuning.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rows) and sum(line.endswith(",1") for line in lines[1:]) == 1
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 1 + len(values) and all(set(r) >= {"validation", "saved_%"} and "metric" not in r for r in runs)

    # A second call reuses the cached runs instead of training again.
    assert tune.main(["--smoke", "--out", str(out), "--quiet"]) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 1 + len(values)


def test_a_setting_naming_a_default_is_the_same_run_as_one_leaving_it_out(tmp_path):
    defaults = tune.current_defaults()
    assert tune._key({"q_alpha": 0.45, "stall_rate": defaults["stall_rate"]}) == tune._key({"q_alpha": 0.45})
    assert tune._key({"q_alpha": defaults["q_alpha"]}) == tune._key({})
    cache = tune._Cache(tmp_path / "runs.jsonl", "smoke")
    cache.add({"task": "t", "scale": "smoke", "setting": None, "seed": 0, "validation": 1.0, "saved_%": 0.0})
    cache.add({"task": "t", "scale": "smoke", "setting": {"q_alpha": 0.45}, "seed": 0, "validation": 2.0, "saved_%": 5.0})
    # A later stage names stall_rate at its default: the cached run is found and counted once.
    again = {"q_alpha": 0.45, "stall_rate": defaults["stall_rate"]}
    assert cache.find("t", again, 0)["validation"] == 2.0
    cache.add({"task": "t", "scale": "smoke", "setting": again, "seed": 0, "validation": 2.0, "saved_%": 5.0})
    rows = tune.summarise(cache.records, ["t"], {"t": True}, defaults)
    assert len(rows) == 2 and rows[1]["tasks"]["t"]["seeds"] == [0]
