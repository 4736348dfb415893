// SK_REUSEPORT select-or-migrate program for `reuseport-ctl churn`.
//
// Loaded with expected_attach_type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, the
// kernel runs it twice over:
//   - for every new connection (md->migrating_sk == NULL): pick a live slot
//     by the 4-tuple hash, like the kernel would, but only among the slots in
//     rp_mig_table (so a draining worker can be left out);
//   - for every request or accept-queue child orphaned by a closing listener
//     (md->migrating_sk != NULL): choose the live listener that takes it
//     over (the one with the shortest accept queue), or refuse (SK_DROP:
//     the kernel then resets it, as without migration).
// A closed listener has already left the REUSEPORT_SOCKARRAY when the
// program runs, so selecting its slot fails and the scan moves on.
//
// bcc dialect, UAPI headers only (the header tree may be a stand-in).
// Built with:
//   -DSOCKS_FD=<fd>    REUSEPORT_SOCKARRAY, slot -> listener (made in Python)
//   -DMAX_SLOTS        size of the socket array and the table (the scans
//                      are unrolled: keep it small, 16)
//   -DLEAST=1          migrate to the shortest accept queue, with
//   -DSELECTED_SK_OFF, -DLOAD_OFF  (kernel struct offsets, from BTF);
//   -DLEAST=0          migrate to the next live slot of the table
#include <uapi/linux/bpf.h>
#include "common.h"      // load_of(); the slot bound

#define MODE_MIGRATE 0      // rp_mig_config[0]: move orphaned requests
#define MODE_REFUSE  1      //                   let the kernel reset them

// Slots new connections may go to (a drained slot is left out); [0, n).
BPF_ARRAY(rp_mig_table, u32, MAX_SLOTS);
// [0] mode, [1] n: entries used in rp_mig_table.
BPF_ARRAY(rp_mig_config, u32, 4);
// [0] new connections selected, [1] requests migrated, [2] migrations
// refused, [3] no live slot found (the kernel's hash decided).
BPF_ARRAY(rp_mig_stats, u64, 4);
// Per slot: requests migrated into it.
BPF_ARRAY(rp_mig_to, u64, MAX_SLOTS);

static __always_inline void count(u32 k)
{
    u64 *v = rp_mig_stats.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

// The table entry i places after start, wrapping at n; NULL past n.
static __always_inline u32 *table_at(u32 start, u32 i, u32 n)
{
    if (i >= n)
        return 0;
    u32 idx = start + i;
    if (idx >= n)
        idx -= n;
    return rp_mig_table.lookup(&idx);
}

static __always_inline void migrated_to(u32 slot)
{
    u64 *to = rp_mig_to.lookup(&slot);
    if (to)
        __sync_fetch_and_add(to, 1);
    count(1);
}

int rp_migrate(struct sk_reuseport_md *md)
{
    u32 k_mode = 0, k_n = 1;
    u32 *modep = rp_mig_config.lookup(&k_mode);
    u32 *np = rp_mig_config.lookup(&k_n);
    if (!modep || !np)
        return SK_PASS;
    u32 n = *np;
    if (n == 0 || n > MAX_SLOTS) {
        count(3);
        return SK_PASS;             // no table: the kernel's hash decides
    }
    int migrating = md->migrating_sk != 0;
    if (migrating && *modep == MODE_REFUSE) {
        count(2);
        return SK_DROP;
    }
    u32 start = md->hash % n;

#if LEAST
    if (migrating) {
        u32 best = ~0U, best_slot = 0;
#pragma clang loop unroll(full)
        for (u32 i = 0; i < MAX_SLOTS; i++) {
            u32 *slotp = table_at(start, i, n);
            if (!slotp)
                continue;
            u32 q = load_of(md, *slotp);   // accept-queue length (LOAD_OFF)
            if (q < best) {
                best = q;
                best_slot = *slotp;
            }
        }
        if (best != ~0U &&
            bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, SOCKS_FD), &best_slot, 0) == 0) {
            migrated_to(best_slot);
            return SK_PASS;
        }
        count(3);
        return SK_PASS;
    }
#endif

    // The slot the hash names, or the next live one after it.
#pragma clang loop unroll(full)
    for (u32 i = 0; i < MAX_SLOTS; i++) {
        u32 *slotp = table_at(start, i, n);
        if (!slotp)
            continue;
        u32 slot = *slotp;
        if (bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, SOCKS_FD), &slot, 0) == 0) {
            if (migrating)
                migrated_to(slot);
            else
                count(0);
            return SK_PASS;
        }
    }
    count(3);
    return SK_PASS;
}
