// Live connections per listener, counted in the kernel: +1 when a child of a
// PORT listener becomes ESTABLISHED, -1 when it leaves ESTABLISHED (either
// side closes, or a reset). Included by conns.c (watch) and select.c
// (least-conns reads the counts while it chooses).
//
// Which listener a child belongs to: the child's state change does not say
// (it is cloned from its listener but keeps nothing that tells group members
// apart). tcp_child_process() completes the handshake, the child goes
// SYN_RECV -> ESTABLISHED, and right after, on the same CPU in the same
// softirq, wakes its listener: parent->sk_data_ready(parent), where the
// sock:sk_data_ready tracepoint fires with the listener. So the child is
// parked in a per-CPU slot at its state change and claimed by the next PORT
// listener's data-ready on that CPU. A data-ready of the child itself (the
// ACK carried data) comes in between: it is not a listener, and is skipped.
//
// Counts are keyed by the listener's struct sock address (the selector has
// that, not the cookie); the value carries the cookie for user space.
//
// The common path: inet_sock_set_state fires for every TCP state change on
// the machine. A change that is neither SYN_RECV -> ESTABLISHED nor out of
// ESTABLISHED returns after two compares; a close does one hash lookup; a
// passive open of another port one 2-byte read.
//
// bcc rewrites map calls and makes programs only in the main file, so this
// header is pasted in place of its #include by kernel/bcc.compile_program
// (inline=), not included by the preprocessor.
//
// Built with -DPORT, -DSKC_NUM_OFF, -DSKC_STATE_OFF, -DSKC_COOKIE_OFF,
// -DSKC_NET_OFF, -DNET_INUM_OFF, -DNETNS_INUM (0: any namespace),
// -DLC_MAX_CONNS, -DLC_MAX_LISTENERS.
// -DLC_RX (watch only; least-conns does not need it) also counts where each
// child arrived, per listener: rp_lc_rx below, with -DSKC_INCOMING_CPU_OFF,
// -DMIN_NAPI_ID, -DLC_MAX_RX and, when this kernel's struct sock has them,
// -DSK_NAPI_ID_OFF and -DSK_RX_QUEUE_OFF.
#ifndef RP_CONNS_H
#define RP_CONNS_H

#include "sock.h"      // sk_in_netns()

#define RP_LC_ESTABLISHED   1
#define RP_LC_SYN_RECV      3
#define RP_LC_LISTEN        10

struct rp_live {
    s64 live;           // children ESTABLISHED now
    u64 cookie;         // the listener's socket cookie (0: nobody asked for one yet)
    u64 opened;         // children that became ESTABLISHED since attach
    u64 closed;         // ... and left it
};

BPF_PERCPU_ARRAY(rp_lc_pending, u64, 1);                // child awaiting its listener
BPF_HASH(rp_lc_child, u64, u64, LC_MAX_CONNS);          // child sk -> listener sk
BPF_HASH(rp_lc_live, u64, struct rp_live, LC_MAX_LISTENERS);   // listener sk -> counts

#ifdef LC_RX
// Where a child arrived, read from the child as SO_INCOMING_CPU and
// SO_INCOMING_NAPI_ID would report it: tcp_child_process() records the
// NAPI id and the rx queue of the handshake's last ACK in the child
// (sk_mark_napi_id_set) and sk_clone_lock() its CPU, all before the state
// change that parks it. Keyed by the listener's struct sock, as rp_lc_live
// (whose value carries the cookie).
#define RP_NO_NAPI          0           // a device without NAPI ids (lo, veth without GRO)
#define RP_NO_QUEUE         0xffff      // NO_QUEUE_MAPPING: none recorded (or not in this kernel)
struct rp_rx_key {
    u64 listener;       // the listener's struct sock
    u32 cpu;            // skc_incoming_cpu
    u32 napi_id;        // sk_napi_id, RP_NO_NAPI below MIN_NAPI_ID (as getsockopt does)
    u32 queue;          // sk_rx_queue_mapping, RP_NO_QUEUE if none
    u32 pad;
};
BPF_HASH(rp_lc_rx, struct rp_rx_key, u64, LC_MAX_RX);  // -> children arrived so

static __always_inline void count_rx(u64 lsk, const void *child)
{
    struct rp_rx_key key = {.listener = lsk, .queue = RP_NO_QUEUE};
    int cpu = -1;
    bpf_probe_read_kernel(&cpu, sizeof(cpu), (void *)child + SKC_INCOMING_CPU_OFF);
    key.cpu = cpu;
#ifdef SK_NAPI_ID_OFF
    bpf_probe_read_kernel(&key.napi_id, sizeof(key.napi_id), (void *)child + SK_NAPI_ID_OFF);
    if (key.napi_id < MIN_NAPI_ID)      // a sender_cpu or nothing: not a NAPI id
        key.napi_id = RP_NO_NAPI;
#endif
#ifdef SK_RX_QUEUE_OFF
    u16 q = RP_NO_QUEUE;
    bpf_probe_read_kernel(&q, sizeof(q), (void *)child + SK_RX_QUEUE_OFF);
    key.queue = q;
#endif
    u64 init = 0;
    u64 *n = rp_lc_rx.lookup_or_try_init(&key, &init);
    if (n)
        __sync_fetch_and_add(n, 1);
}
#endif

static __always_inline int lc_ours(const void *sk)
{
    u16 num = 0;
    bpf_probe_read_kernel(&num, sizeof(num), (void *)sk + SKC_NUM_OFF);
    return num == PORT && sk_in_netns(sk);
}

// raw tracepoint inet_sock_set_state(sk, oldstate, newstate)
int rp_lc_state(struct bpf_raw_tracepoint_args *ctx)
{
    int old = (int)ctx->args[1], new = (int)ctx->args[2];
    u64 sk = ctx->args[0];
    if (old == RP_LC_ESTABLISHED) {
        u64 *l = rp_lc_child.lookup(&sk);
        if (!l)
            return 0;
        struct rp_live *v = rp_lc_live.lookup(l);
        if (v) {
            __sync_fetch_and_add(&v->live, -1);
            __sync_fetch_and_add(&v->closed, 1);
        }
        rp_lc_child.delete(&sk);
        return 0;
    }
    if (new != RP_LC_ESTABLISHED || old != RP_LC_SYN_RECV)
        return 0;
    if (!lc_ours((const void *)sk))
        return 0;
    u32 zero = 0;
    u64 *p = rp_lc_pending.lookup(&zero);
    if (p)
        *p = sk;
    return 0;
}

// raw tracepoint sk_data_ready(sk): the listener claims the parked child
int rp_lc_ready(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    u64 *p = rp_lc_pending.lookup(&zero);
    if (!p || !*p)
        return 0;
    const void *sk = (const void *)ctx->args[0];
    u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (void *)sk + SKC_STATE_OFF);
    if (state != RP_LC_LISTEN || !lc_ours(sk))
        return 0;
    u64 child = *p, lsk = (u64)sk;
    *p = 0;
    struct rp_live init = {};
    struct rp_live *v = rp_lc_live.lookup_or_try_init(&lsk, &init);
    if (!v)
        return 0;
    bpf_probe_read_kernel(&v->cookie, sizeof(v->cookie), (void *)sk + SKC_COOKIE_OFF);
#ifdef LC_RX
    count_rx(lsk, (const void *)child);
#endif
    if (rp_lc_child.insert(&child, &lsk))
        return 0;           // table full: not counted, so never decremented either
    __sync_fetch_and_add(&v->live, 1);
    __sync_fetch_and_add(&v->opened, 1);
    return 0;
}

#endif
