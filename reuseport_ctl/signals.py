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

import os
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
    """SIGTERM and SIGHUP raise Interrupted while the block runs, and SIGINT
    KeyboardInterrupt even if it was inherited ignored (main thread only;
    elsewhere nothing changes). Only the first: a second one
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
        # A job a non-interactive shell starts in the background inherits
        # SIGINT ignored: kill -INT (or Ctrl-C to its group) stops it all the same.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:               # not the main thread
        pass
    try:
        yield
    finally:
        if not _hold["holding"]:     # a committed verb keeps noting them (committing())
            for s, h in old.items():
                signal.signal(s, h)


# --- a verb's point of no return ------------------------------------------------------

_late: list[int] = []
_hold = {"keep": False, "holding": False}


def hold_after_commit() -> None:
    """Once a committing() block has run, keep noting stopping signals (not
    raising them) for the rest of the process: for a verb that has nothing
    left to do but print (attach), so a late Ctrl-C cannot turn its success
    into a failure."""
    _hold["keep"] = True


def finished() -> None:
    """The verb's work is done and printed: stopping signals are ignored
    from here to the process's exit. (Python puts SIG_DFL back for the
    handlers it set while the interpreter shuts down: a signal in those last
    tens of ms killed a verb that had succeeded, with 128 + N and no word.)"""
    try:
        for s in STOPPING:
            signal.signal(s, signal.SIG_IGN)
    except ValueError:               # not the main thread
        return
    _hold["holding"] = True
    pause_for_test("finished")


def late_signals() -> list[int]:
    """The stopping signals that came during or after a committing() block."""
    return list(_late)


@contextmanager
def committing():
    """The block makes the verb's work permanent (attach: the old pins go,
    the new ones take their place): a stopping signal can no longer undo
    it, so it is noted (late_signals()) instead of raised. After the block
    the handlers in force before are put back, unless hold_after_commit()
    was asked for."""
    old = {}

    def note(signum, _frame):
        _late.append(signum)
    try:
        for s in STOPPING:
            old[s] = signal.signal(s, note)
    except ValueError:               # not the main thread: nothing to hold
        pass
    try:
        yield
    finally:
        if _hold["keep"] and old:
            _hold["holding"] = True
        else:
            for s, h in old.items():
                signal.signal(s, h)


def pause_for_test(point: str) -> None:
    """A test hook, timing-free: with REUSEPORT_CTL_TEST_PAUSE=POINT:FIFO in
    the environment, block at `point` until a line is read from FIFO (the
    test opens it for writing, which tells it we are here, signals us, then
    writes)."""
    spec = os.environ.get("REUSEPORT_CTL_TEST_PAUSE", "")
    want, _, fifo = spec.partition(":")
    if want != point or not fifo:
        return
    with open(fifo) as f:
        f.readline()
