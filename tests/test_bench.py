"""geko-bench end to end in its smoke mode: every output exists and is well-formed."""

import csv
import json

import pytest

pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

from geko_core.bench import main  # noqa: E402
from geko_core.bench.data import make_mnist1d, make_stdlib_text  # noqa: E402


def test_smoke_run_writes_well_formed_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    policies = ["full", "random_subset", "infobatch", "es", "geko"]
    assert main(["--smoke", "--out", str(out), "--no-progress", "--policies", ",".join(policies)]) == 0
    printed = capsys.readouterr().out
    assert "backprop" in printed and "Goals" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["scale"] == "smoke"
    runs = results["runs"]
    assert {(r["task"], r["policy"]) for r in runs} == {(t, p) for t in ("mnist1d", "stdlib-lm") for p in policies}
    for run in runs:
        assert run["forwarded"] >= run["backpropagated"] > 0
        assert run["train_seconds"] > 0 and 0 <= run["overhead_share"] < 1
        assert len(run["curve"]) == run["epochs"]
        assert run["curve"][-1][1] == run["metric"]
        if run["policy"] == "full":
            assert run["backpropagated"] == run["num_samples"] * run["epochs"]
    by = {(r["task"], r["policy"]): r for r in runs}
    for task in ("mnist1d", "stdlib-lm"):
        # the random subset is given GEKO's measured budget
        geko, rnd = by[(task, "geko")], by[(task, "random_subset")]
        assert abs(rnd["backpropagated"] - geko["backpropagated"]) <= 0.02 * geko["backpropagated"] + rnd["num_samples"] * 0.01
        assert len(geko["bucket_flow"]) == geko["epochs"]
    summary = {(row["task"], row["policy"]): row for row in results["summary"]}
    assert summary[("mnist1d", "full")]["backprop_saved_%"] == 0.0

    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(runs) and float(rows[0]["train_seconds"]) > 0
    for name in ("mnist1d_metric_vs_backprop.png", "mnist1d_geko_buckets.png", "stdlib-lm_metric_vs_backprop.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_data_is_made_locally_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path))
    a = make_mnist1d(500, label_noise=0.2, seed=3)
    b = make_mnist1d(500, label_noise=0.2, seed=3)  # from the cache this time
    assert (a.x_train == b.x_train).all() and (a.y_train == b.y_train).all()
    assert 0.1 < a.noisy.mean() < 0.3 and a.x_train.shape[1] == 40
    text = make_stdlib_text(64, 16, seq_len=32)
    assert text.train.shape == (64, 33) and text.test.shape == (16, 33)
    assert text.num_train_files > 10 and text.num_test_files > 0
    with pytest.raises(ValueError, match="label_noise"):
        make_mnist1d(500, label_noise=1.5)


def test_budget_option_sets_geko_and_infobatch_budgets(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["--smoke", "--out", str(out), "--no-progress", "--policies", "full,geko,infobatch", "--budget", "0.5"]) == 0
    capsys.readouterr()
    runs = json.loads((out / "results.json").read_text())["runs"]
    by = {(r["task"], r["policy"]): r for r in runs}
    assert by[("mnist1d", "geko")]["policy_options"] == {"budget": 0.5, "budget_unit": "samples"}
    assert by[("mnist1d", "infobatch")]["policy_options"] == {"budget": 0.5, "unit": "samples"}
    assert by[("stdlib-lm", "geko")]["policy_options"] == {"budget": 0.5, "budget_unit": "tokens"}  # a language model
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(out), "--budget", "1.5"])


def test_budget_keeps_a_tasks_own_geko_settings():
    """--budget replaces a task's budget but keeps its validation-chosen GEKO settings."""
    import dataclasses

    from geko_core.bench import _with_budget
    from geko_core.bench.tasks import make_task

    task = make_task("mnist1d", "smoke")
    own = dataclasses.replace(task, policy_options={"geko": {"stall_visits": 2, "budget": 0.9}})
    options = _with_budget(own, 0.6).policy_options
    assert options["geko"] == {"stall_visits": 2, "budget": 0.6, "budget_unit": "samples"}
    assert options["infobatch"] == {"budget": 0.6, "unit": "samples"}


def test_library_defaults_option_runs_geko_without_a_tasks_own_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--no-progress", "--tasks", "sft-algo", "--policies", "geko"]
    assert main(argv) == 0
    own = json.loads((out / "results.json").read_text())["runs"][0]["policy_options"]
    assert own and set(own) <= {"stall_visits", "freeze_streak", "final_full", "stall_drop", "stall_rate"}
    assert main(argv + ["--library-defaults", "--budget", "0.7"]) == 0
    capsys.readouterr()
    result = json.loads((out / "results.json").read_text())
    assert result["runs"][0]["policy_options"] == {"budget": 0.7, "budget_unit": "tokens"}
    assert result["meta"]["library_defaults"] is True


def test_repeat_timing_pools_the_times_of_identical_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--no-progress", "--tasks", "mnist1d", "--policies", "full,random_subset,geko"]
    assert main(argv + ["--repeat-timing", "3"]) == 0
    capsys.readouterr()
    result = json.loads((out / "results.json").read_text())
    assert result["meta"]["timing_repeats"] == 3 and len(result["runs"]) == 3  # one record per (policy, seed)
    for run in result["runs"]:
        times = run["train_seconds_repeats"]
        assert len(times) == 3 and run["train_seconds"] == sorted(times)[1]
        assert run["overhead_share"] == pytest.approx(run["overhead_seconds"] / run["train_seconds"])
    # The repeats train the very same thing as a single run does.
    assert main(argv + ["--out", str(tmp_path / "once")]) == 0
    once = {r["policy"]: r for r in json.loads((tmp_path / "once" / "results.json").read_text())["runs"]}
    for run in result["runs"]:
        assert run["metric"] == once[run["policy"]]["metric"] and run["backpropagated"] == once[run["policy"]]["backpropagated"]
    with pytest.raises(SystemExit):
        main(argv + ["--repeat-timing", "0"])


def test_a_timing_repeat_that_trained_differently_is_an_error():
    from geko_core.bench import _add_timing

    first = {"task": "t", "policy": "geko", "seed": 0, "metric": 1.0, "forwarded": 5, "backpropagated": 5,
             "backpropagated_tokens": None, "curve": [(5, 1.0)], "train_seconds_repeats": [1.0], "overhead_seconds_repeats": [0.1]}
    _add_timing(first, {**first, "train_seconds": 2.0, "overhead_seconds": 0.2})
    assert first["train_seconds_repeats"] == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="metric differ"):
        _add_timing(first, {**first, "metric": 0.5, "train_seconds": 2.0, "overhead_seconds": 0.2})
    assert first["train_seconds_repeats"] == [1.0, 2.0]


def test_full_short_schedule_and_cost_to_target(tmp_path, monkeypatch, capsys):
    """full_short trains full data for GEKO's share of the steps (LR schedule compressed to them);
    the table's cost to full's metric reads the per-epoch curve."""
    from geko_core.bench.runner import _lr_at, run_one
    from geko_core.bench.tasks import make_task

    task = make_task("mnist1d", "smoke")
    full = run_one(task, "full", 0)
    short = run_one(task, "full_short", 0, policy_options={"share": 0.3})
    per_epoch = -(-task.num_samples // task.batch_size)
    steps = round(0.3 * per_epoch * task.epochs)
    sizes = ([task.batch_size] * (per_epoch - 1) + [task.num_samples - (per_epoch - 1) * task.batch_size]) * task.epochs
    assert short["backpropagated"] == sum(sizes[:steps])
    assert len(short["curve"]) == -(-steps // per_epoch) and full["backpropagated"] == task.num_samples * task.epochs
    with pytest.raises(ValueError, match="share"):
        run_one(task, "full_short", 0, policy_options={"share": 1.5})
    assert _lr_at(1.0, 1.0) == pytest.approx(0.05)
    monkeypatch.setenv("GEKO_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["--smoke", "--out", str(out), "--no-progress", "--tasks", "mnist1d", "--policies", "full,geko,full_short"]) == 0
    printed = capsys.readouterr().out
    assert "full, shortened schedule" in printed and "to full's metric" in printed
    runs = {r["policy"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    geko_share = runs["geko"]["backpropagated"] / (runs["geko"]["num_samples"] * runs["geko"]["epochs"])
    assert runs["full_short"]["policy_options"] == {"share": pytest.approx(geko_share)}


def test_cost_to_target_on_hand_made_curves():
    from geko_core.bench.report import aggregate

    def run(policy, seed, metric, curve):
        return {"task": "t", "policy": policy, "seed": seed, "metric_name": "accuracy_%", "higher_is_better": True, "metric": metric,
                "forwarded": curve[-1][0], "backpropagated": curve[-1][0], "train_seconds": 1.0, "overhead_share": 0.0,
                "backpropagated_tokens": None, "curve": curve}

    runs = [
        run("full", 0, 80.0, [(100, 70.0), (200, 80.0)]), run("full", 1, 82.0, [(100, 75.0), (200, 82.0)]),
        # full's seed std is sqrt(2): 78.59 and 80.59 are the targets
        run("geko", 0, 79.0, [(50, 78.6), (100, 79.0)]), run("geko", 1, 79.0, [(50, 79.0), (100, 80.0)]),
    ]
    rows = {r["policy"]: r for r in aggregate(runs)}
    assert rows["geko"]["to_target_reached"] == "1/2" and rows["geko"]["to_target_%"] == pytest.approx(25.0)
    assert rows["full"]["to_target_reached"] == "2/2" and rows["full"]["to_target_%"] == pytest.approx(100.0)
