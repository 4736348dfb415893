"""`reuseport-ctl attach / detach / status`: steer a running server's
SO_REUSEPORT group (nginx, Envoy, ours) with a policy that outlives the
command."""
from __future__ import annotations

import json

import click
from rich.console import Console

from .. import pins
from ..kernel.owners import process_name
from ..policies import help_text as policy_names
from ..ui.attach_view import render_attach, render_detach, render_status

ATTACH_EPILOG = """\b
Examples:
  reuseport-ctl attach --port 8080 --policy drain:0
      new connections avoid slot 0 (its process finishes what it has)
  reuseport-ctl attach --port 80 --pid $(cat /run/nginx.pid) --policy weighted:1,3
      nginx: any of its processes names the server
  reuseport-ctl attach --proto udp --port 5353 --host ::1 --policy consistent --json

\b
The group's sockets are numbered in a stable order (serving pid, then
inode) printed as slot -> pid, inode, address: that is what drain:K and
weighted mean. The program stays attached (pinned under
/sys/fs/bpf/reuseport-ctl/) until `detach`; attaching again replaces it.
"""

DETACH_EPILOG = """\b
Examples:
  reuseport-ctl detach --port 8080
  reuseport-ctl detach --port 8080 --force    also remove a program reuseport-ctl
                                               did not attach
"""

STATUS_EPILOG = """\b
Examples:
  reuseport-ctl status --port 8080
  reuseport-ctl status --proto udp --port 5353 --json
"""

proto_opt = click.option("--proto", type=click.Choice(["tcp", "udp"]), default="tcp",
                         show_default=True)
port_opt = click.option("--port", type=int, required=True, help="The group's local port.")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _with_names(d: dict) -> dict:
    for s in d["slots"]:
        s["process"] = process_name(s["pid"])
    return d


@click.command("attach", epilog=ATTACH_EPILOG)
@port_opt
@click.option("--pid", type=int, help="A process of the server (when several groups match).")
@click.option("--host", help="The group's local address (when several groups match).")
@proto_opt
@click.option("--policy", required=True, help="One of: " + policy_names() + ".")
@json_opt
def attach(port, pid, host, proto, policy, as_json):
    """Attach a selection policy to the SO_REUSEPORT group on a port."""
    a = pins.attach(port, policy, proto=proto, pid=pid, host=host)
    d = a.as_dict()
    if as_json:
        click.echo(json.dumps(d))
        return
    d.update(replaced=a.replaced, note=a.note)
    Console().print(render_attach(_with_names(d)))


@click.command("detach", epilog=DETACH_EPILOG)
@port_opt
@click.option("--pid", type=int, help="A process of the server (when several groups match).")
@proto_opt
@click.option("--force", is_flag=True,
              help="Also remove a program that reuseport-ctl did not attach.")
@json_opt
def detach(port, pid, proto, force, as_json):
    """Give the group back to the kernel's own hash and remove the pins."""
    d = pins.detach(port, proto=proto, pid=pid, force=force).as_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        Console().print(render_detach(d))


@click.command("status", epilog=STATUS_EPILOG)
@port_opt
@proto_opt
@json_opt
def status(port, proto, as_json):
    """The attached policy and how often its program chose each slot."""
    d = pins.status(port, proto=proto).as_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        Console().print(render_status(_with_names(d)))


COMMANDS = [attach, detach, status]
