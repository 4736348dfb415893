"""Live connections per member, counted in the kernel (bpf/conns.h): what
watch shows equals the ground truth -- the connections each server process
holds open (its fd table) -- exactly, for our workers and for a real nginx,
while a known set of long-lived connections opens and partly closes."""
from __future__ import annotations

import socket
import time

import pytest

from nginx import nginx as start_nginx
from reuseport_ctl.kernel.conns import held_by
from test_watch import HOST, Watcher, group

KEEP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def open_served(port: int, n: int) -> list[socket.socket]:
    """n keep-alive connections, each answered once (so a worker took it)."""
    out = []
    for _ in range(n):
        c = socket.create_connection((HOST, port), timeout=5)
        c.sendall(KEEP)
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
        out.append(c)
    return out


def steady(port: int, pids, seconds: float = 0.5) -> dict[int, int]:
    """The held counts once they stopped moving (closes travel a moment)."""
    last, deadline = None, time.monotonic() + 5
    while time.monotonic() < deadline:
        now = held_by(port, pids)
        if now == last:
            return now
        last = now
        time.sleep(seconds)
    return last


def frames_between(lines, t0: float, t1: float):
    return [d for d in lines if t0 <= d["ts"] <= t1]


def check_against_truth(port: int, pids: list[int], watch_args=()):
    with Watcher("--port", port, "--json", "--interval", 0.25, "--duration", 6, *watch_args) as w:
        w.started()
        conns = open_served(port, 17)
        truth1 = steady(port, pids)
        t1 = time.time()
        time.sleep(1.0)
        t1e = time.time()
        for c in conns[:6]:
            c.close()
        truth2 = steady(port, pids)
        t2 = time.time()
        time.sleep(1.0)
        t2e = time.time()
        code, lines, err = w.finish()
    assert code == 0, err
    assert sum(truth1.values()) == 17 and sum(truth2.values()) == 11
    for truth, a, b in ((truth1, t1, t1e), (truth2, t2, t2e)):
        frames = frames_between(lines, a + 0.3, b)
        assert frames, "no frame in the window"
        for d in frames:
            live = {x["pid"]: x["live_conns"] for x in d["workers"] if not x["child"]}
            assert live == {p: truth.get(p, 0) for p in live}, (live, truth)
            assert set(live) == set(pids)
    for c in conns[6:]:
        c.close()


def test_live_conns_equal_ground_truth_our_workers(netns, strategies):
    with group(workers=3) as sup:
        sup.start()
        sup.wait_ready()
        check_against_truth(sup.port, sorted(sup.pids().values()))


def test_live_conns_equal_ground_truth_nginx(netns, tmp_path, strategies):
    port = 18182
    with start_nginx(port, tmp_path, workers=3) as (_, workers):
        check_against_truth(port, sorted(workers))
