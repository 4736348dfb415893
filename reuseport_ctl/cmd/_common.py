"""CLI plumbing shared by the verbs (no commands here)."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import click

from ..errors import UserError


def proto_option(default: str = "tcp", help: Optional[str] = None):
    """--proto tcp|udp (--help lists the default first)."""
    other = "udp" if default == "tcp" else "tcp"
    return click.option("--proto", type=click.Choice([default, other]), default=default,
                        show_default=True, help=help)


def json_option(help: str = "Print the report as one JSON object."):
    """--json, passed as as_json."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def plot_option(help: str):
    """--plot FILE (check it with check_output_path before the work starts)."""
    return click.option("--plot", type=click.Path(dir_okay=False), default=None, help=help)


host_netns_option = click.option(
    "--host-netns", is_flag=True,
    help="Run in the caller's network namespace instead of a private one.")


def print_report(rep, as_json: bool, render: Callable, width: int,
                 plot: Optional[str] = None) -> None:
    """An experiment's report: JSON, or rendered for the terminal (`width`
    columns when piped), then where its plot went."""
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    console(width=width).print(render(rep))
    if plot:
        click.echo(f"plot: {plot}")


def check_output_path(path: Optional[str], option: str = "--plot",
                      suffix: str = ".png") -> None:
    """Refuse an output file the verb could not write, before the work starts
    (a bench runs for minutes; failing at its end loses it)."""
    if path is None:
        return
    if not path.lower().endswith(suffix):
        raise UserError(f"{option} writes a {suffix[1:].upper()} file: give a name ending in "
                        f"{suffix}, not {path!r}.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{option} {path}: the directory {parent} does not exist.")
    if os.path.isdir(path):
        raise UserError(f"{option} {path} is a directory: give a file name.")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path)
                                                    and not os.access(path, os.W_OK)):
        raise UserError(f"{option} {path}: this user cannot write there.")


def with_progress(fn, total: int, what: str):
    """Run fn(progress) under a rich progress bar on stderr (a terminal only)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(what, total=total)

        def progress(msg: str) -> None:
            bar.update(task, advance=1, description=f"{what}: {msg}")
        return fn(progress)


def in_range(lo: int, hi: int | None = None):
    """A click callback: the number within [lo, hi], else one sentence that
    gives the range (before the value reaches a syscall: listen() raises
    OverflowError on a backlog past 2**31)."""
    def check(ctx, param, value):
        if value is None:
            return value
        name = max(param.opts, key=len)
        if value < lo:
            raise UserError(f"{name} must be at least {lo}, not {value}.")
        if hi is not None and value > hi:
            raise UserError(f"{name} must be at most {hi}, not {value}.")
        return value
    return check


def console(stderr: bool = False, width: int = 200):
    """A rich Console that fits the terminal, and never cuts a table when the
    output is a file or a pipe (which has no width: rich would assume 80):
    then it is `width` columns, the verb's widest table."""
    from rich.console import Console
    c = Console(stderr=stderr)
    if not c.is_terminal:
        c.width = width
    return c


def bind_address(text: str, option: str = "--host") -> str:
    """An address to bind, as the user may write it: 127.0.0.1, ::1, [::1]
    (as in a URL), 0.0.0.0 or :: for every address. Never a name: binding
    does not look names up, so a typo is said to be one here."""
    import ipaddress
    h = text.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        raise UserError(f"{option} takes an IP address to bind (127.0.0.1, ::1, [::1], "
                        f"0.0.0.0 or ::), not {text!r}.") from None


def seconds(lo: float = 0.0, hi: float = 86400.0 * 365):
    """A click callback: a finite number of seconds in (lo, hi]; nan, inf and
    the negatives are one sentence, not a run that never ends."""
    import math

    def check(ctx, param, value):
        if value is None:
            return value
        name = max(param.opts, key=len)
        if not (math.isfinite(value) and lo < value <= hi):
            raise UserError(f"{name} must be a number of seconds above {lo:g} and at most "
                            f"{hi:g}, not {value}.")
        return value
    return check


def with_step_progress(experiment, total: float, cost, what: str, quiet: bool):
    """Run experiment(on_step=, tick=) under a progress bar on stderr (a
    terminal, not quiet): on_step(name) starts a step, cost(name) is what it
    adds to the bar when done (its seconds of load, or 1), tick(elapsed,
    conns, resets) moves the bar within a step. Refreshed by hand, no
    thread: the experiments fork workers from this process."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    err = console(stderr=True)
    if quiet or not err.is_terminal:
        return experiment()
    state = {"base": 0.0, "cur": None}
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[load]}"), console=err, transient=True,
                  auto_refresh=False) as bar:
        task = bar.add_task(what, total=total, load="")

        def on_step(name: str) -> None:
            if state["cur"] is not None:            # the step before is done
                state["base"] += cost(state["cur"])
            state["cur"] = name
            bar.update(task, description=name, completed=state["base"], load="")
            bar.refresh()

        def tick(elapsed: float, conns: int, resets: int) -> None:
            bar.update(task, completed=state["base"] + elapsed,
                       load=f"{conns:,} conns, {resets} reset")
            bar.refresh()

        return experiment(on_step=on_step, tick=tick)
