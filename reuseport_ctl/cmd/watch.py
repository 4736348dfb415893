"""`reuseport-ctl watch`: the live per-worker view of a reuseport group --
a rich dashboard, NDJSON lines (--json) and a Prometheus endpoint
(--prometheus) over the same numbers.

Once per interval: find the group (workers may have joined or left), read
the probes (one pass over each BPF map), read the accept queues and the
workers' CPU, fold it all into a Frame (stats/live.py) and hand the frame to
every output. `run --watch` calls watch_own() with the group it started.
"""
from __future__ import annotations

import os
import platform
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Optional

import click
import psutil

from .. import pins
from ..errors import UserError
from ..groups import ReuseportGroup, find_group
from ..kernel import diag, owners
from ..stats.live import GroupInfo, LiveState, Observation, WorkerObs, degraded_note, step

EPILOG = """\b
Examples:
  reuseport-ctl watch --port 8080                 any server: nginx, envoy, ours
  reuseport-ctl watch --port 8080 --json | jq -c '[.jain, .workers[].accepts]'
  reuseport-ctl watch --port 80 --prometheus 9101  then scrape 127.0.0.1:9101/metrics
  reuseport-ctl watch --proto udp --port 5353 --interval 5 --duration 60 --json
  reuseport-ctl watch --port 8080 --wait           start before the server does
  reuseport-ctl watch --port 8080 --spurious       also count accept()s that found nothing
  reuseport-ctl run --workers 4 --watch            our own group, with its own counters

\b
Columns: slot and pid of each worker, its CPU, its share of the group's
connections since the watch began, connections (UDP: datagrams) per second
and their last minute, accept-queue depth, data-ready events per second on
its listener, process wakeups per data-ready event, and spurious wakeups
(accept or recvfrom said EAGAIN: counted by our own workers; for another
server only with --spurious, else "-"). A server without SO_REUSEPORT (one
listener shared by pre-forked workers) is shown too; which worker took each
connection there needs --spurious. q, Ctrl-C or SIGTERM quits and detaches
every probe.
"""

CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39
POLL_S = 0.1         # seconds between checks for q / signals / the deadline


# --- checks --------------------------------------------------------------------------

def require_probe_caps() -> None:
    caps = owners.effective_caps()
    has = lambda c: bool(caps & (1 << c))  # noqa: E731
    missing = [name for name, ok in (
        ("CAP_BPF", has(CAP_BPF) or has(CAP_SYS_ADMIN)),
        ("CAP_PERFMON", has(CAP_PERFMON) or has(CAP_SYS_ADMIN)),
        ("CAP_NET_ADMIN", has(CAP_NET_ADMIN))) if not ok]
    if missing:
        raise UserError(f"watch attaches BPF probes and needs root (this process lacks "
                        f"{', '.join(missing)}): run it with sudo.")


def _check(interval: float, duration: Optional[float]) -> None:
    if not interval > 0:
        raise UserError(f"--interval must be positive, not {interval}.")
    if interval < 0.1:
        raise UserError(f"--interval {interval} is shorter than 0.1 s: reading every probe "
                        f"that often costs more than it shows.")
    if duration is not None and not duration > 0:
        raise UserError(f"--duration must be positive, not {duration}.")


# --- where the workers come from -------------------------------------------------------

class CpuSampler:
    """CPU % since the previous sample (None the first time) and CPU seconds."""

    def __init__(self):
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pids) -> dict[int, tuple[Optional[float], Optional[float]]]:
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
                out[pid] = (None if first else pct, t.user + t.system)
            except psutil.Error:
                self._procs.pop(pid, None)
                out[pid] = (None, None)
        for pid in set(self._procs) - set(pids):
            del self._procs[pid]
        return out


def _by_pid(group: ReuseportGroup) -> list[WorkerObs]:
    """The group's members folded per serving process (a worker may serve
    several sockets, and a listener without SO_REUSEPORT is served by every
    worker that shares it), in slot order."""
    rows: dict[int, dict] = {}
    for m in group.members:
        for pid in m.servers or (m.pid,):
            r = rows.setdefault(pid, {"slot": m.slot, "inodes": [], "queue": 0,
                                      "shared": False})
            r["slot"] = min(r["slot"], m.slot)
            r["inodes"].append(m.inode)
            r["queue"] += m.queue_len
            r["shared"] |= len(m.servers) > 1
    return [WorkerObs(pid=p, slot=r["slot"], inodes=tuple(r["inodes"]), queue_len=r["queue"],
                      shared=r["shared"])
            for p, r in rows.items()]


class ForeignSource:
    """Any server on the port: its workers from the sockets' holders."""
    own = False

    def __init__(self, port: int, proto: str, host: Optional[str], pid: Optional[int]):
        self.port, self.proto, self.host, self.pid = port, proto, host, pid
        self.group: Optional[ReuseportGroup] = None

    def find(self, first: bool = False) -> Optional[list[WorkerObs]]:
        """The workers now; None when nothing listens on the port. A group
        that cannot be read this instant (a process exiting mid-scan) keeps
        its last members, less those that exited."""
        try:
            self.group = find_group(self.port, self.proto, pid=self.pid, host=self.host,
                                    require_reuseport=False)
        except UserError:
            if not diag.listeners(self.port, self.proto):
                self.group = None
                return None
            if first or self.group is None:
                raise
            return [w for w in _by_pid(self.group) if owners.pid_exists(w.pid)]
        return _by_pid(self.group)

    def policy(self) -> str:
        meta = None
        try:
            path = pins.pin_dir(self.proto, self.port)
            meta = pins.read_meta(path) if path.exists() else None
        except (UserError, OSError):
            pass
        here = os.stat("/proc/thread-self/ns/net").st_ino
        if meta is not None and (not meta.netns or meta.netns == here):
            return meta.policy
        return "kernel"

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
        queues = {s.inode: s.queue_len for s in diag.listeners(self.port, self.proto)}
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
            out.append(WorkerObs(pid=pid, slot=index, inodes=inodes,
                                 queue_len=sum(queues.get(i, 0) for i in inodes),
                                 accepts=recs[index][self._field],
                                 eagain=recs[index]["eagain"]))
        return out

    def policy(self) -> str:
        return str(self.sup.cfg.policy)

    def reuseport(self) -> bool:
        return self.sup.cfg.model == "reuseport"

    def listeners(self) -> int:
        return len(self._inodes)

    def selections(self) -> Optional[list[int]]:
        return self.sup.selections()

    def addr(self) -> str:
        host = self.sup.cfg.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


# --- one watch -------------------------------------------------------------------------

class Watch:
    """The probe session, the source of workers and the outputs of one watch;
    close() (or the with block) detaches every probe and stops the exporter."""

    def __init__(self, source, interval: float, as_json: bool = False,
                 prometheus: Optional[str] = None, strategies: Optional[dict] = None,
                 transient: bool = False, stderr: bool = False, spurious: bool = False):
        from ..probes.session import ProbeSession

        self.source, self.interval, self.as_json = source, interval, as_json
        self._stack = ExitStack()
        self._cpu = CpuSampler()
        self._cookies: dict[int, int] = {}
        self._events: list[str] = []
        self.live = None
        self.exporter = None
        self._transient, self._stderr = transient, stderr
        try:
            workers = source.find(first=True)
            self.pids = {w.pid for w in workers or ()}
            try:
                self.session = self._stack.enter_context(ProbeSession(
                    source.port, source.proto, self.pids, strategies,
                    selections=source.selections,
                    # our own workers count their EAGAINs: no syscalls tracepoints
                    eagain=spurious and not source.own))
            except (UserError, KeyboardInterrupt):
                raise
            except Exception as e:         # bcc and the bpf() layer raise plain errors
                raise UserError(f"could not attach the probes to {source.proto} port "
                                f"{source.port}: {e}") from None
            st = self.session.strategies
            names = {k: st.get(k).name if st.get(k) else "none"
                     for k in ("lookup", "data_ready", "wakeups")}
            self.note = degraded_note(names["data_ready"], names["lookup"], source.own)
            eagain = source.own or self.session.counts_eagain
            self.state = LiveState(interval=interval,
                                   counted=(names["data_ready"] != "none",
                                            names["wakeups"] != "none", eagain))
            self.group = GroupInfo(
                port=source.port, proto=source.proto, policy=source.policy(),
                lookup_strategy=names["lookup"], data_ready_strategy=names["data_ready"],
                wakeups_strategy=names["wakeups"], kernel=platform.release(),
                addr=source.addr(), own=source.own, reuseport=source.reuseport(),
                listeners=source.listeners())
            if prometheus is not None:
                from ..export.prometheus import Exporter, parse_listen
                self.exporter = self._stack.enter_context(Exporter(*parse_listen(prometheus)))
            if as_json:
                from ..export.ndjson import NdjsonWriter
                self.ndjson = NdjsonWriter(sys.stdout, self.group)
            self.frame = step(self.state, self._observe(workers))     # the baseline
            if self.exporter is not None:
                self.exporter.update(self.frame, self.group)
        except BaseException:
            self._stack.close()
            raise

    # --- outputs ---

    def start_view(self) -> None:
        """The dashboard (unless --json), updated in place from now on."""
        if self.as_json:
            return
        from rich.console import Console
        from rich.live import Live
        console = Console(stderr=self._stderr)
        if not console.is_terminal:
            console.width = 120             # a pipe has no width: do not cut the columns
        # No refresh thread: run --watch forks restarted workers from this process.
        self.live = self._stack.enter_context(
            Live(self._render(), console=console, auto_refresh=False,
                 transient=self._transient))

    def _render(self):
        from ..ui.dashboard import render
        return render(self.frame, self.group, self.note, tuple(self._events),
                      keys=self.keys_on)

    keys_on = False

    def announce(self) -> None:
        """One line on stderr: what is watched, how, and where metrics are."""
        g = self.group
        what = g.addr or f"port {g.port}"
        msg = (f"reuseport-ctl: watching {g.proto} {what} ({len(self.frame.rows)} workers, "
               f"policy {g.policy}); probes: lookup {g.lookup_strategy}, data-ready "
               f"{g.data_ready_strategy}, wakeups {g.wakeups_strategy}")
        if self.exporter is not None:
            msg += f"; Prometheus metrics on {self.exporter.url}"
        click.echo(msg + ".", err=True)
        if self.note:
            click.echo(f"reuseport-ctl: {self.note}", err=True)
        if not self.frame.listening:
            click.echo(f"reuseport-ctl: nothing listens on {g.proto} port {g.port} yet; "
                       f"waiting (--wait).", err=True)

    # --- one interval ---

    def _observe(self, workers: Optional[list[WorkerObs]]) -> Observation:
        from ..probes.session import socket_cookies
        listening = workers is not None
        workers = workers or []
        pids = {w.pid for w in workers}
        if pids != self.pids:
            self.session.set_pids(pids)
            self.pids = pids
        known = set(self._cookies.values())
        if any(i not in known for w in workers for i in w.inodes):
            # New sockets: asking sock_diag gives each a cookie now, so its
            # data-ready events are told apart from here on.
            self._cookies.update(socket_cookies(self.source.port, self.source.proto))
        t = self.session.read()
        if any(c not in self._cookies for c in t.data_ready):
            self._cookies.update(socket_cookies(self.source.port, self.source.proto))
        ready: dict[int, int] = {}
        for cookie, n in t.data_ready.items():
            key = self._cookies.get(cookie, -cookie - 1)    # a socket already gone
            ready[key] = ready.get(key, 0) + n
        cpu = self._cpu.sample(pids)
        workers = [WorkerObs(pid=w.pid, slot=w.slot, inodes=w.inodes, queue_len=w.queue_len,
                             cpu_percent=cpu[w.pid][0], cpu_seconds=cpu[w.pid][1],
                             accepts=w.accepts, eagain=w.eagain, shared=w.shared)
                   for w in workers]
        return Observation(ts=t.ts, wall=time.time(), workers=tuple(workers),
                           lookups=t.lookups, data_ready=ready, wakeups=dict(t.wakeups),
                           accept_eagain=dict(t.accept_eagain), accepted=dict(t.accepted),
                           listening=listening)

    def tick(self, wait: bool) -> bool:
        """Observe, step, output. False when the group went away and --wait
        was not given (the caller ends the watch)."""
        workers = self.source.find()
        if workers is None and not wait:
            return False
        frame = self.frame = step(self.state, self._observe(workers))
        if self.group.addr == "" and self.source.addr():
            from dataclasses import replace
            self.group = replace(self.group, addr=self.source.addr())
            if self.as_json:
                self.ndjson.group = self.group
        self._events += [f"pid {p} joined" for p in frame.joined]
        self._events += [f"pid {p} left" for p in frame.left]
        del self._events[:-3]
        if self.as_json:
            self.ndjson.write(frame)
        if self.exporter is not None:
            self.exporter.update(frame, self.group)
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
        return True

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _gone(port: int, proto: str) -> UserError:
    return UserError(f"nothing listens on {proto} port {port} any more, so the watch ends "
                     f"(--wait keeps watching until something does).")


# --- the verb --------------------------------------------------------------------------

@click.command(epilog=EPILOG)
@click.option("--port", "-p", type=int, required=True, help="The group's local port.")
@click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--host", default=None, help="The group's local address (when several match).")
@click.option("--pid", type=int, default=None,
              help="A process of the server (when several groups match).")
@click.option("--interval", "-i", type=float, default=1.0, show_default=True,
              help="Seconds between updates.")
@click.option("--duration", "-d", type=float, default=None,
              help="Stop after this many seconds [default: at q, Ctrl-C or SIGTERM].")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per interval, one per line (NDJSON), instead of the view.")
@click.option("--prometheus", metavar="[ADDR:]PORT", default=None,
              help="Serve the numbers as Prometheus metrics on ADDR:PORT/metrics "
                   "(ADDR defaults to 127.0.0.1).")
@click.option("--wait", is_flag=True,
              help="If nothing listens on the port (yet, or any more), keep waiting.")
@click.option("--spurious", is_flag=True,
              help="Also hook the return of accept/accept4 (UDP: recvfrom) with the "
                   "syscalls tracepoints: spurious wakeups (EAGAIN) and, where workers "
                   "share one listener without SO_REUSEPORT, which worker took each "
                   "connection. Off by default: while any syscall tracepoint is on, every "
                   "syscall of every process on the machine takes the kernel's slow path.")
def watch(port, proto, host, pid, interval, duration, as_json, prometheus, wait, spurious):
    """Show live, per worker, how the kernel spreads a reuseport group's
    connections (TCP) or datagrams (UDP), and how its workers are woken."""
    _check(interval, duration)
    if not 0 < port < 65536:
        raise UserError(f"port {port} is not a port number (1-65535).")
    require_probe_caps()
    source = ForeignSource(port, proto, host, pid)
    if not wait and not diag.listeners(port, proto):
        what = "listening TCP" if proto == "tcp" else "bound UDP"
        raise UserError(f"nothing is listening on {proto} port {port} (no {what} socket in "
                        f"this network namespace); --wait waits for it.")
    stop = _Stop()
    with stop.signals(), Watch(source, interval, as_json, prometheus,
                               spurious=spurious) as w:
        w.announce()
        _loop(w, duration, stop, wait)


def watch_own(sup, duration: Optional[float], interval: float = 1.0) -> None:
    """`run --watch`: the dashboard over the group `sup` runs, until duration,
    q, Ctrl-C or SIGTERM (the supervisor's handlers set sup.stopping)."""
    require_probe_caps()
    with Watch(OwnSource(sup), interval, transient=True, stderr=True) as w:
        from ..ui.dashboard import keys
        w.announce()
        with keys() as pressed:
            w.keys_on = pressed is not None
            w.start_view()
            next_at = time.monotonic() + interval

            def on_tick(s) -> None:
                nonlocal next_at
                if pressed is not None and "q" in pressed().lower():
                    s.stopping = True
                    return
                if time.monotonic() >= next_at:
                    w.tick(wait=True)
                    next_at += interval
            sup.serve(duration, on_tick=on_tick, tick=POLL_S)


class _Stop:
    """SIGINT and SIGTERM end the watch cleanly (probes detached, a last frame)."""

    def __init__(self):
        self.why: Optional[str] = None

    @contextmanager
    def signals(self):
        def handler(signum, frame):
            self.why = signal.Signals(signum).name
        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _loop(w: Watch, duration: Optional[float], stop: _Stop, wait: bool) -> None:
    from ..ui.dashboard import keys
    start = time.monotonic()
    deadline = start + duration if duration is not None else None
    n = 1
    with keys() if not w.as_json else nullcontext() as pressed:
        w.keys_on = pressed is not None
        w.start_view()
        while True:
            due = start + n * w.interval
            while stop.why is None:
                now = time.monotonic()
                if now >= due or (deadline is not None and now >= deadline):
                    break
                if pressed is not None and "q" in pressed().lower():
                    stop.why = "q"
                    break
                time.sleep(min(POLL_S, due - now))
            n += 1
            if not w.tick(wait):
                raise _gone(w.source.port, w.source.proto)
            if stop.why is not None or (deadline is not None and time.monotonic() >= deadline):
                return


COMMANDS = [watch]
