"""`reuseport-ctl run` as a user runs it: the real binary, real signals."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from reuseport_ctl.kernel.sockets import port_holders
from reuseport_ctl.verify.isolation import as_nobody
from test_workers import http_conn

EXE = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) or "reuseport-ctl"
NOBODY = 65534


def start_run(*args) -> subprocess.Popen:
    """Start `reuseport-ctl run ...` and return once it says its workers are ready."""
    p = subprocess.Popen([EXE, "run", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0)
    deadline, said = time.monotonic() + 60, b""
    while b"workers ready" not in said:
        left = deadline - time.monotonic()
        chunk = os.read(p.stderr.fileno(), 4096) if left > 0 and \
            select.select([p.stderr], [], [], left)[0] else b""
        if not chunk:
            p.kill()
            raise AssertionError(f"run never got ready: {said + p.communicate()[1]!r}")
        said += chunk
    return p


def stop_run(p: subprocess.Popen, sig=signal.SIGTERM) -> dict:
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err        # the summary, then the shell's 128 + N
    return json.loads(out)


def _squatter(proto: str, port: int, reuseport: bool):
    """A socket on the port held by a child running as nobody, until the
    returned release() (verify's as_nobody)."""
    def bind():
        s = socket.socket(type=socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
        s.bind(("127.0.0.1", port))
        if proto == "tcp":
            s.listen()
        bind.keep = s
        return {"port": port}
    got, release = as_nobody(bind, hold=True)
    assert got == {"port": port}, got
    return release


# --- output -------------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_json_with_load(netns, cli, proto):
    p = cli("run", "--workers", 4, "--proto", proto, "--load", 300, "--json", check=True)
    rep = json.loads(p.stdout)
    assert {"model", "policy", "proto", "workers", "max_min_ratio", "jain", "load",
            "selections"} <= set(rep)
    assert (rep["model"], rep["policy"], rep["proto"]) == ("reuseport", "kernel", proto)
    assert [w["slot"] for w in rep["workers"]] == [0, 1, 2, 3]
    for w in rep["workers"]:
        assert {"slot", "pid", "count", "share", "requests", "eagain", "restarts"} <= set(w)
        assert w["count"] == w["accepts" if proto == "tcp" else "datagrams"]
    assert sum(w["count"] for w in rep["workers"]) == 300 == rep["load"]["ok"]
    assert 0.25 <= rep["jain"] <= 1.0
    assert rep["max_min_ratio"] is None or rep["max_min_ratio"] >= 1.0
    assert rep["selections"] is None                          # the kernel's own hash


def test_summary_table(netns, cli):
    p = cli("run", "--workers", 2, "--load", 100, "--model", "dispatcher", check=True)
    out = p.stdout
    for word in ("slot", "share", "eagain", "restarts", "Jain", "max:min", "acceptor"):
        assert word in out
    assert "load: 100/100 ok" in out
    assert "50" in out                                      # round-robin: 50 each


def test_ipv6_load(netns, cli):
    p = cli("run", "--workers", 2, "--host", "::1", "--load", 100, "--json", check=True)
    rep = json.loads(p.stdout)
    assert rep["host"] == "::1" and rep["total"] == 100


def test_duration_ends_the_run(netns, cli):
    p = cli("run", "--workers", 2, "--duration", 0.3, "--json", check=True)
    rep = json.loads(p.stdout)
    assert rep["total"] == 0 and len(rep["workers"]) == 2


# --- stopping and restarting --------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything_and_frees_the_port(netns, sig):
    p = start_run("--workers", 3, "--port", 8080, "--json")
    kids = psutil.Process(p.pid).children(recursive=True)
    assert len(kids) == 3
    for _ in range(10):
        http_conn("127.0.0.1", 8080)
    rep = stop_run(p, sig)
    assert rep["total"] == 10
    assert not any(k.is_running() for k in kids)
    assert port_holders("tcp", 8080) == []
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # our own TIME_WAITs
        s.bind(("127.0.0.1", 8080))
        s.listen()


def test_killed_worker_is_restarted_under_load(netns):
    p = start_run("--workers", 4, "--port", 8080, "--json")
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            try:
                http_conn("127.0.0.1", 8080)
            except (OSError, AssertionError):     # the victim's connections may reset
                pass
    bg = threading.Thread(target=hammer)
    bg.start()
    try:
        slot, victim = http_conn("127.0.0.1", 8080)[0]
        os.kill(victim, signal.SIGKILL)
        new = victim
        for _ in range(5000):                     # until its slot answers from a new pid
            s, pid = http_conn("127.0.0.1", 8080)[0]
            if s == slot and pid != victim:
                new = pid
                break
        served = [http_conn("127.0.0.1", 8080)[0][0] for _ in range(40)]
    finally:
        stop.set()
        bg.join()
    rep = stop_run(p)
    assert new != victim
    w = rep["workers"][slot]
    assert w["restarts"] == 1 and w["pid"] == new
    assert sum(x["restarts"] for x in rep["workers"]) == 1
    assert len(set(served)) > 1                   # the group keeps serving, on every slot


def test_user_nobody(netns):
    p = start_run("--workers", 2, "--port", 8080, "--user", "nobody", "--json")
    try:
        pids = {http_conn("127.0.0.1", 8080)[0][1] for _ in range(20)}
        uids = {u for pid in pids for u in psutil.Process(pid).uids()}
        holders = port_holders("tcp", 8080)
    finally:
        rep = stop_run(p)
    assert uids == {NOBODY}
    assert len(holders) == 2 and {h.uid for h in holders} == {NOBODY}     # the group's uid
    assert rep["user"] == "nobody"


# --- refusals -----------------------------------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_port_owned_by_another_uid(netns, cli, proto):
    release = _squatter(proto, 8080, reuseport=True)
    try:
        p = cli("run", "--workers", 2, "--port", 8080, "--proto", proto, "--duration", 1)
    finally:
        release()
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "reuseport-ctl: port 8080 is owned by uid 65534; the kernel's SO_REUSEPORT "
        "anti-hijack rule forbids another user from joining its group.")


def test_port_in_use_without_reuseport(netns, cli):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 8080))
        s.listen()
        p = cli("run", "--workers", 2, "--port", 8080, "--duration", 1)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"reuseport-ctl: port 8080 is in use by a socket without "
                                f"SO_REUSEPORT (pid {os.getpid()}).")


def test_same_uid_group_is_not_joined_silently(netns, cli):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 8080))
        s.listen()
        p = cli("run", "--workers", 2, "--port", 8080, "--duration", 1)
    assert p.returncode == 1 and "already served by a SO_REUSEPORT group" in p.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("cpus, want", [("none", "all"), ("auto", "own"), (None, "own")])
def test_cpus_pins_or_leaves_the_workers(netns, cpus, want):
    """By default (and with auto) worker k runs on one CPU; --cpus none
    leaves every worker free to run on any CPU this process may use."""
    args = ["--workers", 2, "--port", 0, "--duration", 30]
    if cpus is not None:
        args += ["--cpus", cpus]
    p = start_run(*args)
    try:
        kids = psutil.Process(p.pid).children()
        assert len(kids) == 2
        allowed = [set(k.cpu_affinity()) for k in kids]
        if want == "all":
            assert allowed == [os.sched_getaffinity(0)] * 2
        else:
            assert all(len(a) == 1 for a in allowed) and allowed[0] != allowed[1]
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)


@pytest.mark.parametrize("args, msg", [
    (["--workers", 0], "--workers must be at least 1"),
    (["--cpus", "x"], "bad CPU list"),
    (["--cpus", "99"], "CPU 99 is not online"),
    (["--cpus", "none", "--policy", "cpu"], "needs pinned workers"),
    (["--user", "no-such-user-here"], "unknown user"),
    (["--policy", "bogus"], "unknown policy"),
    (["--load", 0], "--load must be at least 1"),
    (["--host", "10.99.0.1"], "not on any interface"),
    (["--model", "shared-accept", "--policy", "round-robin"], "use --model reuseport"),
])
def test_bad_input_is_one_sentence(netns, cli, args, msg):
    p = cli("run", "--duration", 1, *args)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reuseport-ctl: ") and msg in lines[0]
