"""Who may join a group, and which group a flow belongs to: the uid rule
(no port hijacking), wildcard versus specific address, IPv4 versus IPv6,
SO_REUSEADDR against a listener, and a group grown past its first array."""
from __future__ import annotations

import errno
import json
import os
import resource
import socket
import time

from ..kernel import features as F
from .checks import Skip, check, expect, expect_eq
from .net import IPV4, IPV6, TCP, UDP, Family, Pool, attach_cbpf, flows
from . import programs as P

NOBODY = 65534


def _err(fn) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "success"


def _sock(proto: str, af: int = socket.AF_INET, reuseport=True, reuseaddr=False) -> socket.socket:
    s = socket.socket(af, socket.SOCK_STREAM if proto == TCP else socket.SOCK_DGRAM)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if reuseaddr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s


def _bind(s: socket.socket, proto: str, addr) -> None:
    s.bind(addr)
    if proto == TCP:
        s.listen()


def as_nobody(body, hold: bool = False):
    """Run body() in a child process as uid/gid nobody; returns its JSON
    result. hold: the child reports, then waits for release() before exiting
    (so its sockets stay bound meanwhile); returns (result, release)."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(w2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = body()
            os.write(w, json.dumps(out).encode() + b"\n")
            if hold:
                os.read(r2, 1)
        except BaseException as e:
            os.write(w, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(w)
    os.close(r2)
    with os.fdopen(r) as f:
        line = f.readline()
    out = json.loads(line) if line else {"error": "the nobody process died"}

    def release():
        os.close(w2)
        os.waitpid(pid, 0)
    if hold:
        return out, release
    release()
    return out


@check("uid-anti-hijack", selftest=None, needs=(F.SO_REUSEPORT,))
def uid_anti_hijack(ctx):
    """Only sockets of the same effective uid join a reuseport group: a
    process of another uid that binds the group's address with SO_REUSEPORT
    gets EADDRINUSE (root is no exception, in either direction), while a
    second socket of the group's own uid joins (TCP and UDP)."""
    for proto in (TCP, UDP):
        with _sock(proto) as mine:
            _bind(mine, proto, ("127.0.0.1", 0))
            port = mine.getsockname()[1]

            def intruder():
                with _sock(proto) as s:
                    return {"err": _err(lambda: _bind(s, proto, ("127.0.0.1", port)))}
            got = as_nobody(intruder)
            expect_eq(got.get("err", got), "EADDRINUSE",
                      f"{proto}: uid {NOBODY} binding root's group 127.0.0.1:{port}")

        def own_group():
            a, b = _sock(proto), _sock(proto)
            with a, b:
                _bind(a, proto, ("127.0.0.1", 0))
                p = a.getsockname()[1]
                return {"port": p, "err": _err(lambda: _bind(b, proto, ("127.0.0.1", p)))}
        got = as_nobody(own_group)
        expect_eq(got.get("err", got), "success", f"{proto}: uid {NOBODY} joining its own group")

        def holder():
            s = _sock(proto)
            _bind(s, proto, ("127.0.0.1", 0))
            holder.keep = s
            return {"port": s.getsockname()[1]}
        got, release = as_nobody(holder, hold=True)
        try:
            if "port" not in got:
                raise RuntimeError(got.get("error"))
            with _sock(proto) as s:
                err = _err(lambda: _bind(s, proto, ("127.0.0.1", got["port"])))
        finally:
            release()
        expect_eq(err, "EADDRINUSE", f"{proto}: root binding uid {NOBODY}'s group")
    return f"another uid gets EADDRINUSE (uid {NOBODY} → root's group, root → uid " \
           f"{NOBODY}'s); the same uid joins (tcp, udp)"


def _add_v6_address(addr: str) -> None:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.addr("add", index=lo, address=addr, prefixlen=128)
        except Exception as e:   # NetlinkError: EEXIST is fine
            if getattr(e, "code", None) != errno.EEXIST:
                raise


@check("wildcard-specific-separate", selftest="net/reuseport_addr_any.c",
       needs=(F.SO_REUSEPORT,))
def wildcard_specific_separate(ctx):
    """A group on the wildcard address and a group on a specific address of
    the same port are separate groups: flows to the specific address reach
    only its group (the more specific match wins, whichever was bound first),
    flows to any other local address reach only the wildcard group. TCP and
    UDP; IPv4, IPv6 and v4-mapped (both groups IPv6, the specific one on
    ::ffff:127.0.0.1)."""
    other6 = None
    if ctx.private_netns:
        other6 = "fd00:7270::2"
        _add_v6_address(other6)
    cases = [(IPV4, "0.0.0.0", "127.0.0.1", "127.0.0.2", None),
             (IPV6, "::", "::1", other6, True),
             (Family("v4-mapped", socket.AF_INET6, "", socket.AF_INET, "127.0.0.1", "127.0.0.1"),
              "::", "::ffff:127.0.0.1", "127.0.0.2", False)]
    done = []
    for proto in (TCP, UDP):
        for fam, any_addr, specific, other, v6only in cases:
            for any_first in (True, False):
                with Pool() as pool:
                    port = 0
                    order = ("any", "specific") if any_first else ("specific", "any")
                    made = {}
                    for which in order:
                        addr = any_addr if which == "any" else specific
                        socks = []
                        for _ in range(2):
                            s = pool.member(proto, fam.server, addr, port, v6only=v6only)
                            port = s.getsockname()[1]
                            socks.append(s)
                        made[which] = socks
                    socks = made["any"] + made["specific"]       # 0, 1 any; 2, 3 specific
                    seen = flows(pool, proto, fam, socks, port, count=8, dst=specific
                                 if fam.name != "v4-mapped" else "127.0.0.1")
                    what = f"{proto} {fam.name} ({'wildcard' if any_first else 'specific'} first)"
                    expect(all(x in (2, 3) for x in seen), f"{what}: members for flows to {specific} "
                           f"(0, 1 wildcard; 2, 3 specific)", seen, "only 2 and 3")
                    if other:
                        seen = flows(pool, proto, fam, socks, port, count=8, dst=other)
                        expect(all(x in (0, 1) for x in seen), f"{what}: members for flows to "
                               f"{other}", seen, "only 0 and 1 (wildcard)")
            done.append(f"{proto}/{fam.name}")
    note = "" if other6 else " (IPv6 other-address half skipped: not in a private netns)"
    return f"specific address always beat the wildcard group, others went to the " \
           f"wildcard ({', '.join(done)}){note}"


@check("ipv4-ipv6-separate", selftest="net/reuseport_dualstack.c", needs=(F.SO_REUSEPORT,))
def ipv4_ipv6_separate(ctx):
    """IPv4 and (dual-stack) IPv6 reuseport sockets on the same wildcard port
    form two groups, never one: IPv4 flows reach only the IPv4 group, IPv6
    flows only the IPv6 group, whichever family bound first (the kernel keeps
    IPv4 members ahead of IPv6 ones in the lookup chain). TCP and UDP."""
    for proto in (TCP, UDP):
        for v4_first in (True, False):
            with Pool() as pool:
                port, made = 0, {}
                for af in ((socket.AF_INET, socket.AF_INET6) if v4_first
                           else (socket.AF_INET6, socket.AF_INET)):
                    made[af] = []
                    for _ in range(3):
                        s = pool.member(proto, af, "0.0.0.0" if af == socket.AF_INET else "::",
                                        port, v6only=False if af == socket.AF_INET6 else None)
                        port = s.getsockname()[1]
                        made[af].append(s)
                socks = made[socket.AF_INET] + made[socket.AF_INET6]   # 0-2 v4, 3-5 v6
                first = "IPv4" if v4_first else "IPv6"
                seen = flows(pool, proto, IPV4, socks, port, count=12)
                expect(all(x in (0, 1, 2) for x in seen), f"{proto} ({first} first): members "
                       f"for IPv4 flows (0-2 IPv4, 3-5 IPv6)", seen, "only 0-2")
                seen = flows(pool, proto, IPV6, socks, port, count=12)
                expect(all(x in (3, 4, 5) for x in seen), f"{proto} ({first} first): members "
                       f"for IPv6 flows (0-2 IPv4, 3-5 IPv6)", seen, "only 3-5")
    return "IPv4 flows stayed in the IPv4 group, IPv6 in the IPv6 group, either bind " \
           "order (tcp, udp)"


@check("reuseaddr-listen-conflict", selftest="net/reuseaddr_conflict.c", needs=())
def reuseaddr_listen_conflict(ctx):
    """SO_REUSEADDR (unlike SO_REUSEPORT) shares a TCP port only while no
    socket listens on it: against a dual-stack [::]:P listener, binding
    0.0.0.0:P or 127.0.0.1:P with SO_REUSEADDR fails with EADDRINUSE; two
    SO_REUSEADDR sockets may both bind 0.0.0.0:Q, but only the first listen()
    succeeds, the second gets EADDRINUSE."""
    with Pool() as pool:
        v6 = pool.add(_sock(TCP, socket.AF_INET6, reuseport=False, reuseaddr=True))
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        v6.bind(("::", 0))
        v6.listen()
        port = v6.getsockname()[1]
        for addr in ("0.0.0.0", "127.0.0.1"):
            s = pool.add(_sock(TCP, reuseport=False, reuseaddr=True))
            expect_eq(_err(lambda: s.bind((addr, port))), "EADDRINUSE",
                      f"SO_REUSEADDR bind {addr}:{port} against a [::]:{port} listener")
        a = pool.add(_sock(TCP, reuseport=False, reuseaddr=True))
        b = pool.add(_sock(TCP, reuseport=False, reuseaddr=True))
        a.bind(("0.0.0.0", 0))
        q = a.getsockname()[1]
        expect_eq(_err(lambda: b.bind(("0.0.0.0", q))), "success",
                  f"second SO_REUSEADDR bind of 0.0.0.0:{q} while nothing listens")
        expect_eq(_err(a.listen), "success", "first listen()")
        expect_eq(_err(b.listen), "EADDRINUSE", "second listen() on the same port")
    return "EADDRINUSE against a listener (0.0.0.0 and 127.0.0.1 vs [::]); two binds " \
           "share, the second listen() is refused"


BIG = 1024


@check("large-group-listen", selftest="net/stress_reuseport_listen.c",
       needs=(F.SO_REUSEPORT, F.CBPF), timeout=30)
def large_group_listen(ctx):
    """A TCP group grows to 1024 listeners on one port (past its first
    128-entry socket array, reallocated as it grows) for IPv4 and IPv6: every
    bind and listen succeeds, members near each growth boundary and the last
    one are reachable by index, and closing them all is clean."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * BIG + 256
    if soft < need:
        if hard < need:
            raise Skip(f"needs {need} open files; RLIMIT_NOFILE hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    out = []
    for fam in (IPV4, IPV6):
        with Pool() as pool:
            t0 = time.monotonic()
            socks, port = pool.group(TCP, fam, BIG)
            took = time.monotonic() - t0
            attach_cbpf(socks[0], P.cbpf_sport(BIG))
            aims = [0, 127, 128, 255, 256, 511, 512, BIG - 1]
            base = 26 * BIG
            seen = flows(pool, TCP, fam, socks, port, [base + i for i in aims])
            expect_eq(seen, aims, f"{fam.name}: members reached by flows aimed at them")
            t1 = time.monotonic()
        out.append(f"{fam.name}: {BIG} listeners in {took:.2f} s, closed in "
                   f"{time.monotonic() - t1:.2f} s")
    return "; ".join(out) + "; indices up to 1023 reached"


