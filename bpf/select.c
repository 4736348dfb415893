// SK_REUSEPORT selector: picks the socket of a reuseport group for each new
// connection (TCP SYN) or datagram (UDP), and counts its choices per slot.
//
// bcc dialect, UAPI headers only (the header tree may be a stand-in).
// Built with:
//   -DSOCKS_FD=<fd>    REUSEPORT_SOCKARRAY, slot -> socket (made in Python:
//                      bcc has no reuseport_sockarray table type)
//   -DPOLICY=<P_*>     how an index into `table` is chosen
//   -DMAX_SLOTS, -DTABLE_SIZE
//   least-loaded also: -DSK_ACK_BACKLOG_OFF, -DSKC_COOKIE_OFF (struct sock
//                      offsets, from BTF)
#include <uapi/linux/bpf.h>

#define P_MOD       1   // hash % n                       (modulo-N)
#define P_THRESHOLD 2   // (hash * n) >> 32               (hash-threshold, RFC 2992)
#define P_JUMP      3   // jump consistent hash            (Lamping & Veach)
#define P_COUNTER   4   // atomic counter % n              (round-robin, weighted)
#define P_LEAST     5   // fewest queued connections, ties by hash

// Per slot: how often this program chose it (read by status/watch).
BPF_ARRAY(rp_selections, u64, MAX_SLOTS);
// The eligible slots. Identity for most policies; a slot repeated W times for
// weighted; the drained slots left out for drain. Changing it (and config[0])
// changes the policy's view of the group without reloading the program.
BPF_ARRAY(rp_table, u32, TABLE_SIZE);
// [0] entries used in `table`, [1] round-robin counter,
// [2] rp_selections that failed (slot empty: the kernel's hash decided instead)
BPF_ARRAY(rp_config, u64, 4);

#if POLICY == P_JUMP
static __always_inline u32 jump_hash(u32 hash, u32 n)
{
    // Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm",
    // in integers: BPF has no floating point.
    u64 key = ((u64)hash << 32) | hash;
    u64 b = 0, j = 0;
    for (int i = 0; i < 64; i++) {
        b = j;
        key = key * 2862933555777941757ULL + 1;
        j = ((b + 1) << 31) / ((key >> 33) + 1);
        if (j >= n)
            break;
    }
    return (u32)b;
}
#endif

#if POLICY == P_LEAST
// sock.sk_ack_backlog (the accept queue) is not in struct bpf_sock, and a
// SK_REUSEPORT program cannot look other members up. So a second program, on
// the raw tracepoint sk_data_ready (it fires in sock_def_readable whenever a
// connection is queued on a listener), learns each member's kernel address,
// keyed by the socket cookie that user space mapped to a slot. A member never
// seen has never had a connection queued: its queue is empty. The queue length
// is read at its BTF offset; a stale address misleads the choice, nothing more.
BPF_HASH(rp_cookie_slot, u64, u32, MAX_SLOTS);   // socket cookie -> slot, from user space
BPF_ARRAY(rp_sk_addr, u64, MAX_SLOTS);           // slot -> struct sock *, learned

int rp_learn(struct bpf_raw_tracepoint_args *ctx)
{
    u64 sk = ctx->args[0], cookie = 0;
    if (bpf_probe_read_kernel(&cookie, sizeof(cookie), (void *)(sk + SKC_COOKIE_OFF)))
        return 0;
    u32 *slot = rp_cookie_slot.lookup(&cookie);
    if (slot) {
        u64 *addr = rp_sk_addr.lookup(slot);
        if (addr)
            *addr = sk;
    }
    return 0;
}

static __always_inline u32 queued(u32 slot)
{
    u32 q = 0;
    u64 *addr = rp_sk_addr.lookup(&slot);
    if (addr && *addr)
        bpf_probe_read_kernel(&q, sizeof(q), (void *)(*addr + SK_ACK_BACKLOG_OFF));
    return q;
}
#endif

int rp_select(struct sk_reuseport_md *md)
{
    u32 k_len = 0, k_rr = 1, k_fail = 2;
    u64 *lenp = rp_config.lookup(&k_len);
    if (!lenp || *lenp == 0 || *lenp > TABLE_SIZE)
        return SK_PASS;             // no table: the kernel's own hash decides
    u32 n = *lenp;
    u32 idx = 0;

#if POLICY == P_MOD
    idx = md->hash % n;
#elif POLICY == P_THRESHOLD
    idx = ((u64)md->hash * n) >> 32;
#elif POLICY == P_JUMP
    idx = jump_hash(md->hash, n);
#elif POLICY == P_COUNTER
    u64 *rr = rp_config.lookup(&k_rr);
    if (!rr)
        return SK_PASS;
    idx = __sync_fetch_and_add(rr, 1) % n;
#elif POLICY == P_LEAST
    // Fewest queued wins; among equals the order starts at a hash-chosen
    // entry, so idle members share the load instead of entry 0 taking all.
    u32 start = md->hash % n;
    u64 best = ~0ULL;
    for (u32 i = 0; i < MAX_SLOTS; i++) {
        if (i >= n)
            break;
        u32 *s = rp_table.lookup(&i);
        if (!s)
            break;
        u64 score = ((u64)queued(*s) << 32) | ((i + MAX_SLOTS - start) % MAX_SLOTS);
        if (score < best) {
            best = score;
            idx = i;
        }
    }
#endif

    u32 *slot = rp_table.lookup(&idx);
    if (!slot)
        return SK_PASS;
    u32 key = *slot;
    if (bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, SOCKS_FD), &key, 0) == 0) {
        u64 *cnt = rp_selections.lookup(&key);
        if (cnt)
            __sync_fetch_and_add(cnt, 1);
    } else {
        u64 *fail = rp_config.lookup(&k_fail);
        if (fail)
            __sync_fetch_and_add(fail, 1);
    }
    return SK_PASS;
}
