"""Rich rendering of `compare-kernels`: what differs between kernel A and B
first (checks, distribution, doctor), then a line per kernel on how it ran.
The data is experiments/kernel_ab.compare()'s; nothing is computed here."""
from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..experiments import kernel_matrix as KM
from ..experiments.kernel_ab import EVEN_P, NOISE_SIGMAS, UNEVEN_P

DIFF = "bold magenta"
CHANGE_WORDS = {"regressed": "fails on B only", "fixed": "fails on A only",
                "skip": "skipped on one", "missing": "absent from one"}


def _mark(differs: bool) -> Text:
    return Text("≠", style=DIFF) if differs else Text("=", style="dim")


def _checks(ab: dict) -> list:
    a, b = ab["a"], ab["b"]
    s = ab["summary"]
    diff = [r for r in ab["checks"] if r["differs"]]
    same = len(ab["checks"]) - len(diff)
    if not diff:
        return [Text(f"verify: all {len(ab['checks'])} checks have the same result on both "
                     f"kernels.")]
    t = Table(title=f"verify: {len(diff)} of {len(ab['checks'])} checks differ "
                    f"({s['regressed']} fail on B only, {s['fixed']} on A only)",
              title_justify="left")
    t.add_column("check", no_wrap=True)
    t.add_column(f"A: {a}", overflow="fold")
    t.add_column(f"B: {b}", overflow="fold")
    t.add_column("change", no_wrap=True)
    for r in diff:
        style = "bold red" if r["change"] == "regressed" else DIFF
        t.add_row(Text(r["name"], style="bold"), KM.check_text(r["cells"][a]),
                  KM.check_text(r["cells"][b]), Text(CHANGE_WORDS[r["change"]], style=style))
    return [t, Text(f"the other {same} checks: the same result on both "
                    f"({_same_tally(ab)})", style="dim")]


def _same_tally(ab: dict) -> str:
    out: dict[str, int] = {}
    for r in ab["checks"]:
        if not r["differs"]:
            c = r["cells"][ab["a"]]
            out[c["status"]] = out.get(c["status"], 0) + 1
    return ", ".join(f"{n} {st}" for st, n in out.items()) or "none"


def _fraction(x: float, off: bool) -> Text:
    return Text(f"{x:.3f}" + (" !" if off else ""), style="yellow" if off else "")


def _remap(ab: dict) -> list:
    if not ab["remap"]:
        return [Text("remap: no moved fractions on both kernels to compare.", style="dim")]
    s = ab["summary"]
    t = Table(title=f"remap: fraction of flows that moved ({s['remap_differ']} of "
                    f"{s['remap_compared']} differ beyond noise)", title_justify="left")
    for col in ("policy", "change", "theory", "A", "B", "B − A", "noise", ""):
        t.add_column(col, justify="left" if col in ("policy", "change") else "right")
    for r in ab["remap"]:
        t.add_row(r["policy"], f"{r['change']} {r['n_before']}→{r['n_after']}",
                  f"{r['theory']:.3f}", _fraction(r["a"], r["a_off_theory"]),
                  _fraction(r["b"], r["b_off_theory"]),
                  Text(f"{r['delta']:+.3f}", style=DIFF if r["differs"] else ""),
                  f"±{r['noise']:.3f}", _mark(r["differs"]))
    return [t, Text(f"noise: {NOISE_SIGMAS:g} combined standard errors of a binomial fraction "
                    f"({ab['remap'][0]['flows_a']} flows); ! = off the policy's theory by "
                    f"more than its own noise", style="dim")]


def _spread_cell(s: dict) -> Text:
    if s["verdict"] == "none":
        return Text("—", style="dim")
    style = {"uneven": "red", "even": "cyan"}.get(s["verdict"], "")
    return Text.assemble((s["verdict"], style),
                         (f"  {s['counts']} Jain {s['jain']:.3f} p {s['p']:.3f}", "dim"))


def _spread(ab: dict) -> list:
    if not ab["spread"]:
        return []
    s = ab["summary"]
    t = Table(title=f"spread over members ({s['spread_differ']} of {s['spread_compared']} "
                    f"verdicts differ)", title_justify="left")
    t.add_column("what", no_wrap=True)
    t.add_column("A", overflow="fold")
    t.add_column("B", overflow="fold")
    t.add_column("")
    for r in ab["spread"]:
        t.add_row(r["name"], _spread_cell(r["a"]), _spread_cell(r["b"]), _mark(r["differs"]))
    return [t, Text(f"verdict from a chi-square test against an even split: hash-like "
                    f"({UNEVEN_P:g} ≤ p ≤ {EVEN_P:g}), uneven (p < {UNEVEN_P:g}), even "
                    f"(p > {EVEN_P:g}: more even than a random hash gives)", style="dim")]


def _doctor(ab: dict) -> list:
    labels = [ab["a"], ab["b"]]
    probes = [r for r in ab["probes"] if r["differs"]]
    facs = [r for r in ab["facilities"] if r["differs"]]
    if not probes and not facs:
        return [Text("doctor: the same probe strategies and facilities on both kernels.")]
    out = []
    if probes:
        out.append(KM.kernel_table("doctor: probe strategies that differ", "probe", probes,
                                   labels, KM.probe_text, show_lines=True))
    if facs:
        out.append(KM.kernel_table("doctor: facilities that differ", "facility", facs,
                                   labels, KM.facility_text))
    return out


def render_ab(record: dict) -> Group:
    ab = record["ab"]
    host = record.get("host", {})
    head = Text.assemble(("compare-kernels  ", "bold"), ("A ", "dim"), (ab["a"], "bold"),
                         ("  vs  ", "dim"), ("B ", "dim"), (ab["b"], "bold"),
                         (f"   {record.get('generated', '')}, host {host.get('kernel', '?')}, "
                          f"{host.get('cpus', '?')} CPUs", "dim"))
    parts: list = [head, Text("")]
    if ab["ran"]:
        for section in (_checks(ab), _remap(ab), _spread(ab), _doctor(ab)):
            if section:
                parts += section + [Text("")]
        for what, why in ab.get("distribution_missing", {}).items():
            parts += [Text(f"{what}: no result — {why}", style="yellow")]
    parts.append(Text("\n".join(f"{ab_} {KM.run_note(r)}"
                                for ab_, r in zip(("A:", "B:"), record["kernels"]))))
    return Group(*parts)
