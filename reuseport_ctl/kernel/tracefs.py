"""tracefs: where tracepoint ids live.

bcc's attach_tracepoint (and a perf_event_open of a tracepoint) needs the
event's id from tracefs, and a fresh machine here does not mount it. Callers
attaching tracepoints call ensure() first; doctor uses scratch() to learn
whether it is mountable without leaving a mount behind.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError

TRACEFS = Path("/sys/kernel/tracing")
_LEGACY = Path("/sys/kernel/debug/tracing")   # automounted by debugfs on old setups
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def mounted() -> Path | None:
    """A tracefs mount point already present, preferring the standard one."""
    points = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "tracefs":
                points.append(Path(fields[1].replace("\\040", " ")))
    for p in (TRACEFS, _LEGACY):
        if p in points:
            return p
    return points[0] if points else None


def _mount(target: Path) -> None:
    if _libc.mount(b"nodev", str(target).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def ensure() -> Path:
    """tracefs's mount point, mounting it at /sys/kernel/tracing if needed."""
    found = mounted()
    if found:
        return found
    try:
        _mount(TRACEFS)
    except OSError as e:
        if mounted():          # another process mounted it meanwhile
            return mounted()
        raise UserError(f"cannot mount tracefs at {TRACEFS} ({e.strerror}): tracepoints "
                        f"need it; run as root") from None
    return TRACEFS


@contextmanager
def scratch() -> Iterator[Path]:
    """A tracefs to look at: the existing mount, or a private one that is
    unmounted on exit (so asking leaves the system as it was)."""
    found = mounted()
    if found:
        yield found
        return
    tmp = Path(tempfile.mkdtemp(prefix="rpctl-tracefs-"))
    try:
        _mount(tmp)
        try:
            yield tmp
        finally:
            _libc.umount2(str(tmp).encode(), MNT_DETACH)
    finally:
        tmp.rmdir()


def event_dir(root: Path, event: str) -> Path:
    """'sock:sk_data_ready' -> <root>/events/sock/sk_data_ready."""
    system, _, name = event.partition(":")
    return root / "events" / system / name


def tracepoint_id(event: str, root: Path | None = None) -> int:
    """The perf id of a tracepoint such as 'sched:sched_wakeup'."""
    path = event_dir(root or ensure(), event) / "id"
    try:
        return int(path.read_text())
    except OSError:
        raise UserError(f"this kernel has no tracepoint {event}") from None
