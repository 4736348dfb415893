"""The bench --long-lived plot: live connections per worker over time, one
panel per case (rows) and policy (columns), each from its repeat farthest
from the even split (Row.worst; the first one when all are even).
The shaded spans are the phases: the bursts, the reconnect storm (every
connection dropped and reopened at once); the dotted lines the even split.
Workers with equal counts are drawn a hair apart so that none hides another.
matplotlib with the Agg backend: no display."""
from __future__ import annotations


def plot_long(result, path: str) -> str:
    from .plotting import pyplot, save
    plt = pyplot()
    worst = {(w.case, w.label): w.worst for w in result.rows}
    runs = [r for r in result.runs if r.repeat == worst.get((r.case, r.label)) and r.timeline]
    cases = list(dict.fromkeys(w.case for w in result.rows))      # in the order they ran
    labels = list(dict.fromkeys(w.label for w in result.rows))
    cell = {(r.case, r.label): r for r in runs}
    repeats = result.config["repeat"]
    fig, axes = plt.subplots(len(cases), len(labels), squeeze=False, sharex=True,
                             figsize=(3.6 * len(labels) + 0.8, 2.5 * len(cases) + 1.3))
    cmap = plt.get_cmap("tab10")
    for i, case in enumerate(cases):
        for j, label in enumerate(labels):
            ax, r = axes[i][j], cell.get((case, label))
            if r is None:
                ax.set_visible(False)
                continue
            ts = [s[0] for s in r.timeline]
            for k in range(r.workers):
                nudge = 0.07 * (k - (r.workers - 1) / 2)    # equal counts stay visible
                ax.step(ts, [s[1][k] + nudge for s in r.timeline], where="post", lw=1.3,
                        color=cmap(k % 10), label=f"worker {k}" if i == j == 0 else None)
            ph = r.phases
            ax.axvspan(0, ph["opened"], color="grey", alpha=0.12, lw=0)
            ax.axvspan(ph["storm"], ph["reopened"], color="firebrick", alpha=0.15, lw=0)
            for level in sorted(set(r.ideal)):
                ax.axhline(level, color="black", lw=0.6, ls=":")
            ax.set_ylim(-0.3, max(max(max(s[1]) for s in r.timeline), max(r.ideal)) + 1)
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"{case} · {label}" + (f" · repeat {r.repeat + 1}/{repeats}"
                                                  if repeats > 1 else "") +
                         f"\nafter the bursts {_split(r.live_opened)}, "
                         f"after the storm {_split(r.live_stormed)}", fontsize=8)
            if j == 0:
                ax.set_ylabel("live connections")
            if i == len(cases) - 1:
                ax.set_xlabel("s")
    env, cfg = result.env, result.config
    fig.suptitle(f"reuseport-ctl bench --long-lived · kernel {env['kernel']} · {env['cpus']} CPUs"
                 f" · {cfg['workers']} workers\nlive connections per worker ({result.runs[0].source}"
                 f" count), the repeat farthest from the even split; grey: bursts, "
                 f"red: reconnect storm, dotted: even split",
                 fontsize=9)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(8, len(handles)), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 0.93))
    save(fig, path)
    return path


def _split(counts) -> str:
    return "/".join(map(str, counts))
