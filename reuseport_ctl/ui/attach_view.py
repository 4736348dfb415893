"""Rich rendering of attach / detach / status: the same numbers as --json."""
from __future__ import annotations

import time
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

BAR = 24


def _slots_table(title: str, slots: list[dict], counts: bool = False) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("slot", justify="right")
    t.add_column(r"pid \[threads]" if any(s.get("tids") for s in slots) else "pid",
                 justify="right")
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
        flag = "" if s.get("in_policy", True) else "*"
        if s.get("skipped"):
            flag = " (skipped)"
        elif not s.get("alive", True):
            flag = " (closed)"          # also where no strike-through shows (a pipe)
        who = str(s["pid"] or "?")
        if s.get("tids"):                        # a threaded server: which threads serve it
            who += f" [{','.join(map(str, s['tids']))}]"
        row = [str(s["slot"]), who, s.get("process", "") + flag,
               str(s["inode"]), s["addr"]]
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
    if d.get("stopped_follower"):
        parts.append(Text(f"stopped the previous policy's follower (pid "
                          f"{d['stopped_follower']})", style="yellow"))
    state = d.get("state") or {}
    if state.get("divergence"):
        parts.append(Text(f"not in force: {state['divergence']}", style="bold red"))
    if d.get("note"):
        parts.append(Text(d["note"], style="dim"))
    parts.append(_pinned_in(d))
    parts += _hints(d.get("hints") or {}, {"status": "see it with",
                                           "detach": "give the group back to the kernel's hash "
                                                     "with"})
    return Group(*parts)


def _pinned_in(d: dict) -> Text:
    if "pinned_host" in d and d["pinned_host"] is None:
        return Text(f"pinned in {d['pinned']} of this mount namespace's private BPF "
                    f"filesystem (not the host's)", style="bold yellow")
    return Text(f"pinned in {d.get('pinned_host') or d['pinned']}", style="dim")


def _hints(hints: dict, say: dict) -> list[Text]:
    """What each command does, then the command alone on its line, so it can
    be copied as printed."""
    out = []
    for k, what in say.items():
        if hints.get(k):
            out += [Text(what + ":", style="dim"), Text("  " + hints[k], style="bold",
                                                        overflow="fold")]
    return out


def render_detach(d: dict) -> Text:
    """d: Detached.as_dict()."""
    what = d["policy"] or "a BPF program reuseport-ctl did not attach"
    if d["removed"]:
        t = Text.assemble(("detached ", "bold"), (what, "bold"),
                          f" from {d['proto']} port {d['port']}: the kernel's own hash "
                          f"selects again")
    else:
        t = Text.assemble(("unpinned ", "bold"), (what, "bold"), f" for {d['proto']} port {d['port']}")
    if d["policy"] is None and not d["removed"] and d.get("stale"):
        t = Text.assemble(("nothing attached", "bold"),
                          f" to {d['proto']} port {d['port']} in this network namespace")
    if d.get("note"):
        t.append(f" ({d['note']})", style="yellow")
    if d.get("stopped_follower"):
        t.append(f"; stopped its follower (pid {d['stopped_follower']})", style="dim")
    if d.get("pinned"):
        t.append(f"; removed {d['pinned']}", style="dim")
    return t


def render_status(d: dict) -> Group:
    """d: Status.as_dict()."""
    age = max(0, time.time() - d["created"])
    owner = d.get("owner")
    by = f" by reuseport-ctl {owner['verb']} (pid {owner['pid']})" if owner else ""
    head = Text.assemble(("policy ", "bold"), (d["policy"], "bold green"),
                         f" ({d['kind']}) on {d['proto']} port {d['port']}, attached{by} "
                         f"{_ago(age)} ago")
    parts = [head]
    if d.get("divergence"):
        parts.append(Text(f"not in force: {d['divergence']}", style="bold red"))
    parts.append(_slots_table("per slot", d["slots"], counts=True))
    unit = "connections" if d["proto"] == "tcp" else "datagrams"
    if d["total"] is not None:
        extra = ""
        if d.get("fallbacks"):
            extra = f"; {d['fallbacks']:,} {unit} found their slot empty (the kernel's hash " \
                    f"decided)"
        if d.get("no_napi"):
            extra += f"; {d['no_napi']:,} {unit} came with no NAPI id (loopback, veth " \
                     f"without GRO): the kernel's hash decided"
        parts.append(Text(f"{d['total']:,} selections by the program{extra}", style="dim"))
    else:
        parts.append(Text("a cBPF program keeps no counts", style="dim"))
    if any(s.get("skipped") for s in d["slots"]):
        parts.append(Text("(skipped): the slot's socket is closed, and the policy passes it "
                          "over (its share goes to the others)", style="dim"))
    if any(not s["alive"] and not s.get("skipped") for s in d["slots"]):
        parts.append(Text("(closed): the slot's socket is closed", style="dim"))
    if not all(s.get("in_policy", True) for s in d["slots"]):
        parts.append(Text("* a socket on the port the policy does not have", style="dim"))
    hints = d.get("hints") or {}
    if d.get("follower"):
        parts.append(Text(f"followed by pid {d['follower']} (`attach --follow`): joining "
                          f"sockets take the slots leaving ones vacate", style="dim"))
    if owner:
        parts.append(Text(f"the run removes it when it stops; attach and detach leave the "
                          f"group to it", style="dim"))
    if d.get("note"):
        parts.append(Text(d["note"], style="yellow"))
    parts.append(_pinned_in(d))
    if not d.get("in_force", True) and not d.get("follower") and \
            any(s["alive"] for s in d["slots"]):         # (nothing listens: nothing to follow)
        parts += _hints(hints, {"follow": "put new sockets in the policy and keep it "
                                          "in force with"})
    if not any(s["alive"] for s in d["slots"]):
        parts += _hints(hints, {"detach": "remove the pins with"})
    return Group(*parts)


def render_pins(d: dict) -> Group:
    """d: {"pins": [Pin.as_dict()], "removed_stale": [...], "note"}: every pin."""
    t = Table(title="reuseport-ctl pins on this machine", title_justify="left")
    followed = any(p.get("follower") for p in d["pins"])
    for col in ("netns", "port", "policy", "state") + (("follower",) if followed
                                                                  else ()):
        t.add_column(col, justify="right" if col == "follower" else "left",
                     no_wrap=col != "state", min_width=14 if col == "state" else None)
    states = {"here": "this namespace", "live": "live", "orphaned":
              "orphaned: no process or mount names its namespace, sockets still open"}
    rows = [(p, states.get(p["state"], p["state"]), None) for p in d["pins"]] + \
        [(p, "stale: its run was killed; removed" if p.get("owner")
          else "stale: namespace gone; removed", "dim") for p in d["removed_stale"]]
    for p, state, style in rows:
        flat = " (flat layout)" if p.get("layout") == "flat" else ""
        name = f" {p['name']}" if p.get("name") else ""
        if p.get("owner"):
            state += f" (run pid {p['owner']['pid']})"
        if p.get("in_force") is False:
            state += f"; not in force: {p.get('divergence') or '?'}"
        row = [f"net:[{p['netns']}]{name}", f"{p['proto']} {p['port']}", p["policy"] or "?",
               state + flat]
        t.add_row(*row + ([str(p.get("follower") or "-")] if followed else []), style=style)
    if not rows:
        return Group(Text("no reuseport-ctl policy is pinned on this machine"))
    parts = [t, Text(f"pinned under {Path(rows[0][0]['pinned']).parent.parent}", style="dim")]
    if d.get("note"):
        parts.append(Text(d["note"], style="dim"))
    return Group(*parts)


def render_follow_event(e: dict) -> str:
    """One follower event as a timestamped line."""
    ts = time.strftime("%H:%M:%S", time.localtime(e["ts"])) + f".{int(e['ts'] * 10) % 10}"
    what = {"diverged": "not in force: ", "left": "", "joined": "", "reattached": ""}
    return f"{ts} {what.get(e['event'], '')}{e['text']}"


def _ago(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
