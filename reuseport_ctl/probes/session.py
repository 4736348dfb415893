"""A probe session: the lookup, data-ready and wakeup probes of one watched
port, attached together, read together (once per interval), closed together.

    with ProbeSession(port, "tcp", pids=sup.pids().values()) as ps:
        ...
        t = ps.read()        # totals since every probe was attached
        ps.strategies        # what is attached, and why

The probes attach one after the other (compiling one takes seconds on a
busy machine), so their raw counts start at different moments. The session
reads every map once as soon as the last probe is attached and subtracts
that baseline from every later read: every total starts at the same instant
(rebase() moves that instant, e.g. to a caller's first observation).

Everything is counted in the kernel, in BPF maps; read() does one pass over
each map. Closing detaches every probe and frees every program and map; two
sessions side by side (two `watch`es) each have their own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from ..closing import Closing
from ..errors import UserError
from ..kernel import diag, features, process
from .lookup import LookupProbe
from .programs import PROTO_NUMBERS, netns_inum
from .strategy import CHAINS, Strategy, choose
from .conns import ConnsProbe
from .wakeup import WakeupProbe

OWN_NETNS = "/proc/thread-self/ns/net"
UDP_RX_UNKNOWN = {
    "napi_id": "UDP: an unconnected socket records the NAPI id of its first datagram only",
    "rx_queue": "UDP: no datagram's rx queue is kept in the socket"}
PIDNS_NOTE = ("this tool runs in a pid namespace of its own (a container's): the kernel "
              "names woken tasks by the host's pids, which cannot be matched to the pids "
              "seen here; run it in the host's pid namespace (docker --pid=host) to count "
              "wakeups")


@dataclass
class ProbeTotals:
    """Totals since the session started; each read() returns new totals
    (rates are the difference of two reads over the difference of ts)."""
    ts: float                           # time.monotonic() of the read
    lookups: int | None                 # listener lookups for the port (None: no lookup strategy)
                                        # (also what the "selector" strategy counts)
    lookups_by_class: dict[str, int]    # {"tcp4": n, "tcp6": m} or udp4/udp6 ({} for selector)
    lookup_latency_log2_ns: dict[int, int] | None   # log2(ns) -> lookups; kprobe strategy only
    data_ready: dict[int, int]          # listener socket cookie -> data-ready events
    wakeups: dict[int, int]             # pid -> process wakeups caused by a listener data-ready
                                        # (summed over its threads and listeners)
    accept_eagain: dict[int, int]       # pid -> accept/accept4 (UDP: recvfrom) said EAGAIN
    accepted: dict[int, int]            # pid -> accept/accept4 (UDP: recvfrom) returned >= 0
                                        # (both only with eagain=True)
    thread_wakeups: dict[tuple[int, int, int], int] = field(default_factory=dict)
                                        # (listener cookie, pid, tid) -> wakeups
    live: Optional[dict[int, int]] = None   # listener cookie -> connections ESTABLISHED
                                        # now (a level, not a total); None: not counted
    rx: Optional[dict[tuple, int]] = None   # (listener cookie, cpu, napi id, rx queue) ->
                                        # connections that arrived so (None in a field:
                                        # not recorded); None: not counted

    def minus(self, base: "ProbeTotals") -> "ProbeTotals":
        """These totals less an earlier read's (counts since that read)."""
        def sub(now: dict, before: dict) -> dict:       # only what moved since
            out = {k: v - before.get(k, 0) for k, v in now.items()}
            return {k: v for k, v in out.items() if v}
        lat = None
        if self.lookup_latency_log2_ns is not None:
            lat = sub(self.lookup_latency_log2_ns, base.lookup_latency_log2_ns or {})
        lookups = None
        if self.lookups is not None:
            lookups = self.lookups - (base.lookups or 0)
        by_class = {k: v - base.lookups_by_class.get(k, 0)          # fixed keys: all kept
                    for k, v in self.lookups_by_class.items()}
        return ProbeTotals(self.ts, lookups, by_class,
                           lat, sub(self.data_ready, base.data_ready),
                           sub(self.wakeups, base.wakeups),
                           sub(self.accept_eagain, base.accept_eagain),
                           sub(self.accepted, base.accepted),
                           sub(self.thread_wakeups, base.thread_wakeups), self.live,
                           None if self.rx is None else sub(self.rx, base.rx or {}))


def default_strategies() -> dict[str, Strategy]:
    """choose() over the facilities the probe chains need (not all of doctor's)."""
    needed = {n for steps in CHAINS.values() for step in steps for n in step.needs}
    return choose(features.probe(n, fn) for n, fn in features.PROBES if n in needed)


def socket_cookies(port: int, proto: str) -> dict[int, int]:
    """cookie -> inode of the sockets listening (TCP) / bound (UDP) on port, in
    the calling thread's network namespace. Asking sock_diag also makes the
    kernel assign a cookie to a socket that had none, so the data-ready
    program (which reads sk_cookie) sees it from then on."""
    return {s.cookie: s.inode for s in diag.listeners(port, proto)}


class ProbeSession(Closing):
    def __init__(self, port: int, proto: str = "tcp", pids: Iterable[int] = (),
                 strategies: dict | None = None, *, netns: str = OWN_NETNS,
                 selections: Optional[Callable[[], Optional[list[int]]]] = None,
                 eagain: bool = False):
        """Attach the probes for `port`. strategies: choose()'s answer (doctor
        already has one); None probes the kernel for it. netns: the watched
        server's network namespace (e.g. /proc/<pid>/ns/net). selections: the
        group's selector counters, used for lookups by the "selector" strategy.
        eagain: also count accept/recvfrom EAGAINs from the syscalls
        tracepoints (every syscall on the machine pays for it while attached)."""
        if proto not in PROTO_NUMBERS:
            raise UserError(f"protocol must be tcp or udp, not {proto!r}.")
        if not 1 <= port <= 65535:
            raise UserError(f"port must be between 1 and 65535, not {port}.")
        self.port, self.proto, self.netns = port, proto, netns
        self._selections = selections
        self._eagain = eagain
        self._uncookied = 0
        self._own_netns = netns_inum(netns) == netns_inum(OWN_NETNS)
        # where connections arrived: what this kernel cannot tell, and why
        # ({"napi_id" | "rx_queue": why}); None: arrivals are not counted
        self.rx_unknown: Optional[dict[str, str]] = None
        chosen = dict(strategies) if strategies is not None else default_strategies()
        self._lookup = LookupProbe(port, proto, netns)
        self._conns: Optional[ConnsProbe] = None
        self._wakeup = WakeupProbe(port, proto, netns)
        self._wakeup.set_pids(pids)
        self.strategies: dict[str, Strategy] = {}
        try:
            if self._own_netns:
                socket_cookies(port, proto)     # give every listener a cookie now
            self.strategies["lookup"] = self._chain("lookup", chosen.get("lookup"),
                                                    self._lookup.attach)
            wk = chosen.get("wakeups")
            if wk is not None and wk.name != "none" and not process.in_initial_pid_ns():
                wk, eagain = Strategy("none", PIDNS_NOTE), False
            wk_name = wk.name if wk is not None else "none"
            self.strategies["data_ready"] = self._chain(
                "data_ready", chosen.get("data_ready"),
                lambda name: self._wakeup.attach(name, wk_name, eagain))
            self.strategies["wakeups"] = self._wakeups_strategy(wk)
            self.strategies["live"] = self._attach_conns(chosen)
            if proto == "udp" and self._wakeup.data_ready != "none":
                # where datagrams arrived: the CPU their data-ready ran on
                self.rx_unknown = dict(UDP_RX_UNKNOWN)
            self._base: ProbeTotals | None = None
            self.rebase()               # every probe is attached: the common start
        except BaseException:
            self.close()
            raise

    # --- strategies -------------------------------------------------------------

    @staticmethod
    def _chain(probe: str, chosen: Strategy | None, attach: Callable[[str], None]) -> Strategy:
        """Attach the chosen strategy; if the kernel refuses it after all, the
        next ones in its chain, saying why."""
        if chosen is None or chosen.name == "none":
            return chosen or Strategy("none", "not requested")
        steps = CHAINS[probe]
        names = [s.name for s in steps]
        start = names.index(chosen.name) if chosen.name in names else 0
        failed: list[str] = []
        for i, step in enumerate(steps[start:]):
            try:
                attach(step.name)
            except Exception as e:              # bcc raises plain Exception
                failed.append(f"{step.name} failed to attach ({e})")
                continue
            reason = chosen.reason if i == 0 else "; ".join(failed + [step.gives])
            return Strategy(step.name, reason, step.target)
        return Strategy("none", "; ".join(failed) + "; this probe is off")

    def _wakeups_strategy(self, chosen: Strategy | None) -> Strategy:
        wp = self._wakeup
        if chosen is None or chosen.name == "none":
            return chosen or Strategy("none", "not requested")
        if wp.data_ready == "none":
            return Strategy("none", "wakeups are counted per data-ready event, and the "
                                    "data-ready probe is off")
        if wp.wakeups == "none":
            return Strategy("none", f"{wp.wakeups_error}; this probe is off")
        if wp.eagain_tps:
            eagain = f"; EAGAIN from {', '.join(wp.eagain_tps)}"
            if wp.accepts_scope:
                eagain += f", accepts counted: {wp.accepts_scope}"
        elif self._eagain:
            eagain = "; no syscalls tracepoints: no EAGAIN counts"
        else:
            eagain = "; EAGAIN not counted (opt-in: the syscalls tracepoints slow every syscall)"

        step = next(s for s in CHAINS["wakeups"] if s.name == wp.wakeups)
        # the chosen one, or a later one in the chain when it failed to attach
        reason = chosen.reason if wp.wakeups == chosen.name else \
            f"{wp.wakeups_error}; {step.gives}"
        return Strategy(wp.wakeups, f"{reason}; {wp.scope}{eagain}", step.target)

    def _attach_conns(self, chosen: dict) -> Strategy:
        """Live connections per listener (TCP): raw tracepoints
        inet_sock_set_state and sk_data_ready (bpf/conns.h)."""
        if self.proto != "tcp":
            return Strategy("none", "UDP has no connections")
        if chosen.get("live") is not None and chosen["live"].name == "none":
            return chosen["live"]
        try:
            self._conns = ConnsProbe(self.port, self.netns, rx=True)
        except Exception as e:                  # bcc raises plain Exception
            return Strategy("none", f"the live-connection probe did not attach ({e})")
        self.rx_unknown = dict(self._conns.rx_unknown)
        return Strategy("raw_tracepoint", "children ESTABLISHED now, and where each arrived (CPU, "
                        "NAPI id, rx queue), per listener, since the probe attached",
                        "raw tracepoints inet_sock_set_state + sk_data_ready")

    @property
    def counts_eagain(self) -> bool:
        """Whether accept/recvfrom EAGAINs are counted (read().accept_eagain)."""
        return bool(self._wakeup.eagain_tps)

    # --- use --------------------------------------------------------------------

    def set_pids(self, pids: Iterable[int]) -> None:
        """Replace the watched processes (workers joined or left); every
        thread of each is watched. With the tracefs wakeup strategy, call it
        again to pick up threads started since (the watch does, each interval)."""
        self._wakeup.set_pids(pids)

    def rebase(self) -> ProbeTotals:
        """Totals count from now on; returns the (all-zero) totals of now."""
        self._base = None
        self._base = self._read_raw()
        return self._base.minus(self._base)

    def read(self) -> ProbeTotals:
        """Totals since the baseline (every probe attached, or rebase())."""
        raw = self._read_raw()
        return raw.minus(self._base) if self._base is not None else raw

    def _read_raw(self) -> ProbeTotals:
        lookups, by_class, latency = self._lookup.read()
        if self.strategies.get("lookup", Strategy("none", "")).name == "selector":
            sel = self._selections() if self._selections else None
            lookups = sum(sel) if sel is not None else None
        ready, thread_wakeups, eagain, accepted = self._wakeup.read()
        if ready.get(0, 0) > self._uncookied and self._own_netns:
            # a listener that had no cookie yet (one created after we started):
            # asking sock_diag gives it one, counted under it from now on
            self._uncookied = ready[0]
            socket_cookies(self.port, self.proto)
        wakeups: dict[int, int] = {}
        for (_, pid, _), n in thread_wakeups.items():
            wakeups[pid] = wakeups.get(pid, 0) + n
        live = rx = None
        if self._conns is not None:
            live, rx = self._conns.read(), self._conns.read_rx()
        elif self.proto == "udp" and self.rx_unknown is not None:
            rx = {(cookie, cpu, None, None): n
                  for (cookie, cpu), n in self._wakeup.read_rx_cpus().items()}
        return ProbeTotals(time.monotonic(), lookups, by_class, latency, ready, wakeups, eagain,
                           accepted, thread_wakeups, live, rx)

    def close(self) -> None:
        """Detach everything; idempotent."""
        self._lookup.close()
        self._wakeup.close()
        if self._conns is not None:
            self._conns.close()
            self._conns = None


__all__ = ["ProbeTotals", "ProbeSession", "socket_cookies", "default_strategies"]
