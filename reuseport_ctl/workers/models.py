"""The worker loops, one per process model. Each is genuinely that model, so a
kernel developer can compare how the kernel spreads work across them:

  reuseport               own SO_REUSEPORT socket; epoll over it and its conns
  shared-accept           one socket; blocking accept() (wake-one), serve the
                          connection to its end, accept again (pre-fork)
  shared-epoll            one socket in every worker's epoll: every worker
                          wakes, the losers' accept() says EAGAIN (the herd)
  shared-epoll-exclusive  the same with EPOLLEXCLUSIVE: one waiter is woken
  dispatcher              one acceptor accepts and hands each connection
                          (SCM_RIGHTS) or datagram round-robin to workers

One accept()/recvfrom() per readiness (epoll is level-triggered): a wakeup
that finds nothing is then exactly one EAGAIN, counted as such.
"""
from __future__ import annotations

import os
import select
import socket
import time

from .counters import ACCEPTS, DATAGRAMS, EAGAIN, READY, REQUESTS, WAKEUPS, Slot
from .http import BadRequest, next_request, responses, udp_reply

MODELS = ("reuseport", "shared-accept", "shared-epoll", "shared-epoll-exclusive", "dispatcher")
KEEPALIVE_IDLE_S = 5.0      # shared-accept: a worker is stuck with an idle client until then
_RECV = 65536
_IN = select.EPOLLIN

# --- per-request work (bench --work-us) -----------------------------------------
# Busy CPU time spent on each request before it is answered, to emulate request
# processing. Set once in the worker process (supervisor, from RunConfig.work_us).
WORK_US = 0


def set_work_us(us: int) -> None:
    global WORK_US
    WORK_US = int(us)


def _work() -> None:
    end = time.perf_counter_ns() + WORK_US * 1000
    while time.perf_counter_ns() < end:
        pass


def run_worker(model: str, proto: str, slot: int, ctr: Slot, sock: socket.socket | None,
               chan: socket.socket | None) -> None:
    """Serve forever in this process. `sock` is the worker's listener or UDP
    socket (dispatcher+UDP: the shared socket it replies on); `chan` is its
    end of the dispatcher's unix socket."""
    exclusive = model == "shared-epoll-exclusive"
    if proto == "tcp":
        if model == "shared-accept":
            return _tcp_blocking(slot, ctr, sock)
        if model == "dispatcher":
            return _tcp_epoll(slot, ctr, None, chan=chan)
        return _tcp_epoll(slot, ctr, sock, exclusive=exclusive)
    if model == "shared-accept":
        return _udp_blocking(slot, ctr, sock)
    if model == "dispatcher":
        return _udp_from_channel(slot, ctr, sock, chan)
    return _udp_epoll(slot, ctr, sock, exclusive=exclusive)


def run_acceptor(proto: str, ctr: Slot, sock: socket.socket, chans: list[socket.socket]) -> None:
    """The dispatcher: the only process that accepts or reads the socket."""
    ctr.set(READY, 1)
    rr = 0
    while True:
        if proto == "tcp":
            conn, _ = sock.accept()
            ctr.inc(WAKEUPS)
            ctr.inc(ACCEPTS)
            with conn:
                rr = _hand_off(chans, rr, lambda ch: socket.send_fds(ch, [b"c"], [conn.fileno()]))
        else:
            data, peer = sock.recvfrom(_RECV)
            ctr.inc(WAKEUPS)
            ctr.inc(DATAGRAMS)
            msg = " ".join(map(str, peer)).encode() + b"\n" + data
            rr = _hand_off(chans, rr, lambda ch: ch.send(msg))


def _hand_off(chans: list[socket.socket], rr: int, send) -> int:
    """Send to the next worker round-robin, skipping one whose queue is full
    (a slow or restarting worker); wait only when every queue is full."""
    while True:
        for k in range(len(chans)):
            i = (rr + k) % len(chans)
            try:
                send(chans[i])
                return (i + 1) % len(chans)
            except BlockingIOError:
                continue
        select.select([], chans, [], 1.0)


# --- TCP ----------------------------------------------------------------------

class _Conn:
    __slots__ = ("sock", "inbuf", "outbuf", "closing", "want_out")

    def __init__(self, sock: socket.socket):
        self.sock, self.inbuf, self.outbuf = sock, bytearray(), bytearray()
        self.closing = self.want_out = False


class _HttpConns:
    """The HTTP connections of one epoll loop, nonblocking."""

    def __init__(self, ep: select.epoll, ctr: Slot, slot: int):
        self.ep, self.ctr, self.conns = ep, ctr, {}
        self.ok, self.close, self.bad = responses(slot, os.getpid())

    def add(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.conns[sock.fileno()] = _Conn(sock)
        self.ep.register(sock.fileno(), _IN)

    def event(self, fd: int, ev: int) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        if ev & select.EPOLLOUT:
            self._flush(c)
        if c.sock.fileno() >= 0 and ev & (_IN | select.EPOLLHUP | select.EPOLLERR):
            self._read(c)

    def _read(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            return self._drop(c)
        if not data:
            return self._drop(c)
        if c.closing:           # answered "close" already: ignore what follows
            return
        c.inbuf += data
        while not c.closing:
            try:
                r = next_request(c.inbuf)
            except BadRequest:
                c.outbuf += self.bad
                c.closing = True
                break
            if r is None:
                break
            n, keep = r
            del c.inbuf[:n]
            self.ctr.inc(REQUESTS)
            if WORK_US:
                _work()
            c.outbuf += self.ok if keep else self.close
            c.closing = not keep
        self._flush(c)

    def _flush(self, c: _Conn) -> None:
        if c.outbuf:
            try:
                del c.outbuf[:c.sock.send(c.outbuf)]
            except BlockingIOError:
                pass
            except OSError:
                return self._drop(c)
        if not c.outbuf and c.closing:
            return self._drop(c)
        if bool(c.outbuf) != c.want_out:        # wait for room only while we have bytes
            c.want_out = bool(c.outbuf)
            self.ep.modify(c.sock.fileno(), _IN | (select.EPOLLOUT if c.want_out else 0))

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        self.conns.pop(fd, None)
        self.ep.unregister(fd)
        c.sock.close()


def _tcp_epoll(slot: int, ctr: Slot, listener: socket.socket | None, *,
               exclusive: bool = False, chan: socket.socket | None = None) -> None:
    ep = select.epoll()
    conns = _HttpConns(ep, ctr, slot)
    lfd = cfd = -1
    if listener is not None:
        lfd = listener.fileno()
        ep.register(lfd, _IN | (select.EPOLLEXCLUSIVE if exclusive else 0))
    if chan is not None:
        chan.setblocking(False)
        cfd = chan.fileno()
        ep.register(cfd, _IN)
    ctr.set(READY, 1)
    while True:
        events = ep.poll()
        ctr.inc(WAKEUPS)
        for fd, ev in events:
            if fd == lfd:
                try:
                    sock, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    ctr.inc(EAGAIN)         # woken, but another worker took it
                    continue
                except ConnectionAbortedError:
                    continue
                ctr.inc(ACCEPTS)
                conns.add(sock)
            elif fd == cfd:
                try:
                    _, fds, _, _ = socket.recv_fds(chan, 16, 8)
                except BlockingIOError:
                    ctr.inc(EAGAIN)
                    continue
                for f in fds:
                    ctr.inc(ACCEPTS)
                    conns.add(socket.socket(fileno=f))
            else:
                conns.event(fd, ev)


def _tcp_blocking(slot: int, ctr: Slot, listener: socket.socket) -> None:
    ok, close, bad = responses(slot, os.getpid())
    ctr.set(READY, 1)
    while True:
        conn, _ = listener.accept()         # sleeps in the kernel; woken one at a time
        ctr.inc(WAKEUPS)
        ctr.inc(ACCEPTS)
        with conn:
            conn.settimeout(KEEPALIVE_IDLE_S)
            _serve_to_end(conn, ctr, ok, close, bad)


def _serve_to_end(conn: socket.socket, ctr: Slot, ok: bytes, close: bytes, bad: bytes) -> None:
    buf = bytearray()
    try:
        while True:
            try:
                r = next_request(buf)
            except BadRequest:
                conn.sendall(bad)
                return
            if r is None:
                data = conn.recv(_RECV)
                if not data:
                    return
                buf += data
                continue
            n, keep = r
            del buf[:n]
            ctr.inc(REQUESTS)
            if WORK_US:
                _work()
            conn.sendall(ok if keep else close)
            if not keep:
                return
    except OSError:         # reset, timeout: the connection is over
        return


# --- UDP ----------------------------------------------------------------------

def _udp_epoll(slot: int, ctr: Slot, sock: socket.socket, *, exclusive: bool) -> None:
    ep = select.epoll()
    ep.register(sock.fileno(), _IN | (select.EPOLLEXCLUSIVE if exclusive else 0))
    ctr.set(READY, 1)
    while True:
        ep.poll()
        ctr.inc(WAKEUPS)
        try:
            data, peer = sock.recvfrom(_RECV)
        except (BlockingIOError, InterruptedError):
            ctr.inc(EAGAIN)
            continue
        ctr.inc(DATAGRAMS)
        _echo(sock, slot, data, peer)


def _udp_blocking(slot: int, ctr: Slot, sock: socket.socket) -> None:
    ctr.set(READY, 1)
    while True:
        data, peer = sock.recvfrom(_RECV)
        ctr.inc(WAKEUPS)
        ctr.inc(DATAGRAMS)
        _echo(sock, slot, data, peer)


def _udp_from_channel(slot: int, ctr: Slot, sock: socket.socket, chan: socket.socket) -> None:
    """Datagrams forwarded by the acceptor; the reply leaves from the shared
    socket, so the client sees the address it sent to."""
    ctr.set(READY, 1)
    while True:
        msg = chan.recv(_RECV + 128)
        ctr.inc(WAKEUPS)
        ctr.inc(DATAGRAMS)
        head, _, data = msg.partition(b"\n")
        host, *rest = head.decode().split()
        _echo(sock, slot, data, (host, *map(int, rest)))


def _echo(sock: socket.socket, slot: int, data: bytes, peer) -> None:
    if WORK_US:
        _work()
    try:
        sock.sendto(udp_reply(slot, data), peer)
    except OSError:         # the client went away; UDP does not care
        pass
