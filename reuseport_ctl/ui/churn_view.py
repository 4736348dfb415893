"""The churn report as rich tables: the same numbers --json prints."""
from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .report import count as _n
from .report import report_table, served_by

HOW = {
    "off": "tcp_migrate_req=0, no program",
    "on": "tcp_migrate_req=1 (kernel, by hash)",
    "bpf": "SELECT_OR_MIGRATE program",
    "bpf-refuse": "SELECT_OR_MIGRATE program, refusing",
    "drain": "drain:K, then close (no migration)",
}


def queued_table(rep: dict) -> Table:
    rows = rep["queued"]
    t = report_table(f"exact case: {rows[0]['k'] if rows else 0} clients queued on a listener "
                     f"that stops, a second worker joins")
    t.add_column("mode", no_wrap=True)
    t.add_column("how")
    for name in ("queued", "served", "reset", "timeout", "migrated"):
        t.add_column(name, justify="right")
    t.add_column("served by", justify="left")
    for r in rows:
        t.add_row(r["mode"], HOW.get(r["mode"], ""), str(r["queued"]), _n(r["ok"], bad=False),
                  _n(r["reset"]), _n(r["timeout"]), str(r["migrated"]), served_by(r))
    return t


def churn_table(rep: dict) -> Table:
    c = rep["config"]
    sched = ", ".join(c["schedule"]) or "none"
    t = report_table(f"churn under steady load: {c['workers']} workers, {c['duration']:g} s "
                     f"per mode, concurrency {c['concurrency']}, linger "
                     f"{c['linger'] * 1000:g} ms",
                     f"schedule: {sched}\nqueued: children in leaving listeners' accept queues "
                     f"at their close; rst/10k: resets per 10k connections; migr: TcpExt "
                     f"TCPMigrateReqSuccess")
    t.add_column("mode", no_wrap=True)
    for name in ("conns", "leaves", "reset", "refused", "timeout", "other"):
        t.add_column(name, justify="right", no_wrap=True)
    t.add_column("rst/10k", justify="right", style="bold", no_wrap=True)
    t.add_column("queued", justify="right", no_wrap=True)
    t.add_column("migr", justify="right", no_wrap=True)
    for r in rep["churn"]:
        e = r["errors"]
        t.add_row(r["mode"], f"{r['conns']:,}", str(r["leaves"]),
                  _n(e["reset"]), _n(e["refused"]), _n(e["timeout"]), _n(e["other"]),
                  f"{r['resets_per_10k']:.2f}", str(r["queued_at_close"]), str(r["migrated"]))
    return t


def render(rep: dict) -> RenderableType:
    parts: list[RenderableType] = []
    if rep["queued"]:
        parts.append(queued_table(rep))
    if rep["churn"]:
        parts.append(churn_table(rep))
    s = rep["sysctl"]
    parts.append(Text(
        f"kernel {rep['kernel']}, {rep['cpus']} CPUs, {rep['netns']} network namespace; "
        f"{s['name']} {s['before']} before, {s['after']} after"
        f"{'' if s['restored'] else ' (NOT restored)'}",
        style="dim" if s["restored"] else "bold red"))
    return Group(*parts)
