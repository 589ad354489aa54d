"""Choose GEKO's settings on the validation split: ``python benchmarks/tune.py``.

A staged coordinate search. The search starts from the current defaults; each stage varies
one setting over the listed values (the others held at the incumbent), runs every candidate
and full training over the same seeds, and moves the incumbent to the candidate the rule
picks. Runs are cached in a JSON-lines file, so a search can be stopped, extended with more
stages or re-run without repeating work.

What a run reports to this module is only its validation metric and its counted savings
(back-propagated samples, tokens for a language model). The task each run trains is a
*validation view*: its held-out evaluator is the validation evaluator and it has no per-split
detail, so the test split is never evaluated, let alone read (see ``validation_view``).

The rule (``tune_rule.choose``): a setting is *eligible* when, on every task, its mean validation
metric is no more than ``tolerance`` points below full training's (for a lower-is-better
metric such as perplexity: no more than ``ppl_tolerance`` percent above). Among the eligible
settings, the one with the largest savings (mean over tasks of the mean over seeds) wins;
settings within ``tie`` points of that largest saving are tied, and a tie goes to the setting
that changes fewest values from the current defaults, then to the one with the smallest
worst-task shortfall against full training. When no setting is eligible the one with the
smallest worst-task shortfall is chosen and the result says so. A *watched* task (``--watch``)
is one on which the current defaults themselves miss the tolerance, so that no setting could be
held to it there: a setting may not fall further behind full training on it than the current
defaults do, by more than the tolerance, and it does not count in the worst shortfall.

A task may carry its own GEKO settings (``geko_core.bench.settings``, chosen on validation
per task); a search of the library's defaults drops them (``--library-defaults``), so that every run measures the
defaults plus the setting searched. ``--jobs N`` runs N runs at a time in worker processes.

    python benchmarks/tune.py --tasks mnist1d,mnist1d-noise20 --seeds 3 --threads 1
    python benchmarks/tune.py --smoke      # seconds

Research tooling: it is not installed with the package. The settings it chose are written in
docs/tuning.md and carried by the tasks (``geko_core.bench.settings``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import geko_core
from geko_core.bench import _with_budget
from geko_core.bench.runner import bench_policy_options, run_one, spent_share, warm_up
from geko_core.bench.settings import SETTINGS, without_task_settings
from geko_core.curriculum import MountainCurriculum
from tune_rule import _defaults, _defaults_row, _key, choose, current_defaults, format_table, summarise  # beside this script

__all__ = ["geko_arguments", "main", "run_validation", "search", "validation_view"]

#: Settings that are counts: passed to the policy as ints.
INTEGER_SETTINGS = frozenset({"freeze_streak", "stall_visits"})

#: The stages of a default search (values; the current default is always added).
DEFAULT_STAGES: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("q_alpha", (0.1, 0.3, 0.5)),
    ("min_rate", (0.25, 0.35, 0.5)),
    ("min_revisit", (0.05, 0.1, 0.2)),
    ("final_full", (0.0, 0.05, 0.1)),
)
SMOKE_STAGES: tuple[tuple[str, tuple[float, ...]], ...] = (("q_alpha", (0.5,)),)


def _forbidden(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("the tuning tool does not evaluate on the test split")


def validation_view(task: Any) -> Any:
    """A copy of ``task`` whose held-out evaluator is the validation one and which has no
    test-split evaluator left: ``evaluate`` is ``evaluate_validation`` and ``evaluate_detail``
    is None (it would evaluate the test split). Runs of the view never touch the test data."""
    if getattr(task, "evaluate_validation", None) is None:
        raise ValueError(f"task {task.name!r} has no validation split to tune on")
    return dataclasses.replace(task, evaluate=task.evaluate_validation, evaluate_detail=None)


def task_settings(task: Any) -> dict[str, float]:
    """The task's own values of ``SETTINGS`` names (its per-task GEKO options) and its budget,
    as floats: what a cached run must have run under to be reused."""
    own = task.policy_options.get("geko", {})
    return {k: float(v) for k, v in own.items() if k in SETTINGS or k == "budget"}


def geko_arguments(task: Any, setting: dict[str, float]) -> tuple[Any, dict[str, Any]]:
    """The (task, policy options) that run GEKO with ``setting`` on ``task`` (a view).

    The task's own GEKO options (e.g. a budget) are kept; a setting overrides them."""
    unknown = set(setting) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
    config = dict(task.config_overrides)
    options = dict(task.policy_options.get("geko", {}))
    curriculum: dict[str, float] = {}
    for name, value in setting.items():
        value = int(round(value)) if name in INTEGER_SETTINGS else float(value)
        {"config": config, "policy": options, "curriculum": curriculum}[SETTINGS[name]][name] = value
    if curriculum:
        options["curriculum"] = MountainCurriculum(**curriculum)
    return dataclasses.replace(task, config_overrides=config), options


def run_validation(task: Any, policy: str, seed: int, setting: dict[str, float] | None = None) -> dict[str, Any]:
    """Train ``task`` under ``policy`` ("full" or "geko" with ``setting``) on a validation view
    and return only what tuning may read: the validation metric and the share saved."""
    view = validation_view(task)
    options = None
    if policy == "geko":
        view, options = geko_arguments(view, setting or {})
    elif policy != "full":
        options = bench_policy_options(policy, view, 0.5)
    started = time.perf_counter()
    result = run_one(view, policy, seed, policy_options=options)
    seconds = time.perf_counter() - started
    spent = spent_share(result)
    return {"validation": float(result["validation_metric"]), "saved_%": 100.0 * (1.0 - spent), "seconds": seconds,
            "code": code_fingerprint()}


_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    """A short hash of the code a run trains with: the package's Python sources and its
    compiled core. Stored in every cached run, so that a table can say when it pools runs of
    different code (a change in the last bits of a loss moves samples across bucket
    boundaries, and a run's figures with it)."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import hashlib

        from geko_core import _C

        root = Path(geko_core.__file__).resolve().parent
        digest = hashlib.sha256()
        for path in sorted(root.rglob("*.py")) + [Path(_C.__file__)]:
            digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
            digest.update(path.read_bytes())
        _FINGERPRINT = digest.hexdigest()[:12]
    return _FINGERPRINT


# --------------------------------------------------------------------------------------------
# the search


class _Cache:
    """Runs already made, in a JSON-lines file (one run per line).

    A GEKO record names every setting (the defaults of the day it ran filled in), so changing a
    default later does not change what a cached run means, and the task's own GEKO settings it
    ran under (``task_settings``, empty when they were stripped): a run is reused only by a
    search that would make the very same run. Records written before these two fields existed
    are read as relative to today's defaults and as made without task settings."""

    def __init__(
        self, path: Path | None, scale: str, budget: float | None = None, task_options: dict[str, dict[str, float]] | None = None
    ) -> None:
        self.path, self.scale, self.budget = path, scale, budget
        self.task_options = task_options or {}
        self.records: list[dict[str, Any]] = []
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    # A GEKO run under a budget is another experiment; full training is the same.
                    if record.get("scale") != scale:
                        continue
                    if record.get("setting") is not None:
                        if record.get("budget") != budget:
                            continue
                        if record.get("task_settings", {}) != self.task_options.get(record["task"], {}):
                            continue
                    self.records.append(record)

    def find(self, task: str, setting: dict[str, float] | None, seed: int) -> dict[str, Any] | None:
        key = _key(setting)
        for record in self.records:
            if record["task"] == task and record["seed"] == seed and _key(record["setting"]) == key:
                return record
        return None

    def add(self, record: dict[str, Any]) -> None:
        if record.get("setting") is not None:
            record = {**record, "setting": {**_defaults(), **record["setting"]}}
            if self.task_options.get(record["task"]):
                record["task_settings"] = dict(self.task_options[record["task"]])
        self.records.append(record)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


# The pool's workers: each builds the tasks once (by name), then runs what it is handed.
_WORKER_TASKS: dict[str, Any] = {}


def _worker_init(names: Sequence[str], scale: str, budget: float | None, strip: bool, threads: int) -> None:
    import torch

    from geko_core.bench.tasks import make_task

    torch.set_num_threads(threads)
    for name in names:
        task = _prepare(make_task(name, scale), budget, strip)
        warm_up(task)
        _WORKER_TASKS[name] = task


def _worker_run(name: str, policy: str, seed: int, setting: dict[str, float] | None) -> dict[str, Any]:
    return run_validation(_WORKER_TASKS[name], policy, seed, setting)


def _prepare(task: Any, budget: float | None, strip: bool) -> Any:
    """The task as a search runs it: a validation view, without its own GEKO settings when
    ``strip`` (a search of the library defaults), under ``budget`` when given."""
    task = validation_view(task)
    if strip:
        task = without_task_settings(task)
    if budget is not None:
        task = _with_budget(task, budget)
    return task


def search(
    tasks: Sequence[Any],
    stages: Sequence[tuple[str, Sequence[float]]],
    seeds: int,
    *,
    scale: str,
    cache: _Cache,
    rule: dict[str, Any],
    run: Callable[..., dict[str, Any]] = run_validation,
    pool: Any = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the staged coordinate search; return the table, the stage choices and the choice.

    ``pool``: an executor whose ``submit(_worker_run, name, policy, seed, setting)`` runs a
    missing run in another process (``--jobs``); None runs them here, one after another. The
    runs are deterministic, so the table does not depend on which way they ran."""
    defaults = current_defaults()
    names = [t.name for t in tasks]
    hib = {t.name: bool(t.higher_is_better) for t in tasks}
    incumbent = {name: defaults[name] for name, _ in stages}
    for name, _ in stages:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {sorted(SETTINGS)}")
    # A run names the staged values only; a task's own value of any other setting would stay
    # in force while the cache records that setting at its default, so a later search could
    # reuse the run as one it is not. Such a search is refused.
    for task in tasks:
        loose = sorted(set(task_settings(task)) - set(incumbent) - {"budget"})
        if loose:
            raise ValueError(
                f"task {task.name!r} carries its own GEKO settings {loose}, which no stage names: its runs "
                "would mix them with the searched values; name them in a stage or drop them (--library-defaults)"
            )

    def ensure(settings: Sequence[dict[str, float] | None]) -> None:
        missing = []
        for setting in settings:
            for task in tasks:
                for seed in range(seeds):
                    if cache.find(task.name, setting, seed) is None and (task, setting, seed) not in missing:
                        missing.append((task, setting, seed))

        def record(task: Any, setting: dict[str, float] | None, seed: int, result: dict[str, Any]) -> None:
            entry = {"task": task.name, "scale": scale, "setting": setting, "seed": seed, **result}
            if setting is not None and cache.budget is not None:
                entry["budget"] = cache.budget
            cache.add(entry)
            log(f"{task.name} {_key(setting)} seed {seed}: validation {result['validation']:.3f}, saved {result['saved_%']:.1f}% ({result['seconds']:.0f}s)")

        if pool is None:
            for task, setting, seed in missing:
                record(task, setting, seed, run(task, "full" if setting is None else "geko", seed, setting))
            return
        futures = [(task, setting, seed, pool.submit(_worker_run, task.name, "full" if setting is None else "geko", seed, setting))
                   for task, setting, seed in missing]
        for task, setting, seed, future in futures:
            record(task, setting, seed, future.result())

    ensure([None])
    evaluated: list[dict[str, float]] = [dict(incumbent)]
    stage_choices = []
    for name, values in stages:
        candidates = [{**incumbent, name: value} for value in sorted(set(float(v) for v in values) | {incumbent[name]})]
        for candidate in candidates:
            if candidate not in evaluated:
                evaluated.append(candidate)
        ensure(candidates)
        keys = {_key(c) for c in candidates}
        every = summarise(cache.records, names, hib, defaults)
        stage_rows = [r for r in every if r["setting"] != "full" and _key(r["setting"]) in keys]
        picked, _ = choose(stage_rows, hib, reference=_defaults_row(every), **rule)
        if picked is not None:
            # A cached row may name fewer settings (the defaults left out): fill them in.
            incumbent = {**incumbent, **{n: defaults[n] for n in incumbent if n not in picked["setting"]}, **picked["setting"]}
            incumbent = {n: incumbent[n] for n, _ in stages}
        stage_choices.append({"stage": name, "values": [c[name] for c in candidates], "picked": incumbent[name]})
        log(f"stage {name}: picked {incumbent[name]:g}")
    keys = {_key(s) for s in evaluated} | {"full"}
    rows = [r for r in summarise(cache.records, names, hib, defaults) if _key(None if r["setting"] == "full" else r["setting"]) in keys]
    chosen, met = choose(rows, hib, reference=_defaults_row(rows), **rule)
    return {"defaults": defaults, "rows": rows, "stages": stage_choices, "chosen": chosen, "met_rule": met, "higher_is_better": hib}


def _parse_stage(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, values = text.partition("=")
    if name not in SETTINGS or not values:
        raise argparse.ArgumentTypeError(f"a stage is NAME=v1,v2,... with NAME in {sorted(SETTINGS)}, got {text!r}")
    return name, tuple(float(v) for v in values.split(","))


def write_outputs(out: Path, result: dict[str, Any], tasks: Sequence[str], meta: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "tuning.json", out / "tuning.csv"
    json_path.write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "task", "seeds", "validation_mean", "validation_std", "saved_mean_%", "saved_std_%", "shortfall", "chosen"])
        for row in result["rows"]:
            label = "full" if row["setting"] == "full" else json.dumps(row["setting"], sort_keys=True)
            picked = result["chosen"] is not None and row["setting"] == result["chosen"]["setting"]
            for task in tasks:
                entry = row["tasks"][task]
                writer.writerow([
                    label, task, len(entry["seeds"]), f"{entry['validation'][0]:.4f}", f"{entry['validation'][1]:.4f}",
                    f"{entry['saved_%'][0]:.3f}", f"{entry['saved_%'][1]:.3f}",
                    "" if entry.get("shortfall") is None else f"{entry['shortfall']:.4f}", int(picked),
                ])
    return [json_path, csv_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/tune.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mnist1d,mnist1d-noise20", help="comma list of geko-bench tasks")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (task, setting); default 3 (1 with --smoke)")
    parser.add_argument("--stage", action="append", type=_parse_stage, default=None, metavar="NAME=v1,v2,...",
                        help="a stage of the search (repeatable, in order); default: " + "; ".join(f"{n}={','.join(f'{v:g}' for v in vs)}" for n, vs in DEFAULT_STAGES))
    parser.add_argument("--scale", choices=("smoke", "quick", "default"), default=None, help="task scale (default: default; smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="one tiny task, one seed, one stage (seconds)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="largest allowed shortfall against full training, in points (higher-is-better metrics)")
    parser.add_argument("--ppl-tolerance", type=float, default=1.0, help="the same in percent for lower-is-better metrics (perplexity)")
    parser.add_argument("--tie", type=float, default=0.5, help="savings within this many points of the best are tied")
    parser.add_argument("--budget", type=float, default=None,
                        help="run GEKO under this cost budget in (0, 1] (tokens for language models), as geko-bench --budget does; "
                        "the savings are then fixed and the rule compares the validation metric")
    parser.add_argument("--library-defaults", action="store_true",
                        help="drop the tasks' own GEKO settings (e.g. the fine-tuning tasks' per-task options): every run measures "
                        "the library's defaults plus the searched setting, which is what a search of the defaults needs")
    parser.add_argument("--watch", default="", metavar="TASKS",
                        help="comma list of tasks on which the current defaults already miss the tolerance: a setting may not fall "
                        "further behind full training there than the current defaults do, by more than the tolerance")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process with --threads threads (default 1)")
    parser.add_argument("--out", default="geko-tune-out", help="output directory (tuning.json, tuning.csv, runs.jsonl)")
    parser.add_argument("--cache", default=None, help="JSON-lines file of runs to reuse and extend (default: OUT/runs.jsonl)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no per-run log on stderr")
    args = parser.parse_args(argv)

    import torch

    from geko_core.bench.tasks import make_task

    scale = args.scale or ("smoke" if args.smoke else "default")
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
    if seeds < 1:
        parser.error("--seeds must be at least 1")
    stages = args.stage or (SMOKE_STAGES if args.smoke else DEFAULT_STAGES)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in ("mnist1d" if args.smoke and args.tasks == parser.get_default("tasks") else args.tasks).split(",") if n.strip()]
    if args.budget is not None and not 0.0 < args.budget <= 1.0:
        parser.error("--budget must be in (0, 1]")
    watch = [n.strip() for n in args.watch.split(",") if n.strip()]
    if set(watch) - set(names):
        parser.error(f"--watch names tasks not in --tasks: {sorted(set(watch) - set(names))}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    tasks = [_prepare(make_task(name, scale), args.budget, args.library_defaults) for name in names]
    out = Path(args.out)
    cache = _Cache(Path(args.cache) if args.cache else out / "runs.jsonl", scale, args.budget, {t.name: task_settings(t) for t in tasks})
    rule = {"tolerance": args.tolerance, "ppl_tolerance": args.ppl_tolerance, "tie": args.tie, "watch": watch}
    started = time.perf_counter()
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.jobs == 1:
        for task in tasks:
            warm_up(task)
        result = search(tasks, stages, seeds, scale=scale, cache=cache, rule=rule, log=log)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = args.threads or 1
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(names, scale, args.budget, args.library_defaults, threads)) as pool:
            result = search(tasks, stages, seeds, scale=scale, cache=cache, rule=rule, pool=pool, log=log)
    meta = {
        "command": "python benchmarks/tune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scale": scale, "seeds": seeds, "tasks": names,
        "stages": [[n, list(vs)] for n, vs in stages], "rule": rule, "budget": args.budget,
        "library_defaults": args.library_defaults, "task_settings": {t.name: task_settings(t) for t in tasks},
        "seconds": time.perf_counter() - started, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "metric": "validation split only",
    }
    written = write_outputs(out, result, names, meta)
    print(format_table(result["rows"], names, result["chosen"]))
    mixed = [r for r in result["rows"] if len(r.get("code_versions", ())) > 1]
    if mixed:
        print(f"\n† {len(mixed)} row(s) pool cached runs made by different versions of the code "
              f"(the runs' \"code\" field; this code is {code_fingerprint()}): their runs may not be reproducible as they stand")
    if result["chosen"] is None:
        print("\nno GEKO setting was run on every task")
    else:
        verdict = "meets the rule" if result["met_rule"] else "NO setting met the rule; the smallest shortfall"
        changed = {n: result["chosen"]["setting"][n] for n in result["chosen"]["changed"]}
        print(f"\nchosen ({verdict}): {result['chosen']['setting']} (changed from the current defaults: {changed or 'none'})")
    print("stages: " + "; ".join(f"{s['stage']} {s['values']} -> {s['picked']:g}" for s in result["stages"]))
    print(f"{meta['seconds']:.0f}s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
