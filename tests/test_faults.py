"""Fault injection: processes killed while saving, corrupt checkpoint files, a failing rank.

* A process SIGKILLed at a random moment while it saves a SampleTable checkpoint over an
  existing one always leaves a checkpoint that loads and holds exactly the state of one of
  its completed saves (never a mix, never an older one than the last completed save).
* Every truncation and every single-bit flip of a checkpoint file is refused with
  ``CheckpointError`` and leaves the loading table unchanged (CRC32 over the whole file).
  The Selector's state file (``geko_core.checkpoint``, used by GekoTrainer) refuses
  truncations and every bit flip that changes its content.
* In a 2-process gloo run where one rank raises before the Selector's all-gather, the
  other rank raises once the process group's ``timeout`` expires (or as soon as gloo sees
  the peer's connection close) instead of waiting forever.

``GEKO_FAULT_KILLS`` (default 24) sets how many forked savers are killed; a tenth of that
(at least 2) are fresh interpreters started with subprocess. ``GEKO_FAULT_FLIPS`` (default
400) sets how many bit flips of a Selector state file are tried.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch

from geko_core.checkpoint import CHECKSUM_KEY, content_crc32, load_verified, save_verified
from geko_core.selector import Selector
from geko_core.table import CheckpointError, SampleTable

KILLS = int(os.environ.get("GEKO_FAULT_KILLS", "24"))
FLIPS = int(os.environ.get("GEKO_FAULT_FLIPS", "400"))  # bit flips of the Selector state file
NUM_SAMPLES = 40_000  # 1.3 MB per checkpoint: a save takes long enough to be hit mid-write
BATCH = 512


def _batch(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The k-th batch of the deterministic update sequence (k >= 1)."""
    rng = np.random.default_rng(k)
    indices = rng.integers(0, NUM_SAMPLES, BATCH)
    loss = rng.uniform(0, 4, BATCH).astype(np.float32)
    confidence = rng.uniform(0, 1, BATCH).astype(np.float32)
    correct = (rng.uniform(0, 1, BATCH) < 0.5).astype(np.float32)
    return indices, loss, confidence, correct


def _saver(path: str, completed, in_save) -> None:
    """Continue the update sequence from the checkpoint at ``path``, saving after each batch."""
    table = SampleTable.from_file(path)
    k = table.updates_applied // BATCH
    while True:
        k += 1
        table.update(*_batch(k), step=k)
        in_save.value = 1
        table.save(path)
        in_save.value = 0
        completed.value = k


class _Replay:
    """The state after k batches, computed incrementally in this process."""

    def __init__(self) -> None:
        self.table, self.k = SampleTable(NUM_SAMPLES), 0

    def state(self, k: int) -> dict:
        assert k >= self.k, f"the checkpoint went back from {self.k} batches to {k}"
        while self.k < k:
            self.k += 1
            self.table.update(*_batch(self.k), step=self.k)
        return self.table.state_dict()


def _assert_checkpoint_is(path, replay: _Replay, at_least: int) -> int:
    loaded = SampleTable.from_file(path)  # must load: never torn, never missing
    k, rest = divmod(loaded.updates_applied, BATCH)
    assert rest == 0 and k >= at_least, (loaded.updates_applied, at_least)
    expected = replay.state(k)
    got = loaded.state_dict()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        else:
            assert got[key] == value, key
    return k


def _stale_temporaries(directory) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_kill_during_save_keeps_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "table.gkt")
    SampleTable(NUM_SAMPLES).save(path)
    replay, rng = _Replay(), random.Random(0)
    context = multiprocessing.get_context("fork")  # a forked child starts in microseconds
    landed_in_save = 0
    last = 0
    for _ in range(KILLS):
        completed = context.Value("q", 0, lock=False)
        in_save = context.Value("b", 0, lock=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (Python >= 3.12)
            child = context.Process(target=_saver, args=(path, completed, in_save), daemon=True)
            child.start()
        time.sleep(rng.uniform(0.0, 0.08))
        landed_in_save += in_save.value
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        last = _assert_checkpoint_is(path, replay, at_least=max(last, completed.value))
    # Killed writers leave their temporary file behind (never under the checkpoint's name);
    # the checkpoint itself is whole. At least some kills must have hit a save mid-write.
    print(f"{KILLS} kills, {landed_in_save} inside save(), {last} batches saved")
    assert landed_in_save > 0 and last > 0
    assert all(name.startswith(".table.gkt.") for name in _stale_temporaries(tmp_path))


_SUBPROCESS_SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from geko_core.table import SampleTable
    path = sys.argv[1]
    table = SampleTable.from_file(path)
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        n = table.num_samples
        table.update(rng.integers(0, n, 256), rng.uniform(0, 4, 256), rng.uniform(0, 1, 256), rng.uniform(0, 1, 256) < 0.5, 1)
        table.save(path)
        print(table.updates_applied, flush=True)
    """
)


def test_kill_fresh_interpreter_during_save(tmp_path):
    path = str(tmp_path / "table.gkt")
    SampleTable(NUM_SAMPLES).save(path)
    rng = random.Random(1)
    for trial in range(max(2, KILLS // 10)):
        child = subprocess.Popen(
            [sys.executable, "-c", _SUBPROCESS_SAVER, path, str(trial)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.1))
        finally:
            child.kill()
            out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        saved = [int(line) for line in out.split()]
        loaded = SampleTable.from_file(path)
        # the file holds the last completed save, or the one whose rename won the race with the kill
        assert loaded.updates_applied >= (saved[-1] if saved else 0)
        assert loaded.updates_applied % 256 == 0


# -- corrupt files -------------------------------------------------------------------------------


def _saved_table(tmp_path, n: int = 24):
    table = SampleTable(n)
    rng = np.random.default_rng(0)
    table.update(rng.integers(0, n, 64), rng.uniform(0, 3, 64), rng.uniform(0, 1, 64), rng.uniform(0, 1, 64) < 0.5, 5)
    path = tmp_path / "table.gkt"
    table.save(path)
    return table, path


def test_every_truncation_is_refused(tmp_path):
    table, path = _saved_table(tmp_path)
    data = path.read_bytes()
    target = SampleTable(table.num_samples)
    before = target.state_dict()
    broken = tmp_path / "broken.gkt"
    for length in range(len(data)):
        broken.write_bytes(data[:length])
        with pytest.raises(CheckpointError):
            target.load(broken)
        with pytest.raises(CheckpointError):
            SampleTable.from_file(broken)
    broken.write_bytes(data + b"\0")  # and one byte too many
    with pytest.raises(CheckpointError):
        target.load(broken)
    after = target.state_dict()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value)


def test_every_single_bit_flip_is_refused(tmp_path):
    table, path = _saved_table(tmp_path)
    data = path.read_bytes()
    target = SampleTable(table.num_samples)
    target.update(np.arange(4), np.ones(4), np.full(4, 0.5), np.zeros(4), 1)
    before = target.state_dict()
    broken = tmp_path / "broken.gkt"
    rng = random.Random(0)
    for position in range(len(data)):  # every byte, a random bit of it
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        broken.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError):
            target.load(broken)
    after = target.state_dict()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value)
        else:
            assert after[key] == value
    target.load(path)  # the intact file still loads
    np.testing.assert_array_equal(target.field("q"), table.field("q"))


# -- a failing rank in a 2-process gloo run -------------------------------------------------------

_DDP_SCRIPT = textwrap.dedent(
    """
    import datetime, os, sys, time
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    def worker(rank, port, timeout, peer_exits, out_dir):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=timeout))
        from geko_core import Selector
        sel = Selector(16, "geko", epochs=1, seed=0)
        started = time.monotonic()
        try:
            if rank == 1:
                raise RuntimeError("rank 1 fails before the all-gather")
            sel.observe(torch.arange(4), torch.randn(4, 3), torch.zeros(4, dtype=torch.int64))
            outcome = "returned"
        except Exception as exc:
            outcome = type(exc).__name__
        elapsed = time.monotonic() - started
        with open(os.path.join(out_dir, f"rank{rank}.tmp"), "w") as f:
            f.write(f"{outcome} {elapsed:.2f}")
        os.replace(os.path.join(out_dir, f"rank{rank}.tmp"), os.path.join(out_dir, f"rank{rank}"))
        if rank == 1 and not peer_exits:
            # stay alive (the connection stays open) until rank 0 has given up: it must rely on the timeout
            limit = time.monotonic() + timeout + 60
            while not os.path.exists(os.path.join(out_dir, "rank0")) and time.monotonic() < limit:
                time.sleep(0.05)
        os._exit(0)

    if __name__ == "__main__":
        port, timeout, peer_exits, out_dir = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
        context = mp.get_context("spawn")
        procs = [context.Process(target=worker, args=(r, port, timeout, peer_exits, out_dir)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("peer_exits", [False, True], ids=["peer_alive", "peer_exits"])
def test_failing_rank_does_not_hang_the_other(tmp_path, peer_exits):
    timeout = 4.0
    script = tmp_path / "ddp_fault.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # The hard wall-clock limit only guards the test run itself; the assertion is on rank 0.
    subprocess.run(
        [sys.executable, str(script), str(_free_port()), str(timeout), "1" if peer_exits else "0", str(tmp_path)],
        timeout=120,
        env=env,
        check=True,
        capture_output=True,
    )
    outcome, elapsed = (tmp_path / "rank0").read_text().split()
    print(f"rank 0: {outcome} after {elapsed} s (timeout {timeout} s)")
    assert (tmp_path / "rank1").read_text().startswith("RuntimeError")
    assert outcome != "returned", "rank 0 finished a collective its peer never joined"
    # Bounded by the process group's timeout (plus start-up slack), not by gloo's 30-minute default.
    assert float(elapsed) < timeout + 30


# -- the Selector's checkpoint state (GekoTrainer's geko_selector.pt) --------------------------------


def _storable(value):
    """What GekoTrainer stores: numpy arrays as tensors (the HF integration tags them)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_storable(v) for v in value)
    return value


def _selector_state():
    import geko_core

    selector = Selector(32, "infobatch", epochs=3, seed=1)
    list(selector.sampler)
    selector.observe_stats(np.arange(8), geko_core.sample_stats(torch.randn(8, 4), torch.arange(8) % 4))
    return _storable(selector.state_dict())


def _same_content(a, b) -> bool:
    return content_crc32(a) == content_crc32(b) and repr(type(a)) == repr(type(b))


def test_selector_state_file_is_readable_by_plain_torch_load(tmp_path):
    state = _selector_state()
    save_verified(state, str(tmp_path / "s.pt"))
    plain = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(plain) == set(state) | {CHECKSUM_KEY}
    assert _same_content(load_verified(str(tmp_path / "s.pt")), state)


def test_selector_state_truncations_and_bit_flips_are_refused(tmp_path):
    state = _selector_state()
    path = tmp_path / "s.pt"
    save_verified(state, str(path))
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    rng = random.Random(0)
    lengths = sorted({0, 1, len(data) - 1, *rng.sample(range(len(data)), min(200, len(data)))})
    for length in lengths:
        broken.write_bytes(data[:length])
        with pytest.raises(ValueError):
            load_verified(str(broken))
    refused = identical = 0
    for position in rng.sample(range(len(data)), min(FLIPS, len(data))):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        broken.write_bytes(bytes(flipped))
        try:
            loaded = load_verified(str(broken))
        except ValueError:
            refused += 1
        else:
            # a flip in archive metadata that carries no content (timestamps, padding)
            assert _same_content(loaded, state), f"bit flip at byte {position} loaded silently changed state"
            identical += 1
    print(f"{len(lengths)} truncations refused; bit flips: {refused} refused, {identical} loaded identical content")
    assert refused > 0


def test_kill_during_selector_state_save(tmp_path):
    path = str(tmp_path / "geko_selector.pt")
    states = [_selector_state()]
    for k in range(1, 4):
        states.append({**states[0], "step": k})
    save_verified(states[0], path)
    context = multiprocessing.get_context("fork")
    rng = random.Random(2)

    def saver():
        k = 0
        while True:
            k = k % 3 + 1
            save_verified(states[k], path)

    for _ in range(max(4, KILLS // 3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            child = context.Process(target=saver, daemon=True)
            child.start()
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        loaded = load_verified(path)  # never torn
        assert any(_same_content(loaded, s) for s in states)


def test_hf_save_selector_state_is_checksummed(tmp_path):
    hf = pytest.importorskip("geko_core.integrations.hf", exc_type=ImportError)
    selector = Selector(16, "geko", epochs=2)
    path = tmp_path / "geko_selector.pt"
    hf.save_selector_state(selector, str(path))
    hf.load_selector_state(Selector(16, "geko", epochs=2), str(path))
    data = path.read_bytes()
    refused = 0
    for position in range(0, len(data), max(1, len(data) // 64)):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path.write_bytes(bytes(flipped))
        target = Selector(16, "geko", epochs=2)
        before = target.state_dict()
        try:
            hf.load_selector_state(target, str(path))
        except ValueError:
            refused += 1
            assert content_crc32(_storable(target.state_dict())) == content_crc32(_storable(before))
    assert refused > 0
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        hf.load_selector_state(Selector(16, "geko", epochs=2), str(path))
