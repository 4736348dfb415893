"""A `run` group's policy is pinned as attach pins one, so `status` and
`watch` from another process see it (also through `ip netns exec`); the run
keeps the record current as workers restart and removes every pin when it
stops; a run killed outright leaves a stale pin the next verb removes;
attach and detach refuse a run's group in one sentence.

Real processes, each test in its own network namespace (the `netns`
fixture: setns, so the host's bpffs at /sys/fs/bpf)."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from reuseport_ctl import pins
from reuseport_ctl.kernel import netns as knetns
from test_run import EXE, start_run, stop_run
from test_workers import http_conn

PORT = 18081


def _pin_path(port: int = PORT, proto: str = "tcp"):
    return pins.pin_dir(proto, port, knetns.current_inode())


def _status(cli, *args, port: int = PORT):
    p = cli("status", "--port", port, *args)
    assert "Traceback" not in p.stderr
    return p


def _one_sentence(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_status_names_a_runs_policy_and_sigterm_unpins_it(netns, cli):
    p = start_run("--workers", 2, "--port", PORT, "--policy", "round-robin", "--json")
    try:
        for _ in range(10):
            http_conn("127.0.0.1", PORT)
        st = json.loads(_status(cli, "--json").stdout)
        assert st["policy"] == "round-robin" and st["kind"] == "ebpf"
        assert st["in_force"] is True and st["divergence"] is None
        assert st["owner"] == {"verb": "run", "pid": p.pid, "alive": True}
        assert [s["selections"] for s in st["slots"]] == [5, 5]
        assert st["hints"] == {}              # no detach / follow hint: both are refused
        text = _status(cli).stdout
        assert f"attached by reuseport-ctl run (pid {p.pid})" in " ".join(text.split())
        # through `ip netns exec` (a fresh /sys, no bpffs: an ancestor's is used)
        via = subprocess.run(["ip", "netns", "exec", netns, EXE, "status", "--port", str(PORT),
                              "--json"], capture_output=True, text=True, timeout=60)
        assert via.returncode == 0, via.stderr
        assert json.loads(via.stdout)["owner"]["pid"] == p.pid
        # every pin on the machine: this one, owned by the run
        every = json.loads(cli("status", "--json", check=True).stdout)
        mine = [x for x in every["pins"] if x["pinned"] == str(_pin_path())]
        assert mine and mine[0]["owner"]["pid"] == p.pid and mine[0]["state"] == "here"
    finally:
        rep = stop_run(p, signal.SIGTERM)
    assert rep["selections"] == [5, 5]
    assert not _pin_path().exists()
    assert not _pin_path().parent.exists()    # the namespace's directory went too
    _one_sentence(_status(cli), "no reuseport-ctl policy is attached")


def test_watch_from_another_process_reports_the_policy_in_force(netns, cli):
    p = start_run("--workers", 2, "--port", PORT, "--policy", "round-robin", "--json")
    try:
        w = subprocess.run(["ip", "netns", "exec", netns, EXE, "watch", "--port", str(PORT),
                            "--json", "--duration", "2"], capture_output=True, text=True,
                           timeout=90)
        assert w.returncode == 0, w.stderr
        last = json.loads(w.stdout.strip().splitlines()[-1])
        assert last["policy"] == "round-robin"
        assert last["policy_in_force"] is True and last["policy_note"] is None
        assert last["policy_owner"] == {"verb": "run", "pid": p.pid, "alive": True}
        # the dashboard's header names the run too
        d = subprocess.run(["ip", "netns", "exec", netns, EXE, "watch", "--port", str(PORT),
                            "--duration", "1"], capture_output=True, text=True, timeout=90)
        assert d.returncode == 0, d.stderr
        assert f"policy round-robin (run pid {p.pid})" in d.stdout + d.stderr
    finally:
        stop_run(p, signal.SIGINT)
    assert not _pin_path().exists()


@pytest.mark.parametrize("verb", ["attach", "detach"])
def test_attach_and_detach_refuse_a_runs_group(netns, cli, verb):
    p = start_run("--workers", 2, "--port", PORT, "--policy", "hash", "--json")
    try:
        args = ["--policy", "round-robin"] if verb == "attach" else []
        line = _one_sentence(cli(verb, "--port", PORT, *args),
                             "steered by `reuseport-ctl run`", f"pid {p.pid}", "policy hash")
        assert line.count(". ") == 0          # one sentence
        if verb == "detach":                  # --force is refused the same way
            _one_sentence(cli("detach", "--port", PORT, "--force"), f"pid {p.pid}")
        st = json.loads(_status(cli, "--json").stdout)
        assert st["policy"] == "hash" and st["in_force"] is True   # left as it was
    finally:
        stop_run(p)
    assert not _pin_path().exists()


def test_a_restarted_worker_is_recorded(netns, cli):
    p = start_run("--workers", 2, "--port", PORT, "--policy", "round-robin", "--json")
    try:
        old = pins.read_meta(_pin_path())
        assert [s["slot"] for s in old.slots] == [0, 1]
        victim = old.slots[0]["pid"]
        assert victim != p.pid                # the worker's pid, not the run's
        subprocess.run(["kill", "-KILL", str(victim)], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = pins.read_meta(_pin_path())
            if now.slots[0]["pid"] != victim:
                break
            time.sleep(0.05)
        assert now.slots[0]["pid"] != victim
        assert now.slots[0]["inode"] == old.slots[0]["inode"]   # the same socket
        assert now.slots[1] == old.slots[1]
        st = json.loads(_status(cli, "--json").stdout)
        assert st["in_force"] is True
        assert st["slots"][0]["pid"] == now.slots[0]["pid"]
    finally:
        stop_run(p)
    assert not _pin_path().exists()


def _killed_run(policy: str = "round-robin") -> int:
    p = start_run("--workers", 2, "--port", PORT, "--policy", policy, "--json")
    assert _pin_path().is_dir()
    p.kill()                                  # SIGKILL: no chance to unpin
    p.communicate(timeout=30)
    assert _pin_path().is_dir()               # left behind
    return p.pid


def test_after_sigkill_status_removes_the_stale_pin(netns, cli):
    pid = _killed_run()
    _one_sentence(_status(cli), "no reuseport-ctl policy is attached", "stale pin",
                  f"run pid {pid}")
    assert not _pin_path().exists()


def test_after_sigkill_attach_removes_the_stale_pin(netns, cli):
    pid = _killed_run("least-conns")
    # a new group on the port, by a run that pins nothing (policy kernel)
    q = start_run("--workers", 2, "--port", PORT, "--json")
    try:
        assert not _pin_path().exists() or pins.read_meta(_pin_path()).owner["pid"] == pid
        out = json.loads(cli("attach", "--port", PORT, "--policy", "drain:0", "--json",
                             check=True).stdout)
        assert "stale pin" in out["note"] and f"run pid {pid}" in out["note"]
        meta = pins.read_meta(_pin_path())
        assert meta.policy == "drain:0" and meta.owner is None
        cli("detach", "--port", PORT, check=True)
    finally:
        stop_run(q)
    assert not _pin_path().exists()


def test_policy_kernel_pins_nothing_and_a_cbpf_udp_run_is_pinned(netns, cli):
    p = start_run("--workers", 2, "--port", PORT, "--json")
    try:
        assert not _pin_path().exists()
        _one_sentence(_status(cli), "no reuseport-ctl policy is attached")
    finally:
        stop_run(p)
    q = start_run("--workers", 2, "--port", PORT, "--proto", "udp", "--policy", "mod", "--json")
    try:
        st = json.loads(_status(cli, "--proto", "udp", "--json").stdout)
        assert st["policy"] == "mod" and st["kind"] == "cbpf" and st["owner"]["pid"] == q.pid
        assert not _pin_path().exists()       # the tcp port has none
    finally:
        stop_run(q, signal.SIGHUP)
    assert not _pin_path(proto="udp").exists()


@pytest.mark.parametrize("how", [["--duration", "1"], ["--load", "40"]])
def test_a_run_that_ends_by_itself_leaves_no_pin(netns, cli, how):
    p = cli("run", "--workers", 2, "--port", PORT, "--policy", "round-robin", "--json", *how,
            check=True)
    rep = json.loads(p.stdout)
    if "--load" in how:
        assert rep["selections"] == [20, 20]
    assert not _pin_path().exists()
    _one_sentence(_status(cli), "no reuseport-ctl policy is attached")


def test_a_new_run_replaces_the_pins_of_a_gone_group(netns, cli):
    # an attach pin whose group is gone (its server stopped; nobody detached)
    p = start_run("--workers", 2, "--port", PORT, "--json")
    cli("attach", "--port", PORT, "--policy", "drain:0", check=True)
    stop_run(p)
    assert pins.read_meta(_pin_path()).policy == "drain:0"
    q = cli("run", "--workers", 2, "--port", PORT, "--policy", "hash", "--duration", "1",
            "--json", check=True)
    assert "removed the pins of drain:0" in q.stderr and "Traceback" not in q.stderr
    assert not _pin_path().exists()
    # a killed run's stale pin: the next run removes it too
    pid = _killed_run()
    q = cli("run", "--workers", 2, "--port", PORT, "--policy", "hash", "--duration", "1",
            "--json", check=True)
    assert f"stale pin (round-robin of reuseport-ctl run pid {pid})" in q.stderr
    assert not _pin_path().exists()
