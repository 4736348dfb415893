"""`reuseport-ctl verify`: the reuseport conformance suite (reuseport_ctl/verify/)."""
from __future__ import annotations

import json
import os
import sys
import time

import click
from ..errors import UserError
from ..ui import verify_view as V
from ._common import console as make_console, json_option

EPILOG = """\b
Examples:
  reuseport-ctl verify                     every check, as a table
  reuseport-ctl verify --tap | prove -     TAP for prove (or any TAP consumer)
  reuseport-ctl verify --only 'migrate-*' --only udp
                                           a subset: globs, substrings or areas
  reuseport-ctl verify --json | jq '.[] | select(.status == "fail")'
  reuseport-ctl verify --junit verify.xml  JUnit XML for CI, beside any format
  reuseport-ctl verify --list              the checks, their selftests and needs
  scripts/vm --kernel 6.12 -- reuseport-ctl verify --tap

\b
Each check states one kernel property, names the selftest it corresponds to
(tools/testing/selftests/...), runs in its own process and network namespace
with a time-out, and passes, fails with what it saw against what it expected,
or skips naming the facility this kernel lacks. The last line is always
`N passed, N failed, N skipped` (on stderr with --json); the exit status is 1
if any check failed.
"""


@click.command("verify", epilog=EPILOG)
@click.option("--tap", is_flag=True, help="Print TAP (prove-compatible) instead of a table.")
@json_option("Print a JSON list of {name, selftest, status, detail, seconds}.")
@click.option("--junit", "junit", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write JUnit XML to FILE.")
@click.option("--only", "only", multiple=True, metavar="PATTERN",
              help="Run only checks matching PATTERN: a glob, a substring of the name, or "
                   "an area (distribution, isolation, steering, migration, udp, probes). "
                   "Repeat or separate with commas.")
@click.option("--list", "list_only", is_flag=True, help="List the checks and exit.")
@click.option("--timeout", type=click.FloatRange(min=1), metavar="SECONDS",
              help="Time-out of every check (default: each check's own, 20-60 s).")
@click.option("--host-netns", is_flag=True,
              help="Run the checks in this network namespace instead of one each.")
def verify(tap, as_json, junit, only, list_only, timeout, host_netns):
    """Check, over real sockets and BPF, that this kernel's SO_REUSEPORT
    behaves as the kernel's own selftests say it should."""
    from ..verify import checks as C
    from ..verify import runner

    if tap and as_json:
        raise UserError("choose one of --tap and --json (--junit goes with either).")
    chosen = C.select(only)
    console = make_console(width=160)   # piped: nothing cut
    if list_only:
        if as_json:
            click.echo(json.dumps([{"name": c.name, "area": c.area, "selftest": c.selftest,
                                    "needs": list(c.needs), "property": c.doc}
                                   for c in chosen], indent=2))
        else:
            console.print(V.list_table(chosen))
        return
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    kernel = os.uname().release
    t0 = time.monotonic()
    facs = runner.probe_facilities(chosen)
    runner.preload_bcc(chosen)
    ctx = C.Context(private_netns=not host_netns, facilities=facs)

    progress = sys.stderr.isatty() and not tap and not as_json

    def started(i, c):
        if progress:
            sys.stderr.write(f"\r\033[K[{i + 1}/{len(chosen)}] {c.name}…")
            sys.stderr.flush()

    results = []
    if tap:
        click.echo(V.tap_plan(len(chosen)))
    for i, r in enumerate(runner.run(chosen, ctx, timeout, started), 1):
        results.append(r)
        if tap:
            click.echo("\n".join(V.tap_lines(i, r)))
            sys.stdout.flush()
    if progress:
        sys.stderr.write("\r\033[K")
    seconds = time.monotonic() - t0
    if junit:
        try:
            with open(junit, "wb") as f:
                f.write(V.junit_xml(results, kernel, seconds))
        except OSError as e:
            raise UserError(f"cannot write the JUnit report {junit} ({e.strerror}).") from None
    line = V.closing_line(results)
    if as_json:
        click.echo(json.dumps(V.json_list(results), indent=2))
        click.echo(line, err=True)
    else:
        if not tap:
            console.print(V.render_table(results, kernel, seconds))
        click.echo(line)
    sys.exit(1 if any(r.status == "fail" for r in results) else 0)


COMMANDS = [verify]
