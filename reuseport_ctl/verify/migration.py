"""When a listener of a group closes, its queued children (accepted by the
kernel, not yet by the process) and its pending requests (handshake not
finished) are reset, unless they migrate to another member: by hash when
net.ipv4.tcp_migrate_req is 1, or where a BPF_SK_REUSEPORT_SELECT_OR_MIGRATE
program says (md->migrating_sk is set for them).

Children: N connections complete into listener A (steered there), A closes,
B must accept all N. Requests: A has TCP_DEFER_ACCEPT, so each handshake's
final ACK (no data) is held back and the request stays pending; A closes,
then each client sends a byte: the request must complete into B."""
from __future__ import annotations

import os
import select
import socket
import time

from ..kernel import bpf
from ..kernel import features as F
from . import programs as P
from .checks import check, expect_eq
from .net import IPV4, TCP, Pool, attach_cbpf, attach_ebpf, sysctl

N = 8
SELFTEST = "bpf/prog_tests/migrate_reuseport.c"
SYSCTL = "net.ipv4.tcp_migrate_req"


def _accept_all(lsock: socket.socket, n: int, timeout: float = 2.0) -> list[socket.socket]:
    kids = []
    deadline = time.monotonic() + timeout
    while len(kids) < n and time.monotonic() < deadline:
        r, _, _ = select.select([lsock], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        try:
            kids.append(lsock.accept()[0])
        except BlockingIOError:
            pass
    return kids


def migrate(mode: str, kind: str) -> tuple[int, int, str]:
    """mode: sysctl, bpf or none; kind: children or requests. Returns
    (children B accepted with the client's byte, clients reset, note)."""
    b = None
    with Pool() as pool, sysctl(SYSCTL, "1" if mode == "sysctl" else "0"):
        defer = (lambda s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 30)) \
            if kind == "requests" else None
        a = pool.member(TCP, socket.AF_INET, "127.0.0.1", 0, before_bind=defer)
        port = a.getsockname()[1]
        lb = pool.member(TCP, socket.AF_INET, "127.0.0.1", port)
        m = None
        try:
            if mode == "bpf":
                m = bpf.map_create(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 2, "rp_v_migrate")
                bpf.map_update(m, bpf.u32(0), bpf.u64(a.fileno()))
                bpf.map_update(m, bpf.u32(1), bpf.u64(lb.fileno()))
                b = P.compile_bcc(P.MIGRATE_C, {"MAP_FD": m})
                fn = b.load_func(b"rp_vmigrate", bpf.PROG_TYPE_SK_REUSEPORT,
                                 attach_type=bpf.ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE)
                attach_ebpf(a, fn.fd)
            else:
                attach_cbpf(a, P.cbpf_sport(2, const=0))     # every SYN to A (index 0)
            clients = []
            for _ in range(N):
                c = pool.send(TCP, IPV4, port)
                c.settimeout(2)
                clients.append(c)
            r, _, _ = select.select([a], [], [], 0.5 if kind == "children" else 0.05)
            expect_eq(bool(r), kind == "children",
                      f"{kind}: listener A has a connection to accept before it closes")
            pool.socks.remove(a)
            a.close()                                    # A leaves the group
            reset = 0
            for c in clients:
                try:
                    c.sendall(b"m")
                except OSError:
                    reset += 1
            kids = _accept_all(lb, N, timeout=0.3 if mode == "none" else 2.0)
            got = 0
            for k in kids:
                pool.add(k)
                k.settimeout(2)
                try:
                    got += k.recv(1) == b"m"
                except OSError:
                    pass
            time.sleep(0.05)
            for c in clients:                            # alive: nothing to read yet
                c.setblocking(False)
                try:
                    if c.recv(1) == b"":
                        reset += 1                       # closed by the server
                except BlockingIOError:
                    pass
                except OSError:
                    reset += 1                           # ECONNRESET
            note = ""
            if b is not None:
                t = b[b"rp_vmig"]
                note = f"; the program saw {t[t.Key(1)].value} migrations"
            return got, min(reset, N), note
        finally:
            if b is not None:
                b.cleanup()
            if m is not None:
                os.close(m)


def _expect_migrated(mode: str, kind: str) -> str:
    got, reset, note = migrate(mode, kind)
    expect_eq((got, reset), (N, 0), f"{kind} of the closed listener: (accepted on the "
                                    f"other member with the client's byte, clients reset)")
    how = f"{SYSCTL}=1" if mode == "sysctl" else "SELECT_OR_MIGRATE program"
    return f"{N}/{N} {kind} migrated ({how}), none reset{note}"


@check("migrate-children-sysctl", selftest=SELFTEST, needs=(F.SO_REUSEPORT, F.MIGRATE_REQ, F.CBPF))
def migrate_children_sysctl(ctx):
    """With net.ipv4.tcp_migrate_req=1, the established children queued on a
    listener that closes move to another member of its group (by hash):
    all are accepted there and their clients are not reset."""
    return _expect_migrated("sysctl", "children")


@check("migrate-requests-sysctl", selftest=SELFTEST, needs=(F.SO_REUSEPORT, F.MIGRATE_REQ, F.CBPF))
def migrate_requests_sysctl(ctx):
    """With net.ipv4.tcp_migrate_req=1, requests still pending on a listener
    that closes (TCP_NEW_SYN_RECV: the final ACK held back by TCP_DEFER_ACCEPT)
    complete into another member when the client's next segment arrives."""
    return _expect_migrated("sysctl", "requests")


@check("migrate-children-bpf", selftest=SELFTEST,
       needs=(F.SO_REUSEPORT, F.MIGRATE, F.MIGRATE_REQ, F.SOCKARRAY, F.BCC))
def migrate_children_bpf(ctx):
    """With tcp_migrate_req=0, an SK_REUSEPORT program attached for
    BPF_SK_REUSEPORT_SELECT_OR_MIGRATE is asked where each child of a closing
    listener goes (md->migrating_sk set) and the one it selects accepts them all."""
    return _expect_migrated("bpf", "children")


@check("migrate-requests-bpf", selftest=SELFTEST,
       needs=(F.SO_REUSEPORT, F.MIGRATE, F.MIGRATE_REQ, F.SOCKARRAY, F.BCC))
def migrate_requests_bpf(ctx):
    """With tcp_migrate_req=0, a SELECT_OR_MIGRATE program also places the
    pending requests of a closing listener: they complete into the socket it
    selects."""
    return _expect_migrated("bpf", "requests")


@check("no-migration-resets", selftest=SELFTEST, needs=(F.SO_REUSEPORT, F.MIGRATE_REQ, F.CBPF))
def no_migration_resets(ctx):
    """Without migration (tcp_migrate_req=0, no SELECT_OR_MIGRATE program)
    the children and pending requests of a closing listener are reset: the
    other member accepts none of them, and every client sees a reset."""
    out = []
    for kind in ("children", "requests"):
        got, reset, _ = migrate("none", kind)
        expect_eq((got, reset), (0, N), f"{kind} of the closed listener: (accepted on the "
                                         f"other member, clients reset)")
        out.append(f"{kind}: 0/{N} accepted elsewhere, {N}/{N} reset")
    return "; ".join(out)
