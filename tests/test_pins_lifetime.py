"""A policy the tool attached is reported in force or not in force, never
invisible, wherever the command ran and whatever happens to it afterwards:

- in a pid namespace of its own (`unshare --pid --fork --mount-proc`) no
  bpffs shared with the host is reachable: attach refuses in one sentence
  (or pins privately with --private-bpffs, and says exactly that);
- `attach --follow` under `ip netns exec` keeps following after the shell
  that started it exits (its /proc/PID/root vanishes with it);
- a stopping signal after attach committed does not turn success into 130;
- `status` without --port agrees with `status --port` on whether a policy
  is in force.

Real processes, each test in its own network namespace (the netns fixture)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from test_attach import hits, spawn, start_worker  # noqa: F401 (fixture)
from test_pins_netns import EXE, _fails
from reuseport_ctl import pins

PORT = 8081
HOST_NET = os.open("/proc/self/ns/net", os.O_RDONLY)   # opened at import: the host's netns


@pytest.fixture
def group(netns, spawn):
    """Three workers on PORT in the test's namespace; whatever the test left
    pinned or attached is removed."""
    procs = [spawn("127.0.0.1", PORT, str(k)) for k in range(3)]
    yield netns, procs
    for p in procs:
        p.kill()
    subprocess.run([EXE, "detach", "--port", str(PORT), "--force"], capture_output=True, timeout=60)
    if pins.pin_dir("tcp", PORT).exists():
        pins.remove_pins(pins.pin_dir("tcp", PORT))


def _names(procs) -> dict[int, str]:
    return {p.pid: str(k) for k, p in enumerate(procs)}


# Runs as pid 1 of a new pid namespace (with its own /proc and mounts): starts
# three workers there, runs each command line given, prints one JSON line
# per command, then "done", and keeps everything alive until stdin closes.
DRIVER = """
import json, subprocess, sys
from test_attach import WORKER
ws = [subprocess.Popen([sys.executable, "-c", WORKER, "127.0.0.1", sys.argv[1], str(k), "1"],
                       stdout=subprocess.PIPE, text=True) for k in range(3)]
for w in ws:
    assert w.stdout.readline().strip() == "ready"
for cmd in sys.argv[2:]:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    print(json.dumps({"rc": r.returncode, "out": r.stdout, "err": r.stderr}), flush=True)
print("done", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def private_pidns(netns):
    """run(*commands): the commands' results, run beside three workers in a
    pid and mount namespace of their own (`unshare --pid --fork
    --mount-proc`, inside the test's network namespace); the workers live
    until the test ends."""
    procs = []

    def run(*commands) -> list[subprocess.CompletedProcess]:
        p = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--pid", "--fork",
                              "--mount-proc", sys.executable, "-c", DRIVER, str(PORT),
                              *commands], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, cwd=os.path.dirname(__file__),
                             env=dict(os.environ, PYTHONPATH=os.path.dirname(__file__)))
        procs.append(p)
        out = []
        for line in p.stdout:
            if line.strip() == "done":
                return out
            d = json.loads(line)
            out.append(subprocess.CompletedProcess(commands[len(out)], d["rc"], d["out"],
                                                   d["err"]))
        raise AssertionError(f"the private pid namespace ended early ({p.wait()})")
    yield run
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)
    subprocess.run([EXE, "detach", "--port", str(PORT), "--force"], capture_output=True, timeout=60)


# --- 1. a pid namespace of its own: no bpffs shared with the host ------------------------

def test_attach_in_a_private_pid_namespace_refuses_and_attaches_nothing(private_pidns):
    p, = private_pidns(f"{EXE} attach --port {PORT} --policy drain:0")
    _fails(p, "no BPF filesystem shared with the host is reachable from here",
           "--private-bpffs", "unshare --pid")
    assert "pinned in" not in p.stdout
    assert not pins.pin_dir("tcp", PORT).exists()
    assert len(hits(PORT, 30)) == 3                    # the kernel's hash: nothing attached
    st = subprocess.run([EXE, "status", "--port", str(PORT)], capture_output=True, text=True)
    _fails(st, "no reuseport-ctl policy")


@pytest.fixture
def two_workers(netns):
    """Two SO_REUSEPORT listeners on PORT in the test's namespace (host pid ns)."""
    code = ("import socket,time\ns=socket.socket()\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n"
            f"s.bind(('127.0.0.1',{PORT})); s.listen(8)\n"
            "print('ready',flush=True); time.sleep(600)")
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    for w in workers:
        assert w.stdout.readline().strip() == "ready"
    yield
    for w in workers:
        w.kill()
        w.wait()
    subprocess.run([EXE, "detach", "--port", str(PORT), "--force"], capture_output=True, timeout=60)


def _in_pidns(netns: str, *args, mount_proc: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "unshare", "--pid", "--fork",
                           *(["--mount-proc"] if mount_proc else []), EXE, *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_status_and_detach_in_a_private_pid_namespace_say_they_cannot_see(two_workers, netns):
    """A policy pinned from the host is in force; from a namespace that
    cannot reach the host's bpffs, status said 'nothing is pinned'."""
    subprocess.run([EXE, "attach", "--port", str(PORT), "--policy", "drain:0"], check=True,
                   capture_output=True)
    for args in (["status"], ["status", "--port", PORT], ["detach", "--port", PORT]):
        _fails(_in_pidns(netns, *args), "cannot see the policies pinned on this machine")
    assert pins.pin_dir("tcp", PORT).exists()          # detach there touched nothing


def test_a_foreign_proc_is_named_not_a_process_that_exited(two_workers, netns):
    """`unshare --pid --fork` without --mount-proc: /proc is the host's, its
    pids name no process here; that was reported as 'process N exited'."""
    p = _in_pidns(netns, "attach", "--port", PORT, "--policy", "drain:0", mount_proc=False)
    _fails(p, "/proc is another's", "--mount-proc")
    assert not pins.pin_dir("tcp", PORT).exists()


def test_private_bpffs_is_an_explicit_opt_in_and_says_so(private_pidns):
    a, st, human = private_pidns(
        f"{EXE} attach --port {PORT} --policy drain:0 --private-bpffs --json",
        f"{EXE} status --port {PORT} --json",
        f"{EXE} attach --port {PORT} --policy drain:0 --private-bpffs")
    for r in (a, st, human):
        assert r.returncode == 0, r.stdout + r.stderr
    a, st = json.loads(a.stdout), json.loads(st.stdout)
    assert a["pinned_host"] is None and st["pinned_host"] is None
    for d in (a, st):
        assert "private to" in d["note"] and "visible only inside it" in d["note"], d["note"]
    assert st["policy"] == "drain:0" and st["in_force"] is True
    assert "private BPF filesystem (not the host's)" in human.stdout, human.stdout
    # not in the host's bpffs; and in force, as said (slot 0 gets nothing)
    assert not pins.pin_dir("tcp", PORT).exists()
    assert len(hits(PORT, 30)) == 2


# --- 2. --follow under `ip netns exec`, started by a shell that exits ---------------------

@pytest.mark.parametrize("shell", ["waits-until-following", "exits-at-once"])
def test_follow_under_ip_netns_exec_outlives_the_shell_that_started_it(group, tmp_path, shell):
    netns, procs = group
    out = tmp_path / "f.out"
    # waits-until-following: the shell exits once the follower follows (so
    # it found the pins through this shell's /proc/PID/root); exits-at-once:
    # the user's `bash -c "... &"`, gone before the follower looks (reparented).
    wait = (f"for i in $(seq 300); do grep -q '^following' {shlex.quote(str(out))} && "
            f"exit 0; sleep 0.05; done; exit 1" if shell == "waits-until-following"
            else "exit 0")
    sh = subprocess.run(
        ["bash", "-c",
         f"ip netns exec {netns} {EXE} attach --port {PORT} --policy round-robin --follow "
         f"> {shlex.quote(str(out))} 2>&1 & echo $!; {wait}"],
        capture_output=True, text=True, timeout=60)
    assert sh.returncode == 0, out.read_text()
    deadline = time.monotonic() + 30
    while "\nfollowing" not in out.read_text():
        assert "reuseport-ctl:" not in out.read_text(), out.read_text()
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    follower = int(sh.stdout.split()[0])
    try:
        # The shell is gone. Restart a worker: the follower must still be
        # there to give the new socket the old one's slot.
        procs[1].kill()
        procs[1].wait()
        procs[1] = start_worker("127.0.0.1", PORT, "1b")
        deadline = time.monotonic() + 20
        while True:
            text = out.read_text()
            assert "follow ended" not in text, text
            st = json.loads(subprocess.run(["ip", "netns", "exec", netns, EXE, "status",
                                            "--port", str(PORT), "--json"],
                                           capture_output=True, text=True, check=True).stdout)
            if st["in_force"] and procs[1].pid in {s["pid"] for s in st["slots"]}:
                break
            assert time.monotonic() < deadline, (st, text)
            time.sleep(0.2)
        assert st["follower"] == follower, st
        assert "/proc/" not in st["pinned"] and "/proc/" not in st["note"], st
        assert st["pinned"] == str(pins.pin_dir("tcp", PORT))
        assert sorted(hits(PORT, 30).values()) == [10, 10, 10]     # round-robin, 1b included
        text = out.read_text()
        assert "/proc/" not in text, text          # no path through the (gone) shell
        assert f"pinned in {pins.pin_dir('tcp', PORT)}" in text, text
    finally:
        os.kill(follower, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{follower}") and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "follow ended: SIGTERM" in out.read_text(), out.read_text()


# --- 3. a signal after attach committed ---------------------------------------------------

def _attach_paused_at(point: str, sig: int, tmp_path,
                      verb=("attach", "--policy", "drain:0")) -> subprocess.CompletedProcess:
    """attach (or another verb), stopped at `point` by the test hook; `sig`
    sent while it waits there."""
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    env = dict(os.environ, REUSEPORT_CTL_TEST_PAUSE=f"{point}:{fifo}")
    p = subprocess.Popen([EXE, verb[0], "--port", str(PORT), *verb[1:]], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:                 # opening for writing succeeds once attach waits at point
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "attach never reached " + point
            time.sleep(0.02)
    p.send_signal(sig)
    os.write(fd, b"go\n")
    os.close(fd)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("point", ["committed", "printed"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_commit_does_not_undo_a_successful_attach(group, tmp_path, point,
                                                                     sig):
    netns, procs = group
    r = _attach_paused_at(point, sig, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "came after the policy was pinned and in force" in r.stderr, r.stderr
    assert "pinned in" in r.stdout
    st = json.loads(subprocess.run([EXE, "status", "--port", str(PORT), "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert st["policy"] == "drain:0" and st["in_force"] is True
    drained = _names(procs)[st["slots"][0]["pid"]]
    assert drained not in hits(PORT, 30)


@pytest.mark.parametrize("verb", ["attach", "detach"])
def test_a_signal_after_the_verb_is_done_changes_nothing(group, tmp_path, verb):
    """Done and printed, the process still has tens of ms to exit, where
    Python puts SIG_DFL back for the handlers it set: a SIGTERM there ended a
    successful attach or detach with 143 and no word."""
    if verb == "detach":
        subprocess.run([EXE, "attach", "--port", str(PORT), "--policy", "drain:0"],
                       check=True, capture_output=True)
    r = _attach_paused_at("finished", signal.SIGTERM, tmp_path,
                          verb=("attach", "--policy", "drain:0") if verb == "attach"
                          else ("detach",))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == "", r.stderr
    pinned = pins.pin_dir("tcp", PORT).exists()
    assert pinned == (verb == "attach")
    assert len(hits(PORT, 30)) == (2 if verb == "attach" else 3)   # drain:0, or all three


def test_a_signal_while_detach_gives_the_group_back_does_not_cut_it_in_half(group, tmp_path):
    subprocess.run([EXE, "attach", "--port", str(PORT), "--policy", "drain:0"], check=True,
                   capture_output=True)
    r = _attach_paused_at("given back", signal.SIGINT, tmp_path, verb=("detach",))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SIGINT came while the group was given back to the kernel, so detach " \
           "completed" in r.stderr, r.stderr
    assert not pins.pin_dir("tcp", PORT).exists()
    assert len(hits(PORT, 30)) == 3


def test_a_signal_before_the_commit_rolls_back(group, tmp_path):
    netns, procs = group
    r = _attach_paused_at("staged", signal.SIGINT, tmp_path)
    assert r.returncode == 130, r.stdout + r.stderr
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr
    assert not pins.pin_dir("tcp", PORT).exists()
    assert not pins.pin_dir("tcp", PORT).with_name(f"tcp-{PORT}-new").exists()
    assert len(hits(PORT, 30)) == 3                    # nothing attached


# --- 4. status with and without --port agree ----------------------------------------------

def test_status_listing_agrees_with_status_port_when_the_server_exited(group):
    netns, procs = group
    subprocess.run([EXE, "attach", "--port", str(PORT), "--policy", "drain:0"], check=True,
                   capture_output=True)
    for p in procs:
        p.kill()
        p.wait()
    one = json.loads(subprocess.run([EXE, "status", "--port", str(PORT), "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert one["in_force"] is False and "nothing listens" in one["divergence"]
    here = f"/proc/{os.getpid()}/fd/{HOST_NET}"
    for how in ([], ["nsenter", f"--net={here}"]):      # from its namespace, and the host's
        listing = json.loads(subprocess.run(how + [EXE, "status", "--json"],
                                            capture_output=True, text=True,
                                            check=True).stdout)
        mine = [p for p in listing["pins"] if p["port"] == PORT
                and p["netns"] == one["netns"]]
        assert len(mine) == 1, listing
        assert mine[0]["state"] == ("here" if not how else "live"), mine
        assert mine[0]["in_force"] is False, mine
        assert mine[0]["divergence"] == one["divergence"]
        human = subprocess.run(how + [EXE, "status"], capture_output=True, text=True,
                               check=True, env=dict(os.environ, COLUMNS="200")).stdout
        assert "not in force: nothing listens" in " ".join(human.split()), human
