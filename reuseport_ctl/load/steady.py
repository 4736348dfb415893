"""Steady load without an end: the built-in client kept running while
`reuseport-ctl churn` changes the group under it (or `reload` replaces the
server), counting every failed connection by kind: TCP connections of one
request (short) or several (keep-alive), or UDP datagrams and their echo
(a lost one ends in a timeout)."""
from __future__ import annotations

import mmap
import os
import pickle
import select
import socket
import struct
import time
from collections import Counter

from ..kernel import children, process

_KINDS = ("refused", "reset", "timeout", "other")
_REC = struct.Struct("=6q")         # per load process: done, ok, refused, reset, timeout, other


class SteadyLoad:
    """The built-in client's engine (load/engine.py), without an end: each
    of `processes` forked processes keeps concurrency/processes connections
    in flight, one after another, until stop(). Every process publishes its
    running counts in a shared page (read for the progress bar and the
    timeline) and sends its whole tally back at the end."""

    def __init__(self, host: str, port: int, concurrency: int, timeout: float,
                 processes: int = 2, proto: str = "tcp", requests: int = 1):
        from . import http as lhttp
        from .engine import Target

        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=kind)[0]
        hh = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.target = Target(proto, family, addr, float(timeout), requests,
                             lhttp.request("/", hh, last=False), lhttp.request("/", hh, last=True))
        self.processes = max(1, min(processes, concurrency))
        self.concurrency = concurrency
        self._shared = mmap.mmap(-1, 8 + _REC.size * self.processes)   # [0]: stop flag
        self._kids: dict[int, int] = {}          # result pipe read end -> pid
        self.timeline: list[dict] = []
        self._t0 = 0.0

    def start(self, t0: float) -> None:
        from .plan import split

        self._t0 = t0
        me = os.getpid()
        for p, width in enumerate(split(self.concurrency, self.processes)):
            r, w = os.pipe()
            pid = children.fork()
            if pid == 0:
                children.run_child(lambda: self._child(p, width, w, me), "churn load")
            os.close(w)
            self._kids[r] = pid

    def _child(self, p: int, lanes: int, w: int, parent: int) -> None:
        """Body of load process p, in its forked process: run until the stop
        flag, then send the whole tally back through w."""
        from .engine import Engine, Tally

        process.die_with_parent(parent)
        process.close_fds_except({0, 1, 2, w})
        process.set_name("rpctl-churnload")
        shared, off = self._shared, 8 + _REC.size * p
        tally = Tally()

        def publish(done: int) -> None:
            e = tally.errors
            _REC.pack_into(shared, off, done, tally.ok, *(e[k] for k in _KINDS))

        def indices():
            i = 0
            while not shared[0]:
                yield i
                i += 1
        it = indices()
        Engine(self.target, tally, publish, parent).run([it] * lanes)
        publish(tally.done)
        tally.lat_ms = tally.lat_ms[:0]         # not needed: keep the pipe small
        data = memoryview(pickle.dumps(tally))
        while data:
            data = data[os.write(w, data):]

    def counts(self) -> dict[str, int]:
        """Running totals over every load process."""
        tot = [0] * 6
        for p in range(self.processes):
            for i, v in enumerate(_REC.unpack_from(self._shared, 8 + _REC.size * p)):
                tot[i] += v
        return dict(zip(("conns", "ok") + _KINDS, tot))

    def progress(self) -> tuple[int, int]:
        c = self.counts()
        return c["conns"], c["reset"]

    def sample(self) -> None:
        """One timeline point: the running totals now."""
        self.timeline.append({"t": round(time.monotonic() - self._t0, 4), **self.counts()})

    def stop(self, timeout: float = 10.0) -> dict:
        """Let every connection in flight finish (at most the client timeout),
        then return the totals, per-worker counts and the timeline."""
        self._shared[0] = 1
        bufs = {r: bytearray() for r in self._kids}
        open_ = set(self._kids)
        deadline = time.monotonic() + timeout
        while open_ and time.monotonic() < deadline:
            for r in select.select(list(open_), [], [], 0.1)[0]:
                chunk = os.read(r, 1 << 16)
                if chunk:
                    bufs[r] += chunk
                else:
                    open_.discard(r)
        self.sample()
        tallies = [pickle.loads(b) for b in bufs.values() if b]
        self.close()
        if len(tallies) != self.processes:
            raise RuntimeError("a churn load process died; its error is above")
        totals: Counter = Counter({k: 0 for k in ("conns", "ok") + _KINDS})
        per_worker: Counter = Counter()
        reused: Counter = Counter()
        for t in tallies:
            totals["conns"] += t.done
            totals["ok"] += t.ok
            totals.update(t.errors)
            per_worker.update(t.per_worker)
            reused.update(getattr(t, "reused", {}))
        totals["reused"] = dict(reused)     # errors on an already-answered keep-alive connection
        return {"totals": dict(totals), "timeline": self.timeline,
                "per_worker": {k: per_worker[k] for k in sorted(per_worker, key=_natural)}}

    def close(self) -> None:
        children.stop(self._kids.values(), grace=2.0)
        for r in self._kids:
            os.close(r)
        self._kids.clear()
        if not self._shared.closed:
            self._shared.close()


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
