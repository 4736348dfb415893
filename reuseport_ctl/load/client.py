"""The built-in load client: run_load() and the LoadResult it returns.

Several forked processes each drive their share of the concurrency with
non-blocking sockets in one epoll loop (engine.py); they start together,
publish progress in a shared page and send their tally back through a pipe;
the parent merges. Every child and fd is released on return, on an
exception, on Ctrl-C and on SIGTERM.
"""
from __future__ import annotations

import ipaddress
import mmap
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

from ..errors import UserError
from ..signals import signum_of
from ..stats.fairness import summarize
from . import http
from .engine import ERROR_KINDS, Engine, Tally, Target
from .latency import latency_cdf, percentiles
from .plan import lanes_per_process


@dataclass
class LoadResult:
    proto: str
    host: str
    port: int
    conns: int                      # attempted connections (TCP) or datagrams (UDP)
    ok: int                         # completed with a reply
    errors: dict[str, int]          # "refused", "reset", "timeout", "other" always present
    elapsed_s: float
    rate: float                     # ok per second
    latency_ms: dict[str, float]    # "p50", "p90", "p99", "p99.9", "max"
    per_worker: dict[str, int]      # worker named in the reply -> replies; {} if none
    requests: int = 0               # replies received (HTTP responses; UDP: datagrams)
    requests_rate: float = 0.0      # replies per second: with keep-alive, what wrk reports
    latency_cdf: list = field(default_factory=list)   # [[percentile, ms], ...]: latency_cdf()
    interrupted: Optional[int] = None   # the signal that stopped it early (what was done is here)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["interrupted"] is None:
            del d["interrupted"]
        counts = list(self.per_worker.values())
        fair = summarize(counts) if counts else None
        d["fairness"] = None if fair is None else {
            "max_min_ratio": fair["max_min_ratio"], "jain": fair["jain"]}
        return d


def worker_key(name: str):
    """Workers in natural order: 2 before 10."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def run_load(host: str, port: int, proto: str = "tcp", conns: Optional[int] = 1000,
             concurrency: int = 16, processes: Optional[int] = None,
             requests_per_conn: int = 1, timeout: float = 2.0, path: str = "/",
             source_ports: Optional[list[int]] = None,
             progress: Optional[Callable[[int], None]] = None,
             duration: Optional[float] = None, partial: bool = False) -> LoadResult:
    """conns connections (or datagrams); with duration, start new ones for
    that many seconds only (conns=None: no count limit, the time decides).
    partial: a stopping signal ends the load early with what was done
    (result.interrupted says which); otherwise it propagates."""
    if duration is not None and not duration > 0:
        raise UserError(f"duration must be positive, not {duration}.")
    if conns is None and duration is None:
        raise UserError("give a number of connections, a duration, or both.")
    limit = conns if conns is not None else sys.maxsize
    target = _target(host, port, proto, limit, concurrency, processes, requests_per_conn,
                     timeout, path, source_ports, duration)
    nprocs = processes or min(os.cpu_count() or 1, concurrency)
    plan = lanes_per_process(limit, concurrency, nprocs,
                             len(source_ports) if source_ports else None)
    tallies, stopped_by = _run_children(target, plan, progress, partial)
    result = _merge(proto, host, port, conns if duration is None else None, tallies)
    result.interrupted = stopped_by
    return result


def _target(host, port, proto, conns, concurrency, processes, requests_per_conn,
            timeout, path, source_ports, duration=None) -> Target:
    if proto not in ("tcp", "udp"):
        raise UserError(f"protocol must be tcp or udp, not {proto!r}.")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"port must be between 1 and 65535, not {port}.")
    for name, v in (("conns", conns), ("concurrency", concurrency),
                    ("requests per connection", requests_per_conn)):
        if v < 1:
            raise UserError(f"{name} must be at least 1, not {v}.")
    if processes is not None and processes < 1:
        raise UserError(f"processes must be at least 1, not {processes}.")
    if not timeout > 0:
        raise UserError(f"timeout must be positive, not {timeout}.")
    if not path.startswith("/") or any(c in path for c in " \r\n"):
        raise UserError(f"path must start with / and hold no spaces, not {path!r}.")
    if source_ports is not None:
        if not source_ports or any(not 1 <= p <= 65535 for p in source_ports):
            raise UserError("source ports must be a non-empty list of ports 1-65535.")
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]                       # [::1], as in a URL
    if host.replace(".", "").isdigit() or ":" in host:
        try:
            ipaddress.ip_address(host)          # looks like an address: never ask DNS
        except ValueError:
            raise UserError(f"--host {host!r} is not an IP address.") from None
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=kind)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"cannot resolve host {host!r}: {e}.") from None
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == 80 else f"{shown}:{port}"
    return Target(proto, family, addr, float(timeout), requests_per_conn,
                  http.request(path, host_header, last=False),
                  http.request(path, host_header, last=True),
                  list(source_ports) if source_ports else None, duration)


WIND_DOWN = signal.SIGUSR1      # parent -> child: start no new connection, report


def _run_children(target: Target, plan, progress,
                  partial: bool = False) -> tuple[list[Tally], Optional[int]]:
    """The children's tallies. With partial, a stopping signal (Ctrl-C, or
    SIGTERM/SIGHUP as signals.Interrupted) winds them down instead: each
    reports what it finished, and the signal is returned with the tallies
    (a second Ctrl-C stops at once). Without, the signal propagates."""
    nprocs = len(plan)
    shared = mmap.mmap(-1, 8 * nprocs)          # one progress counter per child
    go_r, go_w = os.pipe()                      # closing go_w starts them together
    children: dict[int, int] = {}               # result pipe read end -> pid
    bufs: dict[int, bytearray] = {}
    sel = selectors.DefaultSelector()
    restore = _raise_on_sigterm()
    try:
        for p, lanes in enumerate(plan):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                _child(target, lanes, shared, p, w, go_r, [go_w, *children])
            os.close(w)
            children[r], bufs[r] = pid, bytearray()
            sel.register(r, selectors.EVENT_READ)
        os.close(go_w)
        go_w = -1
        open_ = set(children)
        stopped_by = None
        while open_:
            try:
                for key, _ in sel.select(0.1):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        bufs[key.fd] += chunk
                    else:
                        sel.unregister(key.fd)
                        open_.discard(key.fd)
                if progress:
                    progress(sum(struct.unpack_from(f"{nprocs}q", shared)))
            except KeyboardInterrupt as e:
                if not partial or stopped_by is not None:
                    raise                           # a second signal: stop at once
                stopped_by = signum_of(e)
                for pid in children.values():
                    try:
                        os.kill(pid, WIND_DOWN)
                    except ProcessLookupError:
                        pass
        tallies = []
        for r, pid in list(children.items()):
            _, status = os.waitpid(pid, 0)
            del children[r]
            os.close(r)
            reply = pickle.loads(bufs[r]) if bufs[r] else None
            if not isinstance(reply, Tally):
                raise RuntimeError(f"load process {pid} failed (status {status}): {reply}")
            tallies.append(reply)
        return tallies, stopped_by
    finally:
        for r, pid in children.items():         # only on error: stop and reap
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(r)
        for fd in (go_r, go_w):
            if fd >= 0:
                os.close(fd)
        sel.close()
        shared.close()
        restore()


def _child(target, lanes, shared, slot, w, go_r, inherited) -> None:
    """Body of a forked load process; never returns."""
    code = 1
    try:
        # Ctrl-C reaches the whole process group: the parent winds us down
        # (WIND_DOWN), so that what was done is reported; SIGTERM: just die.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        parent = os.getppid()
        os.read(go_r, 1)                                 # EOF when the parent says go
        os.close(go_r)
        publish = lambda done: struct.pack_into("q", shared, 8 * slot, done)  # noqa: E731
        engine = Engine(target, Tally(), publish, parent)
        signal.signal(WIND_DOWN, lambda *_: engine.wind_down())
        try:
            reply = engine.run(lanes)
        except Exception as e:                           # a bug: report it, do not hang
            reply = f"{type(e).__name__}: {e}"
        data = pickle.dumps(reply)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
        code = 0
    finally:
        os._exit(code)      # never run the parent's cleanup (or pytest) in a child


def _raise_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into SystemExit while children run, so finally reaps
    them; only when nobody else handles SIGTERM and we are the main thread."""
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return lambda: None

        def on_term(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:                                   # not the main thread
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _merge(proto: str, host: str, port: int, conns: Optional[int],
           tallies: list[Tally]) -> LoadResult:
    """conns None (a --duration run): the attempts made are the count."""
    ok = sum(t.ok for t in tallies)
    errors = Counter({k: 0 for k in ERROR_KINDS})
    per_worker: Counter = Counter()
    for t in tallies:
        errors.update(t.errors)
        per_worker.update(t.per_worker)
    active = [t for t in tallies if t.ended]
    elapsed = (max(t.ended for t in active) - min(t.started for t in active)) if active else 0.0
    samples = [x for t in tallies for x in t.lat_ms]
    lat = percentiles(samples, (50, 90, 99, 99.9))
    replies = sum(len(t.lat_ms) for t in tallies)       # one latency sample a reply
    if conns is None:
        conns = ok + sum(errors.values())
    return LoadResult(
        proto=proto, host=host, port=port, conns=conns, ok=ok,
        errors={k: errors[k] for k in ERROR_KINDS} | {k: v for k, v in errors.items()
                                                       if k not in ERROR_KINDS},
        elapsed_s=round(elapsed, 4),
        rate=round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms={k: round(v, 3) for k, v in lat.items()},
        per_worker={k: per_worker[k] for k in sorted(per_worker, key=worker_key)},
        requests=replies, requests_rate=round(replies / elapsed, 1) if elapsed > 0 else 0.0,
        latency_cdf=[[q, round(v, 3)] for q, v in latency_cdf(samples)])
