"""Concurrent use of one SampleTable from several Python threads.

Documented behaviour (``SampleTable`` docstring, docs/reliability.md): calls serialise. Each
``update`` applies its whole batch under the table's lock, so concurrent updates give the
result of *some* serial order of the batches (exactly the serial result when the batches'
indices are disjoint), and ``state_dict``/``save`` taken meanwhile see a state between
batches, never a batch half applied. The Selector is not thread-safe (one training loop
drives it); it is not tested here.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

from geko_core.table import SampleTable

N = 60_000  # large batches: each update takes long enough for the threads to really overlap


def _batches(count: int, seed: int, *, disjoint: bool) -> list[tuple]:
    rng = np.random.default_rng(seed)
    batches = []
    order = rng.permutation(N)
    for b in range(count):
        indices = np.array_split(order, count)[b] if disjoint else rng.integers(0, N, N // 2)
        size = indices.shape[0]
        batches.append(
            (
                indices,
                rng.uniform(0, 4, size).astype(np.float32),
                rng.uniform(0, 1, size).astype(np.float32),
                (rng.uniform(0, 1, size) < 0.5).astype(np.float32),
                b + 1,
            )
        )
    return batches


def _run_concurrently(table: SampleTable, batches: list[tuple], rounds: int = 1) -> None:
    barrier = threading.Barrier(len(batches))
    errors: list[BaseException] = []

    def work(batch):
        try:
            barrier.wait()
            for _ in range(rounds):
                table.update(*batch)
        except BaseException as exc:  # surfaced below: a thread's exception must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(batch,)) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _state(table: SampleTable) -> dict:
    return {k: v for k, v in table.state_dict().items() if isinstance(v, np.ndarray)}


def _equal(a: dict, b: dict) -> bool:
    return all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_disjoint_concurrent_updates_equal_the_serial_result():
    batches = _batches(4, seed=0, disjoint=True)
    serial = SampleTable(N)
    for batch in batches:
        serial.update(*batch)
    for threads_per_update in (1, 2):
        table = SampleTable(N, num_threads=threads_per_update)
        _run_concurrently(table, batches)
        assert _equal(_state(table), _state(serial))
        assert table.updates_applied == serial.updates_applied


def test_overlapping_concurrent_updates_equal_some_serial_order():
    batches = _batches(3, seed=1, disjoint=False)
    candidates = []
    for order in itertools.permutations(range(len(batches))):
        serial = SampleTable(N)
        for b in order:
            serial.update(*batches[b])
        candidates.append(_state(serial))
    # the orders really give different tables, so matching one of them means something
    assert not _equal(candidates[0], candidates[-1])
    for trial in range(3):
        table = SampleTable(N)
        _run_concurrently(table, batches)
        assert any(_equal(_state(table), c) for c in candidates), f"trial {trial}: batches interleaved"


def test_snapshots_during_updates_are_between_batches(tmp_path):
    """state_dict()/save() taken while other threads update: each equals the table after
    some whole number of batches of the (single, ordered) writer."""
    batches = _batches(12, seed=2, disjoint=False)
    prefixes = [_state(SampleTable(N))]
    replay = SampleTable(N)
    for batch in batches:
        replay.update(*batch)
        prefixes.append(_state(replay))
    table = SampleTable(N)
    done = threading.Event()

    def writer():
        for batch in batches:
            table.update(*batch)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    snapshots = []
    while not done.is_set() or not snapshots:
        snapshots.append(_state(table))
        path = tmp_path / f"snap{len(snapshots)}.gkt"
        table.save(path)
        snapshots.append(_state(SampleTable.from_file(path)))
    thread.join()
    for snapshot in snapshots:
        visits = int(snapshot["visits"].sum())
        matches = [p for p in prefixes if int(p["visits"].sum()) == visits]
        assert matches and _equal(snapshot, matches[0]), "a snapshot saw a batch half applied"


def test_reads_and_num_threads_changes_during_updates():
    """Readers and a num_threads setter racing with updates neither crash nor corrupt."""
    batches = _batches(4, seed=3, disjoint=True)
    serial = SampleTable(N)
    for batch in batches:
        serial.update(*batch)
    table = SampleTable(N)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            counts = table.bucket_counts_array()
            assert counts.sum() == N
            table.buckets(np.arange(0, N, 997))
            table.num_threads = 2 if table.num_threads == 1 else 1

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        _run_concurrently(table, batches)
    finally:
        stop.set()
        for r in readers:
            r.join()
    assert _equal(_state(table), _state(serial))
