"""examples/sft_stdlib.py end to end at its tiny size: a plain Trainer and GekoTrainer fine-tune
the same pre-trained byte-level LLaMA; the printed counts and metrics are checked."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "sft_stdlib.py"
#: the example's tiny size, smaller still than --quick alone: a 12-step pre-training
QUICK = ("--quick", "--num-train", "80", "--num-test", "40", "--pretrain-steps", "12")
NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|nan|inf))"


def run_quick(cache: Path, *extra: str) -> str:
    env = {**os.environ, "GEKO_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *QUICK, *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_row(out: str, run: str) -> list[float]:
    """tokens, saved %, seconds, exact match %, perplexity of one row of the summary table."""
    found = re.search(rf"^{run} +{NUMBER} +{NUMBER}% +{NUMBER} +{NUMBER} +{NUMBER}$", out, re.M)
    assert found, f"no table row for {run!r} in:\n{out}"
    return [float(v) for v in found.groups()]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, str]:
    """One quick run in a fresh cache directory (it pre-trains there): the directory and its output."""
    cache = tmp_path_factory.mktemp("geko_cache")
    return cache, run_quick(cache)


def test_quick_run_prints_counted_tokens_and_finite_metrics(quick):
    cache, out = quick
    header = re.search(r"\((\d+) response tokens in the training set\).*; (\d+) epochs", out)
    assert header, out
    response_tokens, epochs = int(header.group(1)), int(header.group(2))
    assert response_tokens > 0 and epochs == 2

    plain = table_row(out, "plain")
    geko = table_row(out, "geko")
    for row in (plain, geko):
        assert all(math.isfinite(v) for v in row), row
        assert 0.0 <= row[3] <= 100.0 and row[4] >= 1.0
    # The plain run trains every response token in every epoch, and says so.
    assert plain[0] == response_tokens * epochs
    assert plain[1] == 0.0
    assert f"= {response_tokens * epochs}; counted [{response_tokens * epochs}] (equal)" in out
    # GekoTrainer never trains more than that here, and its Selector counts what the collator saw.
    assert 0 < geko[0] <= plain[0]
    assert geko[1] == pytest.approx(100.0 * (1.0 - geko[0] / plain[0]), abs=0.06)
    agree = re.search(r"^  geko: collator \[(\d+)\], Selector back-propagated \[(\d+)\], forwarded \[(\d+)\] \(agree\)$", out, re.M)
    assert agree, out
    assert int(agree.group(1)) == int(agree.group(2)) == int(agree.group(3)) == int(geko[0])
    per_epoch = re.search(r"geko response tokens per epoch \(seed 0\): \[([\d, ]+)\]; plain: \[([\d, ]+)\]", out)
    assert per_epoch, out
    assert sum(int(v) for v in per_epoch.group(1).split(",")) == int(geko[0])
    assert [int(v) for v in per_epoch.group(2).split(",")] == [response_tokens] * epochs

    for run in ("plain", "geko"):
        family_line = re.search(rf"^  {run} +(.+)$", out, re.M)
        assert family_line, out
        values = re.findall(r"(?:private|kind|count|defname|docname) " + NUMBER, family_line.group(1))
        assert len(values) == 5 and all(0.0 <= float(v) <= 100.0 for v in values), family_line.group(0)
    assert "comparison: geko back-propagated" in out
    # One seed: the script does not pretend to know the spread.
    assert "cannot be told from noise" in out
    # The pre-trained checkpoint went to the cache directory the environment names.
    cached = list(cache.glob("stdlib_llama_h64_l2_a4_t64_s12_*.pt.ck"))
    assert len(cached) == 1


def test_second_run_reads_the_cached_checkpoint_and_reports_the_spread(quick, monkeypatch, capsys):
    # In this process (the subprocess above already covered the command line): importing
    # transformers again in a fresh interpreter would double the test's time.
    cache, _ = quick
    cached = next(cache.glob("stdlib_llama_*.pt.ck"))
    stamp = cached.stat().st_mtime_ns
    monkeypatch.setenv("GEKO_CACHE_DIR", str(cache))
    spec = importlib.util.spec_from_file_location("sft_stdlib_example", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclass looks its module up there
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    verbosity = transformers.logging.get_verbosity()
    try:
        assert script.main([*QUICK, "--seeds", "2", "--epochs", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
    out = capsys.readouterr().out
    assert cached.stat().st_mtime_ns == stamp  # read, not trained and written again
    header = re.search(r"\((\d+) response tokens in the training set\)", out)
    assert header, out
    rows = {}
    for run in ("plain", "geko"):
        # tokens, saved, seconds, exact match and perplexity, each as mean ± std over 2 seeds
        found = re.search(rf"^{run} +" + r" +".join([rf"{NUMBER} ± {NUMBER}%?"] * 5) + "$", out, re.M)
        assert found, f"no mean ± std row for {run!r} in:\n{out}"
        rows[run] = [float(v) for v in found.groups()]
        assert all(math.isfinite(v) for v in rows[run]), rows[run]
    # One epoch of plain training is every response token, in every seed (no spread).
    assert rows["plain"][0:2] == [float(header.group(1)), 0.0]
    assert rows["geko"][0] <= rows["plain"][0]
    verdict = re.search(
        r"verdict: the exact-match difference ([-+]\d+\.\d) pt is (within|outside) the seed spread \(±(\d+\.\d) pt over 2 seeds\)", out
    )
    assert verdict, out
    delta = rows["geko"][6] - rows["plain"][6]
    spread = math.hypot(rows["plain"][7], rows["geko"][7])
    assert float(verdict.group(1)) == pytest.approx(delta, abs=0.11)
    assert float(verdict.group(3)) == pytest.approx(spread, abs=0.11)
    if abs(abs(delta) - spread) > 0.2:  # away from the boundary, where rounding could decide
        assert verdict.group(2) == ("within" if abs(delta) <= spread else "outside")
    assert "cannot be told from noise" not in out
