"""Per-worker counters in one shared mmap, written by workers, read by the
supervisor (and later `watch`) without stopping them.

Layout, all little-endian uint64 words:

    header   magic, version, records, fields
    record 0 .. workers-1     one per worker slot
    record workers            the dispatcher's acceptor (dispatcher model only)

    record = pid, ready, accepts, requests, datagrams, eagain, wakeups, restarts

Each word has one writer at a time, so no locks are needed: the supervisor
writes pid, ready=0 (before forking) and restarts; the worker in the slot
writes ready=1 and the event counts. An aligned 8-byte store is atomic on
the CPUs we run on, so a reader sees an old or a new value, never a torn one.
A restarted worker continues its slot's counts.
"""
from __future__ import annotations

import mmap
from typing import Optional

FIELDS = ("pid", "ready", "accepts", "requests", "datagrams", "eagain", "wakeups", "restarts")
PID, READY, ACCEPTS, REQUESTS, DATAGRAMS, EAGAIN, WAKEUPS, RESTARTS = range(len(FIELDS))
# accepts:   connections this worker took (accept(), or received from the dispatcher)
# requests:  HTTP requests answered
# datagrams: UDP datagrams received and echoed
# eagain:    wakeups that found nothing to do (accept/recv said EAGAIN first)
# wakeups:   returns from the worker's wait (epoll_wait, blocking accept/recvfrom)

MAGIC = 0x5250_4354_4C43_4E54   # "RPCTLCNT"
VERSION = 1
_HEADER = 4


class Slot:
    """One record, as the worker in that slot writes it."""

    __slots__ = ("_v", "_base")

    def __init__(self, words: memoryview, index: int):
        self._v = words
        self._base = _HEADER + index * len(FIELDS)

    def inc(self, field: int, n: int = 1) -> None:
        self._v[self._base + field] += n

    def set(self, field: int, value: int) -> None:
        self._v[self._base + field] = value

    def get(self, field: int) -> int:
        return self._v[self._base + field]


class Counters:
    def __init__(self, workers: int, buf: Optional[mmap.mmap] = None):
        self.workers = workers
        self.records = workers + 1
        size = 8 * (_HEADER + self.records * len(FIELDS))
        # An anonymous MAP_SHARED mapping survives fork() shared, not copied.
        self._buf = buf if buf is not None else mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
        self._words = memoryview(self._buf).cast("Q")
        if buf is None:
            self._words[0:_HEADER] = memoryview(bytes(8 * _HEADER)).cast("Q")
            self._words[0], self._words[1] = MAGIC, VERSION
            self._words[2], self._words[3] = self.records, len(FIELDS)
        elif self._words[0] != MAGIC or self._words[1] != VERSION:
            raise ValueError("not a reuseport-ctl counter block")

    @property
    def acceptor(self) -> int:
        return self.workers

    def slot(self, index: int) -> Slot:
        if not 0 <= index < self.records:
            raise IndexError(index)
        return Slot(self._words, index)

    def read(self, index: int) -> dict[str, int]:
        base = _HEADER + index * len(FIELDS)
        return dict(zip(FIELDS, self._words[base:base + len(FIELDS)].tolist()))

    def snapshot(self) -> list[dict[str, int]]:
        """Every worker record (not the acceptor), read without stopping anyone."""
        return [self.read(i) for i in range(self.workers)]

    def close(self) -> None:
        self._words.release()
        self._buf.close()
