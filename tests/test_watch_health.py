"""Member health in `watch`: a member whose process is stopped is named
within two intervals and its drops are counted (the kernel's sk_drops); a
process outside the server that joins the group is named; the same figures
reach NDJSON."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_watch import Watcher, group

from reuseport_ctl.load.client import run_load
from reuseport_ctl.policies import Policy
from reuseport_ctl.workers.supervisor import RunConfig, Supervisor

INTERVAL = 0.5


def lines_until(w: Watcher, ok, seconds: float = 20.0) -> list[dict]:
    """NDJSON lines as they come, until ok(line) holds for one (or time's up)."""
    import json
    import select
    got, buf = [], b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not select.select([w.p.stdout], [], [], 0.2)[0]:
            continue
        chunk = os.read(w.p.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            got.append(json.loads(line))
            if ok(got[-1]):
                return got
    raise AssertionError(f"never seen; last line: {got[-1] if got else None}")


def test_a_stopped_member_is_named_within_two_intervals_with_its_drops(netns):
    sup = Supervisor(RunConfig(workers=3, port=0, backlog=4, policy=Policy("kernel")))
    w = None
    try:
        sup.start()
        sup.wait_ready()
        w = Watcher("--port", sup.port, "--json", "--interval", INTERVAL)
        w.started()
        first = lines_until(w, lambda d: True)[-1]
        victim = first["workers"][1]
        os.kill(victim["pid"], signal.SIGSTOP)
        # Nobody takes the stopped member's share: its accept queue (4) fills
        # and the kernel drops the handshakes that follow.
        run_load("127.0.0.1", sup.port, "tcp", conns=150, concurrency=16, timeout=0.3)
        seen = lines_until(w, lambda d: any(r["stopped"] and r["drops"] for r in d["workers"]))
        row = next(r for r in seen[-1]["workers"] if r["stopped"])
        assert (row["slot"], row["pid"]) == (victim["slot"], victim["pid"])
        assert row["stuck"] and row["drops"] > 0 and row["queue_len"] >= 4
        warn = [x for x in seen[-1]["warnings"] if f"pid {victim['pid']}" in x]
        assert warn and "is stopped" in warn[0]
        # named within 2 intervals of the stop (plus the first line's wait)
        first_named = next(i for i, d in enumerate(seen)
                           if any(r["stopped"] for r in d["workers"]))
        assert first_named <= 2, [d["elapsed"] for d in seen]
        others = [r for r in seen[-1]["workers"] if r["pid"] != victim["pid"]]
        assert not any(r["stuck"] or r["stopped"] for r in others)
        assert seen[-1]["drops"] == sum(r["drops"] for r in seen[-1]["workers"])
        os.kill(victim["pid"], signal.SIGCONT)
        well = lines_until(w, lambda d: not d["warnings"])      # drops no longer grow
        assert not any(r["stuck"] for r in well[-1]["workers"])
        assert next(r for r in well[-1]["workers"] if r["pid"] == victim["pid"])["drops"] \
            >= row["drops"]                                       # the total stays
    finally:
        if w is not None:
            w.kill()
        for pid in sup.pids().values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        sup.stop()


JOINER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_process_outside_the_server_joining_the_group_is_named(netns, tmp_path):
    with group("tcp", workers=2) as sup:
        sup.start()
        sup.wait_ready()
        with Watcher("--port", sup.port, "--json", "--interval", INTERVAL) as w:
            w.started()
            lines_until(w, lambda d: len(d["workers"]) == 2)
            # an unrelated process: its parent exits at once (setsid -f), so it
            # is in no tree of the group's holders -- like `nginx -t` from a shell
            script = tmp_path / "joiner.py"
            script.write_text(JOINER)
            pidfile = tmp_path / "pid"
            subprocess.run(["sh", "-c", f"setsid -f sh -c 'echo $$ > {pidfile}; exec "
                                        f"{sys.executable} {script} {sup.port}' "
                                        f">/dev/null 2>&1"], check=True)
            deadline = time.monotonic() + 10
            while not (pidfile.exists() and pidfile.read_text().strip()):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            joiner = int(pidfile.read_text())
            try:
                seen = lines_until(w, lambda d: any(r["outside"] for r in d["workers"]))
                rows = seen[-1]["workers"]
                out = [r for r in rows if r["outside"]]
                assert [r["pid"] for r in out] == [joiner]
                assert "outside the server (session" in out[0]["outside"]
                assert any(f"pid {joiner}" in x and "outside" in x
                           for x in seen[-1]["warnings"])
                assert len(rows) == 3 and sum(1 for r in rows if not r["outside"]) == 2
            finally:
                os.kill(joiner, signal.SIGKILL)


def test_a_sick_member_of_our_own_group_is_named_too(netns):
    """run --watch's source (our own workers) reports the same health."""
    from reuseport_ctl.watching.sources import OwnSource
    sup = Supervisor(RunConfig(workers=2, port=0, policy=Policy("kernel")))
    try:
        sup.start()
        sup.wait_ready()
        pid = sup.pids()[0]
        os.kill(pid, signal.SIGSTOP)
        rows = OwnSource(sup).find()
        assert rows[0].state == "T" and rows[1].state in ("S", "R")
        assert all(r.drops == 0 for r in rows)
    finally:
        for p in sup.pids().values():
            os.kill(p, signal.SIGCONT)
        sup.stop()

