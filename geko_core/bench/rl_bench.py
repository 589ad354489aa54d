"""``geko-bench --tasks rl-algo``: GRPO under every selection policy, several seeds, paired
against full GRPO, with the costs that matter in RL (rollout tokens, wall-clock).

Per seed every policy starts from the same warm-started weights (``rl_setup.warm_start``) and
the runs of a seed follow each other (full GRPO first), so a seed's figures are compared
pairwise (``rl_stats``). ``random_subset`` gets the rollout share GEKO spent on the same seed
when GEKO ran before it, else ``budget``. Reported per policy (``summarise``): held-out greedy
exact match and mean reward over ``G`` samples on the test split; rollout tokens, tokens
trained, RL wall-clock split into rollout, training and selection; the cost to reach full
GRPO's final validation accuracy (``rl_stats.target_of``) and the test accuracy at an equal
rollout budget (``equal_budget`` of full GRPO's rollout tokens of the same seed). Written
(``write_rl_outputs``): ``rl-algo.json`` (every run, its curve, the summary) and plots of
held-out exact match against rollout tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._atomic import atomic_write
from . import rl_stats
from .rl_selection import SELECTOR_POLICIES

__all__ = ["LOOP_POLICIES", "format_rl_table", "run_suite", "summarise", "write_rl_outputs"]

#: plain GRPO at the loop level; every other policy runs through the Selector
LOOP_POLICIES = ("full",)
#: the suite's order: full first (the pairing's baseline), GEKO before the random subset that
#: matches its rollout budget
_ORDER = ("full", "geko", "greso", "gainrl", "dynamic", "random_subset")


def _order(policy: str) -> int:
    return _ORDER.index(policy) if policy in _ORDER else len(_ORDER)


def run_suite(
    policies: list[str],
    seeds: list[int],
    scale: str,
    *,
    budget: float = 0.5,
    on_run: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Every policy on every seed at ``scale``; returns ``run_rl``'s results (plus
    ``budget`` for the budgeted runs).

    Raises:
        ValueError: an unknown policy or scale (before anything runs).
    """
    from .rl_grpo import run_rl
    from .rl_setup import SCALES

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    known = LOOP_POLICIES + SELECTOR_POLICIES
    unknown = [p for p in policies if p not in known]
    if unknown:
        raise ValueError(f"unknown rl-algo policy {unknown[0]!r}; choose among {', '.join(known)}")
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    runs: list[dict] = []
    for seed in seeds:
        spent: dict[str, int] = {}
        for policy in sorted(policies, key=_order):
            share = budget
            if policy == "random_subset" and "geko" in spent and "full" in spent:
                share = min(1.0, max(1e-3, spent["geko"] / spent["full"]))
            result = run_rl(policy, seed, scale, budget=share)
            if policy == "random_subset":
                result["budget"] = share
            spent[policy] = result["rollout_tokens"]
            runs.append(result)
            if on_run is not None:
                on_run(result)
    return runs


def _by_seed(runs: list[dict], policy: str, value: Callable[[dict], float | None]) -> dict[int, float]:
    out = {}
    for r in runs:
        if r["policy"] == policy:
            v = value(r)
            if v is not None:
                out[r["seed"]] = float(v)
    return out


def summarise(runs: list[dict], num_validation: int, *, equal_budget: float = 0.5) -> list[dict]:
    """One row per policy (full GRPO first): mean ± std over seeds and paired differences
    against full GRPO of the same seeds.

    Args:
        runs: ``run_suite``'s results (full GRPO among them for the paired figures).
        num_validation: validation prompts (the target's standard error).
        equal_budget: the rollout budget, as a share of full GRPO's rollout tokens of the same
            seed, at which every policy's test exact match is read.
    """
    policies = sorted({r["policy"] for r in runs}, key=_order)
    full_runs = {r["seed"]: r for r in runs if r["policy"] == "full"}
    targets = {s: rl_stats.target_of(r["curve"], num_validation) for s, r in full_runs.items()}
    figures: dict[str, Callable[[dict], Any]] = {
        "test_exact_%": lambda r: r["after"]["test"]["exact_%"],
        "test_sampled_reward": lambda r: r["after"]["test"]["sampled_reward"],
        "validation_exact_%": lambda r: r["after"]["validation"]["exact_%"],
        "rollout_tokens": lambda r: r["rollout_tokens"],
        "trained_tokens": lambda r: r["trained_tokens"],
        "rl_seconds": lambda r: r["rl_seconds"],
        "rollout_seconds": lambda r: r["seconds"]["rollout"],
        "training_seconds": lambda r: r["seconds"]["training"],
        "selection_seconds": lambda r: r["seconds"]["selection"],
        "selection_share_%": lambda r: 100.0 * r["seconds"]["selection"] / r["rl_seconds"] if r["rl_seconds"] > 0 else 0.0,
        "zero_variance_share_%": lambda r: 100.0 * r["zero_variance_share"],
        "dropped_rollout_tokens": lambda r: r["dropped_rollout_tokens"],
    }
    rows = []
    for policy in policies:
        group = [r for r in runs if r["policy"] == policy]
        row: dict[str, Any] = {"policy": policy, "seeds": sorted(r["seed"] for r in group)}
        for name, value in figures.items():
            per_seed = _by_seed(runs, policy, value)
            row[name] = rl_stats.mean_std(per_seed.values())
            if policy != "full" and full_runs:
                row[name + "_vs_full"] = rl_stats.paired(per_seed, _by_seed(runs, "full", value))
        if full_runs:
            # cost to reach full GRPO's final validation accuracy, as shares of full's whole run
            reached = {}
            for r in group:
                if r["seed"] not in targets:
                    continue
                cost = rl_stats.cost_to_target(r["curve"], targets[r["seed"]])
                base = full_runs[r["seed"]]
                reached[r["seed"]] = None if cost is None else {
                    **cost,
                    "rollout_tokens_%": 100.0 * cost["rollout_tokens"] / base["rollout_tokens"],
                    "rl_seconds_%": 100.0 * cost["rl_seconds"] / base["rl_seconds"],
                }
            hits = [c for c in reached.values() if c is not None]
            row["target_reached"] = f"{len(hits)}/{len(reached)}"
            row["cost_to_target"] = reached
            if hits:
                row["cost_to_target_tokens_%"] = rl_stats.mean_std(c["rollout_tokens_%"] for c in hits)
                row["cost_to_target_seconds_%"] = rl_stats.mean_std(c["rl_seconds_%"] for c in hits)
            at_budget = {
                r["seed"]: rl_stats.accuracy_at_budget(r["curve"], equal_budget * full_runs[r["seed"]]["rollout_tokens"])
                for r in group if r["seed"] in full_runs
            }
            row["test_exact_at_budget_%"] = rl_stats.mean_std(at_budget.values())
            row["test_exact_at_budget_by_seed"] = at_budget
            if policy != "full":
                full_at = {s: rl_stats.accuracy_at_budget(f["curve"], equal_budget * f["rollout_tokens"]) for s, f in full_runs.items()}
                row["test_exact_at_budget_vs_full"] = rl_stats.paired(at_budget, full_at)
                base_tokens = _by_seed(runs, "full", figures["rollout_tokens"])
                base_seconds = _by_seed(runs, "full", figures["rl_seconds"])
                row["rollout_tokens_saved_%"] = rl_stats.mean_std(100.0 * (1.0 - r["rollout_tokens"] / base_tokens[r["seed"]]) for r in group if r["seed"] in base_tokens)
                row["rl_seconds_saved_%"] = rl_stats.mean_std(100.0 * (1.0 - r["rl_seconds"] / base_seconds[r["seed"]]) for r in group if r["seed"] in base_seconds)
        row["equal_budget"] = equal_budget
        rows.append(row)
    return rows


def _pm(pair: tuple[float, float], fmt: str = ".1f") -> str:
    return f"{pair[0]:{fmt}} ± {pair[1]:{fmt}}"


def _diff(row: dict, name: str, fmt: str = "+.1f") -> str:
    d = row.get(name + "_vs_full")
    if d is None:
        return ""
    return f"{d['mean']:{fmt}} ± {d['std']:{fmt[1:]}}" + (" (noise)" if d["noise"] else "")


def format_rl_table(rows: list[dict]) -> str:
    """A plain-text table of ``summarise``'s rows (test split; costs against full GRPO)."""
    header = ["policy", "test exact %", "Δ vs full (paired)", "reward@G", "rollout tok", "saved", "RL s", "wall saved",
              "selection", "to target: tok / wall (% of full)", "reached", "exact @ equal budget", "Δ (paired)"]
    lines = []
    for row in rows:
        lines.append([
            row["policy"],
            _pm(row["test_exact_%"]),
            _diff(row, "test_exact_%"),
            _pm(row["test_sampled_reward"], ".3f"),
            f"{row['rollout_tokens'][0]:,.0f}",
            _pm(row["rollout_tokens_saved_%"]) + "%" if "rollout_tokens_saved_%" in row else "",
            _pm(row["rl_seconds"]),
            _pm(row["rl_seconds_saved_%"]) + "%" if "rl_seconds_saved_%" in row else "",
            f"{row['selection_share_%'][0]:.2f}%",
            f"{_pm(row['cost_to_target_tokens_%'], '.0f')} / {_pm(row['cost_to_target_seconds_%'], '.0f')}" if "cost_to_target_tokens_%" in row else "—",
            row.get("target_reached", ""),
            _pm(row["test_exact_at_budget_%"]) if "test_exact_at_budget_%" in row else "",
            _diff(row, "test_exact_at_budget"),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _plot(out_dir: Path, runs: list[dict], key: str, label: str, name: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(p["rollout_tokens"] for r in runs for p in r["curve"])
    grid = np.linspace(0.0, top, 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for policy in sorted({r["policy"] for r in runs}, key=_order):
        curves = [r["curve"] for r in runs if r["policy"] == policy]
        mean, std = rl_stats.mean_curve(curves, grid, key)
        ax.plot(grid, mean, label=f"{policy} ({len(curves)} seeds)")
        ax.fill_between(grid, mean - std, mean + std, alpha=0.12)
    ax.set_xlabel("rollout tokens generated")
    ax.set_ylabel(f"{label} greedy exact match (%)")
    ax.set_title(f"{name}: {label} exact match against rollout tokens (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out_dir / f"{name}_{label}_exact_vs_rollout_tokens.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_rl_outputs(out_dir: Path, runs: list[dict], rows: list[dict], meta: dict, *, name: str = "rl-algo") -> list[Path]:
    """``{name}.json`` (meta, summary, every run with its curve) and the two plots (test and
    validation exact match against rollout tokens) in ``out_dir``; returns the paths. ``name``:
    the task (``rl-algo``, ``rl-late``)."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    with atomic_write(path) as handle:
        handle.write(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1, default=float).encode("utf-8"))
    return [path, _plot(out_dir, runs, "test_exact_%", "test", name), _plot(out_dir, runs, "validation_exact_%", "validation", name)]
