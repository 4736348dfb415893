"""UDP specifics: a flow (one 4-tuple) keeps its member; connected members
of a group receive exactly their peer's datagrams; and connected sockets are
found by their 4-tuple hash (uhash4, Linux 6.13+) rather than by scanning
the group's 2-tuple slot."""
from __future__ import annotations

import resource
import socket
import time

from ..kernel import features as F
from .checks import Skip, check, expect, expect_eq
from .net import IPV4, UDP, Pool, receiver

N = 4


@check("udp-flow-affinity", selftest=None, needs=(F.SO_REUSEPORT,))
def udp_flow_affinity(ctx):
    """Unconnected UDP members are chosen by the 4-tuple hash, so while the
    group is unchanged every datagram of one flow (same source address and
    port) reaches the same member, for each of 16 flows."""
    with Pool() as pool:
        socks, port = pool.group(UDP, IPV4, N)
        per_flow = []
        for _ in range(16):
            c = pool.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            c.bind(("127.0.0.1", 0))
            got = set()
            for _ in range(5):
                c.sendto(b"x", ("127.0.0.1", port))
                got.add(receiver(socks, UDP))
            per_flow.append(sorted(got, key=str))
        expect(all(len(g) == 1 and g[0] is not None for g in per_flow),
               "members per flow of 5 datagrams", per_flow, "one member each")
        used = len({g[0] for g in per_flow})
    return f"16 flows × 5 datagrams: each flow kept one member ({used} members used)"


def _connected_group(pool: Pool, k: int, peers: list[tuple[str, int]]):
    """One unconnected member on 127.0.0.1:P, then k members connected to
    peers[i] (the rest to unused ports)."""
    u = pool.member(UDP, socket.AF_INET, "127.0.0.1", 0)
    port = u.getsockname()[1]
    conn = []
    for i in range(k):
        s = pool.member(UDP, socket.AF_INET, "127.0.0.1", port)
        s.connect(peers[i] if i < len(peers) else ("127.0.0.1", 1024 + i))
        conn.append(s)
    return u, conn, port


@check("udp-connected-4tuple", selftest=None, needs=(F.SO_REUSEPORT,))
def udp_connected_4tuple(ctx):
    """Connected members of a UDP reuseport group are matched by their full
    4-tuple, never picked by the group's hash: each of 8 connected members
    receives exactly the datagrams of the peer it is connected to, and a
    datagram from any other peer reaches the unconnected member."""
    with Pool() as pool:
        peers = []
        for _ in range(8):
            p = pool.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            p.bind(("127.0.0.1", 0))
            peers.append(p)
        u, conn, port = _connected_group(pool, 8, [p.getsockname() for p in peers])
        socks = [u] + conn
        seen = []
        for i, p in enumerate(peers):
            for _ in range(3):
                p.sendto(b"x", ("127.0.0.1", port))
                seen.append(receiver(socks, UDP))
        expect_eq(seen, [1 + i // 3 for i in range(24)],
                  "member per datagram from peers 0..7 (3 each; member i+1 is connected to peer i)")
        stranger = pool.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        got = []
        for _ in range(4):
            stranger.sendto(b"x", ("127.0.0.1", port))
            got.append(receiver(socks, UDP))
        expect_eq(got, [0] * 4, "member for datagrams from an unconnected peer")
    return "24 datagrams from 8 peers: each reached its connected member; strangers " \
           "reached the unconnected one"


CROWD = 4000
BATCH = 400


def _cost(sender: socket.socket, dst, target: socket.socket) -> float:
    """Seconds per datagram sent to dst and read from target (min of rounds)."""
    t0 = time.perf_counter()
    for _ in range(BATCH):
        sender.sendto(b"x", dst)
        target.recv(16)
    return (time.perf_counter() - t0) / BATCH


@check("udp-hash4-effective", selftest=None,
       needs=(F.SO_REUSEPORT, F.UHASH4), timeout=40)
def udp_hash4_effective(ctx):
    """Connected UDP sockets are hashed by 4-tuple (uhash4): with 4000
    connected members on one local address and port, a datagram for one of
    them costs about what it costs to a lone socket, while a datagram for the
    slot's unconnected member (which must scan the 4000 connected ones) costs
    several times more. Passes when the 4-tuple lookup is at most half the
    scan's cost."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = CROWD + 256
    if soft < need:
        if hard < need:
            raise Skip(f"needs {need} open files; RLIMIT_NOFILE hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    with Pool() as pool:
        snd = pool.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        snd.bind(("127.0.0.1", 0))
        stranger = pool.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        stranger.bind(("127.0.0.1", 0))
        # The oldest connected member is the one a scan reaches last.
        u, conn, port = _connected_group(pool, CROWD, [snd.getsockname()])
        for s in (u, conn[0]):
            s.setblocking(True)
        lone = pool.add(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        lone.bind(("127.0.0.1", 0))
        lone.connect(snd.getsockname())
        lone_snd = snd
        lone_dst = lone.getsockname()
        hashed, scan, alone = [], [], []
        for _ in range(5):
            alone.append(_cost(lone_snd, lone_dst, lone))
            hashed.append(_cost(snd, ("127.0.0.1", port), conn[0]))
            scan.append(_cost(stranger, ("127.0.0.1", port), u))
        a, h, s = min(alone), min(hashed), min(scan)
    seen = (f"per datagram: connected {h * 1e6:.1f} µs, lone socket {a * 1e6:.1f} µs, "
            f"unconnected behind {CROWD} connected {s * 1e6:.1f} µs")
    expect(h * 2 <= s, "4-tuple lookup vs slot scan", seen,
           "the connected member at most half the scan's cost")
    return f"{seen} (×{h / a:.1f} and ×{s / a:.1f} a lone socket's)"
