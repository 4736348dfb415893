"""bench: the same load against each server model in turn, over a sweep of
load levels (client concurrency) and per-request work, repeated.

    cfg = BenchConfig(setups=setups_for(["reuseport", "shared-epoll"], ["round-robin"]),
                      workers=4, conns=2000, concurrency=(1, 4, 16, 64), work_us=(0, 100))
    result = run_bench(cfg, on_point=print)
    result.points      # one Point per setup x load point x repeat
    summarize(result)  # medians and spreads per setup and load point

Each point is a fresh worker group (Supervisor) on the same port, loaded by
the same client (load.client.run_load), while one probe session
(probes.ProbeSession, made once for the port) counts the listener's
data-ready events and the process wakeups they cause. The order is
interleaved (every setup once per load point, then the next repeat), so
drift on a shared machine hits every model alike rather than one.

Saturation is measured without threads or sampler processes: the workers'
and the acceptor's CPU time is read before and after the load (psutil), the
client's from its reaped processes (os.times() children, in the load
helper), each divided by the load's elapsed time; a process at >= 90 % of
one core is named, and so is the machine when all its CPUs were >= 90 %
busy (other tenants included).

Plain Python over plain data: the CLI renders, plots and prints JSON.
"""
from __future__ import annotations

import math
import os
import platform
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import psutil

from ..errors import UserError
from ..policies import NAMES as POLICY_NAMES
from ..policies import parse_policy
from ..stats.fairness import summarize as fairness
from ..workers.stall import Stall, Staller
from ..workers.supervisor import MODELS, RunConfig, Supervisor, client_host

DEFAULT_MODELS = MODELS
DEFAULT_POLICIES = ("hash", "threshold", "consistent", "round-robin", "least-loaded")
# bench --stall: the policies the issue asks about (the kernel's hash is always run)
STALL_POLICIES = tuple(p for p in ("round-robin", "least-loaded", "least-conns")
                       if p in POLICY_NAMES)
DEFAULT_CONCURRENCY = (1, 4, 16, 64)
DEFAULT_WORK_US = (0, 100)
SATURATED = 90.0            # % of one core
IMBALANCED = 1.5            # max:min at or above this is called an imbalance
SETTLE_S = 2.0              # wait this long for the server counters to catch up
STALL_PERIODS = 4           # bench --stall: each load lasts this many stall periods
STALL_SHORT = 0.5           # a stalled load stopped for less than this share of what its
                            # schedule promised for its duration is flagged (stall_short)


@dataclass(frozen=True)
class Setup:
    """One server under test: a model, and for reuseport a selection policy."""
    model: str
    policy: Optional[str] = None     # "kernel", an eBPF/cBPF policy; None: single-socket model

    @property
    def label(self) -> str:
        if self.model != "reuseport":
            return self.model
        return "reuseport" if self.policy in (None, "kernel") else f"reuseport/{self.policy}"


@dataclass(frozen=True)
class BenchConfig:
    setups: tuple[Setup, ...]
    workers: int = 4
    conns: int = 2000                       # per point
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    work_us: tuple[int, ...] = DEFAULT_WORK_US
    repeat: int = 3
    requests_per_conn: int = 1              # 1: short connections; >1: keep-alive
    host: str = "127.0.0.1"
    port: int = 8080
    cpus: Optional[tuple[int, ...]] = None  # pin worker i to cpus[i % len]; None: scheduler
    probes: bool = True
    timeout: float = 5.0
    stall: Optional[Stall] = None           # every setup also runs with this worker stalled
    stall_periods: int = STALL_PERIODS      # with stall: every load lasts this many periods

    def validate(self) -> None:
        if not self.setups:
            raise UserError("nothing to bench: give at least one model.")
        for name, v in (("--workers", self.workers), ("--conns", self.conns),
                        ("--repeat", self.repeat),
                        ("--requests-per-conn", self.requests_per_conn)):
            if v < 1:
                raise UserError(f"{name} must be at least 1, not {v}.")
        if self.workers > 256:
            raise UserError(f"--workers {self.workers}: bench runs at most 256 workers.")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise UserError("--concurrency takes a list of integers, each at least 1.")
        if not self.work_us or any(not 0 <= w <= 1_000_000 for w in self.work_us):
            raise UserError("--work-us takes a list of integers between 0 and 1000000.")
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must be between 1 and 65535, not {self.port}.")
        if self.stall is not None and not 1 <= self.stall_periods <= 1000:
            raise UserError(f"--stall-periods must be between 1 and 1000, "
                            f"not {self.stall_periods}.")
        if self.stall is not None and self.stall.slot >= self.workers:
            raise UserError(f"--stall {self.stall}: there is no worker {self.stall.slot}; "
                            f"the group has slots 0..{self.workers - 1}.")

    @property
    def stalls(self) -> tuple[Optional[Stall], ...]:
        """Each setup runs without a stall, and with cfg.stall when given."""
        return (None,) if self.stall is None else (None, self.stall)

    @property
    def load_s(self) -> Optional[float]:
        """With a stall, every load (without and with it) lasts stall_periods
        full stall periods, by the clock; without, conns decides (None)."""
        if self.stall is None:
            return None
        return self.stall_periods * self.stall.every_ms / 1000.0

    @property
    def total_points(self) -> int:
        return (len(self.setups) * len(self.concurrency) * len(self.work_us) * self.repeat
                * len(self.stalls))


@dataclass
class Point:
    """One setup at one load point, one repeat: what --json prints."""
    model: str
    policy: Optional[str]
    label: str
    concurrency: int
    work_us: int
    repeat: int
    workers: int
    requests_per_conn: int
    conns: int                      # completed connections (client side)
    errors: int                     # connections that failed (client side)
    conns_per_s: float
    p50_ms: float                   # request latency at the client (nearest rank)
    p99_ms: float
    p999_ms: float
    max_ms: float
    counts: list[int]               # connections accepted, per worker slot
    max_min_ratio: Optional[float]  # None: a worker got none
    jain: float
    wakeups_per_conn: Optional[float]   # None: no wakeup probe
    wakeups: Optional[int]          # process wakeups caused by a listener data-ready
    data_ready: Optional[int]       # listener data-ready events
    spurious_wakeups: int           # wakeups whose accept() said EAGAIN (worker counters)
    wakeup_source: str              # "probe" (sched_waking in sock_def_readable) or "none"
    cpu: dict                       # % of one core: client (per process), workers, acceptor, machine
    saturated: list[str]            # who was at >= 90 % of a core ("machine": every CPU)
    latency_cdf: list = field(default_factory=list)   # [[percentile, ms], ...] (load.latency)
    stall: Optional[str] = None     # "SLOT:MS@EVERY_MS" while this point ran, None: no stall
    stalled_ms: float = 0.0         # how long the stalled worker was stopped during the load
    elapsed_s: float = 0.0          # how long the load lasted (client side)
    stall_expected_ms: float = 0.0  # what the stall schedule promises for elapsed_s
    stall_short: bool = False       # stalled_ms < STALL_SHORT x stall_expected_ms: this
                                    # point did not measure the stall it names


@dataclass
class BenchResult:
    config: dict
    points: list[Point]
    env: dict
    probe: str                      # how wakeups were counted, or why not
    interrupted: int = 0            # the signal that stopped it early (0: it ran to the end)
    rows: list[Row] = field(default_factory=list)   # summarize(points): what the views show

    def to_json(self) -> list[dict]:
        return [asdict(p) for p in self.points]


# --- the JSON schema of --json (a list of points) ----------------------------------

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
POINT_SCHEMA = {
    "type": "object",
    "required": ["model", "policy", "concurrency", "work_us", "conns_per_s", "p50_ms",
                 "p99_ms", "p999_ms", "max_ms", "latency_cdf", "counts", "max_min_ratio", "jain", "wakeups_per_conn",
                 "repeat", "workers", "requests_per_conn", "conns", "errors",
                 "spurious_wakeups", "cpu", "saturated"],
    "properties": {
        "model": {"type": "string", "enum": list(MODELS)},
        "policy": {"type": ["string", "null"]},
        "label": {"type": "string"},
        "concurrency": {"type": "integer", "minimum": 1},
        "work_us": {"type": "integer", "minimum": 0},
        "repeat": {"type": "integer", "minimum": 0},
        "workers": {"type": "integer", "minimum": 1},
        "requests_per_conn": {"type": "integer", "minimum": 1},
        "conns": {"type": "integer", "minimum": 0},
        "errors": {"type": "integer", "minimum": 0},
        "conns_per_s": _NUM,
        "p50_ms": _NUM,
        "p99_ms": _NUM,
        "p999_ms": _NUM,
        "max_ms": _NUM,
        "latency_cdf": {"type": "array", "items": {"type": "array", "items": _NUM}},
        "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "max_min_ratio": _NUM_OR_NULL,
        "jain": _NUM,
        "wakeups_per_conn": _NUM_OR_NULL,
        "wakeups": {"type": ["integer", "null"]},
        "data_ready": {"type": ["integer", "null"]},
        "spurious_wakeups": {"type": "integer", "minimum": 0},
        "wakeup_source": {"type": "string"},
        "cpu": {"type": "object", "required": ["client", "workers", "acceptor", "machine"],
                "properties": {"client": _NUM, "workers": {"type": "array", "items": _NUM},
                               "acceptor": _NUM_OR_NULL, "machine": _NUM}},
        "saturated": {"type": "array", "items": {"type": "string"}},
        "stall": {"type": ["string", "null"]},
        "stalled_ms": _NUM,
        "elapsed_s": _NUM,
        "stall_expected_ms": _NUM,
        "stall_short": {"type": "boolean"},
    },
}
SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema",
          "title": "reuseport-ctl bench --json", "type": "array", "items": POINT_SCHEMA}


def check_schema(doc, schema: dict = SCHEMA) -> list[str]:
    """A small hand check of a JSON schema (required keys, types, enums,
    minimums), SCHEMA by default: the problems found, [] when doc conforms."""
    return _check(doc, schema, "$")


_TYPES = {"object": dict, "array": list, "string": str, "null": type(None),
          "integer": int, "number": (int, float), "boolean": bool}


def _check(v, s: dict, at: str) -> list[str]:
    types = s.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any(isinstance(v, _TYPES[t]) and not (isinstance(v, bool) and t != "boolean")
                 for t in types)
        if not ok:
            return [f"{at}: {type(v).__name__} is not {' or '.join(types)}"]
    errs = []
    if "enum" in s and v not in s["enum"]:
        errs.append(f"{at}: {v!r} not one of {s['enum']}")
    if "minimum" in s and isinstance(v, (int, float)) and v < s["minimum"]:
        errs.append(f"{at}: {v} < {s['minimum']}")
    if isinstance(v, dict):
        errs += [f"{at}: missing {k!r}" for k in s.get("required", ()) if k not in v]
        for k, sub in s.get("properties", {}).items():
            if k in v:
                errs += _check(v[k], sub, f"{at}.{k}")
    if isinstance(v, list) and "items" in s:
        for i, x in enumerate(v):
            errs += _check(x, s["items"], f"{at}[{i}]")
    return errs


# --- parsing the user's lists --------------------------------------------------------

def parse_int_list(spec: str, option: str) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16)."""
    try:
        out = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} takes a comma-separated list of integers, "
                        f"not {spec!r}.") from None
    if not out:
        raise UserError(f"{option} needs at least one value.")
    return out


def split_policies(spec: str) -> list[str]:
    """'round-robin,weighted:1,1,2,2,hash' -> ['round-robin', 'weighted:1,1,2,2', 'hash']:
    a number continues the argument list of the policy before it."""
    out: list[str] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok.isdigit() and out and ":" in out[-1]:
            out[-1] += "," + tok
        else:
            out.append(tok)
    return out


def setups_for(models: Sequence[str], policies: Sequence[str]) -> tuple[Setup, ...]:
    """reuseport with the kernel's hash, then reuseport with each policy (in the
    order given), then the single-socket models, in the order given."""
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise UserError(f"unknown model {bad[0]!r}: choose from {', '.join(MODELS)}.")
    out: list[Setup] = []
    for m in dict.fromkeys(models):
        if m != "reuseport":
            out.append(Setup(m))
            continue
        out.append(Setup(m, "kernel"))
        for p in dict.fromkeys(policies):
            pol = parse_policy(p)           # refuses unknown names in one sentence
            if pol.name != "kernel":
                out.append(Setup(m, str(pol)))
    return tuple(out)


# --- running -------------------------------------------------------------------------

def environment() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "machine": platform.machine()}


def run_bench(cfg: BenchConfig, on_point: Optional[Callable[[int, int, Point], None]] = None,
              on_start: Optional[Callable[[int, str], None]] = None) -> BenchResult:
    """Run every point. on_start(index, label) before a point, on_point(done,
    total, point) after it. Ctrl-C or SIGTERM during a point stops the bench
    after cleaning up; the points done so far come back with interrupted set to
    the signal."""
    cfg.validate()
    for s in cfg.setups:                                   # refuse before starting anything
        RunConfig(workers=cfg.workers, model=s.model,
                  policy=parse_policy(s.policy or "kernel")).validate()
    session, probe_note = _probe_session(cfg)
    result = BenchResult(config=config_dict(cfg, stall=str(cfg.stall) if cfg.stall else None,
                                             load_s=cfg.load_s),
                         points=[], env=environment(), probe=probe_note)
    total, done = cfg.total_points, 0
    try:
        for rep in range(cfg.repeat):
            for work in cfg.work_us:
                for conc in cfg.concurrency:
                    for setup in cfg.setups:
                        for stall in cfg.stalls:
                            if on_start:
                                on_start(done, f"{setup.label} c={conc} work={work}us "
                                               f"{'stall ' + str(stall) + ' ' if stall else ''}"
                                               f"#{rep + 1}")
                            p = _run_point(cfg, setup, conc, work, rep, session, stall)
                            if isinstance(p, int):             # stopped by this signal
                                result.interrupted = p
                                return result
                            result.points.append(p)
                            done += 1
                            if on_point:
                                on_point(done, total, p)
    finally:
        result.rows = summarize(result)
        if session is not None:
            session.close()
    return result


def config_dict(cfg, **extra) -> dict:
    """A run's config as its JSON says it (bench's and --long-lived's):
    the setups by label, and what else the caller adds."""
    d = asdict(cfg)
    d["setups"] = [s.label for s in cfg.setups]
    d.update(extra)
    return d


def _probe_session(cfg: BenchConfig):
    """One probe session for the whole bench (the port stays the same; each
    point sets its pids). Without bcc or the tracepoints, wakeups are off and
    the bench says why."""
    if not cfg.probes:
        return None, "off (--no-probes)"
    try:
        from ..probes.session import ProbeSession, default_strategies
        from ..probes.strategy import Strategy
        chosen = default_strategies()
        chosen["lookup"] = Strategy("none", "bench does not count lookups")
        chosen["live"] = Strategy("none", "bench does not count live connections")
        s = ProbeSession(cfg.port, "tcp", pids=(), strategies=chosen)
    except Exception as e:          # bcc raises plain Exception; UserError, ImportError too
        return None, f"off: {e}"
    wk = s.strategies.get("wakeups")
    if wk is None or wk.name == "none":
        note = f"off: {wk.reason if wk else 'no wakeup probe'}"
        s.close()
        return None, note
    dr = s.strategies["data_ready"]
    return s, (f"counted by probes: data-ready by {dr.name} {dr.target}; process wakeups by "
               f"{wk.target} inside sock_def_readable, for the worker (and acceptor) pids")


def _run_point(cfg: BenchConfig, setup: Setup, conc: int, work: int, rep: int,
               session, stall: Optional[Stall] = None) -> Point | int:
    """One point; the number of the signal that stopped it instead, if one did."""
    run_cfg = RunConfig(workers=cfg.workers, host=cfg.host, port=cfg.port, proto="tcp",
                        model=setup.model, policy=parse_policy(setup.policy or "kernel"),
                        cpus=cfg.cpus, work_us=work)
    nprocs = max(1, min(os.cpu_count() or 1, conc))
    with Supervisor(run_cfg) as sup:
        sup.start()
        if not sup.wait_ready():
            sup.stop()
            return sup.stop_signal or signal.SIGINT
        workers = [sup.counters.read(i)["pid"] for i in range(cfg.workers)]
        acceptor = (sup.counters.read(sup.counters.acceptor)["pid"]
                    if setup.model == "dispatcher" else None)
        watched = workers + ([acceptor] if acceptor else [])
        before = None
        if session is not None:
            session.set_pids(watched)
            before = session.read()
        cpu0 = _cpu_times(watched)
        sys0 = psutil.cpu_times()
        host, port, rpc, timeout = client_host(cfg.host), sup.port, cfg.requests_per_conn, \
            cfg.timeout
        # the first stop begins as the load begins (the client starts a few ms
        # after this), one every period, stall_periods of them: the load's length
        staller = (Staller(stall, sup.pids()[stall.slot], max_stops=cfg.stall_periods)
                   if stall is not None else None)
        load_s = cfg.load_s
        try:
            out = sup.run_in_child(lambda: _client(host, port, cfg.conns, conc, nprocs, rpc,
                                                   timeout, load_s),
                                   on_tick=staller.tick if staller else None,
                                   next_due=staller.next_due if staller else None)
        finally:
            if staller is not None:
                staller.release()       # before anything waits on the worker
        if out is None or sup.stopping:
            sup.stop()
            return sup.stop_signal or signal.SIGINT
        load, client_cpu_s = out
        cpu1 = _cpu_times(watched)
        sys1 = psutil.cpu_times()
        _settle(sup, load["ok"], cfg.workers)
        after = session.read() if session is not None else None
        sup.stop()
        rep_ = sup.report(load)
    elapsed = max(load["elapsed_s"], 1e-3)
    stalled_ms = round(1000 * staller.stopped_s, 1) if staller else 0.0
    expected_ms, short = (stall_check(stall, elapsed, stalled_ms, cfg.stall_periods)
                          if stall else (0.0, False))
    counts = [w["count"] for w in rep_["workers"]]
    eagain = sum(w["eagain"] for w in rep_["workers"])
    wakeups = data_ready = None
    if after is not None:
        wakeups = sum(after.wakeups.get(p, 0) - before.wakeups.get(p, 0) for p in watched)
        data_ready = sum(after.data_ready.values()) - sum(before.data_ready.values())
    accepted = sum(counts)
    wpc = round(wakeups / accepted, 3) if wakeups is not None and accepted else None
    cpu = {"client": round(100 * client_cpu_s / nprocs / elapsed, 1),
           "workers": [round(100 * (cpu1.get(p, 0) - cpu0.get(p, 0)) / elapsed, 1)
                       for p in workers],
           "acceptor": (round(100 * (cpu1.get(acceptor, 0) - cpu0.get(acceptor, 0)) / elapsed, 1)
                        if acceptor else None),
           "machine": _busy_pct(sys0, sys1)}
    return Point(model=setup.model, policy=setup.policy if setup.model == "reuseport" else None,
                 label=setup.label, concurrency=conc, work_us=work, repeat=rep,
                 workers=cfg.workers, requests_per_conn=cfg.requests_per_conn,
                 conns=load["ok"], errors=sum(load["errors"].values()),
                 conns_per_s=load["rate"], p50_ms=load["latency_ms"].get("p50", 0.0),
                 p99_ms=load["latency_ms"].get("p99", 0.0),
                 p999_ms=load["latency_ms"].get("p99.9", 0.0),
                 max_ms=load["latency_ms"].get("max", 0.0), counts=counts,
                 max_min_ratio=rep_["max_min_ratio"], jain=rep_["jain"],
                 wakeups_per_conn=wpc, wakeups=wakeups, data_ready=data_ready,
                 spurious_wakeups=eagain,
                 wakeup_source="probe" if wakeups is not None else "none",
                 cpu=cpu, saturated=saturated(cpu), latency_cdf=load.get("latency_cdf", []),
                 stall=str(stall) if stall else None,
                 stalled_ms=stalled_ms, elapsed_s=round(elapsed, 3),
                 stall_expected_ms=expected_ms, stall_short=short)


def stall_check(stall: Stall, elapsed_s: float, stalled_ms: float,
                max_stops: Optional[int] = None) -> tuple[float, bool]:
    """(what the schedule promises a load of elapsed_s, whether stalled_ms
    falls far short of it): a short one is no measurement of that stall."""
    expected = round(stall.promised_ms(elapsed_s, max_stops), 1)
    return expected, stalled_ms <= 0 or stalled_ms < STALL_SHORT * expected


def _client(host, port, conns, conc, nprocs, rpc, timeout, duration=None):
    """In the load helper: the load (conns connections, or with duration as
    many as that many seconds allow), and the CPU its (reaped) processes used."""
    from ..load.client import run_load
    t0 = os.times()
    res = run_load(host, port, "tcp", conns=None if duration else conns, concurrency=conc,
                   processes=nprocs, requests_per_conn=rpc, timeout=timeout,
                   duration=duration)
    t1 = os.times()
    cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    return res.to_dict(), cpu


def _cpu_times(pids) -> dict[int, float]:
    out = {}
    for p in pids:
        try:
            t = psutil.Process(p).cpu_times()
            out[p] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _busy_pct(a, b) -> float:
    """% of all CPUs busy between two psutil.cpu_times() (everyone's work)."""
    idle = (b.idle - a.idle) + (getattr(b, "iowait", 0) - getattr(a, "iowait", 0))
    total = sum(b) - sum(a)
    return round(100 * (1 - idle / total), 1) if total > 0 else 0.0


def _settle(sup: Supervisor, ok: int, workers: int) -> None:
    """The last reply can reach the client a moment before the worker's
    counter is written: wait (bounded) until the accepts add up."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if sum(sup.counters.read(i)["accepts"] for i in range(workers)) >= ok:
            return
        time.sleep(0.01)


def saturated(cpu: dict) -> list[str]:
    out = []
    if cpu["acceptor"] is not None and cpu["acceptor"] >= SATURATED:
        out.append("acceptor")
    hot = [i for i, c in enumerate(cpu["workers"]) if c >= SATURATED]
    if hot:
        out.append("workers" if len(hot) == len(cpu["workers"]) else
                   "worker " + ",".join(map(str, hot)))
    if cpu["client"] >= SATURATED:
        out.append("client")
    if cpu["machine"] >= SATURATED:
        out.append("machine")
    return out


# --- summary over repeats --------------------------------------------------------------

@dataclass
class Spread:
    median: Optional[float]
    lo: Optional[float]
    hi: Optional[float]

    @classmethod
    def of(cls, xs: Sequence[Optional[float]]) -> "Spread":
        v = [x for x in xs if x is not None]
        if not v:
            return cls(None, None, None)
        return cls(statistics.median(v), min(v), max(v))


@dataclass
class Row:
    """One setup at one load point, over its repeats."""
    label: str
    model: str
    policy: Optional[str]
    concurrency: int
    work_us: int
    repeats: int
    conns_per_s: Spread
    p50_ms: Spread
    p99_ms: Spread
    p999_ms: Spread
    max_ms: Spread
    max_min: Spread             # a repeat where a worker got none counts as inf
    jain: Spread
    wakeups_per_conn: Spread
    spurious_per_conn: Spread
    shares_sorted: list[float]  # mean share of the busiest, 2nd, ... worker
    shares_lo: list[float]
    shares_hi: list[float]
    counts: list[list[int]]     # per repeat
    saturated: list[str]        # named in a majority of repeats
    errors: int
    stall: Optional[str] = None     # the stall this row ran under (None: none)
    stalled_ms: Spread = field(default_factory=lambda: Spread(None, None, None))
    stall_expected_ms: Spread = field(default_factory=lambda: Spread(None, None, None))
    stall_short: int = 0            # repeats whose stall fell far short (Point.stall_short)
    latency_cdf: list = field(default_factory=list)  # [[percentile, ms], ...]: median of the repeats'
    cpu: dict = field(default_factory=dict)   # medians, % of one core: client (per process), busiest
                                # worker, acceptor (None), machine (all CPUs, everyone's)


def summarize(result: BenchResult) -> list[Row]:
    groups: dict[tuple, list[Point]] = {}
    for p in result.points:
        groups.setdefault((p.work_us, p.concurrency, p.label, p.stall), []).append(p)
    order = {s: i for i, s in enumerate(result.config["setups"])}
    rows = []
    for (work, conc, label, stall), ps in sorted(groups.items(),
                                                 key=lambda kv: (kv[0][0], kv[0][1],
                                                                 order.get(kv[0][2], 99),
                                                                 kv[0][3] or "")):
        shares = [sorted(fairness(p.counts)["shares"], reverse=True) for p in ps]
        n = len(ps[0].counts)
        sat_votes: dict[str, int] = {}
        for p in ps:
            for s in p.saturated:
                sat_votes[s] = sat_votes.get(s, 0) + 1
        rows.append(Row(
            label=label, model=ps[0].model, policy=ps[0].policy, concurrency=conc,
            work_us=work, repeats=len(ps),
            conns_per_s=Spread.of([p.conns_per_s for p in ps]),
            p50_ms=Spread.of([p.p50_ms for p in ps]), p99_ms=Spread.of([p.p99_ms for p in ps]),
            p999_ms=Spread.of([p.p999_ms for p in ps]), max_ms=Spread.of([p.max_ms for p in ps]),
            max_min=Spread.of([math.inf if p.max_min_ratio is None else p.max_min_ratio
                               for p in ps]),
            jain=Spread.of([p.jain for p in ps]),
            wakeups_per_conn=Spread.of([p.wakeups_per_conn for p in ps]),
            spurious_per_conn=Spread.of([p.spurious_wakeups / p.conns if p.conns else None
                                         for p in ps]),
            shares_sorted=[statistics.fmean(s[i] for s in shares) for i in range(n)],
            shares_lo=[min(s[i] for s in shares) for i in range(n)],
            shares_hi=[max(s[i] for s in shares) for i in range(n)],
            counts=[p.counts for p in ps],
            saturated=[s for s, k in sat_votes.items() if 2 * k > len(ps)],
            errors=sum(p.errors for p in ps), stall=stall,
            stalled_ms=Spread.of([p.stalled_ms for p in ps]),
            stall_expected_ms=Spread.of([p.stall_expected_ms for p in ps]),
            stall_short=sum(bool(p.stall_short) for p in ps if p.stall),
            latency_cdf=median_cdf([p.latency_cdf for p in ps]),
            cpu={"client": statistics.median(p.cpu["client"] for p in ps),
                 "worker": statistics.median(max(p.cpu["workers"], default=0.0) for p in ps),
                 "acceptor": (statistics.median(p.cpu["acceptor"] for p in ps)
                              if ps[0].cpu["acceptor"] is not None else None),
                 "machine": statistics.median(p.cpu["machine"] for p in ps)}))
    return rows


def median_cdf(cdfs: Sequence[list]) -> list[list[float]]:
    """[[q, ms], ...]: at each percentile q, the median of the repeats' latencies
    (every repeat samples the same percentiles, load.latency.CDF_QS)."""
    cdfs = [c for c in cdfs if c]
    if not cdfs:
        return []
    return [[q, statistics.median(c[i][1] for c in cdfs)]
            for i, (q, _) in enumerate(min(cdfs, key=len))]


def imbalances(rows: Sequence[Row], threshold: float = IMBALANCED) -> dict[str, list[Row]]:
    """label -> the load points where that setup's median max:min >= threshold."""
    out: dict[str, list[Row]] = {}
    for r in rows:
        if r.max_min.median is not None and r.max_min.median >= threshold:
            out.setdefault(r.label, []).append(r)
    return out


def worst(rows: Sequence[Row]) -> dict[str, Row]:
    """label -> its row with the highest median max:min."""
    out: dict[str, Row] = {}
    for r in rows:
        m = r.max_min.median if r.max_min.median is not None else 0.0
        cur = out.get(r.label)
        if cur is None or m > (cur.max_min.median or 0.0):
            out[r.label] = r
    return out


def stall_table(rows: Sequence[Row]) -> list[dict]:
    """The headline of bench --stall: per setup and load point, Jain, p99 and
    max latency without and with the stall (medians over repeats)."""
    pairs: dict[tuple, dict] = {}
    for r in rows:
        d = pairs.setdefault((r.work_us, r.concurrency, r.label), {
            "label": r.label, "concurrency": r.concurrency, "work_us": r.work_us})
        d["stall" if r.stall else "calm"] = r
    return [d for d in pairs.values() if "stall" in d and "calm" in d]


__all__ = ["BenchConfig", "BenchResult", "Point", "Row", "Setup", "Spread", "SCHEMA",
           "DEFAULT_MODELS", "DEFAULT_POLICIES", "DEFAULT_CONCURRENCY", "DEFAULT_WORK_US",
           "check_schema", "environment", "median_cdf", "stall_check", "stall_table",
           "STALL_POLICIES", "STALL_PERIODS", "imbalances", "parse_int_list", "run_bench",
           "saturated", "setups_for", "split_policies", "summarize", "worst", "POLICY_NAMES"]
