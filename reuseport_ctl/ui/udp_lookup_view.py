"""Rich table of the udp-lookup experiment."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text


def render_udp_lookup(out: dict) -> Group:
    u = out["uhash4"]
    head = Text.assemble(
        (f"kernel {out['kernel']}, {out['cpus']} CPUs · ", "bold"),
        ("UDP 4-tuple hash: ", "bold"),
        (("yes" if u["present"] else "no"), "green" if u["present"] else "yellow"),
        f" ({u['detail']}); needs {u['needs']}\n",
        ("lookup latency: ", "bold"), out["lookup_latency"]["why"], "\n",
        ("early demux: ", "bold"),
        "on" if out.get("early_demux") else "off for the run (it would skip the lookup at N=1)")
    paths = list(dict.fromkeys(r["path"] for r in out["rows"]))
    t = Table(title="cost per received datagram, one client (best of "
                    f"{out.get('rounds', 1)} interleaved rounds of {out.get('seconds', 0)} s)",
              title_justify="left")
    t.add_column("N connected", justify="right")
    for p in paths:
        t.add_column(f"{p} dgram/s", justify="right")
        t.add_column("µs/dgram", justify="right")
        t.add_column("× N₀", justify="right")
    lat = any(r["lookup_latency_ns"] for r in out["rows"])
    if lat:
        for p in paths:
            t.add_column(f"{p} lookup ns (mean)", justify="right")
    for n in dict.fromkeys(r["n"] for r in out["rows"]):
        cells = []
        by = {r["path"]: r for r in out["rows"] if r["n"] == n}
        for p in paths:
            r = by.get(p)
            if r is None:
                cells += ["-", "-", "-"]
                continue
            ratio = r["cost_ratio"]
            style = "green" if ratio <= 1.2 else "yellow" if ratio <= 2 else "red"
            cells += [f"{r['rate']:,.0f}", f"{r['us_per_datagram']:.2f}",
                      Text(f"{ratio:.2f}", style=style)]
        if lat:
            for p in paths:
                ln = by.get(p, {}).get("lookup_latency_ns")
                cells.append(f"{ln['mean_ns']:,.0f}" if ln else "-")
        t.add_row(f"{n:,}", *cells)
    g = out["goal"]
    conn = out["ratio"].get("connected")
    if conn:
        verdict = ("met" if g["met"] else "not met" if g["met"] is False else
                   "does not apply: no 4-tuple hash, the growth is shown")
        foot = Text(f"connected: cost at N={conn['n_high']:,} ÷ cost at N={conn['n_low']:,} = "
                    f"{conn['cost_ratio']:.2f} (goal ≤ {g['max_ratio']} with the 4-tuple hash: "
                    f"{verdict})", style="green" if g["met"] else "yellow")
    else:
        foot = Text("")
    unc = out["ratio"].get("unconnected")
    if unc:
        foot.append(f"\nunconnected (a new 4-tuple): ×{unc['cost_ratio']:.2f} at "
                    f"N={unc['n_high']:,} — the 4-tuple hash does not help this path",
                    style="dim")
    return Group(head, t, foot)


def plot_udp_lookup(out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p, color in (("connected", "tab:green"), ("unconnected", "tab:red")):
        rows = [r for r in out["rows"] if r["path"] == p]
        if rows:
            ax.plot([r["n"] for r in rows], [r["us_per_datagram"] for r in rows], "o-",
                    color=color, label=f"{p} (best)")
            ax.plot([r["n"] for r in rows], [r.get("us_per_datagram_median", 0) for r in rows],
                    ":", color=color, alpha=0.6, label=f"{p} (median)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("connected UDP sockets on the port (N)")
    ax.set_ylabel("µs per received datagram (one client)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    u = "with" if out["uhash4"]["present"] else "without"
    ax.set_title(f"UDP lookup — kernel {out['kernel']}, {out['cpus']} CPUs, {u} 4-tuple hash",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
