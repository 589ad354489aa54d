"""One training run of a task under one policy, with honest accounting.

Every run counts the samples actually forwarded and back-propagated — for language models
also their label (response) tokens, the unit LLM compute is paid in — and times the training
loop (evaluation excluded). "full" is plain PyTorch training with no geko_core in the loop:
the baseline for wall-clock. Every policy sees the same model initialisation, optimiser and
learning-rate schedule (cosine over training progress measured in epochs).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import GekoConfig
from ..selector import Selector
from .base import CNN1D, Task

__all__ = ["bench_policy_options", "run_one", "warm_up"]

# Samples per forward pass when the runner computes angles or embeddings for a policy.
_SIDE_CHUNK = 512


def bench_policy_options(policy: str, task: Task, budget: float) -> dict[str, Any] | None:
    """Constructor options of a policy in the benchmark at a given budget (fraction of N).

    GAIN-RL's window is scaled to the data set (sigma = N/10 positions, n = N/20 per move):
    the paper's 1000/500 are for data sets of tens of thousands of prompts.
    """
    n = task.num_samples
    if policy in task.policy_options:
        return dict(task.policy_options[policy])
    if policy == "full_short":
        return {"share": budget}
    if policy == "random_subset":
        # Matched in the unit compute is paid in: tokens for language models.
        return {"budget": budget, "unit": "tokens"} if sample_tokens(task) is not None else {"budget": budget}
    if policy == "gainrl":
        return {"samples_per_epoch": budget, "sigma": max(n / 10.0, 1.0), "n": max(n / 20.0, 1.0)}
    if policy == "grace":
        return {"budget": budget}
    return None


@torch.no_grad()
def _token_states(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``[B, T, d]`` per-position hidden states: for the MNIST-1D CNN its last convolution's
    output (positions x channels); otherwise the output of the last block (via
    ``capture_hidden_states``)."""
    from ..integrations.hidden import capture_hidden_states

    if isinstance(model, CNN1D):
        return model.features(inputs.unsqueeze(1)).transpose(1, 2)
    with capture_hidden_states(model, layer=-1) as capture:
        model(inputs)
    return capture.hidden


def _feed_policy(selector: Selector, model: torch.nn.Module, inputs: torch.Tensor, epoch: int) -> int:
    """Give GAIN-RL its angles (once, from the initial model, as GAIN-RL orders the data
    before training) and GRACE the embeddings it asks for (mean-pooled token states of the
    current model). Returns the samples forwarded to do so."""
    from ..angle import angle_concentration

    policy = selector.policy
    if policy.name == "gainrl" and epoch == 0:
        wanted = np.arange(selector.num_samples, dtype=np.int64)
    elif policy.name == "grace":
        wanted = policy.stale_embeddings()
    else:
        return 0
    was_training = model.training
    model.eval()
    for start in range(0, len(wanted), _SIDE_CHUNK):
        idx = wanted[start : start + _SIDE_CHUNK]
        states = _token_states(model, inputs[torch.from_numpy(idx)])
        if policy.name == "gainrl":
            policy.set_angles(idx, angle_concentration(states).concentration)
        else:
            policy.set_embeddings(idx, states.float().mean(dim=1))
    model.train(was_training)
    return len(wanted)


def warm_up(task: Task) -> None:
    """Run a few untimed steps of the task's model and of the fused loss, so one-time costs
    (thread pools, allocator growth, kernel selection, lazy imports) land in no policy's time."""
    from ..cross_entropy import cross_entropy_with_stats

    model = task.make_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr)
    idx = torch.arange(min(task.batch_size, task.num_samples))
    for fused in (False, True, False, True):
        logits = model(task.inputs[idx])
        if fused:
            loss, _ = cross_entropy_with_stats(logits, task.targets[idx], shift=bool(getattr(task, "shift", False)))
        else:
            loss = _flat_ce(logits, task.targets[idx], bool(getattr(task, "shift", False)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    task.evaluate(model)


def _lr_at(base: float, progress: float) -> float:
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _flat_ce(logits: torch.Tensor, targets: torch.Tensor, shift: bool = False) -> torch.Tensor:
    if shift:  # causal LM: position t predicts the label of position t + 1
        logits, targets = logits[:, :-1], targets[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def sample_tokens(task: Task) -> np.ndarray | None:
    """Label tokens each sample costs (after the causal shift), or None for a classifier."""
    targets = task.targets
    if targets.dim() < 2:
        return None
    if getattr(task, "shift", False):
        targets = targets[:, 1:]
    return (targets != -100).sum(dim=1).numpy().astype(np.int64)


def spent_share(result: dict[str, Any]) -> float:
    """The share of full training's work a run back-propagated: response tokens for a language
    model, samples otherwise (``run_one``'s result)."""
    if result["backpropagated_tokens"] is not None:
        return result["backpropagated_tokens"] / (result["total_tokens"] * result["epochs"])
    return result["backpropagated"] / (result["num_samples"] * result["epochs"])


def run_one(
    task: Task,
    policy: str,
    seed: int,
    *,
    policy_options: dict[str, Any] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``task`` under ``policy`` ("full", "full_short" or a Selector policy) and report.

    ``full_short`` is full training cut to ``policy_options["share"]`` of full training's
    steps, its learning-rate schedule compressed to them (``bench_policy_options`` gives it
    GEKO's measured share).

    Returns:
        A dict with forwarded / backpropagated sample counts, train_seconds, overhead_seconds,
        the final held-out metric, the metric curve against back-propagated samples and, for
        bucket-keeping policies, the bucket counts after every epoch.
    """
    torch.manual_seed(seed)
    model = task.make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    n, epochs, batch = task.num_samples, task.epochs, task.batch_size
    x, y = task.inputs, task.targets
    curve: list[tuple[int, float]] = []
    bucket_flow: list[dict[str, int]] = []
    guard_flow: list[dict[str, Any]] = []  # GEKO's quality guard, per epoch
    forwarded = backpropagated = 0
    tokens = sample_tokens(task)
    forwarded_tokens = backpropagated_tokens = 0
    shift = bool(getattr(task, "shift", False))
    train_seconds = 0.0
    overhead = 0.0
    geko_metrics: dict[str, Any] = {}

    if policy in ("full", "full_short"):
        generator = torch.Generator().manual_seed(seed)
        # full_short: full data for the share of full training's steps a policy spent, the
        # learning-rate schedule compressed to those steps (the data-pruning baseline).
        per_epoch = -(-n // batch)
        total_steps = per_epoch * epochs
        if policy == "full_short":
            share = float((policy_options or {}).get("share", 0.5))
            if not 0.0 < share <= 1.0:
                raise ValueError(f"full_short share must be in (0, 1], got {share}")
            total_steps = max(1, int(round(share * per_epoch * epochs)))
        step = 0
        for epoch in range(-(-total_steps // per_epoch)):
            started = time.perf_counter()
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch):
                if step == total_steps:
                    break
                step += 1
                idx = order[start : start + batch]
                progress = (epoch + start / n) / epochs if policy == "full" else (step - 1) / total_steps
                _set_lr(optimizer, _lr_at(task.lr, progress))
                loss = _flat_ce(model(x[idx]), y[idx], shift)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                forwarded += len(idx)
                backpropagated += len(idx)
                if tokens is not None:
                    spent = int(tokens[idx.numpy()].sum())
                    forwarded_tokens += spent
                    backpropagated_tokens += spent
            train_seconds += time.perf_counter() - started
            curve.append((backpropagated, task.evaluate(model)))
            if on_epoch:
                on_epoch(epoch)
    else:
        config = GekoConfig(**task.config_overrides)
        selector = Selector(
            n, policy=policy, epochs=epochs, seed=seed, config=config, policy_options=policy_options, sample_tokens=tokens,
        )
        side_forwarded = 0  # forward passes made to feed a policy (angles, embeddings)
        for epoch in range(epochs):
            started = time.perf_counter()
            side_forwarded += _feed_policy(selector, model, x, epoch)
            order = np.fromiter(iter(selector.sampler), dtype=np.int64)
            right = counted = 0
            for start in range(0, len(order), batch):
                idx = torch.from_numpy(order[start : start + batch])
                _set_lr(optimizer, _lr_at(task.lr, selector.progress()))
                xb, yb = x[idx], y[idx]
                if selector.policy.meta_batch:
                    with torch.no_grad():
                        meta_logits = model(xb)
                    positions, weights = selector.select(idx, meta_logits, yb, shift=shift)
                    loss = selector.loss(model(xb[positions]), yb[positions], idx[positions], weights=weights, observe=False, shift=shift)
                else:
                    logits = model(xb)
                    loss = selector.loss(logits, yb, idx, shift=shift)
                    if selector.policy.name == "gainrl":
                        with torch.no_grad():
                            right += int((logits.argmax(-1) == yb).sum())
                            counted += yb.numel()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if selector.policy.name == "gainrl" and counted:
                # GAIN-RL's reward: the training (token) accuracy of the round just trained.
                selector.policy.report(right / counted)
            train_seconds += time.perf_counter() - started
            metrics = selector.metrics()
            curve.append((metrics["backpropagated"], task.evaluate(model)))
            bucket_flow.append(dict(metrics["buckets"]))
            if "geko/revisits" in metrics:
                seen = metrics["geko/revisits"] - sum(g["revisits"] for g in guard_flow)
                failed = metrics["geko/failed_revisits"] - sum(g["failed"] for g in guard_flow)
                guard_flow.append({
                    "revisits": seen, "failed": failed, "measured": failed / seen if seen else None,
                    "revisit": float(metrics["geko/rates"][0]) if "geko/rates" in metrics else None,
                })
            if on_epoch:
                on_epoch(epoch)
        final = selector.metrics()
        forwarded, backpropagated = final["forwarded"] + side_forwarded, final["backpropagated"]
        forwarded_tokens, backpropagated_tokens = final["forwarded_tokens"], final["backpropagated_tokens"]
        if tokens is not None and side_forwarded:
            forwarded_tokens += side_forwarded * float(tokens.mean())  # the side passes' forwards, at the mean length
        overhead = final["overhead_seconds"]
        geko_metrics = {k.split("/", 1)[1]: v for k, v in final.items() if k.startswith("geko/") and k != "geko/rates"}

    # Validation figures are the ones to tune on; the table reports the test split.
    validation = task.evaluate_validation(model) if getattr(task, "evaluate_validation", None) else None
    detail = task.evaluate_detail(model, "test") if getattr(task, "evaluate_detail", None) else None
    return {
        "task": task.name,
        "validation_metric": validation,
        "detail": detail,
        "policy": policy,
        "seed": seed,
        "policy_options": policy_options or {},
        "num_samples": n,
        "epochs": epochs,
        "forwarded": int(forwarded),
        "backpropagated": int(backpropagated),
        "forwarded_tokens": int(forwarded_tokens) if tokens is not None else None,
        "backpropagated_tokens": int(backpropagated_tokens) if tokens is not None else None,
        "total_tokens": int(tokens.sum()) if tokens is not None else None,
        "guard": geko_metrics if policy == "geko" else {},
        "train_seconds": train_seconds,
        "overhead_seconds": overhead,
        "overhead_share": overhead / train_seconds if train_seconds > 0 else 0.0,
        "metric_name": task.metric_name,
        "higher_is_better": task.higher_is_better,
        "metric": curve[-1][1],
        "curve": curve,
        "bucket_flow": bucket_flow,
        "guard_flow": guard_flow,
    }
