"""Fused cross-entropy + statistics (CPU, forward + backward) against torch, in one run.

Issue 4: at [4096, 32000] fp32, ``cross_entropy_with_stats`` forward + backward against
* torch's ``F.cross_entropy`` forward + backward followed by a separate ``sample_stats``
  call (what a user does without the fused op), and
* torch's ``F.cross_entropy`` forward + backward alone (goal: faster than this, with the
  statistics for free).
Gradients are taken with ``torch.autograd.grad`` (no ``.grad`` accumulation copy), as for
non-leaf logits in a model. Peak memory is the growth of the process's peak RSS over the
inputs, each variant in a fresh subprocess.

Every variant that allocates a logits-sized buffer pays its first-touch page faults, which
dominate on machines with slow faults (VMs); ``THP_MEM_ALLOC_ENABLE=1`` (torch's
transparent-huge-page allocation) removes most of that for every variant alike.

Run either way:
    python benchmarks/bench_loss.py
    pytest benchmarks/bench_loss.py -s
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from geko_core.cross_entropy import cross_entropy_with_stats
from geko_core.stats import sample_stats

SHAPE = (4096, 32000)


def make_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*SHAPE, generator=generator).mul_(3)  # in place: no second copy in the peak
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=generator)
    return logits, labels


def geko_fused(logits: torch.Tensor, labels: torch.Tensor, inplace: bool = False):
    x = logits.requires_grad_(True)
    loss, stats = cross_entropy_with_stats(x, labels, inplace_backward=inplace)
    (grad,) = torch.autograd.grad(loss, x)
    return grad, stats


def torch_then_stats(logits: torch.Tensor, labels: torch.Tensor):
    x = logits.requires_grad_(True)
    loss = F.cross_entropy(x, labels)
    (grad,) = torch.autograd.grad(loss, x)
    return grad, sample_stats(x.detach(), labels)


def torch_alone(logits: torch.Tensor, labels: torch.Tensor):
    x = logits.requires_grad_(True)
    loss = F.cross_entropy(x, labels)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


VARIANTS: dict[str, Callable] = {
    "geko fused": geko_fused,
    "geko fused, inplace_backward": lambda x, y: geko_fused(x, y, inplace=True),
    "torch CE + sample_stats": torch_then_stats,
    "torch CE alone": torch_alone,
}


def median_seconds(name: str, repeats: int = 5) -> float:
    logits, labels = make_inputs()
    fn = VARIANTS[name]
    times = []
    for i in range(repeats + 1):
        # In-place backward overwrites the logits: every round starts from a fresh copy.
        x = logits.clone()
        start = time.perf_counter()
        fn(x, labels)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


_PEAK_SCRIPT = """
import sys
sys.path.insert(0, {folder!r})
import bench_loss as b

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

x, y = b.make_inputs()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark to the current RSS
before = status("VmRSS")
b.VARIANTS[{name!r}](x, y)
print((status("VmHWM") - before) / 1024)
"""


def peak_rss_growth_mb(name: str) -> float | None:
    """Peak RSS growth (MiB) over the inputs of one forward + backward, in a fresh process.

    Linux only (reads /proc/self/status and resets the mark through /proc/self/clear_refs);
    None elsewhere or when the kernel refuses the reset.
    """
    folder = str(__import__("pathlib").Path(__file__).parent)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT.format(folder=folder, name=name)],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return None


def measure() -> dict[str, dict[str, float]]:
    results = {name: {"seconds": median_seconds(name)} for name in VARIANTS}
    for name in VARIANTS:
        results[name]["peak_mb"] = peak_rss_growth_mb(name)
    return results


def report(results: dict[str, dict[str, float]]) -> str:
    logits_mb = SHAPE[0] * SHAPE[1] * 4 / 2**20
    base = results["torch CE alone"]["seconds"]
    with_stats = results["torch CE + sample_stats"]["seconds"]
    lines = [
        f"CPU forward + backward, [{SHAPE[0]}, {SHAPE[1]}] fp32 (logits {logits_mb:.0f} MiB), "
        f"{torch.get_num_threads()} threads"
    ]
    for name, r in results.items():
        peak = "n/a" if r["peak_mb"] is None else f"+{r['peak_mb']:.0f} MiB"
        lines.append(
            f"  {name:30s} {r['seconds'] * 1e3:8.1f} ms   x{base / r['seconds']:5.2f} vs CE alone   "
            f"x{with_stats / r['seconds']:5.2f} vs CE + stats   peak RSS {peak}"
        )
    return "\n".join(lines)


def test_bench_cross_entropy_cpu(benchmark) -> None:
    results = measure()
    print("\n" + report(results))
    benchmark.extra_info.update({k: v for k, v in results.items()})
    logits, labels = make_inputs()
    benchmark.pedantic(lambda: geko_fused(logits.clone(), labels), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    print(report(measure()), flush=True)
