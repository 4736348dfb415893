"""`watch` while a real nginx (3 workers, reuseport) loses a worker to
SIGKILL and its master respawns one that inherits the same listening socket,
each in its own network namespace. nginx's own access log ($pid per request)
and the X-Worker header the load client counts are the ground truth.

A row is a member socket: a socket that changes process keeps its row, its
slot and its counts (the connections of both processes: 'moved', not
left + joined); --pid of the killed worker does not lose the socket nor make
the healthy workers outsiders."""
from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter

from nginx import access_log_pids, nginx as start_nginx, respawned
from reuseport_ctl.groups import find_group
from reuseport_ctl.load.client import run_load
from test_watch import HOST, Watcher, check_line, scrape

N = 300             # connections per load, before and after the kill


def sockets_of(port: int) -> dict[int, int]:
    """serving pid -> its member socket's inode."""
    return {m.pid: m.inode for m in find_group(port, "tcp").members}


def kill_and_load(port: int, master: int, workers: list[int], victim: int):
    """Load N; SIGKILL victim; wait for the respawn; load N again. The
    replacement's pid and both loads' per-worker counts (X-Worker)."""
    r1 = run_load(HOST, port, "tcp", conns=N, concurrency=4)
    assert r1.ok == N
    time.sleep(0.6)                     # a frame with the victim serving
    os.kill(victim, signal.SIGKILL)
    now = respawned(master, workers, port)
    (replacement,) = set(now) - set(workers)
    time.sleep(0.6)                     # a frame with the replacement serving
    r2 = run_load(HOST, port, "tcp", conns=N, concurrency=4)
    assert r2.ok == N
    time.sleep(1.2)                     # at least one frame after the load
    client = Counter({int(k): v for k, v in r1.per_worker.items()})
    client.update({int(k): v for k, v in r2.per_worker.items()})
    return replacement, dict(client)


def check_against_truth(lines, port, before, victim, replacement, truth):
    """Every line: 3 members, slots fixed per socket, no left/joined, no
    warning; the last: per socket, the requests of every pid that served it."""
    vino = before[victim]
    slots = {x["inode"]: x["slot"] for x in lines[0]["workers"]}
    assert set(slots) == set(before.values())
    for d in lines:
        check_line(d, port, "tcp")
        assert d["group_size"] == 3, d
        assert {x["inode"]: x["slot"] for x in d["workers"]} == slots     # stable slots
        assert d["left"] == [] and d["joined"] == [], d
        assert d["warnings"] == [], d["warnings"]
        assert all(x["outside"] is None for x in d["workers"])
    moves = [m for d in lines for m in d["moved"]]
    assert moves and {m["inode"] for m in moves} == {vino}, moves
    assert moves[0]["was"] == victim and moves[-1]["pid"] == replacement
    assert all(m["slot"] == slots[vino] for m in moves)
    last = lines[-1]
    rows = {x["inode"]: x for x in last["workers"]}
    assert rows[vino]["pid"] == replacement
    want = {ino: truth.get(pid, 0) for pid, ino in before.items()}
    want[vino] += truth.get(replacement, 0)
    assert {ino: x["accepts"] for ino, x in rows.items()} == want
    assert last["accepts"] == last["lookups"] == 2 * N


def test_pid_of_a_worker_that_is_killed_keeps_following_the_group(netns, tmp_path,
                                                                  strategies):
    """--pid names a worker; the worker is killed and respawned: the watch
    goes on with all 3 sockets (the victim's now served by its replacement),
    every connection accounted for, and no healthy worker is an outsider."""
    port = 18191
    with start_nginx(port, tmp_path, workers=3, access_log=True) as (p, workers):
        before = sockets_of(port)
        (tmp_path / "access.log").write_text("")    # the launcher's own probe requests
        assert sorted(before) == workers
        victim = workers[0]
        with Watcher("--port", port, "--pid", victim, "--json", "--interval", 0.5) as w:
            w.started()
            replacement, client = kill_and_load(port, p.pid, workers, victim)
            code, lines, err = w.finish(signal.SIGTERM)
        assert sockets_of(port)[replacement] == before[victim]    # it inherited the socket
        truth = access_log_pids(tmp_path)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert truth == client and sum(truth.values()) == 2 * N
    check_against_truth(lines, port, before, victim, replacement, truth)


def test_a_respawned_worker_takes_over_its_socket_row(netns, tmp_path, strategies):
    """Without --pid, the same kill: the socket's row keeps its slot and its
    counts (both processes' requests), one 'moved' event names the new pid,
    and the Prometheus series of the socket goes on (its labels do not carry
    the pid; reuseport_ctl_worker_process says which pid serves it)."""
    port = 18192
    with start_nginx(port, tmp_path, workers=3, access_log=True) as (p, workers):
        before = sockets_of(port)
        (tmp_path / "access.log").write_text("")    # the launcher's own probe requests
        victim = workers[1]
        with Watcher("--port", port, "--json", "--interval", 0.5,
                     "--prometheus", "127.0.0.1:0") as w:
            said = w.started()
            url = re.search(r"Prometheus metrics on (http://\S+/metrics)", said).group(1)
            replacement, client = kill_and_load(port, p.pid, workers, victim)
            fams = scrape(url)
            code, lines, err = w.finish(signal.SIGTERM)
        truth = access_log_pids(tmp_path)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert truth == client and sum(truth.values()) == 2 * N
    check_against_truth(lines, port, before, victim, replacement, truth)
    slot = {x["inode"]: x["slot"] for x in lines[-1]["workers"]}
    acc = {(s.labels["worker"], s.labels["inode"]): s.value
           for s in fams["reuseport_ctl_worker_accepts"].samples
           if s.name == "reuseport_ctl_worker_accepts_total"}
    assert all(s.labels.get("pid", "") == "" for s in fams["reuseport_ctl_worker_accepts"].samples)
    assert sum(acc.values()) == 2 * N
    assert acc[(str(slot[before[victim]]), str(before[victim]))] == \
        truth[victim] + truth[replacement]
    served = {s.labels["inode"]: s.labels["pid"]
              for s in fams["reuseport_ctl_worker_process"].samples}
    assert served[str(before[victim])] == str(replacement)
    assert len(served) == 3
