"""--plot for reload: failures per 10k for each mode, one group of bars per
load (TCP short, keep-alive, UDP). A PNG (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from .plotting import pyplot, save

COLORS = {"inherit": "#27ae60", "pass": "#16a085", "rebind-off": "#c0392b",
          "rebind-on": "#2980b9", "rebind-bpf": "#8e44ad", "rebind-drain": "#f39c12"}


def write_plot(rep: dict, path: str | Path, title: str = "") -> Path:
    plt = pyplot()
    runs = rep["runs"]
    loads = list(dict.fromkeys(r["load"] for r in runs))
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(modes))
    top = 0.0
    labelled: set[str] = set()
    for j, mode in enumerate(modes):
        for i, load in enumerate(loads):
            r = next((x for x in runs if x["load"] == load and x["mode"] == mode), None)
            if r is None:
                continue
            v = r["failed_per_10k"]
            top = max(top, v)
            x = i + (j - (len(modes) - 1) / 2) * width
            ax.bar(x, v, width, color=COLORS.get(mode, "grey"),
                   label=None if mode in labelled else mode)
            labelled.add(mode)
            ax.annotate(f"{v:.0f}" if v >= 1 else f"{v:.1f}", (x, v), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(range(len(loads)))
    ax.set_xticklabels([{"short": "TCP short", "keepalive": "TCP keep-alive",
                         "udp": "UDP (lost)"}.get(ld, ld) for ld in loads])
    ax.set_ylabel("failed per 10k connections (datagrams)")
    ax.set_ylim(0, top * 1.25 + 1)
    ax.legend(fontsize=8, ncol=3)
    c = rep.get("config", {})
    ax.set_title(title or f"reuseport-ctl reload · kernel {rep['kernel']} · {rep['cpus']} CPUs · "
                 f"{c.get('workers', '?')} workers replaced {c.get('reloads', '?')} times per run",
                 fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def write_servers_plot(rep: dict, path: str | Path) -> Path:
    """benchmarks/reload_servers.py's rows: for each server and way of
    reloading, new connections failed per 10k with tcp_migrate_req 0 and 1
    (short connections), and keep-alive connections failed per 10k (the
    part on already-answered connections hatched)."""
    plt = pyplot()
    rows = rep["rows"]
    servers = list(dict.fromkeys(r["server"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, load, title in ((axes[0], "short", "short connections"),
                            (axes[1], "keepalive", "keep-alive connections")):
        top = 0.0
        for j, mig in enumerate((0, 1)):
            for i, srv in enumerate(servers):
                r = next((x for x in rows if x["server"] == srv and x["load"] == load
                          and x["migrate_req"] == mig), None)
                if r is None:
                    continue
                x = i + (j - 0.5) * 0.38
                new = 10000 * r["failed_new"] / r["conns"] if r["conns"] else 0.0
                reused = 10000 * r["failed_reused"] / r["conns"] if r["conns"] else 0.0
                color = "#c0392b" if mig == 0 else "#2980b9"
                ax.bar(x, new, 0.38, color=color,
                       label=f"tcp_migrate_req={mig}" if i == 0 else None)
                ax.bar(x, reused, 0.38, bottom=new, color=color, alpha=0.35, hatch="//",
                       label="  on a reused connection" if i == 0 and load == "keepalive"
                       else None)
                top = max(top, new + reused)
                ax.annotate(f"{new + reused:.0f}" if new + reused >= 1 else "0", (x, new + reused),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(servers)))
        ax.set_xticklabels(servers, fontsize=8, rotation=15)
        ax.set_ylim(0, top * 1.2 + 1)
        ax.set_ylabel("failed per 10k connections")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"real servers reloaded {rep['reloads']} times in {rep['duration_s']:g} s under "
                 f"load · kernel {rep['kernel']} · {rep['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    return save(fig, path)
