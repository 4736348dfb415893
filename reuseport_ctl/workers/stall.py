"""A stalled worker: one process of the group stopped (SIGSTOP) for MS
milliseconds out of every EVERY_MS, from the supervisor's side, while the
load runs -- what a garbage-collection pause, a blocking disk read or a
long request does to one worker of a real server.

A stopped worker runs nothing, but the kernel keeps completing handshakes
on its listener: connections queue in its accept queue and wait. Whether
new ones keep arriving there is up to the selection (the kernel's hash
does not look; least-loaded reads the accept queue; a shared socket is
accepted by whoever is awake).

    stall = parse_stall("0:100@500")        # slot 0, 100 ms in every 500 ms
    s = Staller(stall, pid, max_stops=4)    # the first stop begins now
    ... s.tick(time.monotonic()) often ...  # stops and continues on schedule
    s.release()                             # continued, whatever happens
"""
from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from ..kernel import children

DEFAULT = "0:100@500"           # bench --stall alone: slot 0, 100 ms in every 500 ms
_SPEC = re.compile(r"^(\d+):(\d+)(?:@(\d+))?$")


@dataclass(frozen=True)
class Stall:
    slot: int
    ms: int                     # how long each stop lasts
    every_ms: int               # one stop begins every this many ms

    def __str__(self) -> str:
        return f"{self.slot}:{self.ms}@{self.every_ms}"

    def stopped_at(self, t: float) -> bool:
        """Whether the worker is stopped t seconds after the schedule began:
        stopped first (ms), as the load begins, then running (every_ms - ms),
        and again."""
        if t < 0:
            return False
        return (t * 1000.0) % self.every_ms < self.ms

    def next_change(self, t: float) -> float:
        """Seconds after the start of the next stop or continue after t."""
        period = self.every_ms / 1000.0
        k = int(t // period)
        for edge in (k * period, k * period + self.ms / 1000.0, (k + 1) * period):
            if edge > t:
                return edge
        return (k + 1) * period

    def promised_ms(self, t: float, stops: Optional[int] = None) -> float:
        """How long the schedule stops the worker in its first t seconds
        (at most `stops` stops): what a load that lasted t seconds should
        have seen."""
        period_ms, t_ms = float(self.every_ms), max(0.0, t * 1000.0)
        full, rest = divmod(t_ms, period_ms)
        n = int(full)
        if stops is not None and n >= stops:
            return float(stops * self.ms)
        return n * self.ms + min(float(self.ms), rest)


def parse_stall(spec: str, workers: Optional[int] = None) -> Stall:
    """'SLOT:MS[@EVERY_MS]'; EVERY_MS defaults to 5 x MS."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise UserError(f"--stall {spec!r}: write SLOT:MS[@EVERY_MS], e.g. {DEFAULT} "
                        f"(slot 0 stopped 100 ms in every 500 ms).")
    slot, ms = int(m.group(1)), int(m.group(2))
    every = int(m.group(3)) if m.group(3) else 5 * ms
    if not 1 <= ms <= 60_000:
        raise UserError(f"--stall {spec!r}: the stall must last 1 to 60000 ms.")
    if every <= ms:
        raise UserError(f"--stall {spec!r}: EVERY_MS ({every}) must be longer than the "
                        f"stall ({ms} ms), or the worker never runs.")
    if workers is not None and slot >= workers:
        raise UserError(f"--stall {spec!r}: there is no worker {slot}; the group has "
                        f"slots 0..{workers - 1}.")
    return Stall(slot, ms, every)


class Staller:
    """Stops and continues one pid on a Stall's schedule; tick() as often
    as the schedule's resolution needs (next_due() says when)."""

    def __init__(self, stall: Stall, pid: int, start: Optional[float] = None,
                 max_stops: Optional[int] = None):
        self.stall, self.pid, self.max_stops = stall, pid, max_stops
        self.t0 = time.monotonic() if start is None else start
        self.stopped = False
        self.stops = 0
        self.stopped_s = 0.0            # time spent stopped
        self._since = 0.0

    def tick(self, now: float) -> None:
        want = self.stall.stopped_at(now - self.t0)
        if want and not self.stopped and (self.max_stops is None
                                          or self.stops < self.max_stops):
            children.kill(self.pid, signal.SIGSTOP)
            self.stopped, self._since = True, now
            self.stops += 1
        elif not want and self.stopped:
            self._continue(now)

    def next_due(self, now: float) -> float:
        return self.t0 + self.stall.next_change(now - self.t0)

    def _continue(self, now: float) -> None:
        children.kill(self.pid, signal.SIGCONT)
        self.stopped = False
        self.stopped_s += now - self._since

    def release(self) -> None:
        """Continue the worker if it is stopped (idempotent)."""
        if self.stopped:
            self._continue(time.monotonic())
