"""One exit convention for every verb: ended by a signal, the status is the
shell's 128 + N (SIGHUP 129, SIGINT 130, SIGTERM 143), after the verb has
cleaned up and printed what it has; SIGHUP and SIGTERM stop a verb the way
Ctrl-C does.

The CLI turns SIGTERM and SIGHUP into Interrupted (a KeyboardInterrupt, so
every `except KeyboardInterrupt` / `finally` cleanup runs for them too).
Verbs that stop gracefully on a signal (run, watch, attach --follow) catch
it themselves, finish, and then raise Stopped(signum) for the status.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

STOPPING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stopping signal other than SIGINT, raised where Ctrl-C would be."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Stopped(Exception):
    """The verb finished its work after a stopping signal: exit 128 + N."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signum_of(e: BaseException) -> int:
    return getattr(e, "signum", signal.SIGINT)


def exit_code(signum: int) -> int:
    return 128 + signum


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextmanager
def as_interrupts():
    """SIGTERM and SIGHUP raise Interrupted while the block runs (main
    thread only; elsewhere nothing changes). Only the first: a second one
    while the cleanup runs (sysctls, programs, workers) must not cut it short."""
    fired: list[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Interrupted(signum)
    old = {}
    try:
        for s in (signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, handler)
    except ValueError:               # not the main thread
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
