// Shared by the SK_REUSEPORT programs (select.c, migrate.c).
//
// bcc dialect, UAPI headers only. The includer defines SOCKS_FD (its
// REUSEPORT_SOCKARRAY), and, to use load_of(), SELECTED_SK_OFF and LOAD_OFF
// (kernel struct offsets from BTF). Every scan over the slots is bounded by
// MAX_SLOTS, which only Python defines (-DMAX_SLOTS): the size of the arrays
// and of the group are one number.
#ifndef RP_COMMON_H
#define RP_COMMON_H

#ifndef MAX_SLOTS
#error "build with -DMAX_SLOTS=<slots> (the group's size limit, set in Python)"
#endif

// least-loaded's scan in select.c: the same bound (Python passes its
// LEAST_MAX_SLOTS as MAX_SLOTS for that policy).
#define LEAST_MAX_SLOTS MAX_SLOTS

#if defined(SELECTED_SK_OFF) && defined(LOAD_OFF)
// How loaded the socket in `slot` is: TCP's accept queue (sk_ack_backlog) or
// UDP's receive memory (sk_rmem_alloc), whichever field LOAD_OFF names;
// ~0 when the slot is empty or closed. Neither is in struct bpf_sock, and a
// SK_REUSEPORT program cannot look members up; but selecting a slot stores
// its socket in the context (sk_reuseport_kern.selected_sk), from where the
// field is read at its BTF offset. The caller's final selection overwrites it.
static __always_inline u32 load_of(struct sk_reuseport_md *md, u32 slot)
{
    u64 sk = 0;
    u32 load = ~0U;
    if (bpf_sk_select_reuseport(md, (void *)bpf_pseudo_fd(1, SOCKS_FD), &slot, 0))
        return load;
    bpf_probe_read_kernel(&sk, sizeof(sk), (void *)md + SELECTED_SK_OFF);
    if (sk)
        bpf_probe_read_kernel(&load, sizeof(load), (void *)(sk + LOAD_OFF));
    return load;
}
#endif

#endif
