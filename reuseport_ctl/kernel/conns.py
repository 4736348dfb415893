"""The connections a listener has handed out: established TCP sockets whose
local port is the listener's (sock_diag), and which processes hold them now
(fd tables). This is how a dispatcher is seen: its children hold the
connections, not the listener.

Only the calling thread's network namespace is visible, like `ss`.
"""
from __future__ import annotations

import socket

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import SS_CLOSE_WAIT, SS_ESTABLISHED

from . import owners

# A connection a server still holds: open, or closed by the client only.
_STATES = (1 << SS_ESTABLISHED) | (1 << SS_CLOSE_WAIT)


def established(port: int) -> set[int]:
    """Inodes of the TCP connections on local port `port` that some process
    holds (a connection still in an accept queue has no inode yet)."""
    out: set[int] = set()
    with DiagSocket() as ds:
        ds.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=family, states=_STATES,
                                       protocol=socket.IPPROTO_TCP, sport=port):
                if m["idiag_sport"] == port and m["idiag_inode"]:
                    out.add(m["idiag_inode"])
    return out


def held_by(port: int, pids) -> dict[int, int]:
    """pid -> how many of port's connections it holds now, for `pids`."""
    inodes = established(port)
    if not inodes:
        return {p: 0 for p in pids}
    held = owners.holders(inodes, list(pids))
    count = {p: 0 for p in pids}
    for hs in held.values():
        for p in {h.pid for h in hs}:
            count[p] += 1
    return count
