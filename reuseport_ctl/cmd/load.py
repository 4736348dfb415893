"""`reuseport-ctl load`: the built-in client alone, against any server."""
from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UserError
from ._common import in_range, json_option, proto_option, seconds
from ..load.client import run_load
from ..signals import Stopped
from ..ui.load_view import render_load

EPILOG = """\b
Examples:
  reuseport-ctl load --port 8080 --conns 20000 --concurrency 64
      short HTTP connections (one GET each), the way new clients arrive
  reuseport-ctl load --port 8080 --conns 2000 --requests-per-conn 50
      keep-alive: 50 GETs per connection, per-worker counts responses
  reuseport-ctl load --proto udp --port 5353 --conns 50000 --json
      datagrams, each from a new source port; JSON for scripts
  reuseport-ctl load --host ::1 --port 80 --timeout 0.5
  reuseport-ctl load --port 8080 --duration 60 --concurrency 32
      a minute of load, e.g. while `watch` runs in another terminal

\b
TCP replies name their worker in an X-Worker header; UDP replies in a first
line "worker: <name>". Errors are counted by kind: refused, reset, timeout,
other.
"""


@click.command("load", epilog=EPILOG)
@click.option("--host", default="127.0.0.1", show_default=True, help="Server address or name.")
@click.option("--port", type=int, required=True, callback=in_range(1, 65535),
              help="Server port.")
@proto_option()
@click.option("--conns", type=int, default=None, callback=in_range(1, 10**9),
              help="Connections (TCP) or datagrams (UDP) to make  [default: 1000, or no "
                   "limit with --duration].")
@click.option("--duration", "-d", type=float, default=None, callback=seconds(),
              help="Keep starting connections for this many seconds (with --conns: "
                   "whichever ends first).")
@click.option("--concurrency", type=int, default=16, show_default=True,
              callback=in_range(1, 65536),
              help="How many are in flight at once.")
@click.option("--processes", type=int, default=None, callback=in_range(1, 256),
              help="Client processes  [default: min(CPUs, concurrency)]")
@click.option("--requests-per-conn", type=int, default=1, show_default=True,
              callback=in_range(1, 10**6),
              help="HTTP requests per connection; >1 uses keep-alive.")
@click.option("--timeout", type=float, default=2.0, show_default=True,
              callback=seconds(0, 3600),
              help="Seconds to wait for each reply.")
@click.option("--path", default="/", show_default=True, help="HTTP path to GET.")
@json_option("Print the result as one JSON object.")
def load(host, port, proto, conns, duration, concurrency, processes, requests_per_conn,
         timeout, path, as_json):
    """Drive a server with the built-in load client and report rate, errors
    by kind, latency percentiles and the per-worker distribution."""
    if conns is None and duration is None:
        conns = 1000
    if proto == "udp" and (requests_per_conn != 1 or path != "/"):
        raise UserError("--requests-per-conn and --path are HTTP's: a UDP flow is one "
                        "datagram and its echo.")
    kw = dict(proto=proto, conns=conns, concurrency=concurrency, processes=processes,
              requests_per_conn=requests_per_conn, timeout=timeout, path=path,
              duration=duration, partial=True)
    console = Console()
    if as_json or not sys.stdout.isatty():
        result = run_load(host, port, **kw)
    else:
        with Progress(TextColumn("load"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            # a --duration run without --conns has no known total
            task = bar.add_task("load", total=conns if duration is None else None)
            result = run_load(host, port, progress=lambda n: bar.update(task, completed=n),
                              **kw)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        console.print(render_load(result))
    if result.interrupted:
        raise Stopped(result.interrupted)       # after printing what was done
    if result.conns and not result.ok:
        what = "connection" if proto == "tcp" else "datagram"
        errs = ", ".join(f"{n:,} {k}" for k, n in result.errors.items() if n) or "no reply"
        raise UserError(f"not one {what} to {host} port {port} succeeded ({errs}).")


COMMANDS = [load]
