"""Sockets for the checks: build a reuseport group, send one flow (a TCP
connection or a UDP datagram) and see which member receives it, as the
kernel's selftests do. Plain sockets; a Pool closes whatever a check made."""
from __future__ import annotations

import errno
import os
import select
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..closing import Closing
# the steering setsockopts live in kernel/reuseport.py; the checks take them from here
from ..kernel.reuseport import attach_cbpf, attach_ebpf, detach  # noqa: F401

TCP, UDP = "tcp", "udp"
REFUSED = "refused"
BACKLOG = 128


@dataclass(frozen=True)
class Family:
    name: str           # ipv4, ipv6, v4-mapped
    server: int         # address family of the group's sockets
    bind: str           # the group's address
    client: int         # address family of the sender
    dst: str            # where the sender sends
    src: str            # the sender's address

    @property
    def v6only(self) -> bool | None:
        return None if self.server == socket.AF_INET else self.name == "ipv6"


IPV4 = Family("ipv4", socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1", "127.0.0.1")
IPV6 = Family("ipv6", socket.AF_INET6, "::1", socket.AF_INET6, "::1", "::1")
# A dual-stack IPv6 group receiving IPv4 (its members see ::ffff:127.0.0.1).
V4MAPPED = Family("v4-mapped", socket.AF_INET6, "::", socket.AF_INET, "127.0.0.1", "127.0.0.1")
FAMILIES = (IPV4, IPV6, V4MAPPED)


class Pool(Closing):
    """Every socket a check opens, closed together."""

    def __init__(self):
        self.socks: list[socket.socket] = []

    def add(self, s: socket.socket) -> socket.socket:
        self.socks.append(s)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()

    # --- the group ------------------------------------------------------------

    def member(self, proto: str, af: int, addr: str, port: int = 0, *,
               reuseport: bool = True, v6only: bool | None = None,
               listen: bool = True, before_bind=None) -> socket.socket:
        kind = socket.SOCK_STREAM if proto == TCP else socket.SOCK_DGRAM
        s = self.add(socket.socket(af, kind))
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if af == socket.AF_INET6 and v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        if before_bind:
            before_bind(s)
        s.bind((addr, port))
        if proto == TCP and listen:
            s.listen(BACKLOG)
        s.setblocking(False)
        return s

    def group(self, proto: str, fam: Family, n: int, port: int = 0, *, addr: str | None = None,
              before_bind=None) -> tuple[list[socket.socket], int]:
        """n reuseport members on fam's address (or addr); the port is chosen
        by the kernel for the first one unless given."""
        socks = []
        for _ in range(n):
            s = self.member(proto, fam.server, fam.bind if addr is None else addr, port,
                            v6only=fam.v6only, before_bind=before_bind)
            port = s.getsockname()[1]
            socks.append(s)
        return socks, port

    # --- flows ------------------------------------------------------------------

    def send(self, proto: str, fam: Family, port: int, sport: int = 0,
             dst: str | None = None, payload: bytes = b"x") -> socket.socket | str:
        """One flow to fam.dst:port from sport (0: any); TCP: a completed
        handshake. Returns the client socket, or REFUSED."""
        kind = socket.SOCK_STREAM if proto == TCP else socket.SOCK_DGRAM
        c = self.add(socket.socket(fam.client, kind))
        if sport:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind((fam.src, sport))
        target = (dst or fam.dst, port)
        if proto == UDP:
            c.sendto(payload, target)
            return c
        c.settimeout(3)
        try:
            c.connect(target)
        except ConnectionRefusedError:
            return REFUSED
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                return REFUSED
            raise
        return c


def receiver(socks: list[socket.socket], proto: str, timeout: float = 1.0,
             keep: list | None = None) -> int | None:
    """Which member received the next flow (TCP: a connection to accept,
    UDP: a datagram); it is taken off that member's queue. None: nobody within
    timeout. keep: accepted TCP children are appended instead of closed."""
    p = select.poll()
    for i, s in enumerate(socks):
        p.register(s.fileno(), select.POLLIN)
    index = {s.fileno(): i for i, s in enumerate(socks)}
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready = p.poll(left * 1000)
        for fd, _ in ready:
            i = index[fd]
            try:
                if proto == TCP:
                    child, _ = socks[i].accept()
                    if keep is not None:
                        keep.append(child)
                    else:
                        child.close()
                else:
                    socks[i].recvfrom(65536)
            except BlockingIOError:
                continue
            return i


def flows(pool: Pool, proto: str, fam: Family, socks: list[socket.socket], port: int,
          sports=None, count: int = 0, dst: str | None = None, timeout: float = 1.0) -> list:
    """Send flows one at a time; for each, the receiving member's index,
    None (nobody received it) or REFUSED (TCP connect refused)."""
    out = []
    for sport in (sports if sports is not None else [0] * count):
        c = pool.send(proto, fam, port, sport, dst)
        if c == REFUSED:
            out.append(REFUSED)
            continue
        out.append(receiver(socks, proto, timeout))
        if proto == TCP:                    # done with it: keep fds few
            pool.socks.remove(c)
            c.close()
    return out


def counts(seen: list, n: int) -> list[int]:
    return [sum(1 for x in seen if x == i) for i in range(n)]


def sports(n: int, base: int = 20000) -> list[int]:
    """n source ports with sport % n == 0, 1, ..., n-1 in order."""
    start = base - base % n
    return [start + i for i in range(n)]


# --- steering programs ---------------------------------------------------------



@contextmanager
def pinned(cpu: int):
    """Run on one CPU: on loopback the receive path runs on the sender's CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def sysctl(path: str, value: str):
    """Set a sysctl (net.* ones are per network namespace), restore it after."""
    f = "/proc/sys/" + path.replace(".", "/")
    with open(f) as fh:
        old = fh.read().strip()
    with open(f, "w") as fh:
        fh.write(value)
    try:
        yield old
    finally:
        with open(f, "w") as fh:
            fh.write(old)
