"""reuseport-ctl: see and steer how Linux spreads connections over a
SO_REUSEPORT group. One small command per verb; the work is in the layers."""
from __future__ import annotations

import signal
import sys

import click

from .errors import UserError
from .signals import Stopped, as_interrupts, exit_code, finished, name, signum_of

EPILOG = """\b
Examples:
  reuseport-ctl doctor                      what this kernel offers
  reuseport-ctl run --workers 4 --load 2000 --policy round-robin
  reuseport-ctl attach --port 8080 --policy drain:0
  reuseport-ctl detach --port 8080
  reuseport-ctl --ebpf watch --port 8080 --duration 1    the programs watch loads
"""


# The console entry point (reuseport_ctl.main) sets this: the process is the
# command and ends with the verb. (A test calling main() in-process does not:
# its own signal dispositions must stay as they were.)
OWN_PROCESS = {"on": False}


class Group(click.Group):
    """Turns UserError into one sentence and a non-zero exit, and a stopping
    signal (Ctrl-C, SIGTERM, SIGHUP) into 128 + its number (signals.py)."""

    def invoke(self, ctx):
        try:
            with as_interrupts():
                rv = super().invoke(ctx)
                if OWN_PROCESS["on"]:
                    finished()
                return rv
        except UserError as e:
            click.echo(f"reuseport-ctl: {e}", err=True)
            sys.exit(e.exit_code)
        except (Stopped, KeyboardInterrupt) as e:   # Stopped: the verb printed what it had
            sig = signum_of(e)
            click.echo("reuseport-ctl: interrupted" + ("" if sig == signal.SIGINT
                                                       else f" ({name(sig)})"), err=True)
            sys.exit(exit_code(sig))


@click.group(cls=Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reuseport-ctl")
@click.option("--ebpf", is_flag=True,
              help="Also print every BPF program the verb compiles, with its cflags (struct "
                   "offsets from BTF, the port, map fds), on stderr as it is compiled.")
def main(ebpf):
    """See and steer how the kernel spreads connections and datagrams across
    the sockets of a SO_REUSEPORT group."""
    if ebpf:
        from .kernel.bcc import show_programs
        show_programs()


class _AsciiInt(click.types.IntParamType):
    """int() also reads "١٢" (Arabic-Indic digits) and "1_0": a port, a count
    or a backlog is written in ASCII digits, so say so rather than guess."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not (value.strip().lstrip("+-").isascii()
                                           and "_" not in value):
            self.fail(f"{value!r} is not a number written in ASCII digits.", param, ctx)
        return super().convert(value, param, ctx)


def _register():
    # every `type=int` option of every verb (click looks INT up when a
    # command is declared, so before the verbs are imported)
    click.types.INT = _AsciiInt()
    import importlib
    import pkgutil

    from . import cmd
    for mod in pkgutil.iter_modules(cmd.__path__):
        m = importlib.import_module(f"{cmd.__name__}.{mod.name}")
        for c in getattr(m, "COMMANDS", ()):
            main.add_command(c)


_register()
