"""Fused linear cross-entropy + statistics (CPU) against torch, in one run.

At [8192 tokens, d = 1024, V = 32000] in fp32 and bf16:

* forward + backward (``torch.autograd.grad`` with respect to hidden and weight) of
  ``linear_cross_entropy_with_stats`` against ``F.cross_entropy(hidden @ W.T, y)``;
  goals: at least 5x less peak extra memory, and at least as fast;
* the scoring pass (``grad=False``) against forming the logits and calling
  ``sample_stats``; goals: at least 5x less peak extra memory, at least as fast, and at least
  2.5x faster than our forward + backward;
* forward + backward against torch's own chunked ``F.linear_cross_entropy`` (its
  ``LinearCrossEntropyOptions()``: automatic chunking), with the loss options off and on (on:
  label smoothing 0.1 and class weights, the options torch's function has); goals: less peak
  extra memory and at least as fast, both ways. A last row runs ours with every option on
  (also temperature 0.7, soft-capping 30, z-loss 1e-4), which torch has no counterpart of.

Each measurement runs a variant in a fresh subprocess: one untimed run, whose growth of the
peak RSS over the inputs is the peak extra memory, then one timed run. The variants take turns,
``REPEATS`` rounds of them, and each time is the median over the rounds: on shared cores the
load drifts, and taking turns spreads the drift over every variant alike. Each speed goal also
prints the range of its per-round ratios, so the noise is visible beside the median. Ratios are to the
baseline measured in the same run of this script. ``chunk_size`` is left to its default.

Run either way (``GEKO_BENCH_SMALL=1`` for a [1024, 256, 8000] shape that takes seconds,
``GEKO_BENCH_REPEATS`` for the number of timed runs, default 3):
    python benchmarks/bench_linear_loss.py
    pytest benchmarks/bench_linear_loss.py -s
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from geko_core.linear_cross_entropy import linear_cross_entropy_with_stats
from geko_core.stats import sample_stats

SMALL = os.environ.get("GEKO_BENCH_SMALL", "0") not in ("", "0")
TOKENS, DIM, VOCAB = (1024, 256, 8000) if SMALL else (8192, 1024, 32000)
REPEATS = int(os.environ.get("GEKO_BENCH_REPEATS", "3"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, DIM, generator=generator).to(dtype)
    weight = torch.randn(VOCAB, DIM, generator=generator).mul_(DIM**-0.5).mul_(2).to(dtype)  # logits of std ~2
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    return hidden, weight, labels


def ours_train(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss, stats = linear_cross_entropy_with_stats(h, w, labels)
    return torch.autograd.grad(loss, (h, w)), stats


def torch_train(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = F.cross_entropy(h @ w.T, labels)
    return torch.autograd.grad(loss, (h, w))


def _class_weight() -> torch.Tensor:
    return torch.rand(VOCAB, generator=torch.Generator().manual_seed(1)) + 0.5


def torch_chunked_train(head: torch.Tensor, linear_weight: torch.Tensor, labels: torch.Tensor, **options):
    h, w = head.requires_grad_(True), linear_weight.requires_grad_(True)
    loss = F.linear_cross_entropy(h, w, labels, options=torch.nn.LinearCrossEntropyOptions(), **options)
    return torch.autograd.grad(loss, (h, w))


def torch_chunked_options_train(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    return torch_chunked_train(hidden, weight, labels, label_smoothing=0.1, weight=_class_weight().to(hidden.dtype))


def ours_options_train(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **more):
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss, stats = linear_cross_entropy_with_stats(h, w, labels, label_smoothing=0.1, class_weight=_class_weight(), **more)
    return torch.autograd.grad(loss, (h, w)), stats


def ours_all_options_train(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    return ours_options_train(hidden, weight, labels, temperature=0.7, softcap=30.0, z_loss=1e-4)


def ours_score(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    return linear_cross_entropy_with_stats(hidden, weight, labels, grad=False)


def torch_score(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    with torch.no_grad():
        return sample_stats(hidden @ weight.T, labels)


VARIANTS: dict[str, Callable] = {
    "ours fwd+bwd": ours_train,
    "torch linear + CE fwd+bwd": torch_train,
    "ours scoring (grad=False)": ours_score,
    "torch logits + sample_stats": torch_score,
    "torch chunked linear_CE fwd+bwd": torch_chunked_train,
    "ours fwd+bwd, smoothing+weights": ours_options_train,
    "torch chunked, smoothing+weights": torch_chunked_options_train,
    "ours fwd+bwd, every option": ours_all_options_train,
}

_CHILD_SCRIPT = """
import json, sys, time
sys.path.insert(0, {folder!r})
import bench_linear_loss as b

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

hidden, weight, labels = b.make_inputs(b.DTYPES[{dtype!r}])
fn = b.VARIANTS[{name!r}]
peak = None
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    before = status("VmRSS")
    fn(hidden, weight, labels)
    peak = (status("VmHWM") - before) / 1024
except OSError:
    fn(hidden, weight, labels)  # still the untimed first run
start = time.perf_counter()
fn(hidden, weight, labels)
print(json.dumps({{"peak_mb": peak, "seconds": time.perf_counter() - start}}))
"""


def run_variant(name: str, dtype: str) -> dict[str, float | None]:
    """Peak RSS growth (MiB, None where /proc cannot say) and the seconds of one warm run, in a
    fresh process."""
    folder = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT.format(folder=folder, dtype=dtype, name=name)],
        capture_output=True,
        text=True,
        cwd=folder,  # not the repository root, whose geko_core/ folder would shadow the install
    )
    if out.returncode != 0:
        raise RuntimeError(f"variant {name!r} ({dtype}) failed with exit status {out.returncode}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure() -> dict[str, dict[str, dict[str, float | None]]]:
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for dtype in DTYPES:
        rounds = [{name: run_variant(name, dtype) for name in VARIANTS} for _ in range(REPEATS)]
        results[dtype] = {}
        for name in VARIANTS:
            peaks = [r[name]["peak_mb"] for r in rounds if r[name]["peak_mb"] is not None]
            results[dtype][name] = {
                "peak_mb": statistics.median(peaks) if peaks else None,
                "seconds": statistics.median(r[name]["seconds"] for r in rounds),
                "rounds": [r[name]["seconds"] for r in rounds],
            }
    return results


def _round_ratios(base: dict, ours: dict) -> str:
    """The speed ratio of each round (the variants of a round ran back to back), min-max."""
    ratios = [b / o for b, o in zip(base.get("rounds", []), ours.get("rounds", []))]
    return f"rounds x{min(ratios):.2f}-x{max(ratios):.2f}" if ratios else "one round"


def _goal(text: str, met: bool) -> str:
    return f"    goal {text}: {'met' if met else 'NOT met'}"


def _memory_ratio(base: float | None, ours: float | None) -> float | None:
    if base is None or ours is None:
        return None
    return base / max(ours, 1.0)


def report(results: dict[str, dict[str, dict[str, float | None]]]) -> str:
    lines = [
        f"CPU, hidden [{TOKENS}, {DIM}], weight [{VOCAB}, {DIM}] (logits [{TOKENS}, {VOCAB}]), "
        f"{torch.get_num_threads()} threads, median of {REPEATS} rounds"
    ]
    for dtype, rows in results.items():
        lines.append(f"  {dtype}:")
        for name, r in rows.items():
            peak = "n/a" if r["peak_mb"] is None else f"+{r['peak_mb']:.0f} MiB"
            lines.append(f"    {name:30s} {r['seconds'] * 1e3:9.1f} ms   peak RSS {peak}")
        train, base_train = rows["ours fwd+bwd"], rows["torch linear + CE fwd+bwd"]
        score, base_score = rows["ours scoring (grad=False)"], rows["torch logits + sample_stats"]
        mem_train = _memory_ratio(base_train["peak_mb"], train["peak_mb"])
        mem_score = _memory_ratio(base_score["peak_mb"], score["peak_mb"])
        speed_train = base_train["seconds"] / train["seconds"]
        speed_score = base_score["seconds"] / score["seconds"]
        score_vs_train = train["seconds"] / score["seconds"]
        fmt = lambda ratio: "n/a" if ratio is None else f"x{ratio:.2f}"  # noqa: E731
        lines.append(_goal(f"fwd+bwd >= 5x less peak memory than torch ({fmt(mem_train)})", mem_train is not None and mem_train >= 5))
        lines.append(_goal(f"fwd+bwd at least as fast as torch (x{speed_train:.2f}; {_round_ratios(base_train, train)})", speed_train >= 1))
        lines.append(_goal(f"scoring >= 5x less peak memory than logits + sample_stats ({fmt(mem_score)})", mem_score is not None and mem_score >= 5))
        lines.append(_goal(f"scoring at least as fast as logits + sample_stats (x{speed_score:.2f}; {_round_ratios(base_score, score)})", speed_score >= 1))
        lines.append(_goal(f"scoring >= 2.5x faster than our fwd+bwd (x{score_vs_train:.2f}; {_round_ratios(train, score)})", score_vs_train >= 2.5))
        for mine, base, label in (
            ("ours fwd+bwd", "torch chunked linear_CE fwd+bwd", "options off"),
            ("ours fwd+bwd, smoothing+weights", "torch chunked, smoothing+weights", "smoothing + class weights"),
        ):
            memory = _memory_ratio(rows[base]["peak_mb"], rows[mine]["peak_mb"])
            speed = rows[base]["seconds"] / rows[mine]["seconds"]
            lines.append(_goal(f"{label}: less peak memory than torch's chunked linear_cross_entropy ({fmt(memory)})", memory is not None and memory > 1))
            lines.append(_goal(f"{label}: at least as fast as torch's chunked linear_cross_entropy (x{speed:.2f}; {_round_ratios(rows[base], rows[mine])})", speed >= 1))
    return "\n".join(lines)


def test_bench_linear_cross_entropy_cpu() -> None:
    results = measure()
    print("\n" + report(results))
    for rows in results.values():
        for r in rows.values():
            assert r["seconds"] > 0


if __name__ == "__main__":
    print(report(measure()), flush=True)
