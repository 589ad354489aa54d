"""Fused per-token log-probabilities + entropy (CPU) against the plain log-softmax path, in one run.

At [4096 tokens, d = 1024, V = 32000] in fp32 and bf16, forward + backward
(``torch.autograd.grad`` with respect to hidden and weight) of a GRPO-style objective
``-(logprobs * advantages).mean() - 0.01 * entropy.mean()`` at temperature 0.9:

* ``linear_logprobs(hidden, weight, ids, temperature=0.9)``, against
* the plain path: ``logp = log_softmax(hidden @ W.T / 0.9)``, ``logp.gather(-1, ids)`` and
  ``-(logp.exp() * logp).sum(-1)`` (in the input dtype, as it is usually written).

Goals (issue 24): at least 5x less peak extra memory, at least as fast.

Each measurement runs a variant in a fresh subprocess: one untimed run, whose growth of the
peak RSS (``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over the
inputs is the peak extra memory, then one timed run. The variants take turns, ``REPEATS``
rounds of them, and each figure is the median over the rounds; each speed goal also prints the
range of its per-round ratios. ``chunk_size`` is left to its default.

Run either way (``GEKO_BENCH_SMALL=1`` for a [1024, 256, 8000] shape that takes seconds,
``GEKO_BENCH_TOKENS`` to change the number of tokens, ``GEKO_BENCH_DTYPES=fp32`` or ``bf16``
for one dtype, ``GEKO_BENCH_REPEATS`` for the number of rounds, default 3):
    python benchmarks/bench_linear_logprobs.py
    pytest benchmarks/bench_linear_logprobs.py -s
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from geko_core.linear_logprobs import linear_logprobs

SMALL = os.environ.get("GEKO_BENCH_SMALL", "0") not in ("", "0")
TOKENS, DIM, VOCAB = (1024, 256, 8000) if SMALL else (4096, 1024, 32000)
TOKENS = int(os.environ.get("GEKO_BENCH_TOKENS", TOKENS))
REPEATS = int(os.environ.get("GEKO_BENCH_REPEATS", "3"))
TEMPERATURE = 0.9
DTYPES = {
    name: dtype
    for name, dtype in {"fp32": torch.float32, "bf16": torch.bfloat16}.items()
    if name in os.environ.get("GEKO_BENCH_DTYPES", "fp32,bf16").split(",")
}


def make_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, DIM, generator=generator).to(dtype)
    weight = torch.randn(VOCAB, DIM, generator=generator).mul_(DIM**-0.5).mul_(2).to(dtype)  # logits of std ~2
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    advantages = torch.randn(TOKENS, generator=generator)
    return hidden, weight, ids, advantages


def _objective(logprobs: torch.Tensor, entropy: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    return -(logprobs.float() * advantages).mean() - 0.01 * entropy.float().mean()


def ours(hidden, weight, ids, advantages):
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    logprobs, entropy = linear_logprobs(h, w, ids, temperature=TEMPERATURE)
    return torch.autograd.grad(_objective(logprobs, entropy, advantages), (h, w))


def plain(hidden, weight, ids, advantages):
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    logp = torch.log_softmax(h @ w.T / TEMPERATURE, dim=-1)
    logprobs = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.autograd.grad(_objective(logprobs, entropy, advantages), (h, w))


VARIANTS: dict[str, Callable] = {"ours fwd+bwd": ours, "plain log_softmax fwd+bwd": plain}

_CHILD_SCRIPT = """
import json, sys, time
sys.path.insert(0, {folder!r})
import {module} as b

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

dtype = b.DTYPES[{dtype!r}]
inputs = b.inputs_of({name!r}, dtype) if hasattr(b, "inputs_of") else b.make_inputs(dtype)
fn = b.VARIANTS[{name!r}]
peak = None
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    before = status("VmRSS")
    fn(*inputs)
    peak = (status("VmHWM") - before) / 1024
except OSError:
    fn(*inputs)  # still the untimed first run
start = time.perf_counter()
fn(*inputs)
print(json.dumps({{"peak_mb": peak, "seconds": time.perf_counter() - start}}))
"""


def run_variant(name: str, dtype: str, module: str = "bench_linear_logprobs") -> dict[str, float | None]:
    """Peak RSS growth (MiB, None where /proc cannot say) and the seconds of one warm run, in a
    fresh process: ``module.VARIANTS[name](*inputs)``, the inputs from ``module.inputs_of(name,
    dtype)`` where the module has it, else ``module.make_inputs(dtype)`` (``dtype`` looked up in
    ``module.DTYPES``); ``module`` is a file of this folder (``bench_rl_logprobs`` uses it too)."""
    folder = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT.format(folder=folder, dtype=dtype, name=name, module=module)],
        capture_output=True,
        text=True,
        cwd=folder,  # not the repository root, whose geko_core/ folder would shadow the install
    )
    if out.returncode != 0:
        raise RuntimeError(f"variant {name!r} ({dtype}) failed with exit status {out.returncode}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    variants: tuple[str, ...] | None = None, dtypes: tuple[str, ...] | None = None, module: str = "bench_linear_logprobs",
    repeats: int | None = None,
) -> dict[str, dict[str, dict]]:
    """``{dtype: {variant: {"peak_mb", "seconds", "rounds"}}}``: the variants take turns, each in
    a fresh process (``run_variant``), ``repeats`` rounds; medians over the rounds. Defaults:
    this file's variants, dtypes and ``REPEATS``."""
    variants = tuple(VARIANTS) if variants is None else variants
    results: dict[str, dict[str, dict]] = {}
    for dtype in DTYPES if dtypes is None else dtypes:
        rounds = [{name: run_variant(name, dtype, module) for name in variants} for _ in range(repeats or REPEATS)]
        results[dtype] = {}
        for name in variants:
            peaks = [r[name]["peak_mb"] for r in rounds if r[name]["peak_mb"] is not None]
            results[dtype][name] = {
                "peak_mb": statistics.median(peaks) if peaks else None,
                "seconds": statistics.median(r[name]["seconds"] for r in rounds),
                "rounds": [r[name]["seconds"] for r in rounds],
            }
    return results


def report(results: dict[str, dict[str, dict]]) -> str:
    lines = [
        f"CPU, hidden [{TOKENS}, {DIM}], weight [{VOCAB}, {DIM}] (logits [{TOKENS}, {VOCAB}]), temperature "
        f"{TEMPERATURE}, {torch.get_num_threads()} threads, median of {REPEATS} rounds in fresh processes"
    ]
    for dtype, rows in results.items():
        lines.append(f"  {dtype}:")
        for name, r in rows.items():
            peak = "n/a" if r["peak_mb"] is None else f"+{r['peak_mb']:.0f} MiB"
            lines.append(f"    {name:28s} {r['seconds'] * 1e3:9.1f} ms   peak RSS {peak}")
        mine, base = rows["ours fwd+bwd"], rows["plain log_softmax fwd+bwd"]
        memory = None if base["peak_mb"] is None or mine["peak_mb"] is None else base["peak_mb"] / max(mine["peak_mb"], 1.0)
        speed = base["seconds"] / mine["seconds"]
        ratios = [b / o for b, o in zip(base["rounds"], mine["rounds"])]
        met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        mem_text = "n/a" if memory is None else f"x{memory:.2f}"
        lines.append(f"    goal >= 5x less peak memory than the plain path ({mem_text}): {met(memory is not None and memory >= 5)}")
        lines.append(
            f"    goal at least as fast as the plain path (x{speed:.2f}; rounds x{min(ratios):.2f}-x{max(ratios):.2f}): {met(speed >= 1)}"
        )
    return "\n".join(lines)


def test_bench_linear_logprobs_cpu() -> None:
    results = measure()
    print("\n" + report(results))
    for rows in results.values():
        for r in rows.values():
            assert r["seconds"] > 0


if __name__ == "__main__":
    print(report(measure()), flush=True)
