"""The table and the choice rule of the settings search (``tune.py``, whose docstring states
the rule): runs grouped into one row per setting, the shortfall against full training, and the
row the rule picks. Research tooling in ``benchmarks/``, not installed with the package."""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, Iterable, Sequence

import numpy as np

from geko_core.bench.settings import SETTINGS
from geko_core.config import GekoConfig
from geko_core.curriculum import MountainCurriculum
from geko_core.policies.geko import GekoPolicy

__all__ = ["choose", "current_defaults", "format_table", "shortfall", "summarise"]


def current_defaults() -> dict[str, float]:
    """The values GEKO uses today for every name in ``SETTINGS``, read from the code."""
    policy = inspect.signature(GekoPolicy.__init__).parameters
    out: dict[str, float] = {}
    for name, where in SETTINGS.items():
        if where == "config":
            out[name] = float(getattr(GekoConfig(), name))
        elif where == "curriculum":
            out[name] = float(getattr(MountainCurriculum(), name))
        else:
            out[name] = float(policy[name].default)
    return out


def _key(setting: dict[str, float] | None) -> str:
    """A setting's identity: its values that differ from the current defaults. A setting that
    names a default value explicitly is the same run as one that leaves it out, so a search
    with a new stage reuses the cached runs of the stages before it."""
    if setting is None:
        return "full"
    defaults = _defaults()
    changed = {k: float(v) for k, v in setting.items() if not (k in defaults and math.isclose(float(v), defaults[k]))}
    return json.dumps(changed, sort_keys=True)


_DEFAULTS: dict[str, float] | None = None


def _defaults() -> dict[str, float]:
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = current_defaults()
    return _DEFAULTS


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def shortfall(full_mean: float, mean: float, higher_is_better: bool) -> float:
    """How far ``mean`` falls behind full training: points for a higher-is-better metric,
    percent of full's value for a lower-is-better one (perplexity). Negative: ahead."""
    if higher_is_better:
        return full_mean - mean
    return 100.0 * (mean / full_mean - 1.0)


def summarise(
    records: Iterable[dict[str, Any]], tasks: Sequence[str], higher_is_better: dict[str, bool], defaults: dict[str, float]
) -> list[dict[str, Any]]:
    """One row per setting (full training first): per task the mean and std over seeds of the
    validation metric and of the savings, and the shortfall against full training."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    settings: dict[str, dict[str, float] | None] = {}
    seen: set[tuple[str, str, int]] = set()
    for record in records:
        if record["task"] not in tasks:
            continue
        key = _key(record["setting"])
        if (key, record["task"], record["seed"]) in seen:
            continue  # the same run again (runs are deterministic): count it once
        seen.add((key, record["task"], record["seed"]))
        settings[key] = record["setting"]
        grouped.setdefault(key, {}).setdefault(record["task"], []).append(record)
    full = grouped.get("full", {})
    rows = []
    def order(k: str) -> tuple:
        setting = settings[k]
        return (k != "full", "" if setting is None else json.dumps({n: float(v) for n, v in setting.items()}, sort_keys=True))

    for key in sorted(grouped, key=order):
        if set(grouped[key]) != set(tasks):
            continue  # a setting not run on every task is not comparable
        setting = settings[key]
        row: dict[str, Any] = {
            "setting": "full" if setting is None else dict(setting),
            "changed": None if setting is None else sorted(n for n, v in setting.items() if not math.isclose(v, defaults.get(n, math.nan))),
            "tasks": {},
        }
        for task in tasks:
            runs = grouped[key][task]
            metric = _mean_std([r["validation"] for r in runs])
            saved = _mean_std([r["saved_%"] for r in runs])
            entry = {"seeds": sorted(r["seed"] for r in runs), "validation": metric, "saved_%": saved}
            if task in full:
                full_mean = _mean_std([r["validation"] for r in full[task]])[0]
                entry["shortfall"] = shortfall(full_mean, metric[0], higher_is_better[task])
            row["tasks"][task] = entry
        row["mean_saved_%"] = float(np.mean([row["tasks"][t]["saved_%"][0] for t in tasks]))
        shortfalls = [row["tasks"][t].get("shortfall") for t in tasks]
        row["worst_shortfall"] = max(shortfalls) if None not in shortfalls else None
        # The code versions its runs (and the full-training runs it is compared with) came from.
        pooled = [r for t in tasks for r in grouped[key][t] + full.get(t, [])]
        row["code_versions"] = sorted({r.get("code", "unknown") for r in pooled})
        rows.append(row)
    return rows


def choose(
    rows: Sequence[dict[str, Any]],
    higher_is_better: dict[str, bool],
    *,
    tolerance: float = 0.5,
    ppl_tolerance: float = 1.0,
    tie: float = 0.5,
    watch: Iterable[str] = (),
    reference: dict[str, Any] | None = None,
) -> tuple[dict[str, Any] | None, bool]:
    """The row the rule picks among the GEKO rows of ``summarise`` (module docstring), and
    whether it met the quality rule (False: nothing did; the least-bad row is returned).

    ``watch``: tasks on which the current defaults themselves miss the tolerance (so no setting
    could be held to it there): a setting must not fall further behind full training on them
    than ``reference`` (the current defaults' row) does, by more than the tolerance. Without a
    reference row a watched task is held to the plain tolerance."""
    candidates = [r for r in rows if r["setting"] != "full" and r["worst_shortfall"] is not None]
    if not candidates:
        return None, False
    watched = set(watch)

    def limit(task: str) -> float:
        allowed = tolerance if higher_is_better[task] else ppl_tolerance
        if task in watched and reference is not None and task in reference["tasks"]:
            base = reference["tasks"][task].get("shortfall")
            if base is not None:
                return max(allowed, base + allowed)
        return allowed

    def eligible(row: dict[str, Any]) -> bool:
        return all(entry["shortfall"] <= limit(task) + 1e-12 for task, entry in row["tasks"].items())

    def worst(row: dict[str, Any]) -> float:
        """The worst shortfall among the tasks held to the plain rule (all, if every one is watched)."""
        held = [e["shortfall"] for t, e in row["tasks"].items() if t not in watched]
        return max(held) if held else row["worst_shortfall"]

    passing = [r for r in candidates if eligible(r)]
    if not passing:
        return min(candidates, key=lambda r: (worst(r), len(r["changed"]))), False
    best = max(r["mean_saved_%"] for r in passing)
    tied = [r for r in passing if r["mean_saved_%"] >= best - tie]
    return min(tied, key=lambda r: (len(r["changed"]), worst(r), -r["mean_saved_%"])), True


def format_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str], chosen: dict[str, Any] | None = None) -> str:
    lines = []
    header = "| setting | " + " | ".join(f"{t} validation | {t} saved" for t in tasks) + " | mean saved | worst shortfall |"
    lines.append(header)
    lines.append("|" + "---|" * (2 * len(tasks) + 3))
    for row in rows:
        if row["setting"] == "full":
            label = "full training"
        else:
            label = ", ".join(f"{n}={row['setting'][n]:g}" for n in row["changed"]) or "current defaults"
            if chosen is not None and row["setting"] == chosen["setting"]:
                label = f"**{label}** (chosen)"
            if len(row.get("code_versions", ())) > 1:
                label += " †"
        cells = []
        for task in tasks:
            entry = row["tasks"][task]
            (m, s), (sm, ss) = entry["validation"], entry["saved_%"]
            short = entry.get("shortfall")
            delta = "" if row["setting"] == "full" or short is None else f" ({-short:+.2f})"
            cells.append(f"{m:.2f} ± {s:.2f}{delta} | {sm:.1f} ± {ss:.1f}%")
        worst = "" if row["worst_shortfall"] is None or row["setting"] == "full" else f"{row['worst_shortfall']:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['mean_saved_%']:.1f}% | {worst} |")
    return "\n".join(lines)


def _defaults_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the current defaults (no setting changed), if it was run."""
    for row in rows:
        if row["setting"] != "full" and not row["changed"]:
            return row
    return None
