"""Finding a running server's SO_REUSEPORT group by its port.

sock_diag lists the sockets bound to the port (their inodes), the processes'
fd tables say who holds each one, their epoll sets say who serves it. Sockets
on the same family, local address and device form one reuseport group (the
kernel never mixes IPv4 and IPv6 sockets, or two addresses, in one group).

Members are numbered in a stable order -- by serving pid, then inode -- and
that number is the slot a policy's socket array uses, so `drain:0` means "the
first worker" and a person can check which process that is. Once a policy is
pinned, its table (inode -> slot, kept current by `attach --follow`) numbers
the members instead, in every verb; sockets the table does not have come
after, flagged not in_policy.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from .errors import UserError
from .kernel import diag, netns, owners


@dataclass(frozen=True)
class Member:
    slot: int
    inode: int
    pid: int            # the process serving this socket
    fd: int             # its fd number in that process
    family: int
    addr: str           # "127.0.0.1:8080", "[::]:8080"
    queue_len: int      # accept-queue length (TCP) / bytes queued (UDP)
    holders: tuple[int, ...] = ()   # every pid holding the socket
    servers: tuple[int, ...] = ()   # every pid serving it (several: a shared listener)
    threads: tuple[int, ...] = ()   # a threaded server: the thread ids blocked on it now
                                    # (in accept, or epoll over it); () single-threaded
    in_policy: bool = True          # False: a pinned policy's table does not have it
    drops: int | None = None        # sk_drops: accept-queue overflows / UDP receive drops


@dataclass(frozen=True)
class ReuseportGroup:
    port: int
    proto: str
    members: tuple[Member, ...]
    uid: int = 0
    ifindex: int = 0
    reuseport: bool = True  # False: found with require_reuseport=False, and not a group
    where: tuple = ()       # (family, local address, ifindex): what find_group(where=) takes

    @property
    def addr(self) -> str:
        return self.members[0].addr

    @property
    def family(self) -> int:
        return self.members[0].family

    @property
    def inodes(self) -> list[int]:
        return [m.inode for m in self.members]

    def take(self) -> list[socket.socket]:
        """Every member's socket duplicated into this process, in slot order.
        The caller closes them (closing ours never affects the server's)."""
        socks: list[socket.socket] = []
        try:
            for m in self.members:
                socks.append(owners.take_socket(m.pid, m.fd, m.inode))
        except BaseException:
            for s in socks:
                s.close()
            raise
        return socks

    @contextmanager
    def taken(self):
        socks = self.take()
        try:
            yield socks
        finally:
            for s in socks:
                s.close()


@dataclass
class _Candidate:
    family: int
    addr: str
    ifindex: int
    listeners: list = field(default_factory=list)


def _norm_host(host: str) -> str:
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in ("*", ""):
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        raise UserError(f"--host takes the IP address the server listens on "
                        f"(for example 127.0.0.1 or ::), not {host!r}.") from None


def check_pid(pid: int) -> None:
    """--pid names a process of this network namespace's server."""
    if not owners.pid_exists(pid):
        raise UserError(f"no process {pid}.")
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return                          # not ours to inspect: the group search says more
    if theirs != netns.current_inode():
        raise UserError(f"process {pid} is in another network namespace (net:[{theirs}]) than "
                        f"this one, so its sockets are not on this port here: run the command "
                        f"there (`nsenter --net=/proc/{pid}/ns/net reuseport-ctl ...`).")


def other_proto(port: int, proto: str) -> str:
    """'; udp port P has sockets: add --proto udp' when nothing of `proto`
    but something of the other protocol is on the port (the usual slip: a
    UDP server asked about without --proto udp); else ''."""
    other = "udp" if proto == "tcp" else "tcp"
    if not diag.listeners(port, other):
        return ""
    return f"; {other} port {port} has sockets: add --proto {other}"


def find_group(port: int, proto: str = "tcp", pid: int | None = None,
               host: str | None = None, require_reuseport: bool = True,
               slots: dict[int, int] | None = None,
               found: list | None = None,
               procs: owners.ProcessTable | None = None,
               where: tuple | None = None) -> ReuseportGroup:
    """The one reuseport group on `port`, narrowed by `pid` (any process that
    holds one of its sockets) and `host` (its local address). With
    require_reuseport=False a listener without SO_REUSEPORT (one socket
    shared by pre-forked workers, or a single process) is returned too, its
    `reuseport` False: there is nothing to steer, but it can be watched.
    slots: a pinned policy's table, inode -> slot (pins.pinned_slots()):
    members it has keep their slot; the others follow, not in_policy.
    found, procs: the port's sockets (diag.listeners) and the process table
    (owners.process_table), when the caller has just read them.
    where: a group found before (its .where): that group again, whoever
    holds its sockets now (a watch follows its group by socket, not by pid)."""
    if not 0 < port < 65536:
        raise UserError(f"port {port} is not a port number (1-65535).")
    if pid is not None:
        check_pid(pid)
    what = "listening TCP" if proto == "tcp" else "bound UDP"

    if found is None:
        found = diag.listeners(port, proto)
    if not found:
        raise UserError(f"nothing is listening on {proto} port {port} (no {what} socket "
                        f"in this network namespace){other_proto(port, proto)}.")
    if procs is None:
        procs = owners.process_table()
    held = procs.holders({s.inode for s in found})

    cands: dict[tuple, _Candidate] = {}
    for s in found:
        c = cands.setdefault((s.family, s.addr, s.ifindex), _Candidate(s.family, s.addr, s.ifindex))
        c.listeners.append(s)
    groups = list(cands.values())

    if where is not None:
        groups = [g for g in groups if (g.family, g.addr, g.ifindex) == tuple(where)]
        if not groups:
            raise UserError(f"nothing is listening on {proto} port {port} at the watched "
                            f"address any more.")
    if pid is not None:
        groups = [g for g in groups
                  if any(h.pid == pid for s in g.listeners for h in held[s.inode])]
        if not groups:
            raise UserError(f"process {pid} ({owners.process_name(pid)}) has no {what} "
                            f"socket on port {port}.")
    if host is not None:
        want = _norm_host(host)
        groups = [g for g in groups if g.addr == want]
        if not groups:
            have = ", ".join(sorted({c.listeners[0].endpoint for c in cands.values()}))
            raise UserError(f"no {what} socket on {want} port {port} (there are: {have}).")
    if len(groups) > 1:
        have = ", ".join(g.listeners[0].endpoint for g in groups)
        how = f"--host (process {pid} holds all of them)" if pid is not None \
            else "--host or --pid"
        raise UserError(f"port {port} has {len(groups)} reuseport groups ({have}): "
                        f"choose one with {how}.")
    return _build(groups[0], held, port, proto, require_reuseport, slots)


def number_members(keys: list[tuple[int, int]],
                   slots: dict[int, int] | None) -> list[tuple[int, int, bool]]:
    """(slot, inode, in_policy) for members given as (serving pid, inode):
    without a table, slots 0.. by (pid, inode); with one, a member keeps its
    pinned slot, and the rest follow the highest pinned slot in (pid, inode)
    order."""
    order = sorted(keys)
    if slots is None:
        return [(n, ino, True) for n, (_pid, ino) in enumerate(order)]
    pinned = sorted(((slots[ino], ino) for _pid, ino in order if ino in slots))
    nxt = max(slots.values(), default=-1) + 1
    out = [(s, ino, True) for s, ino in pinned]
    for _pid, ino in order:
        if ino not in slots:
            out.append((nxt, ino, False))
            nxt += 1
    return out


def _build(cand: _Candidate, held: dict, port: int, proto: str,
           require_reuseport: bool = True,
           slots: dict[int, int] | None = None) -> ReuseportGroup:
    inodes = [s.inode for s in cand.listeners]
    orphans = [i for i in inodes if not held[i]]
    if orphans:
        raise UserError(f"no process in this pid namespace holds the socket (inode "
                        f"{orphans[0]}) on port {port}, so it cannot be taken.")
    pids = sorted({h.pid for i in inodes for h in held[i]})
    watched = {p: owners.epoll_watched(p) for p in pids}
    count = {p: sum(1 for i in inodes if any(h.pid == p for h in held[i])) for p in pids}
    serving = {i: owners.serving_holder(i, held[i], watched, count) for i in inodes}
    waits = {p: owners.waiting_threads(p) for p in {h.pid for h in serving.values()}}
    by_inode = {s.inode: s for s in cand.listeners}
    numbered = number_members([(serving[i].pid, i) for i in inodes], slots)
    members = tuple(
        Member(slot=n, inode=i, pid=serving[i].pid, fd=serving[i].fd,
               family=by_inode[i].family, addr=by_inode[i].endpoint,
               queue_len=by_inode[i].queue_len,
               holders=tuple(sorted({h.pid for h in held[i]})),
               servers=owners.serving_pids(i, held[i], watched),
               threads=_threads(waits[serving[i].pid], i), in_policy=pinned,
               drops=by_inode[i].drops)
        for n, i, pinned in numbered)
    group = ReuseportGroup(port=port, proto=proto, members=members,
                           uid=cand.listeners[0].uid, ifindex=cand.ifindex,
                           where=(cand.family, cand.addr, cand.ifindex))
    if _uses_reuseport(group):
        return group
    if require_reuseport:
        raise UserError(f"the listener on port {group.port} does not use SO_REUSEPORT, "
                        f"so there is no group to steer (nginx: add `reuseport` to its "
                        f"`listen`; `reuseport-ctl watch --port {group.port}"
                        f"{' --proto udp' if proto == 'udp' else ''}` still shows how the "
                        f"workers share it).")
    return replace(group, reuseport=False)


def _threads(waiting: dict[int, set[int]], inode: int) -> tuple[int, ...]:
    """The threads waiting on socket `inode`, if the process has more than one."""
    if len(waiting) < 2:
        return ()
    return tuple(sorted(t for t, inodes in waiting.items() if inode in inodes))


def _uses_reuseport(group: ReuseportGroup) -> bool:
    with group.taken() as socks:
        return all(owners.uses_reuseport(s) for s in socks)
