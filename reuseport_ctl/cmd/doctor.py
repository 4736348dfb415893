"""`reuseport-ctl doctor`: what this kernel offers, and what we do about it."""
from __future__ import annotations

import json
import os
import sys

import click

from ..kernel import features
from ..probes.strategy import choose
from ..ui.doctor_view import COMPACT_BELOW, doctor_report, render_doctor
from ._common import console, json_option

EPILOG = """\b
Examples:
  reuseport-ctl doctor              table of facilities, then each probe's strategy
  reuseport-ctl doctor --json       the same as one JSON object
  reuseport-ctl doctor --json | jq '.facilities[] | select(.ok | not)'
                                    only what is missing, and what works without it

\b
Every facility is tried for real (bind, load, attach, then close), so the
answers hold for this kernel, its lockdown and your capabilities. Exit status
is 0 when the core works (SO_REUSEPORT, cBPF steering, SK_REUSEPORT programs
and REUSEPORT_SOCKARRAY maps), 1 otherwise. The first run may take ~7 s while
a header tree for bcc is prepared.
"""


@click.command("doctor", epilog=EPILOG)
@json_option()
def doctor(as_json):
    """Probe every kernel facility reuseport-ctl uses, say what still works
    without each missing one, and show the attach strategy of every probe."""
    out = console(width=160)        # piped: the wide table, nothing cut or squeezed
    if as_json or not sys.stdout.isatty():
        facs = features.probe_all()
    else:
        with out.status("probing the kernel…"):
            facs = features.probe_all()
    report = doctor_report(os.uname().release, features.CORE, facs, choose(facs),
                           features.header_tree_info())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        out.print(render_doctor(report, compact=out.width < COMPACT_BELOW))
    sys.exit(0 if report["core_ok"] else 1)


COMMANDS = [doctor]
