"""Rendering of bench --long-lived: per case (N connections over M workers)
and setup, the live connections per worker after the bursts and after the
reconnect storm, every repeat in worker-slot order, how many repeats hit
the even split exactly, and what the busiest and idlest worker did. The
numbers are LongResult.rows, as the experiment summarized them."""
from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..experiments.long_lived import LongResult


def _split(counts: list[int]) -> str:
    return "/".join(map(str, counts))


def _hits(k: int, of: int) -> Text:
    return Text(f"{k}/{of}", style="green" if k == of else "red" if k == 0 else "yellow")


def _cpu(busiest_idlest: tuple) -> str:
    return f"{busiest_idlest[0]:.1f} / {busiest_idlest[1]:.1f}"


def _reqs(busiest_idlest: tuple) -> str:
    if not busiest_idlest:
        return "-"
    return f"{busiest_idlest[0]:g} / {busiest_idlest[1]:g}"


def render_long(result: LongResult) -> RenderableType:
    env, cfg = result.env, result.config
    parts: list[RenderableType] = [Text(
        f"bench --long-lived · kernel {env['kernel']} · {env['cpus']} CPUs · "
        f"{cfg['workers']} workers · opened in bursts of {cfg['burst']}, a request per "
        f"connection every {1000 * cfg['round_s']:.0f} ms for {cfg['hold_s']:g} s before and after the storm · "
        f"{cfg['work_us']} µs work per request · {cfg['repeat']} repeat(s)", style="bold")]
    t = Table(caption="live connections per worker in slot order, one group per repeat · "
                      "ideal: how many repeats ended exactly at the even split · "
                      "requests: answers of the busiest / idlest worker in the hold that "
                      "follows, CPU: % of one core of the busiest / idlest worker in it "
                      "(medians)",
              caption_justify="left", caption_style="dim", box=box.SIMPLE_HEAD,
              pad_edge=False, show_edge=False)
    for c in ("case", "policy", "even split", "after the bursts", "ideal", "requests", "CPU %",
              "after the storm", "ideal ", "requests ", "CPU % "):
        t.add_column(c, justify="right" if c.startswith(("ideal", "requests", "CPU"))
                     else "left")
    last = None
    for r in result.rows:
        if last is not None and r.case != last:
            t.add_section()
        last = r.case
        t.add_row(r.case, r.label, _split(r.ideal), "  ".join(map(_split, r.opened)),
                  _hits(r.ideal_opened, r.repeats), _reqs(r.requests_opened),
                  _cpu(r.cpu_opened), "  ".join(map(_split, r.stormed)),
                  _hits(r.ideal_stormed, r.repeats), _reqs(r.requests_stormed),
                  _cpu(r.cpu_stormed))
        if r.errors:
            t.add_row(Text(f"  {r.errors} failed connections", style="red"))
    parts.append(t)
    parts.append(Text(f"live connections counted by {result.source}", style="dim"))
    if result.interrupted:
        parts.append(Text("interrupted: the table shows the runs done so far", style="red"))
    return Group(*parts)

