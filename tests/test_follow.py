"""A policy stays in force while the group changes (`attach --follow`), and
says when it is not (policy_state, status).

gunicorn --reuse-port is the real server: each worker binds its own socket,
and a worker the master respawns binds a NEW one. The WSGI app answers with
its pid, the ground truth of who served each connection."""
from __future__ import annotations

import collections
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import bpf_objects
from test_attach import free_port, hits, start_worker
from reuseport_ctl import pins
from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel import bpf, diag

EXE = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) or "reuseport-ctl"
APP = textwrap.dedent("""
    import os
    def app(environ, start_response):
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]
""")


def _gunicorn_available() -> bool:
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def port(netns):
    p = free_port()
    yield p
    path = pins.pin_dir("tcp", p)
    if path.exists():
        try:
            pins.detach(p)
        except UserError:
            pins.remove_pins(path)


def wait_for(cond, timeout: float = 20.0, step: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {cond}")


@pytest.fixture
def gunicorn(port, tmp_path):
    if not _gunicorn_available():
        pytest.skip("gunicorn is not installed (scripts/bootstrap installs the test extra)")
    (tmp_path / "pidapp.py").write_text(APP)
    p = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "3", "--reuse-port",
                          "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path),
                          "--log-level", "warning", "pidapp:app"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(diag.listeners(port)) == 3)
        yield port, p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def served_by(port: int, n: int, concurrency: int = 4) -> collections.Counter:
    """The pid in the answer to each of n fresh connections."""
    def one(_):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        return int(data.split(b"\r\n\r\n", 1)[1])
    with ThreadPoolExecutor(concurrency) as ex:
        return collections.Counter(ex.map(one, range(n)))


class Follow:
    """`reuseport-ctl attach --follow --json` as a subprocess."""

    def __init__(self, port: int, policy: str, *extra):
        self.p = subprocess.Popen([EXE, "attach", "--port", str(port), "--policy", policy,
                                   "--follow", "--json", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.buf = b""
        self.lines: list[dict] = []
        self.attached = self.next(timeout=60)

    def next(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                raise AssertionError(f"no line from the follower; stderr: {self.stderr()}")
            chunk = os.read(self.p.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"the follower exited ({self.p.wait()}): {self.stderr()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        self.lines.append(json.loads(line))
        return self.lines[-1]

    def until(self, pred, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            e = self.next(max(0.01, deadline - time.monotonic()))
            if pred(e):
                return e

    def stderr(self) -> str:
        if self.p.poll() is None:
            return ""
        return self.p.stderr.read().decode()

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        rc = self.p.wait(timeout)
        rest = self.p.stdout.read()
        for line in (self.buf + rest).splitlines():
            self.lines.append(json.loads(line))
        self.buf = b""
        return rc

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _listener_inodes(port):
    return {s.inode for s in diag.listeners(port)}


def _even(counts, n: int, total: int) -> bool:
    return len(counts) == n and all(abs(c - total // n) <= 1 for c in counts.values())


# --- gunicorn: a worker killed and respawned --------------------------------------------

def test_gunicorn_restart_under_follow_keeps_round_robin_exact(gunicorn):
    port, _master = gunicorn
    f = Follow(port, "round-robin")
    try:
        slots = {s["slot"]: s["pid"] for s in f.attached["slots"]}
        assert f.attached["follow"] is True and f.attached["state"]["in_force"] is True
        before = served_by(port, 300)
        assert _even(before, 3, 300), before

        victim_slot = 1
        victim = slots[victim_slot]
        old = _listener_inodes(port)
        os.kill(victim, signal.SIGKILL)
        # the new worker's socket: when it appears, and when the policy has it
        new = wait_for(lambda: _listener_inodes(port) - old, timeout=30)
        t_new = time.monotonic()
        (new_inode,) = new

        def taken():
            st = pins.policy_state(port)
            return st if st and st.slots.get(new_inode) == victim_slot and st.in_force else None
        st = wait_for(taken, timeout=5, step=0.002)
        followed_in = time.monotonic() - t_new
        assert followed_in < 1.0, followed_in
        assert st.fallbacks is not None and st.divergence is None

        joined = f.until(lambda e: e["event"] == "joined")
        assert joined["slot"] == victim_slot and joined["inode"] == new_inode
        new_pid = joined["pid"]
        assert new_pid != victim
        events = [e["event"] for e in f.lines[1:]]
        assert "left" in events and "diverged" in events    # it said so while it lasted

        got = served_by(port, 3000)
        print(f"\nfollowed in {followed_in * 1000:.0f} ms; after the restart: "
              f"{sorted(got.values())}")
        assert _even(got, 3, 3000), got
        assert victim not in got and new_pid in got

        status = json.loads(subprocess.run([EXE, "status", "--port", str(port), "--json"],
                                           capture_output=True, text=True, check=True).stdout)
        assert status["in_force"] is True and status["divergence"] is None
        assert status["follower"] == f.p.pid
        by_slot = {s["slot"]: s for s in status["slots"]}
        assert by_slot[victim_slot]["pid"] == new_pid and by_slot[victim_slot]["alive"]
        # slots keep meaning the same workers
        assert {k: by_slot[k]["pid"] for k in (0, 2)} == {k: slots[k] for k in (0, 2)}

        assert f.stop() == 128 + signal.SIGTERM
        assert f.lines[-1]["event"] == "stopped"
        meta = pins.read_meta(pins.pin_dir("tcp", port))
        assert meta.follower is None and meta.policy == "round-robin"
        assert _even(served_by(port, 300), 3, 300)          # still pinned, still in force
    finally:
        f.kill()


def test_gunicorn_restart_without_follow_is_reported_then_follow_repairs(gunicorn, cli):
    port, _master = gunicorn
    a = pins.attach(port, "round-robin")
    slots = {m.slot: m.pid for m in a.group.members}
    victim_slot, victim = 0, slots[0]
    old = _listener_inodes(port)
    os.kill(victim, signal.SIGKILL)
    (new_inode,) = wait_for(lambda: _listener_inodes(port) - old, timeout=30)

    got = served_by(port, 3000)
    print(f"\nwithout --follow, after the restart: {sorted(got.values())}")
    st = pins.policy_state(port)
    assert st.in_force is False and st.gone == [victim_slot] and st.new == [new_inode]
    assert abs(st.fallbacks - 1000) <= 1, st.fallbacks   # slot 0's third went by the hash
    assert st.divergence == (f"slot 0's socket is gone; 1 new socket not in the policy: "
                             f"{st.fallbacks:,} connections went by the kernel's hash")

    r = cli("status", "--port", port, "--json", check=True)
    d = json.loads(r.stdout)
    assert d["in_force"] is False and d["divergence"] == st.divergence
    assert d["fallbacks"] == st.fallbacks
    extra = [s for s in d["slots"] if not s["in_policy"]]
    assert [s["inode"] for s in extra] == [new_inode] and extra[0]["slot"] == 3
    new_pid = extra[0]["pid"]
    assert new_pid in got
    text = cli("status", "--port", port, check=True).stdout
    assert "not in force: slot 0's socket is gone" in " ".join(text.split())
    assert "--follow" in text                               # and how to fix it

    # the same numbering in find_group for every verb: pinned slots, new one after
    from reuseport_ctl.groups import find_group
    g = find_group(port, slots=pins.pinned_slots(port))
    assert [(m.slot, m.pid, m.in_policy) for m in g.members] == \
        [(1, slots[1], True), (2, slots[2], True), (3, new_pid, False)]

    # watch says the same, numbers the members the same, while it lasts
    w = cli("watch", "--port", port, "--json", "--interval", 0.5, "--duration", 1.2,
            check=True)
    last = json.loads(w.stdout.splitlines()[-1])
    assert last["policy"] == "round-robin" and last["policy_in_force"] is False
    assert last["policy_note"] == st.divergence
    assert [(r["slot"], r["pid"]) for r in last["workers"]] == \
        [(1, slots[1]), (2, slots[2]), (3, new_pid)]

    # a follower started now takes the new socket into the vacated slot
    f = Follow(port, "round-robin")
    try:
        # (attach over the existing policy keeps the pinned order: 1, 2, new)
        assert [s["pid"] for s in f.attached["slots"]] == [slots[1], slots[2], new_pid]
        st = pins.policy_state(port)
        assert st.in_force and st.fallbacks == 0
        assert _even(served_by(port, 3000), 3, 3000)
        assert f.stop() == 128 + signal.SIGTERM
    finally:
        f.kill()


# --- the follower's own lifetime -------------------------------------------------------------

@pytest.fixture
def workers(port):
    procs = [start_worker("127.0.0.1", port, str(n)) for n in range(3)]
    yield port, procs
    for p in procs:
        p.kill()
        p.wait()


def _pinned_ids(port: int) -> set[int]:
    ids = set()
    for p in pins.pin_dir("tcp", port).iterdir():
        fd = bpf.obj_get(str(p))
        try:
            ids.add(bpf.obj_id(fd))
        finally:
            os.close(fd)
    return ids


def _rp_ids() -> set[int]:
    progs, maps, _links = bpf_objects()
    return progs | maps


def test_follow_exits_on_sigterm_leaving_only_the_pinned_policy(workers):
    port, procs = workers
    names = {p.pid: str(n) for n, p in enumerate(procs)}
    ours: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        before = _rp_ids()
        f = Follow(port, "drain:0")
        try:
            assert f.stop(sig) == 128 + sig, f.stderr()       # README: Exit status
        finally:
            f.kill()
        assert f.lines[-1]["event"] == "stopped" and "stays pinned" in f.lines[-1]["text"]
        assert f.lines[-1]["text"].startswith(signal.Signals(sig).name)
        # Of what attach made, only the pins are alive: the follower's fds and
        # bcc's objects went with the process (other test runs may make
        # objects meanwhile: only ours, those pinned, may have appeared).
        pinned = _pinned_ids(port)
        ours |= pinned
        deadline = time.monotonic() + 10
        while (_rp_ids() - before) - pinned and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = {i: n for i, n in {**bpf.prog_names(), **bpf.map_names()}.items()
                    if i in (_rp_ids() - before) - pinned}
        assert not leftover or _others_running(), leftover
        assert pins.read_meta(pins.pin_dir("tcp", port)).follower is None
        drained = names[f.attached["slots"][0]["pid"]]
        got = hits(port, 30)
        assert drained not in got and sum(got.values()) == 30   # still in force
        pins.detach(port)
        assert not pins.pin_dir("tcp", port).exists()
    # after detach nothing of ours remains
    deadline = time.monotonic() + 10
    while _rp_ids() & ours and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _rp_ids() & ours


def _others_running() -> bool:
    """Another reuseport-ctl (a concurrent test run) is alive: the global
    object set is then not ours alone."""
    me = os.getpid()
    for pid in (int(n) for n in os.listdir("/proc") if n.isdigit()):
        if pid == me:
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"reuseport-ctl" in cmd or b"pytest" in cmd:
            return True
    return False


def test_detach_stops_the_follower(workers, cli):
    port, _procs = workers
    f = Follow(port, "round-robin")
    try:
        d = json.loads(cli("detach", "--port", port, "--json", check=True).stdout)
        assert d["stopped_follower"] == f.p.pid and d["removed"] is True
        assert f.p.wait(10) == 0                  # its work is over, not stopped from outside
        assert "detached or replaced" in f.p.stdout.read().decode()
        assert not pins.pin_dir("tcp", port).exists()
        assert len(hits(port, 30)) == 3
    finally:
        f.kill()


def test_attach_over_a_followed_policy_stops_its_follower(workers):
    port, _procs = workers
    f = Follow(port, "round-robin")
    try:
        a = pins.attach(port, "drain:1")
        assert a.stopped_follower == f.p.pid
        assert f.p.wait(10) == 0
        assert pins.read_meta(pins.pin_dir("tcp", port)).policy == "drain:1"
    finally:
        f.kill()
    pins.detach(port)


def test_follow_udp_socket_closed_and_reopened(port):
    """The same for UDP: a process replaces one of its sockets."""
    code = textwrap.dedent(f"""
        import socket, sys
        def sock():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", {port}))
            return s
        ss = [sock(), sock()]
        print("ready", flush=True)
        sys.stdin.readline()
        ss[0].close(); ss[0] = sock()
        print("replaced", flush=True)
        sys.stdin.readline()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        f = Follow(port, "round-robin", "--proto", "udp")
        try:
            old = {s.inode for s in diag.listeners(port, "udp")}
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "replaced"
            (new_inode,) = {s.inode for s in diag.listeners(port, "udp")} - old
            e = f.until(lambda e: e["event"] == "joined")
            assert e["inode"] == new_inode
            st = wait_for(lambda: (s := pins.policy_state(port, "udp")) and s.in_force and s)
            assert st.slots[new_inode] == e["slot"] and st.divergence is None
            assert f.stop() == 128 + signal.SIGTERM
        finally:
            f.kill()
        pins.detach(port, "udp")
    finally:
        p.kill()
        p.wait()


def test_systemd_unit_runs_the_follower(workers):
    """scripts/reuseport-ctl-follow@.service: its ExecStart, expanded as
    systemd does from an instance's environment file, follows the group
    and stops on the unit's KillSignal leaving the policy pinned."""
    port, _procs = workers
    unit = (pins.Path(__file__).resolve().parent.parent / "scripts"
            / "reuseport-ctl-follow@.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines()
                if "=" in line and not line.startswith("#"))
    assert keys["EnvironmentFile"] == "/etc/reuseport-ctl/%i.conf"
    env = {"PORT": str(port), "PROTO": "tcp", "POLICY": "round-robin", "ARGS": "--host 127.0.0.1"}
    argv = []
    for word in keys["ExecStart"].split():
        if word == "$ARGS":                       # $VAR: split into words
            argv += env["ARGS"].split()
        elif word.startswith("${"):               # ${VAR}: one word
            argv.append(env[word[2:-1]])
        else:
            argv.append(word)
    assert argv[:4] == ["/usr/bin/env", "reuseport-ctl", "attach", "--follow"]
    argv[1] = EXE
    p = subprocess.Popen(argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (st := pins.policy_state(port)) and st.follower == p.pid, timeout=60)
        p.send_signal(getattr(signal, keys["KillSignal"]))
        out, err = p.communicate(timeout=10)
        assert p.returncode == 143, err
        assert "143" in keys["SuccessExitStatus"].split()     # systemd: a clean stop
        assert "follow ended: SIGTERM: stopped; the policy stays pinned." in out
        assert pins.read_meta(pins.pin_dir("tcp", port)).policy == "round-robin"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    pins.detach(port)


def test_follow_keeps_an_outsiders_socket_out_of_the_policy(workers, tmp_path):
    """A process of another session binding the port (`nginx -t` from a
    shell while nginx serves) is never given a slot: the follower says so
    once, and status shows the socket as not in the policy."""
    port, _procs = workers
    f = Follow(port, "round-robin")
    pidfile = tmp_path / "pid"
    joiner = None
    try:
        script = tmp_path / "joiner.py"
        script.write_text("import socket, sys, time\n"
                          "s = socket.socket()\n"
                          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
                          "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
                          "s.listen(8)\n"
                          "time.sleep(60)\n")
        subprocess.run(["sh", "-c", f"setsid -f sh -c 'echo $$ > {pidfile}; exec "
                                    f"{sys.executable} {script} {port}' >/dev/null 2>&1"],
                       check=True)
        joiner = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip()))
        e = f.until(lambda e: e.get("pid") == joiner, timeout=15)
        assert e["event"] == "diverged" and "stays out of the policy" in e["text"]
        assert f.p.poll() is None
        st = pins.status(port)
        out = [s for s in st.slots if not s.in_policy]
        assert [s.pid for s in out] == [joiner]
        assert sum(1 for s in st.slots if s.in_policy) == 3
        with pytest.raises(AssertionError, match="no line"):
            f.until(lambda e: e.get("pid") == joiner, timeout=0.6)   # said once
    finally:
        if joiner:
            os.kill(joiner, signal.SIGKILL)
        f.kill()
