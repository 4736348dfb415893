"""Rich rendering of a LoadResult: the same numbers as LoadResult.to_dict()."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

BAR = 24


def render_load(result) -> Group:
    d = result.to_dict()
    unit = "conn" if d["proto"] == "tcp" else "dgram"
    summary = Table(title=f"load {d['proto']} {d['host']}:{d['port']}", show_header=False,
                    title_justify="left", box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("rate", f"{d['rate']:,.1f} {unit}/s")
    if d["proto"] == "tcp" and d["requests"] != d["ok"]:     # keep-alive: several a conn
        summary.add_row("requests", f"{d['requests_rate']:,.1f} req/s  ({d['requests']:,})")
    summary.add_row("ok", f"{d['ok']:,} / {d['conns']:,}")
    summary.add_row("elapsed", f"{d['elapsed_s']:.3f} s")
    for kind, n in d["errors"].items():
        summary.add_row(kind, Text(f"{n:,}", style="red" if n else "dim"))
    lat = d["latency_ms"]
    summary.add_row("latency ms", "  ".join(f"{k} {v:.3f}" if d["ok"] else f"{k} -"
                                            for k, v in lat.items()))
    parts = [summary]
    if d["per_worker"]:
        parts.append(_workers(d))
    elif d["ok"]:
        how = "an X-Worker header" if d["proto"] == "tcp" else "a first line `worker: <id>`"
        parts.append(Text(f"no per-worker split: the replies name no worker ({how}, as "
                          f"reuseport-ctl's own workers send); `reuseport-ctl watch` counts "
                          f"any server's workers in the kernel", style="dim"))
    return Group(*parts)


def _workers(d: dict) -> Group:
    total = sum(d["per_worker"].values())
    top = max(d["per_worker"].values())
    t = Table(title="per worker", title_justify="left")
    t.add_column("worker")
    t.add_column("replies", justify="right")
    t.add_column("share", justify="right")
    t.add_column("")
    for name, n in d["per_worker"].items():
        t.add_row(name, f"{n:,}", f"{n / total:.1%}", "█" * max(1, round(BAR * n / top)))
    fair = d["fairness"]
    ratio = fair["max_min_ratio"]
    line = Text(f"max:min {'∞' if ratio is None else f'{ratio:.2f}'}   "
                f"Jain {fair['jain']:.4f}   ({len(d['per_worker'])} workers named)")
    return Group(t, line)
