"""The listener-lookup probe (bpf/lookup.c): one owner for its program, maps
and link.

Strategies (probes/strategy.py, "lookup"):
  kprobe     kprobe+kretprobe on __inet_lookup_listener / inet6_lookup_listener
             (TCP) or __udp4_lib_lookup / __udp6_lib_lookup (UDP): count and
             log2 latency
  sk_lookup  an SK_LOOKUP program linked to the network namespace, returning
             SK_PASS without choosing a socket: count per class
  selector   nothing to attach: the group's selector counts its own choices
"""
from __future__ import annotations

import ctypes as ct
import os

from ..errors import UserError
from ..kernel import bpf
from ..kernel.bcc import program_source
from .programs import PROTO_NUMBERS, netns_macros, param_index

CLASSES = ("tcp4", "tcp6", "udp4", "udp6")       # index = class in bpf/lookup.c
# proto -> (IPv4 function, IPv6 function, name of the port parameter)
KPROBE_FUNCS = {"tcp": ("__inet_lookup_listener", "inet6_lookup_listener", "hnum"),
                "udp": ("__udp4_lib_lookup", "__udp6_lib_lookup", "dport")}


class LookupProbe:
    """Attach with attach(name); read() -> (total, by class, latency histogram)."""

    def __init__(self, port: int, proto: str, netns: str):
        self.port, self.proto, self.netns = port, proto, netns
        self.name = "none"
        self._bpf = None
        self._link: int | None = None

    def attach(self, name: str) -> None:
        """Attach strategy `name`; raises (leaving nothing behind) if the kernel refuses."""
        try:
            if name == "sk_lookup":
                self._attach_sk_lookup()
            elif name == "kprobe":
                self._attach_kprobe()
            elif name not in ("selector", "none"):
                raise UserError(f"unknown lookup strategy {name!r}.")
        except BaseException:
            self.close()
            raise
        self.name = name

    def _compile(self, extra: list[str]):
        from ..kernel.bcc import compile_program
        flags = [f"-DPORT={self.port}", f"-DPROTO={PROTO_NUMBERS[self.proto]}", *extra]
        self._bpf = compile_program(program_source("lookup.c"), flags)
        return self._bpf

    def _attach_sk_lookup(self) -> None:
        b = self._compile(["-DSK_LOOKUP"])
        fn = b.load_func(b"rp_lk_observe", bpf.PROG_TYPE_SK_LOOKUP,
                         attach_type=bpf.ATTACH_SK_LOOKUP)
        ns = os.open(self.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._link = bpf.link_create(fn.fd, ns, bpf.ATTACH_SK_LOOKUP)
        finally:
            os.close(ns)

    def _attach_kprobe(self) -> None:
        f4, f6, port_param = KPROBE_FUNCS[self.proto]
        # The signatures changed (6.18 dropped the hashinfo argument): where
        # the net and the port are comes from BTF.
        flags = ["-DLOOKUP_KPROBE", f"-DNET_ARG={param_index(f4, 'net')}",
                 f"-DPORT_ARG={param_index(f4, port_param)}", *netns_macros(self.netns)]
        if param_index(f6, port_param) != param_index(f4, port_param):
            raise UserError(f"{f4} and {f6} take the port in different places on this "
                            f"kernel; the kprobe lookup probe cannot handle it.")
        b = self._compile(flags)
        b.attach_kprobe(event=f4.encode(), fn_name=b"rp_lk_enter4")
        b.attach_kprobe(event=f6.encode(), fn_name=b"rp_lk_enter6")
        for f in (f4, f6):
            b.attach_kretprobe(event=f.encode(), fn_name=b"rp_lk_return")

    def read(self) -> tuple[int | None, dict[str, int], dict[int, int] | None]:
        if self._bpf is None:
            return None, {}, None
        table = self._bpf[b"rp_lookups"]
        counts = {c: table.sum(ct.c_int(i)).value for i, c in enumerate(CLASSES)}  # per CPU
        by_class = {c: n for c, n in counts.items() if c.startswith(self.proto)}
        latency = None
        if self.name == "kprobe":
            lat = self._bpf[b"rp_lk_lat"]
            latency = {k.value: v.value for k, v in lat.items() if v.value}
        return sum(by_class.values()), by_class, latency

    def close(self) -> None:
        if self._link is not None:
            os.close(self._link)            # closing the link detaches it
            self._link = None
        if self._bpf is not None:
            self._bpf.cleanup()             # detaches kprobes, frees program and maps
            self._bpf = None
