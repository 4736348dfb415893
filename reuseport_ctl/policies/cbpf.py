"""Classic BPF reuseport programs, assembled in Python (no bcc needed).

A cBPF program attached with SO_ATTACH_REUSEPORT_CBPF returns an index into
the group's socket list, in the order the sockets joined; an index past the
end makes the kernel fall back to its hash.
"""
from __future__ import annotations

import struct

# linux/filter.h and linux/bpf_common.h
LD, LDX, ALU, JMP, RET = 0x00, 0x01, 0x04, 0x05, 0x06
TAX = 0x07        # BPF_MISC | BPF_TAX
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MSH = 0x20, 0x40, 0xa0
K, X, A = 0x00, 0x08, 0x10
JEQ = 0x10
MUL, RSH, XOR, MOD = 0x20, 0x70, 0xa0, 0x90
SKF_AD_OFF = -0x1000
SKF_AD_CPU = 36
SKF_NET_OFF = -0x100000


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k & 0xffffffff)


def cpu_program(n: int) -> bytes:
    """The receiving CPU picks the socket: index = cpu % n (as the kernel's
    reuseport_bpf_cpu selftest, which uses one socket per CPU)."""
    return (_ins(LD | W | ABS, SKF_AD_OFF + SKF_AD_CPU)
            + _ins(ALU | MOD | K, n)
            + _ins(RET | A))


def mod_program(n: int) -> bytes:
    """A packet hash modulo n: (saddr ^ sport) * golden-ratio, top bits.

    The program sees skb->data at the transport payload, so the headers are
    read through SKF_NET_OFF (the network header). The IP version comes from
    the packet: a dual-stack (not V6ONLY) group receives IPv4 too."""
    tail = (_ins(ALU | XOR | X)                             # A ^= X
            + _ins(ALU | MUL | K, 0x9E3779B1)
            + _ins(ALU | RSH | K, 16)
            + _ins(ALU | MOD | K, n)
            + _ins(RET | A))
    v6 = (_ins(LD | W | ABS, SKF_NET_OFF + 8 + 12)          # low word of saddr
          + _ins(TAX)
          + _ins(LD | H | ABS, SKF_NET_OFF + 40))           # sport (no ext. headers)
    v4 = (_ins(LDX | B | MSH, SKF_NET_OFF)                  # X = 4 * ihl
          + _ins(LD | H | IND, SKF_NET_OFF)                 # A = sport
          + _ins(TAX)
          + _ins(LD | W | ABS, SKF_NET_OFF + 12))           # A = saddr
    head = (_ins(LD | B | ABS, SKF_NET_OFF)                 # version << 4 | ihl
            + _ins(ALU | RSH | K, 4)
            + _ins(JMP | JEQ | K, 6, jt=0, jf=(len(v6) + len(tail)) // 8))
    return head + v6 + tail + v4 + tail
