// struct sock reads shared by the probes (wakeup.c, conns.h): plain inline
// functions, no maps, so an ordinary #include serves both.
//
// Built with -DSKC_NET_OFF, -DNET_INUM_OFF (BTF offsets) and -DNETNS_INUM
// (the watched network namespace's inode; 0: any namespace).
#ifndef RP_SOCK_H
#define RP_SOCK_H

// Is sk in the watched network namespace? sock_net(sk)->ns.inum, read at
// the offsets BTF gives: the same port may be bound in every namespace.
static __always_inline int sk_in_netns(const void *sk)
{
#if NETNS_INUM
    u64 net = 0;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (void *)sk + SKC_NET_OFF);
    bpf_probe_read_kernel(&inum, sizeof(inum), (void *)(net + NET_INUM_OFF));
    if (inum != NETNS_INUM)
        return 0;
#endif
    return 1;
}

#endif
