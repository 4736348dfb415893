// Listener-lookup probes for one watched local port: count every lookup the
// kernel makes for it, per 4-tuple class (tcp4, tcp6, udp4, udp6).
//
// bcc dialect, UAPI headers only (the header tree may be a stand-in).
// Built with:
//   -DPORT=<port>          the watched local port (host order)
//   -DPROTO=<6|17>         IPPROTO_TCP or IPPROTO_UDP: the other one is ignored
// and one of:
//   -DSK_LOOKUP            an sk_lookup program linked to the netns, in
//                          observe mode: it returns SK_PASS without
//                          bpf_sk_assign(), so the kernel's own lookup (and a
//                          reuseport selector) decides as if it were not there
//   -DLOOKUP_KPROBE        kprobe + kretprobe on __inet_lookup_listener and
//                          inet6_lookup_listener (TCP) or __udp4_lib_lookup
//                          and __udp6_lib_lookup (UDP): counts and a log2
//                          latency histogram. Also:
//     -DNET_ARG, -DPORT_ARG   argument index of the struct net * and of the
//                             port (hnum, host order, for TCP; dport, network
//                             order, for UDP): from BTF, as the signatures
//                             changed across kernels (6.18 dropped hashinfo)
//     -DNETNS_INUM, -DNET_INUM_OFF   the watched netns's inode and the offset
//                             of net.ns.inum (0: no netns filter)
#include <uapi/linux/bpf.h>
#include <uapi/linux/ptrace.h>

#define RP_AF_INET6     10
#define RP_IPPROTO_UDP  17

// [class] lookups for PORT; class = 0 tcp4, 1 tcp6, 2 udp4, 3 udp6.
// Per CPU: a plain increment of this CPU's slot (the verifier inlines the
// lookup), no atomic on a cache line shared by every CPU taking SYNs; user
// space sums the CPUs once per interval.
BPF_PERCPU_ARRAY(rp_lookups, u64, 4);

static __always_inline void count_lookup(u32 cls)
{
    u64 *c = rp_lookups.lookup(&cls);
    if (c)
        *c += 1;
}

#ifdef SK_LOOKUP
// Runs for every listener lookup in the netns (every SYN, every unconnected
// datagram, any port): two context loads decide, nothing else is read
// unless it is PORT.
int rp_lk_observe(struct bpf_sk_lookup *ctx)
{
    if (ctx->local_port != PORT || ctx->protocol != PROTO)
        return SK_PASS;
    count_lookup((ctx->family == RP_AF_INET6 ? 1 : 0) + (PROTO == RP_IPPROTO_UDP ? 2 : 0));
    return SK_PASS;     // observe only: no socket assigned
}
#endif

#ifdef LOOKUP_KPROBE
// log2(ns) buckets of the lookup's duration (entry to return).
BPF_ARRAY(rp_lk_lat, u64, 64);

// The lookup in progress on this CPU. Lookups run in softirq (or with BH
// off) and do not nest, so one slot per CPU is enough.
struct rp_lk_start {
    u64 ts;
    u64 armed;
};
BPF_PERCPU_ARRAY(rp_lk_start, struct rp_lk_start, 1);

// Argument i of the probed function (x86_64): six in registers, the rest
// on the stack above the return address.
static __always_inline u64 kprobe_arg(struct pt_regs *ctx, int i)
{
    u64 v = 0;
    switch (i) {
    case 0: return PT_REGS_PARM1(ctx);
    case 1: return PT_REGS_PARM2(ctx);
    case 2: return PT_REGS_PARM3(ctx);
    case 3: return PT_REGS_PARM4(ctx);
    case 4: return PT_REGS_PARM5(ctx);
    case 5: return PT_REGS_PARM6(ctx);
    }
    bpf_probe_read_kernel(&v, sizeof(v), (void *)(PT_REGS_SP(ctx) + 8 * (i - 5)));
    return v;
}

static __always_inline int lookup_enter(struct pt_regs *ctx, u32 cls)
{
    u16 port = (u16)kprobe_arg(ctx, PORT_ARG);
#if PROTO == RP_IPPROTO_UDP
    port = __builtin_bswap16(port);         // dport is __be16
#endif
    if (port != PORT)
        return 0;
#if NETNS_INUM
    u64 net = kprobe_arg(ctx, NET_ARG);
    u32 inum = 0;
    bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + NET_INUM_OFF));
    if (inum != NETNS_INUM)
        return 0;
#endif
    count_lookup(cls);
    u32 zero = 0;
    struct rp_lk_start *s = rp_lk_start.lookup(&zero);
    if (s) {
        s->ts = bpf_ktime_get_ns();
        s->armed = 1;
    }
    return 0;
}

int rp_lk_enter4(struct pt_regs *ctx) { return lookup_enter(ctx, PROTO == RP_IPPROTO_UDP ? 2 : 0); }
int rp_lk_enter6(struct pt_regs *ctx) { return lookup_enter(ctx, PROTO == RP_IPPROTO_UDP ? 3 : 1); }

int rp_lk_return(struct pt_regs *ctx)
{
    u32 zero = 0;
    struct rp_lk_start *s = rp_lk_start.lookup(&zero);
    if (!s || !s->armed)
        return 0;
    s->armed = 0;
    u32 slot = bpf_log2l(bpf_ktime_get_ns() - s->ts);
    if (slot > 63)
        slot = 63;
    u64 *c = rp_lk_lat.lookup(&slot);
    if (c)
        __sync_fetch_and_add(c, 1);
    return 0;
}
#endif
