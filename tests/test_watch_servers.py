"""`watch` against the server shapes operators run, each in its own network
namespace: HAProxy with a thread per SO_REUSEPORT socket (checked against
HAProxy's own per-thread counters), a threaded server written here, a
dispatcher written here and Node's cluster (one listener, connections handed
to children), and a watch started in the middle of a steady load (every
probe's total against the load client's own count over the same window)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reuseport_ctl.kernel import owners
from reuseport_ctl.load.client import run_load
from reuseport_ctl.policies import Policy
from reuseport_ctl.probes.strategy import Strategy
from reuseport_ctl.watching import ForeignSource, Watch
from reuseport_ctl.workers.supervisor import RunConfig, Supervisor
from servers import dispatcher, haproxy, hold_connections, threaded_server
from test_watch import HOST, Watcher, check_line


def haproxy_thread(row: dict, pid: int) -> int:
    """HAProxy's number (1-based) for the thread serving a member row: its
    thread 1 runs on the main thread (tid == pid), thread 2 on the other."""
    assert len(row["tids"]) == 1, row
    return 1 if row["tids"][0] == pid else 2


def watch_lines(port: int, load, *args) -> list[dict]:
    """Run `watch --json` around load() (once the probes are attached), and
    return its lines, the last one taken after load() returned."""
    with Watcher("--port", port, "--json", "--interval", 0.5, *args) as w:
        w.started()
        load()
        time.sleep(1.2)                     # at least one line after the load
        code, lines, err = w.finish(signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    return lines


# --- HAProxy: one process, a thread per socket --------------------------------------------------

def test_haproxy_threads_are_members_with_haproxys_own_counts(netns, tmp_path, cli,
                                                              strategies):
    """nbthread 2 + shards by-thread: two members in one process; each
    member's accepts equal the accepted connections HAProxy counts for the
    thread that serves it (`show activity`, exact); both threads' wakeups
    are counted; drain:0 then leaves member 0 at 0."""
    if strategies["wakeups"].name == "none":
        pytest.skip(f"no wakeup probe: {strategies['wakeups'].reason}")
    port, n, n2 = 18601, 400, 200
    with haproxy(port, tmp_path) as h:
        pid = h.p.pid
        got_threads = {}

        def load(count):
            def go():
                before = h.accepted()
                assert run_load(HOST, port, "tcp", conns=count, concurrency=4).ok == count
                after = h.accepted()
                # the second query is one more connection on thread 1
                got_threads["delta"] = [after[0] - before[0] - 1, after[1] - before[1]]
            return go

        lines = watch_lines(port, load(n))
        last = lines[-1]
        check_line(last, port, "tcp")
        assert last["group_size"] == 2 and len(last["workers"]) == 2
        assert {x["pid"] for x in last["workers"]} == {pid}
        assert sorted(x["slot"] for x in last["workers"]) == [0, 1]
        delta = got_threads["delta"]
        assert sum(delta) == n
        by_thread = {haproxy_thread(x, pid): x for x in last["workers"]}
        assert sorted(by_thread) == [1, 2]
        assert {t: x["accepts"] for t, x in by_thread.items()} == {1: delta[0], 2: delta[1]}
        assert all(x["wakeups"] > 0 for x in last["workers"]), last["workers"]
        assert last["accepts"] == n == last["lookups"]

        cli("attach", "--port", port, "--policy", "drain:0", check=True)
        try:
            lines = watch_lines(port, load(n2))
        finally:
            cli("detach", "--port", port, check=True)
        last = lines[-1]
        assert last["policy"] == "drain:0"
        rows = {x["slot"]: x for x in last["workers"]}
        assert (rows[0]["accepts"], rows[1]["accepts"]) == (0, n2)
        delta = got_threads["delta"]
        assert delta[haproxy_thread(rows[0], pid) - 1] == 0
        assert delta[haproxy_thread(rows[1], pid) - 1] == n2


# --- a threaded server written here ------------------------------------------------------------

@pytest.mark.parametrize("wakeups", ["raw_tracepoint", "tracepoint"])
def test_a_threaded_server_has_a_row_per_thread_socket(netns, strategies, wakeups):
    """One Python process, a SO_REUSEPORT socket and a blocking accept() per
    thread: one row per socket, labelled with its thread before any traffic
    (the thread blocked on it) and after; exact accepts per thread (each
    answer names its thread); wakeups counted for every thread, with the raw
    tracepoint (filtered by tgid) and with tracefs (filtered by every tid)."""
    if strategies["wakeups"].name == "none":
        pytest.skip(f"no wakeup probe: {strategies['wakeups'].reason}")
    port, threads, n = 18610, 3, 300
    chosen = dict(strategies, wakeups=Strategy(wakeups, "forced by the test"))
    with threaded_server(port, threads) as p:
        tids = [t for t in owners.thread_ids(p.pid) if t != p.pid]
        with Watch(ForeignSource(port, "tcp", None, None), 0.5, as_json=True,
                   strategies=chosen) as w:
            assert w.session.strategies["wakeups"].name == wakeups
            w.ndjson.out = open(os.devnull, "w")
            first = w.frame.rows
            assert len(first) == threads and {r.pid for r in first} == {p.pid}
            assert sorted(t for r in first for t in r.tids) == sorted(tids)
            r = run_load(HOST, port, "tcp", conns=n, concurrency=threads)
            assert r.ok == n
            time.sleep(0.3)
            w.tick(wait=False)
            rows = w.frame.rows
    assert [len(x.tids) for x in rows] == [1] * threads
    assert {str(x.tids[0]): x.accepts for x in rows} == \
        {t: r.per_worker.get(t, 0) for t in map(str, tids)}
    assert sum(x.accepts for x in rows) == n
    for x in rows:
        assert 0 < x.wakeups <= x.accepts, (x.tids, x.wakeups, x.accepts)


# --- dispatchers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["python", "node"])
def test_a_dispatcher_is_named_with_each_childs_connections(netns, tmp_path, strategies, kind):
    """The parent accepts and hands each connection to a child (SCM_RIGHTS;
    Node's cluster in its default round-robin mode does the same): the group
    is named a dispatcher, not a shared listener; the acceptor's accepts are
    the kernel's count; each child's connections now are what it holds (its
    fd table), equal to what the client saw it answer; each child's
    cumulative accepts are null, not a guess, and so is the fairness."""
    port, children, m = 18620, 3, 9
    with dispatcher(port, children, kind, tmp_path) as p:
        held = {}

        def load():
            socks, per = hold_connections(port, m)
            held["socks"], held["per"] = socks, per
        try:
            lines = watch_lines(port, load)
        finally:
            for s in held.get("socks", ()):
                s.close()
    last = lines[-1]
    assert last["dispatcher"] is True and last["reuseport"] is False
    acceptor = [x for x in last["workers"] if not x["child"]]
    kids = {x["pid"]: x for x in last["workers"] if x["child"]}
    assert [(x["pid"], x["accepts"]) for x in acceptor] == [(p.pid, m)]
    assert {pid: x["conns"] for pid, x in kids.items() if x["conns"]} == held["per"]
    assert len(held["per"]) > 1                     # handed out to several children
    assert all(x["accepts"] is None and x["slot"] is None for x in kids.values())
    assert last["jain"] is None and last["max_min_ratio"] is None
    assert last["group_size"] == 1


# --- the common start -------------------------------------------------------------------------------

CLIENT = r"""
import socket, sys, time
port, rate, secs = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
t0, k = time.monotonic(), 0
while time.monotonic() - t0 < secs:
    wait = t0 + k / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    c = socket.create_connection(("127.0.0.1", port))
    print(f"{time.time():.6f}", flush=True)       # the handshake is done: looked up, queued
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    while c.recv(4096):
        pass
    c.close()
    k += 1
"""


def test_every_total_starts_when_the_watch_does(netns, strategies):
    """A watch started during a steady load: on its first line, lookups,
    data-ready, accepts (accept() returns, --spurious) and wakeups each equal
    the connections the client made in the line's window (from the common
    baseline to the read), within 1 %. Blocking accept() by idle workers
    (exclusive waiters) makes exactly one wakeup per connection and no
    EAGAIN, so every probe has the same ground truth."""
    if strategies["wakeups"].name == "none":
        pytest.skip(f"no wakeup probe: {strategies['wakeups'].reason}")
    cfg = RunConfig(workers=3, port=0, model="shared-accept", policy=Policy("kernel"))
    with Supervisor(cfg) as sup:
        sup.start()
        sup.wait_ready()
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(sup.port), "200", "60"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)                 # the load is steady before the watch begins
            with Watcher("--port", sup.port, "--json", "--interval", 2, "--spurious") as w:
                w.started()
                deadline = time.monotonic() + 30
                line = b""
                while not line.endswith(b"\n") and time.monotonic() < deadline:
                    line += w.p.stdout.readline()
                code, lines, err = w.finish(signal.SIGTERM)
        finally:
            client.kill()
            out, _ = client.communicate()
    import json
    first = json.loads(line)
    assert code == 128 + signal.SIGTERM, err
    stamps = [float(x) for x in out.split()]
    start, end = first["ts"] - first["elapsed"], first["ts"]
    truth = sum(1 for t in stamps if start < t <= end)
    assert truth >= 100, (truth, first["elapsed"])  # a real load over the window
    assert stamps[0] < start - 1                    # it began well before the watch
    got = {k: first[k] for k in ("lookups", "data_ready", "accepts", "wakeups")}
    for k, v in got.items():
        assert abs(v - truth) <= 0.01 * truth, (k, v, truth, got)
    assert sum(x["spurious_wakeups"] for x in first["workers"]) == 0


def test_attach_and_status_name_each_members_thread(netns, cli):
    """The same group model in every verb: attach and status label each
    member of a threaded server with the thread that serves it, as watch
    does, and number the members alike."""
    port, threads = 18611, 3
    with threaded_server(port, threads) as p:
        tids = sorted(t for t in owners.thread_ids(p.pid) if t != p.pid)
        a = json.loads(cli("attach", "--port", port, "--policy", "round-robin", "--json",
                           check=True).stdout)
        try:
            assert sorted(t for s in a["slots"] for t in s["tids"]) == tids
            assert all(len(s["tids"]) == 1 for s in a["slots"])
            st = json.loads(cli("status", "--port", port, "--json", check=True).stdout)
            assert [(s["slot"], s["tids"]) for s in st["slots"]] == \
                [(s["slot"], s["tids"]) for s in a["slots"]]
            text = cli("status", "--port", port, check=True).stdout
            assert "pid [threads]" in text and f"[{a['slots'][0]['tids'][0]}]" in text
        finally:
            cli("detach", "--port", port, check=True)
