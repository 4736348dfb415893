"""least-conns (the fewest live connections, counted in the kernel) and
least-loaded under a stalled worker, on real processes in a netns."""
from __future__ import annotations

import select
import signal
import socket
import time

from conftest import bpf_objects
from nginx import nginx as start_nginx
from reuseport_ctl.kernel import children, diag
from reuseport_ctl.kernel.conns import held_by
from test_live_conns import HOST, KEEP, open_served, steady
from test_watch import group


def burst(port: int, n: int) -> list[socket.socket]:
    """n connections opened at once (non-blocking connects, then one request
    each): a reconnect storm, every SYN out before the first is answered."""
    cs = []
    for _ in range(n):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex((HOST, port))
        cs.append(c)
    for c in cs:
        select.select([], [c], [], 5)
        c.setblocking(True)
        c.settimeout(5)
        c.sendall(KEEP)
    for c in cs:
        assert c.recv(4096).startswith(b"HTTP/1.1 200")
    return cs


def within_one(counts, total, n=3):
    ideal = sorted([total // n + (1 if k < total % n else 0) for k in range(n)])
    return all(abs(a - b) <= 1 for a, b in zip(sorted(counts), ideal)) and \
        max(counts) - min(counts) <= 1


def test_17_over_3_and_a_reconnect_storm(netns):
    with group(workers=3, policy="least-conns") as sup:
        sup.start()
        sup.wait_ready()
        pids = sorted(sup.pids().values())
        conns = open_served(sup.port, 17)
        held = steady(sup.port, pids)
        assert sum(held.values()) == 17 and within_one(list(held.values()), 17), held
        # The Envoy complaint: one worker's clients all reconnect at once.
        slot_of = {}
        for c in conns:
            c.sendall(KEEP)
            head = c.recv(4096).decode()
            slot_of[c] = int(head.split("X-Worker: ")[1].split("\r")[0])
        victim = max(set(slot_of.values()), key=list(slot_of.values()).count)
        gone = [c for c in conns if slot_of[c] == victim]
        for c in gone:
            c.close()
        conns = [c for c in conns if c not in gone] + burst(sup.port, len(gone))
        held = steady(sup.port, pids)
        assert sum(held.values()) == 17 and within_one(list(held.values()), 17), held
        # ... and everyone at once.
        for c in conns:
            c.close()
        assert sum(steady(sup.port, pids).values()) == 0
        conns = burst(sup.port, 17)
        held = steady(sup.port, pids)
        assert sum(held.values()) == 17 and within_one(list(held.values()), 17), held
        for c in conns:
            c.close()


def test_attach_least_conns_on_nginx_then_detach_leaves_nothing(netns, tmp_path, cli):
    port = 18183
    before = bpf_objects()
    with start_nginx(port, tmp_path, workers=3) as (_, workers):
        cli("attach", "--port", port, "--policy", "least-conns", check=True)
        try:
            conns = open_served(port, 17)
            held = steady(port, workers)
            assert sum(held.values()) == 17 and within_one(list(held.values()), 17), held
            for c in conns:
                c.close()
            during = bpf_objects()
        finally:
            cli("detach", "--port", port, check=True)
    # what attach added (its program, maps and both tracepoint links) is
    # gone; only ours are compared: other tests load BPF objects meanwhile
    ours = [d - b for d, b in zip(during, before)]
    assert ours[2], "least-conns pinned no tracepoint link"
    deadline = time.monotonic() + 10
    while any(o & n for o, n in zip(ours, bpf_objects())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(o & n for o, n in zip(ours, bpf_objects()))


def test_least_loaded_sends_a_stalled_member_nothing_new(netns):
    """Worker 0 stopped: once its accept queue holds the connection that
    showed it (an idle member and a stopped one look alike until then),
    least-loaded chooses it no more; the others serve everything else."""
    with group(workers=3, policy="least-loaded") as sup:
        sup.start()
        sup.wait_ready()
        inode0 = [s.inode for s in diag.listeners(sup.port, "tcp")]
        pid0 = sup.pids()[0]
        sel0 = sup.selections()
        children.kill(pid0, signal.SIGSTOP)
        try:
            served = stuck = 0
            for _ in range(60):
                c = socket.create_connection((HOST, sup.port), timeout=5)
                c.settimeout(0.3)
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                try:
                    served += c.recv(4096).startswith(b"HTTP/1.1 200")
                except socket.timeout:
                    stuck += 1
                c.close()
            sel = [a - b for a, b in zip(sup.selections(), sel0)]
            queue0 = {s.inode: s.queue_len for s in diag.listeners(sup.port, "tcp")}
            import os
            q = queue0[os.fstat(sup.socks[0].fileno()).st_ino]
        finally:
            children.kill(pid0, signal.SIGCONT)
    assert sum(sel) == 60
    assert sel[0] <= 1 and q == sel[0] == stuck, (sel, q, stuck)
    assert served == 60 - stuck
