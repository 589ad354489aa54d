"""Learning curves of plain full training on the fine-tuning tasks, and the training loop the
oracle schedules (``sft_oracle.py``) thin.

    python benchmarks/sft_curves.py sft-algo --scale quick [--seeds 0,1,2] [--split validation]

prints, per seed, every family's exact match (and the response perplexity) after every epoch
of plain full training (``train_full``), the run geko-bench's "full" policy makes. Research
tooling: it is not installed with the package.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from geko_core.bench.runner import _flat_ce, _lr_at
from geko_core.bench.base import Task
from geko_core.bench.tasks import make_task

__all__ = ["main", "train_full"]


def train_full(
    task: Task,
    seed: int = 0,
    *,
    on_epoch: Callable[[int, nn.Module], None] | None = None,
    skip: np.ndarray | None = None,
) -> nn.Module:
    """Plain full training of a fine-tuning task as geko-bench's "full" runs it: AdamW, the
    runner's cosine schedule, a fresh shuffle per epoch, the causal shift and the label mask.
    ``on_epoch(epoch, model)`` is called after every epoch.

    ``skip``: bool ``[epochs, N]``, samples left out of an epoch (neither forwarded nor
    back-propagated; ``benchmarks/sft_oracle.py``). Every epoch still draws its shuffle, so
    the kept samples come in the full run's order, and the learning rate follows the epoch's
    own progress over what it keeps; an epoch that keeps nothing takes no step. Every kept
    sample is trained exactly once in its epoch."""
    n = task.num_samples
    if skip is not None and (skip.dtype != np.bool_ or skip.shape != (task.epochs, n)):
        raise ValueError(f"skip must be bool [epochs, N] = [{task.epochs}, {n}], got {skip.dtype} {list(skip.shape)}")
    torch.manual_seed(seed)
    model = task.make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=task.lr, weight_decay=task.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(task.epochs):
        order = torch.randperm(n, generator=generator)
        if skip is not None and skip[epoch].any():
            order = order[torch.from_numpy(~skip[epoch])[order]]
        m = len(order)
        for start in range(0, m, task.batch_size):
            idx = order[start : start + task.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(task.lr, (epoch + start / m) / task.epochs)
            loss = _flat_ce(model(task.inputs[idx]), task.targets[idx], task.shift)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/sft_curves.py", description="Per-family exact match of plain full training, after every epoch.")
    parser.add_argument("task", choices=("sft-algo", "sft-stdlib"))
    parser.add_argument("--scale", default="quick", choices=("smoke", "quick", "default"))
    parser.add_argument("--seeds", default="0", help="comma list of seeds")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = make_task(args.task, args.scale)
    print(f"{task.name} ({args.scale}): {task.num_samples} train samples, {task.epochs} epochs; built in {time.perf_counter() - started:.1f}s")
    for seed in (int(s) for s in args.seeds.split(",")):
        header = f"{'epoch':>5} " + " ".join(f"{f:>8}" for f in task.families) + f" {'all':>8} {'ppl':>6} {'elapsed':>7}"
        print(f"\nseed {seed}, {args.split} exact match % per family\n{header}")
        began = time.perf_counter()

        def report(epoch: int, model: nn.Module, began: float = began) -> None:
            figures = task.evaluate_detail(model, args.split)
            cells = " ".join(f"{figures['families'][f]['exact_match_%']:8.1f}" for f in task.families)
            print(f"{epoch:>5} {cells} {figures['exact_match_%']:8.1f} {figures['perplexity']:6.2f} {time.perf_counter() - began:6.1f}s", flush=True)

        train_full(task, seed, on_epoch=report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
