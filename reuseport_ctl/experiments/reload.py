"""reload: a server is replaced under load; which way of handing its sockets
over loses what.

A server reloads (new config, new binary) by starting new processes and
stopping the old ones. What happens to the connections and datagrams the
kernel has already queued on the old processes' sockets depends on how the
new processes get their sockets:

    inherit       the new process gets the old sockets by fork/exec (nginx's
                  master, systemd socket activation): the sockets never close
    pass          the new process receives them over a unix socket
                  (SCM_RIGHTS; here taken from the old process with
                  pidfd_getfd and sent on): tableflip, HAProxy's
                  `expose-fd listeners`, Envoy's hot restart
    rebind-off    new sockets are bound beside the old ones (SO_REUSEPORT),
                  then the old ones close: whatever is queued on them -- TCP
                  children in the accept queue, requests in SYN_RECV, UDP
                  datagrams -- is reset or dropped (net.ipv4.tcp_migrate_req 0)
    rebind-on     the same with tcp_migrate_req 1: the kernel moves orphaned
                  TCP requests to another listener of the group
    rebind-bpf    the same with a BPF_SK_REUSEPORT_SELECT_OR_MIGRATE program
                  (bpf/migrate.c) choosing where they go
    rebind-drain  new sockets bound, the old ones steered away from (drain:K)
                  and emptied by their own workers before they close

UDP has no migration: its modes are inherit, pass, rebind-off and
rebind-drain, and a datagram queued on a closing socket is lost.

Two measurements, both on churn's group (experiments/churn.py: Group,
under_load, queued_case), whose workers can be replaced in each way:

  queued_case()   exact: K connections (or datagrams) wait on the old
                  worker's socket, which does not accept (read); the server is
                  replaced; each client is then served, or reset (lost).
  reload_case()   under steady load (TCP short connections, keep-alive
                  connections of several requests, or UDP datagrams), the
                  whole server (every worker) is replaced `reloads` times;
                  failures by kind per 10k, the handover time and the old
                  sockets' queues when they were let go.
"""
from __future__ import annotations

import os
import platform
import select
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from ..errors import UserError
from ..kernel import sockets as ksock
from ..kernel import sysctl
from ..stats.failures import failures, per_10k
from ..workers.supervisor import client_host
from . import churn

MODES = ("inherit", "pass", "rebind-off", "rebind-on", "rebind-bpf", "rebind-drain")
UDP_MODES = ("inherit", "pass", "rebind-off", "rebind-drain")
LOADS = ("short", "keepalive", "udp")
# the churn mode (sysctl, program) each reload mode runs in
SETUP = {"inherit": "off", "pass": "off", "rebind-off": "off", "rebind-on": "on",
         "rebind-bpf": "bpf", "rebind-drain": "drain"}
MIGRATE_REQ = churn.MIGRATE_REQ


@dataclass(frozen=True)
class ReloadConfig:
    workers: int = 2                    # sockets (and worker processes) of the server
    reloads: int = 3                    # replacements per run
    duration: float = 3.0               # seconds of load per run
    modes: tuple[str, ...] = MODES
    loads: tuple[str, ...] = LOADS
    queued: int = 16                    # K for the exact cases; 0 skips them
    linger: float = 0.05                # rebind: old worker stops, its socket closes after
    keepalive_requests: int = 20        # requests per keep-alive connection
    host: str = "127.0.0.1"
    port: int = 0
    backlog: int = 1024
    concurrency: int = 32
    timeout: float = 1.0                # TCP: per connection (and per request)
    udp_timeout: float = 0.5            # UDP: a datagram not echoed by then is lost

    def validate(self) -> None:
        if not 1 <= self.workers <= churn.MAX_SLOTS // 2:
            raise UserError(f"--workers must be between 1 and {churn.MAX_SLOTS // 2} "
                            f"(a rebind holds old and new at once), not {self.workers}.")
        if not 1 <= self.reloads <= 1000:
            raise UserError(f"--reloads must be between 1 and 1,000, not {self.reloads}.")
        if not self.duration > 0 or self.duration != self.duration or self.duration > 86400:
            raise UserError(f"--duration must be positive (at most a day), not {self.duration}.")
        if self.duration / self.reloads < 0.2:
            raise UserError(f"{self.reloads} reloads in {self.duration:g} s is one every "
                            f"{self.duration / self.reloads:.2f} s: give at least 0.2 s each.")
        _check(self.modes, MODES, "mode")
        _check(self.loads, LOADS, "load")
        if not self.modes:
            raise UserError("nothing to run: give at least one mode.")
        if not 0 <= self.queued <= min(self.backlog, 1024):
            raise UserError(f"--queued must be between 0 and {min(self.backlog, 1024)}, "
                            f"not {self.queued}.")
        if not 0 <= self.linger <= 10:
            raise UserError(f"--linger must be between 0 and 10 seconds, not {self.linger}.")
        if not 1 <= self.keepalive_requests <= 10000:
            raise UserError(f"--keepalive-requests must be between 1 and 10,000, "
                            f"not {self.keepalive_requests}.")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be at least 1, not {self.concurrency}.")
        for name, v in (("--timeout", self.timeout), ("--udp-timeout", self.udp_timeout)):
            if not 0 < v <= 60:
                raise UserError(f"{name} must be between 0 and 60 seconds, not {v}.")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, not {self.port}.")

    def times(self) -> list[float]:
        """When the reloads happen: evenly, the first half a period in."""
        step = self.duration / self.reloads
        return [round((i + 0.5) * step, 6) for i in range(self.reloads)]


def _check(given: tuple[str, ...], known: tuple[str, ...], what: str) -> None:
    bad = [m for m in given if m not in known]
    if bad:
        raise UserError(f"unknown {what} {bad[0]!r}: choose from {', '.join(known)}.")


def parse_list(spec: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """'inherit, rebind-off' -> ('inherit', 'rebind-off'), each checked."""
    out = tuple(m.strip().lower() for m in spec.split(",") if m.strip())
    _check(out, known, what)
    return out


def modes_for(load: str, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The modes a load runs in: UDP has no migration to try."""
    return tuple(m for m in modes if load != "udp" or m in UDP_MODES)


# --- replacing the server ------------------------------------------------------------

def replace(g: churn.Group, mode: str, linger: float) -> tuple[list[int], int]:
    """Replace every worker of the group in `mode`. Returns (each old
    socket's queue when it was let go -- None for a UDP socket handed over:
    it stays open, its datagrams are not counted --, the first new slot)."""
    old = g.live()
    queued: list[int] = []
    first_new = old[0] if old else -1
    if mode in ("inherit", "pass"):
        for slot in old:
            queued.append(g.handover(slot, mode)[0])
        return queued, first_new
    new = [g.add() for _ in old]
    first_new = new[0]
    if mode == "rebind-drain":
        for slot in old:                # steer away from every old socket at once
            g.program.disable(slot)
        for slot in old:
            queued.append(g.drain(slot)[0])
    else:
        for slot in old:
            queued.append(g.leave(slot, linger))
    return queued, first_new


def _reload_action(mode: str, linger: float):
    def act(g: churn.Group, t0: float) -> dict:
        t = time.monotonic()
        queued, _ = replace(g, mode, linger)
        return {"t": round(t - t0, 4), "took_s": round(time.monotonic() - t, 4),
                "queued": queued, "workers": g.live()}
    return act


# --- the exact cases --------------------------------------------------------------------

def queued_case(mode: str, proto: str, k: int, host: str = "127.0.0.1",
                backlog: int = 1024, timeout: float = 2.0) -> dict:
    """K connections (TCP) or datagrams (UDP) wait on the only socket of a
    server whose worker does not accept (read); the server is replaced in
    `mode`; then every client is served, or reset (lost)."""
    def swap(g: churn.Group, first: int) -> tuple[int, int]:
        queued, second = replace(g, mode, 0.0)
        return second, queued[0]
    if proto == "tcp":
        r = churn.queued_case(SETUP[mode], k, host, 0, backlog, timeout, swap=swap)
        r.pop("first_slot", None)
        return {**r, "mode": mode, "proto": "tcp", "lost": r["reset"] + r["timeout"]}
    return _udp_queued_case(mode, k, host, backlog, timeout, swap)


def _udp_queued_case(mode: str, k: int, host: str, backlog: int, timeout: float,
                     swap: Callable[[churn.Group, int], tuple[int, int]]) -> dict:
    with churn.mode_setup(SETUP[mode]) as prog:
        with churn.Group(host, 0, backlog, prog, proto="udp") as g:
            clients: list[socket.socket] = []
            try:
                first = g.add(hold=True)
                chost = client_host(host)
                for i in range(k):
                    c = socket.socket(ksock.resolve(chost, g.port, "udp")[0], socket.SOCK_DGRAM)
                    clients.append(c)
                    c.connect((chost, g.port))
                    c.send(b"queued %d" % i)
                deadline = time.monotonic() + timeout
                while g.queue_len(first) == 0 and time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(0.02)            # loopback delivers within the send; a margin
                second, at_close = swap(g, first)
                answered, served_by = _read_echoes(clients, timeout)
                pstats = prog.stats() if prog is not None else None
            finally:
                for c in clients:
                    c.close()
    return {"mode": mode, "proto": "udp", "k": k, "queued_at_close": at_close,
            "second_slot": second, "ok": answered, "lost": k - answered,
            "served_by": served_by, "program": pstats}


def _read_echoes(clients: list[socket.socket], timeout: float) -> tuple[int, dict]:
    """How many clients got their echo within `timeout`, and from which slot."""
    served: Counter = Counter()
    waiting = {c.fileno(): c for c in clients}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            try:
                data = waiting.pop(fd).recv(2048)
            except OSError:
                continue
            head = data.split(b"\n", 1)[0]
            served[head.split(b":", 1)[1].strip().decode() if b":" in head else "?"] += 1
    return sum(served.values()), dict(sorted(served.items()))


# --- under steady load --------------------------------------------------------------------

def reload_case(mode: str, load: str, cfg: ReloadConfig,
                tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """The whole server replaced cfg.reloads times under `load`."""
    udp = load == "udp"
    actions = [(t, _reload_action(mode, cfg.linger)) for t in cfg.times()]
    run = churn.under_load(SETUP[mode], actions, host=cfg.host, port=cfg.port,
                           backlog=cfg.backlog, workers=cfg.workers, duration=cfg.duration,
                           concurrency=cfg.concurrency,
                           timeout=cfg.udp_timeout if udp else cfg.timeout,
                           proto="udp" if udp else "tcp",
                           requests=cfg.keepalive_requests if load == "keepalive" else 1,
                           tick=tick)
    return summarize(mode, load, run)


def summarize(mode: str, load: str, run: dict) -> dict:
    """One row of the report from an under_load run (pure)."""
    f = failures(run["totals"])
    events = run["events"]
    took = [e["took_s"] for e in events]
    queued = [q for e in events for q in e["queued"] if q is not None]
    udp = load == "udp"
    # UDP: a datagram with no echo in time is lost (a refusal too: no socket)
    lost = f["errors"]["timeout"] + f["errors"]["refused"] if udp else None
    return {"mode": mode, "load": load, "proto": "udp" if udp else "tcp",
            "sysctl": 1 if SETUP[mode] == "on" else 0, "program": run["program"],
            "reloads": len(events), "conns": f["conns"], "ok": f["ok"], "errors": f["errors"],
            "failed": f["failed"], "failed_per_10k": f["failed_per_10k"],
            "failed_new": f["failed_new"], "failed_reused": f["failed_reused"],
            "failed_new_per_10k": f["failed_new_per_10k"],
            "reset_per_10k": f["reset_per_10k"], "refused_per_10k": f["refused_per_10k"],
            "timeout_per_10k": f["timeout_per_10k"],
            "lost": lost, "lost_per_10k": per_10k(lost, f["conns"]) if udp else None,
            "handover_ms": {"mean": round(1000 * sum(took) / len(took), 2) if took else None,
                            "max": round(1000 * max(took), 2) if took else None},
            "queued_at_close": sum(queued), "queued_max": max(queued, default=0),
            "migrated": run["migrated"], "migrate_failed": run["migrate_failed"],
            "program_stats": run["program_stats"], "per_worker": run["per_worker"],
            "events": events, "timeline": run["timeline"]}


# --- the whole experiment --------------------------------------------------------------

def plan(cfg: ReloadConfig) -> list[tuple[str, str, str]]:
    """Every step in order: ("queued", mode, proto) then ("load", mode, load)."""
    steps: list[tuple[str, str, str]] = []
    if cfg.queued:
        if any(ld != "udp" for ld in cfg.loads):
            steps += [("queued", m, "tcp") for m in cfg.modes]
        if "udp" in cfg.loads:
            steps += [("queued", m, "udp") for m in modes_for("udp", cfg.modes)]
    for ld in cfg.loads:
        steps += [("load", m, ld) for m in modes_for(ld, cfg.modes)]
    return steps


def run_experiment(cfg: ReloadConfig, netns: str = "private",
                   on_step: Optional[Callable[[str], None]] = None,
                   tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """Every exact case, then every run under load; the report --json prints.
    tcp_migrate_req is put back by each mode (churn.mode_setup), whatever
    happens; the report says it was. A stopping signal (KeyboardInterrupt,
    signals.Interrupted) ends the run after the step's own cleanup: the
    report then holds the steps done and `interrupted` the signal."""
    from ..signals import signum_of

    cfg.validate()
    before = sysctl.read(MIGRATE_REQ)
    queued, runs = [], []
    interrupted = 0
    try:
        for kind, mode, what in plan(cfg):
            if on_step:
                on_step(f"{kind} {what} {mode}")
            if kind == "queued":
                queued.append(queued_case(mode, what, cfg.queued, cfg.host, cfg.backlog))
            else:
                runs.append(reload_case(mode, what, cfg, tick))
    except KeyboardInterrupt as e:
        interrupted = signum_of(e)
    after = sysctl.read(MIGRATE_REQ)
    conf = asdict(cfg)
    conf["modes"], conf["loads"] = list(cfg.modes), list(cfg.loads)
    conf["times"] = cfg.times()
    return {"experiment": "reload", "version": 1,
            "kernel": platform.release(), "cpus": os.cpu_count() or 1, "netns": netns,
            "config": conf,
            "sysctl": {"name": MIGRATE_REQ, "before": before, "after": after,
                       "restored": before == after},
            "interrupted": interrupted, "queued": queued, "runs": runs}


# --- a real server, reloaded by its own command ---------------------------------------------

@dataclass(frozen=True)
class ExternalConfig:
    port: int
    command: str                        # run by /bin/sh -c at each reload
    host: str = "127.0.0.1"
    reloads: int = 3
    duration: float = 6.0
    loads: tuple[str, ...] = ("short",)
    migrate_req: Optional[int] = None   # set net.ipv4.tcp_migrate_req for the run
    keepalive_requests: int = 20
    concurrency: int = 32
    timeout: float = 1.0
    command_timeout: float = 30.0

    def validate(self) -> None:
        ReloadConfig(reloads=self.reloads, duration=self.duration, loads=self.loads,
                     keepalive_requests=self.keepalive_requests,
                     concurrency=self.concurrency, timeout=self.timeout).validate()
        if not 1 <= self.port <= 65535:
            raise UserError(f"--exec needs the server's --port (1..65535), not {self.port}.")
        if "udp" in self.loads:
            raise UserError("--exec measures a TCP server: the loads are short and keepalive.")
        if not self.command.strip():
            raise UserError("--exec needs the command that reloads the server.")
        if self.migrate_req not in (None, 0, 1):
            raise UserError(f"--migrate-req is 0 or 1, not {self.migrate_req}.")

    def times(self) -> list[float]:
        return ReloadConfig(reloads=self.reloads, duration=self.duration).times()


class _SocketWatch:
    """The port's listening sockets, sampled (sock_diag): which closed (with
    the accept queue last seen on each) and which were bound, so the report
    says how the server handed over -- kept its sockets, or rebound."""

    def __init__(self, port: int):
        self.port = port
        self.seen: dict[int, int] = {}      # inode -> last accept-queue length
        self.first: set[int] = set()
        self.closed: dict[int, int] = {}
        self.sample()
        self.first = set(self.seen)

    def sample(self) -> None:
        from ..kernel import diag
        now = {s.inode: s.queue_len for s in diag.listeners(self.port, "tcp")}
        for ino in set(self.seen) - set(now):
            self.closed[ino] = self.seen.pop(ino)
        self.seen.update(now)

    def summary(self) -> dict:
        bound = (set(self.seen) | set(self.closed)) - self.first
        return {"at_start": len(self.first), "at_end": len(self.seen), "closed": len(self.closed),
                "bound": len(bound),
                "queued_at_close_seen": sum(self.closed.values())}


def external_case(cfg: ExternalConfig, load: str,
                  tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """Steady load on a running server while `cfg.command` reloads it
    cfg.reloads times; the client's failures by kind, and the port's
    sockets as sock_diag saw them (kept, or closed and bound anew)."""
    import subprocess
    from contextlib import nullcontext

    from ..load.steady import SteadyLoad

    setting = (sysctl.setting(MIGRATE_REQ, cfg.migrate_req) if cfg.migrate_req is not None
               else nullcontext())
    events: list[dict] = []
    with setting:
        watch = _SocketWatch(cfg.port)
        if not watch.first:
            raise UserError(f"nothing listens on tcp port {cfg.port} in this network namespace.")
        ld = SteadyLoad(cfg.host, cfg.port, cfg.concurrency, cfg.timeout,
                        requests=cfg.keepalive_requests if load == "keepalive" else 1)
        try:
            t0 = time.monotonic()
            ld.start(t0)
            times = cfg.times()
            while True:
                now = time.monotonic() - t0
                if now >= cfg.duration:
                    break
                if times and times[0] <= now:
                    times.pop(0)
                    t = time.monotonic()
                    p = subprocess.run(["/bin/sh", "-c", cfg.command], capture_output=True,
                                       text=True, timeout=cfg.command_timeout)
                    events.append({"t": round(t - t0, 4), "took_s": round(time.monotonic() - t, 4),
                                   "rc": p.returncode, "stderr": p.stderr.strip()[-300:],
                                   "queued": []})
                watch.sample()
                ld.sample()
                if tick is not None:
                    tick(now, *ld.progress())
                time.sleep(0.01)
            result = ld.stop()
        finally:
            ld.close()
        watch.sample()
    run = {"totals": result["totals"], "per_worker": result["per_worker"],
           "timeline": result["timeline"], "events": events, "migrated": 0,
           "migrate_failed": 0, "program": None, "program_stats": None}
    row = summarize("rebind-off", load, run)
    row.update({"mode": "exec", "command": cfg.command, "sysctl": cfg.migrate_req,
                "sockets": watch.summary(), "command_failed": sum(1 for e in events if e["rc"])})
    row.pop("queued_at_close"), row.pop("queued_max")
    return row


def run_external(cfg: ExternalConfig, on_step: Optional[Callable[[str], None]] = None,
                 tick: Optional[Callable[[float, int, int], None]] = None) -> dict:
    """Every load against the real server; the report --json prints."""
    from ..signals import signum_of

    cfg.validate()
    before = sysctl.read(MIGRATE_REQ)
    runs, interrupted = [], 0
    try:
        for load in cfg.loads:
            if on_step:
                on_step(f"load {load} exec")
            runs.append(external_case(cfg, load, tick))
    except KeyboardInterrupt as e:
        interrupted = signum_of(e)
    after = sysctl.read(MIGRATE_REQ)
    conf = asdict(cfg)
    conf["loads"], conf["times"] = list(cfg.loads), cfg.times()
    return {"experiment": "reload", "version": 1, "kernel": platform.release(),
            "cpus": os.cpu_count() or 1, "netns": "host", "config": conf,
            "sysctl": {"name": MIGRATE_REQ, "before": before, "after": after,
                       "restored": before == after},
            "interrupted": interrupted, "queued": [], "runs": runs}
