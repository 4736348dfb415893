"""The udp-lookup experiment: what a received datagram costs when one local
port holds many connected UDP sockets (a QUIC-style server: one reuseport
group, each socket connect()ed to one client 4-tuple, plus one unconnected
socket for new clients).

Without a 4-tuple hash the kernel finds the socket by scanning the
(address, port) slot of its secondary hash (udp4_lib_lookup2 scores every
socket in it): the cost grows with the number of connected sockets. Linux
6.13 added a 4-tuple hash for connected UDP sockets (udp_lib_hash4,
udp4_hash4): a datagram for a connected 4-tuple is found in O(1). It needs
no socket option or boot parameter: connect() hashes the socket when it is
bound to a specific local address (not the wildcard). A datagram from a
*new* 4-tuple still goes the slot-scan way (and then a reuseport pick that
skips the connected members), so that path is measured too.

Cost is measured as what one client achieves: datagrams/s from one 4-tuple
(send a batch, the receiving socket drains it), so the µs per datagram
include the constant cost of two syscalls in Python. With kprobes (and bcc)
the lookup probe's kretprobe also gives the lookup's own latency
(ProbeSession's lookup_latency_log2_ns); without them that column is empty.
"""
from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import UserError
from ..kernel.sockets import open_listener

HOST = "127.0.0.1"
DEFAULT_NS = (1, 10, 100, 1000, 10000)
MAX_N = 60000
PEER_PORT_BASE = 10000
PEERS_PER_ADDR = 50000
BATCH = 32
GOAL_RATIO = 1.2
PATHS = ("connected", "unconnected")

ROW_SCHEMA = {
    "type": "object",
    "required": ["n", "path", "datagrams", "seconds", "rate", "us_per_datagram",
                 "cost_ratio", "lookup_latency_ns"],
    "properties": {
        "n": {"type": "integer", "minimum": 1},
        "path": {"type": "string", "enum": list(PATHS)},
        "datagrams": {"type": "integer", "minimum": 1},
        "seconds": {"type": "number", "minimum": 0},
        "rate": {"type": "number", "minimum": 0},
        "us_per_datagram": {"type": "number", "minimum": 0},
        "cost_ratio": {"type": "number", "minimum": 0},
        "lookup_latency_ns": {"type": ["object", "null"]},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["kernel", "cpus", "uhash4", "lookup_latency", "rows", "ratio", "goal"],
    "properties": {
        "kernel": {"type": "string"},
        "cpus": {"type": "integer", "minimum": 1},
        "uhash4": {"type": "object", "required": ["present", "detail", "needs"],
                   "properties": {"present": {"type": "boolean"},
                                  "detail": {"type": "string"},
                                  "needs": {"type": "string"}}},
        "lookup_latency": {"type": "object", "required": ["available", "why"],
                           "properties": {"available": {"type": "boolean"},
                                          "why": {"type": "string"}}},
        "rows": {"type": "array", "items": ROW_SCHEMA},
        "ratio": {"type": "object"},
        "goal": {"type": "object", "required": ["max_ratio", "met"],
                 "properties": {"max_ratio": {"type": "number"},
                                "met": {"type": ["boolean", "null"]}}},
    },
}


# --- what the kernel offers ---------------------------------------------------

def uhash4_status() -> dict:
    """Does this kernel hash connected UDP sockets by 4-tuple? (doctor's probe:
    udp_lib_hash4 / udp4_hash4 in BTF, else kallsyms)."""
    from ..kernel import features
    fac = features.probe(features.UHASH4, features.probe_uhash4)
    needs = ("nothing: connect() puts a socket bound to a specific local address in the "
             "4-tuple hash (no UDP_HASH4 option, no boot parameter)") if fac.ok else \
        "a kernel >= 6.13 (there is no option or boot parameter that adds it)"
    return {"present": bool(fac.ok), "detail": fac.detail, "needs": needs}


def latency_strategy() -> tuple[dict | None, str]:
    """The lookup probe's strategies if it can give a latency histogram
    (kprobe+kretprobe), else None and why not."""
    from ..kernel import features
    from ..probes.strategy import choose
    facs = [features.probe(n, fn) for n, fn in features.PROBES
            if n in (features.KPROBES, features.BCC, features.SK_LOOKUP,
                     features.SK_REUSEPORT)]
    chosen = choose(facs)
    lk = chosen.get("lookup")
    if lk is not None and lk.name == "kprobe":
        return {"lookup": lk}, "kprobe+kretprobe on __udp4_lib_lookup: log2 latency histogram"
    kp = next((f for f in facs if f.name == features.KPROBES), None)
    why = kp.detail if kp is not None and not kp.ok else (lk.reason if lk else "no strategy")
    return None, (f"no lookup latency here ({why}): the cost shown is the datagram rate "
                  f"one client achieves")


# --- the server -----------------------------------------------------------------

def peer(k: int, i: int) -> tuple[str, int]:
    """The client 4-tuple that connected socket i of server k is connected to."""
    return (f"127.{10 + k}.0.{1 + i // PEERS_PER_ADDR}", PEER_PORT_BASE + i % PEERS_PER_ADDR)


def fresh_peer(k: int) -> tuple[str, int]:
    """A client 4-tuple no socket of server k is connected to."""
    return (f"127.{10 + k}.1.1", PEER_PORT_BASE)


@dataclass
class Server:
    """One reuseport group on HOST:port: an unconnected socket (the first
    member, where new clients arrive) and n connected sockets."""
    k: int
    n: int
    port: int = 0
    unconnected: socket.socket | None = None
    connected: list[socket.socket] = field(default_factory=list)
    clients: dict = field(default_factory=dict)      # path -> client socket
    session: object = None                           # ProbeSession (kprobes only)

    def _member(self) -> socket.socket:
        # No group= (it only explains a failed bind): copying 10k members per
        # socket would make the set-up quadratic.
        s = open_listener(HOST, self.port, "udp", reuseport=True, backlog=0)
        s.setblocking(False)
        self.port = s.getsockname()[1]
        return s

    def start(self) -> None:
        self.unconnected = self._member()
        while len(self.connected) < self.n:
            s = self._member()
            self.connected.append(s)
            s.connect(peer(self.k, len(self.connected) - 1))

    def endpoints(self, path: str) -> tuple[socket.socket, socket.socket]:
        """(client, receiving socket) for a path. The connected path's client
        is the peer of the first connected socket: the deepest in a chain."""
        if path not in self.clients:
            who = peer(self.k, 0) if path == "connected" else fresh_peer(self.k)
            self.clients[path] = _client(who, self.port)
        return self.clients[path], (self.connected[0] if path == "connected"
                                    else self.unconnected)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        for c in self.clients.values():
            c.close()
        self.clients.clear()
        for s in self.connected:
            s.close()
        self.connected.clear()
        if self.unconnected is not None:
            self.unconnected.close()
            self.unconnected = None


def _pump(client: socket.socket, receiver: socket.socket, seconds: float) -> tuple[int, float]:
    """Send batches from client, drain them at receiver, for about `seconds`:
    (datagrams received, elapsed)."""
    payload = b"q" * 32
    got = 0
    send, recv = client.send, receiver.recv
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(BATCH):
            send(payload)
        while True:
            try:
                recv(64)
            except BlockingIOError:
                break
            got += 1
        now = time.perf_counter()
        if now >= deadline:
            return got, now - t0


def _client(addr: tuple[str, int], port: int) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.bind(addr)
        c.connect((HOST, port))
    except BaseException:
        c.close()
        raise
    return c


def _latency(hist: dict | None) -> dict | None:
    """p50 bucket and mean of a log2(ns) histogram (bucket k: [2^k, 2^(k+1)) ns)."""
    if not hist:
        return None
    total = sum(hist.values())
    mean = sum(v * 1.5 * 2 ** k for k, v in hist.items()) / total
    run, p50 = 0, None
    for k in sorted(hist):
        run += hist[k]
        if run * 2 >= total:
            p50 = 2 ** k
            break
    return {"p50_bucket_ns": p50, "mean_ns": round(mean, 1), "lookups": total}


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError):
        raise UserError(f"{need} sockets need RLIMIT_NOFILE >= {need}, but it is {soft} "
                        f"(hard {hard}) and cannot be raised here: lower the largest N "
                        f"or raise it (ulimit -n).") from None


EARLY_DEMUX = "/proc/sys/net/ipv4/udp_early_demux"


class _Sysctl:
    """Set a sysctl of the current network namespace; restore() puts it back."""

    def __init__(self, path: str, value: str):
        self.path, self.old = path, None
        try:
            with open(path) as f:
                self.old = f.read().strip()
            if self.old != value:
                with open(path, "w") as f:
                    f.write(value)
        except OSError as e:
            self.old = None
            raise UserError(f"cannot set {path} ({e.strerror}): run as root, or pass "
                            f"--early-demux.") from None

    def restore(self) -> None:
        if self.old is not None:
            with open(self.path, "w") as f:
                f.write(self.old)
            self.old = None


def run_udp_lookup(ns: Iterable[int] = DEFAULT_NS, seconds: float = 0.2, rounds: int = 5,
                   paths: Iterable[str] = PATHS, probe: bool = True, early_demux: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict:
    """One server (reuseport group, own port) per N, all up at once; then
    `rounds` rounds, each measuring every (N, path) for `seconds`. Rounds
    interleave the sizes, so load from other tenants of the machine falls on
    all of them alike; a point's cost is its best round (median also kept).

    early_demux=False turns net.ipv4.udp_early_demux off for the run (and
    back on after): early demux checks only the first socket of the
    address/port chain, so it skips the lookup for exactly one connected
    socket (the newest) and would make N=1 look cheaper than any other N."""
    ns = sorted(set(int(n) for n in ns))
    paths = [p for p in PATHS if p in set(paths)]
    if not ns or ns[0] < 1 or ns[-1] > MAX_N:
        raise UserError(f"N must be between 1 and {MAX_N}.")
    if len(ns) > 100:
        raise UserError("at most 100 different N.")
    if seconds <= 0 or rounds < 1:
        raise UserError("--seconds must be positive and --rounds at least 1.")
    if not paths:
        raise UserError("no path to measure: choose connected, unconnected or both.")
    raise_nofile(sum(ns) + 3 * len(ns) + 256)
    strategies, why = latency_strategy() if probe else (None, "probe disabled (--no-probe)")
    out = {
        "kernel": os.uname().release, "cpus": os.cpu_count() or 1,
        "uhash4": uhash4_status(),
        "lookup_latency": {"available": strategies is not None, "why": why},
        "seconds": seconds, "rounds": rounds, "rows": [],
    }
    out["early_demux"] = early_demux
    servers = [Server(k, n) for k, n in enumerate(ns)]
    demux = None if early_demux else _Sysctl(EARLY_DEMUX, "0")
    samples: dict[tuple[int, str], list[tuple[int, float]]] = {}
    latency: dict[tuple[int, str], dict] = {}
    try:
        for srv in servers:
            srv.start()
            if progress:
                progress(f"{srv.n} connected sockets up")
        for srv in servers:
            if strategies is not None:
                from ..probes.session import ProbeSession
                srv.session = ProbeSession(srv.port, "udp", strategies=strategies)
        for r in range(rounds):
            for srv in servers:
                for path in paths:
                    client, receiver = srv.endpoints(path)
                    before = srv.session.read().lookup_latency_log2_ns if srv.session else None
                    samples.setdefault((srv.n, path), []).append(
                        _pump(client, receiver, seconds))
                    if srv.session:
                        hist = _merge(latency.get((srv.n, path)), before,
                                      srv.session.read().lookup_latency_log2_ns)
                        latency[(srv.n, path)] = hist
                    if progress:
                        progress(f"round {r + 1}/{rounds}: N={srv.n} {path}")
    finally:
        for srv in servers:
            srv.close()
        if demux is not None:
            demux.restore()
    for n in ns:
        for path in paths:
            runs = [(g, dt) for g, dt in samples[(n, path)] if g]
            if not runs:
                raise UserError(f"no datagram reached the {path} socket at N={n}.")
            costs = sorted(dt / g * 1e6 for g, dt in runs)
            got, dt = min(runs, key=lambda x: x[1] / x[0])
            out["rows"].append({
                "n": n, "path": path, "datagrams": got, "seconds": round(dt, 4),
                "rate": round(got / dt, 1), "us_per_datagram": round(dt / got * 1e6, 3),
                "us_per_datagram_median": round(costs[len(costs) // 2], 3),
                "cost_ratio": 0.0, "lookup_latency_ns": _latency(latency.get((n, path))),
            })
    _ratios(out)
    return out


def _merge(acc: dict | None, before: dict | None, after: dict | None) -> dict | None:
    """Add the histogram growth from before to after into acc."""
    if before is None or after is None:
        return acc
    acc = dict(acc or {})
    for k, v in after.items():
        d = v - before.get(k, 0)
        if d > 0:
            acc[k] = acc.get(k, 0) + d
    return acc


def _ratios(out: dict) -> None:
    ratio = {}
    for path in PATHS:
        rows = [r for r in out["rows"] if r["path"] == path]
        if not rows:
            continue
        base = rows[0]["us_per_datagram"]
        for r in rows:
            r["cost_ratio"] = round(r["us_per_datagram"] / base, 3)
        ratio[path] = {"n_low": rows[0]["n"], "n_high": rows[-1]["n"],
                       "cost_ratio": rows[-1]["cost_ratio"]}
    out["ratio"] = ratio
    conn = ratio.get("connected")
    met = None
    if out["uhash4"]["present"] and conn and conn["n_high"] > conn["n_low"]:
        met = conn["cost_ratio"] <= GOAL_RATIO
    out["goal"] = {"max_ratio": GOAL_RATIO, "path": "connected",
                   "applies": bool(out["uhash4"]["present"]), "met": met}


def steps(ns: Iterable[int], paths: Iterable[str], rounds: int) -> int:
    """How many progress() calls run_udp_lookup makes."""
    ns = set(ns)
    return len(ns) + rounds * len(ns) * len([p for p in PATHS if p in set(paths)])
