"""``geko-bench``: measured compute savings of every policy on locally made data.

    geko-bench --quick          # about a minute
    geko-bench                  # the default run (within 15 minutes on 2 cores)
    geko-bench --smoke          # seconds; what CI runs
    geko-bench --tasks rl-algo  # GRPO prompt selection, 5 seeds (opt-in: not in the default run)
    geko-bench --tasks rl-late  # the same in the late-RL regime (most groups zero-variance)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["main"]

DEFAULT_TASKS = ("mnist1d", "stdlib-lm")
DEFAULT_POLICIES = ("full", "uniform", "random_subset", "infobatch", "es", "geko")
RL_DEFAULT_POLICIES = ("full", "geko", "greso", "gainrl", "dynamic", "random_subset")
#: the RL tasks' settings per geko-bench scale (geko_core/bench/rl_setup.py SCALES)
RL_TASKS = {
    "rl-algo": {"smoke": "smoke", "quick": "quick", "default": "bench"},
    "rl-late": {"smoke": "late-smoke", "quick": "late", "default": "late"},
}
# "uniform" is full training through the Selector: its wall-clock against "full" is the
# like-for-like cost of the Selector. "full_short" (opt-in) is full data cut to GEKO's measured
# share of the steps, the learning-rate schedule compressed to them. Also available with
# --policies: eswp, gainrl, grace (the
# runner feeds GAIN-RL its angles and GRACE its embeddings from the model being trained).


class _Progress:
    """A dependency-free progress bar on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.started = time.perf_counter()

    def update(self, label: str, advance: int = 0) -> None:
        self.done += advance
        if not self.enabled:
            return
        width = 28
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.started
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} epochs  {elapsed:5.0f}s  {label[:60]:<60}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _with_budget(task, budget: float):
    """``task`` whose GEKO and InfoBatch runs get ``budget`` (in tokens for language models)."""
    import dataclasses

    from .runner import sample_tokens

    tokens = sample_tokens(task) is not None
    options = dict(task.policy_options)
    # The task's own GEKO settings (chosen on validation) stay; the budget replaces its own.
    options["geko"] = {**options.get("geko", {}), "budget": budget, "budget_unit": "tokens" if tokens else "samples"}
    options["infobatch"] = {"budget": budget, "unit": "tokens" if tokens else "samples"}
    return dataclasses.replace(task, policy_options=options)


def _add_timing(first: dict, again: dict) -> None:
    """Fold a timing repeat into the first run, after checking it trained the same thing."""
    same = ("metric", "forwarded", "backpropagated", "backpropagated_tokens", "curve")
    differs = [k for k in same if first.get(k) != again.get(k)]
    if differs:
        raise RuntimeError(
            f"{first['task']} {first['policy']} seed {first['seed']}: a timing repeat trained differently "
            f"({', '.join(differs)} differ); the runs are not deterministic here, so their times cannot be pooled"
        )
    first["train_seconds_repeats"].append(again["train_seconds"])
    first["overhead_seconds_repeats"].append(again["overhead_seconds"])


def _median_timing(result: dict) -> None:
    """The run's times become the medians over its timing repeats."""
    result["train_seconds"] = float(statistics.median(result["train_seconds_repeats"]))
    result["overhead_seconds"] = float(statistics.median(result["overhead_seconds_repeats"]))
    result["overhead_share"] = result["overhead_seconds"] / result["train_seconds"] if result["train_seconds"] > 0 else 0.0


def _run_rl_task(task: str, args: argparse.Namespace, scale_name: str, policies: list[str], argv: list[str] | None) -> None:
    """An RL suite (geko_core/bench/rl_bench.py): its own table, JSON and plots."""
    from .rl_bench import format_rl_table, run_suite, summarise, write_rl_outputs
    from .rl_setup import SCALES

    scale = RL_TASKS[task][scale_name]
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 5)
    started = time.perf_counter()

    def on_run(r: dict) -> None:
        if not args.no_progress:
            sys.stderr.write(
                f"{task} {r['policy']} seed {r['seed']}: test exact {r['after']['test']['exact_%']:.1f}%, "
                f"{r['rollout_tokens']:,} rollout tokens, RL {r['rl_seconds']:.1f}s ({time.perf_counter() - started:.0f}s so far)\n"
            )

    runs = run_suite(policies, list(range(seeds)), scale, on_run=on_run)
    rows = summarise(runs, SCALES[scale].num_validation)
    meta = {
        "command": "geko-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "task": task,
        "scale": scale,
        "config": dataclasses.asdict(SCALES[scale]),
        "seeds": seeds,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    written = write_rl_outputs(Path(args.out), runs, rows, meta, name=task)
    print(f"{task} ({scale} scale, {seeds} seeds; test split; Δ: paired against full GRPO of the same seed, "
          "'(noise)' when its 95% interval holds 0)")
    print(format_rl_table(rows))
    print(f"\n{len(runs)} {task} runs in {meta['seconds']:.0f}s; wrote " + ", ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geko-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="small data and few epochs (about a minute)")
    scale.add_argument("--smoke", action="store_true", help="tiny end-to-end check (seconds)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma list: mnist1d, mnist1d-noise20, mnist1d-noise40, stdlib-lm, sft-algo, sft-stdlib, rl-algo, rl-late")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma list of full and Selector policies (also: eswp, gainrl, grace, uniform)")
    parser.add_argument(
        "--rl-policies",
        default=",".join(RL_DEFAULT_POLICIES),
        help="the RL tasks' policies (comma list; default " + ",".join(RL_DEFAULT_POLICIES) + "): full is plain GRPO, the others run through the Selector",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (task, policy); default 3, 5 for rl-algo and rl-late (1 with --smoke)")
    parser.add_argument("--out", default="geko-bench-out", help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="a cost budget in (0, 1] for geko and infobatch (share of the full data's samples, "
        "tokens for language models), replacing the tasks' own options; the random subset still "
        "matches GEKO's measured cost",
    )
    parser.add_argument(
        "--repeat-timing",
        type=int,
        default=1,
        metavar="R",
        help="run every (task, policy, seed) R times, the policies of a seed interleaved, and report the median "
        "training time (the runs are deterministic: the metrics of the repeats must agree, and a repeat that "
        "disagrees is an error). For wall-clock figures on a noisy machine",
    )
    parser.add_argument(
        "--library-defaults",
        action="store_true",
        help="run GEKO with the library's defaults on every task, without the tasks' own GEKO settings "
        "(the fine-tuning tasks carry per-task settings chosen on validation)",
    )
    args = parser.parse_args(argv)

    from .report import aggregate, format_table, goal_report, write_outputs
    from .runner import bench_policy_options, run_one, spent_share, warm_up
    from .tasks import make_task

    scale_name = "smoke" if args.smoke else "quick" if args.quick else "default"
    seeds = args.seeds if args.seeds is not None else (1 if args.smoke else 3)
    if seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget is not None and not 0.0 < args.budget <= 1.0:
        parser.error("--budget must be in (0, 1]")
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    rl_policies = [p.strip() for p in args.rl_policies.split(",") if p.strip()]
    rl_tasks = [name for name in names if name in RL_TASKS]
    if rl_tasks:
        from .rl_bench import LOOP_POLICIES, SELECTOR_POLICIES

        for policy in rl_policies:
            if policy not in LOOP_POLICIES + SELECTOR_POLICIES:
                parser.error(f"unknown RL policy {policy!r}")
    tasks = [make_task(name, scale_name) for name in names if name not in RL_TASKS]
    if args.library_defaults:
        from .settings import without_task_settings

        tasks = [without_task_settings(task) for task in tasks]
    if args.budget is not None:
        tasks = [_with_budget(task, args.budget) for task in tasks]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from ..policies import POLICIES

    for policy in policies:
        if policy not in ("full", "full_short") and policy not in POLICIES:
            parser.error(f"unknown policy {policy!r}")
    # GEKO runs first in each seed so the random subset can match its budget.
    ordered = sorted(policies, key=lambda p: {"full": 0, "geko": 1}.get(p, 2))
    if args.repeat_timing < 1:
        parser.error("--repeat-timing must be at least 1")
    repeats = args.repeat_timing
    progress = _Progress(sum(t.epochs for t in tasks) * len(policies) * seeds * repeats, enabled=not args.no_progress and sys.stderr.isatty())
    runs = []
    started = time.perf_counter()
    for task in tasks:
        warm_up(task)
        for seed in range(seeds):
            geko_fraction = None
            kept: dict[str, dict] = {}
            for repeat in range(repeats):
                for policy in ordered:
                    # Budgeted policies (random subset, full_short, GAIN-RL, GRACE) match GEKO's measured share.
                    fraction = geko_fraction if geko_fraction is not None else 0.5
                    options = bench_policy_options(policy, task, min(1.0, max(fraction, 1e-3)))
                    label = f"{task.name} {policy} seed {seed}" + (f" (timing {repeat + 1}/{repeats})" if repeats > 1 else "")
                    progress.update(label)
                    result = run_one(task, policy, seed, policy_options=options, on_epoch=lambda e, label=label: progress.update(label, 1))
                    if repeat == 0:
                        if policy == "geko":  # its share of the samples, or of the tokens for a language model
                            geko_fraction = spent_share(result)
                        result["train_seconds_repeats"] = [result["train_seconds"]]
                        result["overhead_seconds_repeats"] = [result["overhead_seconds"]]
                        kept[policy] = result
                        runs.append(result)
                    else:
                        _add_timing(kept[policy], result)
            for result in kept.values():
                _median_timing(result)
    progress.close()
    for task in rl_tasks:
        _run_rl_task(task, args, scale_name, rl_policies, argv)
    if not tasks:
        return 0
    rows = aggregate(runs)
    meta = {
        "command": "geko-bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scale": scale_name,
        "seeds": seeds,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "library_defaults": args.library_defaults,
        "timing_repeats": repeats,
    }
    written = write_outputs(Path(args.out), runs, rows, meta)
    print(format_table(rows))
    report = goal_report(rows)
    if report:
        print("\nGoals (docs/design.md §5):\n" + report)
    print(f"\n{len(runs)} runs in {meta['seconds']:.0f}s; wrote " + ", ".join(str(p) for p in written))
    return 0
