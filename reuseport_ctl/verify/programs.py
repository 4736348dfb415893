"""The BPF programs the checks steer with. Each picks a member from the
flow's source port, so a check can aim a flow at any index by choosing the
port: index = sport % n (or reversed, n-1 - sport % n, to prove a replace).

  cBPF (SO_ATTACH_REUSEPORT_CBPF) and eBPF socket filters
  (SO_ATTACH_REUSEPORT_EBPF): return an index into the group, in join order;
  both see skb->data at the transport payload, so the ports are read through
  SKF_NET_OFF (the network header), IPv4 or IPv6 by the version nibble.
  SK_REUSEPORT (bcc): bpf_sk_select_reuseport() on a REUSEPORT_SOCKARRAY,
  SOCKMAP or SOCKHASH; md->data is the transport header.
"""
from __future__ import annotations

from ..kernel import bpf
from ..policies import cbpf as C

SKF_NET_OFF = C.SKF_NET_OFF


def _ins(code, k=0, jt=0, jf=0) -> bytes:
    return C._ins(code, k, jt, jf)


def cbpf_sport(n: int, reverse: bool = False, const: int | None = None) -> bytes:
    """cBPF: A = sport % n (reverse: n-1 - A); const: always return const."""
    if const is not None:
        return _ins(C.RET | C.K, const)
    tail = _ins(C.ALU | C.MOD | C.K, n)
    if reverse:
        tail += _ins(C.TAX) + _ins(C.LD | 0x00, n - 1) + _ins(C.ALU | 0x10 | C.X)  # A = k; A -= X
    tail += _ins(C.RET | C.A)
    v6 = _ins(C.LD | C.H | C.ABS, SKF_NET_OFF + 40)                   # IPv6: sport
    v4 = (_ins(C.LDX | C.B | C.MSH, SKF_NET_OFF)                      # X = 4 * ihl
          + _ins(C.LD | C.H | C.IND, SKF_NET_OFF))                    # A = sport
    head = (_ins(C.LD | C.B | C.ABS, SKF_NET_OFF)
            + _ins(C.ALU | C.RSH | C.K, 4)
            + _ins(C.JMP | C.JEQ | C.K, 6, jt=0, jf=(len(v6) + len(tail)) // 8))
    return head + v6 + tail + v4 + tail


# --- eBPF socket filters (raw instructions) ----------------------------------------

def _i(code, dst=0, src=0, off=0, imm=0) -> bytes:
    return bpf.insn(code, dst, src, off, imm)


LD_ABS_B, LD_ABS_H, LD_IND_H = 0x30, 0x28, 0x48
MOV64_X, MOV64_K = 0xbf, 0xb7
RSH64_K, AND64_K, LSH64_K, MOD64_K, SUB64_X = 0x77, 0x57, 0x67, 0x97, 0x1f
JEQ_K, JA, CALL, EXIT = 0x15, 0x05, 0x85, 0x95
FUNC_GET_NUMA_NODE_ID = 42


def ebpf_sport(n: int, reverse: bool = False) -> bytes:
    """The eBPF twin of cbpf_sport (LD_ABS/LD_IND need the skb in r6)."""
    tail = _i(MOD64_K, 0, imm=n)
    if reverse:
        tail += _i(MOV64_K, 1, imm=n - 1) + _i(SUB64_X, 1, 0) + _i(MOV64_X, 0, 1)
    tail += _i(EXIT)
    v6 = _i(LD_ABS_H, imm=SKF_NET_OFF + 40)
    v4 = (_i(LD_ABS_B, imm=SKF_NET_OFF) + _i(AND64_K, 0, imm=0xf) + _i(LSH64_K, 0, imm=2)
          + _i(MOV64_X, 7, 0) + _i(LD_IND_H, 0, 7, imm=SKF_NET_OFF))
    head = (_i(MOV64_X, 6, 1) + _i(LD_ABS_B, imm=SKF_NET_OFF) + _i(RSH64_K, 0, imm=4)
            + _i(JEQ_K, 0, off=len(v4 + tail) // 8, imm=6))
    return head + v4 + tail + v6 + tail


def ebpf_numa() -> bytes:
    """index = the NUMA node of the receiving CPU (reuseport_bpf_numa.c)."""
    return _i(CALL, imm=FUNC_GET_NUMA_NODE_ID) + _i(EXIT)


def load_socket_filter(insns: bytes, name: str) -> int:
    return bpf.prog_load(bpf.PROG_TYPE_SOCKET_FILTER, insns, name=name)


# --- SK_REUSEPORT and SK_LOOKUP programs (bcc) -------------------------------------

SELECT_C = r"""
#include <uapi/linux/bpf.h>
// [0] what bpf_sk_select_reuseport() returned for the empty key, [1] runs
BPF_ARRAY(rp_vres, u64, 2);

int rp_vselect(struct sk_reuseport_md *md)
{
    __u16 sport_be = 0;
    int zero = 0, one = 1;
    u64 *runs = rp_vres.lookup(&one);
    if (runs)
        __sync_fetch_and_add(runs, 1);
    if (bpf_skb_load_bytes(md, 0, &sport_be, 2))
        return SK_PASS;
    __u32 sport = __builtin_bswap16(sport_be);
    if (sport < BASE || sport > BASE + N + 1)
        return SK_PASS;                     // not ours: the kernel's hash
    __u32 key = sport - BASE;
    if (key == N + 1)
        return SK_DROP;                     // the drop port
    long ret = bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, MAP_FD), &key, 0);
    if (key == N) {                         // the empty key: must fail, then hash
        u64 *v = rp_vres.lookup(&zero);
        if (v)
            *v = (u64)ret;
    }
    return SK_PASS;
}
"""

MIGRATE_C = r"""
#include <uapi/linux/bpf.h>
// [0] selections, [1] migrations
BPF_ARRAY(rp_vmig, u64, 2);

int rp_vmigrate(struct sk_reuseport_md *md)
{
    __u32 key = 0;
    int idx = 0;
    if (md->migrating_sk) {     // a closing listener's request or child: to slot 1
        key = 1;
        idx = 1;
    }
    u64 *v = rp_vmig.lookup(&idx);
    if (v)
        __sync_fetch_and_add(v, 1);
    bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, MAP_FD), &key, 0);
    return SK_PASS;
}
"""

LOOKUP_C = r"""
#include <uapi/linux/bpf.h>
// [0] bpf_sk_assign() flags, [1] the local port to redirect
BPF_ARRAY(rp_vcfg, u64, 2);

int rp_vlookup(struct bpf_sk_lookup *ctx)
{
    int zero = 0, one = 1;
    u64 *flags = rp_vcfg.lookup(&zero), *qport = rp_vcfg.lookup(&one);
    if (!flags || !qport || ctx->local_port != *qport)
        return SK_PASS;
    __u32 key = 0;
    struct bpf_sock *sk = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, MAP_FD), &key);
    if (!sk)
        return SK_DROP;
    long err = bpf_sk_assign(ctx, sk, *flags);
    bpf_sk_release(sk);
    return err ? SK_DROP : SK_PASS;
}
"""


def compile_bcc(text: str, macros: dict[str, int]):
    from ..kernel.bcc import compile_program
    return compile_program(text, [f"-D{k}={v}" for k, v in macros.items()])
