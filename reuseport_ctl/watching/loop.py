"""The sampling loop of a watch, how it stops (duration, q, SIGINT, SIGTERM:
always with the probes detached and a last frame), and `run --watch`."""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

from ..signals import STOPPING
from .checks import gone, require_probe_caps
from .engine import Watch
from .sources import OwnSource

POLL_S = 0.1         # seconds between checks for q / signals / the deadline


class Stop:
    """SIGINT, SIGTERM and SIGHUP end the watch cleanly (probes detached, a
    last frame); the verb then exits 128 + N (signals.py)."""

    def __init__(self):
        self.why: Optional[str] = None
        self.signum = 0

    @contextmanager
    def signals(self):
        def handler(signum, frame):
            self.why = signal.Signals(signum).name
            self.signum = signum
        old = {s: signal.signal(s, handler) for s in STOPPING}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def loop(w: Watch, duration: Optional[float], stop: Stop, wait: bool) -> None:
    """One tick per interval, on a fixed schedule from the start, until the
    duration, q, a signal, or (without wait) the group is gone."""
    from ..ui.dashboard import keys
    start = time.monotonic()
    deadline = start + duration if duration is not None else None
    n = 1
    with keys() if not w.as_json else nullcontext() as pressed:
        w.keys_on = pressed is not None
        w.start_view()
        while True:
            due = start + n * w.interval
            while stop.why is None:
                now = time.monotonic()
                if now >= due or (deadline is not None and now >= deadline):
                    break
                if pressed is not None and "q" in pressed().lower():
                    stop.why = "q"
                    break
                time.sleep(min(POLL_S, due - now))
            n += 1
            if not w.tick(wait):
                raise gone(w.source.port, w.source.proto)
            if stop.why is not None or (deadline is not None and time.monotonic() >= deadline):
                return


def watch_own(sup, duration: Optional[float], interval: float = 1.0) -> None:
    """`run --watch`: the dashboard over the group `sup` runs, until duration,
    q, Ctrl-C or SIGTERM (the supervisor's handlers set sup.stopping)."""
    require_probe_caps()
    with Watch(OwnSource(sup), interval, transient=True, stderr=True) as w:
        from ..ui.dashboard import keys
        w.announce()
        with keys() as pressed:
            w.keys_on = pressed is not None
            w.start_view()
            next_at = time.monotonic() + interval

            def on_tick(s) -> None:
                nonlocal next_at
                if pressed is not None and "q" in pressed().lower():
                    s.stopping = True
                    return
                if time.monotonic() >= next_at:
                    w.tick(wait=True)
                    next_at += interval
            sup.serve(duration, on_tick=on_tick, tick=POLL_S)
