"""What this kernel (and machine) offers, probed by trying each facility.

Reading kernel config lies (lockdown, capabilities, missing PMUs), so every
probe does the real thing once: binds, loads, attaches, then closes what it
made. Each returns a Facility whose `without` says what still works when it
is missing. BPF objects are named "rpd_*" so a leak would be easy to spot.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import shutil
import socket
import stat
import struct
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from . import bpf, btf, process, reuseport, tracefs

KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")
LOOKUP_FUNC = "__inet_lookup_listener"   # what the lookup probe hooks
FENTRY_FUNC = "tcp_v4_rcv"
DATA_READY_TP = "sock:sk_data_ready"
WAKEUP_TP = "sched:sched_waking"   # fires in the waker, inside the data-ready

# Facility names: other layers (probes/strategy.py, tests) refer to these.
SO_REUSEPORT = "SO_REUSEPORT"
CBPF = "SO_ATTACH_REUSEPORT_CBPF"
EBPF = "SO_ATTACH_REUSEPORT_EBPF"
SK_REUSEPORT = "SK_REUSEPORT"
SOCKARRAY = "REUSEPORT_SOCKARRAY"
MIGRATE = "SELECT_OR_MIGRATE"
MIGRATE_REQ = "net.ipv4.tcp_migrate_req"
SK_LOOKUP = "sk_lookup"
KPROBES = "kprobes"
FENTRY = "fentry"
TRACEPOINTS = "tracepoints"
DATA_READY_TRACEPOINT = "sk_data_ready tracepoint"
RAW_TRACEPOINTS = "raw_tracepoints"
TP_BTF = "tp_btf"
BTF = "BTF"
UHASH4 = "UDP 4-tuple hash"
EPOLLEXCLUSIVE = "EPOLLEXCLUSIVE"
PIDFD_GETFD = "pidfd_getfd"
CAPABILITIES = "capabilities"
BCC = "bcc"
HEADERS = "kernel headers"
NGINX = "nginx"
WRK = "wrk"

# The core: without these, reuseport-ctl cannot build and steer a group.
CORE = (SO_REUSEPORT, CBPF, SK_REUSEPORT, SOCKARRAY)

WITHOUT = {
    SO_REUSEPORT: "no reuseport groups; the shared-accept, epoll and dispatcher "
                  "worker models still run",
    CBPF: "the kernel's own 4-tuple hash still spreads the group; no cpu/mod policies",
    EBPF: "the kernel hash still spreads the group; no eBPF policies",
    SK_REUSEPORT: "kernel and cBPF policies (cpu, mod) work; no eBPF policies",
    SOCKARRAY: "kernel and cBPF policies work; no map-based eBPF steering "
               "(drain, consistent hashing)",
    MIGRATE: "selection works; requests orphaned by a closing listener are migrated "
             "only by net.ipv4.tcp_migrate_req, by hash, or reset",
    MIGRATE_REQ: "requests orphaned by a closing listener are reset (churn counts them)",
    SK_LOOKUP: "lookups are counted only by the selector program's counters "
               "(not per 4-tuple; groups without an eBPF policy are not counted)",
    KPROBES: "lookups are counted by the sk_lookup observer instead, data-ready by "
             "the sk_data_ready tracepoint (raw, or through tracefs); no lookup "
             "latency histogram",
    FENTRY: "nothing lost: probes use kprobes or tracepoints (fentry is only cheaper)",
    TRACEPOINTS: "wakeups are not counted; data-ready counts need kprobes instead; "
                 "without either only per-worker distribution is shown",
    DATA_READY_TRACEPOINT: "data-ready is counted by a kprobe on sock_def_readable where "
                           "the kernel has kprobes (the tracepoint exists since 6.3)",
    RAW_TRACEPOINTS: "tracefs tracepoints carry the probes",
    TP_BTF: "tracefs tracepoints carry the probes",
    BTF: "probes that read kernel structs (accept backlog) are off; selection and "
         "counting work",
    UHASH4: "connected UDP sockets are found by a 2-tuple slot scan; the UDP bench "
            "runs, lookup cost grows with the number of sockets",
    EPOLLEXCLUSIVE: "the epoll-exclusive worker model is skipped; shared epoll shows "
                    "the thundering herd",
    PIDFD_GETFD: "attach/detach work only on groups reuseport-ctl started, not on a "
                 "running nginx",
    CAPABILITIES: "facilities needing the missing capabilities fail above; run as root",
    BCC: "kernel and cBPF policies (cpu, mod) work; eBPF policies and probes need "
         "bcc: run scripts/bootstrap",
    HEADERS: "bcc cannot compile: kernel and cBPF policies work; run scripts/bootstrap "
             "for a stand-in header tree",
    NGINX: "benchmarks against nginx are skipped; the built-in workers still run",
    WRK: "the built-in load generator drives benchmarks instead",
}


@dataclass(frozen=True)
class Facility:
    name: str
    ok: bool
    detail: str
    without: str   # what still works without it


def _fac(name: str, ok: bool, detail: str) -> Facility:
    return Facility(name, ok, detail, WITHOUT[name])


def _why(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    return str(e)


def _fd(stack: ExitStack, fd: int) -> int:
    stack.callback(os.close, fd)
    return fd


def _listener(stack: ExitStack, port: int = 0, kind=socket.SOCK_STREAM) -> socket.socket:
    """A SO_REUSEPORT socket on 127.0.0.1, bound and (for TCP) listening."""
    s = stack.enter_context(socket.socket(socket.AF_INET, kind))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    return s


# --- reuseport --------------------------------------------------------------

def probe_so_reuseport() -> Facility:
    with ExitStack() as st:
        a = _listener(st)
        port = a.getsockname()[1]
        _listener(st, port)
        return _fac(SO_REUSEPORT, True, f"2 listeners bound 127.0.0.1:{port}")


def probe_cbpf() -> Facility:
    # classic BPF "ret #0": always the group's first socket
    with ExitStack() as st:
        s = _listener(st)
        reuseport.attach_cbpf(s, struct.pack("=HBBI", 0x06, 0, 0, 0))
        return _fac(CBPF, True, "cBPF program attached to a listener")


def probe_ebpf() -> Facility:
    with ExitStack() as st:
        # The original eBPF form: a socket filter returning the socket index.
        prog = _fd(st, bpf.prog_load(bpf.PROG_TYPE_SOCKET_FILTER, bpf.ret_imm(0),
                                     name="rpd_ebpf"))
        s = _listener(st)
        reuseport.attach_ebpf(s, prog)
        return _fac(EBPF, True, "socket-filter program attached to a listener")


def probe_sk_reuseport() -> Facility:
    with ExitStack() as st:
        prog = _fd(st, bpf.prog_load(bpf.PROG_TYPE_SK_REUSEPORT, bpf.ret_imm(bpf.SK_PASS),
                                     bpf.ATTACH_SK_REUSEPORT_SELECT, name="rpd_select"))
        s = _listener(st)
        reuseport.attach_ebpf(s, prog)
        return _fac(SK_REUSEPORT, True, "program loaded and attached to a listener")


def probe_sockarray() -> Facility:
    with ExitStack() as st:
        m = _fd(st, bpf.map_create(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 1, "rpd_socks"))
        s = _listener(st)
        bpf.map_update(m, bpf.u32(0), bpf.u64(s.fileno()))
        return _fac(SOCKARRAY, True, "map created, a listener stored in it")


def probe_migrate() -> Facility:
    with ExitStack() as st:
        _fd(st, bpf.prog_load(bpf.PROG_TYPE_SK_REUSEPORT, bpf.ret_imm(bpf.SK_PASS),
                              bpf.ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE, name="rpd_migrate"))
        return _fac(MIGRATE, True, "SK_REUSEPORT program for select-or-migrate loaded")


def probe_migrate_req() -> Facility:
    try:
        value = int(MIGRATE_SYSCTL.read_text())
    except OSError as e:
        return _fac(MIGRATE_REQ, False, f"no such sysctl ({_why(e)}); kernel < 5.14")
    state = "on: orphaned requests migrate by hash" if value else \
        "off: only a SELECT_OR_MIGRATE program migrates orphaned requests"
    return _fac(MIGRATE_REQ, True, f"= {value} ({state})")


def probe_sk_lookup() -> Facility:
    # An sk_lookup program returning SK_PASS without assigning a socket is a
    # pure observer: attaching it to our netns for a moment changes nothing.
    with ExitStack() as st:
        prog = _fd(st, bpf.prog_load(bpf.PROG_TYPE_SK_LOOKUP, bpf.ret_imm(bpf.SK_PASS),
                                     bpf.ATTACH_SK_LOOKUP, name="rpd_lookup"))
        ns = _fd(st, os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        _fd(st, bpf.link_create(prog, ns, bpf.ATTACH_SK_LOOKUP))
        return _fac(SK_LOOKUP, True, "observer linked to this netns (and unlinked)")


# --- tracing ------------------------------------------------------------------

NR_PERF_EVENT_OPEN = 298          # x86_64
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_SET_BPF = 0x40042408
ATTACH_TRACE_RAW_TP = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _perf_event_open(ptype: int, config: int, config1: int = 0) -> int:
    """perf_event_open(attr, pid=-1, cpu=0): system-wide on CPU 0."""
    # struct perf_event_attr, PERF_ATTR_SIZE_VER5 (112 bytes); sample_period=1
    attr = struct.pack("=IIQQ", ptype, 112, config, 1).ljust(56, b"\0")
    attr += struct.pack("=QQ", config1, 0)
    buf = ctypes.create_string_buffer(attr.ljust(112, b"\0"), 112)
    fd = _libc.syscall(ctypes.c_long(NR_PERF_EVENT_OPEN), buf, ctypes.c_int(-1),
                       ctypes.c_int(0), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def probe_kprobes() -> Facility:
    if not (KPROBE_PMU / "type").exists():
        return _fac(KPROBES, False, f"no kprobe PMU ({KPROBE_PMU} absent): "
                                    f"CONFIG_KPROBES is off")
    ptype = int((KPROBE_PMU / "type").read_text())
    name = ctypes.create_string_buffer(LOOKUP_FUNC.encode())
    with ExitStack() as st:
        try:
            _fd(st, _perf_event_open(ptype, 0, ctypes.addressof(name)))
        except OSError as e:
            return _fac(KPROBES, False, f"kprobe on {LOOKUP_FUNC} refused ({_why(e)})")
        return _fac(KPROBES, True, f"kprobe on {LOOKUP_FUNC} opened")


def probe_fentry() -> Facility:
    try:
        target = btf.vmlinux().find(FENTRY_FUNC, btf.FUNC)
    except UserError as e:
        return _fac(FENTRY, False, f"needs BTF ({e})")
    if target is None:
        return _fac(FENTRY, False, f"{FENTRY_FUNC} not in BTF")
    with ExitStack() as st:
        try:
            _fd(st, bpf.prog_load(bpf.PROG_TYPE_TRACING, bpf.ret_imm(0),
                                  bpf.ATTACH_TRACE_FENTRY, attach_btf_id=target,
                                  name="rpd_fentry"))
        except OSError as e:
            return _fac(FENTRY, False, f"fentry on {FENTRY_FUNC}: load refused ({_why(e)})")
        return _fac(FENTRY, True, f"fentry program for {FENTRY_FUNC} loaded")


def _attach_tracepoint(fac: str, event: str) -> Facility:
    """Attach a BPF program to a tracefs tracepoint for real (through perf)."""
    where = "mounted" if tracefs.mounted() else "not mounted, mountable"
    try:
        with tracefs.scratch() as root, ExitStack() as st:
            if not tracefs.event_dir(root, event).is_dir():
                return _fac(fac, False, f"tracefs {where}; no {event}")
            prog = _fd(st, bpf.prog_load(bpf.PROG_TYPE_TRACEPOINT, bpf.ret_imm(0),
                                         name="rpd_tp"))
            ev = _fd(st, _perf_event_open(PERF_TYPE_TRACEPOINT,
                                          tracefs.tracepoint_id(event, root)))
            fcntl.ioctl(ev, PERF_EVENT_IOC_SET_BPF, prog)
            return _fac(fac, True, f"tracefs {where}; {event} attached")
    except OSError as e:
        return _fac(fac, False, f"{event}: {_why(e)}")


def probe_tracepoints() -> Facility:
    return _attach_tracepoint(TRACEPOINTS, WAKEUP_TP)


def probe_data_ready_tracepoint() -> Facility:
    return _attach_tracepoint(DATA_READY_TRACEPOINT, DATA_READY_TP)


def probe_raw_tracepoints() -> Facility:
    with ExitStack() as st:
        prog = _fd(st, bpf.prog_load(bpf.PROG_TYPE_RAW_TRACEPOINT, bpf.ret_imm(0),
                                     name="rpd_rawtp"))
        # task_rename: a tracepoint every kernel has (task.h, since 3.x) and a
        # cold one. Enabling a tracepoint patches the code at its call site;
        # a hot site (sched_waking, in try_to_wake_up) being patched while
        # other CPUs run it once crashed a Debian 6.12 guest under TCG.
        # (Whether sk_data_ready exists is the data-ready facility's question.)
        try:
            _fd(st, bpf.raw_tracepoint_open("task_rename", prog))
        except OSError as e:
            return _fac(RAW_TRACEPOINTS, False, f"raw tracepoint task_rename: {_why(e)}")
        return _fac(RAW_TRACEPOINTS, True, "task_rename attached (no tracefs needed)")


def probe_tp_btf() -> Facility:
    try:
        target = btf.vmlinux().find("btf_trace_sk_data_ready", btf.TYPEDEF)
    except UserError as e:
        return _fac(TP_BTF, False, f"needs BTF ({e})")
    if target is None:
        return _fac(TP_BTF, False, "btf_trace_sk_data_ready not in BTF")
    with ExitStack() as st:
        try:
            prog = _fd(st, bpf.prog_load(bpf.PROG_TYPE_TRACING, bpf.ret_imm(0),
                                         ATTACH_TRACE_RAW_TP, attach_btf_id=target,
                                         name="rpd_tpbtf"))
        except OSError as e:
            return _fac(TP_BTF, False, f"tp_btf/sk_data_ready: load refused ({_why(e)})")
        _fd(st, bpf.link_create(prog, 0, ATTACH_TRACE_RAW_TP))
        return _fac(TP_BTF, True, "tp_btf/sk_data_ready loaded and linked")


def probe_btf() -> Facility:
    try:
        b = btf.vmlinux()
        off = b.member_offset("sock", "sk_ack_backlog")
    except UserError as e:
        return _fac(BTF, False, str(e))
    size = btf.VMLINUX.stat().st_size / 2**20
    return _fac(BTF, True, f"{btf.VMLINUX}: {len(b)} types, {size:.1f} MiB "
                           f"(sock.sk_ack_backlog at +{off})")


def probe_uhash4() -> Facility:
    # Linux 6.13+ hashes connected UDP sockets by 4-tuple (udp_lib_hash4).
    funcs = ("udp_lib_hash4", "udp4_hash4")
    try:
        b = btf.vmlinux()
        found = [f for f in funcs if b.has_func(f)]
        if b.find("udp_hslot_main", btf.STRUCT) is not None:
            found.append("struct udp_hslot_main")
        if found:
            return _fac(UHASH4, True, f"in BTF: {', '.join(found)}")
    except UserError:
        pass
    try:
        with open("/proc/kallsyms") as f:
            syms = {line.split()[2] for line in f if "hash4" in line}
    except OSError:
        syms = set()
    found = [f for f in funcs if f in syms]
    if found:
        return _fac(UHASH4, True, f"in kallsyms: {', '.join(found)}")
    return _fac(UHASH4, False, "no udp_lib_hash4/udp4_hash4 in BTF or kallsyms "
                               "(kernel < 6.13)")


def probe_epollexclusive() -> Facility:
    with ExitStack() as st:
        s = _listener(st)
        ep = st.enter_context(select.epoll())
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        return _fac(EPOLLEXCLUSIVE, True, "exclusive epoll wait registered on a listener")


def probe_pidfd_getfd() -> Facility:
    # Take a socket out of another process, as attach does with a live nginx.
    a, b = socket.socketpair()
    with a, b:
        child = subprocess.Popen(["sleep", "30"], stdin=b, stdout=subprocess.DEVNULL)
        try:
            with ExitStack() as st:
                pidfd = _fd(st, os.pidfd_open(child.pid))
                fd = _fd(st, process.pidfd_getfd(pidfd, 0))
                ok = stat.S_ISSOCK(os.fstat(fd).st_mode)
                return _fac(PIDFD_GETFD, ok, f"took a socket from pid {child.pid}" if ok
                            else "got an fd, but not the child's socket")
        finally:
            child.kill()
            child.wait()


def probe_capabilities() -> Facility:
    from . import caps
    missing = caps.missing(caps.BITS)
    if missing:
        return _fac(CAPABILITIES, False, f"missing {', '.join(missing)}")
    return _fac(CAPABILITIES, True, ", ".join(caps.BITS))


BCC_PROBE_C = """
#include <uapi/linux/bpf.h>
int rpd_bcc(struct sk_reuseport_md *md) { return SK_PASS; }
"""


def probe_headers() -> Facility:
    from .bcc import header_tree
    try:
        t = header_tree()
    except UserError as e:
        return _fac(HEADERS, False, str(e))
    kind = f"stand-in for {os.uname().release}" if t.stand_in else "the running kernel's"
    return _fac(HEADERS, True, f"{t.path} ({t.version}, {kind})")


def header_tree_info() -> dict:
    """The header tree bcc will use, as plain data (for --json)."""
    from .bcc import header_tree
    try:
        t = header_tree()
    except UserError as e:
        return {"path": None, "error": str(e)}
    return {"path": str(t.path), "version": t.version, "stand_in": t.stand_in,
            "running": os.uname().release}


def probe_bcc() -> Facility:
    from .bcc import bcc_module, compile_program
    try:
        mod = bcc_module()
        t0 = time.monotonic()
        prog = compile_program(BCC_PROBE_C)
    except UserError as e:
        return _fac(BCC, False, str(e))
    try:
        prog.load_func(b"rpd_bcc", bpf.PROG_TYPE_SK_REUSEPORT)
    except Exception as e:  # bcc raises plain Exception when the kernel refuses
        return _fac(BCC, False, f"compiled, but the load failed: {e}")
    finally:
        prog.cleanup()
    took = time.monotonic() - t0
    return _fac(BCC, True, f"bcc {getattr(mod, '__version__', '?')}: SK_REUSEPORT program "
                           f"compiled and loaded in {took:.2f}s")


def _tool(name: str) -> Facility:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    return _fac(name, bool(path), path or "not installed")


def probe_nginx() -> Facility:
    return _tool(NGINX)


def probe_wrk() -> Facility:
    return _tool(WRK)


PROBES: list[tuple[str, Callable[[], Facility]]] = [
    (SO_REUSEPORT, probe_so_reuseport), (CBPF, probe_cbpf), (EBPF, probe_ebpf),
    (SK_REUSEPORT, probe_sk_reuseport), (SOCKARRAY, probe_sockarray),
    (MIGRATE, probe_migrate), (MIGRATE_REQ, probe_migrate_req),
    (SK_LOOKUP, probe_sk_lookup), (KPROBES, probe_kprobes), (FENTRY, probe_fentry),
    (TRACEPOINTS, probe_tracepoints), (DATA_READY_TRACEPOINT, probe_data_ready_tracepoint),
    (RAW_TRACEPOINTS, probe_raw_tracepoints),
    (TP_BTF, probe_tp_btf), (BTF, probe_btf), (UHASH4, probe_uhash4),
    (EPOLLEXCLUSIVE, probe_epollexclusive), (PIDFD_GETFD, probe_pidfd_getfd),
    (CAPABILITIES, probe_capabilities), (HEADERS, probe_headers), (BCC, probe_bcc),
    (NGINX, probe_nginx), (WRK, probe_wrk),
]


def probe(name: str, fn: Callable[[], Facility]) -> Facility:
    """Run one probe; a refusal (or any surprise) becomes a failed Facility.
    What the C libraries print meanwhile is not the user's to read: a failed
    probe's detail says it in one place."""
    from .bcc import stderr_captured
    with stderr_captured():
        try:
            return fn()
        except OSError as e:
            return _fac(name, False, _why(e))
        except Exception as e:  # a probe must never take doctor down
            return _fac(name, False, f"probe failed: {type(e).__name__}: {e}")


def probe_all() -> list[Facility]:
    return [probe(name, fn) for name, fn in PROBES]


def core_ok(facilities: list[Facility]) -> bool:
    ok = {f.name for f in facilities if f.ok}
    return all(name in ok for name in CORE)
