"""Long-lived keep-alive connections, as a connection pool (gRPC, HTTP/2,
websockets, a proxy's upstream pool) holds them: opened in bursts, then a
steady trickle of requests over them, then a reconnect storm (every
connection drops and is reopened at once, as after a proxy restart or a
network blip), then the trickle again.

    res = hold(addr, n=17, burst=4, hold_s=2.0)
    res.opened        # slot -> connections held after opening (X-Worker of each)
    res.stormed       # ... after the reconnect storm
    res.times         # phase -> time.monotonic() (comparable across processes)

The slot of a connection is the X-Worker header of its answers: the server
says who holds it. Blocking sockets with a timeout, but every phase is
pipelined over all connections (all SYNs of a burst out before the first
answer; a round's requests all sent before its answers are read), so a
round costs one round trip, not n.
"""
from __future__ import annotations

import errno
import select
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from . import http
from .engine import kind_of

BURST_GAP_S = 0.05          # between two bursts of the opening
ROUND_S = 0.1               # the trickle: every connection sends one request per round
_REQ = http.request("/", "reuseport-ctl", last=False)


@dataclass
class HeldResult:
    opened: dict[int, int] = field(default_factory=dict)     # slot -> connections
    stormed: dict[int, int] = field(default_factory=dict)
    # slot -> answers, in the hold before the storm and in the one after it
    requests: tuple = field(default_factory=lambda: (Counter(), Counter()))
    errors: Counter = field(default_factory=Counter)          # kind -> failed connections
    times: dict[str, float] = field(default_factory=dict)     # start, opened, storm, reopened, end


class _Conn:
    __slots__ = ("sock", "slot")

    def __init__(self, sock: socket.socket):
        self.sock, self.slot = sock, -1


def hold(addr: tuple, n: int, burst: int, hold_s: float, timeout: float = 5.0,
         family: int = socket.AF_INET) -> HeldResult:
    """Open n connections to addr in bursts of `burst`, trickle for hold_s,
    drop them all and reopen them all at once, trickle again, close."""
    res = HeldResult()
    res.times["start"] = time.monotonic()
    conns: list[_Conn] = []
    try:
        for i in range(0, n, burst):
            if i:
                time.sleep(BURST_GAP_S)
            conns += _open(addr, family, min(burst, n - i), timeout, res.errors)
        res.times["opened"] = time.monotonic()
        res.opened = _where(conns)
        conns = _trickle(conns, hold_s, res.errors, res.requests[0])
        res.times["storm"] = time.monotonic()
        _close(conns)
        conns = _open(addr, family, n, timeout, res.errors)
        res.times["reopened"] = time.monotonic()
        res.stormed = _where(conns)
        conns = _trickle(conns, hold_s, res.errors, res.requests[1])
        res.times["end"] = time.monotonic()
    finally:
        _close(conns)
    return res


def _where(conns: list[_Conn]) -> dict[int, int]:
    return dict(Counter(c.slot for c in conns))


def _open(addr, family, k: int, timeout: float, errors: Counter) -> list[_Conn]:
    """k connections at once: every SYN out first, then one request each,
    answered (so a worker has accepted it and said who it is)."""
    pending: list[_Conn] = []
    for _ in range(k):
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        err = s.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            errors[kind_of(err)] += 1
            s.close()
            continue
        pending.append(_Conn(s))
    poll = select.poll()
    for c in pending:
        poll.register(c.sock, select.POLLOUT)
    left, deadline = len(pending), time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for fd, _ in poll.poll(max(0, 1000 * (deadline - time.monotonic()))):
            poll.unregister(fd)
            left -= 1
    up = []
    for c in pending:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or _connected(c.sock)
        if err:
            errors[kind_of(err)] += 1
            c.sock.close()
            continue
        c.sock.setblocking(True)
        c.sock.settimeout(timeout)
        up.append(c)
    return _round(up, errors)


def _connected(s: socket.socket) -> int:
    """0 if s is connected, ETIMEDOUT if its handshake never finished."""
    try:
        s.getpeername()
        return 0
    except OSError:
        return errno.ETIMEDOUT


def _round(conns: list[_Conn], errors: Counter, answers: Counter | None = None) -> list[_Conn]:
    """One request on every connection, then every answer: the connections
    still up (a failed one is counted by kind and closed)."""
    sent = []
    for c in conns:
        try:
            c.sock.sendall(_REQ)
            sent.append(c)
        except OSError as e:
            errors[kind_of(e.errno)] += 1
            c.sock.close()
    up = []
    for c in sent:
        try:
            c.slot = _answer(c.sock)
        except (OSError, http.HttpError) as e:
            errors["timeout" if isinstance(e, socket.timeout) else
                   kind_of(getattr(e, "errno", None))] += 1
            c.sock.close()
            continue
        if answers is not None:
            answers[c.slot] += 1
        up.append(c)
    return up


def _answer(s: socket.socket) -> int:
    """Read one whole response; the slot in its X-Worker header."""
    buf = bytearray()
    head = None
    while True:
        data = s.recv(65536)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "closed before the answer")
        buf += data
        head = head or http.parse_head(buf)
        if head is not None and http.body_end(buf, head) is not None:
            if head.status != 200 or head.worker is None or not head.worker.isdigit():
                raise http.HttpError(f"answer {head.status} without a worker slot")
            return int(head.worker)


def _trickle(conns: list[_Conn], seconds: float, errors: Counter,
             answers: Counter) -> list[_Conn]:
    """A request per connection every ROUND_S, for `seconds`."""
    end = time.monotonic() + seconds
    while True:
        t = time.monotonic()
        if t >= end:
            return conns
        conns = _round(conns, errors, answers)
        time.sleep(max(0.0, min(end, t + ROUND_S) - time.monotonic()))


def _close(conns: list[_Conn]) -> None:
    for c in conns:
        c.sock.close()
    conns.clear()
