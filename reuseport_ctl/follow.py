"""`attach --follow`: keep a pinned policy in force while the group changes.

A REUSEPORT_SOCKARRAY entry is removed when its socket closes, and a socket
that joins the group later (a restarted worker binds a new one: gunicorn
--reuse-port, a Go or Node server restarting one process) is in no slot:
the selector finds an empty slot, and the kernel's hash decides instead,
over every socket, the new one included. Nothing in the kernel tells the
array about either change, so a follower does, a few times a second:

- sock_diag lists the sockets on the group's address (their cookies);
  the socket array gives the cookie in each slot;
- a slot whose socket closed is left out of the policy's table (the
  policy stops choosing it instead of handing its share to the hash);
- a new socket is taken with pidfd_getfd and put in the slot its
  predecessor vacated (the lowest vacant one; a new slot after the last
  if none is), so slot numbers keep meaning the same worker, and the
  table takes the slot back; the pinned program is attached again
  through it (a no-op while the group lives, and what a group that was
  restarted whole needs: its program went with the old sockets);
- the pinned record (`meta`) is rewritten, so status and watch number
  the members the same way.

A cBPF policy indexes the group in join order, which the kernel does not
show: on any change it is attached again for the new group size.

Why a supervisor and not the kernel: a sock_ops program sees a TCP socket
listen (BPF_SOCK_OPS_TCP_LISTEN_CB) and could add it to a SOCKHASH, but
only for TCP, only for servers inside the cgroup it is attached to, and a
kernel-side slot choice would lose the stable slot numbers drain:K and
weighted:W mean. A UDP bind is seen by cgroup post_bind programs, which
cannot update a sockmap. The follower handles both protocols the same way
and keeps slots stable; its cost is one sock_diag dump per tick, and a
/proc walk only when a socket joins.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .groups import find_group
from .kernel import bpffs, diag, owners, process, reuseport
from .pins import Meta, current_pin, divergence, open_pinned, read_meta, update_meta
from .policies import parse_policy
from .stats.health import session_name

INTERVAL = 0.2             # seconds between looks at the group


class Stopped(Exception):
    """The pinned policy is no longer this follower's to keep."""


class Unreachable(Exception):
    """The BPF filesystem that holds the pins cannot be reached from here
    (not a detach: the pins may well be there)."""


def _bpffs_root(path: Path) -> Path:
    """The bpffs directory a pin directory is in (the parent of reuseport-ctl/)."""
    for p in path.parents:
        if p.name == "reuseport-ctl":
            return p.parent
    return path.parent


@dataclass
class Event:
    """One change the follower saw (and what it did about it)."""
    ts: float
    kind: str                  # "left" | "joined" | "reattached" | "diverged"
    slot: int | None = None
    pid: int | None = None
    inode: int | None = None
    text: str = ""

    def as_dict(self) -> dict:
        return {"event": self.kind, "ts": round(self.ts, 3), "slot": self.slot,
                "pid": self.pid, "inode": self.inode, "text": self.text}


def _server_session(group) -> int | None:
    """The session most of the policy's members run in (None: none in it, as
    after a whole restart: then every new socket is the server's). Session 0
    is a real one: its leader is outside this pid namespace."""
    count: dict[int, int] = {}
    for m in (group.members if group else ()):
        if m.in_policy and (sid := process.session(m.pid)) is not None:
            count[sid] = count.get(sid, 0) + 1
    return max(count, key=lambda k: (count[k], -k)) if count else None


@dataclass
class Follower:
    port: int
    proto: str
    path: Path
    meta: Meta
    pid: int = field(default_factory=os.getpid)
    _fds: dict[str, int] = field(default_factory=dict)
    _said: set[str] = field(default_factory=set)
    _refused: set[int] = field(default_factory=set)   # inodes of outsiders' sockets

    @classmethod
    def for_port(cls, port: int, proto: str) -> "Follower":
        pin = current_pin(proto, port)
        if pin is None or pin.state != "here":
            raise UserError(f"no reuseport-ctl policy is attached to {proto} port {port} "
                            f"in this network namespace.")
        f = cls(port, proto, pin.path, pin.meta)
        if f.meta.kind == "ebpf":
            for name in ("socks", "table", "config"):
                f._fds[name] = open_pinned(f.path, f"map_{name}")
        return f

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # --- one look -----------------------------------------------------------------

    def _gone(self) -> bool:
        """The pin directory is gone from a bpffs we still reach: detached.
        (Under `ip netns exec` the bpffs is reached through a directory kept
        open, kernel/bpffs.py, so the shell that ran us exiting changes
        nothing; a bpffs that cannot be reached is never taken for a detach.)"""
        if self.path.exists():
            return False
        if not _bpffs_root(self.path).is_dir():
            raise Unreachable(f"the BPF filesystem holding the pins "
                              f"({bpffs.shown(self.path)}) cannot be reached from here")
        return True

    def _check_ours(self) -> None:
        now = None if self._gone() else read_meta(self.path)
        if now is None:
            raise Stopped("the policy was detached")
        if now.created != self.meta.created or (now.follower or {}).get("pid") != self.pid:
            raise Stopped("another attach replaced the policy")
        self.meta = now

    def step(self) -> list[Event]:
        """Look at the group once; repair the table if it changed."""
        self._check_ours()
        live = [s for s in diag.listeners(self.port, self.proto) if s.endpoint == self.meta.addr]
        if self.meta.kind == "cbpf":
            return self._step_cbpf(live)
        return self._step_ebpf(live)

    def _step_ebpf(self, live) -> list[Event]:
        from .policies.selector import LEAST_MAX_SLOTS, MAX_SLOTS, read_fallbacks
        from .policies.sockarray import put_in_slot, sockarray_cookies
        meta, events = self.meta, []
        n = len(meta.slots)
        cookies = sockarray_cookies(self._fds["socks"], n)
        live_cookies = {s.cookie for s in live}
        vacant = set(meta.vacant)
        records = {s["slot"]: s for s in meta.slots}
        left = [k for k, c in enumerate(cookies)
                if (c is None or c not in live_cookies) and k not in vacant]
        new = [s for s in live if s.cookie not in set(cookies) and s.inode not in self._refused]
        if not left and not new:
            return events
        now = time.time()
        fallbacks = read_fallbacks(self._fds["config"])
        # (the slots left are said by their own events below, as the table
        # skips them from now: not as a share that goes by the kernel's hash)
        fb = fallbacks - meta.fallbacks_seen
        line = None
        if new:
            line = divergence([], len(new), fb, self.proto)
        elif fb:
            unit = "connections" if self.proto == "tcp" else "datagrams"
            line = f"{fb:,} {unit} went by the kernel's hash while the closed sockets were " \
                   f"in the table"
        if line:
            events.append(Event(now, "diverged", text=line))
        for k in left:
            vacant.add(k)
            r = records[k]
            events.append(Event(now, "left", k, r["pid"], r["inode"],
                                f"slot {k}: pid {r['pid']}'s socket (inode {r['inode']}) "
                                f"closed; the policy skips the slot"))
        if new:
            try:
                group = find_group(self.port, self.proto, host=meta.host, slots=meta.table)
            except UserError as e:
                # A process exiting or still starting mid-scan: next tick.
                events.append(Event(now, "diverged", text=f"not taken yet: {e}"))
                group = None
            cap = LEAST_MAX_SLOTS if meta.policy in ("least-loaded", "least-conns") \
                else MAX_SLOTS
            server = _server_session(group)
            for m in (group.members if group else ()):
                if m.inode not in {s.inode for s in new}:
                    continue
                sid = process.session(m.pid)
                if server is not None and sid is not None and sid != server:
                    # `nginx -t` or another program binding the port: never
                    # steer the server's traffic to it (said once per socket)
                    if m.inode not in self._refused:
                        self._refused.add(m.inode)
                        events.append(Event(now, "diverged", None, m.pid, m.inode,
                                            f"pid {m.pid}'s socket (inode {m.inode}) stays out "
                                            f"of the policy: pid {m.pid} is not the server's "
                                            f"({session_name(sid)}, the server's "
                                            f"is {session_name(server)})"))
                    continue
                slot = min(vacant) if vacant else n
                if slot >= cap:
                    events.append(Event(now, "diverged", None, m.pid, m.inode,
                                        f"no slot for pid {m.pid}'s socket: the policy "
                                        f"handles up to {cap} sockets"))
                    continue
                try:
                    sock = owners.take_socket(m.pid, m.fd, m.inode)
                except UserError:
                    continue                     # gone meanwhile: next tick
                with sock:                       # never keep a server's socket open
                    put_in_slot(self._fds["socks"], slot, sock)
                    self._reattach(sock)
                prev = records.get(slot)
                records[slot] = {"slot": slot, "pid": m.pid, "inode": m.inode, "addr": m.addr}
                vacant.discard(slot)
                n = max(n, slot + 1)
                was = f" (was pid {prev['pid']})" if prev else " (a new slot)"
                events.append(Event(now, "joined", slot, m.pid, m.inode,
                                    f"slot {slot}: pid {m.pid}'s new socket (inode {m.inode}) "
                                    f"takes the slot{was}"))
        self._write_table(n, vacant)
        meta.slots = [records[k] for k in sorted(records)]
        meta.vacant = sorted(vacant)
        meta.fallbacks_seen = fallbacks
        update_meta(self.path, meta)
        return events

    def _write_table(self, n: int, vacant: set[int]) -> None:
        from .policies.selector import write_table
        from .policies.tables import live_table
        table = live_table(parse_policy(self.meta.policy), n, vacant)
        write_table(self._fds["table"], self._fds["config"], table)

    def _reattach(self, sock) -> None:
        """Attach the pinned program through a member: the same program
        again while the group lives; the group's program if the group was
        made anew (every old socket closed)."""
        if not self.meta.prog:
            return
        fd = open_pinned(self.path, "prog")
        try:
            reuseport.attach_ebpf(sock, fd)
        finally:
            os.close(fd)

    def _step_cbpf(self, live) -> list[Event]:
        from .policies.selector import attach_cbpf
        meta = self.meta
        if {s.inode for s in live} == {s["inode"] for s in meta.slots} or not live:
            return []
        group = find_group(self.port, self.proto, host=meta.host, slots=meta.table)
        with group.taken() as socks:
            attach_cbpf(parse_policy(meta.policy), socks[0], len(socks))
        meta.slots = [{"slot": n, "pid": m.pid, "inode": m.inode, "addr": m.addr}
                      for n, m in enumerate(group.members)]
        update_meta(self.path, meta)
        return [Event(time.time(), "reattached", text=f"{meta.policy} attached again for "
                      f"{len(socks)} sockets (cBPF indexes the group in join order)")]

    # --- the loop -------------------------------------------------------------------

    def run(self, stop: threading.Event, on_event, interval: float = INTERVAL) -> str:
        """Follow until `stop` is set (a signal) or the policy is no longer
        ours; returns why it ended. On a signal the record forgets the
        follower and the policy stays pinned."""
        try:
            while not stop.is_set():
                try:
                    for e in self.step():
                        # a divergence that lasts is said once, not every tick
                        if e.kind != "diverged" or e.text not in self._said:
                            on_event(e)
                        if e.kind == "diverged":
                            self._said.add(e.text)
                        else:
                            self._said.clear()
                except Stopped as e:
                    return str(e)
                except Unreachable as e:
                    # the maps we hold keep the policy going; say it once, retry
                    if str(e) not in self._said:
                        on_event(Event(time.time(), "diverged", text=f"follow: {e}; retrying"))
                        self._said.add(str(e))
                except OSError as e:
                    try:
                        gone = self._gone()
                    except Unreachable:
                        gone = False
                    if gone:
                        return "the policy was detached"
                    on_event(Event(time.time(), "diverged", text=f"follow: {e}"))
                stop.wait(interval)
            self._forget()
            return "stopped; the policy stays pinned"
        finally:
            self.close()

    def _forget(self) -> None:
        try:
            now = read_meta(self.path) if self.path.exists() else None
        except (UserError, OSError):
            return
        if now is not None and (now.follower or {}).get("pid") == self.pid \
                and now.created == self.meta.created:
            now.follower = None
            update_meta(self.path, now)

