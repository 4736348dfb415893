"""The kernel matrix: `reuseport-ctl verify --json` and `reuseport-ctl doctor
--json` on several kernels, merged into one table (a row per check, a column
per kernel: pass / fail / skip and why) plus the probe strategies `doctor`
picks on each kernel.

Kernels: "running" (this machine's kernel, run here) and Debian kernel
series or versions ("6.1", "6.12", "6.12.117+deb12", a bzImage, a build tree)
booted with the VM runner (reuseport_ctl/vm, = scripts/vm). In the VM, one
boot runs both commands: this module again, as `--collect`, which prints one
marked JSON line that the host picks out of the guest's stdout.

A boot that never reached the command (the guest kernel has been seen to
panic once during a TCG boot) is retried once; a kernel that still cannot be
run gets a column of "—" and the reason, and the other kernels still run.

    scripts/kernel-matrix                                  running, 6.1, 6.12
    scripts/kernel-matrix --kernels running,6.12 --json m.json
    scripts/kernel-matrix --from m.json --markdown         re-render a saved run

Pure parts (merge, render, markdown) take plain dicts, so they are unit
tested over small fake verify/doctor JSON (tests/test_kernel_matrix.py).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Iterable

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

DEFAULT_KERNELS = ("running", "6.1", "6.12")
MARK = "@@reuseport-ctl-kernel-matrix:"
STYLE = {"pass": "green", "fail": "bold red", "skip": "yellow"}
PROBES = ("lookup", "data_ready", "wakeups")
# Per-check time-out in a TCG guest: bcc compiles take ~8 s each there, and
# the big checks compile several programs (verify's own defaults are 20-60 s).
VM_CHECK_TIMEOUT = 240.0
VM_TIMEOUT = 3600.0           # the whole guest run (doctor + verify)
VM_RETRIES = 1                # boots that never reached the command
# The distribution fingerprint (compare-kernels): small enough for TCG. remap's
# moved fraction per join/leave and a real group's per-worker counts depend
# on the kernel's reuseport hash and its mapping to a member.
# --remove first: a leave then tests the kernel's hole filling (the last socket
# takes the slot), where leaving the last slot would only mirror the join.
REMAP_ARGS = ["remap", "--json", "--sizes", "2-4", "--flows", "1000", "--remove", "first",
              "--policies", "kernel,hash"]   # datagrams are cheap; noise 1.6x below 400
SPREAD_ARGS = ["run", "--json", "--workers", "4", "--load", "400", "--policy", "kernel",
               "--port", "0"]        # any free port: never collides on the host


# --- collecting (on this kernel, or inside the guest) ----------------------------------

def _cli() -> list[str]:
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-c",
                              "from reuseport_ctl.cli import main; main()"]


def _run_json(args: list[str], timeout: float | None) -> tuple[object, dict]:
    """Run `reuseport-ctl ARGS`, parse stdout as JSON: (data or None, info)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(_cli() + args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, {"exit": None, "seconds": round(time.monotonic() - t0, 1),
                      "error": f"reuseport-ctl {' '.join(args)} did not finish in {timeout:g} s"}
    info = {"exit": p.returncode, "seconds": round(time.monotonic() - t0, 1),
            "stderr_tail": p.stderr.strip().splitlines()[-5:]}
    try:
        return json.loads(p.stdout), info
    except ValueError:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        info["error"] = (f"reuseport-ctl {' '.join(args)} exited {p.returncode} "
                         f"without JSON: {last}")
        return None, info


def _step(what: str, info: dict) -> None:
    # on stderr: in a guest it streams back to the host as the run goes
    how = info.get("error") or f"exit {info.get('exit')}"
    print(f"  {os.uname().release}: {what} done in {info.get('seconds')} s ({how})",
          file=sys.stderr, flush=True)


def collect(check_timeout: float | None = None, only: Iterable[str] = (),
            overall_timeout: float | None = None, distribution: bool = False) -> dict:
    """doctor --json and verify --json on the kernel we run on (and, with
    distribution, remap and a short run)."""
    doctor, dinfo = _run_json(["doctor", "--json"], overall_timeout)
    _step("doctor", dinfo)
    vargs = ["verify", "--json"]
    if check_timeout:
        vargs += ["--timeout", f"{check_timeout:g}"]
    for o in only:
        vargs += ["--only", o]
    verify, vinfo = _run_json(vargs, overall_timeout)
    summary = next((ln for ln in reversed(vinfo.get("stderr_tail", []))
                    if " passed, " in ln), None)
    _step("verify", {**vinfo, "error": vinfo.get("error") or summary})
    out = {"release": os.uname().release, "cpus": os.cpu_count(),
           "doctor": doctor, "doctor_run": dinfo,
           "verify": verify, "verify_run": vinfo, "verify_summary": summary}
    if distribution:
        out["remap"], out["remap_run"] = _run_json(REMAP_ARGS, overall_timeout)
        _step("remap", out["remap_run"])
        out["spread"], out["spread_run"] = _run_json(SPREAD_ARGS, overall_timeout)
        _step("run --load", out["spread_run"])
    return out


# --- running a kernel ------------------------------------------------------------------

def _log(msg: str, log, who: str = "kernel-matrix") -> None:
    if log is not None:
        print(f"{who}: {msg}", file=log, flush=True)


def _what(distribution: bool) -> str:
    return "doctor, verify, remap, run" if distribution else "doctor, verify"


def run_running(check_timeout: float | None, only=(), log=sys.stderr, *,
                distribution: bool = False, who: str = "kernel-matrix") -> dict:
    _log(f"running kernel {os.uname().release}: {_what(distribution)}", log, who)
    t0 = time.monotonic()
    data = collect(check_timeout, only, distribution=distribution)
    secs = time.monotonic() - t0
    _log(f"running kernel done in {secs:.1f} s ({data['verify_summary']})", log, who)
    return {"label": "running", "spec": "running", "where": "host", "ok": True,
            "error": None, "attempts": 1, "boot_seconds": None,
            "seconds": round(secs, 1), **data}


def _guest_command(check_timeout: float, only, distribution: bool = False) -> list[str]:
    cmd = ["python", "-m", "reuseport_ctl.experiments.kernel_matrix", "--collect",
           "--check-timeout", f"{check_timeout:g}"]
    for o in only:
        cmd += ["--only", o]
    return cmd + (["--distribution"] if distribution else [])


def parse_guest_output(out: bytes | str) -> dict | None:
    """The last marked JSON line of the guest's stdout, or None."""
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    found = None
    for ln in out.splitlines():
        i = ln.find(MARK)
        if i >= 0:
            try:
                found = json.loads(ln[i + len(MARK):])
            except ValueError:
                pass
    return found


def never_reached_command(message: str) -> bool:
    """Does a VMError say the kernel never got to the command (worth a retry)?"""
    return ("did not boot to the command" in message
            or "never reached the command" in message)


def run_vm(spec: str, *, cpus: int, memory: str, check_timeout: float,
           vm_timeout: float, only=(), log=sys.stderr, retries: int = VM_RETRIES,
           distribution: bool = False, who: str = "kernel-matrix") -> dict:
    from ..vm import VMError, resolve, run, vm_available

    entry = {"label": spec, "spec": spec, "where": "vm", "ok": False, "error": None,
             "attempts": 0, "boot_seconds": None, "seconds": None, "release": None,
             "cpus": cpus, "accel": None, "doctor": None, "verify": None,
             "verify_summary": None}
    ok, why = vm_available(spec)
    if not ok:
        entry["error"] = f"no VM: {why}"
        _log(f"{spec}: {entry['error']}", log, who)
        return entry
    try:       # installs the image + headers on first use; its errors are not boot errors
        k = resolve(spec, install_missing=True, log=log)
    except VMError as e:
        entry["error"] = str(e)
        _log(f"{spec}: {e}", log, who)
        return entry
    entry["release"] = k.release
    t0 = time.monotonic()
    while True:
        entry["attempts"] += 1
        _log(f"{spec}: booting {k.describe()} (attempt {entry['attempts']}): "
             f"{_what(distribution)} (--timeout {check_timeout:g} per check)", log, who)
        try:
            res = run(_guest_command(check_timeout, only, distribution), spec, cpus=cpus,
                      memory=memory, timeout=vm_timeout, cwd=os.getcwd(), stdout=False,
                      stderr=log if log is not None else False, log=log or sys.stderr,
                      install=False, capture=True)
        except VMError as e:
            if never_reached_command(str(e)) and entry["attempts"] <= retries:
                _log(f"{spec}: the boot never reached the command; retrying once", log, who)
                continue
            entry["error"] = str(e)
            entry["seconds"] = round(time.monotonic() - t0, 1)
            return entry
        break
    entry["seconds"] = round(time.monotonic() - t0, 1)
    entry["boot_seconds"] = round(res.boot_seconds, 1) if res.boot_seconds else None
    entry["accel"] = res.accel.name
    entry["guest_exit"] = res.exit_code
    data = parse_guest_output(res.stdout)
    if data is None:
        tail = "; ".join(res.console_tail[-3:]) or "no console output"
        entry["error"] = (f"the guest command exited {res.exit_code} without a result "
                          f"(console: {tail})")
        return entry
    entry.update(data)
    entry["ok"] = data.get("verify") is not None
    if not entry["ok"]:
        entry["error"] = (data.get("verify_run") or {}).get("error") or "verify gave no JSON"
    _log(f"{spec}: done in {entry['seconds']:.1f} s (boot {entry['boot_seconds']} s; "
         f"{data.get('verify_summary')})", log, who)
    return entry


def run_matrix(kernels: list[str], *, cpus: int = 2, memory: str = "2G",
               check_timeout: float = VM_CHECK_TIMEOUT, host_check_timeout: float | None = None,
               vm_timeout: float = VM_TIMEOUT, only=(), log=sys.stderr,
               distribution: bool = False, who: str = "kernel-matrix") -> dict:
    """Run every kernel one after the other (they would compete for the CPUs,
    and some checks time things) and return the whole record."""
    started = _dt.datetime.now(_dt.timezone.utc)
    runs = []
    for spec in kernels:
        if spec == "running":
            runs.append(run_running(host_check_timeout, only, log,
                                    distribution=distribution, who=who))
        else:
            runs.append(run_vm(spec, cpus=cpus, memory=memory, check_timeout=check_timeout,
                               vm_timeout=vm_timeout, only=only, log=log,
                               distribution=distribution, who=who))
    seen: set[str] = set()
    for r in runs:
        lab = base = column_label(r)
        n = 2
        while lab in seen:              # the same kernel asked for twice
            lab, n = f"{base} #{n}", n + 1
        seen.add(lab)
        r["label"] = lab
    return {"generated": started.isoformat(timespec="seconds"),
            "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                     "load": list(os.getloadavg())},
            "settings": {"vm_cpus": cpus, "vm_memory": memory,
                         "vm_check_timeout": check_timeout,
                         "host_check_timeout": host_check_timeout, "only": list(only)},
            "kernels": runs,
            "matrix": merge(runs), "probes": probe_rows(runs),
            "facilities": facility_rows(runs)}


# --- merging (pure) --------------------------------------------------------------------

def column_label(run: dict) -> str:
    rel = run.get("release") or run.get("spec") or "?"
    return f"{rel} (running)" if run.get("spec") == "running" else rel


def merge(runs: list[dict]) -> list[dict]:
    """One row per check (in the order first seen), a cell per kernel label:
    {status, detail, seconds}, or None where that kernel has no result."""
    order: list[str] = []
    selftest: dict[str, str | None] = {}
    by_kernel: dict[str, dict[str, dict]] = {}
    for r in runs:
        cells = {}
        for c in r.get("verify") or []:
            name = c["name"]
            if name not in selftest:
                order.append(name)
                selftest[name] = c.get("selftest")
            cells[name] = {"status": c["status"], "detail": c.get("detail", ""),
                           "seconds": c.get("seconds")}
        by_kernel[r["label"]] = cells
    rows = []
    for name in order:
        cells = {r["label"]: by_kernel[r["label"]].get(name) for r in runs}
        # differs: another status, or absent from a kernel that did run verify
        # (a kernel that ran nothing has a column of "—" and says why elsewhere)
        seen = [cells[r["label"]] for r in runs if r.get("verify")]
        statuses = {c["status"] if c is not None else None for c in seen}
        rows.append({"name": name, "selftest": selftest[name], "cells": cells,
                     "differs": len(statuses) > 1})
    return rows


def probe_rows(runs: list[dict]) -> list[dict]:
    """doctor's probe strategy per kernel: a row per probe."""
    rows = []
    names = list(PROBES)
    for r in runs:
        for p in ((r.get("doctor") or {}).get("probes") or {}):
            if p not in names:
                names.append(p)
    for p in names:
        cells = {}
        for r in runs:
            d = ((r.get("doctor") or {}).get("probes") or {}).get(p)
            cells[r["label"]] = None if d is None else {
                "strategy": d.get("strategy"), "target": d.get("target"),
                "reason": d.get("reason", "")}
        rows.append({"name": p, "cells": cells})
    return rows


def facility_rows(runs: list[dict]) -> list[dict]:
    """doctor's facilities per kernel: a row per facility, {ok, detail}."""
    order: list[str] = []
    per: dict[str, dict] = {}
    for r in runs:
        facs = {}
        for f in (r.get("doctor") or {}).get("facilities") or []:
            if f["name"] not in order:
                order.append(f["name"])
            facs[f["name"]] = {"ok": bool(f.get("ok")), "detail": f.get("detail", "")}
        per[r["label"]] = facs
    return [{"name": n, "cells": {r["label"]: per[r["label"]].get(n) for r in runs}}
            for n in order]


def tally(run: dict) -> dict[str, int]:
    out = {"pass": 0, "fail": 0, "skip": 0}
    for c in run.get("verify") or []:
        out[c["status"]] = out.get(c["status"], 0) + 1
    return out


def run_note(run: dict) -> str:
    """One line per kernel under the tables: where, how long, the tally."""
    if run.get("where") == "vm":
        how = f"VM ({(run.get('accel') or '?').upper()}, {run.get('cpus')} vCPUs)"
        if run.get("attempts", 1) > 1:
            how += f", {run['attempts']} boots"
    else:
        how = f"this machine ({run.get('cpus')} CPUs)"
    if not run.get("ok"):
        return f"{run['label']}: {how}: not run — {run.get('error')}"
    t = tally(run)
    timing = f"{run['seconds']:.0f} s" if run.get("seconds") is not None else "?"
    if run.get("boot_seconds"):
        timing += f" (boot {run['boot_seconds']:.0f} s)"
    vr = run.get("verify_run") or {}
    if vr.get("seconds") is not None:
        timing += f", verify {vr['seconds']:.0f} s"
    return (f"{run['label']}: {how}: {t['pass']} passed, {t['fail']} failed, "
            f"{t['skip']} skipped; {timing}")


# --- rendering -------------------------------------------------------------------------

def check_text(cell: dict | None) -> Text:
    if cell is None:
        return Text("—", style="dim")
    st = cell["status"]
    t = Text(st, style=STYLE.get(st, ""))
    if st != "pass" and cell.get("detail"):
        t.append(f": {cell['detail']}", style="red" if st == "fail" else "dim")
    return t


def probe_text(c: dict | None) -> Text:
    if c is None:
        return Text("—", style="dim")
    x = Text(c["strategy"] or "?", style="bold cyan")
    if c.get("target"):
        x.append(f" ({c['target']})")
    if c.get("reason"):
        x.append(f"\n{c['reason']}", style="dim")
    return x


def facility_text(c: dict | None) -> Text:
    if c is None:
        return Text("—", style="dim")
    if c["ok"]:
        return Text("yes", style="green")
    return Text("no", style="yellow").append(f": {c['detail']}", style="dim")


def kernel_table(title: str, what: str, rows: list[dict], labels: list[str], cell,
                 **kw) -> Table:
    """A row per rows[i]["name"], a column per kernel label, cell(row["cells"][label])."""
    t = Table(title=title, title_justify="left", **kw)
    t.add_column(what, no_wrap=True)
    for lab in labels:
        t.add_column(lab, overflow="fold")
    for row in rows:
        t.add_row(row["name"], *[cell(row["cells"][lab]) for lab in labels])
    return t


def render(record: dict) -> Group:
    """The rich tables: checks × kernels, then probe strategies and facilities."""
    runs = record["kernels"]
    labels = [r["label"] for r in runs]
    host = record.get("host", {})
    t = Table(title=f"reuseport-ctl verify across kernels — {record.get('generated', '')}, "
                    f"host {host.get('kernel', '?')}, {host.get('cpus', '?')} CPUs",
              title_justify="left")
    t.add_column("check", no_wrap=True)
    t.add_column("selftest", style="dim", overflow="fold")
    for lab in labels:
        t.add_column(lab, overflow="fold")
    for row in record["matrix"]:
        name = Text(row["name"], style="bold" if row["differs"] else "")
        if row["differs"]:
            name.append(" ≠", style="magenta")
        t.add_row(name, row["selftest"] or "—", *[check_text(row["cells"][l]) for l in labels])

    p = kernel_table("doctor: probe strategies", "probe", record["probes"], labels,
                     probe_text, show_lines=True)
    f = kernel_table("doctor: facilities", "facility", record["facilities"], labels,
                     facility_text)
    notes = Text("\n".join(run_note(r) for r in runs))
    return Group(t, notes, Text(""), p, Text(""), f)


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: dict | None) -> str:
    if cell is None:
        return "—"
    st = cell["status"]
    if st == "pass":
        return "pass"
    word = "**FAIL**" if st == "fail" else "skip"
    return f"{word}: {_md(cell.get('detail', ''))}"


def markdown(record: dict) -> str:
    """The same tables in GitHub markdown (docs/kernel-matrix.md)."""
    runs = record["kernels"]
    labels = [r["label"] for r in runs]
    out = ["| check | selftest | " + " | ".join(f"`{l}`" for l in labels) + " |",
           "|---|---|" + "---|" * len(labels)]
    for row in record["matrix"]:
        name = f"**{row['name']}** ≠" if row["differs"] else row["name"]
        out.append(f"| {name} | {_md(row['selftest'] or '—')} | "
                   + " | ".join(_md_cell(row["cells"][l]) for l in labels) + " |")
    out += ["", *[f"- {_md(run_note(r))}" for r in runs], ""]
    out += ["| probe | " + " | ".join(f"`{l}`" for l in labels) + " |",
            "|---|" + "---|" * len(labels)]
    for row in record["probes"]:
        cells = []
        for l in labels:
            c = row["cells"][l]
            if c is None:
                cells.append("—")
            else:
                tgt = f" ({_md(c['target'])})" if c.get("target") else ""
                cells.append(f"**{_md(c['strategy'])}**{tgt}: {_md(c.get('reason', ''))}")
        out.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    out += ["", "| facility | " + " | ".join(f"`{l}`" for l in labels) + " |",
            "|---|" + "---|" * len(labels)]
    for row in record["facilities"]:
        cells = []
        for l in labels:
            c = row["cells"][l]
            cells.append("—" if c is None else "yes" if c["ok"] else f"no: {_md(c['detail'])}")
        out.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --- command line ----------------------------------------------------------------------

EPILOG = """\
examples:
  scripts/kernel-matrix                                 running kernel, Debian 6.1, 6.12
  scripts/kernel-matrix --kernels running --only udp    quick: this kernel, the udp checks
  scripts/kernel-matrix --json matrix.json              everything (raw verify/doctor JSON too)
  scripts/kernel-matrix --from matrix.json --markdown   re-render a saved run as markdown

Kernels run one after the other. Other kernels boot in a VM (scripts/vm; under
TCG here, minutes per kernel); a boot that never reaches the command is
retried once. Exit status: 1 if a check failed or a kernel could not be run.
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kernel-matrix", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run `reuseport-ctl verify` and `doctor` on several kernels and print "
                    "one table: a row per check, a column per kernel.")
    ap.add_argument("--kernels", default=",".join(DEFAULT_KERNELS), metavar="LIST",
                    help="comma-separated: running, a Debian series/version (6.1, 6.12), a "
                         "bzImage or a build tree (default: %(default)s)")
    ap.add_argument("--json", dest="json_out", metavar="FILE",
                    help="also write everything (raw verify and doctor output too) to FILE")
    ap.add_argument("--from", dest="from_file", metavar="FILE",
                    help="render a saved --json record instead of running anything")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="passed to verify --only (repeatable)")
    ap.add_argument("--cpus", type=int, default=2, help="VM vCPUs (default 2)")
    ap.add_argument("--memory", default="2G", help="VM memory (default 2G)")
    ap.add_argument("--check-timeout", type=float, default=VM_CHECK_TIMEOUT, metavar="S",
                    help="verify --timeout in a VM (default %(default)g s: bcc under TCG)")
    ap.add_argument("--host-check-timeout", type=float, default=None, metavar="S",
                    help="verify --timeout on the running kernel (default: verify's own)")
    ap.add_argument("--vm-timeout", type=float, default=VM_TIMEOUT, metavar="S",
                    help="time-out of a whole guest run (default %(default)g s)")
    ap.add_argument("--collect", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--distribution", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.collect:          # inside the guest (or by hand): one marked JSON line
        data = collect(a.check_timeout, a.only, distribution=a.distribution)
        print(MARK + json.dumps(data), flush=True)
        return 0
    if a.from_file:
        try:
            with open(a.from_file) as fh:
                record = json.load(fh)
        except (OSError, ValueError) as e:
            print(f"kernel-matrix: cannot read {a.from_file}: {e}", file=sys.stderr)
            return 2
        if not isinstance(record, dict) or not isinstance(record.get("kernels"), list):
            print(f"kernel-matrix: {a.from_file} is not a kernel-matrix --json record",
                  file=sys.stderr)
            return 2
        runs = record["kernels"]       # re-merged, so a saved run renders as today's code does
        record.update(matrix=merge(runs), probes=probe_rows(runs), facilities=facility_rows(runs))
    else:
        kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
        if not kernels:
            print("kernel-matrix: --kernels is empty (e.g. running,6.1,6.12)", file=sys.stderr)
            return 2
        if os.geteuid() != 0:
            print("kernel-matrix: verify and the VM runner need root", file=sys.stderr)
            return 2
        record = run_matrix(kernels, cpus=a.cpus, memory=a.memory,
                            check_timeout=a.check_timeout,
                            host_check_timeout=a.host_check_timeout,
                            vm_timeout=a.vm_timeout, only=a.only)
        if a.json_out:
            with open(a.json_out, "w") as fh:
                json.dump(record, fh, indent=2)
                fh.write("\n")
    if a.markdown:
        sys.stdout.write(markdown(record))
    else:
        Console().print(render(record))
    bad = any(not r.get("ok") for r in record["kernels"]) or any(
        c is not None and c["status"] == "fail"
        for row in record["matrix"] for c in row["cells"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
