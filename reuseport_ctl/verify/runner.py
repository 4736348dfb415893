"""Run checks one at a time, each in a process of its own (forked), and by
default in a network namespace of its own: a failing or hanging check cannot
leave sockets, programs or sysctls behind for the next one. A check that
outlives its time-out is killed (its whole process group) and fails.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import select
import signal
import socket
import struct
import time
import traceback
from typing import Callable, Iterable, Iterator

from ..kernel import features
from .checks import FAIL, PASS, SKIP, Check, Context, Fail, Result, Skip

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_libc = ctypes.CDLL(None, use_errno=True)

# Facilities that belong to the tool or the machine rather than the kernel.
TOOL_FACILITIES = {features.BCC, features.HEADERS, features.CAPABILITIES,
                   features.NGINX, features.WRK}


def lo_up() -> None:
    """Bring the loopback of this (fresh) namespace up (ioctl: no netlink needed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH", b"lo", 0).ljust(40, b"\0")
        flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req), 16)[0]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS,
                    struct.pack("16sH", b"lo", flags | IFF_UP).ljust(40, b"\0"))


def private_netns() -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    lo_up()


def probe_facilities(checks: Iterable[Check]) -> dict[str, features.Facility]:
    """Probe only the facilities the chosen checks need."""
    needed = {n for c in checks for n in c.needs}
    return {n: features.probe(n, fn) for n, fn in features.PROBES if n in needed}


def skip_reason(check: Check, facs: dict[str, features.Facility]) -> str | None:
    for name in check.needs:
        f = facs.get(name)
        if f is None or f.ok:
            continue
        who = "this machine lacks" if name in TOOL_FACILITIES else "this kernel lacks"
        return f"{who} {name}: {f.detail}"
    return None


def call(check: Check, ctx: Context) -> tuple[str, str]:
    """Run the check function here (no fork): (status, detail)."""
    try:
        detail = check.fn(ctx)
        return PASS, detail or "holds"
    except Fail as e:
        return FAIL, str(e)
    except Skip as e:
        return SKIP, str(e)
    except Exception as e:  # a check's surprise is that check's failure
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
        return FAIL, f"error{where}: {type(e).__name__}: {e}"


def _child(check: Check, ctx: Context, wfd: int) -> None:
    status, detail = FAIL, "the check process died"
    try:
        os.setpgid(0, 0)
        if ctx.private_netns:
            private_netns()
        status, detail = call(check, ctx)
    except BaseException as e:
        status, detail = FAIL, f"error setting up the check: {type(e).__name__}: {e}"
    finally:
        try:
            os.write(wfd, json.dumps({"status": status, "detail": detail}).encode())
        finally:
            os._exit(0)


def run_one(check: Check, ctx: Context, timeout: float | None = None) -> Result:
    t0 = time.monotonic()
    reason = skip_reason(check, ctx.facilities)
    if reason:
        return Result(check.name, check.selftest, SKIP, reason, 0.0, check.area)
    limit = timeout if timeout is not None else check.timeout
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(check, ctx, w)
    os.close(w)
    buf, timed_out = b"", False
    try:
        deadline = t0 + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    finally:
        os.close(r)
        if timed_out:
            for target in (-pid, pid):      # the check's process group, or the check
                try:
                    os.kill(target, signal.SIGKILL)
                except OSError:
                    pass
        _, wstatus = os.waitpid(pid, 0)
    secs = time.monotonic() - t0
    if timed_out:
        return Result(check.name, check.selftest, FAIL,
                      f"timed out after {limit:g} s (killed)", secs, check.area)
    try:
        out = json.loads(buf)
        return Result(check.name, check.selftest, out["status"], out["detail"], secs, check.area)
    except (ValueError, KeyError):
        how = (f"signal {os.WTERMSIG(wstatus)}" if os.WIFSIGNALED(wstatus)
               else f"exit {os.waitstatus_to_exitcode(wstatus)}")
        return Result(check.name, check.selftest, FAIL,
                      f"the check process died ({how}) without a result", secs, check.area)


def run(checks: list[Check], ctx: Context, timeout: float | None = None,
        on_start: Callable[[int, Check], None] | None = None) -> Iterator[Result]:
    """Run checks in order, yielding each Result as it completes."""
    for i, c in enumerate(checks):
        if on_start:
            on_start(i, c)
        yield run_one(c, ctx, timeout)


def preload_bcc(checks: Iterable[Check]) -> None:
    """Import bcc once, before forking, when a chosen check compiles BPF C."""
    if any(features.BCC in c.needs for c in checks):
        try:
            from ..kernel.bcc import bcc_module
            bcc_module()
        except Exception:
            pass        # the bcc facility's probe says why; those checks skip


__all__ = ["run", "run_one", "call", "probe_facilities", "preload_bcc", "lo_up",
           "private_netns"]
