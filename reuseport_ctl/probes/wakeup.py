"""The data-ready and wakeup probes (bpf/wakeup.c): one owner for the
programs, the pid filter map and the counters.

Strategies (probes/strategy.py):
  data_ready  kprobe (+kretprobe) on sock_def_readable, or the sk_data_ready
              tracepoint that fires inside it: as a raw tracepoint (the
              program gets the struct sock * directly) or, failing that,
              through tracefs/perf (sock:sk_data_ready, which builds the
              whole event record first, for every socket on the machine)
  wakeups     sched_waking of any thread of the watched processes, the
              waker-context twin of sched_wakeup (see bpf/wakeup.c): raw
              tracepoint (p->tgid and p->pid read at their BTF offsets) or,
              failing that, sched:sched_waking, whose record has only the
              tid: there the filter holds every thread id of the watched
              processes (set_pids() refreshes it)
Wakeups are counted per (listener cookie, pid, tid): per member socket and
per thread, so a threaded server (HAProxy nbthread, Envoy, one runtime per
core) shows each thread's wakeups under the socket that caused them.
A wakeup counts while a watched listener's data-ready is being handled on
the CPU: up to sock_def_readable's return (kprobe), or up to the next
data-ready or softirq end there, paused while a hard interrupt's hrtimers
expire (tracepoints; see bpf/wakeup.c).

Opt-in (eagain=True): accept/accept4 (recvfrom for UDP) returning EAGAIN,
and returning a connection (a datagram), from the syscalls tracepoints. Off by default because enabling any syscall
tracepoint sends every syscall of every process on the machine through the
kernel's slow path; our own workers count their EAGAINs themselves.
"""
from __future__ import annotations

import ctypes as ct
from typing import Iterable

from ..errors import UserError
from ..kernel import btf, owners, tracefs
from ..kernel.bcc import program_source
from .programs import PROTO_NUMBERS, SOCK_FIELDS, netns_macros

MAX_PIDS = 4096
MAX_TIDS = 16384
WAKING_TP = "sched:sched_waking"
RAW_WAKING_TP = "sched_waking"
DATA_READY_TP = "sock:sk_data_ready"
RAW_DATA_READY_TP = "sk_data_ready"
DATA_READY_STRATEGIES = ("kprobe", "raw_tracepoint", "tracepoint")
WAKEUP_STRATEGIES = ("raw_tracepoint", "tracepoint")     # best first
DATA_READY_FUNC = "sock_def_readable"
# Where a data-ready's scope ends, or pauses for a hard interrupt's hrtimers,
# when it is seen by a tracepoint (the kprobe strategy has sock_def_readable's
# kretprobe): (raw name, tracefs name, program suffix in bpf/wakeup.c).
# From the calling task to the socket behind an fd it passed (BTF).
SOCKET_FD_FIELDS = {
    "TASK_FILES_OFF": ("task_struct", "files"),
    "FILES_FDT_OFF": ("files_struct", "fdt"),
    "FDT_FD_OFF": ("fdtable", "fd"),
    "FDT_MAX_FDS_OFF": ("fdtable", "max_fds"),
    "FILE_PRIVATE_OFF": ("file", "private_data"),
    "SOCKET_SK_OFF": ("socket", "sk"),
}
SCOPE_HOOKS = (("softirq_exit", "irq:softirq_exit", "end"),
               ("hrtimer_expire_entry", "timer:hrtimer_expire_entry", "pause"),
               ("hrtimer_expire_exit", "timer:hrtimer_expire_exit", "resume"))
EAGAIN_TPS = {"tcp": ("syscalls:sys_exit_accept4", "syscalls:sys_exit_accept"),
              "udp": ("syscalls:sys_exit_recvfrom",)}


def wakeup_target(strategy: str) -> str:
    """What a wakeup strategy attaches to, as the reasons name it."""
    return f"raw tracepoint {RAW_WAKING_TP}" if strategy == "raw_tracepoint" else WAKING_TP


class WakeupProbe:
    def __init__(self, port: int, proto: str, netns: str):
        self.port, self.proto, self.netns = port, proto, netns
        self.data_ready = self.wakeups = "none"
        self.scope = ""                 # how wakeups are tied to data-ready (for the reason)
        self.eagain_tps: list[str] = []
        self.accepts_scope = ""         # which calls count (eagain=True)
        self.wakeups_error = ""         # why better wakeup strategies did not attach
        self._bpf = None
        self._pids: set[int] = set()
        self._tids: dict[int, int] = {}     # tid -> pid in rp_tids (tracefs wakeups)

    def attach(self, data_ready: str, wakeups: str, eagain: bool = False) -> None:
        """Attach the data-ready strategy and, if not "none", the wakeup one
        (which needs data-ready: that is what it scopes wakeups by); with
        eagain, also the syscalls tracepoints that count EAGAINs."""
        if data_ready == "none":
            return
        try:
            self._attach(data_ready, wakeups, eagain)
        except BaseException:
            self.close()
            raise

    def _attach(self, data_ready: str, wakeups: str, eagain: bool) -> None:
        from ..kernel.bcc import compile_program
        if data_ready not in DATA_READY_STRATEGIES:
            raise UserError(f"unknown data-ready strategy {data_ready!r}.")
        if wakeups != "none" and wakeups not in WAKEUP_STRATEGIES:
            raise UserError(f"unknown wakeup strategy {wakeups!r}.")
        flags = [f"-DPORT={self.port}", f"-DPROTO={PROTO_NUMBERS[self.proto]}",
                 f"-DMAX_PIDS={MAX_PIDS}", f"-DMAX_TIDS={MAX_TIDS}",
                 *btf.offset_macros(SOCK_FIELDS),
                 *netns_macros(self.netns)]
        if data_ready == "kprobe":
            flags.append("-DDR_KPROBE")
            self.scope = f"wakeups counted between {DATA_READY_FUNC}'s kprobe and kretprobe"
        else:
            if data_ready == "raw_tracepoint":
                flags.append("-DDR_RAW_TP")
            self.scope = ("wakeups counted from the data-ready to the next one or "
                          "the softirq's end on that CPU, but not an hrtimer's")
        # The wakeup strategies to try, best first, from the one chosen.
        tries = list(WAKEUP_STRATEGIES[WAKEUP_STRATEGIES.index(wakeups):]) \
            if wakeups != "none" else []
        failed: list[str] = []
        if "raw_tracepoint" in tries:
            try:
                flags += [f"-DTASK_PID_OFF={btf.member_offset('task_struct', 'pid')}",
                          f"-DTASK_TGID_OFF={btf.member_offset('task_struct', 'tgid')}"]
            except btf.BTFError as e:
                tries.remove("raw_tracepoint")
                failed.append(f"raw tracepoint {RAW_WAKING_TP}: {e}")
        if eagain:
            call = "accept()" if self.proto == "tcp" else "recvfrom()"
            try:
                flags += btf.offset_macros(SOCKET_FD_FIELDS)
                self.accepts_scope = f"{call}s on a port {self.port} socket"
            except btf.BTFError:
                self.accepts_scope = f"every {call} of the process (no BTF for its fd table)"
        if data_ready == "tracepoint":
            tracefs.ensure()            # (a tracefs wakeup fallback mounts it when tried)
        b = self._bpf = compile_program(program_source("wakeup.c"), flags)
        pids, self._pids = self._pids, set()
        self.set_pids(pids)             # pids given before the program existed
        if data_ready == "kprobe":
            b.attach_kprobe(event=DATA_READY_FUNC.encode(), fn_name=b"rp_dr_kprobe")
            b.attach_kretprobe(event=DATA_READY_FUNC.encode(), fn_name=b"rp_dr_kretprobe")
        elif data_ready == "raw_tracepoint":
            b.attach_raw_tracepoint(tp=RAW_DATA_READY_TP.encode(), fn_name=b"rp_dr_raw")
        else:
            b.attach_tracepoint(tp=DATA_READY_TP.encode(), fn_name=b"rp_dr_tp")
        self.data_ready = data_ready
        for name in tries:
            try:
                if name == "raw_tracepoint":
                    b.attach_raw_tracepoint(tp=RAW_WAKING_TP.encode(), fn_name=b"rp_wk_raw")
                else:
                    tracefs.ensure()
                    b.attach_tracepoint(tp=WAKING_TP.encode(), fn_name=b"rp_wk_tp")
                if data_ready != "kprobe":
                    self._attach_scope_hooks(b, raw=name == "raw_tracepoint")
            except Exception as e:      # data-ready still counts without it
                failed.append(f"{wakeup_target(name)} failed to attach ({e})")
                self._detach_wakeups(b)
                continue
            self.wakeups = name
            if name == "tracepoint":
                self.set_pids(self._pids)       # the filter by thread now matters
            break
        self.wakeups_error = "; ".join(failed)
        if self.wakeups == "none" or not eagain:
            return
        try:
            root = tracefs.ensure()
        except UserError:               # no tracefs: no EAGAIN counts
            return
        for tp in EAGAIN_TPS[self.proto]:
            enter = tp.replace(":sys_exit_", ":sys_enter_")
            if tracefs.event_dir(root, tp).is_dir():      # CONFIG_FTRACE_SYSCALLS
                b.attach_tracepoint(tp=tp.encode(), fn_name=b"rp_ea_tp")
                b.attach_tracepoint(tp=enter.encode(), fn_name=b"rp_ea_enter")
                self.eagain_tps.append(tp)

    @staticmethod
    def _attach_scope_hooks(b, raw: bool) -> None:
        for raw_name, tp, what in SCOPE_HOOKS:
            if raw:
                b.attach_raw_tracepoint(tp=raw_name.encode(), fn_name=f"rp_{what}_raw".encode())
            else:
                b.attach_tracepoint(tp=tp.encode(), fn_name=f"rp_{what}_tp".encode())

    @staticmethod
    def _detach_wakeups(b) -> None:
        """Undo a wakeup strategy that attached only in part (so the next
        one in the chain starts clean)."""
        for raw_name in (RAW_WAKING_TP, *(r for r, _, _ in SCOPE_HOOKS)):
            if raw_name.encode() in b.raw_tracepoint_fds:
                b.detach_raw_tracepoint(raw_name.encode())
        for tp in (WAKING_TP, *(t for _, t, _ in SCOPE_HOOKS)):
            if tp.encode() in b.tracepoint_fds:
                b.detach_tracepoint(tp.encode())

    def set_pids(self, pids: Iterable[int]) -> None:
        """Watch these processes (every thread of each). With the tracefs
        wakeup strategy the filter is by thread id: call again to pick up
        threads started since (the watch does, every interval)."""
        want = {int(p) for p in pids}
        if len(want) > MAX_PIDS:
            raise UserError(f"at most {MAX_PIDS} pids can be watched, not {len(want)}.")
        if self._bpf is not None:
            table = self._bpf[b"rp_pids"]
            for pid in self._pids - want:
                try:
                    del table[ct.c_uint(pid)]
                except KeyError:
                    pass
            for pid in want - self._pids:
                table[ct.c_uint(pid)] = ct.c_ubyte(1)
        self._pids = want
        if self._bpf is not None and self.wakeups == "tracepoint":
            self._set_tids({t: p for p in want for t in owners.thread_ids(p)})

    def _set_tids(self, tids: dict[int, int]) -> None:
        if len(tids) > MAX_TIDS:
            raise UserError(f"at most {MAX_TIDS} threads can be watched, not {len(tids)}.")
        table = self._bpf[b"rp_tids"]
        for tid in self._tids.keys() - tids.keys():
            try:
                del table[ct.c_uint(tid)]
            except KeyError:
                pass
        for tid, pid in tids.items():
            if self._tids.get(tid) != pid:
                table[ct.c_uint(tid)] = ct.c_uint(pid)
        self._tids = tids

    def read(self) -> tuple[dict[int, int], dict[tuple[int, int, int], int], dict[int, int],
                            dict[int, int]]:
        """(cookie -> data-ready, (cookie, pid, tid) -> wakeups, pid -> EAGAIN,
        pid -> accepts that returned >= 0), each map read once."""
        if self._bpf is None:
            return {}, {}, {}, {}

        def items(name: bytes) -> dict[int, int]:
            return {k.value: v.value for k, v in self._bpf[name].items()}
        wakeups = {(k.cookie, k.tgid, k.tid): v.value
                   for k, v in self._bpf[b"rp_wakeups"].items()} \
            if self.wakeups != "none" else {}
        eagain = items(b"rp_eagain") if self.eagain_tps else {}
        done = items(b"rp_done") if self.eagain_tps else {}
        return items(b"rp_ready"), wakeups, eagain, done

    def read_rx_cpus(self) -> dict[tuple[int, int], int]:
        """UDP: (listener cookie, cpu) -> datagrams received on that CPU
        (bpf/wakeup.c rp_rx_cpu; {} for TCP or with data-ready off)."""
        if self._bpf is None or self.proto != "udp" or self.data_ready == "none":
            return {}
        return {(k.cookie, k.cpu): v.value for k, v in self._bpf[b"rp_rx_cpu"].items()}

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()         # detaches every probe, frees programs and maps
            self._bpf = None
