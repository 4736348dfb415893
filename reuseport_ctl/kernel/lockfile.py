"""One reuseport-ctl at a time changes the pinned policies: an flock on a
file in /run/lock, held while pins are made, replaced or removed.

Two attaches on one port would otherwise both take the group's sockets out
of the old socket array and one would fail with EBUSY; a detach that empties
the shared directory could remove it under another port's attach. Taking the
lock is re-entrant within a process (attach cleans stale pins under it).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import time
from pathlib import Path

from ..errors import UserError

LOCK = Path("/run/lock/reuseport-ctl.lock")
WAIT_S = 30.0

_held = 0                  # depth in this process
_fd: int | None = None


def _holder(fd: int) -> str:
    """Who holds it, as far as the file says (its pid is written inside)."""
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
        return f" (pid {pid})" if pid.isdigit() else ""
    except OSError:
        return ""


def acquire(what: str, wait: float = WAIT_S) -> None:
    global _held, _fd
    if _held:
        _held += 1
        return
    try:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UserError(f"{what} cannot take its lock {LOCK} ({e.strerror}): run it as "
                        f"root.") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                who = _holder(fd)
                os.close(fd)
                raise UserError(f"another reuseport-ctl{who} has been changing the pinned "
                                f"policies for {wait:.0f} s, so {what} did not start; try "
                                f"again when it is done.") from None
            time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _fd, _held = fd, 1


def release() -> None:
    global _held, _fd
    _held -= 1
    if _held == 0 and _fd is not None:
        os.close(_fd)               # closing drops the flock
        _fd = None


def serialised(what: str, first=None):
    """Decorator: the function runs holding the lock. first(): a check to
    make before waiting for it (the capabilities: the lock file is root's)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            if first is not None:
                first()
            acquire(what)
            try:
                return fn(*a, **kw)
            finally:
                release()
        return inner
    return wrap
