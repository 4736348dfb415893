"""One load process: many non-blocking sockets driven by one epoll loop.

Each flow is one TCP connection (one or more HTTP requests) or one UDP
datagram and its echo. A flow ends with exactly one outcome, "ok" or an
error kind, so ok + sum(errors) == attempted. Latency is taken per
response: for the first request of a connection from connect() (so it
includes the handshake, which is what a short-connection client waits
for), for later keep-alive requests from the send.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
from array import array
from collections import Counter
from dataclasses import dataclass, field
from time import monotonic, perf_counter
from typing import Callable, Iterator, Optional

from .http import UNTIL_CLOSE, HttpError, body_end, parse_head

EPOLLIN, EPOLLOUT, EPOLLERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR
# Edge-triggered and registered once for both directions: no epoll_ctl MOD
# per step; the price is reading until EAGAIN, which the flows do.
WANT = EPOLLIN | EPOLLOUT | select.EPOLLET
SCAN_S = 0.05           # how often deadlines are checked and progress published
ERROR_KINDS = ("refused", "reset", "timeout", "other")
_KIND = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset", errno.EPIPE: "reset",
         errno.ECONNABORTED: "reset", errno.ETIMEDOUT: "timeout"}
_LINGER0 = struct.pack("ii", 1, 0)


def kind_of(err: Optional[int]) -> str:
    return _KIND.get(err, "other")


@dataclass
class Target:
    """Everything a flow needs to know, fixed for the run."""
    proto: str
    family: int
    addr: tuple                       # sockaddr from getaddrinfo
    timeout: float
    requests_per_conn: int = 1
    req_keep: bytes = b""             # HTTP request that keeps the connection
    req_last: bytes = b""             # ... and the one that ends it
    source_ports: Optional[list] = None
    duration: Optional[float] = None  # seconds: start no new connection after this long

    @property
    def bind_host(self) -> str:
        return "::" if self.family == socket.AF_INET6 else "0.0.0.0"


@dataclass
class Tally:
    """What one process sends back to the parent."""
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    # of those errors, the ones on a keep-alive connection that had already
    # been answered: the server closed it as the next request went out
    reused: Counter = field(default_factory=Counter)
    per_worker: Counter = field(default_factory=Counter)
    lat_ms: array = field(default_factory=lambda: array("f"))
    started: float = 0.0              # time.monotonic(): comparable across processes
    ended: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + sum(self.errors.values())


class _Flow:
    __slots__ = ("eng", "lane", "index", "sock", "fd", "t0", "deadline")

    def __init__(self, eng: "Engine", lane: Iterator[int], index: int):
        self.eng, self.lane, self.index = eng, lane, index
        self.sock: Optional[socket.socket] = None
        self.fd = -1

    def _socket(self, kind: int, now: float) -> socket.socket:
        t = self.eng.target
        s = self.sock = socket.socket(t.family, kind | socket.SOCK_NONBLOCK)
        if t.source_ports:
            # Pinned flows reuse a 4-tuple on purpose; SO_REUSEADDR lets the
            # bind succeed while an earlier use still lingers in the kernel.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((t.bind_host, t.source_ports[self.index % len(t.source_ports)]))
        self.fd = s.fileno()
        self.t0, self.deadline = now, now + t.timeout
        return s

    def _watch(self) -> None:
        self.eng.ep.register(self.fd, WANT)

    def _response(self, worker: Optional[str], now: float) -> None:
        tally = self.eng.tally
        tally.lat_ms.append((now - self.t0) * 1000.0)
        if worker is not None:
            tally.per_worker[worker] += 1

    def _recv(self) -> bytes | str | None:
        """What the socket has (b"": the peer closed), None for nothing yet
        (EAGAIN), or the error kind when it failed."""
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError as e:
            return kind_of(e.errno)

    def on_timeout(self) -> str:
        return "timeout"

    @property
    def reused(self) -> bool:
        """A connection that already carried an answered request."""
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()       # also leaves the epoll set: the fd is never dup'ed
            self.sock = None


class TcpFlow(_Flow):
    __slots__ = ("left", "buf", "head", "out", "connecting", "draining")

    def begin(self, now: float) -> Optional[str]:
        self.left = self.eng.target.requests_per_conn
        self.buf, self.head, self.out = bytearray(), None, b""
        self.connecting = self.draining = False
        s = self._socket(socket.SOCK_STREAM, now)
        err = s.connect_ex(self.eng.target.addr)
        if err and err != errno.EINPROGRESS:
            return kind_of(err)
        self._watch()
        if err:
            self.connecting = True
            return None
        return self._send_request()

    def _send_request(self) -> Optional[str]:
        t = self.eng.target
        self.out = t.req_last if self.left == 1 else t.req_keep
        return self._flush()

    def _flush(self) -> Optional[str]:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return None
        except OSError as e:
            return kind_of(e.errno)
        self.out = self.out[n:]
        return None

    def on_event(self, ev: int, now: float) -> Optional[str]:
        if self.connecting:
            if ev & EPOLLERR:       # the connect failed: its errno says why
                return kind_of(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
            if not ev & EPOLLOUT:
                return None
            self.connecting = False
            r = self._send_request()
            if r is not None:
                return r
        elif self.out and ev & EPOLLOUT:
            r = self._flush()
            if r is not None:
                return r
        return self._read(now) if ev & ~EPOLLOUT else None

    def _read(self, now: float) -> Optional[str]:
        while True:                 # edge-triggered: until EAGAIN or an outcome
            data = self._recv()
            if not isinstance(data, bytes):
                return data
            if self.draining:       # response done, waiting for the server's FIN
                if not data:
                    return "ok"
                continue
            if not data:
                if self.head is not None and self.head.length == UNTIL_CLOSE:
                    return self._complete(len(self.buf), now)
                return "reset"      # peer closed before a full response
            self.buf += data
            try:
                if self.head is None:
                    self.head = parse_head(self.buf)
                    if self.head is None:
                        continue
                end = body_end(self.buf, self.head)
            except HttpError:
                return "other"
            if end is not None:
                r = self._complete(end, now)
                if r is not None or not self.draining:
                    return r        # outcome, or the next request is out
                # draining: read on, the FIN often came with the response

    def _complete(self, end: int, now: float) -> Optional[str]:
        head = self.head
        self._response(head.worker, now)
        if not 200 <= head.status < 300:
            return "other"
        self.left -= 1
        if self.left == 0:
            # When the server closes first, the TIME_WAIT is its, not ours:
            # wait for its FIN so short connections do not eat our ports.
            if head.close and not self.eng.target.source_ports and end == len(self.buf):
                self.draining = True
                return None
            return "ok"
        if head.close:
            return "reset"          # the server will not serve the next request
        del self.buf[:end]
        self.head, self.t0 = None, now
        self.deadline = now + self.eng.target.timeout
        return self._send_request()

    def on_timeout(self) -> str:
        return "ok" if self.draining else "timeout"

    @property
    def reused(self) -> bool:
        return self.left < self.eng.target.requests_per_conn

    def close(self) -> None:
        if self.sock is not None and self.eng.target.source_ports:
            # A pinned 4-tuple is used again right away: reset it instead of
            # leaving it in TIME_WAIT on either side.
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            except OSError:
                pass
        super().close()


class UdpFlow(_Flow):
    __slots__ = ()

    def begin(self, now: float) -> Optional[str]:
        s = self._socket(socket.SOCK_DGRAM, now)
        s.connect(self.eng.target.addr)     # connected: ICMP unreachable -> ECONNREFUSED
        self._watch()
        s.send(b"ping %d" % self.index)
        return None

    def on_event(self, ev: int, now: float) -> Optional[str]:
        if not ev & ~EPOLLOUT:
            return None
        data = self._recv()
        if not isinstance(data, bytes):
            return data
        worker = None
        if data.startswith(b"worker:"):
            worker = data[7:data.find(b"\n") if b"\n" in data else None].strip().decode("latin-1")
        self._response(worker, now)
        return "ok"


class Engine:
    def __init__(self, target: Target, tally: Tally,
                 publish: Callable[[int], None] = lambda done: None,
                 parent_pid: Optional[int] = None):
        self.target, self.tally, self.publish = target, tally, publish
        self.parent_pid = parent_pid
        self.ep = select.epoll()
        self.flows: dict[int, _Flow] = {}
        self.cls = TcpFlow if target.proto == "tcp" else UdpFlow
        self.stopping = False

    def wind_down(self) -> None:
        """Start no new connection; those in flight finish (a signal handler)."""
        self.stopping = True

    def run(self, lanes: list[Iterator[int]]) -> Tally:
        tally, flows = self.tally, self.flows
        tally.started = monotonic()
        self.stop_at = (tally.started + self.target.duration
                        if self.target.duration is not None else None)
        try:
            for lane in lanes:
                self._start(lane)
            next_scan = perf_counter() + SCAN_S
            while flows:
                for fd, ev in self.ep.poll(SCAN_S):
                    flow = flows.get(fd)
                    if flow is not None:
                        out = flow.on_event(ev, perf_counter())
                        if out is not None:
                            self._finish(flow, out)
                now = perf_counter()
                if now >= next_scan:
                    next_scan = now + SCAN_S
                    for flow in [f for f in flows.values() if now >= f.deadline]:
                        self._finish(flow, flow.on_timeout())
                    self.publish(tally.done)
                    if self.parent_pid is not None and os.getppid() != self.parent_pid:
                        raise SystemExit("load parent went away")
            tally.ended = monotonic()
            self.publish(tally.done)
            return tally
        finally:
            for flow in list(flows.values()):
                flow.close()
            self.ep.close()

    def _start(self, lane: Iterator[int]) -> None:
        # Loop, not recursion: a flow may fail at once (refused on connect).
        for index in lane:
            if self.stopping or (self.stop_at is not None and monotonic() >= self.stop_at):
                return                  # --duration is over (or wound down): run dry
            flow = self.cls(self, lane, index)
            try:
                out = flow.begin(perf_counter())
            except OSError as e:
                out = kind_of(e.errno)
            if out is None:
                self.flows[flow.fd] = flow
                return
            self._count(out)
            flow.close()

    def _finish(self, flow: _Flow, outcome: str) -> None:
        del self.flows[flow.fd]
        flow.close()
        self._count(outcome)
        if outcome != "ok" and flow.reused:
            self.tally.reused[outcome] += 1
        self._start(flow.lane)

    def _count(self, outcome: str) -> None:
        if outcome == "ok":
            self.tally.ok += 1
        else:
            self.tally.errors[outcome] += 1
