"""bench --long-lived: where long-lived connections end up, per worker.

    cfg = LongConfig(conns=(2, 17), workers=3,
                     setups=setups_for(["reuseport"], ["round-robin", "least-conns"]))
    result = run_long(cfg)
    result.runs         # one Run per case (N over M) x setup x repeat: what --json prints
    result.rows         # per case and setup, over the repeats: what the table shows

A short-connection bench counts how evenly connections are *accepted*; a
server of long-lived connections (gRPC, websockets, a proxy's upstream
pool) lives with what is *held*: a worker holding 12 of 17 connections does
12/17 of the work for as long as they last. Each run is a fresh worker group
(Supervisor, the reuseport model) and one client process (load.held) that
opens N keep-alive connections in bursts, sends a steady trickle of
requests over them, drops them all and reopens them all at once (the
reconnect storm), and trickles again.

Meanwhile the supervisor's loop samples, every SAMPLE_S, the live
connections per worker -- counted in the kernel (probes.conns, the count
`watch` shows; established children per listener) or, with --no-probes,
the sockets each worker holds (sock_diag and fd tables) -- and each
worker's CPU time. The client says which worker answered each connection
(X-Worker), so every phase has two independent counts; the requests per
worker are the client's answers during the holds.

Plain Python over plain data: the CLI renders, plots and prints JSON.
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import psutil

from ..errors import UserError
from ..load.held import ROUND_S, hold
from ..policies import parse_policy
from ..workers.supervisor import RunConfig, Supervisor, client_host
from .bench import Setup, check_schema as _check_schema, config_dict, environment

DEFAULT_CONNS = (2, 17)         # Envoy's cases over 3 workers: N < M, and N just above 5M
DEFAULT_WORKERS = 3
DEFAULT_POLICIES = ("round-robin", "least-conns")
DEFAULT_WORK_US = 1000          # per request: makes CPU follow the connections held
MAX_CONNS = 5000                # the client and the workers hold 2N descriptors
SAMPLE_S = 0.1
EDGE_S = 0.05                   # a sample this close to a phase change may straddle it


@dataclass(frozen=True)
class LongConfig:
    setups: tuple[Setup, ...]
    conns: tuple[int, ...] = DEFAULT_CONNS
    workers: int = DEFAULT_WORKERS
    repeat: int = 3
    hold_s: float = 2.0             # each trickle, before and after the storm
    burst: int = 4                  # connections opened at once
    work_us: int = DEFAULT_WORK_US
    host: str = "127.0.0.1"
    port: int = 8080
    cpus: Optional[tuple[int, ...]] = None
    probes: bool = True
    timeout: float = 5.0

    def validate(self) -> None:
        if not self.conns:
            raise UserError("--long-lived needs at least one connection count.")
        bad = [n for n in self.conns if not 1 <= n <= MAX_CONNS]
        if bad:
            raise UserError(f"--long-lived takes connection counts from 1 to {MAX_CONNS}, "
                            f"not {bad[0]}.")
        if not 1 <= self.workers <= 256:
            raise UserError(f"--workers must be between 1 and 256, not {self.workers}.")
        if self.repeat < 1:
            raise UserError(f"--repeat must be at least 1, not {self.repeat}.")
        if not 0.5 <= self.hold_s <= 3600:
            raise UserError(f"--hold must be between 0.5 and 3600 seconds, not {self.hold_s:g}.")
        if self.burst < 1:
            raise UserError(f"--burst must be at least 1, not {self.burst}.")
        if not 0 <= self.work_us <= 1_000_000:
            raise UserError(f"--work-us must be between 0 and 1000000, not {self.work_us}.")
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must be between 1 and 65535, not {self.port}.")
        bad_models = [s.model for s in self.setups if s.model != "reuseport"]
        if not self.setups or bad_models:
            raise UserError("--long-lived compares policies of a reuseport group: "
                            "give --models reuseport (or leave it out).")

    @property
    def total_runs(self) -> int:
        return len(self.conns) * len(self.setups) * self.repeat


@dataclass
class Run:
    """One case (N connections over M workers), one setup, one repeat."""
    case: str                       # "17 over 3"
    conns: int
    workers: int
    policy: str
    label: str
    repeat: int
    ideal: list[int]                # the even split, busiest first
    live_opened: list[int]          # per worker slot, after the bursts (source)
    live_stormed: list[int]         # ... after the reconnect storm
    client_opened: list[int]        # per slot, as the answers on the held connections say
    client_stormed: list[int]
    off_opened: int                 # connections that would have to move to be ideal
    off_stormed: int
    requests_opened: list[int]      # answers per slot in the hold after the bursts (client)
    requests_stormed: list[int]     # ... in the hold after the storm
    cpu_opened: list[float]         # % of one core per slot in the hold after the bursts
    cpu_stormed: list[float]        # ... after the storm
    errors: int                     # connections that failed (client side)
    source: str                     # "kernel" (probes.conns) or "fd tables" (sock_diag)
    timeline: list = field(default_factory=list)    # [[t s, [live per slot]], ...]
    phases: dict = field(default_factory=dict)      # opened, storm, reopened, end: t s


@dataclass
class Row:
    """One case and setup over its repeats."""
    case: str
    label: str
    ideal: list[int]
    opened: list[list[int]]         # per repeat, per slot
    stormed: list[list[int]]
    ideal_opened: int               # repeats that ended exactly at the ideal split
    ideal_stormed: int
    repeats: int
    cpu_opened: tuple               # medians: % of one core of the busiest and the idlest
    cpu_stormed: tuple              # worker, in the hold after the bursts / the storm
    errors: int
    requests_opened: tuple = ()     # medians: answers of the busiest and the idlest worker
    requests_stormed: tuple = ()    # in the hold after the bursts / the storm (client count)
    worst: int = 0                  # the repeat farthest from the even split (the plot's)


@dataclass
class LongResult:
    config: dict
    runs: list[Run]
    env: dict
    source: str                     # how live connections were counted, or why not by probe
    interrupted: int = 0
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self.runs]


# --- the numbers (pure) -------------------------------------------------------------

def ideal(n: int, m: int) -> list[int]:
    """n connections over m workers as evenly as they go, busiest first."""
    return [n // m + (k < n % m) for k in range(m)]


def off_ideal(counts: list[int], n: Optional[int] = None) -> int:
    """Connections that would have to move for counts to be the ideal split
    of n (default: of their sum)."""
    want = ideal(sum(counts) if n is None else n, len(counts))
    return sum(max(0, a - b) for a, b in zip(sorted(counts, reverse=True), want))


def within_one(counts: list[int], n: Optional[int] = None) -> bool:
    """Every worker, busiest first, within one connection of the ideal split."""
    want = ideal(sum(counts) if n is None else n, len(counts))
    return all(abs(a - b) <= 1 for a, b in zip(sorted(counts, reverse=True), want))


def at(timeline: list, t0: float, t1: float) -> Optional[list]:
    """The last sample [t, values...] with t0 <= t <= t1, None without one."""
    inside = [s for s in timeline if t0 <= s[0] <= t1]
    return inside[-1] if inside else None


def summarize(runs: list[Run]) -> list[Row]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.conns, r.label), []).append(r)
    rows = []
    for (_, label), rs in groups.items():
        rows.append(Row(
            case=rs[0].case, label=label, ideal=rs[0].ideal,
            opened=[r.live_opened for r in rs], stormed=[r.live_stormed for r in rs],
            ideal_opened=sum(r.off_opened == 0 for r in rs),
            ideal_stormed=sum(r.off_stormed == 0 for r in rs), repeats=len(rs),
            cpu_opened=(statistics.median(max(r.cpu_opened) for r in rs),
                        statistics.median(min(r.cpu_opened) for r in rs)),
            cpu_stormed=(statistics.median(max(r.cpu_stormed) for r in rs),
                         statistics.median(min(r.cpu_stormed) for r in rs)),
            errors=sum(r.errors for r in rs),
            requests_opened=(statistics.median(max(r.requests_opened, default=0) for r in rs),
                             statistics.median(min(r.requests_opened, default=0) for r in rs)),
            requests_stormed=(statistics.median(max(r.requests_stormed, default=0) for r in rs),
                              statistics.median(min(r.requests_stormed, default=0) for r in rs)),
            worst=max(rs, key=lambda r: (r.off_opened + r.off_stormed, -r.repeat)).repeat))
    return rows


# --- the JSON schema of --long-lived --json (a list of runs) --------------------------

_INTS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_NUM = {"type": "number"}
RUN_SCHEMA = {
    "type": "object",
    "required": ["case", "conns", "workers", "policy", "label", "repeat", "ideal",
                 "live_opened", "live_stormed", "client_opened", "client_stormed",
                 "off_opened", "off_stormed", "requests_opened", "requests_stormed",
                 "cpu_opened", "cpu_stormed", "errors", "source",
                 "timeline", "phases"],
    "properties": {
        "case": {"type": "string"},
        "conns": {"type": "integer", "minimum": 1},
        "workers": {"type": "integer", "minimum": 1},
        "policy": {"type": "string"},
        "label": {"type": "string"},
        "repeat": {"type": "integer", "minimum": 0},
        "ideal": _INTS, "live_opened": _INTS, "live_stormed": _INTS,
        "client_opened": _INTS, "client_stormed": _INTS,
        "off_opened": {"type": "integer", "minimum": 0},
        "off_stormed": {"type": "integer", "minimum": 0},
        "requests_opened": _INTS, "requests_stormed": _INTS,
        "cpu_opened": {"type": "array", "items": _NUM},
        "cpu_stormed": {"type": "array", "items": _NUM},
        "errors": {"type": "integer", "minimum": 0},
        "source": {"type": "string", "enum": ["kernel", "fd tables"]},
        "timeline": {"type": "array", "items": {"type": "array"}},
        "phases": {"type": "object", "required": ["opened", "storm", "reopened", "end"],
                   "properties": {k: _NUM for k in ("opened", "storm", "reopened", "end")}},
    },
}
SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema",
          "title": "reuseport-ctl bench --long-lived --json", "type": "array",
          "items": RUN_SCHEMA}


def check_schema(doc) -> list[str]:
    """The problems found in doc against SCHEMA, [] when it conforms."""
    return _check_schema(doc, SCHEMA)


# --- running ------------------------------------------------------------------------

def run_long(cfg: LongConfig, on_run: Optional[Callable[[int, int, Run], None]] = None,
             on_start: Optional[Callable[[int, str], None]] = None) -> LongResult:
    """Every run, interleaved (each setup once per case, then the next
    repeat). Ctrl-C or SIGTERM stops it after cleaning up; the runs done
    come back with interrupted set to the signal."""
    cfg.validate()
    for s in cfg.setups:                                   # refuse before starting anything
        RunConfig(workers=cfg.workers, model="reuseport",
                  policy=parse_policy(s.policy or "kernel")).validate()
    probe, source = _probe(cfg)
    result = LongResult(config=config_dict(cfg, round_s=ROUND_S), runs=[], env=environment(),
                        source=source)
    done = 0
    try:
        for rep in range(cfg.repeat):
            for n in cfg.conns:
                for setup in cfg.setups:
                    if on_start:
                        on_start(done, f"{n} over {cfg.workers} {setup.label} #{rep + 1}")
                    r = _run(cfg, setup, n, rep, probe)
                    if isinstance(r, int):
                        result.interrupted = r
                        return result
                    result.runs.append(r)
                    done += 1
                    if on_run:
                        on_run(done, cfg.total_runs, r)
    finally:
        result.rows = summarize(result.runs)
        if probe is not None:
            probe.close()
    return result





def _probe(cfg: LongConfig):
    """The kernel's live-connection count (one probe for every run: the port
    stays the same), or why the fd tables count instead."""
    if not cfg.probes:
        return None, "fd tables (--no-probes): the sockets each worker holds, from sock_diag"
    try:
        from ..probes.conns import ConnsProbe
        from ..probes.session import OWN_NETNS
        return ConnsProbe(cfg.port, OWN_NETNS), (
            "kernel: children ESTABLISHED per listener (raw tracepoints "
            "inet_sock_set_state + sk_data_ready, bpf/conns.h), as watch counts them")
    except Exception as e:          # bcc raises plain Exception
        return None, f"fd tables: the live-connection probe did not attach ({e})"


class _Sampler:
    """Live connections and CPU time per worker slot, every SAMPLE_S, from
    the supervisor's loop (run_in_child's on_tick)."""

    def __init__(self, live: Callable[[], list[int]], pids: list[int]):
        self.live, self.pids = live, pids
        self.samples: list[list] = []       # [t, live per slot, cpu s per slot]
        self.next = 0.0

    def tick(self, now: float) -> None:
        if now < self.next:
            return
        self.next = now + SAMPLE_S
        self.samples.append([now, self.live(), _cpu_seconds(self.pids)])

    def due(self, now: float) -> float:
        return self.next


def _run(cfg: LongConfig, setup: Setup, n: int, rep: int, probe) -> Run | int:
    from ..kernel.conns import held_by
    from ..probes.session import socket_cookies
    run_cfg = RunConfig(workers=cfg.workers, host=cfg.host, port=cfg.port, proto="tcp",
                        model="reuseport", policy=parse_policy(setup.policy or "kernel"),
                        cpus=cfg.cpus, work_us=cfg.work_us)
    with Supervisor(run_cfg) as sup:
        sup.start()
        if not sup.wait_ready():
            sup.stop()
            return sup.stop_signal or signal.SIGINT
        pids = [sup.pids()[i] for i in range(cfg.workers)]
        if probe is not None:
            inode_slot = {os.fstat(s.fileno()).st_ino: i for i, s in enumerate(sup.socks)}
            # asking sock_diag gives each listener its cookie before any connection
            slot_of = {c: inode_slot[ino] for c, ino in socket_cookies(sup.port, "tcp").items()
                       if ino in inode_slot}

            def live() -> list[int]:
                out = [0] * cfg.workers
                for cookie, k in probe.read().items():
                    if cookie in slot_of:
                        out[slot_of[cookie]] += k
                return out
        else:
            def live() -> list[int]:
                held = held_by(sup.port, pids)
                return [held.get(p, 0) for p in pids]
        sampler = _Sampler(live, pids)
        host = client_host(cfg.host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        addr = (host, sup.port)
        out = sup.run_in_child(lambda: hold(addr, n, cfg.burst, cfg.hold_s, cfg.timeout, family),
                               on_tick=sampler.tick, next_due=sampler.due)
        if out is None or sup.stopping:
            sup.stop()
            return sup.stop_signal or signal.SIGINT
        sup.stop()
    return _result(cfg, setup, n, rep, out, sampler.samples,
                   "kernel" if probe is not None else "fd tables")


def _result(cfg: LongConfig, setup: Setup, n: int, rep: int, out, samples: list,
            source: str) -> Run:
    m, t = cfg.workers, out.times
    t0 = t["start"]
    opened = at(samples, t["opened"], t["storm"] - EDGE_S) or _never(samples, t["storm"])
    stormed = at(samples, t["reopened"], t["end"] - EDGE_S) or _never(samples, t["end"])
    per_slot = lambda d: [d.get(k, 0) for k in range(m)]    # noqa: E731
    return Run(
        case=f"{n} over {m}", conns=n, workers=m, policy=setup.policy or "kernel",
        label=setup.label, repeat=rep, ideal=ideal(n, m),
        live_opened=opened[1], live_stormed=stormed[1],
        client_opened=per_slot(out.opened), client_stormed=per_slot(out.stormed),
        off_opened=off_ideal(opened[1], n), off_stormed=off_ideal(stormed[1], n),
        requests_opened=per_slot(out.requests[0]), requests_stormed=per_slot(out.requests[1]),
        cpu_opened=_cpu_pct(samples, t["opened"], t["storm"], m),
        cpu_stormed=_cpu_pct(samples, t["reopened"], t["end"], m),
        errors=sum(out.errors.values()), source=source,
        timeline=[[round(s[0] - t0, 3), s[1]] for s in samples if s[0] <= t["end"]],
        phases={k: round(t[k] - t0, 3) for k in ("opened", "storm", "reopened", "end")})


def _cpu_pct(samples: list, t0: float, t1: float, m: int) -> list[float]:
    """% of one core per slot between the first and the last sample in [t0, t1]."""
    inside = [s for s in samples if t0 <= s[0] <= t1]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return [0.0] * m
    (a, _, x), (b, _, y) = inside[0], inside[-1]
    return [round(100 * (v - u) / (b - a), 1) for u, v in zip(x, y)]


def _never(samples: list, before: float) -> list:
    """No sample inside the phase (a starved machine): the last one before it ended."""
    earlier = [s for s in samples if s[0] <= before]
    return earlier[-1] if earlier else samples[0]


def _cpu_seconds(pids: list[int]) -> list[float]:
    out = []
    for p in pids:
        try:
            c = psutil.Process(p).cpu_times()
            out.append(c.user + c.system)
        except psutil.Error:
            out.append(0.0)
    return out


__all__ = ["LongConfig", "LongResult", "Run", "Row", "SCHEMA", "check_schema", "ideal",
           "off_ideal", "within_one", "run_long", "summarize", "DEFAULT_CONNS",
           "DEFAULT_WORKERS", "DEFAULT_POLICIES", "DEFAULT_WORK_US"]
