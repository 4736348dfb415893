"""sock_diag over netlink (pyroute2's DiagSocket): the listening TCP sockets
and bound UDP sockets on a local port, as the kernel reports them.

Only the calling thread's network namespace is visible, exactly like `ss`.
"""
from __future__ import annotations

import errno
import socket
import sys
from dataclasses import dataclass

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_CLOSE, SS_LISTEN

from ..errors import UserError

PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
# A listening TCP socket is in TCP_LISTEN; a bound, unconnected UDP socket
# (the only kind a reuseport group selects among) is in TCP_CLOSE.
STATES = {"tcp": 1 << SS_LISTEN, "udp": 1 << SS_CLOSE}
INET_DIAG_SKMEMINFO = 7           # the socket's sk_meminfo array, u32 each
SK_MEMINFO_DROPS = 8              # ... whose 9th entry is sk_drops


@dataclass(frozen=True)
class Listener:
    """One socket bound to the port, as inet_diag describes it."""
    inode: int
    family: int          # socket.AF_INET or socket.AF_INET6
    proto: str           # "tcp" | "udp"
    addr: str            # local address, as the kernel prints it
    port: int
    ifindex: int         # SO_BINDTODEVICE, 0 if unbound
    uid: int
    queue_len: int       # idiag_rqueue: TCP accept-queue length / UDP bytes queued
    backlog: int         # idiag_wqueue: TCP listen() backlog / UDP bytes to send
    cookie: int = 0      # idiag_cookie: the socket cookie BPF programs see
    drops: int | None = None  # sk_drops (SK_MEMINFO_DROPS): TCP: SYNs and handshakes
                              # dropped because the accept queue was full; UDP:
                              # datagrams dropped (receive buffer full, filter)

    @property
    def endpoint(self) -> str:
        return endpoint(self.addr, self.port)


def endpoint(addr: str, port: int) -> str:
    """"127.0.0.1:80", "[::1]:80": how the tool writes a local address."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _drops(meminfo: str | None) -> int | None:
    """sk_drops from INET_DIAG_SKMEMINFO, which pyroute2 hands over as hex
    bytes "aa:bb:..." (u32s in host order)."""
    if not meminfo:
        return None
    raw = bytes.fromhex(meminfo.replace(":", ""))
    at = 4 * SK_MEMINFO_DROPS
    return int.from_bytes(raw[at:at + 4], sys.byteorder) if len(raw) >= at + 4 else None


def listeners(port: int, proto: str = "tcp") -> list[Listener]:
    """Every IPv4 and IPv6 socket listening (TCP) or bound unconnected (UDP)
    on local port `port`, ordered by inode."""
    if proto not in PROTOS:
        raise UserError(f"unknown protocol {proto!r}: choose tcp or udp.")
    found: list[Listener] = []
    try:
        with DiagSocket() as ds:
            ds.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                msgs = ds.get_sock_stats(family=family, states=STATES[proto],
                                         protocol=PROTOS[proto], sport=port,
                                         extensions=1 << (INET_DIAG_SKMEMINFO - 1))
                for m in msgs:
                    # The kernel filters listeners by sport but not every
                    # protocol honours it: filter again.
                    if m["idiag_sport"] != port or m["idiag_inode"] == 0:
                        continue
                    found.append(Listener(
                        inode=m["idiag_inode"], family=m["idiag_family"], proto=proto,
                        addr=m["idiag_src"], port=port, ifindex=m["idiag_if"],
                        uid=m["idiag_uid"], queue_len=m["idiag_rqueue"],
                        backlog=m["idiag_wqueue"], cookie=m["idiag_cookie"],
                        drops=_drops(m.get_attr("INET_DIAG_SKMEMINFO"))))
    except OSError as e:
        if e.errno in (errno.EPROTONOSUPPORT, errno.ENOENT):
            raise UserError(f"this kernel has no {proto} sock_diag (inet_diag) support, "
                            f"so reuseport-ctl cannot list the sockets on a port.") from None
        raise
    found.sort(key=lambda s: s.inode)
    return found
