"""The reload report as rich tables: the same numbers --json prints."""
from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .report import count as _n
from .report import report_table, served_by

HOW = {
    "inherit": "new process inherits the sockets (fork/exec)",
    "pass": "sockets passed (pidfd_getfd + SCM_RIGHTS)",
    "rebind-off": "new sockets, old closed; tcp_migrate_req=0",
    "rebind-on": "new sockets, old closed; tcp_migrate_req=1",
    "rebind-bpf": "new sockets, old closed; SELECT_OR_MIGRATE program",
    "rebind-drain": "new sockets, old drained (drain:K), then closed",
}


def queued_table(rep: dict) -> Table:
    rows = rep["queued"]
    k = rows[0]["k"] if rows else 0
    t = report_table(f"exact case: {k} connections (datagrams) queued on the old server's "
                     f"socket, which does not accept (read); the server is replaced")
    for name, just in (("proto", "left"), ("mode", "left"), ("how", "left"),
                       ("served", "right"), ("lost", "right"), ("at close", "right"),
                       ("migrated", "right"), ("served by", "left")):
        t.add_column(name, justify=just, no_wrap=name != "how")
    for r in rows:
        t.add_row(r["proto"], r["mode"], HOW.get(r["mode"], ""), _n(r["ok"], bad=False),
                  _n(r["lost"]), _n(r["queued_at_close"], bad=False),
                  _n(r.get("migrated"), bad=False), served_by(r))
    return t


def runs_table(rep: dict) -> Table:
    c = rep["config"]
    t = report_table(
        f"under steady load: {c['workers']} workers replaced {c['reloads']} times in "
        f"{c['duration']:g} s per run, concurrency {c['concurrency']}, keep-alive "
        f"{c['keepalive_requests']} requests per connection",
        "per 10k: connections (UDP: datagrams); lost: a datagram or its echo "
        f"not back within {c['udp_timeout']:g} s; handover: one reload, all "
        "workers; at close: the old sockets' queues when let go (rebind: "
        "orphaned or dropped; inherit/pass: served by the new process); migr: "
        "TcpExt TCPMigrateReqSuccess")
    t.add_column("load", no_wrap=True)
    t.add_column("mode", no_wrap=True)
    for name in ("conns", "reset/10k", "refused/10k", "timeout/10k", "lost/10k",
                 "handover ms", "at close", "migr"):
        t.add_column(name, justify="right", no_wrap=True)
    for r in rep["runs"]:
        udp = r["proto"] == "udp"
        h = r["handover_ms"]
        t.add_row(r["load"], r["mode"], f"{r['conns']:,}",
                  _n(None if udp else r["reset_per_10k"]),
                  _n(None if udp else r["refused_per_10k"]),
                  _n(None if udp else r["timeout_per_10k"]),
                  _n(r["lost_per_10k"] if udp else None),
                  f"{h['mean']:.0f} (max {h['max']:.0f})" if h["mean"] is not None else "-",
                  _n(r["queued_at_close"], bad=r["mode"].startswith("rebind")),
                  _n(r["migrated"], bad=False))
    return t


def external_table(rep: dict) -> Table:
    c = rep["config"]
    mig = "unchanged" if c["migrate_req"] is None else str(c["migrate_req"])
    t = report_table(
        f"port {c['port']} reloaded {c['reloads']} times in {c['duration']:g} s by: "
        f"{c['command']}  (tcp_migrate_req {mig})",
        "of them reused: failures on a keep-alive connection already answered "
        "(the server closed it idle as the next request went out; HTTP clients "
        "retry those); closed/bound: the port's listeners as sock_diag saw them "
        "-- kept (0 closed, 0 bound) or rebound; queue seen: the accept queues last "
        "sampled (every ~10 ms) on the sockets that closed; the server may still have "
        "accepted them before the close")
    t.add_column("load", no_wrap=True)
    for name in ("conns", "reset/10k", "refused/10k", "timeout/10k", "failed/10k",
                 "of them reused", "closed", "bound", "queue seen", "command ms"):
        t.add_column(name, justify="right", no_wrap=True)
    for r in rep["runs"]:
        so, h = r["sockets"], r["handover_ms"]
        t.add_row(r["load"], f"{r['conns']:,}", _n(r["reset_per_10k"]),
                  _n(r["refused_per_10k"]), _n(r["timeout_per_10k"]),
                  _n(r["failed_per_10k"]), _n(r["failed_reused"], bad=False),
                  str(so["closed"]), str(so["bound"]),
                  _n(so["queued_at_close_seen"]),
                  f"{h['mean']:.0f}" if h["mean"] is not None else "-")
    return t


def render(rep: dict) -> RenderableType:
    parts: list[RenderableType] = [
        Text(f"reload · kernel {rep['kernel']} · {rep['cpus']} CPUs · {rep['netns']} netns",
             style="bold")]
    if rep["queued"]:
        parts.append(queued_table(rep))
    if rep["runs"]:
        parts.append(external_table(rep) if "command" in rep["config"] else runs_table(rep))
    s = rep["sysctl"]
    parts.append(Text(f"{s['name']}: {s['before']} before, {s['after']} after"
                      + ("" if s["restored"] else " -- NOT restored"),
                      style="dim" if s["restored"] else "bold red"))
    return Group(*parts)
