"""Rendering of a bench: one table per load point (setups side by side, the
median of the repeats with its min-max), then where each model's imbalance
appears. The numbers are the ones --json prints, as the bench summarized
them (BenchResult.rows)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..experiments.bench import (IMBALANCED, STALL_SHORT, BenchResult, Row, Spread, imbalances,
                                 stall_table, worst)


def _num(x: Optional[float], fmt: str) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞"
    return format(x, fmt)


def spread(s: Spread, fmt: str, always: bool = False) -> str:
    """'1.52 (1.31–2.10)': median, and the range when there was more than one value."""
    m = _num(s.median, fmt)
    if s.lo is None or (s.lo == s.hi and not always):
        return m
    return f"{m} ({_num(s.lo, fmt)}–{_num(s.hi, fmt)})"


def _ratio_style(m: Optional[float]) -> str:
    if m is None:
        return ""
    return "bold red" if m >= 2 else "yellow" if m >= IMBALANCED else "green"


def shares_text(r: Row) -> str:
    """Mean share of the busiest, the 2nd busiest, ... worker, in %."""
    return "/".join(f"{100 * s:.0f}" for s in r.shares_sorted)


def headline(result: BenchResult) -> str:
    """Where each setup's worst imbalance was (median max:min over repeats)."""
    rows = result.rows
    parts = []
    for label, r in worst(rows).items():
        parts.append(f"{label} {_num(r.max_min.median, '.2f')}:1 "
                     f"(c={r.concurrency}, {r.work_us} µs)")
    return "worst max:min per model: " + "; ".join(parts)


def render_bench(result: BenchResult) -> RenderableType:
    rows = result.rows
    env, cfg = result.env, result.config
    kind = ("short connections (1 request each)" if cfg["requests_per_conn"] == 1 else
            f"keep-alive ({cfg['requests_per_conn']} requests per connection)")
    size = (f"each load {cfg['load_s']:g} s ({cfg['stall_periods']} stall periods)"
            if cfg.get("load_s") else f"{cfg['conns']} connections per point")
    parts: list[RenderableType] = [Text(
        f"bench · kernel {env['kernel']} · {env['cpus']} CPUs · {cfg['workers']} workers · "
        f"{size} · {kind} · {cfg['repeat']} repeat(s); "
        f"median (min–max)", style="bold")]
    by_point: dict[tuple[int, int], list[Row]] = {}
    for r in rows:
        by_point.setdefault((r.work_us, r.concurrency), []).append(r)
    for (work, conc), rs in by_point.items():
        parts.append(_point_table(work, conc, rs))
    if cfg.get("stall"):
        parts.append(_stall_table(result))
        short = [r for r in rows if r.stall and r.stall_short]
        if short:
            parts.append(Text(
                "⚠ " + "; ".join(f"{r.label} c={r.concurrency} {r.work_us} µs: "
                                 f"{r.stall_short} of {r.repeats}" for r in short)
                + f" stalled repeat(s) stopped the worker for less than "
                  f"{100 * STALL_SHORT:.0f} % of what the schedule promises for the "
                  f"load's duration: those rows do not measure the stall", style="bold red"))
    parts.append(_findings([r for r in rows if not r.stall]))
    parts.append(Text(f"wakeups: {result.probe}", style="dim"))
    if result.interrupted:
        parts.append(Text("interrupted: the table shows the points done so far", style="red"))
    return Group(*parts)


def _point_table(work: int, conc: int, rows: Sequence[Row]) -> Table:
    t = Table(title=f"concurrency {conc} · work {work} µs per request", title_justify="left",
              caption="shares: busiest worker first · CPU: % of one core for a client "
                      "process / the busiest worker / the acceptor / all CPUs (everyone's)",
              caption_justify="left", caption_style="dim",
              box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    t.add_column("model")
    t.add_column("conns/s", justify="right")
    t.add_column("p50 ms", justify="right")
    t.add_column("p99 ms", justify="right")
    t.add_column("p99.9 ms", justify="right")
    t.add_column("max ms", justify="right")
    t.add_column("max:min", justify="right")
    t.add_column("Jain", justify="right")
    t.add_column("shares %", justify="right")
    t.add_column("wakeups/conn", justify="right")
    t.add_column("EAGAIN/conn", justify="right")
    t.add_column("CPU % c/w/a/all", justify="right")
    t.add_column("saturated")
    for r in rows:
        t.add_row(r.label + (f" ⏸{r.stall}" if r.stall else "")
                  + (" ⚠ stall short" if r.stall_short else ""), spread(r.conns_per_s, ".0f"), _num(r.p50_ms.median, ".2f"),
                  _num(r.p99_ms.median, ".2f"), _num(r.p999_ms.median, ".2f"),
                  _num(r.max_ms.median, ".1f"),
                  Text(spread(r.max_min, ".2f"), style=_ratio_style(r.max_min.median)),
                  _num(r.jain.median, ".3f"), shares_text(r),
                  spread(r.wakeups_per_conn, ".2f"), _num(r.spurious_per_conn.median, ".2f"),
                  _cpu(r.cpu), ", ".join(r.saturated) or "-")
        if r.errors:
            t.add_row(Text(f"  {r.errors} failed connections", style="red"))
    return t


def _stall_table(result: BenchResult) -> Table:
    """Each setup without and with the stall, side by side."""
    st = result.config["stall"]
    slot, rest = st.split(":")
    ms, every = rest.split("@")
    t = Table(title=f"worker {slot} stopped {ms} ms in every {every} ms (SIGSTOP/SIGCONT), "
                    f"the first stop as the load begins · "
                    f"latency at the client, median of the repeats",
              caption="stopped ms ⏸: how long the worker really was stopped during the "
                      "stalled load / what the schedule promises for the load's duration "
                      "(medians); ⚠: repeats stopped for less than "
                      f"{100 * STALL_SHORT:.0f} % of it, which measured no stall",
              caption_justify="left", caption_style="dim",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for c in ("model", "c", "Jain", "p99 ms", "max ms", "Jain ⏸", "p99 ms ⏸", "p99.9 ms ⏸",
              "max ms ⏸", "stalled worker's share", "stopped ms ⏸"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for d in stall_table(result.rows):
        a, b = d["calm"], d["stall"]
        k = int(slot)
        share = [c[k] / sum(c) if sum(c) else 0.0 for c in b.counts if k < len(c)]
        t.add_row(d["label"], str(d["concurrency"]), _num(a.jain.median, ".3f"),
                  _num(a.p99_ms.median, ".2f"), _num(a.max_ms.median, ".1f"),
                  _num(b.jain.median, ".3f"), _num(b.p99_ms.median, ".2f"),
                  _num(b.p999_ms.median, ".2f"), _num(b.max_ms.median, ".1f"),
                  f"{100 * sorted(share)[len(share) // 2]:.1f} %" if share else "-",
                  _stopped(b))
    return t


def _stopped(r: Row) -> Text:
    """'400/400', and ⚠ k/n in red when k of the n repeats fell far short."""
    txt = f"{_num(r.stalled_ms.median, '.0f')}/{_num(r.stall_expected_ms.median, '.0f')}"
    if r.stall_short:
        return Text(f"{txt} ⚠ {r.stall_short}/{r.repeats} short", style="bold red")
    return Text(txt)


def _cpu(c: dict) -> str:
    acc = "-" if c["acceptor"] is None else f"{c['acceptor']:.0f}"
    return f"{c['client']:.0f}/{c['worker']:.0f}/{acc}/{c['machine']:.0f}"


def _findings(rows: Sequence[Row]) -> Table:
    bad = imbalances(rows)
    t = Table(title=f"where each model's imbalance appears (median max:min ≥ {IMBALANCED})",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("model")
    t.add_column("worst max:min", justify="right")
    t.add_column("at")
    t.add_column("imbalanced load points (concurrency/work µs)")
    for label, r in worst(rows).items():
        pts = bad.get(label, [])
        t.add_row(label, Text(_num(r.max_min.median, ".2f"), style=_ratio_style(r.max_min.median)),
                  f"c={r.concurrency}, {r.work_us} µs",
                  ", ".join(f"{p.concurrency}/{p.work_us}" for p in pts) or "none")
    return t
