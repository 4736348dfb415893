"""The bench plot: per-worker shares per model, side by side, one panel per
load point (rows: client concurrency, columns: work per request), and under
each, the request latency of the same models (p50, p99, p99.9, max; log
scale, median over the repeats).

Within a panel each model is a group of bars, the busiest worker first (the
mean over repeats of the k-th largest share; the whisker spans the repeats'
min-max); the dashed line is the fair share 1/N, and the number above the
group is the median max:min. matplotlib with the Agg backend: no display."""
from __future__ import annotations

import math


def plot_bench(result, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows
    works = sorted({r.work_us for r in rows})
    concs = sorted({r.concurrency for r in rows})
    labels = list(dict.fromkeys(r.label for r in rows))
    cell = {(r.work_us, r.concurrency, r.label): r for r in rows}
    n = result.config["workers"]
    fig, grid = plt.subplots(2 * len(concs), len(works), squeeze=False, sharex=True,
                             figsize=(max(7.5, 0.6 * len(labels) * len(works) + 1.5),
                                      4.0 * len(concs) + 1.8),
                             gridspec_kw={"height_ratios": [3, 2] * len(concs)})
    axes = grid[0::2]
    lat_axes = grid[1::2]
    cmap = plt.get_cmap("viridis")
    width = 0.8 / n
    top = max((max(r.shares_hi) for r in rows if r.shares_hi), default=1.0)
    for j, work in enumerate(works):
        for i, conc in enumerate(concs):
            ax = axes[i][j]
            for x, label in enumerate(labels):
                r = cell.get((work, conc, label))
                if r is None:
                    continue
                for k, share in enumerate(r.shares_sorted):
                    lo, hi = r.shares_lo[k], r.shares_hi[k]
                    ax.bar(x - 0.4 + width * (k + 0.5), share, width,
                           color=cmap(k / max(1, n - 1)),
                           yerr=([[max(0.0, share - lo)], [max(0.0, hi - share)]]
                                 if r.repeats > 1 else None),
                           error_kw={"elinewidth": 0.6, "capsize": 1.5},
                           label=(f"{_ordinal(k)} busiest" if x == 0 else None))
                m = r.max_min.median
                ax.text(x, min(1.02, max(r.shares_hi) + 0.03),
                        "∞" if m is None or math.isinf(m) else f"{m:.1f}",
                        ha="center", va="bottom", fontsize=7,
                        color="firebrick" if m is None or m >= 1.5 else "black")
            ax.axhline(1 / n, ls="--", lw=0.8, color="grey")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
            ax.tick_params(axis="x", labelbottom=False)
            ax.set_ylim(0, min(1.12, top + 0.12))
            ax.set_title(f"concurrency {conc}, work {work} µs", fontsize=9)
            if j == 0:
                ax.set_ylabel("share of connections")
            _latency_panel(lat_axes[i][j], [cell.get((work, conc, lb)) for lb in labels],
                           first=(i == 0 and j == 0))
            lat_axes[i][j].tick_params(axis="x", labelbottom=i == len(concs) - 1)
            if j == 0:
                lat_axes[i][j].set_ylabel("latency ms")
    env, cfg = result.env, result.config
    kind = "short connections" if cfg["requests_per_conn"] == 1 else \
        f"keep-alive ×{cfg['requests_per_conn']}"
    fig.suptitle(f"reuseport-ctl bench · kernel {env['kernel']} · {env['cpus']} CPUs\n"
                 f"per-worker share of connections, busiest first ({n} workers, {kind}, "
                 f"{cfg['repeat']} repeats); number: median max:min", fontsize=9)
    lh, ln = lat_axes[0][0].get_legend_handles_labels()
    if lh:
        lat_axes[0][0].legend(lh, ln, fontsize=6, ncol=4, frameon=False, loc="upper left")
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(n, 8), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


LATENCY = (("p50_ms", "p50", "o"), ("p99_ms", "p99", "s"), ("p999_ms", "p99.9", "^"),
           ("max_ms", "max", "x"))


def _latency_panel(ax, rows, first: bool) -> None:
    """p50/p99/p99.9/max per model (median over repeats), log scale."""
    for k, (attr, name, marker) in enumerate(LATENCY):
        xs, ys = [], []
        for x, r in enumerate(rows):
            v = getattr(r, attr).median if r is not None else None
            if v:
                xs.append(x - 0.24 + 0.16 * k)
                ys.append(v)
        ax.scatter(xs, ys, marker=marker, s=14, label=name if first else None)
    ax.set_yscale("log")
    ax.grid(axis="y", lw=0.3, alpha=0.6)


def _ordinal(k: int) -> str:
    return {0: "1st", 1: "2nd", 2: "3rd"}.get(k, f"{k + 1}th")


def plot_stall_cdf(result, path: str) -> str:
    """bench --stall: one panel per setup, its request latency without
    (dashed) and with (solid) the stall, as the fraction of requests slower
    than x (log-log: the tail, where a stalled worker shows, gets the room).
    The curves are the medians of the repeats at each percentile (Row.latency_cdf)."""
    from .plotting import pyplot, save
    plt = pyplot()
    rows = [r for r in result.rows if r.latency_cdf]
    labels = list(dict.fromkeys(r.label for r in rows))
    points = sorted({(r.work_us, r.concurrency) for r in rows})
    ncols = 2 if len(labels) > 1 else 1
    nrows = max(1, math.ceil(len(labels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True,
                             figsize=(5.2 * ncols, 2.6 * nrows + 1.2))
    cmap = plt.get_cmap("tab10")
    stall = result.config["stall"]
    ms = int(stall.split(":")[1].split("@")[0])
    for k, label in enumerate(labels):
        ax = axes[k // ncols][k % ncols]
        for r in (r for r in rows if r.label == label):
            qs = [(q, v) for q, v in r.latency_cdf if q < 100 and v > 0]
            c = cmap(points.index((r.work_us, r.concurrency)) % 10)
            name = ("stalled" if r.stall else "calm") + (
                f" c={r.concurrency} {r.work_us} µs" if len(points) > 1 else "")
            ax.plot([v for _, v in qs], [1 - q / 100 for q, _ in qs], color=c,
                    ls="-" if r.stall else "--", lw=1.4 if r.stall else 1.0, label=name,
                    drawstyle="steps-post")     # no latency between two samples invented
        ax.axvline(ms, color="firebrick", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_yticks(_TAIL)
        ax.set_yticklabels([f"p{100 * (1 - y):g}" for y in _TAIL])
        ax.grid(lw=0.3, alpha=0.6)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="lower left")
        if k % ncols == 0:
            ax.set_ylabel("slower than x")
        if k // ncols == nrows - 1:
            ax.set_xlabel("request latency, ms (client)")
    for k in range(len(labels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    env, cfg = result.env, result.config
    kind = "short connections" if cfg["requests_per_conn"] == 1 else \
        f"keep-alive ×{cfg['requests_per_conn']}"
    slot, every = stall.split(":")[0], stall.split("@")[1]
    fig.suptitle(f"reuseport-ctl bench --stall · kernel {env['kernel']} · {env['cpus']} CPUs · "
                 f"{cfg['workers']} workers, {kind}\nlatency CDF (tail up): worker {slot} "
                 f"stopped {ms} ms in every {every} ms (dotted line: {ms} ms); "
                 f"median of {cfg['repeat']} repeat(s)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save(fig, path)
    return path


_TAIL = (0.5, 0.1, 0.01, 0.001, 0.0001)     # p50 .. p99.99 on the "slower than" axis
