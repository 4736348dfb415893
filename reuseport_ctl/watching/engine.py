"""Watch: one watch of one group -- the probe session, the source of rows,
and the outputs (dashboard, NDJSON, Prometheus) over the same frames.

Once per interval: find the group (members may have joined or left), read
the probes (one pass over each BPF map), read the accept queues and the
processes' CPU, fold it all into a Frame (stats/live.py) and hand the frame
to every output.

Every total counts from one instant: the probes attach one after the other
(compiling takes seconds on a loaded machine), so the first observation
re-bases the probe session (one read of every map, subtracted from every
later one) at the same moment it takes the own counters' baseline.
"""
from __future__ import annotations

import platform
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from typing import Optional

from ..closing import Closing
from ..errors import UserError
from ..stats.live import GroupInfo, LiveState, Observation, WorkerObs, degraded_note, step
from .sources import CpuSampler

EVENTS_KEPT = 3


def say(msg: str) -> None:
    """One line on stderr for the person watching (not part of the data)."""
    print(f"reuseport-ctl: {msg}", file=sys.stderr, flush=True)


class Watch(Closing):
    """The probe session, the source of rows and the outputs of one watch;
    close() (or the with block) detaches every probe and stops the exporter."""

    keys_on = False

    def __init__(self, source, interval: float, as_json: bool = False,
                 prometheus: Optional[str] = None, strategies: Optional[dict] = None,
                 transient: bool = False, stderr: bool = False, spurious: bool = False):
        from ..probes.session import PIDNS_NOTE, ProbeSession

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
            self.pids = self._watched(workers)
            if prometheus is not None:        # (a port in use fails before the probes' seconds)
                from ..export.prometheus import Exporter, parse_listen
                self.exporter = self._stack.enter_context(Exporter(*parse_listen(prometheus)))
            # Attaching takes seconds on a loaded machine (compiling, loading);
            # say so, and that nothing before the announce line is counted.
            say(f"attaching the probes to {source.proto} port {source.port}; "
                "counting starts when they are all on...")
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
            if names["data_ready"] != "none" and st["wakeups"].reason == PIDNS_NOTE:
                self.note = f"wakeups are not counted: {PIDNS_NOTE}."
            eagain = source.own or self.session.counts_eagain
            self.state = LiveState(interval=interval,
                                   counted=(names["data_ready"] != "none",
                                            names["wakeups"] != "none", eagain),
                                   proto=source.proto)
            self.group = GroupInfo(
                port=source.port, proto=source.proto, policy=source.policy(),
                lookup_strategy=names["lookup"], data_ready_strategy=names["data_ready"],
                wakeups_strategy=names["wakeups"], kernel=platform.release(),
                addr=source.addr(), own=source.own, reuseport=source.reuseport(),
                listeners=source.listeners(),
                policy_owner=self._policy_owner())
            if as_json:
                from ..export.ndjson import NdjsonWriter
                self.ndjson = NdjsonWriter(sys.stdout, self.group)
            # The common start: own counters and every probe from here.
            self.frame = step(self.state, self._observe(source.find(), first=True))
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
            console.width = 140             # a pipe has no width: do not cut the columns
        # No refresh thread: run --watch forks restarted workers from this process.
        self.live = self._stack.enter_context(
            Live(self._render(), console=console, auto_refresh=False,
                 transient=self._transient))

    def _render(self):
        from ..ui.dashboard import render
        return render(self.frame, self.group, self.note, tuple(self._events),
                      keys=self.keys_on)

    def announce(self) -> None:
        """One line on stderr: what is watched, how, and where metrics are."""
        g = self.group
        what = g.addr or f"port {g.port}"
        from ..ui.dashboard import size
        msg = (f"watching {g.proto} {what} ({size(self.frame, g)}, policy {g.policy}); probes: lookup "
               f"{g.lookup_strategy}, data-ready {g.data_ready_strategy}, wakeups "
               f"{g.wakeups_strategy}")
        if self.exporter is not None:
            msg += f"; Prometheus metrics on {self.exporter.url}"
        since = time.strftime("%H:%M:%S", time.localtime(self.frame.wall - self.frame.elapsed))
        say(f"{msg}; every total counts from {since}.")
        if self.note:
            say(self.note)
        if not self.frame.listening:
            say(f"nothing listens on {g.proto} port {g.port} yet; waiting (--wait).")

    # --- one interval ---

    @staticmethod
    def _watched(workers: Optional[list[WorkerObs]]) -> set[int]:
        """The processes whose wakeups and calls count: those with a listener."""
        return {w.pid for w in workers or () if not w.child}

    def _observe(self, workers: Optional[list[WorkerObs]], first: bool = False) -> Observation:
        from ..probes.session import socket_cookies
        listening = workers is not None
        workers = workers or []
        self.pids = self._watched(workers)
        self.session.set_pids(self.pids)        # (also new threads, where that matters)
        known = set(self._cookies.values())
        if any(i not in known for w in workers for i in w.inodes):
            # New sockets: asking sock_diag gives each a cookie now, so its
            # data-ready events are told apart from here on.
            self._cookies.update(socket_cookies(self.source.port, self.source.proto))
        t = self.session.rebase() if first else self.session.read()
        wall = time.time()
        if any(c not in self._cookies for c in [*t.data_ready, *(t.live or ())]):
            self._cookies.update(socket_cookies(self.source.port, self.source.proto))

        def inode(cookie: int) -> int:
            return self._cookies.get(cookie, -cookie - 1)   # a socket already gone
        ready: dict[int, int] = {}
        for cookie, n in t.data_ready.items():
            ready[inode(cookie)] = ready.get(inode(cookie), 0) + n
        wakeups: dict[tuple[int, int, int], int] = {}
        for (cookie, pid, tid), n in t.thread_wakeups.items():
            k = (inode(cookie), pid, tid)
            wakeups[k] = wakeups.get(k, 0) + n
        cpu = self._cpu.sample({w.pid for w in workers})
        live: Optional[dict[int, int]] = None
        if t.live is not None:                  # cookie -> live, as inode -> live
            live = {}
            for cookie, n in t.live.items():
                live[inode(cookie)] = live.get(inode(cookie), 0) + n
        rx: Optional[dict[int, dict[tuple, int]]] = None
        if t.rx is not None:                    # (cookie, cpu, napi, queue) -> n, per inode
            rx = {}
            for (cookie, *where), n in t.rx.items():
                mine = rx.setdefault(inode(cookie), {})
                mine[tuple(where)] = mine.get(tuple(where), 0) + n

        def arrivals(w: WorkerObs) -> Optional[dict[tuple, int]]:
            # a member's own socket; a listener shared by processes (or none:
            # a dispatcher's child) is not one process's
            if rx is None or w.child or w.shared:
                return None
            out: dict[tuple, int] = {}
            for i in w.inodes:
                for k, n in rx.get(i, {}).items():
                    out[k] = out.get(k, 0) + n
            return out
        workers = [replace(w, cpu_percent=cpu[w.pid][0], cpu_seconds=cpu[w.pid][1],
                           nthreads=cpu[w.pid][2],
                           live=None if live is None or w.child
                           else sum(live.get(i, 0) for i in w.inodes),
                           rx=arrivals(w))
                   for w in workers]
        return Observation(ts=t.ts, wall=wall, workers=tuple(workers),
                           lookups=t.lookups, data_ready=ready, wakeups=wakeups,
                           accept_eagain=dict(t.accept_eagain), accepted=dict(t.accepted),
                           listening=listening, dispatcher=self.source.dispatcher(),
                           policy=self.source.policy(), policy_note=self.source.policy_note(),
                           rx_unknown=self.session.rx_unknown)

    def _policy_owner(self) -> Optional[dict]:
        """The `reuseport-ctl run` whose pinned policy this is (as of the last find())."""
        owner = getattr(self.source, "policy_owner", None)
        return owner() if owner is not None else None

    def tick(self, wait: bool) -> bool:
        """Observe, step, output. False when the group went away and --wait
        was not given (the caller ends the watch)."""
        workers = self.source.find()
        if workers is None and not wait:
            return False
        obs = self._observe(workers)
        frame = self.frame = step(self.state, obs)
        owner = self._policy_owner()
        if obs.policy is not None and obs.policy != self.group.policy:
            self._events.append(f"policy {self.group.policy} -> {obs.policy}")
            self.group = replace(self.group, policy=obs.policy, policy_owner=owner)
            if self.as_json:
                self.ndjson.group = self.group
        elif owner != self.group.policy_owner:     # (a run's pin replaced by another run's)
            self.group = replace(self.group, policy_owner=owner)
            if self.as_json:
                self.ndjson.group = self.group
        if self.group.addr == "" and self.source.addr():
            self.group = replace(self.group, addr=self.source.addr(),
                                 reuseport=self.source.reuseport(),
                                 listeners=self.source.listeners())
            if self.as_json:
                self.ndjson.group = self.group
        self._events += [f"{r} joined" for r in frame.joined]
        self._events += [f"{r} left" for r in frame.left]
        self._events += [str(m) for m in frame.moved]
        del self._events[:-EVENTS_KEPT]
        if self.as_json:
            self.ndjson.write(frame)
        if self.exporter is not None:
            self.exporter.update(frame, self.group)
        if self.live is not None:
            self.live.update(self._render(), refresh=True)
        return True

    def close(self) -> None:
        self._stack.close()
