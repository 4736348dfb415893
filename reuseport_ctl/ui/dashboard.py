"""The `watch` dashboard: a rich renderable over one Frame (stats/live.py),
plus the small terminal helper that reads 'q' without waiting for Enter.

Header: the group (port, size, policy, probe strategies, kernel) and the
fairness figures; one row per member socket (per process on a listener
shared without SO_REUSEPORT; a dispatcher's children after its listener); a
footer with rows that joined or left and what the keys do.
"""
from __future__ import annotations

import math
import os
import select
import sys
import termios
import tty
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..stats.live import Frame, GroupInfo, rx_by, sparkline

BAR = 10
SPARK_WIDTH = 20


def _bar(share: float, widest: float) -> Text:
    n = round(BAR * share / widest) if widest else 0
    return Text.assemble(("█" * n, "green"), ("·" * (BAR - n), "grey37"),
                         f" {100 * share:5.1f}%")


def _f(x: Optional[float], fmt: str = "{:,.0f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def _ratio(r: Optional[float]) -> str:
    return "-" if r is None else "∞" if math.isinf(r) else f"{r:.2f}"


DISPATCHER = ("dispatcher: the kernel sees one listener; its split across children is the "
              "server's own")


def size(frame: Frame, g: GroupInfo) -> str:
    """'3 workers'; a threaded server: '2 workers (2 sockets in 1 process)';
    a dispatcher: '1 workers, 3 children'."""
    members = [r for r in frame.rows if not r.child]
    n, procs = len(members), len({r.pid for r in members})
    out = f"{n} worker{'' if n == 1 else 's'}"
    if g.reuseport and not g.own and procs != n:
        out += f" ({n} sockets in {procs} process{'' if procs == 1 else 'es'})"
    kids = len(frame.rows) - n
    if frame.dispatcher:
        out += f", {kids} child{'' if kids == 1 else 'ren'}"
    return out


def _slot(r) -> Text:
    """The slot, marked (!) when the line above the table names the member."""
    if r.child:
        return Text("child")
    sick = r.stuck or r.stopped or r.outside
    return Text(f"{r.slot}!" if sick else str(r.slot), style="bold red" if sick else "")


def _who(r) -> str:
    """pid, and the serving threads of a threaded server: '123 [123,124]'."""
    if not r.tids:
        return str(r.pid)
    return f"{r.pid} [{','.join(map(str, r.tids))}]"


def header(frame: Frame, g: GroupInfo, note: Optional[str] = None) -> Text:
    unit = "conn/s" if g.proto == "tcp" else "datagrams/s"
    where = g.addr or f"port {g.port}"
    t = Text.assemble(
        ("reuseport-ctl watch ", "bold"), f"{g.proto} {where} · ",
        (size(frame, g), "bold"), f" · policy {g.policy}",
        " (ours)" if g.own else "",
        f" (run pid {g.policy_owner['pid']})" if g.policy_owner else "",
        f" · kernel {g.kernel}\n",
        f"probes: lookup {g.lookup_strategy}, data-ready {g.data_ready_strategy}, "
        f"wakeups {g.wakeups_strategy}\n",
        "fairness: Jain ", (_f(frame.jain, "{:.3f}"), "bold"),
        " · max:min ", (_ratio(frame.max_min_ratio), "bold"),
        f" · {_f(frame.accepts_per_s)} {unit}",
        f" · lookups {_f(frame.lookups)} ({_f(frame.lookups_per_s)}/s)",
        f" · wakeups/event {_f(frame.wakeups_per_event, '{:.2f}')}",
        f" · {frame.elapsed:.0f} s")
    if g.policy.startswith("drain:"):
        t.append(f"\nslot{'s' if ',' in g.policy else ''} {g.policy[6:]} drained by the policy: "
                 f"they take no new {g.count_of}, by design (fairness counts them)",
                 style="dim")
    if frame.dispatcher:
        t.append(f"\n{DISPATCHER}", style="yellow")
    elif not g.reuseport:
        t.append(f"\nno SO_REUSEPORT: {len(frame.rows)} workers share {g.listeners} "
                 f"listener{'' if g.listeners == 1 else 's'}; the kernel picks none, the first "
                 f"to wake and accept() wins"
                 + ("" if frame.jain is not None else " (--spurious shows who)"), style="yellow")
    if not frame.listening:
        t.append(f"\nnothing listens on {g.proto} port {g.port} now; waiting", style="yellow")
    if frame.policy_note:
        t.append(f"\npolicy {g.policy} is not in force: {frame.policy_note}", style="bold red")
    for w in frame.warnings:
        t.append(f"\n{w}", style="bold yellow")
    if frame.rx_note and any(r.rx for r in frame.rows):
        t.append(f"\narrivals: {frame.rx_note}", style="dim")
    if note:
        t.append(f"\n{note}", style="yellow")
    return t


def _counts(d: Optional[dict]) -> str:
    """'0:512 1:3' (value:connections, most first); '-' when unknown; ''
    when none has arrived yet."""
    if d is None:
        return "-"
    return " ".join(f"{k}:{n:,}" for k, n in sorted(d.items(), key=lambda kv: -kv[1]))


def table(frame: Frame, g: GroupInfo) -> Table:
    tcp = g.proto == "tcp"
    t = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False)
    t.add_column("slot", justify="right")
    t.add_column(r"pid \[threads]" if any(r.tids for r in frame.rows) else "pid",
                 justify="right")
    t.add_column("cpu%", justify="right")
    t.add_column("share", no_wrap=True)
    t.add_column("conn/s" if tcp else "dgram/s", justify="right")
    t.add_column("last minute", no_wrap=True, min_width=SPARK_WIDTH)
    t.add_column("queue", justify="right")
    t.add_column("ready/s", justify="right")
    t.add_column("wakeups/ev", justify="right")
    t.add_column("spurious", justify="right")
    t.add_column("drops", justify="right")
    has_live = any(r.live is not None for r in frame.rows)
    if has_live:
        t.add_column("live", justify="right")
    if frame.dispatcher:
        t.add_column("conns", justify="right")
    # where its connections arrived, by CPU (NAPI ids and queues: arrivals())
    rx_cpus = [rx_by(r.rx, "cpu", frame.rx_unknown) for r in frame.rows]
    has_rx = any(rx_cpus)                   # shown once something has arrived
    if has_rx:
        t.add_column("rx cpu", no_wrap=True)
    widest = max((r.share or 0.0 for r in frame.rows), default=0.0)
    for i, r in enumerate(frame.rows):
        extra = ([_f(r.live, "{:,}")] if has_live else []) + \
            ([_f(r.conns, "{:,}")] if frame.dispatcher else []) + \
            ([_counts(rx_cpus[i])] if has_rx else [])
        t.add_row(
            _slot(r), _who(r), _f(r.cpu_percent, "{:.0f}"),
            _bar(r.share, widest) if r.share is not None else "-",
            _f(r.accepts_per_s), Text(sparkline(r.history, SPARK_WIDTH), style="cyan"),
            Text(str(r.queue_len), style="bold red" if r.queue_len and tcp else ""),
            _f(r.data_ready_per_s), _f(r.wakeups_per_event, "{:.2f}"),
            _f(r.spurious_wakeups, "{:,}"),
            Text(_f(r.drops, "{:,}"), style="bold red" if r.drops else ""), *extra)
    return t


def arrivals(frame: Frame) -> Optional[Table]:
    """Per member, the NAPI ids and rx queues its connections came through,
    when any is known (a NAPI driver; a kernel that keeps the queue)."""
    cols = [(f, title) for f, title in (("napi_id", "arrived via napi id"),
                                        ("rx_queue", "rx queue"))
            if any(rx_by(r.rx, f, frame.rx_unknown) for r in frame.rows)]
    if not cols:
        return None
    t = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False)
    t.add_column("slot", justify="right")
    for _, title in cols:
        t.add_column(title, no_wrap=True)
    for r in frame.rows:
        if not r.child:
            t.add_row(str(r.slot), *(_counts(rx_by(r.rx, f, frame.rx_unknown))
                                     for f, _ in cols))
    return t


def render(frame: Frame, g: GroupInfo, note: Optional[str] = None,
           events: tuple[str, ...] = (), keys: bool = False) -> RenderableType:
    parts: list[RenderableType] = [header(frame, g, note), table(frame, g)]
    more = arrivals(frame)
    if more is not None:
        parts.append(more)
    foot = list(events[-3:])
    if keys:
        foot.append("q quits")
    if foot:
        parts.append(Text(" · ".join(foot), style="grey62"))
    return Group(*parts)


@contextmanager
def keys() -> Iterator[Optional[Callable[[], str]]]:
    """While inside: a function returning the keys typed so far (without
    Enter), or None when stdin is not a terminal. The terminal is restored
    on the way out."""
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
    except (OSError, ValueError):           # replaced or closed stdin
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)

        def pressed() -> str:
            got = ""
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 64)
                if not chunk:
                    break
                got += chunk.decode(errors="replace")
            return got
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
