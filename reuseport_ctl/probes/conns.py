"""Live connections per listener of a port, counted in the kernel
(bpf/conns.h): children ESTABLISHED now, per member socket, for any server.

    p = ConnsProbe(port, netns)     # attaches both raw tracepoints
    p.read()                        # listener cookie -> live connections
    p.read_rx()                     # (cookie, cpu, napi id, rx queue) -> children
    p.close()

Where each child arrived (rx=True, watch's use): its CPU, NAPI id and rx
queue as SO_INCOMING_CPU, SO_INCOMING_NAPI_ID and sk_rx_queue_mapping would
tell, counted per listener in the kernel (rp_lc_rx). A NAPI id or a queue
that is not known is None, never 0: loopback and plain veth have no NAPI
ids, and a kernel built without CONFIG_SOCK_RX_QUEUE_MAPPING keeps no queue
in the socket (rx_unknown says which, and why).

Connections established before the probe attached are not known to it (the
kernel keeps no record of a child's listener): counts start at attach.
"""
from __future__ import annotations

from typing import Optional

from ..kernel import btf
from ..kernel.bcc import program_source
from ..kernel.sockets import min_napi_id
from .programs import SOCK_FIELDS, netns_macros

STATE_TP = "inet_sock_set_state"       # raw tracepoint names
READY_TP = "sk_data_ready"
MAX_CONNS = 65536                      # children tracked at once (per probe)
MAX_LISTENERS = 1024
MAX_RX = 16384                         # (listener, cpu, napi id, queue) combinations
NO_NAPI, NO_QUEUE = 0, 0xFFFF          # bpf/conns.h: RP_NO_NAPI, RP_NO_QUEUE
NO_CPU = 0xFFFFFFFF                    # skc_incoming_cpu -1: never set
RX_FIELDS = {"SKC_INCOMING_CPU_OFF": ("sock", "__sk_common.skc_incoming_cpu")}
NAPI_FIELD = {"SK_NAPI_ID_OFF": ("sock", "sk_napi_id")}               # CONFIG_NET_RX_BUSY_POLL
# sk_rx_queue_mapping is a #define for __sk_common.skc_rx_queue_mapping (BTF
# knows the member, not the macro); CONFIG_SOCK_RX_QUEUE_MAPPING (XPS selects it)
QUEUE_FIELD = {"SK_RX_QUEUE_OFF": ("sock", "__sk_common.skc_rx_queue_mapping")}


def cflags(port: int, netns: str) -> list[str]:
    """What bpf/conns.h is built with (also by select.c for least-conns)."""
    return [f"-DPORT={port}", f"-DLC_MAX_CONNS={MAX_CONNS}",
            f"-DLC_MAX_LISTENERS={MAX_LISTENERS}",
            *btf.offset_macros(SOCK_FIELDS), *netns_macros(netns)]


def rx_cflags() -> tuple[list[str], dict[str, str]]:
    """What bpf/conns.h's rx counting is built with, and what it cannot see
    on this kernel: {"napi_id" | "rx_queue": why}."""
    flags = ["-DLC_RX", f"-DLC_MAX_RX={MAX_RX}", f"-DMIN_NAPI_ID={min_napi_id()}",
             *btf.offset_macros(RX_FIELDS)]
    unknown: dict[str, str] = {}
    for name, field, why in (
            ("napi_id", NAPI_FIELD, "this kernel's struct sock has no sk_napi_id "
                                    "(built without CONFIG_NET_RX_BUSY_POLL)"),
            ("rx_queue", QUEUE_FIELD, "this kernel's struct sock has no sk_rx_queue_mapping "
                                      "(built without CONFIG_SOCK_RX_QUEUE_MAPPING)")):
        try:
            flags += btf.offset_macros(field)
        except btf.BTFError:
            unknown[name] = why
    return flags, unknown


def read_rx(rx_table, live_table) -> dict[tuple[int, int, Optional[int], Optional[int]], int]:
    """(listener cookie, cpu, napi id, rx queue) -> children that arrived so,
    from the rp_lc_rx table (keyed by the listener's struct sock, whose
    cookie rp_lc_live holds). A NAPI id or queue not recorded is None."""
    cookie = {k.value: v.cookie for k, v in live_table.items()}
    out: dict = {}
    for k, n in rx_table.items():
        c = cookie.get(k.listener, 0)
        if not c:
            continue            # a listener no one asked a cookie for: no member to match
        key = (c, None if k.cpu == NO_CPU else k.cpu,
               None if k.napi_id == NO_NAPI else k.napi_id,
               None if k.queue == NO_QUEUE else k.queue)
        out[key] = out.get(key, 0) + n.value
    return out


def read_live(table) -> dict[int, int]:
    """cookie -> live connections, from a bcc rp_lc_live table (listeners
    with no cookie yet are left out: no member can be matched with them)."""
    out: dict[int, int] = {}
    for _, v in table.items():
        if v.cookie:
            out[v.cookie] = out.get(v.cookie, 0) + max(0, v.live)
    return out


class ConnsProbe:
    def __init__(self, port: int, netns: str, rx: bool = False):
        """rx: also count where each child arrived (read_rx); rx_unknown then
        names what this kernel cannot tell ({"napi_id": why, ...})."""
        from ..kernel.bcc import compile_program
        self.port, self.rx = port, rx
        extra: list[str] = []
        self.rx_unknown: dict[str, str] = {}
        if rx:
            extra, self.rx_unknown = rx_cflags()
        self._bpf = compile_program(program_source("conns.c"), cflags(port, netns) + extra,
                                     inline=("conns.h",))
        try:
            # the data-ready side first: a child parked by the state change
            # is never left without the program that claims it
            self._bpf.attach_raw_tracepoint(tp=READY_TP.encode(), fn_name=b"rp_lc_ready")
            self._bpf.attach_raw_tracepoint(tp=STATE_TP.encode(), fn_name=b"rp_lc_state")
        except BaseException:
            self.close()
            raise

    def read(self) -> dict[int, int]:
        return read_live(self._bpf[b"rp_lc_live"]) if self._bpf is not None else {}

    def read_rx(self) -> dict[tuple[int, int, Optional[int], Optional[int]], int]:
        """(listener cookie, cpu, napi id, rx queue) -> children since attach."""
        if self._bpf is None or not self.rx:
            return {}
        return read_rx(self._bpf[b"rp_lc_rx"], self._bpf[b"rp_lc_live"])

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> "ConnsProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
