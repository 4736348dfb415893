"""The live-connection probe's cost, side by side (a ratio, not a timing
assertion): loopback connect/accept/close churn per second on a watched port
and on another port, without and with the probe (bpf/conns.h) attached,
alternating, median of the repeats. Run as root in a fresh netns:

    ip netns add cost; ip netns exec cost sh -c 'ip link set lo up;
        .venv/bin/python benchmarks/conns_probe_cost.py'
"""
from __future__ import annotations

import platform
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reuseport_ctl.probes.conns import ConnsProbe  # noqa: E402

WATCHED, OTHER, N, REPEAT = 9301, 9302, 3000, 5


def churn(port: int, lsock: socket.socket) -> float:
    t0 = time.perf_counter()
    for _ in range(N):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = lsock.accept()
        c.close()
        a.close()
    return N / (time.perf_counter() - t0)


def main() -> None:
    ls = {}
    for p in (WATCHED, OTHER):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        s.listen(1024)
        ls[p] = s
    rates = {(p, on): [] for p in ls for on in (False, True)}
    for _ in range(REPEAT):
        for on in (False, True):
            probe = ConnsProbe(WATCHED, "/proc/thread-self/ns/net") if on else None
            try:
                for p in ls:
                    rates[(p, on)].append(churn(p, ls[p]))
            finally:
                if probe:
                    probe.close()
    print(f"kernel {platform.release()}, {os.cpu_count()} CPUs, {N} connections x {REPEAT}")
    for p, what in ((WATCHED, "watched port"), (OTHER, "another port")):
        off = statistics.median(rates[(p, False)])
        on = statistics.median(rates[(p, True)])
        print(f"{what:13s} conns/s without {off:8.0f}  with {on:8.0f}  ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
