"""Where each member's connections arrived, as `watch` shows it (bpf/conns.h,
LC_RX): a client pinned to one CPU at a time connects over a veth pair from a
second network namespace. On veth the receive runs on the sending CPU, so
every connection of the CPU c batch arrives on CPU c; per member, watch's
rx_cpus must equal what the server's own accepted sockets say
(SO_INCOMING_CPU), connection for connection, and its NAPI ids what
SO_INCOMING_NAPI_ID says: none (null, with the reason) on a plain veth, the
veth's own per-queue NAPI ids once GRO is on (veth then receives through
NAPI, like a NIC driver)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from test_watch import Watcher, scrape

SERVER, CLIENT = "10.77.0.1", "10.77.0.2"
PORT = 9300
MEMBERS = 2
QUEUES = 2
PER_CPU = {0: 12, 1: 17}            # connections sent from each CPU
HERE = Path(__file__).resolve().parent


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def mac(ns: str, dev: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", dev], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)[0]["address"]


@pytest.fixture
def veth(netns):
    """va (server side, the test's netns) <-> vb (client side, a second
    netns), QUEUES queues each way. Yields the client's namespace."""
    peer = f"rpctl-rx-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", peer)
    try:
        q = str(QUEUES)
        sh("ip", "link", "add", "va", "numtxqueues", q, "numrxqueues", q, "type", "veth",
           "peer", "name", "vb", "netns", peer, "numtxqueues", q, "numrxqueues", q)
        sh("ip", "addr", "add", f"{SERVER}/24", "dev", "va")
        sh("ip", "link", "set", "va", "up")
        sh("ip", "-n", peer, "addr", "add", f"{CLIENT}/24", "dev", "vb")
        sh("ip", "-n", peer, "link", "set", "vb", "up")
        sh("ip", "-n", peer, "link", "set", "lo", "up")
        # static neighbours: nothing waits for ARP and leaves from the CPU
        # that handled the reply
        sh("ip", "neigh", "replace", CLIENT, "lladdr", mac(peer, "vb"), "dev", "va",
           "nud", "permanent")
        sh("ip", "-n", peer, "neigh", "replace", SERVER, "lladdr", mac(netns, "va"),
           "dev", "vb", "nud", "permanent")
        yield peer
    finally:
        subprocess.run(["ip", "netns", "del", peer], check=False)


def send_from(peer: str, cpu: int, n: int) -> None:
    """n datagrams, each from its own socket (its own 4-tuple, so the group
    spreads them), from a process pinned to `cpu` in the client namespace."""
    code = ("import os, socket, time\n"
            f"os.sched_setaffinity(0, {{{cpu}}})\n"
            f"for _ in range({n}):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"    s.sendto(b'x', ({SERVER!r}, {PORT}))\n"
            "    time.sleep(0.002)\n")
    subprocess.run(["nsenter", f"--net=/run/netns/{peer}", sys.executable, "-c", code],
                   check=True, timeout=30)


def connect_from(peer: str, cpu: int, n: int) -> None:
    """n connections, one after another, from a process pinned to `cpu` in
    the client namespace; each waits until the server has accepted and
    closed it."""
    code = ("import os, socket\n"
            f"os.sched_setaffinity(0, {{{cpu}}})\n"
            f"for _ in range({n}):\n"
            f"    c = socket.create_connection(({SERVER!r}, {PORT}), timeout=5)\n"
            "    c.recv(1)\n"
            "    c.close()\n")
    subprocess.run(["nsenter", f"--net=/run/netns/{peer}", sys.executable, "-c", code],
                   check=True, timeout=30)


def serve_and_watch(peer: str, *watch_args, proto: str = "tcp"):
    """Start the ground-truth server and a watch on it, send PER_CPU; return
    (the server's record: inode -> {"cpu/napi": n}, the watch's last frame,
    the Prometheus scrape, the watch's stderr)."""
    server = subprocess.Popen([sys.executable, str(HERE / "rx_server.py"), SERVER, str(PORT),
                               str(MEMBERS), proto], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    try:
        assert server.stdout.readline().strip() == "ready"
        with Watcher("--port", PORT, "--proto", proto, "--json", "--interval", 0.2,
                     "--prometheus", "127.0.0.1:0", *watch_args) as w:
            said = w.started()
            url = re.search(r"Prometheus metrics on (http://\S+/metrics)", said).group(1)
            for cpu, n in PER_CPU.items():
                (connect_from if proto == "tcp" else send_from)(peer, cpu, n)
            time.sleep(0.6)             # a frame after the last connection
            fams = scrape(url)
            code, lines, err = w.finish(signal.SIGINT)
        assert code == 128 + signal.SIGINT, err
        out, _ = server.communicate("", timeout=10)
    finally:
        server.kill()
    truth = {int(i): d for i, d in json.loads(out.splitlines()[-1]).items()}
    return truth, lines[-1], fams, err


def by(truth: dict[str, int], part: int) -> dict[str, int]:
    """{"cpu/napi": n} -> {cpu: n} (part 0) or {napi: n} (part 1)."""
    out: dict[str, int] = {}
    for k, n in truth.items():
        v = k.split("/")[part]
        out[v] = out.get(v, 0) + n
    return out


def rows(frame) -> dict[int, dict]:
    return {w["inode"]: w for w in frame["workers"]}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_rx_cpus_equal_so_incoming_cpu_and_napi_unknown_on_plain_veth(veth):
    truth, last, fams, err = serve_and_watch(veth)
    assert "Traceback" not in err
    got = rows(last)
    assert set(got) == set(truth)
    total: dict[str, int] = {}
    for inode, t in truth.items():
        # each member's CPUs, exactly what its accepted sockets say
        assert got[inode]["rx_cpus"] == by(t, 0)
        for cpu, n in by(t, 0).items():
            total[cpu] = total.get(cpu, 0) + n
        # plain veth: no NAPI ids (the server's sockets say 0): unknown, not 0
        assert by(t, 1) == {"0": sum(t.values())}
        assert got[inode]["napi_ids"] is None
        assert got[inode]["rx_paths"][0]["napi_id"] is None
        assert sum(p["count"] for p in got[inode]["rx_paths"]) == sum(t.values())
    # and the pinned client's CPU is where they arrived, every one
    assert total == {str(c): n for c, n in PER_CPU.items()}
    assert "without NAPI ids" in last["rx_note"]
    # the queue (sk_rx_queue_mapping): veth records none of its own, and
    # the peer's tx queue t arrives as rx queue t - 1 (tx queue 0 as none),
    # as the queue policy sees it (docs/nic.md); the rest is null, said why
    queues: set = set()
    for w in last["workers"]:
        queues |= {p["rx_queue"] for p in w["rx_paths"]}
        assert set(w["rx_queues"] or {}) <= {str(q) for q in range(QUEUES - 1)}
    assert queues <= {None, *range(QUEUES - 1)}
    assert "rx_queue: this kernel" not in last["rx_note"]
    assert ("rx_queue:" in last["rx_note"]) == (None in queues), last["rx_note"]
    samples = [s for s in fams["reuseport_ctl_worker_rx_cpu"].samples
               if s.name.endswith("_total")]
    prom: dict[str, float] = {}
    for s in samples:
        prom[s.labels["cpu"]] = prom.get(s.labels["cpu"], 0) + s.value
    assert prom == {str(c): n for c, n in PER_CPU.items()}
    assert not [s for s in fams["reuseport_ctl_worker_rx_napi"].samples]   # unknown: no series


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_napi_ids_equal_so_incoming_napi_id_with_gro_on_veth(veth):
    # GRO on the receiving veth (and no TSO on the sender) makes veth
    # receive through a NAPI instance per rx queue, with real NAPI ids
    sh("ethtool", "-K", "va", "gro", "on")
    sh("ip", "netns", "exec", veth, "ethtool", "-K", "vb", "tso", "off", "gso", "off")
    truth, last, fams, err = serve_and_watch(veth)
    got = rows(last)
    ids: set[str] = set()
    for inode, t in truth.items():
        assert got[inode]["rx_cpus"] == by(t, 0)
        assert got[inode]["napi_ids"] == by(t, 1)
        ids |= set(by(t, 1))
        paths: dict[tuple[str, str], int] = {}
        for p in got[inode]["rx_paths"]:       # (cpu, napi id) over every rx queue
            k = (str(p["cpu"]), str(p["napi_id"]))
            paths[k] = paths.get(k, 0) + p["count"]
        assert paths == {tuple(k.split("/")): n for k, n in t.items()}
    assert "0" not in ids and ids
    samples = [s for s in fams["reuseport_ctl_worker_rx_napi"].samples
               if s.name.endswith("_total")]
    assert {s.labels["napi_id"] for s in samples} == ids
    assert sum(s.value for s in samples) == sum(PER_CPU.values())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_udp_rx_cpus_are_the_senders_cpu(veth):
    truth, last, fams, err = serve_and_watch(veth, proto="udp")
    got = rows(last)
    assert sum(t["datagrams"] for t in truth.values()) == sum(PER_CPU.values())
    total: dict[str, int] = {}
    for inode, t in truth.items():
        cpus = got[inode]["rx_cpus"]
        assert sum(cpus.values()) == t["datagrams"]
        for cpu, n in cpus.items():
            total[cpu] = total.get(cpu, 0) + n
        assert got[inode]["napi_ids"] is None and got[inode]["rx_queues"] is None
    assert total == {str(c): n for c, n in PER_CPU.items()}
    assert "UDP" in last["rx_note"]
