"""churn: workers join and leave a reuseport group, and what it costs clients.

The kernel's known TCP weakness: a SYN picks listener A; if A closes before
the connection is accept()ed -- the request still in SYN_RECV, or the child
waiting in A's accept queue -- the connection is orphaned and reset. Later
kernels migrate such requests to another listener of the group:
net.ipv4.tcp_migrate_req (by hash) or a BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
program (bpf/migrate.c, which picks the live listener with the shortest
accept queue, or refuses). A graceful drain avoids the problem without
migration: steer new connections away, let the worker empty its queue, then
close.

Modes (each with net.ipv4.tcp_migrate_req restored afterwards):

    off         sysctl 0, no program: orphaned requests are reset
    on          sysctl 1, no program: the kernel migrates them by hash
    bpf         sysctl 0, SELECT_OR_MIGRATE program: the program migrates
    bpf-refuse  sysctl 0, the same program refusing every migration
    drain       sysctl 0, a SELECT program steers; a leaving worker is
                drained (drain:K) before its listener closes

Two measurements per mode:

  queued_case()  exact: K clients complete their handshake into a listener
                 whose worker does not accept; a second worker joins; the
                 first listener closes (drain: is drained). Each client then
                 gets its answer from the new worker, or a reset.
  churn_case()   under steady load (the built-in client), workers join and
                 leave on a schedule; every failed connection is counted by
                 kind, and resets are reported per 10k connections.

A leaving worker stops accepting first, then its listener closes `linger`
seconds later (the way a server finishes its loop and exits): whatever the
kernel queued for it meanwhile is what gets orphaned.

The group here is not the Supervisor's: its membership changes at run time.
Group keeps a copy of every listener (like the supervisor) so that it, not
the worker, decides when the listener closes, and reads each accept queue's
length (TCP_INFO) to drain. Its pieces live with their kind: the program in
policies/migrate.py, the worker in workers/churn.py, the load in
load/steady.py.
"""
from __future__ import annotations

import os
import platform
import re
import select
import socket
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..closing import Closing
from ..errors import UserError
from ..kernel import children
from ..kernel import sockets as ksock
from ..kernel import sysctl
from ..load.steady import SteadyLoad
from ..stats.failures import failures
from ..policies.migrate import MAX_SLOTS, MigrateProgram
from ..workers.churn import run_churn_worker, run_passed_worker
from ..workers.supervisor import client_host

MIGRATE_REQ = "net.ipv4.tcp_migrate_req"
MODES = ("off", "on", "bpf", "bpf-refuse", "drain")
CHURN_MODES = ("off", "on", "bpf", "drain")          # the default table
QUEUED_MODES = ("off", "on", "bpf", "bpf-refuse", "drain")
READY_TIMEOUT_S = 5.0
DRAIN_GRACE_S = 0.05    # after steering away: in-flight handshakes land meanwhile
DRAIN_TIMEOUT_S = 3.0


# --- configuration ---------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    t: float                    # seconds since the load started
    action: str                 # "add" | "remove"
    slot: Optional[int] = None  # remove: which slot (None: the oldest worker)

    def __str__(self) -> str:
        return f"{self.action}{'' if self.slot is None else f':{self.slot}'}@{self.t:g}"


@dataclass(frozen=True)
class ChurnConfig:
    workers: int = 3                    # at the start of each run
    duration: float = 3.0               # seconds of steady load per mode
    add_every: Optional[float] = 1.0
    remove_every: Optional[float] = 1.0
    sequence: tuple[Event, ...] = ()    # scripted; replaces add/remove_every
    linger: float = 0.05                # stop accepting -> close, for a leaving worker
    modes: tuple[str, ...] = CHURN_MODES
    queued: int = 32                    # K for the exact case; 0 skips it
    queued_modes: tuple[str, ...] = QUEUED_MODES
    host: str = "127.0.0.1"
    port: int = 0
    backlog: int = 1024
    concurrency: int = 32
    timeout: float = 1.0                # the client's per-connection timeout

    def validate(self) -> None:
        if not 1 <= self.workers <= MAX_SLOTS:
            raise UserError(f"--workers must be between 1 and {MAX_SLOTS}, not {self.workers}.")
        if not self.duration > 0:
            raise UserError(f"--duration must be positive, not {self.duration}.")
        for name, v in (("--add-every", self.add_every), ("--remove-every", self.remove_every)):
            if v is not None and not v > 0:
                raise UserError(f"{name} must be positive, not {v}.")
        if not 0 <= self.linger <= 10:
            raise UserError(f"--linger must be between 0 and 10 seconds, not {self.linger}.")
        bad = [m for m in self.modes + self.queued_modes if m not in MODES]
        if bad:
            raise UserError(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}.")
        if not self.modes and not (self.queued and self.queued_modes):
            raise UserError("nothing to run: give at least one mode.")
        if not 0 <= self.queued <= 4096:
            raise UserError(f"--queued must be between 0 and 4096, not {self.queued}.")
        if self.queued > self.backlog:
            raise UserError(f"--queued {self.queued} is more than the backlog "
                            f"({self.backlog}): the kernel would drop the rest.")
        if self.backlog < 1:
            raise UserError(f"--backlog must be at least 1, not {self.backlog}.")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be at least 1, not {self.concurrency}.")
        if not self.timeout > 0:
            raise UserError(f"--timeout must be positive, not {self.timeout}.")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, not {self.port}.")
        for e in self.sequence:
            if e.slot is not None and not 0 <= e.slot < MAX_SLOTS:
                raise UserError(f"{e}: slots are 0..{MAX_SLOTS - 1}.")

    def schedule(self) -> list[Event]:
        """The membership events of one run, in time order. Without a
        sequence: an add every add_every seconds, and a removal every
        remove_every seconds starting half a period in (so equal periods
        interleave: remove, add, remove, ...)."""
        if self.sequence:
            return sorted((e for e in self.sequence if e.t < self.duration), key=lambda e: e.t)
        out: list[Event] = []
        if self.add_every:
            k = 1
            while k * self.add_every < self.duration:
                out.append(Event(round(k * self.add_every, 6), "add"))
                k += 1
        if self.remove_every:
            k = 0
            while (k + 0.5) * self.remove_every < self.duration:
                out.append(Event(round((k + 0.5) * self.remove_every, 6), "remove"))
                k += 1
        return sorted(out, key=lambda e: (e.t, e.action != "remove"))


_EVENT = re.compile(r"^(add|remove|drain)(?::(\d+))?@(\d+(?:\.\d*)?|\.\d+)$")


def parse_sequence(spec: str) -> tuple[Event, ...]:
    """'remove@0.5,add@1,remove:2@1.5' -> events. drain:K@T is accepted as
    remove:K@T: how a removal happens is the mode's business (mode drain
    drains every leaving worker), so all modes see the same sequence."""
    events = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _EVENT.match(part)
        if not m:
            raise UserError(f"bad sequence item {part!r}: write add@T, remove@T or "
                            f"remove:SLOT@T (T in seconds), comma-separated.")
        action, slot, t = m.groups()
        if action == "add" and slot is not None:
            raise UserError(f"{part!r}: add takes no slot (a new worker gets the lowest free one).")
        events.append(Event(float(t), "add" if action == "add" else "remove",
                            None if slot is None else int(slot)))
    if not events:
        raise UserError("the sequence is empty.")
    return tuple(events)


def parse_modes(spec: str) -> tuple[str, ...]:
    modes = tuple(m.strip().lower() for m in spec.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}.")
    return modes


# --- the group ----------------------------------------------------------------------

@dataclass
class _Member:
    slot: int
    listener: socket.socket
    pid: int
    ctl: socket.socket
    joined: float


class Group(Closing):
    """A reuseport group whose workers join and leave at run time.

        with Group("127.0.0.1", 0, 1024, program) as g:
            a = g.add(); b = g.add()
            g.leave(a, linger=0.05)     # or g.drain(a)
    """

    def __init__(self, host: str, port: int, backlog: int,
                 program: Optional[MigrateProgram] = None, max_slots: int = MAX_SLOTS,
                 proto: str = "tcp"):
        self.host, self.port, self.backlog, self.proto = host, port, backlog, proto
        self.program, self.max_slots = program, max_slots
        self.members: dict[int, _Member] = {}
        self._leaving: list[tuple[int, socket.socket]] = []    # (pid, ctl) finishing up
        self._me = os.getpid()
        self._closed = False

    def live(self) -> list[int]:
        """Live slots, oldest first."""
        return [m.slot for m in sorted(self.members.values(), key=lambda m: m.joined)]

    def add(self, hold: bool = False) -> int:
        """A new listener joins the group, with a worker accepting on it
        (hold: not accepting yet). Returns its slot."""
        free = [s for s in range(self.max_slots) if s not in self.members]
        if not free:
            raise UserError(f"the group is full ({self.max_slots} workers).")
        slot = free[0]
        lst = ksock.open_listener(self.host, self.port, self.proto, reuseport=True,
                                  backlog=self.backlog,
                                  group=tuple(m.listener for m in self.members.values()))
        try:
            lst.setblocking(False)
            self.port = lst.getsockname()[1]
            if self.program is not None:
                if not self.members:
                    self.program.attach(lst)
                self.program.put(slot, lst)
            pid, ctl = self._spawn(slot, lst, hold)
        except BaseException:
            lst.close()
            raise
        self.members[slot] = _Member(slot, lst, pid, ctl, time.monotonic())
        if self.program is not None:
            self.program.enable(slot)
        return slot

    def _spawn(self, slot: int, lst: socket.socket, hold: bool,
               passed: Optional[socket.socket] = None) -> tuple[int, socket.socket]:
        """Fork the worker of `slot` and wait until it runs: on `lst`, which
        it inherits, or (passed) on the socket sent to it over SCM_RIGHTS,
        which it keeps at lst's fd number (so the next pass finds it).
        Returns (pid, its control socket)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = children.fork()
        if pid == 0:
            if passed is None:
                body = lambda: run_churn_worker(slot, lst, theirs, hold, self._me)  # noqa: E731
            else:
                body = lambda: run_passed_worker(slot, theirs, hold, self._me,  # noqa: E731
                                                 lst.fileno())
            children.run_child(body, f"churn worker {slot}")
        theirs.close()
        try:
            if passed is not None:
                ksock.pass_socket(mine, passed)
            if _recv_byte(mine, READY_TIMEOUT_S) != b"R":
                raise UserError(f"churn worker {slot} did not start within "
                                f"{READY_TIMEOUT_S:.0f} s.")
        except BaseException:
            children.stop([pid], grace=1.0)
            mine.close()
            raise
        return pid, mine

    def handover(self, slot: int, how: str) -> tuple[Optional[int], float]:
        """A new process takes over the worker of `slot` on the SAME listener,
        then the old one leaves (its copy closes; the socket, its queue and
        its place in the group stay):

            inherit  the new process is forked holding it (nginx's master
                     forking workers, systemd socket activation, fork/exec)
            pass     the new process starts without it and receives it: taken
                     from the old process with pidfd_getfd(2) and sent over
                     SCM_RIGHTS (tableflip, HAProxy's expose-fd listeners)

        Returns (the listener's accept queue when the old worker let go of
        it, which the new one serves -- None for UDP: its datagrams cannot be
        counted without reading them --; seconds the handover took)."""
        if how not in ("inherit", "pass"):
            raise UserError(f"unknown handover {how!r}: inherit or pass.")
        old = self.members[slot]
        t0 = time.monotonic()
        if how == "pass":
            from ..kernel.owners import take_socket
            fd = old.listener.fileno()
            taken = take_socket(old.pid, fd, os.fstat(fd).st_ino)
            try:
                pid, ctl = self._spawn(slot, old.listener, False, passed=taken)
            finally:
                taken.close()
        else:
            pid, ctl = self._spawn(slot, old.listener, False)
        self.members[slot] = _Member(slot, old.listener, pid, ctl, old.joined)
        try:
            old.ctl.send(b"l")
            _recv_byte(old.ctl, READY_TIMEOUT_S)     # "L": its copy is closed
        except OSError:
            pass
        queued = ksock.accept_queue_len(old.listener) if self.proto == "tcp" else None
        self._leaving.append((old.pid, old.ctl))
        self.reap()
        return queued, time.monotonic() - t0

    def accept(self, slot: int) -> None:
        """Let a held worker start accepting."""
        self.members[slot].ctl.send(b"a")

    def queue_len(self, slot: int) -> int:
        """TCP: the accept queue; UDP: bytes of the next datagram (0: empty)."""
        return ksock.queued(self.members[slot].listener)

    def leave(self, slot: int, linger: float = 0.0) -> int:
        """The worker stops accepting; `linger` seconds later its listener
        closes, orphaning whatever the kernel queued for it (or migrating it).
        Returns the accept-queue length at the close (UDP: the datagrams
        still queued, read off and counted: the close would free them unread)."""
        m = self.members.pop(slot)
        try:
            m.ctl.send(b"l")
            _recv_byte(m.ctl, READY_TIMEOUT_S)       # "L": its copy is closed
        except OSError:
            pass
        if linger > 0:
            time.sleep(linger)
        if self.proto == "udp":
            queued = ksock.discard_queued(m.listener)
        else:
            queued = ksock.accept_queue_len(m.listener)
        m.listener.close()          # the last reference: inet_csk_listen_stop() runs now
        if self.program is not None:
            self.program.disable(slot)
        self._leaving.append((m.pid, m.ctl))
        self.reap()
        return queued

    def drain(self, slot: int, grace: float = DRAIN_GRACE_S,
              timeout: float = DRAIN_TIMEOUT_S) -> tuple[int, float]:
        """drain:K -- steer new connections away from `slot`, let its worker
        empty the accept queue, then close it. Needs the program (to steer).
        Returns (accept-queue length at the close, seconds it took)."""
        if self.program is None:
            raise UserError("draining a worker needs the steering program (mode drain).")
        t0 = time.monotonic()
        self.program.disable(slot)
        self.accept(slot)
        empty_since = None
        while True:
            now = time.monotonic()
            if self.queue_len(slot) == 0:
                empty_since = empty_since or now
                if now - t0 >= grace and now - empty_since >= 0.01:
                    break
            else:
                empty_since = None
            if now - t0 > timeout:
                break
            time.sleep(0.002)
        return self.leave(slot, 0.0), time.monotonic() - t0

    def reap(self) -> None:
        """Collect leaving workers that have finished."""
        still = []
        for pid, ctl in self._leaving:
            try:
                done = os.waitpid(pid, os.WNOHANG)[0]
            except ChildProcessError:
                done = pid
            if done:
                ctl.close()
            else:
                still.append((pid, ctl))
        self._leaving = still

    def close(self) -> None:
        """Close every listener, stop and reap every worker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for m in self.members.values():
            m.listener.close()
        pids = [(m.pid, m.ctl) for m in self.members.values()] + self._leaving
        self.members.clear()
        self._leaving = []
        children.stop((pid for pid, _ in pids), grace=1.0)
        for _, ctl in pids:
            ctl.close()


def _recv_byte(s: socket.socket, timeout: float) -> bytes:
    if not select.select([s], [], [], timeout)[0]:
        return b""
    try:
        return s.recv(1)
    except OSError:
        return b""


# --- kernel counters -------------------------------------------------------------

def migrate_counters() -> dict[str, int]:
    """TcpExt TCPMigrateReqSuccess / TCPMigrateReqFailure of this netns."""
    out = {"TCPMigrateReqSuccess": 0, "TCPMigrateReqFailure": 0}
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return out
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            for k, v in zip(head.split()[1:], vals.split()[1:]):
                if k in out:
                    out[k] = int(v)
    return out


def _delta(before: dict, after: dict) -> dict:
    return {"migrated": after["TCPMigrateReqSuccess"] - before["TCPMigrateReqSuccess"],
            "migrate_failed": after["TCPMigrateReqFailure"] - before["TCPMigrateReqFailure"]}


# --- modes ------------------------------------------------------------------------

@contextmanager
def mode_setup(mode: str) -> Iterator[Optional[MigrateProgram]]:
    """The sysctl and the program of a mode; both undone on the way out."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}.")
    with sysctl.setting(MIGRATE_REQ, 1 if mode == "on" else 0):
        prog = None
        if mode in ("bpf", "bpf-refuse", "drain"):
            prog = MigrateProgram(migrate=mode != "drain", refuse=mode == "bpf-refuse")
        try:
            yield prog
        finally:
            if prog is not None:
                prog.close()


# --- the exact case ----------------------------------------------------------------

REQUEST = b"GET / HTTP/1.1\r\nHost: churn\r\nConnection: close\r\n\r\n"


def queued_case(mode: str, k: int, host: str = "127.0.0.1", port: int = 0,
                backlog: int = 1024, timeout: float = 2.0,
                swap: Optional[Callable[[Group, int], tuple[int, int]]] = None) -> dict:
    """K clients wait in the accept queue of a listener whose worker does not
    accept; a second worker joins; the first listener closes (mode drain:
    is drained first). Then each client is either served or reset.
    swap(group, first) -> (second slot, queue at close) replaces the
    join-and-close step (`reload`'s handovers)."""
    with mode_setup(mode) as prog:
        with Group(host, port, backlog, prog) as g:
            clients: list[socket.socket] = []
            try:
                first = g.add(hold=True)
                before = migrate_counters()
                chost = client_host(host)
                for _ in range(k):
                    c = socket.create_connection((chost, g.port), timeout=timeout)
                    c.sendall(REQUEST)
                    clients.append(c)
                deadline = time.monotonic() + timeout
                while g.queue_len(first) < k and time.monotonic() < deadline:
                    time.sleep(0.002)
                queued = g.queue_len(first)
                if swap is not None:
                    second, at_close = swap(g, first)
                else:
                    second = g.add()
                    if mode == "drain":
                        at_close, _ = g.drain(first)
                    else:
                        at_close = g.leave(first, 0.0)
                outcomes, served_by = _read_answers(clients, timeout)
                counters = _delta(before, migrate_counters())
            finally:
                for c in clients:
                    c.close()
            out = {"mode": mode, "k": k, "queued": queued, "queued_at_close": at_close,
                   "first_slot": first, "second_slot": second,
                   **{kind: outcomes[kind] for kind in ("ok", "reset", "timeout", "other")},
                   "served_by": served_by, **counters,
                   "program": prog.stats() if prog is not None else None}
    return out


def _read_answers(clients: list[socket.socket], timeout: float) -> tuple[Counter, dict]:
    """Read every client's answer: ok (a 200), reset, timeout or other."""
    outcomes: Counter = Counter({k: 0 for k in ("ok", "reset", "timeout", "other")})
    served: Counter = Counter()
    bufs = {c.fileno(): bytearray() for c in clients}
    socks = {c.fileno(): c for c in clients}
    for c in clients:
        c.setblocking(False)
    ep = select.epoll()
    try:
        for fd in socks:
            ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        deadline = time.monotonic() + timeout
        while socks and time.monotonic() < deadline:
            for fd, _ in ep.poll(max(0.0, deadline - time.monotonic())):
                s = socks.get(fd)
                if s is None:
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    outcomes["reset"] += 1
                    data = None
                except OSError:
                    outcomes["other"] += 1
                    data = None
                if data:
                    bufs[fd] += data
                    continue
                if data is not None:            # EOF: judge the answer
                    head = bytes(bufs[fd])
                    if head.startswith(b"HTTP/1.1 200"):
                        outcomes["ok"] += 1
                        m = re.search(rb"\r\nX-Worker: (\S+)", head)
                        served[m.group(1).decode() if m else "?"] += 1
                    elif not head:
                        outcomes["reset"] += 1  # closed before any answer
                    else:
                        outcomes["other"] += 1
                ep.unregister(fd)
                del socks[fd]
        outcomes["timeout"] += len(socks)
    finally:
        ep.close()
    return outcomes, dict(sorted(served.items()))


# --- the churn case ---------------------------------------------------------------

def churn_case(mode: str, cfg: ChurnConfig,
               tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """Under steady load, apply cfg.schedule() to a group of cfg.workers;
    count every failed connection by kind. tick(elapsed, conns, resets)."""
    actions = [(e.t, lambda g, t0, e=e: _apply(g, e, mode, cfg, t0)) for e in cfg.schedule()]
    run = under_load(mode, actions, host=cfg.host, port=cfg.port, backlog=cfg.backlog,
                     workers=cfg.workers, duration=cfg.duration,
                     concurrency=cfg.concurrency, timeout=cfg.timeout, tick=tick)
    events_done, f = run["events"], failures(run["totals"])
    return {"mode": mode, "sysctl": 1 if mode == "on" else 0,
            "program": run["program"], "removal": "drain" if mode == "drain" else "abrupt",
            "duration_s": cfg.duration, "conns": f["conns"], "ok": f["ok"],
            "errors": f["errors"], "failed": f["failed"],
            "resets_per_10k": f["reset_per_10k"], "failed_per_10k": f["failed_per_10k"],
            "leaves": sum(1 for e in events_done if e["action"] == "remove" and not e["skipped"]),
            "joins": sum(1 for e in events_done if e["action"] == "add" and not e["skipped"]),
            "queued_at_close": sum(e.get("queued", 0) or 0 for e in events_done),
            "migrated": run["migrated"], "migrate_failed": run["migrate_failed"],
            "program_stats": run["program_stats"],
            "final_workers": run["final_workers"],
            "per_worker": run["per_worker"], "events": events_done,
            "timeline": run["timeline"]}


Action = Callable[[Group, float], dict]


def under_load(mode: str, actions: list[tuple[float, Action]], *, host: str, port: int,
               backlog: int, workers: int, duration: float, concurrency: int,
               timeout: float, proto: str = "tcp", requests: int = 1,
               tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """A group of `workers` under steady load (TCP connections of `requests`
    requests each, or UDP datagrams) for `duration` seconds, in the setting
    of `mode` (mode_setup); each action(group, t0) runs at its time and
    returns its record. Returns the load's totals, per_worker and timeline,
    the records ("events"), the kernel's migration counters, the program's
    stats and the slots live at the end."""
    events_done: list[dict] = []
    with mode_setup(mode) as prog:
        with Group(host, port, backlog, prog, proto=proto) as g:
            for _ in range(workers):
                g.add()
            before = migrate_counters()
            load = SteadyLoad(client_host(host), g.port, concurrency, timeout,
                              proto=proto, requests=requests)
            try:
                t0 = time.monotonic()
                load.start(t0)
                schedule = sorted(actions, key=lambda a: a[0])
                i = 0
                while True:
                    now = time.monotonic() - t0
                    if now >= duration:
                        break
                    while i < len(schedule) and schedule[i][0] <= now:
                        events_done.append(schedule[i][1](g, t0))
                        i += 1
                    g.reap()
                    load.sample()
                    if tick is not None:
                        tick(now, *load.progress())
                    nxt = schedule[i][0] if i < len(schedule) else duration
                    time.sleep(max(0.0, min(0.05, nxt - (time.monotonic() - t0))))
                if tick is not None:
                    tick(duration, *load.progress())
                result = load.stop()
            finally:
                load.close()
            counters = _delta(before, migrate_counters())
            return {"totals": result["totals"], "per_worker": result["per_worker"],
                    "timeline": result["timeline"], "events": events_done, **counters,
                    "program": prog.kind if prog is not None else None,
                    "program_stats": prog.stats() if prog is not None else None,
                    "final_workers": g.live()}


def _apply(g: Group, e: Event, mode: str, cfg: ChurnConfig, t0: float) -> dict:
    rec = {"t": round(time.monotonic() - t0, 4), "action": e.action, "slot": e.slot,
           "skipped": False, "queued": None, "took_s": None}
    if e.action == "add":
        if len(g.members) >= g.max_slots:
            rec["skipped"] = True
        else:
            rec["slot"] = g.add()
    else:
        live = g.live()
        slot = live[0] if e.slot is None and live else e.slot
        if len(live) <= 1 or slot not in live:
            rec["skipped"] = True       # never the last worker; never a slot not there
        else:
            rec["slot"] = slot
            t = time.monotonic()
            if mode == "drain":
                rec["queued"], _ = g.drain(slot)
            else:
                rec["queued"] = g.leave(slot, cfg.linger)
            rec["took_s"] = round(time.monotonic() - t, 4)
    rec["workers"] = len(g.members)
    return rec


# --- the whole experiment -----------------------------------------------------------

def run_experiment(cfg: ChurnConfig, netns: str = "private",
                   on_step: Optional[Callable[[str], None]] = None,
                   tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """Every queued case, then every churn case; the report --json prints."""
    cfg.validate()
    before = sysctl.read(MIGRATE_REQ)
    queued = []
    if cfg.queued:
        for mode in cfg.queued_modes:
            if on_step:
                on_step(f"queued {mode}")
            queued.append(queued_case(mode, cfg.queued, cfg.host, cfg.port, cfg.backlog))
    churn = []
    for mode in cfg.modes:
        if on_step:
            on_step(f"churn {mode}")
        churn.append(churn_case(mode, cfg, tick))
    after = sysctl.read(MIGRATE_REQ)
    conf = asdict(cfg)
    conf["sequence"] = [str(e) for e in cfg.sequence]
    conf["schedule"] = [str(e) for e in cfg.schedule()]
    conf["modes"], conf["queued_modes"] = list(cfg.modes), list(cfg.queued_modes)
    return {"experiment": "churn", "version": 1,
            "kernel": platform.release(), "cpus": os.cpu_count() or 1, "netns": netns,
            "config": conf,
            "sysctl": {"name": MIGRATE_REQ, "before": before, "after": after,
                       "restored": before == after},
            "queued": queued, "churn": churn}
