"""Pins per network namespace: two namespaces steer the same port at once;
`ip netns exec` (a fresh /sys, no bpffs) and `nsenter --net=` work alike; a
pin whose namespace is gone is stale, reported and removed, and blocks
nothing; every hint the tool prints runs as printed (UDP included).

Each namespace holds real worker processes; the client connects from
inside the namespace it means."""
from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest

from test_attach import WORKER, hits
from reuseport_ctl import pins
from reuseport_ctl.kernel import netns as knetns

EXE = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) or "reuseport-ctl"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
PORT = 8080                      # the same port in every namespace: that is the point


@contextmanager
def inside(name: str):
    """This thread in network namespace `name` for the block."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    new = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        assert _libc.setns(new, CLONE_NEWNET) == 0
        yield
    finally:
        _libc.setns(orig, CLONE_NEWNET)
        os.close(new)
        os.close(orig)


class Namespace:
    """A named network namespace with worker processes in it."""

    def __init__(self):
        self.name = f"rpctl-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        self.inode = os.stat(f"/run/netns/{self.name}").st_ino
        self.procs: list[subprocess.Popen] = []

    def workers(self, port: int, n: int = 3, prefix: str = "") -> list[subprocess.Popen]:
        for k in range(n):
            p = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.name}", sys.executable,
                                  "-c", WORKER, "127.0.0.1", str(port), f"{prefix}{k}", "1"],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            self.procs.append(p)
        return self.procs[-n:]

    def cli(self, *args, how: str = "nsenter", check: bool = True):
        pre = (["nsenter", f"--net=/run/netns/{self.name}"] if how == "nsenter"
               else ["ip", "netns", "exec", self.name])
        p = subprocess.run(pre + [EXE, *map(str, args)], capture_output=True, text=True,
                           timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()

    def delete(self):
        self.stop()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@pytest.fixture
def namespaces():
    made: list[Namespace] = []

    def make() -> Namespace:
        made.append(Namespace())
        return made[-1]
    yield make
    for ns in made:
        for proto in ("tcp", "udp"):
            path = pins.pin_dir(proto, PORT, ns.inode)
            if path.exists():
                ns.cli("detach", "--port", PORT, "--proto", proto, check=False)
        ns.delete()
    pins.clean_stale()


def _fails(p, *words):
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


# --- two namespaces, one port ----------------------------------------------------------

def test_two_namespaces_steer_port_8080_each_with_its_own_policy(namespaces):
    a, b = namespaces(), namespaces()
    a.workers(PORT, prefix="a")
    b.workers(PORT, prefix="b")
    ra = json.loads(a.cli("attach", "--port", PORT, "--policy", "drain:0", "--json").stdout)
    rb = json.loads(b.cli("attach", "--port", PORT, "--policy", "weighted:0,0,1",
                          "--json").stdout)
    assert ra["netns"] == a.inode and rb["netns"] == b.inode
    assert ra["pinned"] == str(pins.pin_dir("tcp", PORT, a.inode))
    assert rb["pinned"] == str(pins.pin_dir("tcp", PORT, b.inode))
    assert os.path.isdir(ra["pinned"]) and os.path.isdir(rb["pinned"])

    names = {s["slot"]: s["pid"] for s in ra["slots"]}
    by_pid_a = {p.pid: f"a{k}" for k, p in enumerate(a.procs)}
    by_pid_b = {p.pid: f"b{k}" for k, p in enumerate(b.procs)}
    with inside(a.name):
        got = hits(PORT, 30)
    assert by_pid_a[names[0]] not in got and sum(got.values()) == 30
    only_b = by_pid_b[rb["slots"][2]["pid"]]
    with inside(b.name):
        assert hits(PORT, 30) == {only_b: 30}

    sa = json.loads(a.cli("status", "--port", PORT, "--json").stdout)
    sb = json.loads(b.cli("status", "--port", PORT, "--json").stdout)
    assert (sa["policy"], sa["netns"], sa["in_force"]) == ("drain:0", a.inode, True)
    assert (sb["policy"], sb["netns"], sb["in_force"]) == ("weighted:0,0,1", b.inode, True)

    # the machine-wide listing has both, each with its namespace
    listing = json.loads(subprocess.run([EXE, "status", "--json"], capture_output=True,
                                        text=True, check=True).stdout)
    mine = {(p["netns"], p["policy"]) for p in listing["pins"] if p["port"] == PORT}
    assert {(a.inode, "drain:0"), (b.inode, "weighted:0,0,1")} <= mine

    b.cli("detach", "--port", PORT)
    assert not os.path.exists(rb["pinned"]) and os.path.isdir(ra["pinned"])
    with inside(b.name):
        assert len(hits(PORT, 30)) == 3              # b: the kernel's hash again
    with inside(a.name):
        assert by_pid_a[names[0]] not in hits(PORT, 30)  # a: still drained
    a.cli("detach", "--port", PORT)
    assert not os.path.exists(ra["pinned"])


# --- ip netns exec: a fresh /sys without bpffs -----------------------------------------

def test_ip_netns_exec_attach_status_detach(namespaces):
    ns = namespaces()
    ns.workers(PORT)
    r = ns.cli("attach", "--port", PORT, "--policy", "drain:1", "--json", how="ip")
    out = json.loads(r.stdout)
    host_path = pins.pin_dir("tcp", PORT, ns.inode)
    # printed path exists (reached through the parent's mount namespace: ours)
    assert os.path.isdir(out["pinned"])
    assert os.path.samefile(out["pinned"], host_path)
    assert "ip netns exec" in out["note"]
    assert {p.name for p in host_path.iterdir()} >= {"prog", "meta", "map_socks"}

    st = json.loads(ns.cli("status", "--port", PORT, "--json", how="ip").stdout)
    assert st["policy"] == "drain:1" and st["in_force"] is True
    drained = str(out["slots"][1]["pid"])
    by_pid = {str(p.pid): str(k) for k, p in enumerate(ns.procs)}
    with inside(ns.name):
        got = hits(PORT, 30)
    assert by_pid[drained] not in got

    d = json.loads(ns.cli("detach", "--port", PORT, "--json", how="ip").stdout)
    assert d["removed"] is True and d["policy"] == "drain:1"
    assert not host_path.exists()
    with inside(ns.name):
        assert len(hits(PORT, 30)) == 3


def test_ip_netns_exec_without_any_bpffs_refuses_in_one_sentence(namespaces, tmp_path):
    """A private mount namespace whose ancestors have no bpffs either (here:
    `unshare -m` with /sys/fs/bpf covered by an empty tmpfs): one sentence
    that says what to do, and no pin path printed."""
    ns = namespaces()
    ns.workers(PORT)
    script = (f"mount -t tmpfs none /sys/fs/bpf && ip netns exec {ns.name} "
              f"{EXE} attach --port {PORT} --policy drain:0")
    # unshare -m runs the shell with no bpffs at /sys/fs/bpf; ip netns exec
    # below it then sees an ancestor (that shell) without one as well.
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    _fails(p, "no BPF filesystem", "nsenter --net=")
    assert "pinned in" not in p.stdout
    assert not pins.pin_dir("tcp", PORT, ns.inode).exists()


# --- stale pins -------------------------------------------------------------------------

def test_stale_pin_is_reported_cleaned_and_blocks_nothing(namespaces):
    gone, other = namespaces(), namespaces()
    gone.workers(PORT)
    other.workers(PORT)
    gone.cli("attach", "--port", PORT, "--policy", "round-robin")
    stale_path = pins.pin_dir("tcp", PORT, gone.inode)
    assert stale_path.is_dir()
    gone.delete()                     # workers killed, namespace unmounted: it is freed

    # attach in another namespace is not blocked, and says what it cleaned
    out = json.loads(other.cli("attach", "--port", PORT, "--policy", "drain:0",
                               "--json").stdout)
    assert "stale pin" in out["note"] and f"net:[{gone.inode}]" in out["note"]
    assert not stale_path.exists()

    # one more stale pin, seen by the machine-wide status
    again = namespaces()
    again.workers(PORT)
    again.cli("attach", "--port", PORT, "--policy", "hash")
    again_path = pins.pin_dir("tcp", PORT, again.inode)
    again.delete()
    listing = json.loads(subprocess.run([EXE, "status", "--json"], capture_output=True,
                                        text=True, check=True).stdout)
    removed = [p for p in listing["removed_stale"] if p["netns"] == again.inode]
    assert removed and removed[0]["stale"] is True and removed[0]["policy"] == "hash"
    assert removed[0]["open_sockets"] == 0
    assert not again_path.exists()
    live = [p for p in listing["pins"] if p["netns"] == other.inode]
    assert live and live[0]["state"] == "live" and live[0]["policy"] == "drain:0"
    other.cli("detach", "--port", PORT)


def test_a_new_namespace_with_a_reused_inode_is_not_the_old_one(namespaces):
    """The kernel reuses a freed namespace's inode at once: a pin under that
    inode is told apart by the namespace cookie, removed as stale, and the
    new namespace attaches over it."""
    first = namespaces()
    first.workers(PORT)
    first.cli("attach", "--port", PORT, "--policy", "round-robin")
    first.delete()
    second = None
    deadline = time.monotonic() + 10
    while second is None and time.monotonic() < deadline:
        # The kernel frees a namespace (and its inode) from a workqueue, a
        # little later; a new one gets the lowest free inode. Kept alive,
        # the misses fill the lower holes until one gets ours.
        ns = namespaces()
        if ns.inode == first.inode:
            second = ns
        else:
            time.sleep(0.1)
    if second is None:
        pytest.skip("no new namespace got the freed inode (other namespaces were made "
                    "meanwhile)")
    assert pins.pin_dir("tcp", PORT, second.inode).is_dir()   # the old pin, same path
    second.workers(PORT)
    st = second.cli("status", "--port", PORT, check=False)
    _fails(st, "no reuseport-ctl policy", "stale pin")
    assert not pins.pin_dir("tcp", PORT, second.inode).exists()
    out = json.loads(second.cli("attach", "--port", PORT, "--policy", "drain:2",
                                "--json").stdout)
    assert out["policy"] == "drain:2" and out["netns"] == first.inode
    second.cli("detach", "--port", PORT)


# --- hints work as printed ----------------------------------------------------------------

def _hint_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.startswith("  reuseport-ctl ")]


def udp_group(ns) -> None:
    """Two SO_REUSEPORT UDP sockets on PORT in ns, in one process."""
    code = ("import socket,time\nss=[]\nfor _ in range(2):\n"
            " s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            " s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEPORT,1)\n"
            f" s.bind(('127.0.0.1',{PORT})); ss.append(s)\nprint('ready',flush=True)\n"
            "time.sleep(600)\n")
    p = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns.name}", sys.executable, "-c", code],
                         stdout=subprocess.PIPE, text=True)
    ns.procs.append(p)
    assert p.stdout.readline().strip() == "ready"


def test_udp_attach_hints_work_as_printed(namespaces):
    ns = namespaces()
    udp_group(ns)
    out = ns.cli("attach", "--proto", "udp", "--port", PORT, "--policy", "round-robin").stdout
    hints = _hint_lines(out)
    assert [h.split()[1] for h in hints] == ["status", "detach"], out
    assert all("--proto udp" in h for h in hints), hints
    st = ns.cli(*shlex.split(hints[0])[1:])            # as printed, word for word
    assert "round-robin" in st.stdout
    ns.cli(*shlex.split(hints[1])[1:])
    assert not pins.pin_dir("udp", PORT, ns.inode).exists()


def test_the_wrong_protocol_or_namespace_is_named(namespaces):
    """A UDP group asked about without --proto udp, or from outside its
    namespace: the error says where it is, in a command that works."""
    ns = namespaces()
    udp_group(ns)
    ns.cli("attach", "--proto", "udp", "--port", PORT, "--policy", "round-robin")
    for verb in ("detach", "watch"):
        r = ns.cli(verb, "--port", PORT, check=False)
        assert r.returncode == 1 and f"udp port {PORT} has sockets: add --proto udp" in r.stderr, \
            r.stderr
    here = subprocess.run([EXE, "status", "--proto", "udp", "--port", str(PORT)],
                          capture_output=True, text=True)       # from the host's namespace
    assert here.returncode == 1
    cmd = re.search(r"`(ip netns exec [^`]+)`", here.stderr)[1]
    st = subprocess.run(shlex.split(cmd.replace("reuseport-ctl", EXE, 1)),
                        capture_output=True, text=True)
    assert st.returncode == 0 and "round-robin" in st.stdout, st.stdout + st.stderr


def test_a_pid_in_another_namespace_is_named(namespaces):
    ns = namespaces()
    w = ns.workers(PORT)[0]
    for verb in (["watch"], ["attach", "--policy", "hash"]):
        r = subprocess.run([EXE, *verb, "--port", str(PORT), "--pid", str(w.pid)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"process {w.pid} is in another network namespace" \
            in r.stderr and f"nsenter --net=/proc/{w.pid}/ns/net" in r.stderr, r.stderr


def test_kernel_policy_hint_works_as_printed(namespaces):
    ns = namespaces()
    ns.workers(PORT)
    ns.cli("attach", "--port", PORT, "--policy", "hash")
    r = ns.cli("attach", "--port", PORT, "--policy", "kernel", check=False)
    _fails(r, "reuseport-ctl detach --port")
    cmd = re.search(r"`(reuseport-ctl [^`]+)`", r.stderr)[1]
    ns.cli(*shlex.split(cmd)[1:])
    assert not pins.pin_dir("tcp", PORT, ns.inode).exists()


def test_status_of_a_port_without_a_policy(namespaces):
    ns = namespaces()
    _fails(ns.cli("status", "--port", PORT, check=False),
           f"no reuseport-ctl policy is attached to tcp port {PORT} in this network namespace")


def test_current_namespace_helpers():
    assert knetns.current_inode() == os.stat("/proc/self/ns/net").st_ino
    c = knetns.current_cookie()
    assert c > 0
    assert knetns.cookie_of("/proc/self/ns/net") == c
    assert knetns.current_inode() in knetns.live_namespaces()


# --- the flat layout of earlier versions -----------------------------------------------------

def _as_flat(port: int) -> "pins.Path":
    """Move this namespace's pin to where earlier versions put it
    (reuseport-ctl/<proto>-<port>, no namespace in the path)."""
    new = pins.pin_dir("tcp", port)
    flat = pins.legacy_dir("tcp", port)
    os.rename(new, flat)
    try:
        new.parent.rmdir()
    except OSError:
        pass
    return flat


def test_flat_pins_of_an_earlier_version_are_read_and_replaced(namespaces):
    ns = namespaces()
    ns.workers(PORT)
    port = PORT
    with inside(ns.name):
        pins.attach(port, "drain:0")
        flat = _as_flat(port)
        assert not pins.pin_dir("tcp", port).exists() and flat.is_dir()
        st = pins.status(port)                        # found where it was
        assert st.policy == "drain:0" and st.pinned == str(flat) and st.in_force
        a = pins.attach(port, "drain:1")              # upgraded on the next attach
        assert a.replaced == "drain:0" and not flat.exists()
        assert pins.pin_dir("tcp", port).is_dir()
        flat = _as_flat(port)
        d = pins.detach(port)                          # and detached from there
        assert d.removed and d.policy == "drain:1" and not flat.exists()
        assert len(hits(port, 30)) == 3
