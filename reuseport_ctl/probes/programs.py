"""What the probes' BPF C is built from (its source in bpf/ comes from
kernel/bcc.program_source): the kernel facts passed to it as -D macros (struct offsets and function signatures from
BTF, a symbol's address range, the watched network namespace)."""
from __future__ import annotations

import os
import socket

from ..errors import UserError
from ..kernel import btf

PROTO_NUMBERS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

# struct sock fields the data-ready program reads (BTF offsets).
SOCK_FIELDS = {
    "SKC_NUM_OFF": ("sock", "__sk_common.skc_num"),          # local port, host order
    "SKC_STATE_OFF": ("sock", "__sk_common.skc_state"),
    "SKC_COOKIE_OFF": ("sock", "__sk_common.skc_cookie"),    # 0 until someone asks for it
    "SKC_NET_OFF": ("sock", "__sk_common.skc_net"),
    "SK_PROTOCOL_OFF": ("sock", "sk_protocol"),              # u16 since 5.6
}
NET_FIELDS = {"NET_INUM_OFF": ("net", "ns.inum")}


def netns_inum(path: str) -> int:
    """The inode that names a network namespace (what net->ns.inum holds)."""
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise UserError(f"cannot open the network namespace {path} ({e.strerror}).") from None


def netns_macros(path: str) -> list[str]:
    """-DNETNS_INUM and the offset to compare it with; NETNS_INUM=0 (no netns
    filter) on a kernel whose struct net has no ns.inum in BTF."""
    try:
        return [f"-DNETNS_INUM={netns_inum(path)}", *btf.offset_macros(NET_FIELDS)]
    except btf.BTFError:
        return ["-DNETNS_INUM=0", "-DNET_INUM_OFF=0"]


def param_index(func: str, *names: str) -> int:
    """Index of the first of `names` among func's parameters."""
    params = btf.func_params(func)
    for n in names:
        if n in params:
            return params.index(n)
    raise btf.BTFError(f"{func}({', '.join(params)}) has no parameter {' or '.join(names)}")
