"""RL prompt selection in the late-RL regime of ``rl-algo``: most groups zero-variance.

Research tooling (not part of the installed package). The ``bench`` scale of ``rl-algo`` with
a longer warm start (300 supervised steps instead of 150) and 10 epochs of GRPO: by the end of
full GRPO about nine groups in ten have identical rewards (all right or all wrong), which is
where real RL fine-tuning spends most of its rollouts and where choosing prompts before their
rollouts should pay (``SCALES["late"]``, what ``geko-bench --tasks rl-late`` runs, one policy
after another). Every run uses matched steps (``RLConfig.matched_steps``): an
epoch keeps full GRPO's number of optimizer steps and a policy that plans a share ``s`` of the
prompts rolls out ``s`` of each step's prompts, so a policy changes which prompts are rolled
out and how many, never how many updates the model gets.

One run per call, written as JSON to ``--out`` (several processes can share the directory):

    python benchmarks/rl_late.py run --policy full --seeds 0 1 2 3 4 --out OUT
    python benchmarks/rl_late.py run --policy geko --option hard_rate=0.5 --seeds 0 1 --out OUT
    python benchmarks/rl_late.py run --policy random_subset --budget-from greso --seeds 0 --out OUT
    python benchmarks/rl_late.py report --out OUT [--split validation]

``--budget-from P`` gives ``random_subset`` the rollout share (rollouts, not tokens) that policy
``P`` spent on the same seed (read from its run in ``--out``). A run here takes exactly the
options it is given: unlike ``geko-bench --tasks rl-late``, it does not add the scale's
``fill_policies`` (``--option filter_groups=true`` asks for filling), so the commands in
``docs/results/2026-12-08-rl-late.md`` keep meaning what they ran. ``report`` pairs every run with full GRPO of the
same seed (``geko_core.bench.rl_stats``): test (or validation) greedy exact match at the end,
rollout tokens, RL wall-clock, and the accuracy at equal rollout tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from geko_core._atomic import atomic_write
from geko_core.bench import rl_stats
from geko_core.bench.rl_grpo import FullPolicy, run_rl
from geko_core.bench.rl_selection import SelectorPolicy, selector_options
from geko_core.bench.rl_setup import SCALES

LATE = SCALES["late"]


def _parse_options(items: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option takes key=value, got {item!r}")
        options[key] = json.loads(value)
    return options


def _name(policy: str, options: dict[str, Any], seed: int) -> str:
    tag = "".join(f"_{k}{v}" for k, v in sorted(options.items()))
    return f"{policy}{tag}_seed{seed}.json"


def _load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    options = _parse_options(args.option)
    cfg = LATE.with_(epochs=args.epochs) if args.epochs else LATE
    num_prompts = cfg.num_train
    shares = {}  # seed -> the rollout share of the --budget-from runs, read once
    if args.policy == "random_subset" and args.budget_from:
        wanted = _parse_options(args.budget_options)
        shares = {r["seed"]: r["rollout_share"] for r in _load(out) if r["policy"] == args.budget_from and r.get("options", {}) == wanted}
    for seed in args.seeds:
        run_options = dict(options)
        if args.policy == "random_subset":
            if args.budget_from:
                if seed not in shares:
                    raise SystemExit(f"no {args.budget_from} run of seed {seed} in {out} to take the budget from")
                run_options["budget"] = round(shares[seed], 4)
            run_options.setdefault("budget", 0.5)
        path = out / _name(args.policy, run_options, seed)
        if path.exists():
            print(f"{path.name}: already there", flush=True)
            continue
        if args.policy == "full":
            policy = FullPolicy(num_prompts, seed)
        else:
            base = selector_options(args.policy, num_prompts, run_options.get("budget", 0.5)) or {}
            base.update(run_options)
            policy = SelectorPolicy(args.policy, num_prompts, seed, cfg.epochs, options=base)
        result = run_rl(args.policy, seed, "late", config=cfg, policy=policy)
        result["options"] = run_options
        if args.policy == "random_subset" and args.budget_from:
            result["budget_from"] = args.budget_from + "".join(f" {item}" for item in args.budget_options)
        result["rollout_share"] = result["rollouts"] / (cfg.epochs * num_prompts * cfg.G)
        with atomic_write(path) as handle:
            handle.write(json.dumps(result).encode("utf-8"))
        a = result["after"]
        print(
            f"{path.name}: validation {result['before']['validation']['exact_%']:.1f} -> {a['validation']['exact_%']:.1f}, "
            f"test {result['before']['test']['exact_%']:.1f} -> {a['test']['exact_%']:.1f}, rollout share {result['rollout_share']:.3f}, "
            f"zero-variance {result['zero_variance_share']:.2f}, RL {result['rl_seconds']:.0f} s",
            flush=True,
        )


def _label(r: dict) -> str:
    label = r["policy"] + "".join(f" {k}={v}" for k, v in sorted(r.get("options", {}).items()) if k != "budget")
    if r.get("budget_from"):
        label += f" (share of {r['budget_from']})"
    return label


def report(args: argparse.Namespace) -> None:
    runs = _load(Path(args.out))
    split = args.split
    key = f"{split}_exact_%"
    full = {r["seed"]: r for r in runs if r["policy"] == "full"}
    groups: dict[str, dict[int, dict]] = {}
    for r in runs:
        groups.setdefault(_label(r), {})[r["seed"]] = r
    num_validation = LATE.num_validation
    print(
        f"| policy | seeds | {split} exact match % | Δ vs full (paired) | rollout tokens | share of full's | RL s | "
        f"zero-variance share | to full's final validation exact match − 1 SE: rollout tokens / RL s, % of full's run (seeds) | "
        f"to full's final validation exact match itself |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, by_seed in sorted(groups.items(), key=lambda kv: (kv[0] != "full", kv[0])):
        acc = {seed: r["after"][split]["exact_%"] for seed, r in by_seed.items()}
        m, s = rl_stats.mean_std(acc.values())
        tokens = rl_stats.mean_std(r["rollout_tokens"] for r in by_seed.values())
        share = rl_stats.mean_std(r["rollout_share"] for r in by_seed.values())
        seconds = rl_stats.mean_std(r["rl_seconds"] for r in by_seed.values())
        zero = rl_stats.mean_std(r["zero_variance_share"] for r in by_seed.values())
        delta = ""
        costs = {"se": ([], []), "strict": ([], [])}
        if label != "full":
            base = {seed: full[seed]["after"][split]["exact_%"] for seed in acc if seed in full}
            if base:
                d = rl_stats.paired({k: acc[k] for k in base}, base)
                delta = f"{d['mean']:+.1f} ± {d['std']:.1f}" + (" (noise)" if d["noise"] else "")
        for seed, r in by_seed.items():
            if seed not in full:
                continue
            targets = {"se": rl_stats.target_of(full[seed]["curve"], num_validation), "strict": full[seed]["curve"][-1]["validation_exact_%"]}
            for name, target in targets.items():
                hit = rl_stats.cost_to_target(r["curve"], target)
                if hit is not None:
                    costs[name][0].append(100.0 * hit["rollout_tokens"] / full[seed]["rollout_tokens"])
                    costs[name][1].append(100.0 * hit["rl_seconds"] / full[seed]["rl_seconds"])
        cells = []
        for name in ("se", "strict"):
            tok, sec = costs[name]
            if not tok:
                cells.append(f"— (0/{len(by_seed)})")
                continue
            ct, cs = rl_stats.mean_std(tok), rl_stats.mean_std(sec)
            cells.append(f"{ct[0]:.0f} ± {ct[1]:.0f} / {cs[0]:.0f} ± {cs[1]:.0f} ({len(tok)}/{len(by_seed)})")
        cost = " | ".join(cells)
        print(
            f"| {label} | {len(by_seed)} | {m:.1f} ± {s:.1f} | {delta} | {tokens[0]:,.0f} | {share[0]:.2f} ± {share[1]:.2f} | "
            f"{seconds[0]:.0f} ± {seconds[1]:.0f} | {zero[0]:.2f} | {cost} |"
        )
    # Equal rollout budget: each selection run against the random subset given its share on the
    # same seed, and against full GRPO and dynamic sampling at the rollout tokens it spent.
    randoms = [r for r in runs if r["policy"] == "random_subset"]
    print()
    print(f"| policy | against | {split} exact match at equal rollout tokens, Δ (paired) |")
    print("|---|---|---|")
    for label, by_seed in sorted(groups.items()):
        if label == "full" or label.startswith(("random_subset", "dynamic")):
            continue
        for other_label, curve_of in (("full GRPO", full), ("dynamic", groups.get("dynamic", {}))):
            at = {seed: rl_stats.accuracy_at_budget(curve_of[seed]["curve"], r["rollout_tokens"], key=key) for seed, r in by_seed.items() if seed in curve_of}
            if at:
                mine = {seed: by_seed[seed]["after"][split]["exact_%"] for seed in at}
                d = rl_stats.paired(mine, at)
                print(f"| {label} | {other_label} at its tokens | {d['mean']:+.1f} ± {d['std']:.1f}" + (" (noise)" if d["noise"] else "") + f" ({len(at)} seeds) |")
        matched = {}
        for seed, r in by_seed.items():
            budget = round(r["rollout_share"], 4)
            for q in randoms:
                if q["seed"] == seed and abs(q["options"]["budget"] - budget) < 1e-9:
                    matched[seed] = q["after"][split]["exact_%"]
        if matched:
            mine = {seed: by_seed[seed]["after"][split]["exact_%"] for seed in matched}
            d = rl_stats.paired(mine, matched)
            print(f"| {label} | random subset of its share | {d['mean']:+.1f} ± {d['std']:.1f}" + (" (noise)" if d["noise"] else "") + f" ({len(matched)} seeds) |")
    if args.seeds_table:
        print()
        for label, by_seed in sorted(groups.items()):
            print(label, "  ".join(f"seed {seed}: {r['after'][split]['exact_%']:.1f} ({r['rollout_tokens']:,})" for seed, r in sorted(by_seed.items())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/rl_late.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one policy on some seeds")
    r.add_argument("--policy", required=True, choices=("full", "geko", "greso", "random_subset", "dynamic", "gainrl"))
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--option", action="append", default=[], help="a policy option key=value (JSON value), e.g. hard_rate=0.5")
    r.add_argument("--budget-from", default=None, help="random_subset: the rollout share this policy spent on the same seed")
    r.add_argument("--budget-options", action="append", default=[], help="the options of the --budget-from run")
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    p = sub.add_parser("report", help="paired table of the runs in --out")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=("validation", "test"))
    p.add_argument("--seeds-table", action="store_true")
    args = parser.parse_args(argv)
    (run if args.command == "run" else report)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
