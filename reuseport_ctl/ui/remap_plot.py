"""The remap plot: fraction of flows moved against the group size, measured
(markers) and theoretical (lines), one panel per kind of change."""
from __future__ import annotations

COLORS = {"kernel": "tab:gray", "mod": "tab:red", "hash": "tab:orange",
          "threshold": "tab:blue", "consistent": "tab:green"}


def plot_remap(rows: list[dict], path: str, label: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    changes = [c for c in ("join", "leave") if any(r.get("change", "join") == c for r in rows)]
    fig, axes = plt.subplots(1, len(changes), figsize=(6.2 * len(changes), 4.4), squeeze=False,
                             sharey=True)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for ax, change in zip(axes[0], changes):
        sub = [r for r in rows if r.get("change", "join") == change]
        for i, p in enumerate(policies):
            pr = sorted((r for r in sub if r["policy"] == p), key=lambda r: r["n_before"])
            if not pr:
                continue
            x = [r["n_before"] for r in pr]
            color = COLORS.get(p)
            # kernel and threshold share one mapping: offset the markers a little
            dx = (i - len(policies) / 2) * 0.06
            ax.plot(x, [r["theoretical_fraction"] for r in pr], "-", color=color, alpha=0.5,
                    linewidth=1.5)
            ax.plot([v + dx for v in x], [r["moved_fraction"] for r in pr], "o", color=color,
                    markersize=4, label=p)
        removed = {r.get("removed_slot") for r in sub} - {None}
        if change == "join":
            ax.set_title("one socket joins: N → N+1")
        else:
            last = all(r["removed_slot"] == r["n_before"] - 1 for r in sub)
            ax.set_title("one socket leaves: N → N−1 (" +
                         ("the last" if last else f"slot {min(removed)}") + ")")
        ax.set_xlabel("N (group size before the change)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of flows that changed socket")
    axes[0][-1].legend(title="measured (dots)\ntheory (lines)", fontsize=8, title_fontsize=8,
                       loc="upper left", bbox_to_anchor=(1.01, 1.0))
    flows = max((r["flows"] for r in rows), default=0)
    proto = rows[0].get("proto", "udp") if rows else "udp"
    fig.suptitle(f"reuseport remap, {flows} {proto} flows" + (f" — {label}" if label else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
