"""Reading and writing on threads of their own while the merge math runs.

Positioned reads and writes release the GIL, so on a machine with two or more cores the I/O of
one unit of work (a chunk of rows of one tensor) overlaps the math of another: while unit k is
merged, the write thread writes unit k-1's result and the read thread reads unit k+1's inputs
(with one thread for both, the math also waited for the writes). A third thread runs work
started ahead: the statistics passes of the next two-pass tensors, while earlier ones are
merged. At most one read is ahead of the math, and it is prefetched only when it and the unit
being merged are together under PREFETCH_BYTES, so the largest tensor (the peak of whole-tensor
methods) never has another one's inputs beside it; results wait for the write thread up to
WRITE_AHEAD_BYTES (at least one).
"""
from __future__ import annotations

import ctypes
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
PREFETCH_BYTES = 1 << 28  # 256 MiB: row chunks always; whole tensors only when small
# results waiting to be written: a write slowed by the kernel (a fresh file's pages) no longer
# stops the merge at once
WRITE_AHEAD_BYTES = 1 << 25


# glibc mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
HEAP_BLOCK_BYTES = 1 << 25  # 32 MiB: smaller blocks (row chunks) come from the heap, reused
KEEP_FREED_BYTES = (1 << 31) - 1  # free heap kept for reuse (the largest value mallopt takes)


def tune_malloc() -> None:
    """Make glibc reuse freed tensor memory instead of returning it to the kernel (a no-op
    elsewhere).

    * One malloc arena for every thread: buffers read on the I/O thread are freed on the main
      thread; with per-thread arenas that memory is not reused by the main thread's next large
      tensor (measured: TIES peak RSS 1.22 -> 1.07 GB on four 1 GB models, same speed).
    * Blocks up to 32 MiB (row chunks and most whole tensors) from the heap, and no trimming
      of the heap top: glibc's default returns freed memory above 64 MiB at the heap top to
      the kernel, so every chunk read later is faulted in and zeroed again (task_arithmetic
      of four 1 GB models: 0.3-0.4M -> 0.08M page faults, about 0.5 s less system time, peak
      RSS unchanged; larger blocks are still mapped and unmapped on their own).
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
    except (OSError, AttributeError):
        pass


class IOThread:
    """Background threads: one runs the reads in submission order, one the writes, and one
    work started ahead of the math (`ahead`: the next tensors' whole-tensor statistics,
    gathered while earlier tensors are merged)."""

    def __init__(self):
        tune_malloc()   # before the threads' first allocation
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-io-read")
        self._writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-io-write")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-ahead")
        self._writes_queued: deque[tuple[Future, int]] = deque()

    def ahead(self, work: Callable[[], T]) -> Future:
        """Run `work` on the thread for work ahead, after what was queued there before."""
        return self._ahead.submit(work)

    def prefetch(self, loads: Iterable[tuple[Callable[[], T], int]]) -> Iterator[T]:
        """Results of the `(load, nbytes)` calls, in order, each load run on the read thread; the
        next load starts before a result is handed out when both nbytes sum under
        PREFETCH_BYTES."""
        upcoming = iter(loads)
        current = next(upcoming, None)
        if current is None:
            return
        future = self._reads.submit(current[0])
        for following in upcoming:
            small = current[1] + following[1] <= PREFETCH_BYTES
            ahead = self._reads.submit(following[0]) if small else None
            yield future.result()
            future, current = ahead or self._reads.submit(following[0]), following
        yield future.result()

    def write(self, work: Callable[[], None], nbytes: int = 0) -> None:
        """Queue `work` (a write of `nbytes` held in memory until it is done) after the earlier
        ones, first waiting for the oldest while with this one they would hold more than
        WRITE_AHEAD_BYTES; the error of a write that has failed is raised here."""
        queued = self._writes_queued
        while queued and (queued[0][0].done()
                          or sum(n for _, n in queued) + nbytes > WRITE_AHEAD_BYTES):
            queued.popleft()[0].result()
        self._writes_queued.append((self._writes.submit(work), nbytes))

    def flush(self) -> None:
        """Wait for the queued writes, in order; the first exception is raised here."""
        while self._writes_queued:
            self._writes_queued.popleft()[0].result()

    def __enter__(self) -> "IOThread":
        return self

    def __exit__(self, *exc) -> None:
        for pool in (self._reads, self._writes, self._ahead):
            pool.shutdown(wait=True, cancel_futures=True)
