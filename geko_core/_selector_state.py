"""What a Selector reports and saves: its metrics, the entry its history keeps per epoch,
its state dict, and the restore that refuses a mismatched state and then changes nothing.
Each function takes the Selector (``geko_core.selector.Selector``) as ``sel``; the module
does not import it (the Selector imports this module)."""

from __future__ import annotations

from typing import Any

from ._counters import STATE_FORMAT_VERSION, parse_state
from .config import BUCKET_NAMES

__all__ = ["epoch_entry", "load_selector_state", "selector_metrics", "selector_state"]


def selector_metrics(sel: Any) -> dict[str, Any]:
    """Bucket counts, samples forwarded / back-propagated, saved fraction, phase, and the
    wall-clock of the Selector's calls (``overhead_seconds``: the whole ``loss``,
    ``select``, ``observe``, ``weights`` calls and planning, as a training loop pays them).
    Changes nothing: on a GPU the table (so the bucket counts) is one batch behind until
    the next batch, the epoch's end or ``state_dict`` applies it."""
    counters = sel._counters
    counts = sel.table.bucket_counts()
    full = sel.epoch_progress() * sel.num_samples / sel.num_replicas
    plan = sel._epochs.plan
    out: dict[str, Any] = {
        "epoch": sel.epoch,
        "step": sel._step,
        "progress": sel.progress(),
        "policy": sel.policy.name,
        "buckets": {name: int(counts[name]) for name in BUCKET_NAMES},
        "forwarded": counters.forwarded,
        "backpropagated": counters.backpropagated,
        "saved_fraction": (1.0 - counters.backpropagated / full) if full > 0 else 0.0,
        "forwarded_tokens": counters.tokens_of("forwarded"),
        "backpropagated_tokens": counters.tokens_of("backpropagated"),
        "epoch_length": len(plan) if plan is not None else None,
        "nonfinite_skipped": int(getattr(sel.table, "nonfinite_skipped", 0)),
        "overhead_seconds": counters.seconds["total"],
        "planning_seconds": counters.seconds["planning"],
        "seconds": {name: value for name, value in counters.seconds.items() if name != "total"},
    }
    if sel.context.sample_tokens is not None:
        full_tokens = sel.epoch_progress() * float(sel.context.sample_tokens.sum()) / sel.num_replicas
        out["saved_token_fraction"] = (1.0 - out["backpropagated_tokens"] / full_tokens) if full_tokens > 0 else 0.0
    if sel._rewards is not None:
        out.update(sel._rewards.metrics(sel))
    curriculum = getattr(sel.policy, "curriculum", None)
    if curriculum is not None:
        out["phase"] = curriculum.phase(sel.progress())[1]
    out.update({f"{sel.policy.name}/{k}": v for k, v in sel.policy.metrics().items()})
    return out


def epoch_entry(sel: Any) -> dict[str, Any]:
    """The history's entry of the epoch that just ran (its metrics and its own counts); the
    counters then start the next epoch."""
    entry = selector_metrics(sel)
    counters = sel._counters
    entry["epoch_forwarded"] = counters.forwarded - counters.epoch_start[0]
    entry["epoch_backpropagated"] = counters.backpropagated - counters.epoch_start[1]
    entry["epoch_backpropagated_tokens"] = entry["backpropagated_tokens"] - (sel.history[-1]["backpropagated_tokens"] if sel.history else 0)
    counters.new_epoch()
    return entry


def selector_state(sel: Any) -> dict[str, Any]:
    """Everything needed to continue exactly: table, policy state, epoch, the epoch's plan
    with the position training reached, step and counters (plain arrays and numbers).
    Applies the queued statistics to the table first.

    The position counts samples *trained on*, not samples a DataLoader has prefetched, so
    a state saved at any point resumes with the next batch training would have seen."""
    sel._queue.apply()
    counters, seconds = sel._counters.state_dict()
    return {
        "format_version": STATE_FORMAT_VERSION,
        "num_samples": sel.num_samples,
        "signal": sel.signal,
        "policy": sel.policy.name,
        "policy_state": sel.policy.state_dict(),
        "table": sel.table.state_dict(),
        "seed": sel.seed,
        "num_replicas": sel.num_replicas,
        "rank": sel.rank,
        **sel._epochs.state_dict(),
        "step": sel._step,
        "explicit_steps": sel._explicit_steps,
        "counters": counters,
        "seconds": seconds,
        "history": [dict(h) for h in sel.history],
    }


def load_selector_state(sel: Any, state: dict[str, Any]) -> None:
    """Restore a ``Selector.state_dict``; refuses a mismatched one and then changes nothing."""
    saved_signal = state.get("signal", "logits") if isinstance(state, dict) else None
    if saved_signal is not None and saved_signal != sel.signal:
        raise ValueError(f"Selector state is from a Selector in {saved_signal} mode, this one runs in {sel.signal} mode")
    parsed = parse_state(state, num_samples=sel.num_samples, policy=sel.policy.name, num_replicas=sel.num_replicas, rank=sel.rank)
    step, explicit_steps, counters, history, table_state, policy_state, (epoch, plan, batch_seen) = parsed
    # Validate the table and policy state on scratch copies first: nothing changes on error.
    from .table import SampleTable

    scratch = SampleTable(sel.num_samples, sel.config) if sel._rewards is None else sel._rewards.new_table(sel.num_samples)
    scratch.load_state_dict(table_state)
    before_policy = sel.policy.state_dict()
    try:
        sel.policy.load_state_dict(policy_state)
        sel.table.load_state_dict(table_state)
    except Exception as exc:
        # A policy may have replaced part of its state before refusing the rest.
        sel.policy.load_state_dict(before_policy)
        if isinstance(exc, KeyError):
            raise ValueError(f"Selector state's policy_state is missing {exc}") from None
        raise
    sel._queue.clear()
    sel._epochs.install(epoch, plan, batch_seen)
    sel._last_batch = None
    sel._step = step
    sel._explicit_steps = explicit_steps
    sel._counters = counters
    sel.history = history
