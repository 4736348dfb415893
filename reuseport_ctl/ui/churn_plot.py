"""--plot for churn: a PNG (matplotlib, Agg backend: no display needed).

Left: resets per 10k connections for each mode (the headline). Right: the
cumulative resets over time for each mode, with the leaves (dashed) and
joins (dotted) of the schedule.
"""
from __future__ import annotations

from pathlib import Path

from .plotting import pyplot, save

COLORS = {"off": "#c0392b", "on": "#2980b9", "bpf": "#27ae60", "bpf-refuse": "#8e44ad",
          "drain": "#f39c12"}


def write_plot(rep: dict, path: str | Path) -> Path:
    plt = pyplot()
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4.2))
    churn = rep["churn"]
    modes = [r["mode"] for r in churn]
    vals = [r["resets_per_10k"] for r in churn]
    b = bars.bar(modes, vals, color=[COLORS.get(m, "grey") for m in modes])
    for rect, r in zip(b, churn):
        bars.annotate(f"{r['resets_per_10k']:.1f}\n({r['errors']['reset']}/{r['conns']})",
                      (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                      ha="center", va="bottom", fontsize=8)
    bars.set_ylabel("resets per 10k connections")
    bars.set_title("churn under steady load")
    top = max(vals, default=0)
    bars.set_ylim(0, top * 1.35 + 1)
    for r in churn:
        tl = r["timeline"]
        lines.step([p["t"] for p in tl], [p["reset"] for p in tl], where="post",
                   label=r["mode"], color=COLORS.get(r["mode"], "grey"))
    if churn:
        for e in churn[0]["events"]:
            if not e["skipped"]:
                lines.axvline(e["t"], color="grey", lw=0.8,
                              ls="--" if e["action"] == "remove" else ":")
    lines.set_xlabel("seconds (dashed: a worker leaves, dotted: one joins)")
    lines.set_ylabel("connections reset (cumulative)")
    lines.set_title("resets over time")
    if churn:
        lines.legend(fontsize=8)
    q = rep.get("queued") or []
    qtxt = "; ".join(f"{r['mode']}: {r['reset']}/{r['k']} reset" for r in q)
    fig.suptitle(f"reuseport-ctl churn · kernel {rep['kernel']} · {rep['cpus']} CPUs"
                 + (f"\nexact case: {qtxt}" if qtxt else ""), fontsize=9)
    fig.tight_layout()
    return save(fig, path)
