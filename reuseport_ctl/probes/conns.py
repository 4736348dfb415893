"""Live connections per listener of a port, counted in the kernel
(bpf/conns.h): children ESTABLISHED now, per member socket, for any server.

    p = ConnsProbe(port, netns)     # attaches both raw tracepoints
    p.read()                        # listener cookie -> live connections
    p.close()

Connections established before the probe attached are not known to it (the
kernel keeps no record of a child's listener): counts start at attach.
"""
from __future__ import annotations

from ..kernel import btf
from ..kernel.bcc import program_source
from .programs import SOCK_FIELDS, netns_macros

STATE_TP = "inet_sock_set_state"       # raw tracepoint names
READY_TP = "sk_data_ready"
MAX_CONNS = 65536                      # children tracked at once (per probe)
MAX_LISTENERS = 1024


def cflags(port: int, netns: str) -> list[str]:
    """What bpf/conns.h is built with (also by select.c for least-conns)."""
    return [f"-DPORT={port}", f"-DLC_MAX_CONNS={MAX_CONNS}",
            f"-DLC_MAX_LISTENERS={MAX_LISTENERS}",
            *btf.offset_macros(SOCK_FIELDS), *netns_macros(netns)]


def read_live(table) -> dict[int, int]:
    """cookie -> live connections, from a bcc rp_lc_live table (listeners
    with no cookie yet are left out: no member can be matched with them)."""
    out: dict[int, int] = {}
    for _, v in table.items():
        if v.cookie:
            out[v.cookie] = out.get(v.cookie, 0) + max(0, v.live)
    return out


class ConnsProbe:
    def __init__(self, port: int, netns: str):
        from ..kernel.bcc import compile_program
        self.port = port
        self._bpf = compile_program(program_source("conns.c"), cflags(port, netns),
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

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> "ConnsProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
