"""Aggregation and output of benchmark runs: terminal table, JSON, CSV and PNG plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write

from ..config import BUCKET_NAMES

__all__ = ["aggregate", "format_table", "write_outputs"]


#: How the table names policies; "uniform" is full data through the Selector.
POLICY_LABELS = {"uniform": "uniform (Selector)", "random_subset": "random subset", "es": "ES (reconstructed)", "full_short": "full, shortened schedule"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std per (task, policy), with ratios to full training of the same task."""
    rows: list[dict[str, Any]] = []
    keys = sorted({(r["task"], r["policy"]) for r in runs}, key=lambda k: (k[0], _policy_order(k[1])))
    full = {}
    for task, policy in keys:
        group = [r for r in runs if r["task"] == task and r["policy"] == policy]
        row: dict[str, Any] = {"task": task, "policy": policy, "seeds": len(group), "metric_name": group[0]["metric_name"],
                               "higher_is_better": group[0]["higher_is_better"]}
        for field in ("metric", "forwarded", "backpropagated", "train_seconds", "overhead_share"):
            row[field], row[field + "_std"] = _mean_std([r[field] for r in group])
        # Language models: compute is paid in (response) tokens; savings are counted in them.
        row["unit"] = "tokens" if group[0].get("backpropagated_tokens") is not None else "samples"
        if row["unit"] == "tokens":
            for field in ("forwarded_tokens", "backpropagated_tokens"):
                row[field], row[field + "_std"] = _mean_std([r[field] for r in group])
        if policy == "full":
            full[task] = row
        rows.append(row)
    for row in rows:
        base = full.get(row["task"])
        if base is None:
            continue
        spent = "backpropagated_tokens" if row["unit"] == "tokens" else "backpropagated"
        row["backprop_saved_%"] = 100.0 * (1.0 - row[spent] / base[spent])
        saved = [100.0 * (1.0 - r[spent] / base[spent]) for r in runs if r["task"] == row["task"] and r["policy"] == row["policy"]]
        row["backprop_saved_%_std"] = _mean_std(saved)[1]
        walls = [100.0 * (1.0 - r["train_seconds"] / base["train_seconds"]) for r in runs if r["task"] == row["task"] and r["policy"] == row["policy"]]
        row["wall_saved_%_std"] = _mean_std(walls)[1]
        row["wall_saved_%"] = 100.0 * (1.0 - row["train_seconds"] / base["train_seconds"])
        if row["higher_is_better"]:
            row["metric_delta"] = row["metric"] - base["metric"]
            noise = (row["metric_std"] ** 2 + base["metric_std"] ** 2) ** 0.5
        else:  # perplexity: relative change in %
            row["metric_delta"] = 100.0 * (row["metric"] / base["metric"] - 1.0)
            noise = 100.0 * (row["metric_std"] ** 2 + base["metric_std"] ** 2) ** 0.5 / base["metric"]
        # A difference smaller than the seeds' spread is called what it is.
        row["within_noise"] = row["policy"] != "full" and abs(row["metric_delta"]) <= noise
        _cost_to_target(row, base, runs)
    return rows


def _cost_to_target(row: dict[str, Any], base: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """The samples back-propagated until a run's held-out metric first reached full training's
    final metric of the same seed, within full's seed spread (its std over seeds), as a share of
    full training's samples of that seed; read on the per-epoch curve (no interpolation).
    Sets ``to_target_%`` (mean ± std over the seeds that reached it) and ``to_target_reached``."""
    full_runs = {r["seed"]: r for r in runs if r["task"] == row["task"] and r["policy"] == "full"}
    shares = []
    group = [r for r in runs if r["task"] == row["task"] and r["policy"] == row["policy"] and r["seed"] in full_runs]
    for r in group:
        final, total = full_runs[r["seed"]]["metric"], full_runs[r["seed"]]["backpropagated"]
        for spent, metric in r["curve"]:
            if (metric >= final - base["metric_std"]) if row["higher_is_better"] else (metric <= final + base["metric_std"]):
                shares.append(100.0 * spent / total)
                break
    row["to_target_reached"] = f"{len(shares)}/{len(group)}"
    if shares:
        row["to_target_%"], row["to_target_%_std"] = _mean_std(shares)


def _policy_order(policy: str) -> int:
    order = ["full", "full_short", "uniform", "random_subset", "infobatch", "es", "eswp", "geko"]
    return order.index(policy) if policy in order else len(order)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the aggregated rows."""
    header = ["task", "policy", "metric", "Δ vs full", "backprop", "saved", "wall s", "wall saved", "overhead", "to full's metric"]
    lines = []
    for row in rows:
        unit = "pt" if row["higher_is_better"] else "%"
        delta = row.get("metric_delta")
        lines.append([
            row["task"],
            POLICY_LABELS.get(row["policy"], row["policy"]),
            f"{row['metric']:.2f} ± {row['metric_std']:.2f}",
            "" if delta is None or row["policy"] == "full" else f"{delta:+.2f} {unit}" + (" (noise)" if row.get("within_noise") else ""),
            f"{row['backpropagated_tokens']:.0f} tok" if row.get("unit") == "tokens" else f"{row['backpropagated']:.0f}",
            "" if "backprop_saved_%" not in row else f"{row['backprop_saved_%']:.1f} ± {row['backprop_saved_%_std']:.1f}%",
            f"{row['train_seconds']:.1f} ± {row['train_seconds_std']:.1f}",
            "" if "wall_saved_%" not in row else f"{row['wall_saved_%']:.1f} ± {row['wall_saved_%_std']:.1f}%",
            f"{100 * row['overhead_share']:.2f}%",
            "" if "to_target_reached" not in row else (
                f"{row['to_target_%']:.0f} ± {row['to_target_%_std']:.0f}% ({row['to_target_reached']})" if "to_target_%" in row else f"— (0/{row['to_target_reached'].split('/')[1]})"
            ),
        ])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def write_outputs(out_dir: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """results.json, results.csv and PNG plots in ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    results = out_dir / "results.json"
    _atomic_write_text(results, json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2, default=float))
    written.append(results)
    table = out_dir / "results.csv"
    fields = ["task", "policy", "seed", "metric_name", "metric", "forwarded", "backpropagated", "train_seconds", "overhead_seconds", "overhead_share"]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    _atomic_write_text(table, buffer.getvalue())
    written.append(table)
    written += _plots(out_dir, runs)
    return written


def _plots(out_dir: Path, runs: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({r["task"] for r in runs}):
        task_runs = [r for r in runs if r["task"] == task]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for policy in sorted({r["policy"] for r in task_runs}, key=_policy_order):
            group = [r for r in task_runs if r["policy"] == policy]
            length = min(len(r["curve"]) for r in group)
            xs = np.mean([[p[0] for p in r["curve"][:length]] for r in group], axis=0)
            ys = np.array([[p[1] for p in r["curve"][:length]] for r in group])
            ax.plot(xs, ys.mean(0), marker="o", markersize=3, label=policy)
            if len(group) > 1:
                ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.15)
        ax.set_xlabel("samples back-propagated")
        ax.set_ylabel(task_runs[0]["metric_name"])
        ax.set_title(f"{task}: held-out {task_runs[0]['metric_name']} against back-propagated samples")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{task}_metric_vs_backprop.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        geko = [r for r in task_runs if r["policy"] == "geko" and r["bucket_flow"]]
        if geko:
            flow = geko[0]["bucket_flow"]
            epochs = np.arange(1, len(flow) + 1)
            stacks = [np.array([f[name] for f in flow]) for name in BUCKET_NAMES]
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ax.stackplot(epochs, *stacks, labels=BUCKET_NAMES, alpha=0.85)
            ax.set_xlabel("epoch")
            ax.set_ylabel("samples")
            ax.set_title(f"{task}: GEKO bucket flow (seed {geko[0]['seed']})")
            ax.legend(loc="upper left", fontsize=8)
            path = out_dir / f"{task}_geko_buckets.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

        guarded = [r for r in task_runs if r["policy"] == "geko" and r.get("guard_flow")]
        if guarded:
            # The quality guard: the share of FREEZE revisits that failed (forgetting) and the
            # revisit fraction it set, per epoch, every seed.
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in guarded:
                epochs = np.arange(1, len(r["guard_flow"]) + 1)
                measured = [g["measured"] if g["measured"] is not None else np.nan for g in r["guard_flow"]]
                ax.plot(epochs, measured, marker="o", markersize=3, label=f"failed revisits, seed {r['seed']}")
                ax.plot(epochs, [g["revisit"] for g in r["guard_flow"]], linestyle="--", label=f"revisit fraction, seed {r['seed']}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("fraction")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{task}: GEKO forgetting (failed FREEZE revisits) and revisit fraction")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = out_dir / f"{task}_geko_forgetting.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def goal_report(rows: list[dict[str, Any]]) -> str:
    """GEKO against the docs/design.md §5 end-to-end goals, per task. The overhead is the
    wall-clock of the whole Selector calls (``loss``, ``select``, ``observe``, planning) as a
    share of the training loop; the Selector's like-for-like cost is the extra wall-clock of
    full training through it ("uniform") over plain PyTorch ("full")."""
    lines = []
    for row in rows:
        if row["policy"] != "geko" or "backprop_saved_%" not in row:
            continue
        task = row["task"]
        peers = {r["policy"]: r for r in rows if r["task"] == task}
        quality_ok = (row["metric_delta"] >= -0.5) if row["higher_is_better"] else (row["metric_delta"] <= 1.0)
        better = []
        for peer in ("random_subset", "infobatch"):
            if peer in peers:
                p = peers[peer]
                ahead = row["metric"] >= p["metric"] if row["higher_is_better"] else row["metric"] <= p["metric"]
                better.append(f"{'ahead of' if ahead else 'behind'} {peer}")
        lines.append(
            f"{task}: back-prop saved {row['backprop_saved_%']:.1f}% (goal ≥ 40%: {'met' if row['backprop_saved_%'] >= 40 else 'NOT met'}), "
            f"wall saved {row['wall_saved_%']:.1f}% (goal ≥ 30%: {'met' if row['wall_saved_%'] >= 30 else 'NOT met'}), "
            f"quality Δ {row['metric_delta']:+.2f} (goal: {'met' if quality_ok else 'NOT met'}), "
            f"overhead {100 * row['overhead_share']:.2f}% (goal ≤ 1%: {'met' if row['overhead_share'] <= 0.01 else 'NOT met'}); "
            + ", ".join(better)
        )
        if "uniform" in peers and "wall_saved_%" in peers["uniform"]:
            lines[-1] += f"; full training through the Selector costs {-peers['uniform']['wall_saved_%']:+.1f}% wall-clock vs plain PyTorch"
    return "\n".join(lines)
