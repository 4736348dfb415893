"""reuseport-ctl's own probes (probes/session.py) count exactly: one
listener lookup per SYN or datagram, per class (tcp4/tcp6, udp4/udp6), and
one data-ready per queued connection or datagram, with each attach strategy:
kprobes (the VM's kernels) and the fallback (an sk_lookup observer and the
sock:sk_data_ready tracepoint)."""
from __future__ import annotations

import os
import time

from ..kernel import features as F
from ..probes.session import ProbeSession
from ..probes.strategy import Strategy
from .checks import check, expect_eq
from .net import IPV4, IPV6, TCP, UDP, Pool, flows

N4, N6 = 6, 4


def _settled(ps, done, seconds: float = 2.0):
    deadline = time.monotonic() + seconds
    while True:
        t = ps.read()
        if done(t) or time.monotonic() > deadline:
            return t
        time.sleep(0.02)


def count_exactly(lookup: str, data_ready: str) -> str:
    chosen = {"lookup": Strategy(lookup, "verify"), "data_ready": Strategy(data_ready, "verify"),
              "wakeups": Strategy("none", "not needed")}
    out = []
    for proto in (TCP, UDP):
        with Pool() as pool:
            g4, port = pool.group(proto, IPV4, 2)
            g6, _ = pool.group(proto, IPV6, 2, port)
            with ProbeSession(port, proto, [os.getpid()], chosen) as ps:
                got = {k: ps.strategies[k].name for k in ("lookup", "data_ready")}
                expect_eq(got, {"lookup": lookup, "data_ready": data_ready},
                          f"{proto}: attached strategies")
                seen = flows(pool, proto, IPV4, g4, port, count=N4) \
                    + flows(pool, proto, IPV6, g6, port, count=N6)
                expect_eq(sum(x is not None for x in seen), N4 + N6, f"{proto}: flows received")
                n = N4 + N6
                t = _settled(ps, lambda t: t.lookups == n and sum(t.data_ready.values()) == n)
                expect_eq(t.lookups_by_class, {f"{proto}4": N4, f"{proto}6": N6},
                          f"{proto}: listener lookups counted per class ({lookup})")
                expect_eq(sum(t.data_ready.values()), n,
                          f"{proto}: data-ready events counted ({data_ready})")
                if t.lookup_latency_log2_ns is not None:
                    expect_eq(sum(t.lookup_latency_log2_ns.values()), n,
                              f"{proto}: lookups in the latency histogram")
        out.append(f"{proto}: {N4}+{N6} lookups, {n} data-ready")
    return f"{lookup}/{data_ready}: " + "; ".join(out)


@check("probes-kprobe", selftest=None,
       needs=(F.SO_REUSEPORT, F.KPROBES, F.BCC, F.HEADERS), timeout=60)
def probes_kprobe(ctx):
    """With the kprobe strategy (kprobe+kretprobe on the listener lookup
    functions, kprobe on sock_def_readable) the tool counts exactly one lookup
    per TCP SYN / UDP datagram, split tcp4/tcp6 or udp4/udp6, one latency
    sample each, and one data-ready per queued connection or datagram."""
    return count_exactly("kprobe", "kprobe")


@check("probes-fallback", selftest=None,
       needs=(F.SO_REUSEPORT, F.SK_LOOKUP, F.DATA_READY_TRACEPOINT, F.BCC, F.HEADERS), timeout=60)
def probes_fallback(ctx):
    """With the fallback strategies (an sk_lookup observer linked to the
    network namespace, the sock:sk_data_ready tracepoint) the tool counts
    exactly one lookup per TCP SYN / UDP datagram, per class, and one
    data-ready per queued connection or datagram."""
    return count_exactly("sk_lookup", "tracepoint")
