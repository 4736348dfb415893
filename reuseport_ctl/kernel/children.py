"""Forking children and getting rid of them: what the supervisor, churn's
group and its load processes all do the same way."""
from __future__ import annotations

import gc
import os
import signal
import sys
import time
from typing import Callable, Iterable, NoReturn


def fork() -> int:
    """os.fork() for a child that the parent alone decides to stop.

    SIGINT/SIGTERM/SIGHUP are blocked across the fork so the child cannot get
    one while it still runs the parent's handlers; the child then ignores
    Ctrl-C and a hang-up (they reach the whole process group: only the parent
    decides), dies on SIGTERM, and never finalizes the parent's objects (fd
    numbers get reused).
    Buffered output is flushed first so the child does not print it again."""
    sys.stdout.flush()
    sys.stderr.flush()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        gc.freeze()
        return 0
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def kill(pid: int, sig: int) -> None:
    """Send sig; a child that is already gone is no error."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def reaped(pid: int, block: bool = False) -> bool:
    """Reap the child if it has ended (or wait for it: block); True once it
    is gone."""
    try:
        return os.waitpid(pid, 0 if block else os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


def stop(pids: Iterable[int], grace: float) -> None:
    """SIGTERM every child, wait up to `grace` for them, SIGKILL the
    stragglers; every one is reaped on return."""
    pids = list(pids)
    for pid in pids:
        kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if not reaped(p)]
        if pids:
            time.sleep(0.005)
    for pid in pids:
        kill(pid, signal.SIGKILL)
        reaped(pid, block=True)


def run_child(body: Callable[[], None], who: str) -> NoReturn:
    """The end of a forked child: run body, then _exit (never the parent's
    cleanup, nor pytest's): 0 if it returned, 1 with one line on stderr,
    naming `who`, if it raised."""
    code = 1
    try:
        body()
        code = 0
    except BaseException as e:
        try:        # fd 2 itself: sys.stderr may wrap an fd the child closed
            os.write(2, f"reuseport-ctl: {who}: {type(e).__name__}: {e}\n".encode())
        except BaseException:
            pass
    finally:
        os._exit(code)
