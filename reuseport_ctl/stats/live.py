"""Per-interval aggregation for `watch` (pure functions over dataclasses).

The watch observes the group once per interval -- its rows, the probes'
totals, the workers' own counters when the group is ours -- as an
Observation; step() turns it into a Frame: per-row totals since the watch
began, rates over the last interval, shares, the fairness figures, and a
minute of rate history per row. The dashboard, the NDJSON lines and the
Prometheus exporter all render the same Frame.

A row is what the kernel chooses among: in a reuseport group, one member
socket (a threaded server has several in one process: HAProxy nbthread with
shards by-thread, Envoy, one runtime per core), labelled with the process
and the threads that serve it; on a listener shared without SO_REUSEPORT,
one serving process; in a dispatcher (the kernel sees one listener, a
process hands its connections to children), the listener plus one row per
child, whose own cumulative accepts nobody but the server knows (None).

    state = LiveState(interval=1.0)
    step(state, first_observation)      # the baseline: every total starts here
    frame = step(state, next_observation)
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

from .fairness import jain, max_min_ratio
from .health import HealthState, MemberSample, assess

HISTORY_S = 60.0                # the sparkline's span
SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class WorkerObs:
    """One row as seen at one observation: a member socket, a process on a
    shared listener, or a dispatcher's child."""
    pid: int
    slot: int                           # the member's slot (lowest, for a process row)
    inodes: tuple[int, ...]             # the group's sockets it serves (a member: its one)
    queue_len: int = 0                  # TCP: connections in its accept queue(s); UDP: bytes
    cpu_percent: Optional[float] = None # since the previous observation, % of one core
    cpu_seconds: Optional[float] = None # user + system since the process started
    accepts: Optional[int] = None       # own group: the worker's counter (connections or
                                        # datagrams); None: count data-ready instead
    eagain: Optional[int] = None        # own group: the worker's EAGAIN counter
    shared: bool = False                # serves a listener other workers serve too (no
                                        # SO_REUSEPORT): its data-ready events are not its own
    tids: tuple[int, ...] = ()          # threads seen waiting on its socket(s) (threaded only)
    nthreads: int = 1                   # threads in its process
    child: bool = False                 # a dispatcher's child: holds no listener
    conns: Optional[int] = None         # connections it holds now (dispatcher groups)
    drops: Optional[int] = None         # sk_drops of its socket(s), cumulative (None: unknown)
    state: str = ""                     # its process's state letter (/proc: T is stopped)
    outside: Optional[str] = None       # why its process is not the server's, or None
    live: Optional[int] = None          # connections ESTABLISHED now on its socket(s),
                                        # counted in the kernel (None: not counted)
    rx: Optional[Mapping[tuple, int]] = None    # (cpu, napi id, rx queue) -> connections
                                        # that arrived so since the watch began (None in a
                                        # field: not recorded); None: not counted

    @property
    def member(self) -> bool:
        """A member socket's row (not a process on a shared listener, nor a child)."""
        return len(self.inodes) == 1 and not self.shared and not self.child

    @property
    def key(self) -> tuple:
        """The row's identity across observations: a member row is its
        socket (a socket served by a new process -- a worker respawned with
        the socket it inherited -- is the same row: it 'moved'); any other
        row is the process with its sockets."""
        return ("socket", self.inodes[0]) if self.member else (self.pid, self.inodes)


@dataclass(frozen=True)
class RowRef:
    """A row that joined or left, as events name it."""
    slot: int
    pid: int
    inode: Optional[int]                # a member row's socket; None for a process row

    def __str__(self) -> str:
        return f"slot {self.slot} (pid {self.pid})" if self.inode is not None \
            else f"pid {self.pid}"


@dataclass(frozen=True)
class Moved:
    """A member socket now served by another process (its row, slot and
    counts go on: they are the socket's)."""
    slot: int
    inode: int
    pid: int                            # serving it now
    was: int                            # serving it at the previous frame

    def __str__(self) -> str:
        return f"slot {self.slot}: socket inode {self.inode} now served by pid {self.pid} " \
               f"(was {self.was})"


@dataclass(frozen=True)
class Observation:
    """Everything read at one instant. Probe counts are totals since the
    probes were attached (the watch began); own-group counters are totals
    since the worker started (step() subtracts the baseline)."""
    ts: float                           # time.monotonic()
    wall: float                         # time.time(), for the output
    workers: tuple[WorkerObs, ...]
    lookups: Optional[int] = None       # None: no lookup probe
    data_ready: Mapping[int, int] = field(default_factory=dict)     # inode -> events
    wakeups: Mapping[tuple[int, int, int], int] = field(default_factory=dict)
                                        # (listener inode, pid, tid) -> wakeups
    accept_eagain: Mapping[int, int] = field(default_factory=dict)  # pid -> EAGAIN
    accepted: Mapping[int, int] = field(default_factory=dict)       # pid -> accept/recvfrom
                                                                    # that returned >= 0
    listening: bool = True              # False: nothing listens on the port now
    dispatcher: bool = False            # the listener's connections are held by children
    policy: Optional[str] = None        # the policy on the group now (None: unchanged)
    policy_note: Optional[str] = None   # the pinned policy is not in force: why, in a line
    rx_unknown: Optional[Mapping[str, str]] = None  # RX_FIELDS this kernel cannot tell ->
                                        # why; None: arrivals are not counted at all


@dataclass(frozen=True)
class WorkerRow:
    pid: int
    slot: int
    inode: Optional[int]                # a member row's socket (None: a process row)
    tids: tuple[int, ...]               # the threads that serve it (threaded servers only)
    cpu_percent: Optional[float]
    cpu_seconds: Optional[float]
    accepts: Optional[int]              # since the watch began (None: not counted)
    accepts_per_s: Optional[float]      # over the last interval (None: first sight)
    share: Optional[float]              # of the current workers' accepts (None: not counted)
    history: tuple[float, ...]          # accepts/s, oldest first, at most a minute
    data_ready: Optional[int]           # events on the sockets it serves
    data_ready_per_s: Optional[float]
    wakeups: Optional[int]              # its process wakeups caused by a data-ready
    wakeups_per_event: Optional[float]  # wakeups / data_ready
    spurious_wakeups: Optional[int]     # wakeups that found nothing (accept/recv EAGAIN)
    queue_len: int
    child: bool = False                 # a dispatcher's child
    conns: Optional[int] = None         # connections it holds now (dispatcher groups)
    drops: Optional[int] = None         # dropped on its socket(s) since the watch began
    stuck: bool = False                 # work queues for it and it takes none
    stopped: bool = False               # its process is stopped (SIGSTOP, a debugger)
    outside: Optional[str] = None       # not in the server's process tree: why
    live: Optional[int] = None          # connections ESTABLISHED now (kernel-counted)
    rx: Optional[Mapping[tuple, int]] = None    # (cpu, napi id, rx queue) -> arrivals


@dataclass(frozen=True)
class Frame:
    wall: float
    elapsed: float                      # seconds since the watch began
    interval: float                     # seconds since the previous frame
    listening: bool
    rows: tuple[WorkerRow, ...]         # in slot order
    lookups: Optional[int]
    lookups_per_s: Optional[float]
    data_ready: Optional[int]           # every listener of the port, since the watch began
    data_ready_per_s: Optional[float]
    wakeups: Optional[int]
    wakeups_per_event: Optional[float]
    accepts: Optional[int]              # summed over the current workers
    accepts_per_s: Optional[float]
    jain: Optional[float]               # over the current workers' accepts (None: not counted)
    max_min_ratio: Optional[float]      # inf: a worker got none while another got some
    joined: tuple[RowRef, ...]          # rows that appeared since the previous frame
    left: tuple[RowRef, ...]            # rows that went
    moved: tuple[Moved, ...] = ()       # member sockets now served by another process
    dispatcher: bool = False            # one listener, its connections handed to children
    drops: Optional[int] = None         # over every row, since the watch began
    warnings: tuple[str, ...] = ()      # member health, one line each (stats/health.py)
    policy_note: Optional[str] = None   # the pinned policy is not in force: why
    rx_unknown: frozenset = frozenset() # RX_FIELDS this kernel cannot tell at all
    rx_note: Optional[str] = None       # why an arrival field is unknown (null), in a line


@dataclass(frozen=True)
class GroupInfo:
    """What the header says about the watched group (changes rarely)."""
    port: int
    proto: str
    policy: str                         # reuseport-ctl's policy on the group, or "kernel"
    lookup_strategy: str = "none"       # probe strategy names (probes/strategy.py)
    data_ready_strategy: str = "none"
    wakeups_strategy: str = "none"
    kernel: str = ""
    addr: str = ""                      # the group's local endpoint
    own: bool = False                   # a group this process started (run --watch)
    reuseport: bool = True              # False: a listener shared without SO_REUSEPORT
    listeners: int = 1                  # sockets on the port (for the header)
    policy_owner: Optional[dict] = None  # a `run` group's pinned policy: {"verb", "pid", "alive"}

    @property
    def count_of(self) -> str:
        return "connections" if self.proto == "tcp" else "datagrams"


@dataclass
class _Seen:
    """What the state remembers of one row between observations."""
    ref: RowRef
    base_accepts: int = 0
    base_eagain: int = 0
    accepts: Optional[int] = None
    eagain: Optional[int] = None        # spurious wakeups shown at the previous frame
    wakeups: Optional[int] = None       # wakeups shown at the previous frame
    pids: set = field(default_factory=set)  # every process that has served it
    ready_inodes: tuple = ()            # its accepts are its sockets' data-ready (a foreign
                                        # server's member): its last ones are read at leaving
    data_ready: Optional[int] = None
    history: deque = field(default_factory=deque)


@dataclass
class LiveState:
    interval: float = 1.0
    counted: tuple[bool, bool, bool] = (True, True, True)   # data-ready, wakeups, EAGAIN probes on
    proto: str = "tcp"
    t0: Optional[float] = None
    prev: Optional[Observation] = None
    seen: dict[tuple, _Seen] = field(default_factory=dict)     # row key -> its memory
    health: HealthState = field(default_factory=HealthState)
    left_accepts: int = 0               # what the rows that left had taken (group total)

    @property
    def history_len(self) -> int:
        return max(1, math.ceil(HISTORY_S / self.interval))


# --- small pure helpers ----------------------------------------------------------

def rate(now: Optional[int], before: Optional[int], seconds: float) -> Optional[float]:
    """(now - before) / seconds; None if either is unknown or no time passed."""
    if now is None or before is None or seconds <= 0:
        return None
    return (now - before) / seconds


def per_event(count: Optional[int], events: Optional[int]) -> Optional[float]:
    """count / events, None when there was no event (or nothing counted)."""
    if count is None or not events:
        return None
    return count / events


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters scaled to their maximum
    (a blank for zero); left-padded with spaces to `width`."""
    vals = list(values)[-width:] if width > 0 else []
    top = max(vals, default=0)
    out = []
    for v in vals:
        if top <= 0 or v <= 0:
            out.append(" ")
        else:
            out.append(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))])
    return "".join(out).rjust(width)


def shares(counts: Sequence[Optional[int]]) -> list[float]:
    known = [c or 0 for c in counts]
    total = sum(known)
    return [c / total if total else 0.0 for c in known]


def degraded_note(data_ready: str, lookup: str, own: bool) -> Optional[str]:
    """One sentence when the kernel lacks a probe, saying what is still shown."""
    if data_ready != "none":
        return None
    still = ["accept-queue depth", "CPU"]
    if lookup != "none":
        still.insert(0, f"listener lookups ({lookup})")
    if own:
        still.insert(0, "accepts and spurious wakeups from the workers' own counters")
    return (f"this kernel has neither a kprobe on sock_def_readable nor the sock:sk_data_ready "
            f"tracepoint, so data-ready events, wakeups and (for a server reuseport-ctl did "
            f"not start) per-worker accepts are not counted; still shown: "
            f"{', '.join(still)}.")


# --- where connections arrived ---------------------------------------------------

RX_FIELDS = ("cpu", "napi_id", "rx_queue")      # the fields of a WorkerObs.rx key
NO_NAPI_DEVICE = ("arrived through a device without NAPI ids (loopback, veth without GRO): "
                  "SO_INCOMING_NAPI_ID says 0 for them")
NO_QUEUE_DEVICE = "arrived with no rx queue recorded (loopback, veth)"


def rx_by(rx: Optional[Mapping[tuple, int]], name: str,
          unknown: frozenset = frozenset()) -> Optional[dict[int, int]]:
    """One field's counts ({value: connections}) from a row's arrivals; None
    when it is not known: not counted, this kernel cannot tell, or not one
    of the row's connections had it (never a made-up 0)."""
    if rx is None or name in unknown:
        return None
    i = RX_FIELDS.index(name)
    out: dict[int, int] = {}
    for key, n in rx.items():
        if key[i] is not None and n:
            out[key[i]] = out.get(key[i], 0) + n
    if not out and any(rx.values()):
        return None
    return dict(sorted(out.items()))


def rx_note(proto: str, unknown: Optional[Mapping[str, str]],
            rows: Sequence["WorkerRow"]) -> Optional[str]:
    """One line saying why an arrival field is null: the protocol, the
    kernel, or the device the connections came through."""
    if unknown is None:
        return (f"where {'datagrams' if proto == 'udp' else 'connections'} arrived is not "
                f"counted (its probe is off: "
                f"{'data-ready' if proto == 'udp' else 'live connections'})")
    parts = [f"{k}: {why}" for k, why in sorted(unknown.items())]
    for name, device in (("napi_id", NO_NAPI_DEVICE), ("rx_queue", NO_QUEUE_DEVICE)):
        if name in unknown:
            continue
        i = RX_FIELDS.index(name)
        n = sum(c for r in rows if r.rx for k, c in r.rx.items() if k[i] is None)
        if n:
            unit = "connection" if proto == "tcp" else "datagram"
            parts.append(f"{name}: {n:,} {unit}{'' if n == 1 else 's'} {device}")
    return "; ".join(parts) or None


# --- the step ---------------------------------------------------------------------

def _ref(w: WorkerObs) -> RowRef:
    return RowRef(w.slot, w.pid, w.inodes[0] if w.member else None)


def step(state: LiveState, obs: Observation) -> Frame:
    """Fold one observation into the state; the frame the UI and exporters show."""
    first = state.prev is None
    if first:
        state.t0 = obs.ts
    prev = state.prev
    dt = obs.ts - prev.ts if prev is not None else 0.0
    dr_on, wk_on, ea_on = state.counted
    now = {w.key: w for w in obs.workers}
    left = tuple(sorted((state.seen[k].ref for k in state.seen.keys() - now.keys()),
                        key=lambda r: (r.slot, r.pid)))
    for k in state.seen.keys() - now.keys():
        s = state.seen.pop(k)
        # its connections stay in the group's total: those after the last
        # frame too, where the kernel's per-socket count has them
        state.left_accepts += sum(obs.data_ready.get(i, 0) for i in s.ready_inodes) \
            if s.ready_inodes and dr_on else (s.accepts or 0)
    joined: list[RowRef] = []
    moved: list[Moved] = []
    samples: list[MemberSample] = []
    keys: list[tuple] = []              # each row's key, in row order

    rows: list[WorkerRow] = []
    for w in sorted(obs.workers, key=lambda w: (w.child, w.slot, w.pid, w.inodes)):
        keys.append(w.key)
        s = state.seen.get(w.key)
        if s is None:
            # Own counters count from the worker's start: the watch's baseline
            # is what it had when the watch first saw it.
            s = state.seen[w.key] = _Seen(ref=_ref(w), base_accepts=w.accepts or 0,
                                          base_eagain=w.eagain or 0,
                                          history=deque(maxlen=state.history_len))
            new = True
            if not first:
                joined.append(s.ref)
        else:
            new = False
            if s.ref.pid != w.pid:      # a member socket served by another process now
                moved.append(Moved(w.slot, w.inodes[0], w.pid, s.ref.pid))
                # Own counters are the new worker's, from its start (after the
                # watch began): the socket's total goes on from what it was.
                s.base_accepts = -(s.accepts or 0)
                s.base_eagain = -(s.eagain or 0)
            s.ref = _ref(w)
        s.pids.add(w.pid)
        if w.child:                     # no listener: what the kernel counts is not its own
            ready = wakeups = spurious = accepts = None
            woken: set[int] = set()
        else:
            ready = sum(obs.data_ready.get(i, 0) for i in w.inodes) if dr_on else None
            if w.accepts is not None:
                accepts = w.accepts - s.base_accepts
            elif w.shared:              # which sharer took a connection: only accept() knows
                accepts = obs.accepted.get(w.pid, 0) if ea_on else None
            else:
                accepts = ready         # a foreign server: one data-ready per queued connection
                s.ready_inodes = tuple(w.inodes)
            if w.eagain is not None:
                spurious = w.eagain - s.base_eagain
            else:                       # the probes count per process: a moved member's
                                        # total is that of every process that served it
                spurious = sum(obs.accept_eagain.get(p, 0) for p in s.pids) if ea_on else None
            # wakeups its sockets' data-ready made in its process, summed over
            # threads; a moved member's also in the processes that served it
            # before, up to their last one (which no frame may have seen)
            served = s.pids if w.member else {w.pid}
            wakeups = sum(n for (i, p, t), n in obs.wakeups.items()
                          if i in w.inodes and p in served) if wk_on else None
            woken = {t for (i, p, t), n in obs.wakeups.items()
                     if p == w.pid and i in w.inodes and n}
        tids = tuple(sorted(set(w.tids) | woken)) if w.nthreads > 1 else ()
        if not w.child:
            arrivals = None if new or ready is None or s.data_ready is None \
                else ready - s.data_ready
            samples.append(MemberSample(key=w.key, label=str(s.ref), proto=state.proto,
                                        queue_len=w.queue_len, drops=w.drops,
                                        arrivals=arrivals, state=w.state, outside=w.outside))
        acc_rate = None if new else rate(accepts, s.accepts, dt)
        ready_rate = None if new else rate(ready, s.data_ready, dt)
        if not first:
            s.history.append(acc_rate or 0.0)
        s.accepts, s.data_ready, s.eagain, s.wakeups = accepts, ready, spurious, wakeups
        rows.append(WorkerRow(
            pid=w.pid, slot=w.slot, inode=s.ref.inode, tids=tids, cpu_percent=w.cpu_percent,
            cpu_seconds=w.cpu_seconds, accepts=accepts, accepts_per_s=acc_rate, share=0.0,
            history=tuple(s.history), data_ready=ready, data_ready_per_s=ready_rate,
            wakeups=wakeups, wakeups_per_event=per_event(wakeups, ready),
            spurious_wakeups=spurious, queue_len=w.queue_len, child=w.child, conns=w.conns,
            live=w.live, rx=None if w.child else w.rx))

    health = {h.key: h for h in assess(state.health, samples)}
    rows = [_with_health(r, health.get(k)) for r, k in zip(rows, keys)]
    warnings = tuple(h.warning for h in health.values() if h.warning)
    dropped = [h.drops for h in health.values() if h.drops is not None]

    # The kernel's split is over the rows with a listener; a dispatcher's
    # children get theirs from the server, which the kernel does not see.
    takers = [r for r in rows if not r.child]
    counts = [r.accepts or 0 for r in takers]
    sh = dict(zip(map(id, takers), shares(counts)))
    rows = [_with_share(r, sh.get(id(r))) for r in rows]
    total_ready = sum(obs.data_ready.values()) if dr_on else None
    total_wakeups = sum(obs.wakeups.values()) if wk_on else None
    prev_ready = sum(prev.data_ready.values()) if prev is not None and dr_on else None
    known = [r.accepts for r in takers if r.accepts is not None]
    accepts_total = sum(known) + state.left_accepts if known else None
    counted = len(known) == len(takers) and not obs.dispatcher
    rates = [r.accepts_per_s for r in takers if r.accepts_per_s is not None]
    frame = Frame(
        wall=obs.wall, elapsed=obs.ts - state.t0, interval=dt, listening=obs.listening,
        rows=tuple(rows), lookups=obs.lookups,
        lookups_per_s=rate(obs.lookups, prev.lookups if prev else None, dt),
        data_ready=total_ready, data_ready_per_s=rate(total_ready, prev_ready, dt),
        wakeups=total_wakeups, wakeups_per_event=per_event(total_wakeups, total_ready),
        accepts=accepts_total, accepts_per_s=sum(rates) if rates else None,
        # nothing taken yet: no fairness to speak of (an idle or dead server
        # is not "perfectly fair")
        jain=jain(counts) if counted and sum(counts) else None,
        max_min_ratio=max_min_ratio(counts) if counted and sum(counts) else None, joined=tuple(joined),
        left=left, moved=tuple(moved), dispatcher=obs.dispatcher,
        drops=sum(dropped) if dropped else None,
        warnings=warnings, policy_note=obs.policy_note,
        rx_unknown=frozenset(obs.rx_unknown or ()),
        rx_note=rx_note(state.proto, obs.rx_unknown, rows))
    state.prev = obs
    return frame


def _with_health(r: WorkerRow, h) -> WorkerRow:
    if h is None:                       # a dispatcher's child: no socket of the group
        return r
    return replace(r, drops=h.drops, stuck=h.stuck, stopped=h.stopped, outside=h.outside)


def _with_share(r: WorkerRow, share: Optional[float]) -> WorkerRow:
    return replace(r, share=share if r.accepts is not None else None)
