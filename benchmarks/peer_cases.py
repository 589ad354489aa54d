"""Counts of the peers' test cases by how they end (docs/linear_loss.md, "Peers' cases").

Runs ``tests/test_peer_cases*.py`` (PyTorch's, Liger-Kernel's and cut-cross-entropy's cases
re-expressed against our losses) and prints, per peer: the cases checked against the torch
reference, those refused with a named reason, those skipped as unsupported (by documented
reason), those waiting for a feature built in parallel (by feature), and any failure (a case
whose value is wrong, or that crashed), each failure by name.

    python benchmarks/peer_cases.py [extra pytest arguments]

Exit status: pytest's (0 when no case failed).
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
FILES = [str(TESTS / name) for name in ("test_peer_cases_torch.py", "test_peer_cases_liger.py", "test_peer_cases_cce.py")]
PEERS = {"test_torch_": "torch", "test_liger_": "liger", "test_cce_": "cce"}


def _peer(nodeid: str) -> str:
    name = nodeid.split("::")[-1]
    return next((peer for prefix, peer in PEERS.items() if name.startswith(prefix)), "other")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


class Counter:
    """A pytest plugin: each case's ending, from its reports."""

    def __init__(self) -> None:
        self.endings: dict[str, str] = {}
        self.failures: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report) -> None:
        peer = _peer(report.nodeid)
        if report.skipped:
            reason = _skip_reason(report)
            if reason.startswith("unsupported-documented: "):
                ending = "unsupported: " + reason.split(": ", 1)[1].split(" ", 1)[0]
            elif reason.startswith("needs "):
                ending = "pending: " + reason.split(" (")[0].removeprefix("needs ")
            else:
                ending = "skipped (other): " + reason
            self.endings[report.nodeid] = f"{peer}|{ending}"
        elif report.failed:
            self.endings[report.nodeid] = f"{peer}|FAILED"
            message = str(report.longrepr).strip().splitlines()
            line = next((m for m in message if m.startswith("E ")), message[-1] if message else "")
            self.failures.append((report.nodeid, line))
        elif report.when == "call":
            category = dict(report.user_properties).get("category", "passed without a category")
            self.endings[report.nodeid] = f"{peer}|{category}"

    def table(self) -> str:
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for value in self.endings.values():
            peer, ending = value.split("|", 1)
            counts[peer][ending] += 1
        lines = []
        grand = collections.Counter()
        for peer in ("torch", "liger", "cce", "other"):
            if peer not in counts:
                continue
            c = counts[peer]
            total = sum(c.values())
            lines.append(f"{peer}: {total} cases")
            for ending in sorted(c, key=lambda e: (_order(e), e)):
                lines.append(f"    {c[ending]:4d}  {ending}")
            for ending, n in c.items():
                grand[_group(ending)] += n
        total = sum(grand.values())
        lines.append(f"all peers: {total} cases")
        for group in ("checked", "refused", "unsupported", "pending", "FAILED", "other"):
            if grand[group]:
                lines.append(f"    {grand[group]:4d}  {group} ({100 * grand[group] / total:.1f}%)")
        if self.failures:
            lines.append("failures:")
            lines += [f"    {nodeid}\n        {line}" for nodeid, line in self.failures]
        return "\n".join(lines)


def _group(ending: str) -> str:
    for group in ("checked", "refused", "unsupported", "pending", "FAILED"):
        if ending.startswith(group):
            return group
    return "other"


def _order(ending: str) -> int:
    return ("checked", "refused", "unsupported", "pending", "FAILED", "other").index(_group(ending))


def main(argv: list[str]) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    counter = Counter()
    status = pytest.main(["-q", "-p", "no:cacheprovider", *FILES, *argv], plugins=[counter])
    print()
    print(counter.table())
    return int(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
