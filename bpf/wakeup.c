// Data-ready and wakeup probes for one watched local port.
//
//   data-ready  sock_def_readable() on a listener of PORT (TCP: a socket in
//               TCP_LISTEN; UDP: any socket bound to PORT), counted per
//               listener socket cookie.
//   wakeups     wakeups of the threads of the watched processes (rp_pids:
//               tgids) made while such a data-ready is being handled on
//               this CPU, counted per (listener cookie, tgid, tid): a member
//               socket's wakeups are the sum over its cookie, and the tids
//               its data-ready woke are the threads that serve it.
//   eagain      (opt-in) accept/accept4 (TCP) or recvfrom (UDP) of a watched
//               pid on a PORT socket returning -EAGAIN: a wakeup that found
//               nothing to do; and returning >= 0: a connection (datagram)
//               it took, which is how workers sharing one listener are told
//               apart.
//
// Everything is counted here, in maps; user space reads them once per
// interval. No perf buffer.
//
// bcc dialect, UAPI headers only. Built with:
//   -DPORT, -DPROTO (6|17), -DMAX_PIDS, -DMAX_TIDS
//   -DSKC_NUM_OFF, -DSKC_STATE_OFF, -DSKC_COOKIE_OFF, -DSK_PROTOCOL_OFF,
//   -DSKC_NET_OFF, -DNET_INUM_OFF    struct offsets from the running
//                                    kernel's BTF
//   -DNETNS_INUM=<inode>             only sockets of this netns (0: any)
// how data-ready is seen (none of these: the tracefs tracepoint
// sock:sk_data_ready, program rp_dr_tp):
//   -DDR_KPROBE                      kprobe on sock_def_readable; its
//                                    kretprobe ends the scope
//   -DDR_RAW_TP                      raw tracepoint sk_data_ready (rp_dr_raw):
//                                    called with the struct sock * directly,
//                                    no perf event record is built
// -DTASK_PID_OFF, -DTASK_TGID_OFF (task_struct.pid/.tgid, BTF) enable
// rp_wk_raw, the raw tracepoint sched_waking, which filters by the woken
// task's tgid; without them only rp_wk_tp (tracefs) is built, whose record
// has the tid alone: it filters by rp_tids, every thread of the watched
// processes (user space refreshes it each interval).
// -DTASK_FILES_OFF, -DFILES_FDT_OFF, -DFDT_FD_OFF, -DFDT_MAX_FDS_OFF,
// -DFILE_PRIVATE_OFF, -DSOCKET_SK_OFF (BTF): an accept() or recvfrom()
// counts only if the fd it was called on is one of PORT's sockets (without
// them: every such call of a watched process).
#include <uapi/linux/bpf.h>
#include <uapi/linux/ptrace.h>
#include "sock.h"      // sk_in_netns()

#define RP_TCP_LISTEN   10
#define RP_EAGAIN       11

// The data-ready being handled on this CPU: set by a data-ready of a watched
// listener; a wakeup of a watched pid while it is set was made by it.
//
// Why that holds: sk_data_ready fires at the top of sock_def_readable, and
// the wakeups it makes (wake_up_interruptible_sync_poll on the socket's wait
// queue: a blocked accept() or recvfrom(), or epoll's ep_poll_callback waking
// each epoll_wait()er) follow at once on the same CPU, in softirq with the
// wait-queue lock held and interrupts off. The mark ends where that scope
// ends: with the kprobe, at sock_def_readable's return; with the tracepoints,
// at the next data-ready on this CPU (another socket's, or this one's next)
// and at the end of the softirq (irq:softirq_exit). A hard interrupt can
// still come between the tracepoint and the wait-queue lock: while its
// hrtimers expire (timer:hrtimer_expire_entry .. _exit: an epoll_wait or
// nanosleep timeout, the scheduler tick) the mark is paused, so their
// wakeups are not counted, and it resumes after, so the data-ready's own
// wakeup still is. (Ending it there instead lost that wakeup: 4 runs in 25
// of an exact test missed one, under 13k timer interrupts a second.)
// These hooks run a few stores, not the stack walk that checking the
// waker's stack would take (~4 us a wakeup).
struct rp_mark {
    u32 active;
    u32 paused;         // an hrtimer expiring in a hard interrupt inside it
    u64 cookie;         // the listener whose data-ready it is
};
BPF_PERCPU_ARRAY(rp_wk_mark, struct rp_mark, 1);

BPF_HASH(rp_ready, u64, u64, 4096);            // listener cookie -> data-ready events
// A wakeup made by a watched listener's data-ready: whose, and which thread.
struct rp_wk_key {
    u64 cookie;         // the listener
    u32 tgid;           // the woken process
    u32 tid;            // the woken thread
};

BPF_HASH(rp_pids, u32, u8, MAX_PIDS);          // the watched pids (tgids: filter)
BPF_HASH(rp_tids, u32, u32, MAX_TIDS);         // tid -> tgid, every thread of them
                                               // (filter for the tracefs record)
BPF_HASH(rp_wakeups, struct rp_wk_key, u64, MAX_TIDS);  // -> wakeups
BPF_HASH(rp_eagain, u32, u64, MAX_PIDS);       // pid -> accept/recvfrom returning EAGAIN
BPF_HASH(rp_done, u32, u64, MAX_PIDS);         // pid -> accept/recvfrom returning >= 0

#if PROTO == 17
// UDP: the CPU each datagram was received on, per listener. A datagram's
// data-ready is called from the softirq that queued it (once per datagram:
// 500 queued unread, 500 data-ready, measured on 6.18), so the CPU running
// it is the receive CPU. (An unconnected UDP socket keeps no per-datagram
// CPU or NAPI id of its own: SO_INCOMING_CPU is not updated for it.)
struct rp_rx_cpu_key {
    u64 cookie;
    u32 cpu;
    u32 pad;
};
BPF_HASH(rp_rx_cpu, struct rp_rx_cpu_key, u64, 4096);  // -> datagrams
#endif

static __always_inline void add(void *map_lookup_ret)
{
    if (map_lookup_ret)
        __sync_fetch_and_add((u64 *)map_lookup_ret, 1);
}

// Is sk a watched listener? Its cookie in *cookie (0 if none generated yet:
// sock_diag generates one, see probes/session.py).
static __always_inline int watched(const void *sk, u64 *cookie)
{
    // skc_num and skc_state sit a few bytes apart in sock_common: one read
    // serves both (little-endian: skc_num is its low 16 bits).
    u64 near = 0;
    bpf_probe_read_kernel(&near, sizeof(near), (void *)sk + SKC_NUM_OFF);
    if ((u16)near != PORT)
        return 0;
#if PROTO == 6
#if SKC_STATE_OFF > SKC_NUM_OFF && SKC_STATE_OFF < SKC_NUM_OFF + 8
    u8 state = near >> (8 * (SKC_STATE_OFF - SKC_NUM_OFF));
#else
    u8 state = 0;
    bpf_probe_read_kernel(&state, sizeof(state), (void *)sk + SKC_STATE_OFF);
#endif
    if (state != RP_TCP_LISTEN)
        return 0;           // an accepted connection on the port, not a listener
#endif
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, sizeof(proto), (void *)sk + SK_PROTOCOL_OFF);
    if (proto != PROTO)
        return 0;
    if (!sk_in_netns(sk))
        return 0;
    bpf_probe_read_kernel(cookie, sizeof(*cookie), (void *)sk + SKC_COOKIE_OFF);
    return 1;
}

static __always_inline struct rp_mark *mark(void)
{
    u32 zero = 0;
    return rp_wk_mark.lookup(&zero);
}

// irq:softirq_exit: the scope ends. timer:hrtimer_expire_entry/_exit: it is
// paused and resumed. Raw or through tracefs (the arguments are not needed).
static __always_inline void end_scope(void)
{
    struct rp_mark *m = mark();
    if (m && m->active)
        m->active = 0;
}

static __always_inline void pause_scope(u32 paused)
{
    struct rp_mark *m = mark();
    if (m && m->active && m->paused != paused)
        m->paused = paused;
}

int rp_end_raw(struct bpf_raw_tracepoint_args *ctx) { end_scope(); return 0; }
int rp_end_tp(void *args) { end_scope(); return 0; }
int rp_pause_raw(struct bpf_raw_tracepoint_args *ctx) { pause_scope(1); return 0; }
int rp_pause_tp(void *args) { pause_scope(1); return 0; }
int rp_resume_raw(struct bpf_raw_tracepoint_args *ctx) { pause_scope(0); return 0; }
int rp_resume_tp(void *args) { pause_scope(0); return 0; }

// Called for every data-ready of every socket on the machine: the common
// case (another port) costs one 8-byte read and a per-CPU array lookup (the
// verifier inlines it), and writes the mark only if it was set.
static __always_inline void data_ready(const void *sk)
{
    u64 cookie = 0, init = 0;
    int w = watched(sk, &cookie);
    struct rp_mark *m = mark();
    if (!m)
        return;
    if (!w) {
        if (m->active)
            m->active = 0;
        return;
    }
    add(rp_ready.lookup_or_try_init(&cookie, &init));
#if PROTO == 17
    struct rp_rx_cpu_key rx = {.cookie = cookie, .cpu = bpf_get_smp_processor_id()};
    add(rp_rx_cpu.lookup_or_try_init(&rx, &init));
#endif
    m->cookie = cookie;
    m->paused = 0;
    m->active = 1;
}

#ifdef DR_KPROBE
int rp_dr_kprobe(struct pt_regs *ctx)
{
    data_ready((const void *)PT_REGS_PARM1(ctx));
    return 0;
}

int rp_dr_kretprobe(struct pt_regs *ctx)
{
    end_scope();
    return 0;
}
#elif defined(DR_RAW_TP)
// raw tracepoint sk_data_ready: TP_PROTO(const struct sock *sk)
int rp_dr_raw(struct bpf_raw_tracepoint_args *ctx)
{
    data_ready((const void *)ctx->args[0]);
    return 0;
}
#else
// sock:sk_data_ready (events/sock/sk_data_ready/format)
struct rp_sk_data_ready_args {
    u64 common;
    const void *skaddr;
    u16 family;
    u16 protocol;
    u64 ip;
};

int rp_dr_tp(struct rp_sk_data_ready_args *args)
{
    data_ready(args->skaddr);
    return 0;
}
#endif

// sched:sched_waking (same fields as sched_wakeup)
struct rp_sched_waking_args {
    u64 common;
    char comm[16];
    int pid;
    int prio;
    int target_cpu;
};

// Called for every wakeup on the machine. Cheapest test first: is a watched
// listener's data-ready being handled on this CPU (an inlined per-CPU array
// lookup, usually no); only then the process filter. The listener's cookie
// in *cookie.
static __always_inline int marked(u64 *cookie)
{
    struct rp_mark *m = mark();
    if (!m || !m->active || m->paused)
        return 0;
    *cookie = m->cookie;
    return 1;
}

static __always_inline void count_wakeup(u64 cookie, u32 tgid, u32 tid)
{
    struct rp_wk_key key = {.cookie = cookie, .tgid = tgid, .tid = tid};
    u64 init = 0;
    add(rp_wakeups.lookup_or_try_init(&key, &init));
}

int rp_wk_tp(struct rp_sched_waking_args *args)
{
    u64 cookie = 0;
    if (!marked(&cookie))
        return 0;
    u32 tid = args->pid;            // the record's pid is the task's (thread's) id
    u32 *tgid = rp_tids.lookup(&tid);
    if (tgid)
        count_wakeup(cookie, *tgid, tid);
    return 0;
}

#ifdef TASK_TGID_OFF
// raw tracepoint sched_waking: TP_PROTO(struct task_struct *p)
int rp_wk_raw(struct bpf_raw_tracepoint_args *ctx)
{
    u64 cookie = 0;
    if (!marked(&cookie))
        return 0;
    u32 tgid = 0, tid = 0;
    void *task = (void *)ctx->args[0];
    bpf_probe_read_kernel(&tgid, sizeof(tgid), task + TASK_TGID_OFF);
    if (!rp_pids.lookup(&tgid))
        return 0;
    bpf_probe_read_kernel(&tid, sizeof(tid), task + TASK_PID_OFF);
    count_wakeup(cookie, tgid, tid);
    return 0;
}
#endif

#ifdef TASK_FILES_OFF
// Is the socket behind the caller's fd one of PORT's? current->files->fdt->
// fd[fd]->private_data (the struct socket)->sk->skc_num, at BTF offsets.
static __always_inline int on_port(u64 fd)
{
    u64 task = bpf_get_current_task();
    void *files = 0, *fdt = 0, *fds = 0, *file = 0, *sock = 0, *sk = 0;
    u32 max_fds = 0;
    u16 num = 0;
    bpf_probe_read_kernel(&files, sizeof(files), (void *)task + TASK_FILES_OFF);
    bpf_probe_read_kernel(&fdt, sizeof(fdt), files + FILES_FDT_OFF);
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), fdt + FDT_MAX_FDS_OFF);
    if (fd >= max_fds)
        return 0;
    bpf_probe_read_kernel(&fds, sizeof(fds), fdt + FDT_FD_OFF);
    bpf_probe_read_kernel(&file, sizeof(file), fds + fd * sizeof(void *));
    bpf_probe_read_kernel(&sock, sizeof(sock), file + FILE_PRIVATE_OFF);
    bpf_probe_read_kernel(&sk, sizeof(sk), sock + SOCKET_SK_OFF);
    bpf_probe_read_kernel(&num, sizeof(num), sk + SKC_NUM_OFF);
    return num == PORT;
}
#endif

// The calls in flight: thread id -> 1 if the call a watched process entered
// (accept/accept4, or recvfrom) is on one of PORT's sockets, 0 if not; taken
// when the call returns. (Without the fd-table offsets: 1 for every call.)
BPF_HASH(rp_ea_fd, u32, u8, MAX_PIDS);

// syscalls:sys_enter_accept4 / sys_enter_accept / sys_enter_recvfrom
struct rp_sys_enter_args {
    u64 common;
    int nr;
    u64 fd;
};

int rp_ea_enter(struct rp_sys_enter_args *args)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u8 here = 1;
    if (!rp_pids.lookup(&tgid))
        return 0;
#ifdef TASK_FILES_OFF
    here = on_port(args->fd);
#endif
    rp_ea_fd.update(&tid, &here);
    return 0;
}

// syscalls:sys_exit_accept4 / sys_exit_accept / sys_exit_recvfrom
struct rp_sys_exit_args {
    u64 common;
    int nr;
    long ret;
};

int rp_ea_tp(struct rp_sys_exit_args *args)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u64 init = 0;
    u8 *here = rp_ea_fd.lookup(&tid);
    if (here) {
        u8 on = *here;
        rp_ea_fd.delete(&tid);
        if (!on)
            return 0;
        if (args->ret == -RP_EAGAIN)
            add(rp_eagain.lookup_or_try_init(&tgid, &init));
        else if (args->ret >= 0)
            add(rp_done.lookup_or_try_init(&tgid, &init));
        return 0;
    }
    // A call that was already waiting when the watch began (its entry was
    // not seen): it counts if it took something, and for accept() if the
    // socket it returned is on PORT.
    if (args->ret < 0 || !rp_pids.lookup(&tgid))
        return 0;
#if PROTO == 6 && defined(TASK_FILES_OFF)
    if (!on_port(args->ret))
        return 0;
#endif
    add(rp_done.lookup_or_try_init(&tgid, &init));
    return 0;
}
