"""Where a watch's rows come from.

ForeignSource: any server on the port. Its reuseport group (sock_diag, fd
tables, epoll sets: groups.find_group) gives one row per member socket --
the thing the kernel chooses among -- labelled with the serving process and,
for a threaded server, the threads blocked on it. A listener shared without
SO_REUSEPORT gives one row per serving process instead (the kernel picks no
socket there; the first to wake and accept() wins). A dispatcher (the
listener's connections are held by processes that do not hold the listener:
Node's cluster, any acceptor that hands connections to children) adds one
row per child with the connections it holds now.

OwnSource: the group this process started (`run --watch`), whose workers
count their own accepts and EAGAINs exactly.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import psutil

from .. import pins
from ..errors import UserError
from ..groups import ReuseportGroup, find_group
from ..kernel import conns, diag, owners, process
from ..stats.health import outsiders
from ..stats.live import WorkerObs

CHILD_SLOT = -1         # a dispatcher's child is no slot of the group


class CpuSampler:
    """Per process: CPU % since the previous sample (None the first time),
    CPU seconds, and how many threads it has."""

    def __init__(self):
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pids) -> dict[int, tuple[Optional[float], Optional[float], int]]:
        out = {}
        for pid in pids:
            p = self._procs.get(pid)
            first = p is None
            try:
                if first:
                    p = self._procs[pid] = psutil.Process(pid)
                with p.oneshot():
                    pct = p.cpu_percent(None)
                    t = p.cpu_times()
                    threads = p.num_threads()
                out[pid] = (None if first else pct, t.user + t.system, threads)
            except psutil.Error:
                self._procs.pop(pid, None)
                out[pid] = (None, None, 1)
        for pid in set(self._procs) - set(pids):
            del self._procs[pid]
        return out


def member_rows(group: ReuseportGroup, session: Optional[int] = None) -> list[WorkerObs]:
    """A reuseport group: one row per member socket, in slot order, with
    what member health needs: its drops, its process's state, and whether
    that process belongs to the server's session (stats/health.outsiders;
    `session`: the server's, as --pid resolved it, else the majority's)."""
    pids = {m.pid for m in group.members}
    stat = {p: process.stat(p) for p in pids}
    sessions = {p: st.session for p, st in stat.items() if st.session is not None}
    outside = outsiders(sessions, [m.pid for m in group.members], server=session)
    states = {p: stat[p].state for p in pids}
    return [WorkerObs(pid=m.pid, slot=m.slot, inodes=(m.inode,), queue_len=m.queue_len,
                      tids=m.threads, drops=m.drops, state=states[m.pid],
                      outside=outside.get(m.pid))
            for m in group.members]


def process_rows(group: ReuseportGroup) -> list[WorkerObs]:
    """A listener shared without SO_REUSEPORT: one row per serving process
    (every worker that shares it), numbered by the lowest slot it serves."""
    rows: dict[int, dict] = {}
    for m in group.members:
        for pid in m.servers or (m.pid,):
            r = rows.setdefault(pid, {"slot": m.slot, "inodes": [], "queue": 0,
                                      "shared": False, "tids": set()})
            r["slot"] = min(r["slot"], m.slot)
            r["inodes"].append(m.inode)
            r["queue"] += m.queue_len
            r["shared"] |= len(m.servers) > 1
            if pid == m.pid:
                r["tids"].update(m.threads)
    return [WorkerObs(pid=p, slot=r["slot"], inodes=tuple(r["inodes"]), queue_len=r["queue"],
                      shared=r["shared"], tids=tuple(sorted(r["tids"])))
            for p, r in rows.items()]


def rows_of(group: ReuseportGroup, session: Optional[int] = None) -> list[WorkerObs]:
    return member_rows(group, session) if group.reuseport else process_rows(group)


def stable_slots(group: ReuseportGroup, slots: dict[int, int]) -> ReuseportGroup:
    """The group with each socket's slot kept for the watch's life: `slots`
    (inode -> slot, updated here) keeps the slot a socket had when first
    seen; a new socket takes the lowest slot no present socket holds (so a
    socket that changes process keeps its number, and a replaced socket's
    number is reused). The first sight numbers as groups.find_group does."""
    present = {m.inode for m in group.members}
    for gone in [i for i in slots if i not in present]:
        del slots[gone]
    used = set(slots.values())
    members = []
    for m in group.members:                 # find_group's order: (pid, inode) at first
        if m.inode not in slots:
            k = 0
            while k in used:
                k += 1
            slots[m.inode] = k
            used.add(k)
        members.append(replace(m, slot=slots[m.inode]))
    return replace(group, members=tuple(sorted(members, key=lambda m: m.slot)))


class ForeignSource:
    """Any server on the port: its rows from the sockets and their holders."""
    own = False

    def __init__(self, port: int, proto: str, host: Optional[str], pid: Optional[int]):
        self.port, self.proto, self.host, self.pid = port, proto, host, pid
        self.group: Optional[ReuseportGroup] = None
        # --pid picks the group once (the one whose sockets that pid holds)
        # and the server (that pid's session); from then on the group is
        # followed by its address, whoever serves its sockets, so the pid
        # exiting (a worker killed and respawned) loses nothing.
        self.where: Optional[tuple] = None      # the group's (family, address, ifindex)
        self.session: Optional[int] = None      # the server's session, from --pid
        self._slots: dict[int, int] = {}        # inode -> slot, stable over the watch
        self.pinned: Optional[pins.PolicyState] = None   # the pinned policy, read each find()
        self._dispatcher = False
        self._children: set[int] = set()    # pids seen holding the listener's connections
        self._procs: Optional[owners.ProcessTable] = None   # read by the last find()

    def _find_group(self) -> ReuseportGroup:
        # A pinned policy numbers the members (its socket array's slots), so
        # watch, status and attach show the same slot for the same socket.
        # One sock_diag dump serves both; one walk over the process table
        # serves the group's holders and a dispatcher's children (TCP).
        found = diag.listeners(self.port, self.proto)
        self.pinned = pins.policy_state(self.port, self.proto, listening=found)
        self._procs = owners.process_table(parents=self.proto == "tcp")
        slots = self.pinned.slots if self.pinned is not None else None
        if self.where is not None and not any(
                (s.family, s.addr, s.ifindex) == self.where for s in found):
            self.where = None               # the group is gone (--wait): find it anew
        if self.where is not None:
            group = find_group(self.port, self.proto, require_reuseport=False, found=found,
                               procs=self._procs, slots=slots, where=self.where)
        else:
            # --pid once more only if it still lives (a group found anew after
            # the whole server restarted: its old pid is no guide any more)
            pid = self.pid if self.session is None or owners.pid_exists(self.pid) else None
            group = find_group(self.port, self.proto, pid=pid, host=self.host,
                               require_reuseport=False, found=found, procs=self._procs,
                               slots=slots)
            self.where = group.where
            if self.pid is not None and self.session is None:
                self.session = process.stat(self.pid).session
        if slots is not None:               # the policy's table numbers them
            self._slots.clear()
            return group
        return stable_slots(group, self._slots)

    def find(self, first: bool = False) -> Optional[list[WorkerObs]]:
        """The rows now; None when nothing listens on the port. A group that
        cannot be read this instant (a process exiting mid-scan) keeps its
        last members, less those that exited."""
        try:
            self.group = self._find_group()
        except UserError:
            if not diag.listeners(self.port, self.proto):
                self.group = None
                return None
            if first or self.group is None:
                raise
            return [w for w in rows_of(self.group, self.session)
                    if owners.pid_exists(w.pid)]
        return self._with_children(rows_of(self.group, self.session))

    def _with_children(self, rows: list[WorkerObs]) -> list[WorkerObs]:
        """A dispatcher's rows: the listener's, then one per child holding
        (or once seen holding) the port's connections."""
        if self.proto != "tcp" or self.group is None or self._procs is None:
            return rows
        holders = sorted({p for m in self.group.members for p in (m.holders or (m.pid,))})
        kids = self._procs.descendants(holders)
        held = conns.held_by(self.port, [*holders, *kids])
        now = {k for k in kids if held.get(k)}
        if now:
            self._dispatcher = True         # stays so: idle children still are children
            self._children |= now
        if not self._dispatcher:
            return rows
        self._children &= set(kids)         # a child that exited is gone
        return [replace(w, conns=held.get(w.pid, 0)) for w in rows] + [
            WorkerObs(pid=k, slot=CHILD_SLOT, inodes=(), child=True, conns=held.get(k, 0))
            for k in sorted(self._children)]

    def dispatcher(self) -> bool:
        return self._dispatcher

    def policy(self) -> str:
        """reuseport-ctl's policy pinned on the group in this namespace, or
        "kernel" (as of the last find())."""
        return self.pinned.policy if self.pinned is not None else "kernel"

    def policy_owner(self) -> Optional[dict]:
        """The `reuseport-ctl run` whose group this is, when its policy is pinned."""
        return self.pinned.owner if self.pinned is not None else None

    def policy_note(self) -> Optional[str]:
        """The pinned policy is not in force: the one line that says why."""
        return self.pinned.divergence if self.pinned is not None else None

    def selections(self) -> Optional[list[int]]:
        try:
            st = pins.status(self.port, self.proto)
        except (UserError, OSError):
            return None
        counts = [s.selections for s in st.slots]
        return None if any(c is None for c in counts) else counts

    def addr(self) -> str:
        return self.group.addr if self.group is not None else ""

    def reuseport(self) -> bool:
        return self.group is None or self.group.reuseport

    def listeners(self) -> int:
        return len(self.group.members) if self.group is not None else 1


class OwnSource:
    """The group this process started (`run --watch`): its workers' own
    counters give accepts and spurious wakeups exactly."""
    own = True

    def __init__(self, sup):
        self.sup = sup
        self.port, self.proto = sup.port, sup.cfg.proto
        self._field = "accepts" if self.proto == "tcp" else "datagrams"
        self._inodes = [os.fstat(s.fileno()).st_ino for s in sup.socks]

    def find(self, first: bool = False) -> Optional[list[WorkerObs]]:
        sup, cfg = self.sup, self.sup.cfg
        socks = {s.inode: s for s in diag.listeners(self.port, self.proto)}
        recs = sup.counters.snapshot()
        out = []
        for index, pid in sorted(sup.pids().items()):
            if index >= cfg.workers:            # the dispatcher's acceptor
                continue
            if cfg.model == "reuseport":
                inodes: tuple[int, ...] = (self._inodes[index],)
            elif cfg.model == "dispatcher":
                inodes = ()                     # the acceptor hands connections over
            else:
                inodes = (self._inodes[0],)
            drops = [socks[i].drops for i in inodes if i in socks]
            out.append(WorkerObs(pid=pid, slot=index, inodes=inodes,
                                 queue_len=sum(socks[i].queue_len for i in inodes if i in socks),
                                 drops=sum(drops) if drops and None not in drops else None,
                                 state=process.state(pid),
                                 accepts=recs[index][self._field],
                                 eagain=recs[index]["eagain"],
                                 shared=cfg.model not in ("reuseport", "dispatcher")))
        return out

    def dispatcher(self) -> bool:
        return False            # our own workers count what they were handed: exact

    def policy(self) -> str:
        return str(self.sup.cfg.policy)

    def policy_note(self) -> Optional[str]:
        return None             # the supervisor refills the array as workers restart

    def reuseport(self) -> bool:
        return self.sup.cfg.model == "reuseport"

    def listeners(self) -> int:
        return len(self._inodes)

    def selections(self) -> Optional[list[int]]:
        return self.sup.selections()

    def addr(self) -> str:
        return diag.endpoint(self.sup.cfg.host, self.port)
