"""The I/O thread: results in order, prefetch only within its budget, write errors surface."""
from __future__ import annotations

import threading

import pytest

from checkpoints import overlap
from checkpoints.errors import UserError
from checkpoints.overlap import IOThread


def test_prefetch_yields_in_order_on_the_read_thread():
    threads = set()

    def load(i):
        threads.add(threading.current_thread().name)
        return i * i

    with IOThread() as io:
        got = list(io.prefetch(((lambda i=i: load(i)), 1) for i in range(6)))
    assert got == [0, 1, 4, 9, 16, 25]
    assert threads and all(name.startswith("merge-io-read") for name in threads)
    with IOThread() as io:
        assert list(io.prefetch([])) == []


@pytest.mark.parametrize("sizes, ahead", [((10, 10, 10), [True, True]),
                                          ((10, 95, 10), [False, False]),
                                          ((95, 10, 1), [False, True])])
def test_prefetch_reads_ahead_only_within_the_budget(monkeypatch, sizes, ahead):
    """Unit k+1 is read before unit k is handed out iff size(k) + size(k+1) <= the budget."""
    monkeypatch.setattr(overlap, "PREFETCH_BYTES", 100)
    started: list[int] = []
    loads = [((lambda i=i: started.append(i) or i), n) for i, n in enumerate(sizes)]
    with IOThread() as io:
        results = io.prefetch(loads)
        seen = []
        for k in range(len(sizes)):
            assert next(results) == k
            io._reads.submit(lambda: None).result()  # a barrier: reads run in order
            seen.append(k + 1 in started)   # was the next unit read ahead?
    assert seen[:-1] == ahead


def test_write_errors_surface_on_the_next_write_or_flush():
    def fail():
        raise UserError("disk full")

    with IOThread() as io:
        io.write(fail)
        io._writes.submit(lambda: None).result()   # a barrier: the failed write has run
        with pytest.raises(UserError, match="disk full"):
            io.write(lambda: None)
        io.write(fail)
        with pytest.raises(UserError, match="disk full"):
            io.flush()
        order: list[int] = []
        for i in range(5):
            io.write(lambda i=i: order.append(i))
        io.flush()
    assert order == [0, 1, 2, 3, 4]


def test_writes_queue_up_to_the_budget_then_wait_for_the_oldest(monkeypatch):
    """Results wait for the write thread while, with the new one, they hold at most
    WRITE_AHEAD_BYTES; beyond that the oldest write is waited for (one is always queued)."""
    monkeypatch.setattr(overlap, "WRITE_AHEAD_BYTES", 100)
    gate = threading.Event()
    with IOThread() as io:
        io.write(gate.wait, 60)          # blocks the write thread until the gate opens
        io.write(lambda: None, 40)       # 100 bytes queued: still within the budget
        assert len(io._writes_queued) == 2
        waiter = threading.Thread(target=io.write, args=(lambda: None, 1))
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()         # 101 bytes: waits for the first write
        gate.set()
        waiter.join(5)
        assert not waiter.is_alive()
        io.write(lambda: None, 500)      # larger than the budget alone: queued anyway
        io.flush()
        assert not io._writes_queued
