"""Rich rendering of attach / detach / status: the same numbers as --json."""
from __future__ import annotations

import time

from rich.console import Group
from rich.table import Table
from rich.text import Text

BAR = 24


def _slots_table(title: str, slots: list[dict], counts: bool = False) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("slot", justify="right")
    t.add_column("pid", justify="right")
    t.add_column("process")
    t.add_column("inode", justify="right")
    t.add_column("address")
    if counts:
        t.add_column("selections", justify="right")
        t.add_column("share", justify="right")
        t.add_column("")
    total = sum(s.get("selections") or 0 for s in slots)
    top = max([s.get("selections") or 0 for s in slots] + [1])
    for s in slots:
        row = [str(s["slot"]), str(s["pid"]), s.get("process", ""), str(s["inode"]), s["addr"]]
        if counts:
            n = s.get("selections")
            if n is None:
                row += ["-", "-", ""]
            else:
                row += [f"{n:,}", f"{n / total:.1%}" if total else "-",
                        "█" * round(BAR * n / top)]
        style = None if s.get("alive", True) else "dim strike"
        t.add_row(*row, style=style)
    return t


def render_attach(d: dict) -> Group:
    """d: Attachment.as_dict() (+ "replaced", "note", slot "process")."""
    head = Text.assemble(("attached ", "bold"), (d["policy"], "bold green"),
                         f" to {d['proto']} port {d['port']}")
    if d.get("replaced"):
        head.append(f" (replacing {d['replaced']})", style="yellow")
    parts = [head, _slots_table("slot → socket (the policy's slot numbers)", d["slots"])]
    if d.get("note"):
        parts.append(Text(d["note"], style="dim"))
    parts.append(Text(f"pinned in {d['pinned']}; `reuseport-ctl detach --port {d['port']}` "
                      f"gives the group back to the kernel's hash.", style="dim"))
    return Group(*parts)


def render_detach(d: dict) -> Text:
    """d: Detached.as_dict()."""
    what = d["policy"] or "a BPF program reuseport-ctl did not attach"
    if d["removed"]:
        t = Text.assemble(("detached ", "bold"), (what, "bold"),
                          f" from {d['proto']} port {d['port']}: the kernel's own hash "
                          f"selects again")
    else:
        t = Text.assemble(("unpinned ", "bold"), (what, "bold"), f" for {d['proto']} port {d['port']}")
    if d.get("note"):
        t.append(f" ({d['note']})", style="yellow")
    if d.get("pinned"):
        t.append(f"; removed {d['pinned']}", style="dim")
    return t


def render_status(d: dict) -> Group:
    """d: Status.as_dict()."""
    age = max(0, time.time() - d["created"])
    head = Text.assemble(("policy ", "bold"), (d["policy"], "bold green"),
                         f" ({d['kind']}) on {d['proto']} port {d['port']}, attached "
                         f"{_ago(age)} ago")
    parts = [head, _slots_table("per slot", d["slots"], counts=True)]
    if d["total"] is not None:
        parts.append(Text(f"{d['total']:,} selections by the program", style="dim"))
    else:
        parts.append(Text("a cBPF program keeps no counts", style="dim"))
    if not all(s["alive"] for s in d["slots"]):
        parts.append(Text("struck-out slots are closed sockets", style="dim"))
    parts.append(Text(f"pinned in {d['pinned']}", style="dim"))
    return Group(*parts)


def _ago(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
