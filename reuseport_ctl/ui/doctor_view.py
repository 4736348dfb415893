"""doctor's report: one plain dict (what --json prints) and its rich rendering."""
from __future__ import annotations

from dataclasses import asdict

from rich.console import Group
from rich.table import Table
from rich.text import Text


def doctor_report(kernel: str, core: tuple[str, ...], facilities, strategies,
                  header_tree: dict) -> dict:
    """The JSON shape; render_doctor draws exactly these values."""
    ok = {f.name for f in facilities if f.ok}
    return {
        "kernel": kernel,
        "core_ok": all(n in ok for n in core),
        "core": list(core),
        "facilities": [asdict(f) for f in facilities],
        "probes": {p: {"strategy": s.name, "target": s.target, "reason": s.reason}
                   for p, s in strategies.items()},
        "header_tree": header_tree,
    }


COMPACT_BELOW = 120     # columns: narrower terminals get one column of text per row


def render_doctor(d: dict, compact: bool = False) -> Group:
    """The facilities, the probes' strategies and the verdict. compact: for
    a narrow terminal (80 columns), detail and "without it" share a column,
    so a row takes a line or two instead of five."""
    core = set(d["core"])
    missing = [f["name"] for f in d["facilities"] if f["name"] in core and not f["ok"]]
    verdict = Text("core works (bold rows): reuseport groups can be built and steered",
                   style="green") if d["core_ok"] else \
        Text(f"core missing: {', '.join(missing)}", style="bold red")
    tables = _compact(d, core) if compact else _wide(d, core)
    return Group(*tables, verdict)


def _name_mark(f: dict, core: set) -> tuple[Text, Text]:
    name = Text(f["name"], style="bold" if f["name"] in core else "")
    mark = Text("✓", style="green") if f["ok"] else \
        Text("✗", style="bold red" if f["name"] in core else "red")
    return name, mark


def _wide(d: dict, core: set) -> tuple[Table, Table]:
    t = Table(title=f"kernel {d['kernel']}", title_justify="left")
    t.add_column("facility", no_wrap=True)
    t.add_column("", no_wrap=True)
    t.add_column("detail", ratio=3, overflow="fold")
    t.add_column("without it", ratio=2)
    for f in d["facilities"]:
        name, mark = _name_mark(f, core)
        t.add_row(name, mark, f["detail"], "" if f["ok"] else Text(f["without"], style="yellow"))

    p = Table(title="probes", title_justify="left")
    p.add_column("probe", no_wrap=True)
    p.add_column("strategy", no_wrap=True)
    p.add_column("attaches to", overflow="fold")
    p.add_column("why", ratio=1)
    for name, s in d["probes"].items():
        style = "red" if s["strategy"] == "none" else "cyan"
        p.add_row(name, Text(s["strategy"], style=style), s["target"], s["reason"])
    return t, p


def _compact(d: dict, core: set) -> tuple[Table, Table]:
    t = Table(title=f"kernel {d['kernel']}", title_justify="left", box=None,
              pad_edge=False, show_header=False)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    t.add_column(overflow="fold", ratio=1)
    for f in d["facilities"]:
        name, mark = _name_mark(f, core)
        detail = Text(f["detail"])
        if not f["ok"]:
            detail.append(f"\nwithout it: {f['without']}", style="yellow")
        t.add_row(mark, name, detail)

    p = Table(title="probes", title_justify="left", box=None, pad_edge=False,
              show_header=False)
    p.add_column(no_wrap=True)
    p.add_column(overflow="fold", ratio=1)
    for name, s in d["probes"].items():
        text = Text(s["strategy"], style="red" if s["strategy"] == "none" else "cyan")
        text.append(f" → {s['target']}\n")
        text.append(s["reason"], style="dim")
        p.add_row(name, text)
    return t, p
