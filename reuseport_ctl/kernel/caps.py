"""Capabilities: one table and one test for every verb.

CAP_SYS_ADMIN is the kernel's fallback for CAP_BPF, CAP_PERFMON and
CAP_NET_ADMIN in the BPF paths the tool uses (bpf() program loads and map
creation, perf events for tracepoints, SK_REUSEPORT / SK_LOOKUP attach), so
a process with it lacks none of them.
"""
from __future__ import annotations

from typing import Iterable

BITS = {"CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
        "CAP_PERFMON": 38, "CAP_BPF": 39}
COVERED_BY_SYS_ADMIN = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}


def effective(pid: int | str = "self") -> int:
    """The effective capability set of a process (CapEff in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has(name: str, caps: int) -> bool:
    return bool(caps >> BITS[name] & 1)


def missing(names: Iterable[str], caps: int | None = None) -> list[str]:
    """Of `names`, those this process (or the set `caps`) lacks, counting
    CAP_SYS_ADMIN as any of COVERED_BY_SYS_ADMIN."""
    caps = effective() if caps is None else caps
    admin = has("CAP_SYS_ADMIN", caps)
    return [n for n in names
            if not has(n, caps) and not (admin and n in COVERED_BY_SYS_ADMIN)]
