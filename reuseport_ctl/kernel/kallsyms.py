"""Kernel text symbols from /proc/kallsyms."""
from __future__ import annotations

from pathlib import Path

KALLSYMS = Path("/proc/kallsyms")


def symbol_range(name: str) -> tuple[int, int] | None:
    """[start, end) of a kernel text symbol from /proc/kallsyms, or None when
    kallsyms hides addresses (kptr_restrict, no root) or lacks it."""
    try:
        lines = KALLSYMS.read_text().splitlines()
    except OSError:
        return None
    start = None
    for line in lines:
        f = line.split()
        if len(f) >= 3 and f[2] == name and f[1] in "tT":
            start = int(f[0], 16)
            break
    if not start:
        return None
    end = None
    for line in lines:
        addr = int(line[:line.index(" ")], 16)
        if start < addr and (end is None or addr < end):
            end = addr
    return (start, end) if end else None
