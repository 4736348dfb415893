"""--plot for reload: failures per 10k for each mode, one group of bars per
load (TCP short, keep-alive, UDP). A PNG (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError

COLORS = {"inherit": "#27ae60", "pass": "#16a085", "rebind-off": "#c0392b",
          "rebind-on": "#2980b9", "rebind-bpf": "#8e44ad", "rebind-drain": "#f39c12"}


def write_plot(rep: dict, path: str | Path, title: str = "") -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib).") from None
    path = Path(path)
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
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise UserError(f"cannot write the plot to {path}: {e.strerror}.") from None
    finally:
        plt.close(fig)
    return path
