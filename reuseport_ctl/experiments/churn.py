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
length (TCP_INFO) to drain.
"""
from __future__ import annotations

import gc
import mmap
import os
import pickle
import platform
import re
import select
import signal
import socket
import struct
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import UserError
from ..kernel import bpf, process
from ..kernel import sockets as ksock
from ..kernel import sysctl
from ..workers import http

MIGRATE_REQ = "net.ipv4.tcp_migrate_req"
MODES = ("off", "on", "bpf", "bpf-refuse", "drain")
CHURN_MODES = ("off", "on", "bpf", "drain")          # the default table
QUEUED_MODES = ("off", "on", "bpf", "bpf-refuse", "drain")
MAX_SLOTS = 16          # bpf/migrate.c unrolls its scans over the slots
READY_TIMEOUT_S = 5.0
LEAVE_FINISH_S = 2.0    # a leaving worker finishes its open connections within this
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


# --- the SELECT_OR_MIGRATE program -------------------------------------------------

@lru_cache(maxsize=1)
def program_source() -> str:
    here = Path(__file__).resolve().parents[2] / "bpf" / "migrate.c"
    if here.is_file():
        return here.read_text()
    return resources.files("reuseport_ctl.bpf").joinpath("migrate.c").read_text()


class MigrateProgram:
    """bpf/migrate.c, loaded, with its socket array: the one owner of every
    BPF object churn makes. migrate=False loads it as a plain SELECT program
    (steering only; the kernel never runs it for migration)."""

    MODE_MIGRATE, MODE_REFUSE = 0, 1

    def __init__(self, migrate: bool = True, refuse: bool = False,
                 max_slots: int = MAX_SLOTS):
        from ..kernel.bcc import compile_program

        self.migrate, self.refuse, self.max_slots = migrate, refuse, max_slots
        self.attach_type = (bpf.ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate
                            else bpf.ATTACH_SK_REUSEPORT_SELECT)
        self.table: list[int] = []
        self.target = "shortest accept queue"
        self._bpf = None
        self._fds: list[int] = []
        self.prog_fd = -1
        self._member: Optional[socket.socket] = None
        try:
            self.socks_fd = self._own(bpf.create_map(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8,
                                                  max_slots, "rp_mig_socks"))
            cflags = [f"-DSOCKS_FD={self.socks_fd}", f"-DMAX_SLOTS={max_slots}"]
            try:
                from ..kernel.btf import offset_macros
                cflags += ["-DLEAST=1"] + offset_macros({
                    "SELECTED_SK_OFF": ("sk_reuseport_kern", "selected_sk"),
                    "LOAD_OFF": ("sock", "sk_ack_backlog")})
            except Exception:       # no BTF: migrate to the next live slot instead
                cflags.append("-DLEAST=0")
                self.target = "next live slot"
            self._bpf = compile_program(program_source(), cflags)
            self.prog_fd = self._load()
            self.maps = {name: self._bpf[f"rp_mig_{name}".encode()].map_fd
                         for name in ("table", "config", "stats", "to")}
            bpf.map_update(self.maps["config"], bpf.u32(0),
                           bpf.u32(self.MODE_REFUSE if refuse else self.MODE_MIGRATE))
            self._write_table()
        except BaseException:
            self.close()
            raise

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _load(self) -> int:
        try:
            return self._bpf.load_func(b"rp_migrate", bpf.PROG_TYPE_SK_REUSEPORT,
                                       attach_type=self.attach_type).fd
        except TypeError:
            pass            # an older bcc without attach_type: load its bytecode ourselves
        except Exception as e:
            raise UserError(f"the kernel refused the select-or-migrate program ({e}).") from None
        try:
            return self._own(bpf.prog_load(bpf.PROG_TYPE_SK_REUSEPORT,
                                           self._bpf.dump_func(b"rp_migrate"),
                                           expected_attach_type=self.attach_type,
                                           name="rp_migrate"))
        except OSError as e:
            raise UserError(f"the kernel refused the select-or-migrate program "
                            f"({e.strerror}).") from None

    @property
    def kind(self) -> str:
        return "select_or_migrate" if self.migrate else "select"

    def attach(self, sock: socket.socket) -> None:
        from ..kernel.owners import attach_reuseport_ebpf
        try:
            attach_reuseport_ebpf(sock, self.prog_fd)
        except OSError as e:
            raise UserError(f"cannot attach the select-or-migrate program to the group "
                            f"({e.strerror}).") from None
        self._member = sock

    def put(self, slot: int, sock: socket.socket) -> None:
        """Put a listening member in the socket array (not yet steered to)."""
        bpf.map_update(self.socks_fd, bpf.u32(slot), bpf.u64(sock.fileno()))

    def enable(self, slot: int) -> None:
        if slot not in self.table:
            self.table.append(slot)
            self._write_table()

    def disable(self, slot: int) -> None:
        """New connections stop going to `slot` (its queue can drain)."""
        if slot in self.table:
            self.table.remove(slot)
            self._write_table()

    def _write_table(self) -> None:
        # Entries first, then the count: the program never reads a stale slot
        # past n (a removed slot read before the count shrinks just fails to
        # select, and the scan moves on).
        for i, slot in enumerate(self.table):
            bpf.map_update(self.maps["table"], bpf.u32(i), bpf.u32(slot))
        bpf.map_update(self.maps["config"], bpf.u32(1), bpf.u32(len(self.table)))

    def stats(self) -> dict:
        vals = [struct.unpack("=Q", bpf.map_lookup(self.maps["stats"], bpf.u32(i), 8) or
                              bytes(8))[0] for i in range(4)]
        to = {}
        for slot in range(self.max_slots):
            raw = bpf.map_lookup(self.maps["to"], bpf.u32(slot), 8)
            n = struct.unpack("=Q", raw)[0] if raw else 0
            if n:
                to[str(slot)] = n
        return {"attach_type": self.kind, "refuse": self.refuse, "target": self.target,
                "selected": vals[0], "migrated": vals[1], "refused": vals[2],
                "no_slot": vals[3], "migrated_to": to}

    def close(self, member: Optional[socket.socket] = None) -> None:
        """Detach (through a live member, if any is left), empty the socket
        array so its sockets are free again, release every fd. Idempotent."""
        from ..kernel.owners import detach_reuseport_prog
        for s in (member, self._member):
            if s is not None and s.fileno() >= 0:
                try:
                    detach_reuseport_prog(s)
                    break
                except OSError:
                    continue
        self._member = None
        if self._fds:
            for slot in range(self.max_slots):
                try:
                    bpf.map_delete(self.socks_fd, bpf.u32(slot))
                except OSError:
                    pass
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.prog_fd = -1


# --- children ------------------------------------------------------------------------

def _fork() -> int:
    """fork() with SIGINT/SIGTERM blocked across it; the child ignores Ctrl-C
    (the parent decides), dies on SIGTERM, and never finalizes the parent's
    objects (fd numbers get reused)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        gc.freeze()
        return 0
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def _stop(pid: int, grace: float = 1.0) -> None:
    """SIGTERM, wait up to `grace`, then SIGKILL; always reaped."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.005)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _worker_main(slot: int, listener: socket.socket, ctl: socket.socket, hold: bool,
                 parent: int) -> None:
    """A churn worker: epoll over its listener, its connections and the
    control socket. Commands (one byte each): a = start accepting,
    l = leave: stop accepting, close our copy of the listener, answer L,
    then finish the open connections and exit. Never returns."""
    code = 1
    try:
        process.die_with_parent(parent)
        process.close_fds_except({0, 1, 2, listener.fileno(), ctl.fileno()})
        process.set_name(f"rpctl-churn{slot}")
        ok, close_resp, bad = http.responses(slot, os.getpid())
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
        code = 0
    except BaseException as e:
        try:
            os.write(2, f"reuseport-ctl: churn worker {slot}: {type(e).__name__}: {e}\n".encode())
        except BaseException:
            pass
    finally:
        os._exit(code)


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


# --- the group ----------------------------------------------------------------------

@dataclass
class _Member:
    slot: int
    listener: socket.socket
    pid: int
    ctl: socket.socket
    joined: float


class Group:
    """A reuseport group whose workers join and leave at run time.

        with Group("127.0.0.1", 0, 1024, program) as g:
            a = g.add(); b = g.add()
            g.leave(a, linger=0.05)     # or g.drain(a)
    """

    def __init__(self, host: str, port: int, backlog: int,
                 program: Optional[MigrateProgram] = None, max_slots: int = MAX_SLOTS):
        self.host, self.port, self.backlog = host, port, backlog
        self.program, self.max_slots = program, max_slots
        self.members: dict[int, _Member] = {}
        self._leaving: list[tuple[int, socket.socket]] = []    # (pid, ctl) finishing up
        self._me = os.getpid()
        self._closed = False

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        lst = ksock.open_listener(self.host, self.port, "tcp", reuseport=True,
                                  backlog=self.backlog,
                                  group=tuple(m.listener for m in self.members.values()))
        try:
            lst.setblocking(False)
            self.port = lst.getsockname()[1]
            if self.program is not None:
                if not self.members:
                    self.program.attach(lst)
                self.program.put(slot, lst)
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            lst.close()
            raise
        pid = _fork()
        if pid == 0:
            _worker_main(slot, lst, theirs, hold, self._me)
        theirs.close()
        m = _Member(slot, lst, pid, mine, time.monotonic())
        self.members[slot] = m
        if _recv_byte(mine, READY_TIMEOUT_S) != b"R":
            raise UserError(f"churn worker {slot} did not start within {READY_TIMEOUT_S:.0f} s.")
        if self.program is not None:
            self.program.enable(slot)
        return slot

    def accept(self, slot: int) -> None:
        """Let a held worker start accepting."""
        self.members[slot].ctl.send(b"a")

    def queue_len(self, slot: int) -> int:
        return accept_queue_len(self.members[slot].listener)

    def leave(self, slot: int, linger: float = 0.0) -> int:
        """The worker stops accepting; `linger` seconds later its listener
        closes, orphaning whatever the kernel queued for it (or migrating it).
        Returns the accept-queue length at the close."""
        m = self.members.pop(slot)
        try:
            m.ctl.send(b"l")
            _recv_byte(m.ctl, READY_TIMEOUT_S)       # "L": its copy is closed
        except OSError:
            pass
        if linger > 0:
            time.sleep(linger)
        queued = accept_queue_len(m.listener)
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
        for pid, ctl in pids:
            _stop(pid)
            ctl.close()


def _recv_byte(s: socket.socket, timeout: float) -> bytes:
    if not select.select([s], [], [], timeout)[0]:
        return b""
    try:
        return s.recv(1)
    except OSError:
        return b""


def accept_queue_len(listener: socket.socket) -> int:
    """A listener's accept-queue length: TCP_INFO's tcpi_unacked is
    sk_ack_backlog for a socket in LISTEN."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("=I", info, 24)[0]


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
                backlog: int = 1024, timeout: float = 2.0) -> dict:
    """K clients wait in the accept queue of a listener whose worker does not
    accept; a second worker joins; the first listener closes (mode drain:
    is drained first). Then each client is either served or reset."""
    with mode_setup(mode) as prog:
        with Group(host, port, backlog, prog) as g:
            clients: list[socket.socket] = []
            try:
                first = g.add(hold=True)
                before = migrate_counters()
                chost = _client_host(host)
                for _ in range(k):
                    c = socket.create_connection((chost, g.port), timeout=timeout)
                    c.sendall(REQUEST)
                    clients.append(c)
                deadline = time.monotonic() + timeout
                while g.queue_len(first) < k and time.monotonic() < deadline:
                    time.sleep(0.002)
                queued = g.queue_len(first)
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


def _client_host(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


# --- steady load ---------------------------------------------------------------------

_KINDS = ("refused", "reset", "timeout", "other")
_REC = struct.Struct("=6q")         # per load process: done, ok, refused, reset, timeout, other


class SteadyLoad:
    """The built-in client's engine (load/engine.py), without an end: each
    of `processes` forked processes keeps concurrency/processes connections
    in flight, one after another, until stop(). Every process publishes its
    running counts in a shared page (read for the progress bar and the
    timeline) and sends its whole tally back at the end."""

    def __init__(self, host: str, port: int, concurrency: int, timeout: float,
                 processes: int = 2):
        from ..load import http as lhttp
        from ..load.engine import Target

        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        hh = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.target = Target("tcp", family, addr, float(timeout), 1,
                             lhttp.request("/", hh, last=False), lhttp.request("/", hh, last=True))
        self.processes = max(1, min(processes, concurrency))
        self.concurrency = concurrency
        self._shared = mmap.mmap(-1, 8 + _REC.size * self.processes)   # [0]: stop flag
        self._kids: dict[int, int] = {}          # result pipe read end -> pid
        self.timeline: list[dict] = []
        self._t0 = 0.0

    def start(self, t0: float) -> None:
        from ..load.plan import split

        self._t0 = t0
        me = os.getpid()
        for p, width in enumerate(split(self.concurrency, self.processes)):
            r, w = os.pipe()
            pid = _fork()
            if pid == 0:
                self._child(p, width, w, me)
            os.close(w)
            self._kids[r] = pid

    def _child(self, p: int, lanes: int, w: int, parent: int) -> None:
        from ..load.engine import Engine, Tally

        code = 1
        try:
            process.die_with_parent(parent)
            process.close_fds_except({0, 1, 2, w})
            process.set_name("rpctl-churnload")
            shared, off = self._shared, 8 + _REC.size * p
            tally = Tally()

            def publish(done: int) -> None:
                e = tally.errors
                _REC.pack_into(shared, off, done, tally.ok, *(e[k] for k in _KINDS))

            def indices():
                i = 0
                while not shared[0]:
                    yield i
                    i += 1
            it = indices()
            Engine(self.target, tally, publish, parent).run([it] * lanes)
            publish(tally.done)
            tally.lat_ms = tally.lat_ms[:0]         # not needed: keep the pipe small
            data = memoryview(pickle.dumps(tally))
            while data:
                data = data[os.write(w, data):]
            code = 0
        except BaseException as e:
            try:
                os.write(2, f"reuseport-ctl: churn load: {type(e).__name__}: {e}\n".encode())
            except BaseException:
                pass
        finally:
            os._exit(code)

    def counts(self) -> dict[str, int]:
        """Running totals over every load process."""
        tot = [0] * 6
        for p in range(self.processes):
            for i, v in enumerate(_REC.unpack_from(self._shared, 8 + _REC.size * p)):
                tot[i] += v
        return dict(zip(("conns", "ok") + _KINDS, tot))

    def progress(self) -> tuple[int, int]:
        c = self.counts()
        return c["conns"], c["reset"]

    def sample(self) -> None:
        """One timeline point: the running totals now."""
        self.timeline.append({"t": round(time.monotonic() - self._t0, 4), **self.counts()})

    def stop(self, timeout: float = 10.0) -> dict:
        """Let every connection in flight finish (at most the client timeout),
        then return the totals, per-worker counts and the timeline."""
        self._shared[0] = 1
        bufs = {r: bytearray() for r in self._kids}
        open_ = set(self._kids)
        deadline = time.monotonic() + timeout
        while open_ and time.monotonic() < deadline:
            for r in select.select(list(open_), [], [], 0.1)[0]:
                chunk = os.read(r, 1 << 16)
                if chunk:
                    bufs[r] += chunk
                else:
                    open_.discard(r)
        self.sample()
        tallies = [pickle.loads(b) for b in bufs.values() if b]
        self.close()
        if len(tallies) != self.processes:
            raise RuntimeError("a churn load process died; its error is above")
        totals: Counter = Counter({k: 0 for k in ("conns", "ok") + _KINDS})
        per_worker: Counter = Counter()
        for t in tallies:
            totals["conns"] += t.done
            totals["ok"] += t.ok
            totals.update(t.errors)
            per_worker.update(t.per_worker)
        return {"totals": dict(totals), "timeline": self.timeline,
                "per_worker": {k: per_worker[k] for k in sorted(per_worker, key=_natural)}}

    def close(self) -> None:
        for r, pid in self._kids.items():
            _stop(pid, grace=2.0)
            os.close(r)
        self._kids.clear()
        if not self._shared.closed:
            self._shared.close()


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


# --- the churn case ---------------------------------------------------------------

def churn_case(mode: str, cfg: ChurnConfig,
               tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """Under steady load, apply cfg.schedule() to a group of cfg.workers;
    count every failed connection by kind. tick(elapsed, conns, resets)."""
    events_done: list[dict] = []
    with mode_setup(mode) as prog:
        with Group(cfg.host, cfg.port, cfg.backlog, prog) as g:
            for _ in range(cfg.workers):
                g.add()
            before = migrate_counters()
            load = SteadyLoad(_client_host(cfg.host), g.port, cfg.concurrency, cfg.timeout)
            try:
                t0 = time.monotonic()
                load.start(t0)
                schedule = cfg.schedule()
                i = 0
                while True:
                    now = time.monotonic() - t0
                    if now >= cfg.duration:
                        break
                    while i < len(schedule) and schedule[i].t <= now:
                        events_done.append(_apply(g, schedule[i], mode, cfg, t0))
                        i += 1
                    g.reap()
                    load.sample()
                    if tick is not None:
                        tick(now, *load.progress())
                    nxt = schedule[i].t if i < len(schedule) else cfg.duration
                    time.sleep(max(0.0, min(0.05, nxt - (time.monotonic() - t0))))
                if tick is not None:
                    tick(cfg.duration, *load.progress())
                result = load.stop()
            finally:
                load.close()
            counters = _delta(before, migrate_counters())
            pstats = prog.stats() if prog is not None else None
            final_workers = g.live()
    totals = result["totals"]
    conns = totals.get("conns", 0)
    errors = {k: totals.get(k, 0) for k in ("refused", "reset", "timeout", "other")}
    failed = sum(errors.values())
    per10k = (lambda n: round(10000 * n / conns, 2) if conns else 0.0)
    return {"mode": mode, "sysctl": 1 if mode == "on" else 0,
            "program": prog.kind if prog is not None else None,
            "removal": "drain" if mode == "drain" else "abrupt",
            "duration_s": cfg.duration, "conns": conns, "ok": totals.get("ok", 0),
            "errors": errors, "failed": failed,
            "resets_per_10k": per10k(errors["reset"]), "failed_per_10k": per10k(failed),
            "leaves": sum(1 for e in events_done if e["action"] == "remove" and not e["skipped"]),
            "joins": sum(1 for e in events_done if e["action"] == "add" and not e["skipped"]),
            "queued_at_close": sum(e.get("queued", 0) or 0 for e in events_done),
            **counters, "program_stats": pstats,
            "final_workers": final_workers,
            "per_worker": result["per_worker"], "events": events_done,
            "timeline": result["timeline"]}


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


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM becomes KeyboardInterrupt once, so every `finally` (sysctl,
    program, workers) runs; a second one during the cleanup is ignored."""
    fired = []

    def on_term(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:          # not the main thread: the caller handles signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --- the JSON schema ----------------------------------------------------------------

_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number", "minimum": 0}
_COUNTS = {"type": "object", "additionalProperties": _INT}
_MODE = {"type": "string", "enum": list(MODES)}
_PROGRAM = {"type": ["object", "null"],
            "required": ["attach_type", "refuse", "target", "selected", "migrated",
                         "refused", "no_slot", "migrated_to"],
            "properties": {"attach_type": {"type": "string",
                                           "enum": ["select", "select_or_migrate"]},
                           "refuse": {"type": "boolean"}, "target": {"type": "string"},
                           "selected": _INT, "migrated": _INT, "refused": _INT,
                           "no_slot": _INT, "migrated_to": _COUNTS}}
_ERRORS = {"type": "object", "required": ["refused", "reset", "timeout", "other"],
           "additionalProperties": _INT}

SCHEMA = {
    "type": "object",
    "required": ["experiment", "version", "kernel", "cpus", "netns", "config", "sysctl",
                 "queued", "churn"],
    "properties": {
        "experiment": {"type": "string", "enum": ["churn"]},
        "version": {"type": "integer", "enum": [1]},
        "kernel": {"type": "string"},
        "cpus": {"type": "integer", "minimum": 1},
        "netns": {"type": "string", "enum": ["private", "host"]},
        "config": {"type": "object",
                   "required": ["workers", "duration", "linger", "modes", "queued",
                                "schedule"]},
        "sysctl": {"type": "object", "required": ["name", "before", "after", "restored"],
                   "properties": {"name": {"type": "string"}, "before": {"type": "string"},
                                  "after": {"type": "string"},
                                  "restored": {"type": "boolean"}}},
        "queued": {"type": "array", "items": {
            "type": "object",
            "required": ["mode", "k", "queued", "queued_at_close", "ok", "reset", "timeout",
                         "other", "served_by", "migrated", "migrate_failed", "program"],
            "properties": {"mode": _MODE, "k": _INT, "queued": _INT, "queued_at_close": _INT,
                           "first_slot": _INT, "second_slot": _INT,
                           "ok": _INT, "reset": _INT, "timeout": _INT, "other": _INT,
                           "served_by": _COUNTS, "migrated": _INT, "migrate_failed": _INT,
                           "program": _PROGRAM}}},
        "churn": {"type": "array", "items": {
            "type": "object",
            "required": ["mode", "sysctl", "program", "removal", "duration_s", "conns", "ok",
                         "errors", "failed", "resets_per_10k", "failed_per_10k", "leaves",
                         "joins", "queued_at_close", "migrated", "migrate_failed",
                         "program_stats", "final_workers", "per_worker", "events",
                         "timeline"],
            "properties": {
                "mode": _MODE, "sysctl": {"type": "integer", "enum": [0, 1]},
                "program": {"type": ["string", "null"],
                            "enum": ["select", "select_or_migrate", None]},
                "removal": {"type": "string", "enum": ["abrupt", "drain"]},
                "duration_s": _NUM, "conns": _INT, "ok": _INT, "errors": _ERRORS,
                "failed": _INT, "resets_per_10k": _NUM, "failed_per_10k": _NUM,
                "leaves": _INT, "joins": _INT, "queued_at_close": _INT,
                "migrated": _INT, "migrate_failed": _INT, "program_stats": _PROGRAM,
                "final_workers": {"type": "array", "items": _INT},
                "per_worker": _COUNTS,
                "events": {"type": "array", "items": {
                    "type": "object",
                    "required": ["t", "action", "slot", "skipped", "queued", "took_s",
                                 "workers"],
                    "properties": {"t": _NUM, "action": {"type": "string",
                                                         "enum": ["add", "remove"]},
                                   "slot": {"type": ["integer", "null"]},
                                   "skipped": {"type": "boolean"},
                                   "queued": {"type": ["integer", "null"]},
                                   "took_s": {"type": ["number", "null"]},
                                   "workers": _INT}}},
                "timeline": {"type": "array", "items": {
                    "type": "object",
                    "required": ["t", "conns", "ok", "refused", "reset", "timeout", "other"],
                    "properties": {"t": {"type": "number"},
                                   "conns": _INT, "ok": _INT, "refused": _INT,
                                   "reset": _INT, "timeout": _INT, "other": _INT}}}}}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def validate(obj, schema: dict = SCHEMA, path: str = "$") -> list[str]:
    """The JSON Schema subset SCHEMA uses (type, enum, required, properties,
    additionalProperties, items, minimum): the list of violations, [] if none."""
    errs: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = types if isinstance(types, list) else [types]
        if not any(_is(obj, t) for t in types):
            return [f"{path}: expected {'/'.join(types)}, got {type(obj).__name__}"]
    if "enum" in schema and obj not in schema["enum"]:
        errs.append(f"{path}: {obj!r} not one of {schema['enum']}")
    if "minimum" in schema and isinstance(obj, (int, float)) and not isinstance(obj, bool) \
            and obj < schema["minimum"]:
        errs.append(f"{path}: {obj} < {schema['minimum']}")
    if isinstance(obj, dict):
        for k in schema.get("required", ()):
            if k not in obj:
                errs.append(f"{path}: missing {k!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if k in props:
                errs += validate(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                errs += validate(v, extra, f"{path}.{k}")
    if isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            errs += validate(v, schema["items"], f"{path}[{i}]")
    return errs


def _is(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])
