"""How much could ANY selection of training samples save on the fine-tuning tasks? A trained
oracle bound for ``sft-algo`` and ``sft-stdlib`` (geko_core/bench/sft.py).

    python benchmarks/sft_oracle.py --tasks sft-algo,sft-stdlib --seeds 3 [--scale default|quick|smoke]

Per task and seed (seed *s* = the model initialisation, data shuffles and optimiser of
``train_full(task, s)`` of ``sft_curves.py``), five runs are trained:

``full``
    Plain full training, identical to ``train_full`` (same model, AdamW, per-epoch
    ``torch.randperm`` from a generator seeded with *s*, the runner's cosine learning rate).
    After every epoch it records each family's exact match on the **validation** split and,
    for every **training** sample, whether it is right (every response token the argmax under
    teacher forcing, as ``response_metrics`` defines an exact match).

``family`` (family oracle)
    Each family's training samples are, per epoch, either all trained or all skipped.
    Epochs are numbered 1..E here. Let ``v_f(e)`` be family *f*'s validation exact match (%)
    after epoch *e* of the full run of the same seed and ``v_f(E)`` its value at the end. The
    family settles at the first epoch *e* with ``|v_f(e') - v_f(E)| <= threshold`` for every
    ``e' >= e`` (``--family-threshold``, 1 pt by default), and is skipped in every epoch after
    it (epochs e+1..E). Epoch 1 is always full. Only the validation split is used; never test.

``sample`` (sample oracle, hindsight; variant 3a)
    A training sample settles at the first epoch *e* after which the full run found it right
    and right again after every later epoch (it never becomes wrong again); it is skipped in
    epochs e+1..E. A sample that is wrong after the last epoch of the full run is trained
    throughout.

``sample+unlearnable`` (variant 3b)
    As ``sample``, and in addition the samples that were never right after any epoch of the
    full run are skipped from epoch 2 on when their family's validation exact match at the
    end of full training is below ``--unlearnable-below`` (5% by default): the "known
    unlearnable" families.

``unlearnable`` (an ablation of 3b)
    Only 3b's extra skips: the never-right samples of the unlearnable families from epoch 2
    on; every other sample is trained in every epoch. It separates what dropping the hopeless
    samples costs from what skipping the learned ones costs.

Skipping a sample means it is neither forwarded nor back-propagated in that epoch. The
kept samples of an epoch are taken in the order of the same ``torch.randperm`` the full
run draws in that epoch (the permutation filtered to the kept samples, so the generator's
stream stays that of the full run) and batched with the task's batch size; the learning rate
of the step that starts at kept sample *j* of *m* in epoch *e* is
``_lr_at(lr, (e + j / m) / E)`` -- the same function of the epoch's own progress that
``train_full`` uses (``j / n``), so a thinned epoch still covers its whole cosine segment.
An epoch with no kept sample takes no step.

Every run counts the response tokens it back-propagated (labels != -100 after the causal
shift, ``SFTSplit.response_tokens`` per sample, summed over the samples of every batch it
trained); "saved" is ``1 - tokens / (E * all response tokens)``.

The report is one markdown table per task over the seeds: test exact match mean ± std, the
paired difference against full training (mean ± standard error of the per-seed
differences), response tokens saved (mean ± std) and every family's test exact match (mean);
then, per oracle, the share of each family's response tokens it skipped, and of the samples
it skipped in the last epoch the share that is right at the end of the full run and at the
end of its own run (what skipping made the model forget). ``--out FILE.json``
writes the raw per-seed figures (validation curves, schedules, per-epoch tokens, validation
and test figures of every run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from geko_core.bench.sft import make_sft_task, sample_responses
from geko_core.bench.sft_data import IGNORE_INDEX, SFTSplit
from geko_core.bench.base import Task
from sft_curves import train_full  # benchmarks/sft_curves.py, beside this script

VARIANTS = ("full", "family", "sample", "sample+unlearnable", "unlearnable")
VARIANT_LABELS = {
    "full": "full training",
    "family": "family oracle",
    "sample": "sample oracle (3a)",
    "sample+unlearnable": "sample oracle + unlearnable (3b)",
    "unlearnable": "unlearnable only (3b's extra skips alone)",
}


# --------------------------------------------------------------------------------------------
# Training with a per-epoch skip mask


def train_split(task: Task) -> SFTSplit:
    """The task's training data as an ``SFTSplit`` (``response_tokens``, ``family``)."""
    inputs = task.inputs.numpy()
    labels = task.targets.numpy()
    has = labels != IGNORE_INDEX
    prompt_len = np.where(has.any(axis=1), has.argmax(axis=1), labels.shape[1]).astype(np.int64)
    return SFTSplit(inputs, labels, task.family.numpy().astype(np.int64), prompt_len, [])


def sample_exact(model: torch.nn.Module, split: SFTSplit, *, batch_size: int = 512) -> np.ndarray:
    """bool ``[N]``: every response token of the sample is the argmax under teacher forcing
    (``response_metrics``' exact match, per sample)."""
    return sample_responses(model, split, batch_size=batch_size)[0]


@dataclass
class Run:
    model: torch.nn.Module
    #: response tokens back-propagated, in total and per epoch
    tokens: int
    epoch_tokens: list[int]
    #: int64 ``[N]``: epochs in which each sample was trained (counted from the batches)
    trained: np.ndarray
    seconds: float
    extra: dict = field(default_factory=dict)


def train_selected(
    task: Task,
    seed: int,
    skip: np.ndarray | None = None,
    *,
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
) -> Run:
    """``train_full`` with samples left out: ``skip`` is bool ``[epochs, N]`` (True: the
    sample is not forwarded nor back-propagated in that epoch); ``None`` trains everything
    and is ``train_full`` itself. ``on_epoch(epoch, model)`` after every epoch (0-based);
    its time is not counted in ``seconds``."""
    n, epochs = task.num_samples, task.epochs
    if skip is None:
        skip = np.zeros((epochs, n), dtype=bool)
    tokens_of = train_split(task).response_tokens
    outside = 0.0

    def after_epoch(epoch: int, model: torch.nn.Module) -> None:
        nonlocal outside
        if on_epoch is not None:
            started = time.perf_counter()
            on_epoch(epoch, model)
            outside += time.perf_counter() - started

    started = time.perf_counter()
    model = train_full(task, seed, on_epoch=after_epoch, skip=skip)
    seconds = time.perf_counter() - started - outside
    # train_full trains every kept sample exactly once in its epoch.
    epoch_tokens = [int(tokens_of[~skip[e]].sum()) for e in range(epochs)]
    trained = (~skip).sum(axis=0).astype(np.int64)
    return Run(model, sum(epoch_tokens), epoch_tokens, trained, seconds)


# --------------------------------------------------------------------------------------------
# Schedules. Epochs are 0-based here (row e of a mask is the docstring's epoch e + 1); a
# family or sample that settles at epoch e is skipped in rows e + 1 .. epochs - 1.


def settle_epochs(values: np.ndarray, threshold: float) -> np.ndarray:
    """Per family, the first 0-based epoch ``e`` from which the validation curve stays within
    ``threshold`` of its last value (``|v[e'] - v[-1]| <= threshold`` for every ``e' >= e``).

    Args:
        values: float ``[epochs, families]``, validation exact match after every epoch.
    Returns:
        int64 ``[families]`` in ``0 .. epochs - 1`` (the last epoch always qualifies).
    """
    values = np.asarray(values, dtype=np.float64)
    close = np.abs(values - values[-1]) <= threshold + 1e-9
    # suffix "all": close_from[e] = close[e:].all()
    close_from = np.flip(np.logical_and.accumulate(np.flip(close, axis=0), axis=0), axis=0)
    return close_from.argmax(axis=0).astype(np.int64)


def family_schedule(values: np.ndarray, family: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The family oracle's skip mask: bool ``[epochs, N]``, a sample skipped in every epoch
    after its family settles (``settle_epochs``). Also returns the settle epochs."""
    values = np.asarray(values, dtype=np.float64)
    epochs = values.shape[0]
    settled = settle_epochs(values, threshold)
    skip = np.arange(epochs)[:, None] > settled[np.asarray(family)][None, :]
    return skip, settled


def sample_settle_epochs(correct: np.ndarray) -> np.ndarray:
    """Per sample, the first 0-based epoch after which it is right and stays right after every
    later epoch; -1 when it is wrong after the last epoch.

    Args:
        correct: bool ``[epochs, N]``, right after each epoch of the full run.
    """
    correct = np.asarray(correct, dtype=bool)
    epochs = correct.shape[0]
    right_from = np.flip(np.logical_and.accumulate(np.flip(correct, axis=0), axis=0), axis=0)
    first = right_from.argmax(axis=0)
    return np.where(right_from[epochs - 1], first, -1).astype(np.int64)


def unlearnable_schedule(correct: np.ndarray, family: np.ndarray, final_family_values: np.ndarray, unlearnable_below: float) -> np.ndarray:
    """bool ``[epochs, N]``: the samples never right after any epoch of the full run whose
    family's final validation exact match (``final_family_values[f]``, %) is below
    ``unlearnable_below``, skipped from the second epoch (0-based 1) on."""
    correct = np.asarray(correct, dtype=bool)
    epochs = correct.shape[0]
    hopeless = np.asarray(final_family_values, dtype=np.float64)[np.asarray(family)] < unlearnable_below
    never = ~correct.any(axis=0)
    return (np.arange(epochs)[:, None] >= 1) & (hopeless & never)[None, :]


def sample_schedule(
    correct: np.ndarray,
    family: np.ndarray | None = None,
    final_family_values: np.ndarray | None = None,
    unlearnable_below: float | None = None,
) -> np.ndarray:
    """The hindsight sample oracle's skip mask, bool ``[epochs, N]``.

    A sample is skipped in every epoch after its settle epoch (``sample_settle_epochs``).
    With ``unlearnable_below`` (variant 3b), the samples of ``unlearnable_schedule`` are also
    skipped from the second epoch on.
    """
    correct = np.asarray(correct, dtype=bool)
    epochs = correct.shape[0]
    settled = sample_settle_epochs(correct)
    ep = np.arange(epochs)[:, None]
    skip = (settled[None, :] >= 0) & (ep > settled[None, :])
    if unlearnable_below is not None:
        if family is None or final_family_values is None:
            raise ValueError("variant 3b needs the samples' families and the families' final validation figures")
        skip |= unlearnable_schedule(correct, family, final_family_values, unlearnable_below)
    return skip


# --------------------------------------------------------------------------------------------
# One task, one seed


def _figures(detail: dict, families: tuple[str, ...]) -> dict:
    return {
        "exact_match_%": detail["exact_match_%"],
        "perplexity": detail["perplexity"],
        "families": {f: detail["families"][f]["exact_match_%"] for f in families},
    }


def run_seed(task: Task, seed: int, *, family_threshold: float = 1.0, unlearnable_below: float = 5.0, log: Callable[[str], None] | None = None) -> dict:
    """The five runs of one seed; returns their figures and the schedules."""
    log = log or (lambda _msg: None)
    split = train_split(task)
    families = task.families
    family = split.family
    total = int(split.response_tokens.sum())
    epochs = task.epochs
    val_curve: list[list[float]] = []
    correct: list[np.ndarray] = []

    def record(epoch: int, model: torch.nn.Module) -> None:
        detail = task.evaluate_detail(model, "validation")
        val_curve.append([detail["families"][f]["exact_match_%"] for f in families])
        correct.append(sample_exact(model, split))

    runs: dict[str, Run] = {}
    runs["full"] = train_selected(task, seed, on_epoch=record)
    values = np.array(val_curve)
    right = np.stack(correct)
    skip_family, settled = family_schedule(values, family, family_threshold)
    schedules = {
        "full": None,
        "family": skip_family,
        "sample": sample_schedule(right),
        "sample+unlearnable": sample_schedule(right, family, values[-1], unlearnable_below),
        "unlearnable": unlearnable_schedule(right, family, values[-1], unlearnable_below),
    }
    for variant in VARIANTS[1:]:
        runs[variant] = train_selected(task, seed, schedules[variant])

    out: dict = {
        "seed": seed,
        "epochs": epochs,
        "num_samples": len(split),
        "total_response_tokens": total,
        "full_validation_curve": {f: values[:, k].tolist() for k, f in enumerate(families)},
        "full_train_right_share": {f: right[:, family == k].mean(axis=1).tolist() for k, f in enumerate(families)},
        "family_settle_epoch": {f: int(settled[k]) + 1 for k, f in enumerate(families)},  # 1-based
        "unlearnable_families": [f for k, f in enumerate(families) if values[-1, k] < unlearnable_below],
        "runs": {},
    }
    tokens = split.response_tokens
    for variant in VARIANTS:
        run = runs[variant]
        skip = schedules[variant]
        right_end = sample_exact(run.model, split)
        last = skip[-1] if skip is not None else np.zeros(len(split), dtype=bool)
        family_saved = {}
        for k, f in enumerate(families):
            fam_total = int(tokens[family == k].sum()) * epochs
            fam_spent = int((tokens * run.trained)[family == k].sum())
            family_saved[f] = 1.0 - fam_spent / fam_total if fam_total else float("nan")
        out["runs"][variant] = {
            "tokens": run.tokens,
            "saved": 1.0 - run.tokens / (total * epochs),
            "epoch_tokens": run.epoch_tokens,
            "family_saved": family_saved,
            "skipped_per_epoch": [int(s.sum()) for s in skip] if skip is not None else [0] * epochs,
            "train_seconds": run.seconds,
            # the training samples right at the end of this run, per family (%)
            "train_right": {f: 100.0 * float(right_end[family == k].mean()) for k, f in enumerate(families)},
            # of the samples skipped in the last epoch: how many, and the share right at the end
            # of the full run and of this run (%)
            "last_epoch_skipped": int(last.sum()),
            "last_epoch_skipped_right_full": 100.0 * float(right[-1][last].mean()) if last.any() else None,
            "last_epoch_skipped_right": 100.0 * float(right_end[last].mean()) if last.any() else None,
            "validation": _figures(task.evaluate_detail(run.model, "validation"), families),
            "test": _figures(task.evaluate_detail(run.model, "test"), families),
        }
        r = out["runs"][variant]
        log(f"  seed {seed} {variant:<19} test {r['test']['exact_match_%']:6.2f}%  validation {r['validation']['exact_match_%']:6.2f}%"
            f"  saved {100 * r['saved']:5.1f}%  {run.seconds:5.1f}s")
    return out


# --------------------------------------------------------------------------------------------
# Report


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _mean_se(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return statistics.fmean(values), float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def report(task_name: str, scale: str, families: tuple[str, ...], seeds: list[dict], split: str = "test") -> str:
    """The markdown tables of one task over its seeds."""
    lines = [f"### {task_name} ({scale}, {split} split, {len(seeds)} seed{'s' if len(seeds) != 1 else ''})", ""]
    head = ["variant", "exact match %", "paired Δ vs full", "tokens saved %", *families]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    full = [s["runs"]["full"][split]["exact_match_%"] for s in seeds]
    for variant in VARIANTS:
        em = [s["runs"][variant][split]["exact_match_%"] for s in seeds]
        saved = [100.0 * s["runs"][variant]["saved"] for s in seeds]
        m, sd = _mean_std(em)
        sm, ssd = _mean_std(saved)
        if variant == "full":
            delta = ""
        else:
            dm, dse = _mean_se([a - b for a, b in zip(em, full)])
            delta = f"{dm:+.2f} ± {dse:.2f}"
        fams = [f"{statistics.fmean(s['runs'][variant][split]['families'][f] for s in seeds):.1f}" for f in families]
        lines.append(f"| {VARIANT_LABELS[variant]} | {m:.2f} ± {sd:.2f} | {delta} | {sm:.1f} ± {ssd:.1f} | " + " | ".join(fams) + " |")
    lines += [
        "",
        "Share of each family's response tokens skipped (mean over seeds, %); the samples skipped in the last epoch",
        "and the share of them that is right (exact match on the training sample) at the end of the full run and at",
        "the end of the oracle's own run:",
        "",
    ]
    head = ["variant", *families, "skipped in the last epoch", "right after full", "right after this run"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for variant in VARIANTS[1:]:
        runs = [s["runs"][variant] for s in seeds]
        cells = [f"{100 * statistics.fmean(r['family_saved'][f] for r in runs):.0f}" for f in families]
        kept = [r for r in runs if r["last_epoch_skipped"]]
        cells.append(f"{statistics.fmean(r['last_epoch_skipped'] for r in runs):.0f} of {seeds[0]['num_samples']}")
        for key in ("last_epoch_skipped_right_full", "last_epoch_skipped_right"):
            cells.append(f"{statistics.fmean(r[key] for r in kept):.1f}" if kept else "")
        lines.append(f"| {VARIANT_LABELS[variant]} | " + " | ".join(cells) + " |")
    settle = " ".join(f"{f} {'/'.join(str(s['family_settle_epoch'][f]) for s in seeds)}" for f in families)
    lines += ["", f"Family oracle: epoch after which each family is skipped, per seed (of {seeds[0]['epochs']}): {settle}."]
    unlearnable = sorted({f for s in seeds for f in s["unlearnable_families"]})
    lines.append(f"Unlearnable families (final validation exact match below the threshold in some seed): {', '.join(unlearnable) or 'none'}.")
    return "\n".join(lines)


def _seed_list(text: str) -> list[int]:
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/sft_oracle.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sft-algo,sft-stdlib", help="comma list of fine-tuning tasks")
    parser.add_argument("--seeds", default="3", help="number of seeds (0..S-1), or a comma list of seeds")
    parser.add_argument("--scale", default="default", choices=("smoke", "quick", "default"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (torch.set_num_threads)")
    parser.add_argument("--family-threshold", type=float, default=1.0, help="pt of validation exact match within which a family counts as settled")
    parser.add_argument("--unlearnable-below", type=float, default=5.0, help="variant 3b: final validation exact match (%%) below which a family counts as unlearnable")
    parser.add_argument("--out", default=None, help="write the raw per-seed figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = _seed_list(args.seeds)
    started = time.perf_counter()
    results: dict = {
        "scale": args.scale, "seeds": seeds, "family_threshold": args.family_threshold,
        "unlearnable_below": args.unlearnable_below, "threads": args.threads, "tasks": {},
    }

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    tables = []
    for name in (t.strip() for t in args.tasks.split(",") if t.strip()):
        task = make_sft_task(name, args.scale)
        log(f"{name} ({args.scale}): {task.num_samples} training samples, {task.epochs} epochs")
        per_seed = [
            run_seed(task, seed, family_threshold=args.family_threshold, unlearnable_below=args.unlearnable_below, log=log)
            for seed in seeds
        ]
        results["tasks"][name] = {"families": list(task.families), "seeds": per_seed}
        tables.append(report(name, args.scale, task.families, per_seed))
    results["wall_seconds"] = time.perf_counter() - started
    print("\n\n".join(tables))
    print(f"\nwall time {results['wall_seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
