"""Attach a policy to a reuseport group; the Selector owns what it made.

The group is given as its member sockets in slot order (TCP: listening, UDP:
bound). For eBPF policies slot i is key i of the REUSEPORT_SOCKARRAY; for
cBPF policies it is the i-th socket to have joined the group.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

from ..errors import UserError
from ..kernel import bpf
from ..kernel import reuseport
from . import Policy, cbpf
from .sockarray import SockArray
from .tables import slot_table

MAX_SLOTS = 256
LEAST_MAX_SLOTS = 64       # bpf/select.c: the verifier unrolls least-loaded's scan
TABLE_SIZE = 1024
POLICY_MACRO = {"hash": 1, "threshold": 2, "consistent": 3, "round-robin": 4,
                "weighted": 4, "least-loaded": 5, "drain": 1, "queue": 6, "numa": 7,
                "least-conns": 8, "napi": 9}
SCANS = ("least-loaded", "least-conns")     # policies whose program scans every slot
# least-conns: its raw tracepoint programs (bpf/conns.h) -> where they attach
CONNS_PROGRAMS = {"lc_ready": ("rp_lc_ready", "sk_data_ready"),
                  "lc_state": ("rp_lc_state", "inet_sock_set_state")}
NAPI_MAX = 1024            # napi: NAPI ids remembered (one per receive queue seen)
NODE_DIR = 64              # numa: table[0..NODE_DIR) is the node directory
assert NODE_DIR + 2 * MAX_SLOTS <= TABLE_SIZE   # numa's table fits for every group



@dataclass
class Selector:
    policy: Policy
    n: int
    prog_fd: int | None = None
    maps: dict[str, int] = field(default_factory=dict)
    member: socket.socket | None = None      # a group socket to detach through
    links: dict[str, int] = field(default_factory=dict)   # least-conns: raw tracepoint links
    _bpf: object = None                       # the bcc.BPF that owns prog and maps
    _socks: SockArray | None = None           # eBPF: the socket array we made

    def selections(self) -> list[int] | None:
        fd = self.maps.get("selections")
        return None if fd is None else read_selections(fd, self.n)

    def release(self) -> None:
        """Close our handles; an attached program stays with the group."""
        for fd in self.links.values():       # detaches the tracepoints (unless pinned)
            os.close(fd)
        self.links.clear()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._socks is not None:
            self._socks.close()
            self._socks = None
        self.maps.clear()
        self.prog_fd = None

    def close(self) -> None:
        """Detach from the group (the kernel's hash decides again), release."""
        if self.member is not None and self.policy.kind != "none":
            reuseport.detach_if_any(self.member)
        self.member = None
        if self._socks is not None:
            self._socks.empty(self.n)
        self.release()


def read_fallbacks(config_fd: int) -> int:
    """How often the program found its chosen slot empty (its socket closed),
    so the kernel's hash decided: config[2] in bpf/select.c."""
    raw = bpf.map_lookup(config_fd, bpf.u32(2), 8)
    return struct.unpack("=Q", raw)[0] if raw else 0


def read_no_napi(config_fd: int) -> int:
    """napi: packets that came with no NAPI id, so the kernel's hash decided
    (config[3] in bpf/select.c)."""
    raw = bpf.map_lookup(config_fd, bpf.u32(3), 8)
    return struct.unpack("=Q", raw)[0] if raw else 0


def read_napi_order(napi_fd: int) -> dict[int, int]:
    """napi: NAPI id -> the order it first appeared in (its table index is
    that modulo the table's length)."""
    return {struct.unpack("=I", k)[0]: struct.unpack("=I", v)[0]
            for k, v in bpf.map_items(napi_fd, 4, 4)}


def write_table(table_fd: int, config_fd: int, table: list[int]) -> None:
    """Replace the program's table while it runs: the entries first, then
    the length, so a lookup meanwhile still finds a slot of one table or
    the other."""
    if len(table) > TABLE_SIZE:
        raise UserError(f"the policy's table has {len(table)} entries, more than {TABLE_SIZE}.")
    for i, slot in enumerate(table):
        bpf.map_update(table_fd, bpf.u32(i), bpf.u32(slot))
    bpf.map_update(config_fd, bpf.u32(0), bpf.u64(len(table)))


def attach_cbpf(policy: Policy, sock: socket.socket, n: int) -> None:
    """(Re)attach a cBPF policy for a group of n sockets."""
    _attach_cbpf(policy, sock, n)


def read_selections(map_fd: int, n: int) -> list[int]:
    out = []
    for slot in range(n):
        raw = bpf.map_lookup(map_fd, bpf.u32(slot), 8)
        out.append(struct.unpack("=Q", raw)[0] if raw else 0)
    return out


def attach_policy(policy: Policy, socks: list[socket.socket],
                  cpus: tuple[int, ...] | None = None,
                  nodes: list[int] | None = None) -> Selector:
    """Where the workers run, for numa: nodes, each slot's NUMA node (-1: not
    bound to one), as read from another server's workers; else cpus, our own
    workers' pinning (slot i on cpus[i % len]; default: usable CPU i % count)."""
    n = len(socks)
    if n == 0:
        raise UserError("the group has no sockets to steer.")
    policy.check_group_size(n)
    sel = Selector(policy, n, member=socks[0])
    if policy.kind == "none":
        reuseport.detach_if_any(socks[0])  # the kernel's own hash: no program at all
        return sel
    if policy.kind == "cbpf":
        _attach_cbpf(policy, socks[0], n)
        return sel
    try:
        _attach_ebpf(sel, socks, cpus, nodes)
    except BaseException:
        sel.release()
        raise
    return sel


def _attach_cbpf(policy: Policy, sock: socket.socket, n: int) -> None:
    if policy.name == "cpu":
        prog = cbpf.cpu_program(n)
    else:
        prog = cbpf.mod_program(n)
    try:
        reuseport.attach_cbpf(sock, prog)
    except OSError as e:
        raise UserError(f"the kernel refused the cBPF {policy.name} program "
                        f"({e.strerror}).") from None


def _attach_ebpf(sel: Selector, socks: list[socket.socket], cpus=None, nodes=None) -> None:
    from ..kernel.bcc import compile_program, program_source

    policy, n = sel.policy, len(socks)
    max_slots = LEAST_MAX_SLOTS if policy.name in SCANS else MAX_SLOTS
    if n > max_slots:
        raise UserError(f"policy {policy.name} handles up to {max_slots} sockets; "
                        f"the group has {n}.")
    least = policy.name == "least-loaded"
    if policy.name == "least-conns" and socks[0].type != socket.SOCK_STREAM:
        raise UserError("least-conns counts TCP connections; a UDP group has none: use "
                        "least-loaded or round-robin.")
    sel._socks = SockArray(max_slots, "rp_socks")
    sel.maps["socks"] = sel._socks.fd
    sel._socks.fill(socks)
    cflags = [f"-DSOCKS_FD={sel._socks.fd}", f"-DPOLICY={POLICY_MACRO[policy.name]}",
              f"-DMAX_SLOTS={max_slots}", f"-DTABLE_SIZE={TABLE_SIZE}"]
    if least:
        from ..kernel.btf import offset_macros
        load = "sk_ack_backlog" if socks[0].type == socket.SOCK_STREAM else "sk_backlog.rmem_alloc"
        cflags += offset_macros({"SELECTED_SK_OFF": ("sk_reuseport_kern", "selected_sk"),
                                 "LOAD_OFF": ("sock", load)})
    inline: tuple[str, ...] = ()
    if policy.name == "least-conns":
        from ..kernel.btf import offset_macros
        from ..probes.conns import cflags as conns_cflags
        cflags += offset_macros({"SELECTED_SK_OFF": ("sk_reuseport_kern", "selected_sk"),
                                 "QLEN_OFF": ("inet_connection_sock",
                                              "icsk_accept_queue.qlen")})
        cflags += conns_cflags(socks[0].getsockname()[1], "/proc/thread-self/ns/net")
        inline = ("conns.h",)
    if policy.name == "queue":
        from ..kernel.btf import offset_macros
        cflags += offset_macros({"SKB_OFF": ("sk_reuseport_kern", "skb"),
                                 "QUEUE_MAPPING_OFF": ("sk_buff", "queue_mapping")})
    if policy.name == "napi":
        from ..kernel.btf import offset_macros
        from ..kernel.sockets import min_napi_id
        cflags += offset_macros({"SKB_OFF": ("sk_reuseport_kern", "skb"),
                                 "NAPI_ID_OFF": ("sk_buff", "napi_id")})
        cflags += [f"-DMIN_NAPI_ID={min_napi_id()}", f"-DNAPI_MAX={NAPI_MAX}"]
    if policy.name == "numa":
        cflags.append(f"-DNODE_DIR={NODE_DIR}")
    b = compile_program(program_source("select.c"), cflags, inline=inline)
    sel._bpf = b
    try:
        fn = b.load_func(b"rp_select", bpf.PROG_TYPE_SK_REUSEPORT)
    except Exception as e:
        raise UserError(f"the kernel refused the {policy.name} program ({e}).") from None
    sel.prog_fd = fn.fd
    for name in ("selections", "table", "config"):
        sel.maps[name] = b[f"rp_{name}".encode()].map_fd
    if policy.name == "napi":
        sel.maps["napi"] = b[b"rp_napi"].map_fd
    if policy.name == "least-conns":
        sel.maps["live"] = b[b"rp_lc_live"].map_fd
        for name, (fn_name, tp) in CONNS_PROGRAMS.items():     # data-ready side first
            try:
                prog = b.load_func(fn_name.encode(), bpf.PROG_TYPE_RAW_TRACEPOINT)
                sel.links[name] = bpf.raw_tracepoint_open(tp, prog.fd)
            except Exception as e:
                raise UserError(f"the kernel refused least-conns' {tp} counter ({e}).") \
                    from None
    if policy.name == "numa":
        table = numa_table(nodes if nodes is not None else slot_nodes(n, cpus))
    else:
        table = slot_table(policy, n)
    for i, slot in enumerate(table):
        bpf.map_update(sel.maps["table"], bpf.u32(i), bpf.u32(slot))
    bpf.map_update(sel.maps["config"], bpf.u32(0), bpf.u64(len(table)))
    try:
        reuseport.attach_ebpf(socks[0], fn.fd)
    except OSError as e:
        raise UserError(f"cannot attach the {policy.name} program to the group "
                        f"({e.strerror}).") from None


def slot_nodes(n: int, cpus: tuple[int, ...] | None = None) -> list[int]:
    """The NUMA node of each slot's worker (slot i runs on cpus[i % len])."""
    from ..kernel.nic import cpu_nodes
    from ..kernel.process import usable_cpus
    cpus = tuple(cpus or usable_cpus())
    node_of = cpu_nodes()
    return [node_of.get(cpus[i % len(cpus)], 0) for i in range(n)]


def numa_table(nodes: list[int]) -> list[int]:
    """numa's `table`: a directory of NODE_DIR entries, count << 16 | first,
    then each node's slots from `first` on. A node without a slot of its own
    lists every slot (its traffic is spread over the whole group); a slot
    whose worker is not bound to one node (-1) is in that list only.
    Its size, NODE_DIR + 2 * slots, fits TABLE_SIZE for every group the
    selector takes (MAX_SLOTS), checked once below."""
    if max(nodes) >= NODE_DIR:
        raise UserError(f"policy numa handles NUMA nodes 0..{NODE_DIR - 1}, "
                        f"not node {max(nodes)}.")
    table = [0] * NODE_DIR
    every = list(range(len(nodes)))
    table += every
    for node in range(NODE_DIR):
        mine = [s for s, nd in enumerate(nodes) if nd == node]
        if mine:
            table[node] = len(mine) << 16 | len(table)
            table += mine
        else:
            table[node] = len(every) << 16 | NODE_DIR
    return table
