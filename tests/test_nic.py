"""`reuseport-ctl nic` and the CPU-aligned policies (cpu, queue, numa).

Real interfaces only: a 4-queue veth pair across two network namespaces made
here, the loopback, and eth0 read only (nothing here writes to the host's
interfaces: --apply runs on the test's own veth)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import uuid

import pytest

from conftest import _setns
from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel import nic as knic
from reuseport_ctl.nic.model import Irq, Nic, Rss, RxQueue, Topology, TxQueue, Worker
from reuseport_ctl.nic.verdict import judge, plan
from reuseport_ctl.policies import parse_policy
from reuseport_ctl.policies.selector import attach_policy, numa_table, NODE_DIR
from reuseport_ctl.workers.supervisor import parse_cpus
from test_policies import closing, drive, group

TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or
                              not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0 and 1")
SERVER, CLIENT = "10.199.0.1", "10.199.0.2"
QUEUES = 4


# --- pure functions -------------------------------------------------------------

def test_cpu_lists_and_masks():
    assert knic.parse_cpulist("0-2,5") == [0, 1, 2, 5]
    assert knic.format_cpulist([5, 0, 1, 2]) == "0-2,5"
    assert knic.parse_mask("00000000,00000003") == [0, 1]
    assert knic.parse_mask("0") == []
    assert knic.format_mask([0, 33]) == "200000001"
    assert knic.parse_mask(knic.format_mask([0, 33])) == [0, 33]


def test_irq_names_map_to_queues():
    assert knic.irq_role("virtio2-input.0") == ("rx", 0)
    assert knic.irq_role("virtio2-output.3") == ("tx", 3)
    assert knic.irq_role("eth0-TxRx-7") == ("combined", 7)
    assert knic.irq_role("mlx5_comp5@pci:0000:3b:00.0") == ("combined", 5)
    assert knic.irq_role("ena-Tx-Rx-2") == ("combined", 2)
    assert knic.irq_role("virtio2-config") == ("other", None)


def _nic(rx, tx=(), irqs=(), kind="device"):
    return Nic(name="t0", ifindex=9, kind=kind, driver="x", bus_info=None, speed_mbps=None,
               operstate="UP", num_rx_queues=len(rx), num_tx_queues=len(tx),
               real_rx_queues=len(rx), real_tx_queues=len(tx), channels=None,
               rss=Rss(missing="none"), rx=list(rx), tx=list(tx), irqs=list(irqs))


def test_plan_one_queue_with_irq_adds_rps():
    """One queue, two CPUs: the IRQ on one CPU, RPS over both."""
    n = _nic([RxQueue(0, [], irq=38)], [TxQueue(0, None)],
             [Irq(38, "virtio2-input.0", [0, 1], [1], [0, 9], "rx", 0)])
    ch = plan(n, [0, 1])
    assert [(c.path, c.new) for c in ch] == [("/proc/irq/38/smp_affinity_list", "0"),
                                            ("/sys/class/net/t0/queues/rx-0/rps_cpus", "3")]
    assert ch[1].command == "echo 3 > /sys/class/net/t0/queues/rx-0/rps_cpus"
    v = judge(n, Topology([0, 1], {0: 0, 1: 0}))
    assert v.receiving_cpus == [1]                  # the effective affinity
    assert any("CPU 0 receives nothing" in f for f in v.findings)


def test_a_pending_irq_move_counts_where_the_affinity_says():
    """After a write to smp_affinity_list, x86 moves an MSI at its next
    interrupt: effective_affinity_list still names the old CPU until then."""
    n = _nic([RxQueue(0, [], irq=40)], irqs=[Irq(40, "virtio7-input.0", [3], [0], [5, 0, 0, 0],
                                                 "rx", 0)])
    assert judge(n, Topology([0, 1, 2, 3], {c: 0 for c in range(4)})).receiving_cpus == [3]


def test_plan_virtual_queues_one_cpu_each():
    n = _nic([RxQueue(q, []) for q in range(4)], [TxQueue(q, []) for q in range(4)],
             kind="veth")
    got = {c.path.split("/")[-2]: c.new for c in plan(n, [0, 1])}
    assert got == {"rx-0": "1", "rx-1": "2", "rx-2": "1", "rx-3": "2",
                   "tx-0": "1", "tx-1": "2"}
    assert plan(_nic([RxQueue(0, [])], kind="loopback"), [0, 1]) == []


def test_verdict_names_misaligned_workers():
    n = _nic([RxQueue(0, [], irq=40)], irqs=[Irq(40, "t0-rx-0", [0], [0], [5, 0], "rx", 0)])
    topo = Topology([0, 1], {0: 0, 1: 0})
    v = judge(n, topo, [Worker(0, 100, [1]), Worker(1, 101, [0, 1])])
    text = " ".join(v.findings)
    assert "worker 1 (pid 101, CPU 0-1) may run on several CPUs" in text
    assert "CPU 0 receives traffic but runs no worker" in text
    assert "worker 0 on CPU 1 is where no traffic is received" in text
    assert not v.aligned and v.run_command.startswith("reuseport-ctl run")
    ok = judge(n, topo, [Worker(0, 100, [0])])
    assert ok.aligned and not ok.changes and ok.run_command is None


def test_numa_table_lists_each_nodes_slots():
    t = numa_table([0, 1, 0, 1])
    def slots(node):
        count, first = t[node] >> 16, t[node] & 0xffff
        return t[first:first + count]
    assert slots(0) == [0, 2] and slots(1) == [1, 3]
    assert slots(5) == [0, 1, 2, 3]                 # a node without workers: every slot
    assert len(t) == NODE_DIR + 8


def test_numa_slots_come_from_the_workers_affinity_two_fake_nodes():
    """attach numa on another server: a slot's node is where its worker may
    run (its affinity), not where this tool's i-th CPU is. Two fake nodes:
    CPUs 0-1 on node 0, 2-3 on node 1."""
    from reuseport_ctl.kernel.process import node_of, single_node
    cpu_node = {0: 0, 1: 0, 2: 1, 3: 1}
    assert single_node({2, 3}, cpu_node) == 1 and single_node({0}, cpu_node) == 0
    assert single_node({1, 2}, cpu_node) == -1          # spans both: no node of its own
    assert node_of(os.getpid(), {c: 0 for c in os.sched_getaffinity(0)}) == 0
    # workers of slots 0..3 bound to nodes 1, 0, any, 1
    t = numa_table([1, 0, -1, 1])

    def slots(node):
        count, first = t[node] >> 16, t[node] & 0xffff
        return t[first:first + count]
    assert slots(0) == [1] and slots(1) == [0, 3]
    assert slots(7) == [0, 1, 2, 3]                  # unbound slot 2: only in "every"


def test_cpus_auto():
    assert parse_cpus("auto", usable=[0, 1], workers=2) == (0, 1)
    with pytest.raises(UserError, match="CPU 2 is not usable"):
        parse_cpus("auto", usable=[0, 1], workers=3)


# --- a 4-queue veth pair across two namespaces -----------------------------------

def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def in_ns(ns, *cmd) -> str:
    """A command in a namespace through `ip netns exec`, which also mounts a
    sysfs of that namespace (the test process's /sys is the host's)."""
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True,
                          text=True).stdout


@contextlib.contextmanager
def entered(ns):
    """This thread in namespace ns: sockets made here stay there."""
    orig = os.open("/proc/self/ns/net", os.O_RDONLY)
    new = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(new)
        yield
    finally:
        _setns(orig)
        os.close(new)
        os.close(orig)


@pytest.fixture
def veth(netns):
    """va (server side, in the test's netns) <-> vb (client side, in a second
    netns), QUEUES rx and tx queues each. Yields (server ns, client ns)."""
    peer = f"rpctl-c-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", peer)
    try:
        sh("ip", "link", "add", "va", "numtxqueues", str(QUEUES), "numrxqueues", str(QUEUES),
           "type", "veth", "peer", "name", "vb", "netns", peer,
           "numtxqueues", str(QUEUES), "numrxqueues", str(QUEUES))
        sh("ip", "addr", "add", f"{SERVER}/24", "dev", "va")
        sh("ip", "link", "set", "va", "up")
        sh("ip", "-n", peer, "addr", "add", f"{CLIENT}/24", "dev", "vb")
        sh("ip", "-n", peer, "link", "set", "vb", "up")
        sh("ip", "-n", peer, "link", "set", "lo", "up")
        # static neighbours: no datagram waits for ARP and leaves from another CPU
        mac = lambda ns, dev: json.loads(in_ns(ns, "ip", "-j", "link", "show", dev))[0]["address"]  # noqa
        sh("ip", "neigh", "replace", CLIENT, "lladdr", mac(peer, "vb"), "dev", "va",
           "nud", "permanent")
        sh("ip", "-n", peer, "neigh", "replace", SERVER, "lladdr", mac(netns, "va"), "dev", "vb",
           "nud", "permanent")
        yield netns, peer
    finally:
        subprocess.run(["ip", "netns", "del", peer], check=False)


def masks(ns, dev):
    out = {}
    for kind, f in (("rx", "rps_cpus"), ("tx", "xps_cpus")):
        for q in range(QUEUES):
            out[f"{kind}-{q}"] = in_ns(ns, "cat", f"/sys/class/net/{dev}/queues/{kind}-{q}/{f}").strip()
    return out


def nic_json(cli, *args):
    p = cli("nic", *args, "--json", check=True)
    return json.loads(p.stdout)


def test_nic_reads_the_veth_we_made(veth, cli):
    ns, _ = veth
    in_ns(ns, "sh", "-c", "echo 2 > /sys/class/net/va/queues/rx-1/rps_cpus")
    d = nic_json(cli, "va")
    i = d["interfaces"][0]
    assert i["name"] == "va" and i["kind"] == "veth" and i["driver"] == "veth"
    assert (i["num_rx_queues"], i["num_tx_queues"]) == (QUEUES, QUEUES)
    assert (i["real_rx_queues"], i["real_tx_queues"]) == (QUEUES, QUEUES)
    assert (i["channels"]["rx"], i["channels"]["tx"]) == (QUEUES, QUEUES)
    assert i["irqs"] == [] and all(q["irq"] is None for q in i["rx"])
    assert "no RSS" in i["rss"]["missing"]
    want = masks(ns, "va")
    assert {f"rx-{q['index']}": q["rps_cpus"] for q in i["rx"]} == \
        {k: knic.parse_mask(v) for k, v in want.items() if k.startswith("rx")}
    assert {f"tx-{q['index']}": q["xps_cpus"] for q in i["tx"]} == \
        {k: knic.parse_mask(v) for k, v in want.items() if k.startswith("tx")}
    assert i["verdict"]["queues"][1]["receives_on"] == [1]       # the RPS we set
    assert d["topology"]["cpus"] == knic.online_cpus()


def test_nic_loopback(netns, cli):
    i = nic_json(cli, "lo")["interfaces"][0]
    assert i["kind"] == "loopback" and i["real_rx_queues"] == 1
    assert i["verdict"]["changes"] == []
    assert "loopback" in i["verdict"]["findings"][0]


def test_nic_eth0_read_only(cli):
    if not os.path.exists("/sys/class/net/eth0"):
        pytest.skip("no eth0 here")
    i = nic_json(cli, "eth0")["interfaces"][0]
    queues = os.listdir("/sys/class/net/eth0/queues")
    assert i["real_rx_queues"] == sum(q.startswith("rx-") for q in queues)
    assert i["real_tx_queues"] == sum(q.startswith("tx-") for q in queues)
    drv = os.path.basename(os.path.realpath("/sys/class/net/eth0/device/driver"))
    assert i["driver"] == drv
    names = {}
    with open("/proc/interrupts") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if head.strip().isdigit():
                names[int(head)] = rest.split()[-1]
    for irq in i["irqs"]:
        assert irq["name"] == names[irq["number"]]
        with open(f"/proc/irq/{irq['number']}/smp_affinity_list") as f:
            assert irq["affinity"] == knic.parse_cpulist(f.read())
    for q in i["rx"]:
        with open(f"/sys/class/net/eth0/queues/rx-{q['index']}/rps_cpus") as f:
            assert q["rps_cpus"] == knic.parse_mask(f.read())
    if drv == "virtio_net":
        # the IRQs of eth0's virtio function, as /proc/interrupts names them
        dev = os.path.basename(os.path.realpath("/sys/class/net/eth0/device"))
        want = {n for n, name in names.items() if name.startswith(dev + "-")}
        assert {x["number"] for x in i["irqs"]} == want
        assert i["rx"][0]["irq"] is not None


def test_nic_unknown_interface(netns, cli):
    p = cli("nic", "nosuch0")
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "no interface 'nosuch0'" in p.stderr


def test_apply_needs_root(monkeypatch):
    """Not root: one sentence, non-zero exit, nothing read or written.
    (The workspace's venv is root's, so the check runs in-process as uid 1000.)"""
    from click.testing import CliRunner
    from reuseport_ctl.cli import main
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for flag in ("--apply", "--restore"):
        r = CliRunner().invoke(main, ["nic", "lo", flag, "--yes"])
        assert r.exit_code == 1 and "only root" in r.output, r.output
        assert r.output.strip().count("\n") == 0


def test_apply_then_restore_leaves_every_mask(veth, cli):
    ns, _ = veth
    in_ns(ns, "sh", "-c", "echo 2 > /sys/class/net/va/queues/rx-0/rps_cpus")
    before = masks(ns, "va")
    planned = nic_json(cli, "va")["interfaces"][0]["verdict"]["changes"]
    assert planned
    cli("nic", "va", "--apply", "--yes", check=True)
    after = masks(ns, "va")
    for c in planned:
        q = c["path"].split("/")[-2]
        assert knic.parse_mask(after[q]) == knic.parse_mask(c["new"]), (q, after[q], c)
    assert after != before
    assert os.path.exists("/var/cache/reuseport-ctl/nic-va.json")
    assert nic_json(cli, "va")["interfaces"][0]["verdict"]["changes"] == []
    cli("nic", "va", "--restore", check=True)
    assert masks(ns, "va") == before
    assert not os.path.exists("/var/cache/reuseport-ctl/nic-va.json")
    p = cli("nic", "va", "--restore")
    assert p.returncode != 0 and "nothing to restore" in p.stderr


# --- the policies over the veth ---------------------------------------------------

def send_from(ns, cpu, port, count):
    """count datagrams from namespace ns, sent while pinned to cpu."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        with entered(ns):
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
        for i, c in enumerate(socks):
            c.sendto(b"x%d" % i, (SERVER, port))
            c.close()
    finally:
        os.sched_setaffinity(0, old)


def received(socks):
    got = [0] * len(socks)
    for i, s in enumerate(socks):
        while True:
            try:
                s.recv(64)
            except BlockingIOError:
                break
            got[i] += 1
    return got


def wait_received(socks, total, seconds=5.0):
    import time
    got = [0] * len(socks)
    deadline = time.monotonic() + seconds
    while sum(got) < total and time.monotonic() < deadline:
        got = [a + b for a, b in zip(got, received(socks))]
        time.sleep(0.01)
    return got


@TWO_CPUS
def test_cpu_policy_client_cpu_reaches_that_worker(veth):
    """veth has no IRQs: a datagram is received on the CPU that sent it, so
    with cpu a client pinned to CPU c reaches worker c, every time."""
    _, client_ns = veth
    socks, port = group(2, "udp", host=SERVER)
    sel = attach_policy(parse_policy("cpu"), socks)
    try:
        for cpu in (0, 1):
            send_from(client_ns, cpu, port, 50)
            got = wait_received(socks, 50)
            assert got[cpu] == 50 and sum(got) == 50, (cpu, got)
    finally:
        sel.close()
        closing(socks)


@TWO_CPUS
def test_queue_policy_sends_each_rx_queue_to_its_worker(veth):
    """How the receive queue is made deterministic: the client's XPS masks
    choose vb's tx queue by the sending CPU (CPU 0 -> tx-3, CPU 1 -> tx-2),
    and veth_xmit hands the skb to the peer with that queue_mapping. veth
    records no rx queue of its own, so the kernel (RPS, skb_get_rx_queue)
    reads queue_mapping t as rx queue t - 1: tx-3 arrives on rx queue 2 and
    tx-2 on rx queue 1. The queue policy (queue % 4 -> slot) must then send
    CPU 0's datagrams to slot 2 and CPU 1's to slot 1: not the CPU's index."""
    _, client_ns = veth
    for q, m in enumerate(("0", "0", "2", "1")):
        in_ns(client_ns, "sh", "-c", f"echo {m} > /sys/class/net/vb/queues/tx-{q}/xps_cpus")
    socks, port = group(QUEUES, "udp", host=SERVER)
    sel = attach_policy(parse_policy("queue"), socks)
    try:
        for cpu, slot in ((0, 2), (1, 1)):
            send_from(client_ns, cpu, port, 40)
            got = wait_received(socks, 40)
            assert got[slot] == 40 and sum(got) == 40, (cpu, got)
        assert sel.selections() == [0, 40, 40, 0]
    finally:
        sel.close()
        closing(socks)


def test_queue_policy_on_loopback_is_queue_zero(netns):
    """Loopback records no queue: everything is queue 0, slot 0."""
    socks, port = group(3, "udp")
    sel = attach_policy(parse_policy("queue"), socks)
    got = drive(socks, port, 30, "udp")
    assert got == [30, 0, 0], got
    sel.close()
    closing(socks)


def test_numa_policy_keeps_traffic_on_the_node(netns, monkeypatch):
    """The program asks bpf_get_numa_node_id() (node 0 here, the only one)
    and picks among that node's slots. With every CPU on node 0 the whole
    group shares; with a CPU -> node map that puts CPU 1 alone on node 0,
    only the slots pinned to CPU 1 may receive."""
    socks, port = group(4, "udp")
    sel = attach_policy(parse_policy("numa"), socks, cpus=(0, 1))
    got = drive(socks, port, 400, "udp")
    assert sum(got) == 400 and all(got), got
    sel.close()
    monkeypatch.setattr(knic, "cpu_nodes", lambda: {0: 1, 1: 0})
    sel = attach_policy(parse_policy("numa"), socks, cpus=(0, 1))
    got = drive(socks, port, 400, "udp")
    assert got[0] == got[2] == 0 and got[1] > 0 and got[3] > 0, got
    sel.close()
    closing(socks)


@TWO_CPUS
def test_run_cpu_auto_pins_worker_k_to_cpu_k(netns, cli):
    p = cli("run", "--workers", "2", "--policy", "cpu", "--cpus", "auto", "--proto", "udp",
            "--port", "0", "--load", "100", "--json", check=True)
    rep = json.loads(p.stdout)
    assert [w["cpu"] for w in rep["workers"]] == [0, 1]


def test_cpu_policy_with_more_workers_than_cpus(netns, cli):
    n = os.cpu_count()
    p = cli("run", "--workers", str(n + 2), "--policy", "cpu", "--port", "0", "--load", "1")
    assert p.returncode != 0
    assert f"worker{'s' if True else ''} {n}, {n + 1}" in p.stderr
    assert p.stderr.strip().count("\n") == 0


# --- --rss-weights / --cpus (the RSS table itself is tested in a VM: test_vm.py) --------

def test_weights_table_is_ethtools():
    from reuseport_ctl.kernel.nic import weights_table
    assert weights_table(8, [1, 0, 0, 0]) == [0] * 8
    assert weights_table(8, [0, 1, 0, 0]) == [1] * 8
    assert weights_table(8, [1, 1, 1, 1]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert weights_table(7, [1, 2]) == [0, 0, 1, 1, 1, 1, 1]      # ethtool's rounding


def test_rss_weights_plan_a_table_change():
    from reuseport_ctl.nic.model import Nic, Rss, RxQueue
    from reuseport_ctl.nic.verdict import rss_change
    n = Nic("eth9", 9, "device", "virtio_net", None, None, "UP", 4, 4, 4, 4, None,
            Rss(indirection=[0, 1, 2, 3] * 2), [RxQueue(q, []) for q in range(4)], [], [])
    c = rss_change(n, [1, 0, 0, 0])
    assert c.path == "ethtool:eth9:indir" and c.old == "0,1,2,3,0,1,2,3"
    assert c.new == "0,0,0,0,0,0,0,0" and c.command == "ethtool -X eth9 weight 1 0 0 0"
    assert rss_change(n, [1, 1, 1, 1]).new == "0,0,1,1,2,2,3,3"
    n.rss.indirection = [0] * 8
    assert rss_change(n, [1, 0, 0, 0]) is None


@pytest.mark.parametrize("args,needle", [
    (["--rss-weights", "1,x"], "is not a list of queue weights"),
    (["--rss-weights", "0,0"], "is not a list of queue weights"),
    (["--cpus", "9999"], "which is not online"),
    (["--cpus", "a"], "is not a CPU list"),
])
def test_nic_plan_options_bad_input(cli, args, needle):
    p = cli("nic", "lo", *args)
    assert p.returncode == 1 and needle in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_rss_weights_on_a_device_without_a_table(cli):
    p = cli("nic", "lo", "--rss-weights", "1")
    assert p.returncode == 1 and "needs an RSS indirection table" in p.stderr
