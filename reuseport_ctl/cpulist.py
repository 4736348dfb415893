"""CPU lists in the kernel's own spelling ('0-2,5'), both ways. Pure."""
from __future__ import annotations

from typing import Iterable


def parse(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5] ('' -> [], as sysfs writes a node without CPUs);
    ValueError on anything else."""
    out: list[int] = []
    if not text.strip():
        return out
    for part in text.strip().split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        out.extend(range(first, last + 1))
    return out


def format(cpus: Iterable[int]) -> str:  # noqa: A001 (the module's verb)
    """[0, 1, 2, 5] -> '0-2,5'."""
    cpus = sorted(set(cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)
