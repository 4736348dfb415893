"""The end-of-run summary: a rich table over the report dict that --json
prints as is, and the one-line live status shown while a run goes on."""
from __future__ import annotations

from typing import Optional

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

BAR = 8


def _bar(share: float, widest: float) -> Text:
    n = round(BAR * share / widest) if widest else 0
    return Text.assemble(("█" * n, "green"), ("·" * (BAR - n), "grey37"),
                         f" {100 * share:5.1f}%")


def _ratio(r: Optional[float]) -> str:
    return "∞ (a worker got none)" if r is None else f"{r:.2f}"


def summary(rep: dict) -> RenderableType:
    tcp = rep["proto"] == "tcp"
    sel = rep.get("selections")
    title = (f"{rep['proto']} {rep['host']} port {rep['port']} · model {rep['model']} · "
             f"policy {rep['policy']}" + (f" · user {rep['user']}" if rep.get("user") else ""))
    caption = (f"fairness: max:min {_ratio(rep['max_min_ratio'])} · "
               f"Jain {rep['jain']:.3f}")
    t = Table(title=title, caption=caption, show_footer=True, title_justify="left",
              caption_justify="left", footer_style="bold",
              box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False)
    t.add_column("slot", "total", justify="right")
    t.add_column("pid", justify="right")
    t.add_column("cpu", justify="right")
    t.add_column("conns" if tcp else "datagrams", str(rep["total"]), justify="right")
    t.add_column("share", "", no_wrap=True)
    if tcp:
        t.add_column("requests", str(sum(w["requests"] for w in rep["workers"])), justify="right")
    t.add_column("eagain", str(sum(w["eagain"] for w in rep["workers"])), justify="right")
    t.add_column("wakeups", str(sum(w["wakeups"] for w in rep["workers"])), justify="right")
    t.add_column("restarts", str(sum(w["restarts"] for w in rep["workers"])), justify="right")
    if sel is not None:
        t.add_column("selected", str(sum(sel)), justify="right")
    widest = max((w["share"] for w in rep["workers"]), default=0.0)
    for w in rep["workers"]:
        row = [str(w["slot"]), str(w["pid"]), "-" if w["cpu"] is None else str(w["cpu"]),
               str(w["count"]), _bar(w["share"], widest)]
        if tcp:
            row.append(str(w["requests"]))
        row += [str(w["eagain"]), str(w["wakeups"]),
                Text(str(w["restarts"]), style="bold red" if w["restarts"] else "")]
        if sel is not None:
            row.append(str(sel[w["slot"]]) if w["slot"] < len(sel) else "-")
        t.add_row(*row)
    parts: list[RenderableType] = [t]
    if rep.get("acceptor"):
        a = rep["acceptor"]
        took = a["accepts"] if tcp else a["datagrams"]
        parts.append(Text(f"acceptor pid {a['pid']}: took {took}, handed each to a worker "
                          f"round-robin; restarts {a['restarts']}"))
    if rep.get("load"):
        parts.append(load_line(rep["load"]))
    return Group(*parts)


def load_line(load: dict) -> Text:
    errs = load.get("errors", {})
    nerr = sum(errs.values())
    lat = load.get("latency_ms", {})
    detail = ", ".join(f"{k} {v}" for k, v in errs.items() if v)
    return Text.assemble(
        "load: ", (f"{load.get('ok', 0)}/{load.get('conns', 0)} ok", "bold"),
        f" at {load.get('rate', 0):.0f}/s, ",
        (f"{nerr} errors" + (f" ({detail})" if detail else ""), "red" if nerr else ""),
        f", latency p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms")


def live_line(rep: dict, elapsed: float) -> Text:
    """One line while the run goes on (the full dashboard is `watch`)."""
    counts = " ".join(str(w["count"]) for w in rep["workers"])
    restarts = sum(w["restarts"] for w in rep["workers"])
    return Text(f"{elapsed:6.0f} s  total {rep['total']}  per worker [{counts}]  "
                f"Jain {rep['jain']:.3f}  restarts {restarts}  (Ctrl-C stops)")
