"""reuseport-ctl run: spawn a worker group, optionally load it, summarize."""
from __future__ import annotations

import json
import math
import time

import click

from ..errors import UserError
from ..kernel.diag import endpoint
from ..kernel.process import usable_cpus
from ..policies import help_text as policy_names
from ..policies import parse_policy
from ..signals import Stopped
from ._common import bind_address, console, in_range, json_option, proto_option
from ..workers.supervisor import MODELS, RunConfig, Supervisor, client_host, parse_cpus

EPILOG = """\b
Examples:
  reuseport-ctl run --workers 4 --load 2000            4 reuseport workers, 2000 connections
  reuseport-ctl run --model shared-epoll --load 2000   the thundering herd, for comparison
  reuseport-ctl run --proto udp --host :: --port 5353 --duration 30
  reuseport-ctl run --policy round-robin --load 1000 --json
  reuseport-ctl run --user nobody --port 80            then: curl -i localhost/
"""


@click.command(epilog=EPILOG)
@click.option("--workers", "-w", type=int, callback=in_range(1, 1024), default=None,
              help="Worker processes [default: CPUs this process may use].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind: IPv4 or IPv6, specific or wildcard (0.0.0.0, ::).")
@click.option("--port", "-p", type=int, callback=in_range(0, 65535), default=8080, show_default=True,
              help="Port to bind; 0 lets the kernel pick one.")
@proto_option()
@click.option("--model", "-m", type=click.Choice(MODELS), default="reuseport", show_default=True,
              help="How workers share the traffic.")
@click.option("--policy", default="kernel", show_default=True,
              help="Selection policy for the reuseport group: " + policy_names() + ".")
@click.option("--cpus", default=None,
              help="Pin worker i to CPU list[i % len], e.g. 0,1 or 0-3, or auto: worker k on "
                   "CPU k (lines up with --policy cpu), or none: leave the workers to the "
                   "scheduler [default: usable CPUs].")
@click.option("--user", default=None, help="Run workers as this user; the group gets its uid.")
@click.option("--backlog", type=int, callback=in_range(1, 2**31 - 1), default=1024, show_default=True,
              help="listen() backlog (the kernel caps it at net.core.somaxconn).")
@click.option("--duration", "-d", type=float, default=None,
              help="Without --load: stop after this many seconds [default: at Ctrl-C or SIGTERM].")
@click.option("--load", "load_n", type=int, callback=in_range(1, 10**9), default=None, metavar="N",
              help="Once the workers are up, make N connections (or datagrams) and stop.")
@json_option("Print the summary as one JSON object.")
@click.option("--watch", "watch", is_flag=True,
              help="Without --load: show the live `watch` dashboard while serving (q quits).")
def run(workers, host, port, proto, model, policy, cpus, user, backlog, duration, load_n,
        as_json, watch):
    """Spawn a group of worker processes sharing one port, and report how the
    kernel spread the connections (TCP) or datagrams (UDP) over them.

    TCP workers answer HTTP/1.1 (header X-Worker names the slot); UDP workers
    echo each datagram after a line `worker: <slot>`.

    A --policy other than kernel is pinned as `attach` pins one while the run
    lasts, so `status` and `watch` from another shell see it; the run
    removes the pins when it stops."""
    host = bind_address(host)
    if watch and load_n is not None:
        raise UserError("--watch shows the group while it serves other clients; with --load "
                        "the run prints its own report: use one of the two.")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise UserError(f"--duration must be a positive number of seconds, not {duration}.")
    n = len(usable_cpus()) if workers is None else workers
    pol = parse_policy(policy)
    unpinned = cpus is not None and cpus.strip() == "none"
    if unpinned and pol.name in ("cpu", "numa"):
        raise UserError(f"--policy {pol.name} steers by where the workers run, so it needs "
                        f"pinned workers: drop --cpus none (or use --cpus auto).")
    if model == "reuseport":
        pol.check_group_size(n)             # e.g. cpu with more workers than CPUs
    if unpinned:
        pinned: tuple[int, ...] = ()
    else:
        pinned = parse_cpus(cpus, workers=n) if cpus else tuple(usable_cpus())
    cfg = RunConfig(workers=n, host=host,
                    port=port, proto=proto, model=model, policy=pol,
                    cpus=pinned, user=user, backlog=backlog,
                    pin=model == "reuseport" and pol.kind != "none")
    load = None
    failed = None
    with Supervisor(cfg) as sup:
        sup.start()
        if sup.pin_note:
            click.echo(f"reuseport-ctl: {sup.pin_note}", err=True)
        try:
            if sup.wait_ready():
                if load_n is not None:
                    load = sup.run_in_child(
                        lambda: _load(client_host(host), sup.port, proto, load_n))
                elif watch:
                    from ..watching import watch_own
                    watch_own(sup, duration)
                else:
                    click.echo(f"reuseport-ctl: {cfg.workers} workers ready on "
                               f"{endpoint(host, sup.port)} ({proto}, {model}, policy "
                               f"{cfg.policy}); Ctrl-C stops.", err=True)
                    _serve(sup, duration, live=not as_json)
        except UserError as e:        # e.g. a worker that dies each time: still the summary
            failed = e
        sup.stop()
        rep = sup.report(load)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        from ..ui.summary import summary
        console(width=100).print(summary(rep))
    if failed is not None:
        raise failed
    if sup.stop_signal:
        raise Stopped(sup.stop_signal)     # a summary, then the shell's 128 + N


def _load(host: str, port: int, proto: str, n: int) -> dict:
    from ..load.client import run_load
    return run_load(host, port, proto, conns=n).to_dict()


def _serve(sup: Supervisor, duration, live: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    from ..ui.summary import live_line
    err = Console(stderr=True)
    if not (live and err.is_terminal):
        return sup.serve(duration)
    t0 = time.monotonic()
    # No refresh thread: we fork restarted workers from this process.
    with Live(console=err, auto_refresh=False, transient=True) as view:
        sup.serve(duration, on_tick=lambda s: view.update(
            live_line(s.report(), time.monotonic() - t0), refresh=True))



COMMANDS = [run]
