"""Steering a group with BPF: classic and extended socket-filter programs
(SO_ATTACH_REUSEPORT_CBPF/EBPF) return an index in join order; SK_REUSEPORT
programs select a socket from a REUSEPORT_SOCKARRAY, SOCKMAP or SOCKHASH;
sk_lookup programs pick a group; SO_INCOMING_CPU and the CPU and NUMA programs
tie a flow to the receiving CPU."""
from __future__ import annotations

import errno
import glob
import os
import re
import socket
import struct

from ..kernel import bpf
from ..kernel import features as F
from ..policies import cbpf
from . import programs as P
from .checks import Skip, check, expect, expect_eq
from .net import (FAMILIES, IPV4, IPV6, REFUSED, TCP, UDP, Pool, attach_cbpf, attach_ebpf,
                  counts, detach, flows, pinned, receiver, sports)

N = 4
SEL_BPF = "bpf/prog_tests/select_reuseport.c"
RP_BPF = "net/reuseport_bpf.c"


def _errno_of(fn) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno
    return 0


def _name(e: int) -> str:
    return errno.errorcode.get(e, str(e)) if e else "success"


def _steer(kind: str, proto: str, fam, pool: Pool, base: int, reverse=False,
           socks=None, port=None) -> list:
    """Group of N (or the one given), program of `kind`, flows aimed at every
    index; returns what was seen and the expected indices."""
    if socks is None:
        socks, port = pool.group(proto, fam, N)
    if kind == "cbpf":
        attach_cbpf(socks[-1], P.cbpf_sport(N, reverse))
    else:
        fd = P.load_socket_filter(P.ebpf_sport(N, reverse), "rp_v_sport")
        try:
            attach_ebpf(socks[-1], fd)
        finally:
            os.close(fd)        # the group holds the program now
    ports = sports(N, base)
    want = [(N - 1 - p % N) if reverse else p % N for p in ports]
    return flows(pool, proto, fam, socks, port, ports), want


def _every_index(kind: str) -> str:
    done = 0
    for proto in (TCP, UDP):
        for k, fam in enumerate(FAMILIES):
            with Pool() as pool:
                seen, want = _steer(kind, proto, fam, pool, 20000 + 100 * k)
                expect_eq(seen, want, f"{proto} {fam.name}: member per flow aimed at 0..{N - 1}")
                done += len(seen)
    return f"{done} flows (tcp, udp × ipv4, ipv6, v4-mapped) each reached the index " \
           f"the program returned"


@check("cbpf-steering", selftest=RP_BPF, needs=(F.SO_REUSEPORT, F.CBPF))
def cbpf_steering(ctx):
    """A classic BPF program attached with SO_ATTACH_REUSEPORT_CBPF picks the
    member: the index it returns (here sport % 4) selects the socket that
    joined the group at that position, for every index, for TCP and UDP over
    IPv4, IPv6 and v4-mapped groups."""
    return _every_index("cbpf")


@check("ebpf-steering", selftest=RP_BPF, needs=(F.SO_REUSEPORT, F.EBPF))
def ebpf_steering(ctx):
    """An eBPF socket-filter program attached with SO_ATTACH_REUSEPORT_EBPF
    picks the member the same way: its return value indexes the group in join
    order, every index reachable, TCP and UDP over IPv4, IPv6, v4-mapped."""
    return _every_index("ebpf")


@check("steering-replace", selftest=RP_BPF, needs=(F.SO_REUSEPORT, F.CBPF, F.EBPF))
def steering_replace(ctx):
    """Attaching a program to any member replaces the group's program at once:
    cBPF → reversed cBPF → eBPF → reversed eBPF, each takes effect for the next
    flow (the group has one program, not one per socket)."""
    steps = [("cbpf", False), ("cbpf", True), ("ebpf", False), ("ebpf", True), ("cbpf", False)]
    for proto in (TCP, UDP):
        with Pool() as pool:
            socks, port = pool.group(proto, IPV4, N)
            for k, (kind, rev) in enumerate(steps):
                seen, want = _steer(kind, proto, IPV4, pool, 22000 + 100 * k, rev, socks, port)
                expect_eq(seen, want, f"{proto}: after replacing with "
                                      f"{'reversed ' if rev else ''}{kind}")
    return f"{len(steps)} programs in turn on one group (tcp, udp); each replaced the last"


@check("steering-detach", selftest=RP_BPF, needs=(F.SO_REUSEPORT, F.CBPF, F.EBPF))
def steering_detach(ctx):
    """SO_DETACH_REUSEPORT_BPF removes the group's program: flows spread by
    the kernel's hash again; detaching again says ENOENT (nothing attached);
    on a socket without SO_REUSEPORT it says EINVAL."""
    for proto in (TCP, UDP):
        for kind in ("cbpf", "ebpf"):
            with Pool() as pool:
                socks, port = pool.group(proto, IPV4, N)
                if kind == "cbpf":
                    attach_cbpf(socks[0], P.cbpf_sport(N, const=0))
                else:
                    fd = P.load_socket_filter(bpf.ret_imm(0), "rp_v_zero")
                    attach_ebpf(socks[0], fd)
                    os.close(fd)
                seen = flows(pool, proto, IPV4, socks, port, count=8)
                expect_eq(counts(seen, N), [8, 0, 0, 0], f"{proto} {kind} 'return 0' before detach")
                detach(socks[2])
                seen = flows(pool, proto, IPV4, socks, port, count=32)
                per = counts(seen, N)
                expect(sum(per) == 32 and sum(1 for c in per if c) >= 2,
                       f"{proto} {kind}: 32 flows after detach, per member", per,
                       "all received, spread over ≥ 2 members (the hash)")
                expect_eq(_name(_errno_of(lambda: detach(socks[1]))), "ENOENT",
                          f"{proto}: second detach")
                plain = pool.member(proto, socket.AF_INET, "127.0.0.1", reuseport=False)
                expect_eq(_name(_errno_of(lambda: detach(plain))), "EINVAL",
                          f"{proto}: detach on a socket without SO_REUSEPORT")
    return "program gone after detach (hash spreads again); again: ENOENT; " \
           "without SO_REUSEPORT: EINVAL"


@check("steering-out-of-range", selftest=RP_BPF, needs=(F.SO_REUSEPORT, F.CBPF, F.EBPF))
def steering_out_of_range(ctx):
    """An index at or past the group's size is not an error: the kernel falls
    back to its hash, so the flow is still delivered to some member."""
    for proto in (TCP, UDP):
        for kind in ("cbpf", "ebpf"):
            with Pool() as pool:
                socks, port = pool.group(proto, IPV4, N)
                if kind == "cbpf":
                    attach_cbpf(socks[0], P.cbpf_sport(N, const=N + 3))
                else:
                    fd = P.load_socket_filter(bpf.ret_imm(N + 3), "rp_v_far")
                    attach_ebpf(socks[0], fd)
                    os.close(fd)
                per = counts(flows(pool, proto, IPV4, socks, port, count=32), N)
                expect(sum(per) == 32 and sum(1 for c in per if c) >= 2,
                       f"{proto} {kind} returning {N + 3} in a group of {N}, per member", per,
                       "all 32 delivered, spread by the hash")
    return f"index {N + 3} in a group of {N}: every flow delivered by the hash (cbpf, ebpf)"


@check("steering-needs-reuseport", selftest=RP_BPF, needs=(F.SO_REUSEPORT, F.CBPF, F.EBPF))
def steering_needs_reuseport(ctx):
    """A reuseport program attaches only to a socket with SO_REUSEPORT
    (EINVAL otherwise, bound or not); one that has it may take the program
    before bind(), and the group it then founds is steered by it."""
    prog_fd = P.load_socket_filter(bpf.ret_imm(0), "rp_v_zero")
    try:
        for proto in (TCP, UDP):
            kind = socket.SOCK_STREAM if proto == TCP else socket.SOCK_DGRAM
            with Pool() as pool:
                s = pool.add(socket.socket(socket.AF_INET, kind))
                for what, fn in (("cbpf", lambda: attach_cbpf(s, P.cbpf_sport(N, const=0))),
                                 ("ebpf", lambda: attach_ebpf(s, prog_fd))):
                    expect_eq(_name(_errno_of(fn)), "EINVAL",
                              f"{proto} {what} on an unbound socket without SO_REUSEPORT")
                s.bind(("127.0.0.1", 0))
                for what, fn in (("cbpf", lambda: attach_cbpf(s, P.cbpf_sport(N, const=0))),
                                 ("ebpf", lambda: attach_ebpf(s, prog_fd))):
                    expect_eq(_name(_errno_of(fn)), "EINVAL",
                              f"{proto} {what} on a bound socket without SO_REUSEPORT")
                # Before bind, with SO_REUSEPORT: the program founds the group.
                first = pool.add(socket.socket(socket.AF_INET, kind))
                first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                attach_cbpf(first, P.cbpf_sport(N))
                first.bind(("127.0.0.1", 0))
                if proto == TCP:
                    first.listen()
                first.setblocking(False)
                port = first.getsockname()[1]
                socks = [first] + pool.group(proto, IPV4, N - 1, port)[0]
                ports = sports(N, 23000)
                expect_eq(flows(pool, proto, IPV4, socks, port, ports), [p % N for p in ports],
                          f"{proto}: group steered by a program attached before bind")
    finally:
        os.close(prog_fd)
    return "EINVAL without SO_REUSEPORT (bound or not), cbpf and ebpf; attached before " \
           "bind it steers the group"


# --- SK_REUSEPORT with a map ----------------------------------------------------------

MAP_KINDS = {"sockarray": bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, "sockmap": bpf.MAP_TYPE_SOCKMAP,
             "sockhash": bpf.MAP_TYPE_SOCKHASH}
SEL_BASE = 24000


def _sk_reuseport(kind: str) -> str:
    m = bpf.map_create(MAP_KINDS[kind], 4, 8, N + 1, f"rp_v_{kind}"[:15])
    b = None
    try:
        b = P.compile_bcc(P.SELECT_C, {"BASE": SEL_BASE, "N": N, "MAP_FD": m})
        fn = b.load_func(b"rp_vselect", bpf.PROG_TYPE_SK_REUSEPORT)
        res = b[b"rp_vres"]
        done = []
        for proto in (TCP, UDP):
            for fam in (IPV4, IPV6):
                what = f"{proto} {fam.name} via {kind}"
                with Pool() as pool:
                    socks, port = pool.group(proto, fam, N)
                    for i, s in enumerate(socks):
                        bpf.map_update(m, bpf.u32(i), bpf.u64(s.fileno()))
                    attach_ebpf(socks[0], fn.fd)
                    ports = [SEL_BASE + i for i in (3, 1, 0, 2)]
                    expect_eq(flows(pool, proto, fam, socks, port, ports), [3, 1, 0, 2],
                              f"{what}: member per flow aimed at keys 3, 1, 0, 2")
                    # The empty key: the helper fails, the program passes, the hash picks.
                    res[res.Key(0)] = res.Leaf(0)
                    got = flows(pool, proto, fam, socks, port, [SEL_BASE + N])
                    expect(got[0] in range(N), f"{what}: flow aimed at an empty key", got[0],
                           "delivered by the kernel's hash")
                    ret = struct.unpack("=q", struct.pack("=Q", res[res.Key(0)].value))[0]
                    expect_eq(_name(-ret), "ENOENT",
                              f"{what}: bpf_sk_select_reuseport() on the empty key")
                    # SK_DROP: TCP is refused, a datagram dropped.
                    got = flows(pool, proto, fam, socks, port, [SEL_BASE + N + 1], timeout=0.3)
                    expect_eq(got[0], REFUSED if proto == TCP else None,
                              f"{what}: flow the program answers SK_DROP")
                    for i in range(N):
                        try:
                            bpf.map_delete(m, bpf.u32(i))
                        except OSError:
                            pass
                done.append(f"{proto}/{fam.name}")
        return f"{kind}: every key reached its socket; empty key ENOENT then hash; " \
               f"SK_DROP refused/dropped ({', '.join(done)})"
    finally:
        if b is not None:
            b.cleanup()
        os.close(m)


def _map_check(kind: str, doc: str):
    def fn(ctx):
        return _sk_reuseport(kind)
    fn.__doc__ = doc
    needs = (F.SO_REUSEPORT, F.SK_REUSEPORT, F.BCC) + ((F.SOCKARRAY,) if kind == "sockarray" else ())
    check(f"sk-reuseport-{kind}", selftest=SEL_BPF, needs=needs)(fn)


_map_check("sockarray", """A BPF_PROG_TYPE_SK_REUSEPORT program selects the member with
bpf_sk_select_reuseport() on a REUSEPORT_SOCKARRAY: every key reaches the socket stored
there (TCP, UDP, IPv4, IPv6); an empty key makes the helper return -ENOENT and, with
SK_PASS, the kernel's hash picks; SK_DROP refuses the connection / drops the datagram.""")
_map_check("sockmap", """The same selection from a SOCKMAP holding the group's sockets:
every key reaches its socket, an empty key is -ENOENT then the hash, SK_DROP drops.""")
_map_check("sockhash", """The same selection from a SOCKHASH keyed by slot: every key
reaches its socket, a missing key is -ENOENT then the hash, SK_DROP drops.""")


# --- sk_lookup then reuseport ----------------------------------------------------------

SK_LOOKUP_F_NO_REUSEPORT = 1 << 1


@check("sk-lookup-then-reuseport", selftest="bpf/prog_tests/sk_lookup.c",
       needs=(F.SO_REUSEPORT, F.CBPF, F.SK_LOOKUP, F.BCC))
def sk_lookup_then_reuseport(ctx):
    """An sk_lookup program that assigns a flow to a member of a reuseport
    group (bpf_sk_assign) picks the group, and the group's own program then
    picks the member; with BPF_SK_LOOKUP_F_NO_REUSEPORT the assigned socket
    itself receives. TCP and UDP, to a port nothing is bound to."""
    m = bpf.map_create(bpf.MAP_TYPE_SOCKMAP, 4, 8, 1, "rp_v_lookup")
    b = link = ns = None
    try:
        b = P.compile_bcc(P.LOOKUP_C, {"MAP_FD": m})
        fn = b.load_func(b"rp_vlookup", bpf.PROG_TYPE_SK_LOOKUP, attach_type=bpf.ATTACH_SK_LOOKUP)
        cfg = b[b"rp_vcfg"]
        ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        link = bpf.link_create(fn.fd, ns, bpf.ATTACH_SK_LOOKUP)
        for proto in (TCP, UDP):
            with Pool() as pool:
                socks, port = pool.group(proto, IPV4, 2)
                attach_cbpf(socks[0], P.cbpf_sport(2))
                spare = pool.member(proto, socket.AF_INET, "127.0.0.1", reuseport=False,
                                    listen=False)
                qport = spare.getsockname()[1]
                pool.socks.remove(spare)
                spare.close()
                bpf.map_update(m, bpf.u32(0), bpf.u64(socks[0].fileno()))
                cfg[cfg.Key(1)] = cfg.Leaf(qport)
                for flags, base in ((0, 25000), (SK_LOOKUP_F_NO_REUSEPORT, 25100)):
                    cfg[cfg.Key(0)] = cfg.Leaf(flags)
                    ports = [p + 2 * (j // 2) for j, p in enumerate(sports(2, base) * 2)]
                    want = [0] * len(ports) if flags else [p % 2 for p in ports]
                    seen = flows(pool, proto, IPV4, socks, qport, ports)
                    expect_eq(seen, want, f"{proto} to unbound port {qport}, "
                                          f"{'NO_REUSEPORT' if flags else 'no flags'}: member per flow")
                bpf.map_delete(m, bpf.u32(0))
    finally:
        if link is not None:
            os.close(link)
        if ns is not None:
            os.close(ns)
        if b is not None:
            b.cleanup()
        os.close(m)
    return "assigned group: its cBPF picked the member (both reached); " \
           "NO_REUSEPORT: the assigned socket took all (tcp, udp)"


# --- CPU, NUMA, SO_INCOMING_CPU --------------------------------------------------------

def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@check("cbpf-cpu-steering", selftest="net/reuseport_bpf_cpu.c", needs=(F.SO_REUSEPORT, F.CBPF))
def cbpf_cpu_steering(ctx):
    """One member per CPU and a cBPF program returning the receiving CPU
    (SKF_AD_CPU): a flow sent from CPU c (the loopback receive path runs on
    the sender's CPU) reaches member c, for TCP and UDP, IPv4 and IPv6."""
    cpus = _cpus()
    n = max(cpus) + 1
    for proto in (TCP, UDP):
        for fam in (IPV4, IPV6):
            with Pool() as pool:
                socks, port = pool.group(proto, fam, n)
                attach_cbpf(socks[0], cbpf.cpu_program(n))
                for c in cpus:
                    with pinned(c):
                        seen = flows(pool, proto, fam, socks, port, count=4)
                    expect_eq(seen, [c] * 4, f"{proto} {fam.name}: members receiving flows "
                                             f"sent from CPU {c}")
    return f"flows from each of CPUs {cpus} reached that CPU's member (tcp, udp × ipv4, ipv6)"


def _nodes() -> dict[int, list[int]]:
    allowed = set(_cpus())
    out = {}
    for d in glob.glob("/sys/devices/system/node/node[0-9]*"):
        node = int(re.search(r"(\d+)$", d).group(1))
        with open(os.path.join(d, "cpulist")) as f:
            text = f.read().strip()
        cpus = set()
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        out[node] = sorted(cpus & allowed)
    return out or {0: sorted(allowed)}


@check("ebpf-numa-steering", selftest="net/reuseport_bpf_numa.c", needs=(F.SO_REUSEPORT, F.EBPF))
def ebpf_numa_steering(ctx):
    """One member per NUMA node and an eBPF program returning
    bpf_get_numa_node_id(): a flow sent from a CPU of node k reaches member k
    (on a one-node machine every flow reaches member 0)."""
    nodes = _nodes()
    if sorted(nodes) != list(range(len(nodes))):
        raise Skip(f"NUMA nodes {sorted(nodes)} are not numbered 0..{len(nodes) - 1}")
    fd = P.load_socket_filter(P.ebpf_numa(), "rp_v_numa")
    try:
        for proto in (TCP, UDP):
            for fam in (IPV4, IPV6):
                with Pool() as pool:
                    socks, port = pool.group(proto, fam, len(nodes))
                    attach_ebpf(socks[0], fd)
                    for node, cpus in nodes.items():
                        for c in cpus[:2]:
                            with pinned(c):
                                seen = flows(pool, proto, fam, socks, port, count=3)
                            expect_eq(seen, [node] * 3, f"{proto} {fam.name}: members "
                                                        f"receiving flows from CPU {c} (node {node})")
    finally:
        os.close(fd)
    return f"{len(nodes)} node(s) {dict(nodes)}: flows reached their node's member (tcp, udp × ipv4, ipv6)"


@check("so-incoming-cpu", selftest="net/so_incoming_cpu.c", needs=(F.SO_REUSEPORT,))
def so_incoming_cpu(ctx):
    """With no program, a member whose SO_INCOMING_CPU equals the receiving
    CPU is preferred by the group's hash: one listener per CPU, each set to
    its CPU (before listen(), or after), takes every connection made from that
    CPU, and the accepted child reports that CPU in SO_INCOMING_CPU."""
    cpus = _cpus()
    if len(cpus) < 2:
        raise Skip("needs 2 CPUs to tell the listeners apart; this process may use one")
    for when in ("before listen", "after listen"):
        with Pool() as pool:
            socks = []
            port = 0
            for c in cpus:
                s = pool.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if when == "before listen":
                    s.setsockopt(socket.SOL_SOCKET, bpf.SO_INCOMING_CPU, c)
                s.bind(("127.0.0.1", port))
                port = s.getsockname()[1]
                s.listen(64)
                s.setblocking(False)
                socks.append(s)
            if when == "after listen":
                for c, s in zip(cpus, socks):
                    s.setsockopt(socket.SOL_SOCKET, bpf.SO_INCOMING_CPU, c)
            for i, c in enumerate(cpus):
                with pinned(c):
                    got, kids = [], []
                    for _ in range(8):
                        pool.send(TCP, IPV4, port)
                        got.append(receiver(socks, TCP, keep=kids))
                for k in kids:
                    pool.add(k)
                expect_eq(got, [i] * 8, f"SO_INCOMING_CPU set {when}: listener per "
                                        f"connection made from CPU {c}")
                kid_cpus = [k.getsockopt(socket.SOL_SOCKET, bpf.SO_INCOMING_CPU) for k in kids]
                expect_eq(kid_cpus, [c] * 8, f"SO_INCOMING_CPU of the children accepted "
                                             f"from CPU {c}")
    return f"each of CPUs {cpus} got its own listener's connections (set before and after listen)"
