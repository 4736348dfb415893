"""The supervisor: makes the group's sockets, attaches the policy, forks the
workers, restarts one that dies, and on the way out releases everything.

Like nginx's master, the supervisor keeps every socket it made. A worker
closes all but its own, so a restarted worker gets the very same socket
back and the reuseport group never changes on a restart (no remapped flows,
no orphaned handshakes).

--user: the sockets are created under a temporary seteuid(user), because
socket() stamps its creator's uid on the socket and that uid is what the
kernel's anti-hijack rule compares when anyone else tries to join the group.
Everything else (bind below 1024, attaching BPF) keeps root's privileges, and
each worker drops to the user for good after it has inherited its socket.
We do not let workers create their own sockets: a restart would then change
the group, and the policy could not be attached before the first connection.

    with Supervisor(RunConfig(workers=4)) as sup:
        sup.start()
        sup.wait_ready()
        sup.serve(duration=10)       # or sup.run_in_child(fn) for a load run
        sup.stop()
        report = sup.report()
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .. import cpulist
from ..errors import UserError
from ..kernel import children, process
from ..kernel import sockets as ksock
from ..policies import Policy
from ..stats.fairness import summarize
from . import models
from .counters import PID, READY, RESTARTS, Counters

MODELS = models.MODELS
STOP_GRACE_S = 2.0
EARLY_DEATHS = 3        # a worker dying this often before it is ready is a bug, not bad luck


@dataclass(frozen=True)
class RunConfig:
    workers: int
    host: str = "127.0.0.1"
    port: int = 8080
    proto: str = "tcp"
    model: str = "reuseport"
    policy: Policy = field(default_factory=lambda: Policy("kernel"))
    cpus: Optional[tuple[int, ...]] = None      # pin slot i to cpus[i % len]; None: no pinning
    user: Optional[str] = None
    backlog: int = 1024
    work_us: int = 0        # busy CPU per request in the worker (bench --work-us)
    pin: bool = False       # pin the policy like attach, so status/watch elsewhere see it (run)

    def validate(self) -> None:
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, not {self.workers}.")
        if self.workers > 1024:
            raise UserError(f"--workers {self.workers} is more than 1024 processes: "
                            f"use fewer.")
        if self.proto not in ("tcp", "udp"):
            raise UserError(f"protocol must be tcp or udp, not {self.proto!r}.")
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}.")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be between 0 and 65535, not {self.port}.")
        if self.backlog < 1:
            raise UserError(f"--backlog must be at least 1, not {self.backlog}.")
        if not 0 <= self.work_us <= 1_000_000:
            raise UserError(f"--work-us must be between 0 and 1000000, not {self.work_us}.")
        if self.policy.kind != "none" and self.model != "reuseport":
            raise UserError(f"policy {self.policy} steers a reuseport group, and the "
                            f"{self.model} model has a single socket: use --model reuseport.")
        if self.model == "reuseport":
            self.policy.check_group_size(self.workers)


def parse_cpus(spec: str, usable: Optional[list[int]] = None,
               workers: Optional[int] = None) -> tuple[int, ...]:
    """'0,2' or '0-3' or '0-1,3' -> CPUs, each one this process may run on.
    'auto' (given the worker count): worker k on CPU k, so that the cpu
    policy (CPU c's traffic -> worker c) lines up with the pinning."""
    usable = process.usable_cpus() if usable is None else usable
    if spec.strip() == "auto" and workers is not None:
        missing = [k for k in range(workers) if k not in usable]
        if missing:
            raise UserError(f"--cpus auto pins worker k to CPU k, and CPU {missing[0]} is not "
                            f"usable here (usable: {','.join(map(str, usable))}): use "
                            f"--workers {_first_gap(usable)} or fewer, or list the CPUs.")
        return tuple(range(workers))
    try:
        cpus = cpulist.parse(spec)
        if not cpus:
            raise ValueError
    except ValueError:
        raise UserError(f"bad CPU list {spec!r}: write CPUs like 0,1 or 0-3.") from None
    bad = [c for c in cpus if c not in usable]
    if bad:
        raise UserError(f"CPU {bad[0]} is not online or not allowed here "
                        f"(usable: {','.join(map(str, usable))}).")
    return tuple(cpus)


def _first_gap(cpus: list[int]) -> int:
    k = 0
    while k in cpus:
        k += 1
    return k


def client_host(host: str) -> str:
    """Where a local client reaches a server bound to host."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class Supervisor:
    def __init__(self, cfg: RunConfig):
        cfg.validate()
        self.cfg = cfg
        self.port = cfg.port
        self.account: Optional[process.Account] = None
        self.socks: list[socket.socket] = []      # group sockets in slot order, or the shared one
        self.chans: list[tuple[socket.socket, socket.socket]] = []   # (acceptor end, worker end)
        self.selector = None
        self.counters: Optional[Counters] = None
        self.stopping = False                       # set by SIGINT/SIGTERM/SIGHUP
        self.stop_signal = 0                        # ... and which one
        self._children: dict[int, int] = {}        # pid -> record index
        self._early: dict[int, int] = {}           # record index -> deaths before ready
        self._helper: Optional[int] = None         # run_in_child's process
        self._selections: Optional[list[int]] = None
        self._handlers: dict[int, Any] = {}
        self._me = os.getpid()
        self._started = self._stopped = False
        self.pinned = None                          # cfg.pin: the policy's pin directory
        self.pin_note = ""                          # cfg.pin: not pinned, or what pinning removed

    # --- life cycle -----------------------------------------------------------

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self.counters is not None:
            self.counters.close()
            self.counters = None

    def start(self) -> None:
        cfg = self.cfg
        self._started = True
        self._catch_signals()
        if cfg.user is not None:
            if os.geteuid() != 0:
                raise UserError("--user needs root: only root can make sockets for another "
                                "user and switch workers to it.")
            self.account = process.lookup_user(cfg.user)
        uid = self.account.uid if self.account else os.geteuid()
        reuse = cfg.model == "reuseport"
        ksock.check_port_free(cfg.host, cfg.port, cfg.proto, reuseport=reuse, uid=uid)
        if reuse:
            self.socks = ksock.open_group(cfg.host, cfg.port, cfg.proto, cfg.workers,
                                          backlog=cfg.backlog, uid=uid)
        else:
            self.socks = [ksock.open_listener(cfg.host, cfg.port, cfg.proto, reuseport=False,
                                              backlog=cfg.backlog, uid=uid)]
        self.port = self.socks[0].getsockname()[1]
        # The file's O_NONBLOCK is shared by every process holding the socket:
        # blocking for the sleepers (shared-accept, the acceptor), not for epoll.
        for s in self.socks:
            s.setblocking(cfg.model in ("shared-accept", "dispatcher"))
        if cfg.policy.kind != "none":
            from ..policies.selector import attach_policy
            self.selector = attach_policy(cfg.policy, self.socks, cpus=cfg.cpus)
        if cfg.model == "dispatcher":
            self.chans = [ksock.channel_pair() for _ in range(cfg.workers)]
        self.counters = Counters(cfg.workers)
        for i in range(cfg.workers):
            self._spawn(i)
        if cfg.model == "dispatcher":
            self._spawn(self.counters.acceptor)
        if cfg.pin and self.selector is not None and cfg.policy.kind != "none":
            self._pin()

    def _pin(self) -> None:
        """Pin the policy as attach does (pins.pin_run), so `status` and
        `watch` from any other process see it. Without CAP_BPF (a cBPF
        policy needs none) there is nothing to pin in: say so once."""
        from .. import pins
        from ..kernel import owners
        missing = owners.missing_caps()
        if missing:
            self.pin_note = (f"policy {self.cfg.policy} is not pinned (this process lacks "
                             f"{' and '.join(missing)}), so `reuseport-ctl status` and `watch` "
                             f"from another process will not see it.")
            return
        pids = [self.counters.slot(i).get(PID) for i in range(self.cfg.workers)]
        self.pinned, self.pin_note = pins.pin_run(self.selector, self.socks, pids, self.port,
                                                  self.cfg.proto)

    def _unpin(self) -> None:
        if self.pinned is None:
            return
        from .. import pins
        path, self.pinned = self.pinned, None
        try:
            pins.unpin_run(path)
        except (UserError, OSError):
            pass        # left behind: stale once we are gone, removed by the next verb

    def wait_ready(self, timeout: float = 15.0) -> bool:
        """Until every worker says it is in its loop; False if stopped first."""
        deadline = time.monotonic() + timeout
        while not self.stopping:
            self.poll()
            if all(self.counters.slot(i).get(READY) for i in self._records()):
                return True
            if time.monotonic() > deadline:
                raise UserError(f"the workers were not ready within {timeout:.0f} s.")
            time.sleep(0.01)
        return False

    def serve(self, duration: Optional[float] = None,
              on_tick: Optional[Callable[["Supervisor"], None]] = None, tick: float = 1.0) -> None:
        """Supervise until `duration` passes or SIGINT/SIGTERM arrives."""
        deadline = None if duration is None else time.monotonic() + duration
        next_tick = time.monotonic() + tick
        while not self.stopping:
            self.poll()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if on_tick is not None and now >= next_tick:
                on_tick(self)
                next_tick = now + tick
            time.sleep(0.05)

    def run_in_child(self, fn: Callable[[], Any], on_tick: Optional[Callable[[float], None]] = None,
                     next_due: Optional[Callable[[float], float]] = None) -> Any:
        """fn() in a forked helper (the load client), supervising meanwhile so
        a dying worker is restarted while the load runs; fn's result comes back
        pickled. None if stopped by a signal first. on_tick(now) runs at least
        every 50 ms, and at next_due(now) when that is sooner (a stall's
        schedule)."""
        r, w = os.pipe()
        pid = children.fork()
        if pid == 0:
            os.close(r)
            self._helper_main(fn, w)
        os.close(w)
        self._helper = pid
        data = bytearray()
        try:
            while not self.stopping:
                wait = 0.05
                if on_tick is not None:
                    now = time.monotonic()
                    on_tick(now)
                    if next_due is not None:
                        wait = min(wait, max(0.0, next_due(now) - now))
                if select.select([r], [], [], wait)[0]:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        break
                    data += chunk
                self.poll()
        finally:
            os.close(r)
            if self.stopping:
                children.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            self._helper = None
        if self.stopping:
            return None
        kind, value = pickle.loads(data) if data else ("err", "the helper process died")
        if kind == "user":
            raise UserError(value)
        if kind == "err":
            raise RuntimeError(f"load run failed: {value}")
        return value

    def poll(self) -> None:
        """Reap dead children and restart them (unless we are stopping)."""
        for pid, index in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if not done:
                continue
            del self._children[pid]
            if self.stopping:
                continue
            rec = self.counters.slot(index)
            if not rec.get(READY):
                self._early[index] = self._early.get(index, 0) + 1
                if self._early[index] >= EARLY_DEATHS:
                    raise UserError(f"{self._role(index)} died before it was ready "
                                    f"{EARLY_DEATHS} times ({_death(status)}).")
            else:
                self._early[index] = 0
            rec.inc(RESTARTS)
            self._spawn(index)
            if self.pinned is not None and index < self.cfg.workers:
                from .. import pins
                try:
                    pins.repin_run(self.pinned, index, rec.get(PID))
                except (UserError, OSError):
                    pass    # the record keeps the old pid; status finds the live one itself

    def stop(self) -> None:
        """Detach the policy, stop and reap every child, close every socket.
        Idempotent; after it the port can be bound again at once."""
        if self._stopped or not self._started:
            return
        self._stopped = self.stopping = True
        try:
            if self.selector is not None:
                try:
                    self._selections = self.selector.selections()
                finally:
                    try:
                        self.selector.close()
                    finally:
                        self.selector = None
                        self._unpin()       # detached first: never pinned yet absent
        finally:
            children.stop(list(self._children) + ([self._helper] if self._helper else []),
                          STOP_GRACE_S)
            self._children.clear()
            for s in self.socks + [s for pair in self.chans for s in pair]:
                s.close()
            self._restore_signals()

    # --- what happened ----------------------------------------------------------

    def pids(self) -> dict[int, int]:
        """record index -> pid of the live process in it."""
        return {index: pid for pid, index in self._children.items()}

    def selections(self) -> Optional[list[int]]:
        if self.selector is not None:
            return self.selector.selections()
        return self._selections

    def report(self, load: Optional[dict] = None) -> dict:
        """The numbers the summary table and --json show."""
        cfg = self.cfg
        metric = "accepts" if cfg.proto == "tcp" else "datagrams"
        recs = self.counters.snapshot()
        counts = [r[metric] for r in recs]
        fair = summarize(counts)
        workers = []
        for i, r in enumerate(recs):
            workers.append({"slot": i, "pid": r["pid"], "cpu": self._cpu(i), "count": counts[i],
                            "share": round(fair["shares"][i], 4),
                            **{k: r[k] for k in ("accepts", "requests", "datagrams", "eagain",
                                                 "wakeups", "restarts")}})
        out = {"model": cfg.model, "policy": str(cfg.policy), "proto": cfg.proto,
               "host": cfg.host, "port": self.port,
               "user": self.account.name if self.account else None,
               "count_of": "accepted connections" if cfg.proto == "tcp" else "received datagrams",
               "workers": workers, "total": fair["total"],
               "max_min_ratio": fair["max_min_ratio"], "jain": fair["jain"],
               "selections": self.selections(), "load": load}
        if cfg.model == "dispatcher":
            a = self.counters.read(self.counters.acceptor)
            out["acceptor"] = {k: a[k] for k in ("pid", "accepts", "datagrams", "wakeups",
                                                 "restarts")}
        return out

    # --- children ---------------------------------------------------------------

    def _records(self) -> list[int]:
        n = self.cfg.workers
        return list(range(n + 1 if self.cfg.model == "dispatcher" else n))

    def _role(self, index: int) -> str:
        return "the acceptor" if index == self.cfg.workers else f"worker {index}"

    def _cpu(self, index: int) -> Optional[int]:
        cpus = self.cfg.cpus
        return cpus[index % len(cpus)] if cpus else None

    def _spawn(self, index: int) -> None:
        rec = self.counters.slot(index)
        rec.set(READY, 0)
        pid = children.fork()
        if pid == 0:
            children.run_child(lambda: self._child_main(index), self._role(index))
        rec.set(PID, pid)
        self._children[pid] = index

    def _child_main(self, index: int) -> None:
        """Body of a worker or the acceptor, in its forked process."""
        process.die_with_parent(self._me)
        keep = self._sockets_for(index)
        for s in self.socks + [s for pair in self.chans for s in pair]:
            if s not in keep:
                s.close()
        process.close_fds_except({0, 1, 2} | {s.fileno() for s in keep})
        cfg = self.cfg
        acceptor = index == cfg.workers
        process.set_name("rpctl-acceptor" if acceptor else f"rpctl-w{index}")
        if cfg.cpus:
            process.pin(self._cpu(index))
        if self.account:
            process.drop_privileges(self.account)
        ctr = self.counters.slot(index)
        models.set_work_us(cfg.work_us)
        if acceptor:
            models.run_acceptor(cfg.proto, ctr, self.socks[0], [a for a, _ in self.chans])
        else:
            own = self.socks[index] if cfg.model == "reuseport" else self.socks[0]
            chan = self.chans[index][1] if self.chans else None
            models.run_worker(cfg.model, cfg.proto, index, ctr, own, chan)

    def _sockets_for(self, index: int) -> list[socket.socket]:
        cfg = self.cfg
        if index == cfg.workers:                               # the acceptor
            return [self.socks[0]] + [a for a, _ in self.chans]
        if cfg.model == "reuseport":
            return [self.socks[index]]
        if cfg.model == "dispatcher":
            return [self.chans[index][1]] + ([self.socks[0]] if cfg.proto == "udp" else [])
        return [self.socks[0]]

    def _helper_main(self, fn: Callable[[], Any], w: int) -> None:
        code = 1
        try:
            process.die_with_parent(self._me)
            for s in self.socks + [s for pair in self.chans for s in pair]:
                s.close()
            try:
                result = ("ok", fn())
            except UserError as e:
                result = ("user", str(e))
            except BaseException:
                result = ("err", traceback.format_exc(limit=5))
            data = memoryview(pickle.dumps(result))
            while data:
                data = data[os.write(w, data):]
            code = 0
        finally:
            os._exit(code)

    # --- signals ----------------------------------------------------------------

    def _catch_signals(self) -> None:
        def on_signal(signum, frame):
            self.stopping = True
            self.stop_signal = signum
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:          # not the main thread: the caller handles signals
            self._handlers.clear()

    def _restore_signals(self) -> None:
        for sig, h in self._handlers.items():
            signal.signal(sig, h)
        self._handlers.clear()


def _death(status: int) -> str:
    """How a child ended, for a person: its own error is on stderr above; a
    signal came from outside (nothing printed)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the last time killed by signal {sig} ({name}), from outside"
    return f"last exit status {os.waitstatus_to_exitcode(status)}; its error is above"
