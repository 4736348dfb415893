// SK_REUSEPORT selector: picks the socket of a reuseport group for each new
// connection (TCP SYN) or datagram (UDP), and counts its choices per slot.
//
// bcc dialect, UAPI headers only (the header tree may be a stand-in).
// Built with:
//   -DSOCKS_FD=<fd>    REUSEPORT_SOCKARRAY, slot -> socket (made in Python:
//                      bcc has no reuseport_sockarray table type)
//   -DPOLICY=<P_*>     how an index into `table` is chosen
//   -DMAX_SLOTS, -DTABLE_SIZE
//   least-loaded also: -DSELECTED_SK_OFF, -DLOAD_OFF (kernel struct offsets,
//                      from BTF)
//   least-conns also:  -DSELECTED_SK_OFF, -DQLEN_OFF (BTF), and conns.h's macros
//                      (-DPORT, the struct sock offsets, -DNETNS_INUM, ...)
//   queue also:        -DSKB_OFF, -DQUEUE_MAPPING_OFF (from BTF)
//   numa also:         -DNODE_DIR (entries of `table` that are the node directory)
//   napi also:         -DSKB_OFF, -DNAPI_ID_OFF (BTF), -DMIN_NAPI_ID, -DNAPI_MAX
#include <uapi/linux/bpf.h>
#include "common.h"      // load_of(); the slot bound

#define P_MOD       1   // hash % n                       (modulo-N)
#define P_THRESHOLD 2   // (hash * n) >> 32               (hash-threshold, RFC 2992)
#define P_JUMP      3   // jump consistent hash            (Lamping & Veach)
#define P_COUNTER   4   // atomic counter % n              (round-robin, weighted)
#define P_LEAST     5   // fewest queued (accept queue / receive memory)
#define P_QUEUE     6   // the skb's receive queue % n
#define P_NUMA      7   // the receiving CPU's NUMA node -> one of that node's slots
#define P_CONNS     8   // fewest live connections (conns.h counts them)
#define P_NAPI      9   // the skb's NAPI id -> the index it was given (rp_napi)

// Per slot: how often this program chose it (read by status/watch).
BPF_ARRAY(rp_selections, u64, MAX_SLOTS);
// The eligible slots. Identity for most policies; a slot repeated W times for
// weighted; the drained slots left out for drain. Changing it (and config[0])
// changes the policy's view of the group without reloading the program.
BPF_ARRAY(rp_table, u32, TABLE_SIZE);
// [0] entries used in `table`, [1] round-robin counter,
// [2] rp_selections that failed (slot empty: the kernel's hash decided instead)
// [3] napi: packets that came with no NAPI id (the kernel's hash decided)
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

#if POLICY == P_CONNS
// The live-connection counter (rp_lc_live and its two raw tracepoint
// programs) lives in this same object, so the selector reads the counts
// the tracepoints keep. Python pastes conns.h here.
#include "conns.h"

// A member's connections: ESTABLISHED children (rp_lc_live, keyed by the
// listener's struct sock) plus handshakes in flight (its request sockets,
// icsk_accept_queue.qlen), so a burst of SYNs that all arrive before the
// first handshake completes is spread too. ~0 for an empty slot. The member
// is found as load_of() finds it: select it, read selected_sk.
static __always_inline u64 conns_of(struct sk_reuseport_md *md, u32 slot)
{
    u64 sk = 0;
    if (bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, SOCKS_FD), &slot, 0))
        return ~0ULL;
    bpf_probe_read_kernel(&sk, sizeof(sk), (void *)md + SELECTED_SK_OFF);
    if (!sk)
        return ~0ULL;
    u64 n = 0;
    struct rp_live *v = rp_lc_live.lookup(&sk);
    if (v && v->live > 0)
        n = v->live;
    u32 syn = 0;
    bpf_probe_read_kernel(&syn, sizeof(syn), (void *)(sk + QLEN_OFF));
    return n + syn;
}
#endif

#if POLICY == P_QUEUE
// The receive queue of the skb. struct sk_reuseport_md has no field for it,
// but the context is a struct sk_reuseport_kern: its skb is read at the BTF
// offset, then the skb's queue_mapping. A driver that recorded the queue
// stores queue + 1 there (skb_record_rx_queue); 0 means none was recorded
// (loopback): queue 0, as skb_get_rx_queue() would say.
static __always_inline u32 rx_queue(struct sk_reuseport_md *md)
{
    u64 skb = 0;
    u16 mapping = 0;
    bpf_probe_read_kernel(&skb, sizeof(skb), (void *)md + SKB_OFF);
    if (skb)
        bpf_probe_read_kernel(&mapping, sizeof(mapping), (void *)(skb + QUEUE_MAPPING_OFF));
    return mapping ? mapping - 1 : 0;
}
#endif

#if POLICY == P_NAPI
// NAPI id -> its index into `table`, in the order the ids first appear: the
// first packet from a NAPI instance (one receive queue of a NAPI driver)
// gives it the next index, so with as many members as queues every member
// is fed by one NAPI id -- what busy polling wants (socket(7),
// SO_INCOMING_NAPI_ID: one worker per receive queue). User space may fill
// it in advance; it reads it to show which member each NAPI id feeds.
BPF_HASH(rp_napi, u32, u32, NAPI_MAX);

// skb->napi_id (struct sk_reuseport_md has no field for it; read as queue
// reads queue_mapping). Below MIN_NAPI_ID it is no NAPI id: the same union
// holds the sender's CPU on transmit, and loopback or veth without GRO
// receive without NAPI.
static __always_inline u32 napi_id(struct sk_reuseport_md *md)
{
    u64 skb = 0;
    u32 id = 0;
    bpf_probe_read_kernel(&skb, sizeof(skb), (void *)md + SKB_OFF);
    if (skb)
        bpf_probe_read_kernel(&id, sizeof(id), (void *)(skb + NAPI_ID_OFF));
    return id >= MIN_NAPI_ID ? id : 0;
}

static __always_inline u32 napi_index(u32 id, u64 *counter)
{
    u32 *known = rp_napi.lookup(&id);
    if (known)
        return *known;
    u32 next = __sync_fetch_and_add(counter, 1);
    rp_napi.insert(&id, &next);         // another CPU may have given it one first:
    known = rp_napi.lookup(&id);        // then that one holds
    return known ? *known : next;
}
#endif

// The slot whose METRIC(md, slot) is least, into idx. The scan starts at a
// hash-chosen slot, so that members with equal figures (idle ones) share the
// load instead of slot 0 taking it all.
#define SCAN_FEWEST(T, METRIC)                              \
    do {                                                    \
        u32 start = md->hash % n;                           \
        T best = (T)~0ULL;                                  \
        for (u32 i = 0; i < LEAST_MAX_SLOTS; i++) {         \
            u32 k = start + i;                              \
            if (k >= LEAST_MAX_SLOTS)                       \
                k -= LEAST_MAX_SLOTS;                       \
            T v = METRIC(md, k);                            \
            if (v < best) {                                 \
                best = v;                                   \
                idx = k;                                    \
            }                                               \
        }                                                   \
    } while (0)

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
    // Fewest queued wins. (Empty slots fail to select and are skipped; the
    // slot found is used as is.)
    SCAN_FEWEST(u32, load_of);
#elif POLICY == P_CONNS
    // Fewest live connections wins: short connections still spread (ties).
    SCAN_FEWEST(u64, conns_of);
#elif POLICY == P_QUEUE
    idx = rx_queue(md) % n;
#elif POLICY == P_NAPI
    u32 k_nonapi = 3;
    u32 id = napi_id(md);
    if (!id) {
        u64 *none = rp_config.lookup(&k_nonapi);
        if (none)
            __sync_fetch_and_add(none, 1);
        return SK_PASS;             // no NAPI id to steer by: the kernel's hash decides
    }
    u64 *order = rp_config.lookup(&k_rr);
    if (!order)
        return SK_PASS;
    idx = napi_index(id, order) % n;
#elif POLICY == P_NUMA
    // table[node] = count << 16 | first: that node's slots are listed at
    // table[first .. first + count) (user space fills it from the CPU -> node
    // map and the workers' CPUs; a node without workers lists every slot).
    u32 node = bpf_get_numa_node_id();
    if (node >= NODE_DIR)
        return SK_PASS;
    u32 *dir = rp_table.lookup(&node);
    if (!dir || (*dir >> 16) == 0)
        return SK_PASS;
    idx = (*dir & 0xffff) + md->hash % (*dir >> 16);
#endif

#if POLICY == P_CONNS || POLICY == P_LEAST
    // the scan chose a socket slot itself (vacant ones fail in it), not an
    // index into `table` (which --follow compacts when a slot is vacated)
    u32 key = idx;
#else
    u32 *slot = rp_table.lookup(&idx);
    if (!slot)
        return SK_PASS;
    u32 key = *slot;
#endif
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
