"""attach / detach / status on running servers' SO_REUSEPORT groups.

Each test builds a real group in its own network namespace -- child processes
that each bind their own listener (no master), a real nginx, or in-test
sockets -- attaches a real policy, and checks which process answers."""
from __future__ import annotations

import collections
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from nginx import nginx as start_nginx
from reuseport_ctl import groups, pins
from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel import bpf, diag

# One listener per process, no master: each child binds its own SO_REUSEPORT
# socket, serves it from an epoll loop, and names itself in X-Worker.
WORKER = textwrap.dedent("""
    import os, selectors, socket, sys
    host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(sys.argv[4]))
    s.bind((host, port)); s.listen(128)
    sel = selectors.DefaultSelector(); sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    body = b"ok\\n"
    while True:
        for _ in sel.select():
            c, _a = s.accept()
            c.recv(4096)
            c.sendall(b"HTTP/1.1 200 OK\\r\\nX-Worker: " + name.encode() +
                      b"\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\n" + body)
            c.close()
""")


def free_port() -> int:
    # Pins are per network namespace now, but a flat pin of an older version
    # could still be on the machine: a port of our own per test.
    return random.randrange(20000, 40000)


def start_worker(host: str, port: int, name: str, reuseport: int = 1) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WORKER, host, str(port), name, str(reuseport)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture
def spawn():
    procs: list[subprocess.Popen] = []

    def run(*a, **kw):
        procs.append(start_worker(*a, **kw))
        return procs[-1]
    yield run
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture
def port(netns):
    """A port for this test; whatever a failing test left pinned is removed."""
    p = free_port()
    yield p
    for proto in ("tcp", "udp"):
        path = pins.pin_dir(proto, p)
        if path.exists():
            try:
                pins.detach(p, proto)
            except UserError:
                pins.remove_pins(path)


@pytest.fixture
def workers(port, spawn):
    """Three processes, each with only its own socket of the group."""
    procs = [spawn("127.0.0.1", port, str(n)) for n in range(3)]
    return port, procs


def hits(port: int, n: int = 60, host: str = "127.0.0.1") -> collections.Counter:
    """X-Worker of n fresh connections (each a new source port, so a new hash)."""
    seen = collections.Counter()
    for _ in range(n):
        with socket.create_connection((host, port), timeout=5) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := c.recv(4096):
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        worker = [ln.split(":", 1)[1].strip() for ln in head.split("\r\n")
                  if ln.lower().startswith("x-worker:")]
        assert worker, head
        seen[worker[0]] += 1
    return seen


def by_pid(procs) -> dict[int, str]:
    return {p.pid: str(n) for n, p in enumerate(procs)}


# --- discovery ------------------------------------------------------------------------------

def test_find_group_orders_members_by_serving_pid(workers):
    port, procs = workers
    g = groups.find_group(port)
    assert [m.slot for m in g.members] == [0, 1, 2]
    assert [m.pid for m in g.members] == sorted(p.pid for p in procs)
    assert {m.inode for m in g.members} == {s.inode for s in diag.listeners(port)}
    assert all(m.addr == f"127.0.0.1:{port}" for m in g.members)
    # the same group is found through any one of its processes
    assert groups.find_group(port, pid=procs[1].pid).inodes == g.inodes


# --- attach / status / detach on processes without a master --------------------------------

def test_drain_steers_foreign_processes_and_detach_restores(workers):
    port, procs = workers
    names = by_pid(procs)
    a = pins.attach(port, "drain:0")
    drained = names[a.group.members[0].pid]
    path = pins.pin_dir("tcp", port)
    assert {p.name for p in path.iterdir()} >= {"prog", "meta", "map_socks", "map_selections"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in path.iterdir())

    got = hits(port)
    assert drained not in got and sum(got.values()) == 60

    st = pins.status(port)
    assert st.policy == "drain:0" and st.total == 60
    assert st.slots[0].selections == 0
    assert [s.pid for s in st.slots] == [m.pid for m in a.group.members]

    d = pins.detach(port)
    assert d.removed and not path.exists()
    assert set(hits(port)) == {"0", "1", "2"}


def test_attach_again_replaces_the_policy(workers):
    port, procs = workers
    names = by_pid(procs)
    pins.attach(port, "drain:0")
    a = pins.attach(port, "weighted:0,1,0")
    assert a.replaced == "drain:0"
    only = names[a.group.members[1].pid]
    assert hits(port, 30) == {only: 30}
    assert pins.status(port).policy == "weighted:0,1,0"
    pins.detach(port)
    assert len(hits(port)) == 3


def test_cbpf_policy_pins_only_its_record(workers):
    port, _ = workers
    pins.attach(port, "mod")
    path = pins.pin_dir("tcp", port)
    assert sorted(p.name for p in path.iterdir()) == ["meta"]
    st = pins.status(port)
    assert (st.kind, st.total) == ("cbpf", None)
    assert pins.detach(port).removed
    assert not path.exists()


def test_udp_group_held_by_one_process(port):
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        socks.append(s)
    try:
        a = pins.attach(port, "drain:1", proto="udp")
        assert [m.inode for m in a.group.members] == sorted(os.fstat(s.fileno()).st_ino
                                                            for s in socks)
        slot0 = next(s for s in socks if os.fstat(s.fileno()).st_ino == a.group.members[0].inode)
        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.sendto(b"x", ("127.0.0.1", port))
        slot0.settimeout(2)
        got = 0
        while got < 20:
            slot0.recv(16)
            got += 1
        assert pins.status(port, "udp").slots[0].selections == 20
        pins.detach(port, "udp")
        assert not pins.pin_dir("udp", port).exists()
    finally:
        for s in socks:
            s.close()


# --- nginx: master holds every socket, each worker epolls its own --------------------------

@pytest.fixture
def nginx(port, tmp_path):
    with start_nginx(port, tmp_path) as (p, _workers):
        yield port, p


def test_nginx_drain_through_the_cli(nginx, cli):
    port, master = nginx
    r = cli("attach", "--port", port, "--policy", "drain:0", "--json", check=True)
    out = json.loads(r.stdout)
    assert out["policy"] == "drain:0" and out["pinned"] == str(pins.pin_dir("tcp", port))
    slot_pids = [s["pid"] for s in out["slots"]]
    workers = set(map(int, open(f"/proc/{master.pid}/task/{master.pid}/children").read().split()))
    assert set(slot_pids) == workers and master.pid not in slot_pids   # epoll found the workers
    assert slot_pids == sorted(slot_pids)

    assert hits(port, 40) == {str(slot_pids[1]): 40}

    cli("detach", "--port", port, check=True)
    assert set(hits(port, 40)) == {str(p) for p in slot_pids}
    assert not pins.pin_dir("tcp", port).exists()


# --- lifetime -------------------------------------------------------------------------------

def _obj_id(fd: int) -> int:
    """The kernel id of a BPF object (BPF_OBJ_GET_INFO_BY_FD: type, id first)."""
    import ctypes
    import struct
    info = ctypes.create_string_buffer(64)
    bpf.bpf(bpf.OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 64, ctypes.addressof(info)))
    return struct.unpack_from("=I", info.raw, 4)[0]


def _pinned_ids(port: int) -> set[int]:
    """Ids of every program and map pinned for port (and so made by attach)."""
    ids = set()
    for p in pins.pin_dir("tcp", port).iterdir():
        fd = bpf.obj_get(str(p))
        try:
            ids.add(_obj_id(fd))
        finally:
            os.close(fd)
    return ids


def _link_prog_id(link_id: int) -> int | None:
    import struct
    try:
        fd = bpf.bpf(30, struct.pack("=I", link_id))   # BPF_LINK_GET_FD_BY_ID
    except OSError:
        return None                                     # gone meanwhile
    try:
        import ctypes
        info = ctypes.create_string_buffer(64)
        bpf.bpf(bpf.OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 64, ctypes.addressof(info)))
        return struct.unpack_from("=I", info.raw, 8)[0]  # type, id, prog_id
    finally:
        os.close(fd)


def _snapshot():
    return (set(bpf.prog_ids()) | set(bpf.map_ids()), set(bpf.link_ids()),
            sorted(os.listdir(pins.ROOT)) if pins.ROOT.exists() else [],
            len(os.listdir("/proc/self/fd")))


def test_200_cycles_leave_nothing_behind(workers, cli):
    port, _ = workers
    # One warm-up cycle first: bcc keeps its own long-lived handles after its
    # first compile; those are not ours to release.
    pins.attach(port, "drain:0")
    pins.detach(port)
    _objs, links, pinned, fds = _snapshot()
    assert not pins.pin_dir("tcp", port).exists()
    ours: set[int] = set()
    # bcc compiles every eBPF attach (~0.3 s): one cycle in ten is eBPF (with
    # a replace), the rest cBPF, which still pins and unpins a record map.
    ebpf = ["drain:0", "weighted:1,2,3", "hash", "round-robin", "consistent"]
    for i in range(200):
        if i % 10 == 0:
            pins.attach(port, ebpf[(i // 10) % len(ebpf)])
            ours |= _pinned_ids(port)
            if i % 20 == 0:
                pins.attach(port, "drain:1")
        else:
            pins.attach(port, "mod")     # (cpu: refused on 3 sockets over 2 CPUs)
        ours |= _pinned_ids(port)
        pins.detach(port)
    cli("attach", "--port", port, "--policy", "drain:2", check=True)
    ours |= _pinned_ids(port)
    cli("detach", "--port", port, check=True)

    assert len(ours) > 200                            # ids were really collected
    # Program and map ids are global: other test runs may create their own
    # meanwhile, so check that none of ours is alive and nothing of ours
    # remains (pins, fds, links: attach makes none).
    deadline = time.monotonic() + 10                  # the kernel frees maps from a workqueue
    while (set(bpf.prog_ids()) | set(bpf.map_ids())) & ours and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (set(bpf.prog_ids()) | set(bpf.map_ids())) & ours
    for link in set(bpf.link_ids()) - links:          # a new link must not run our programs
        assert _link_prog_id(link) not in ours
    _, _, pinned_after, fds_after = _snapshot()
    assert not pins.pin_dir("tcp", port).exists()
    assert fds_after == fds
    assert len(hits(port, 30)) == 3                  # the group is as it was


# --- bad input: one sentence, exit 1 -------------------------------------------------------

def _fails(r, *words):
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    for w in words:
        assert w in err, err


def test_pid_gone(workers, cli):
    port, _ = workers
    p = subprocess.Popen(["true"])
    p.wait()
    _fails(cli("attach", "--port", port, "--pid", p.pid, "--policy", "drain:0"),
           f"no process {p.pid}")


def test_pid_without_a_listener_on_the_port(workers, cli):
    port, _ = workers
    p = subprocess.Popen(["sleep", "30"])
    try:
        _fails(cli("attach", "--port", port, "--pid", p.pid, "--policy", "drain:0"),
               f"process {p.pid}", f"port {port}")
    finally:
        p.kill()
        p.wait()


def test_nothing_listening(port, cli):
    _fails(cli("attach", "--port", port, "--policy", "drain:0"), "nothing is listening")


def test_listener_without_so_reuseport(port, spawn, cli):
    spawn("127.0.0.1", port, "0", reuseport=0)
    _fails(cli("attach", "--port", port, "--policy", "drain:0"),
           f"the listener on port {port} does not use SO_REUSEPORT")


def test_two_groups_on_one_port_need_host_or_pid(port, spawn, cli):
    v4 = [spawn("127.0.0.1", port, f"a{n}") for n in range(2)]
    v6 = [spawn("::1", port, f"b{n}") for n in range(2)]
    _fails(cli("attach", "--port", port, "--policy", "drain:0"), "--host or --pid")
    g = groups.find_group(port, pid=v6[1].pid)
    assert [m.pid for m in g.members] == sorted(p.pid for p in v6)
    assert groups.find_group(port, host="127.0.0.1").inodes == \
        groups.find_group(port, pid=v4[0].pid).inodes
    a = pins.attach(port, "drain:0", host="::1")
    assert a.group.addr == f"[::1]:{port}"
    assert set(hits(port, 20)) == {"a0", "a1"}       # the IPv4 group is untouched
    assert hits(port, 20, host="::1") == {"b1": 20}
    pins.detach(port)


def test_detach_when_nothing_is_attached(workers, cli):
    port, _ = workers
    _fails(cli("detach", "--port", port), f"no reuseport-ctl policy is attached to tcp port {port}")
    _fails(cli("detach", "--port", port, "--force"), "no BPF program is attached")


def test_detach_force_removes_a_foreign_program(workers, cli):
    port, _ = workers
    # A program attached by someone else (here: our selector, not pinned).
    from reuseport_ctl.policies import parse_policy
    from reuseport_ctl.policies.selector import attach_policy
    g = groups.find_group(port)
    with g.taken() as socks:
        sel = attach_policy(parse_policy("drain:0"), socks)
        try:
            _fails(cli("detach", "--port", port), "--force")
            r = cli("detach", "--port", port, "--force", "--json", check=True)
            assert json.loads(r.stdout)["removed"] is True
            assert len(hits(port)) == 3
        finally:
            sel.release()


@pytest.mark.parametrize("how", ["not-root", "no-cap-bpf"])
def test_missing_privileges(workers, cli, how):
    port, _ = workers
    exe = os.path.join(os.path.dirname(sys.executable), "reuseport-ctl")
    if how == "not-root":
        wrap = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "--inh-caps=-all"]
    else:
        wrap = ["setpriv", "--inh-caps=-bpf,-net_admin,-sys_admin",
                "--bounding-set=-bpf,-net_admin,-sys_admin"]
    for verb in (["attach", "--policy", "drain:0"], ["detach"], ["status"]):
        r = subprocess.run(wrap + [exe, verb[0], "--port", str(port), *verb[1:]],
                           capture_output=True, text=True, timeout=60)
        _fails(r, "needs CAP_BPF and CAP_NET_ADMIN")
    assert not pins.pin_dir("tcp", port).exists()


def test_cpu_policy_on_more_sockets_than_cpus_is_refused_as_run_refuses_it(netns, cli):
    n = (os.cpu_count() or 1) + 1
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 9104))
        s.listen(8)
        socks.append(s)
    try:
        a = cli("attach", "--port", 9104, "--policy", "cpu")
        r = cli("run", "--workers", n, "--policy", "cpu", "--port", 9105, "--duration", 1)
        for p in (a, r):
            assert p.returncode == 1 and "no CPU would reach" in p.stderr, p.stderr
        assert not pins.pin_dir("tcp", 9104).exists()
    finally:
        for s in socks:
            s.close()
