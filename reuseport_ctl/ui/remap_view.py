"""Rich table of the remap experiment: one row per membership change, one
column per policy, each cell the measured fraction of flows that moved with
the theoretical fraction beside it."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text


def _cell(row: dict) -> Text:
    m, t = row["moved_fraction"], row["theoretical_fraction"]
    style = "green" if m <= 0.25 else "yellow" if m <= 0.6 else "red"
    return Text.assemble((f"{m:.3f}", style), (f" ({t:.3f})", "dim"))


def render_remap(rows: list[dict], title: str = "") -> Group:
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    parts = []
    for change in ("join", "leave"):
        sub = [r for r in rows if r.get("change", "join") == change]
        if not sub:
            continue
        removed = {r.get("removed_slot") for r in sub}
        what = ("one socket joins (appended)" if change == "join" else
                "one socket leaves (slot " + ("last" if all(
                    r["removed_slot"] == r["n_before"] - 1 for r in sub)
                    else ", ".join(str(s) for s in sorted(removed))) +
                "; the last socket fills its hole)")
        t = Table(title=f"{title}moved fraction: measured (theoretical) — {what}",
                  title_justify="left")
        t.add_column("N → N'", justify="right")
        for p in policies:
            t.add_column(p, justify="right")
        t.add_column("flows", justify="right", style="dim")
        keys = list(dict.fromkeys((r["n_before"], r["n_after"]) for r in sub))
        for nb, na in keys:
            cells = []
            flows = set()
            for p in policies:
                hit = [r for r in sub if r["policy"] == p and (r["n_before"], r["n_after"]) == (nb, na)]
                cells.append(_cell(hit[0]) if hit else Text("-"))
                flows.update(r["flows"] for r in hit)
            t.add_row(f"{nb} → {na}", *cells, "/".join(map(str, sorted(flows))))
        parts.append(t)
    lost = sum(r.get("lost", 0) for r in rows)
    if lost:
        parts.append(Text(f"{lost} flow(s) were not received in some round and are left "
                          f"out of the fractions.", style="yellow"))
    return Group(*parts)
