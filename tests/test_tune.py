"""The tuning tool (benchmarks/tune.py, tune_rule.py): its smoke mode, its choice rule, and that
it never evaluates the test split."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")

from geko_core import GekoConfig, MountainCurriculum, Selector  # noqa: E402
from geko_core.bench import tasks as bench_tasks  # noqa: E402
from geko_core.bench.settings import SETTINGS, without_task_settings  # noqa: E402

# The settings search is research tooling in benchmarks/, not in the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import tune  # noqa: E402
import tune_rule  # noqa: E402

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
    rows = tune_rule.summarise(runs, ["a", "b"], HIB, DEFAULTS)
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
    rows = tune_rule.summarise(runs, ["a", "b"], HIB, DEFAULTS)
    # The greedy setting fails the 0.5 pt rule on task b; the two others tie on savings (0.3
    # pt apart) and the tie goes to the one that changes fewer defaults.
    chosen, met = tune_rule.choose(rows, HIB, tolerance=0.5, tie=0.5)
    assert met and chosen["setting"] == one_change
    # Without the tie margin the larger saving wins.
    chosen, met = tune_rule.choose(rows, HIB, tolerance=0.5, tie=0.0)
    assert met and chosen["setting"] == two_changes
    # A looser tolerance admits the greedy setting.
    chosen, met = tune_rule.choose(rows, HIB, tolerance=0.7)
    assert met and chosen["setting"] == greedy
    # Nothing within 0.1 pt except... nothing: the smallest worst shortfall is returned, flagged.
    chosen, met = tune_rule.choose(rows, HIB, tolerance=0.05)
    assert not met and chosen["setting"] == current


def test_choice_rule_reads_perplexity_as_lower_is_better():
    hib = {"lm": False}
    runs = records("lm", None, [10.0, 10.0], 0.0)
    runs += records("lm", {"q_alpha": 0.5}, [10.2, 10.2], 50.0)  # 2% worse
    runs += records("lm", {"q_alpha": 0.1}, [10.05, 10.05], 30.0)  # 0.5% worse
    rows = tune_rule.summarise(runs, ["lm"], hib, DEFAULTS)
    chosen, met = tune_rule.choose(rows, hib, ppl_tolerance=1.0)
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

    defaults = tune_rule.current_defaults()
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
    assert rows[0]["setting"] == "full" and [r["setting"]["q_alpha"] for r in rows[1:]] == values
    # Every GEKO record names every setting (the day's defaults filled in).
    assert all(set(r["setting"]) == set(SETTINGS) for r in rows[1:])
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
    defaults = tune_rule.current_defaults()
    assert tune_rule._key({"q_alpha": 0.45, "stall_rate": defaults["stall_rate"]}) == tune_rule._key({"q_alpha": 0.45})
    assert tune_rule._key({"q_alpha": defaults["q_alpha"]}) == tune_rule._key({})
    cache = tune._Cache(tmp_path / "runs.jsonl", "smoke")
    cache.add({"task": "t", "scale": "smoke", "setting": None, "seed": 0, "validation": 1.0, "saved_%": 0.0})
    cache.add({"task": "t", "scale": "smoke", "setting": {"q_alpha": 0.45}, "seed": 0, "validation": 2.0, "saved_%": 5.0})
    # A later stage names stall_rate at its default: the cached run is found and counted once.
    again = {"q_alpha": 0.45, "stall_rate": defaults["stall_rate"]}
    assert cache.find("t", again, 0)["validation"] == 2.0
    cache.add({"task": "t", "scale": "smoke", "setting": again, "seed": 0, "validation": 2.0, "saved_%": 5.0})
    rows = tune_rule.summarise(cache.records, ["t"], {"t": True}, defaults)
    assert len(rows) == 2 and rows[1]["tasks"]["t"]["seeds"] == [0]


def test_a_watched_task_is_held_to_the_current_defaults_shortfall_plus_the_tolerance():
    hib = {"a": True, "w": True}
    defaults = {"q_alpha": 0.3}
    runs = records("a", None, [98.0, 98.0], 0.0) + records("w", None, [60.0, 60.0], 0.0)
    runs += records("a", {"q_alpha": 0.3}, [97.8, 97.8], 20.0) + records("w", {"q_alpha": 0.3}, [58.0, 58.0], 5.0)  # defaults: w 2 pt short
    runs += records("a", {"q_alpha": 0.5}, [97.7, 97.7], 40.0) + records("w", {"q_alpha": 0.5}, [57.8, 57.8], 20.0)  # w 2.2 short
    runs += records("a", {"q_alpha": 0.7}, [97.6, 97.6], 60.0) + records("w", {"q_alpha": 0.7}, [57.0, 57.0], 30.0)  # w 3.0 short
    rows = tune_rule.summarise(runs, ["a", "w"], hib, defaults)
    reference = tune_rule._defaults_row(rows)
    assert reference["setting"] == {"q_alpha": 0.3}
    # Held to the plain rule, nothing passes on w (every setting is at least 2 pt short).
    chosen, met = tune_rule.choose(rows, hib, tolerance=0.5)
    assert not met
    # Watched, w may be 2 + 0.5 pt short: 0.5 passes, 0.7 (3 pt) does not, a is held to 0.5 pt.
    chosen, met = tune_rule.choose(rows, hib, tolerance=0.5, watch={"w"}, reference=reference)
    assert met and chosen["setting"] == {"q_alpha": 0.5}
    # Without a reference row a watched task is held to the plain tolerance.
    chosen, met = tune_rule.choose(rows, hib, tolerance=0.5, watch={"w"})
    assert not met


def test_cached_records_keep_their_meaning_when_defaults_or_task_settings_change(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    cache = tune._Cache(path, "smoke")
    cache.add({"task": "t", "scale": "smoke", "setting": {"freeze_streak": 3.0}, "seed": 0, "validation": 2.0, "saved_%": 40.0})
    stored = json.loads(path.read_text().splitlines()[0])
    assert set(stored["setting"]) == set(SETTINGS) and stored["setting"]["freeze_streak"] == 3.0
    assert "task_settings" not in stored
    # Were the default streak changed to 3, the record would be the new defaults' run, and a
    # search of the old default (0) would not mistake it for its own.
    new_defaults = {**tune_rule.current_defaults(), "freeze_streak": 3.0}
    monkeypatch.setattr(tune_rule, "_DEFAULTS", new_defaults)
    again = tune._Cache(path, "smoke")
    assert again.find("t", {}, 0)["validation"] == 2.0
    assert again.find("t", {"freeze_streak": 0.0}, 0) is None
    monkeypatch.setattr(tune_rule, "_DEFAULTS", None)
    # A run made under a task's own GEKO settings is another experiment from one without them.
    own = tune._Cache(path, "smoke", task_options={"t": {"stall_visits": 2.0}})
    assert own.find("t", {"freeze_streak": 3.0}, 0) is None
    own.add({"task": "t", "scale": "smoke", "setting": {"freeze_streak": 3.0}, "seed": 0, "validation": 1.0, "saved_%": 9.0})
    assert json.loads(path.read_text().splitlines()[1])["task_settings"] == {"stall_visits": 2.0}
    assert tune._Cache(path, "smoke", task_options={"t": {"stall_visits": 2.0}}).find("t", {"freeze_streak": 3.0}, 0)["validation"] == 1.0
    assert tune._Cache(path, "smoke").find("t", {"freeze_streak": 3.0}, 0)["validation"] == 2.0


def test_library_defaults_drop_a_tasks_own_settings_and_keep_its_budget():
    from geko_core.bench import _with_budget
    from geko_core.bench.sft import make_sft_task

    task = make_sft_task("sft-algo", "smoke")
    assert tune.task_settings(task) == {k: float(v) for k, v in task.policy_options["geko"].items()}
    stripped = tune._prepare(task, 0.6, strip=True)
    assert tune.task_settings(stripped) == {"budget": 0.6} and stripped.policy_options["geko"]["budget"] == 0.6
    # A task's own budget is one of its settings: stripped with them, recorded with them.
    capped = dataclasses.replace(task, policy_options={"geko": {"stall_visits": 1, "budget": 1.0, "budget_unit": "tokens"}})
    assert tune.task_settings(capped) == {"stall_visits": 1.0, "budget": 1.0}
    assert without_task_settings(capped).policy_options["geko"] == {}
    assert tune._prepare(capped, 0.6, strip=True).policy_options["geko"] == {"budget": 0.6, "budget_unit": "tokens"}
    assert stripped.evaluate_detail is None  # still a validation view
    kept = tune._prepare(task, None, strip=False)
    assert tune.task_settings(kept) == tune.task_settings(task)
    _, options = tune.geko_arguments(stripped, {"freeze_streak": 3.0})
    assert options == {"freeze_streak": 3, "budget": 0.6, "budget_unit": "tokens"}
    assert _with_budget(task, 0.5).policy_options["geko"]["stall_visits"] == task.policy_options["geko"]["stall_visits"]


def test_parallel_runs_give_the_serial_table(tmp_path, monkeypatch):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert tune.main(["--smoke", "--out", str(serial), "--quiet", "--threads", "1"]) == 0
    assert tune.main(["--smoke", "--out", str(parallel), "--quiet", "--threads", "1", "--jobs", "2"]) == 0

    def runs(out):
        return sorted((r["task"], json.dumps(r["setting"], sort_keys=True), r["seed"], r["validation"], r["saved_%"])
                      for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines()))

    assert runs(serial) == runs(parallel) and len(runs(serial)) == 3
    for name in ("serial", "parallel"):
        assert json.loads((tmp_path / name / "tuning.json").read_text())["chosen"] is not None


def test_a_row_pooling_runs_of_different_code_is_marked():
    fingerprint = tune.code_fingerprint()
    assert len(fingerprint) == 12 and int(fingerprint, 16) >= 0 and tune.code_fingerprint() == fingerprint
    hib = {"a": True}
    runs = [dict(r, code="old") for r in records("a", None, [98.0, 98.0], 0.0)]
    same = [dict(r, code="old") for r in records("a", {"q_alpha": 0.5}, [97.8, 97.8], 30.0)]
    mixed = records("a", {"q_alpha": 0.7}, [97.7, 97.7], 40.0)
    mixed = [dict(mixed[0], code="old"), dict(mixed[1], code="new")]
    rows = tune_rule.summarise(runs + same + mixed, ["a"], hib, DEFAULTS)
    by = {json.dumps(r["setting"], sort_keys=True): r for r in rows}
    assert by[json.dumps({"q_alpha": 0.5})]["code_versions"] == ["old"]
    assert by[json.dumps({"q_alpha": 0.7})]["code_versions"] == ["new", "old"]
    table = tune_rule.format_table(rows, ["a"])
    assert "q_alpha=0.7 †" in table and "q_alpha=0.5 †" not in table


def test_a_search_that_would_mix_a_tasks_own_settings_into_its_runs_is_refused(tmp_path):
    """sft-algo carries stall_visits=2: a search staging only q_alpha would run every setting
    with it while recording stall_visits at its default, so a later search could reuse those
    runs as runs of the defaults. Refused before anything runs; staging it (or stripping it)
    is accepted."""
    task = tune.validation_view(bench_tasks.make_task("sft-algo", "smoke"))
    task = dataclasses.replace(task, policy_options={"geko": {"stall_visits": 2}})

    def no_run(*args, **kwargs):
        raise AssertionError("nothing may run")

    cache = tune._Cache(tmp_path / "runs.jsonl", "smoke", None, {task.name: tune.task_settings(task)})
    with pytest.raises(ValueError, match=r"own GEKO settings \['stall_visits'\], which no stage names"):
        tune.search([task], [("q_alpha", (0.1,))], 1, scale="smoke", cache=cache, rule={}, run=no_run)
    assert cache.records == []
    ran = []

    def fake_run(task, policy, seed, setting=None):
        ran.append((policy, setting))
        return {"validation": 50.0, "saved_%": 0.0 if setting is None else 10.0, "seconds": 0.0}

    tune.search([task], [("stall_visits", (0, 2))], 1, scale="smoke", cache=cache, rule={}, run=fake_run)
    assert all(setting is None or "stall_visits" in setting for _, setting in ran) and len(ran) == 3
    stripped = without_task_settings(task)
    tune.search([stripped], [("q_alpha", (0.3,))], 1, scale="smoke",
                cache=tune._Cache(None, "smoke"), rule={}, run=fake_run)
