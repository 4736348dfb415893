"""verify's output: a rich table, TAP lines, JUnit XML and JSON, all drawn
from the same list of Results (verify/checks.py)."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Iterable

from rich.table import Table
from rich.text import Text

STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}


def tally(results: Iterable) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "skip": 0}
    for r in results:
        out[r.status] += 1
    return out


def closing_line(results) -> str:
    """Exactly `N passed, N failed, N skipped` (CI runners grep for it)."""
    t = tally(results)
    return f"{t['pass']} passed, {t['fail']} failed, {t['skip']} skipped"


def render_table(results, kernel: str, seconds: float) -> Table:
    t = Table(title=f"reuseport-ctl verify — kernel {kernel}", title_justify="left",
              caption=f"{len(results)} checks in {seconds:.1f} s", caption_justify="left")
    t.add_column("check", no_wrap=True)
    t.add_column("selftest", style="dim")
    t.add_column("result", no_wrap=True)
    t.add_column("detail", overflow="fold")
    for r in results:
        t.add_row(r.name, r.selftest or "—", Text(r.status, style=STYLE[r.status]), r.detail)
    return t


def list_table(checks) -> Table:
    """Names, areas, selftests and needs (--list --json adds each property)."""
    t = Table(title="verify checks", title_justify="left")
    t.add_column("check", no_wrap=True)
    t.add_column("area")
    t.add_column("selftest", style="dim")
    t.add_column("needs")
    for c in checks:
        t.add_row(c.name, c.area, c.selftest or "—", ", ".join(c.needs) or "—")
    return t


# --- TAP (prove-compatible) ------------------------------------------------------------

def tap_plan(n: int) -> str:
    return f"1..{n}"


def _one_line(s: str) -> str:
    return " ".join(s.split()).replace("#", "\\#")


def tap_lines(i: int, r) -> list[str]:
    """`ok i - name`, `not ok i - name`, `ok i - name # SKIP reason`; the
    detail follows as a `#` diagnostic line (prove shows it with -v)."""
    if r.status == "skip":
        return [f"ok {i} - {r.name} # SKIP {_one_line(r.detail)}"]
    head = f"{'ok' if r.status == 'pass' else 'not ok'} {i} - {r.name}"
    lines = [head]
    if r.selftest:
        lines.append(f"# selftest: {r.selftest}")
    lines.append(f"# {' '.join(r.detail.split())}")
    return lines


# --- JUnit XML and JSON ------------------------------------------------------------------

def junit_xml(results, kernel: str, seconds: float) -> bytes:
    t = tally(results)
    suites = ET.Element("testsuites", name="reuseport-ctl verify", tests=str(len(results)),
                        failures=str(t["fail"]), skipped=str(t["skip"]), errors="0",
                        time=f"{seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name="reuseport-ctl verify",
                          tests=str(len(results)), failures=str(t["fail"]),
                          skipped=str(t["skip"]), errors="0", time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="kernel", value=kernel)
    for r in results:
        case = ET.SubElement(suite, "testcase", name=r.name,
                             classname=f"reuseport_ctl.verify.{r.area or 'checks'}",
                             time=f"{r.seconds:.3f}")
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.detail, type="PropertyViolated").text = r.detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.detail)
        out = ET.SubElement(case, "system-out")
        out.text = (f"selftest: {r.selftest}\n" if r.selftest else "") + r.detail
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def json_list(results) -> list[dict]:
    return [r.as_json() for r in results]
