"""The worker of `reuseport-ctl churn`: one listener whose membership the
parent decides at run time (experiments/churn.py's Group).

It epolls its listener, its connections and a control socket. Commands, one
byte each: a = start accepting (a worker may start held), l = leave: stop
accepting, close its copy of the listener, answer L, then finish the open
connections and exit. It answers R once it is in its loop.

The listener may be a UDP socket (`reuseport-ctl reload`): the worker then
echoes each datagram after a line `worker: <slot>`; "accepting" means reading.
A worker of a `pass` handover (run_passed_worker) starts without a listener
and receives it over the control socket (SCM_RIGHTS).
"""
from __future__ import annotations

import os
import select
import socket
import time

from ..kernel import process
from ..kernel import sockets as ksock
from . import http

LEAVE_FINISH_S = 2.0    # a leaving worker finishes its open connections within this


def run_churn_worker(slot: int, listener: socket.socket, ctl: socket.socket, hold: bool,
                     parent: int) -> None:
    """Body of a churn worker (see the module's docstring), in its forked
    process; returns once it has left and finished its connections."""
    process.die_with_parent(parent)
    process.close_fds_except({0, 1, 2, listener.fileno(), ctl.fileno()})
    process.set_name(f"rpctl-churn{slot}")
    ok, close_resp, bad = http.responses(slot, os.getpid())
    udp = listener.type == socket.SOCK_DGRAM
    ep = select.epoll()
    lfd, cfd = listener.fileno(), ctl.fileno()
    ctl.setblocking(False)
    ep.register(cfd, select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    accepting = leaving = False
    leave_by = 0.0

    def start_accepting() -> None:
        nonlocal accepting
        if not accepting and not leaving:
            ep.register(lfd, select.EPOLLIN)
            accepting = True

    def drop(fd: int) -> None:
        s, _ = conns.pop(fd)
        ep.unregister(fd)
        s.close()

    if not hold:
        start_accepting()
    ctl.send(b"R")
    while True:
        if leaving and (not conns or time.monotonic() > leave_by):
            break
        for fd, ev in ep.poll(0.1 if leaving else 1.0):
            if fd == lfd:
                if not accepting:           # closed by an 'l' earlier in this batch
                    continue
                if udp:
                    _echo(listener, slot)
                    continue
                for _ in range(64):         # what is queued, up to a batch
                    try:
                        c, _ = listener.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = (c, bytearray())
                    ep.register(c.fileno(), select.EPOLLIN)
            elif fd == cfd:
                try:
                    cmds = ctl.recv(64)
                except BlockingIOError:
                    continue
                if not cmds:
                    os._exit(0)             # the parent went away
                for cmd in cmds:
                    if cmd == ord("a"):
                        start_accepting()
                    elif cmd == ord("l") and not leaving:
                        if accepting:
                            ep.unregister(lfd)
                        accepting = False
                        listener.close()
                        leaving, leave_by = True, time.monotonic() + LEAVE_FINISH_S
                        ctl.send(b"L")
            elif fd in conns:
                _serve(conns, fd, drop, ok, close_resp, bad)


def run_passed_worker(slot: int, ctl: socket.socket, hold: bool, parent: int,
                      fd: int) -> None:
    """A worker that gets its listener from the process before it: it drops
    every socket it inherited, then receives the listener over `ctl`
    (SCM_RIGHTS), puts it at fd number `fd` and runs as run_churn_worker."""
    process.close_fds_except({0, 1, 2, ctl.fileno()})
    listener = ksock.receive_socket(ctl, at_fd=fd)
    run_churn_worker(slot, listener, ctl, hold, parent)


def _echo(sock: socket.socket, slot: int) -> None:
    for _ in range(64):                     # what is queued, up to a batch
        try:
            data, peer = sock.recvfrom(2048, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        try:
            sock.sendto(http.udp_reply(slot, data), peer)
        except OSError:
            pass


def _serve(conns, fd, drop, ok: bytes, close_resp: bytes, bad: bytes) -> None:
    s, buf = conns[fd]
    try:
        data = s.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        return drop(fd)
    if not data:
        return drop(fd)
    buf += data
    out = bytearray()
    keep = True
    while keep:
        try:
            r = http.next_request(buf)
        except http.BadRequest:
            out += bad
            keep = False
            break
        if r is None:
            break
        n, keep = r
        del buf[:n]
        out += ok if keep else close_resp
    try:
        if out:
            s.send(out)         # a few hundred bytes into an empty send buffer
    except OSError:
        return drop(fd)
    if not keep:
        drop(fd)
