"""reuseport-ctl remap: how many flows change socket when a reuseport group
gains or loses a member, per selection policy, measured and in theory."""
from __future__ import annotations

import os

import click

from ..errors import UserError
from ._common import (check_output_path, host_netns_option, in_range, json_option, plot_option,
                      print_report, proto_option, with_progress)
from ..ui.remap_view import render_remap

EPILOG = """\b
Examples:
  reuseport-ctl remap                               N = 2..16, five policies, UDP
  reuseport-ctl remap --sizes 8-9 --flows 5000      one join and one leave
  reuseport-ctl remap --proto tcp --flows 500       TCP connections from fixed ports
  reuseport-ctl remap --remove first                the first socket leaves (hole filled)
  reuseport-ctl remap --json > remap.json --plot remap.png
"""


def machine_label() -> str:
    return f"kernel {os.uname().release}, {os.cpu_count()} CPUs"


@click.command(epilog=EPILOG)
@click.option("--policies", default="kernel,mod,hash,threshold,consistent", show_default=True,
              help="Comma-separated hash policies to compare.")
@click.option("--sizes", default="2-16", show_default=True,
              help="Group sizes LO-HI: joins LO→HI, then leaves HI→LO, one socket at a time.")
@click.option("--flows", type=int, default=2000, show_default=True, callback=in_range(1, 10**6),
              help="Fixed flows (source ports) sent in every round.")
@proto_option("udp", help="udp: one datagram per flow; tcp: one connection per flow.")
@click.option("--change", "changes", default="join,leave", show_default=True,
              help="Which membership changes to report: join, leave or both.")
@click.option("--remove", default="last", show_default=True,
              help="Which slot leaves: last, first or a slot number.")
@json_option("Print the rows as a JSON list.")
@plot_option("Write a PNG plot of moved fraction against N.")
@host_netns_option
def remap(policies, sizes, flows, proto, changes, remove, as_json, plot, host_netns):
    """Measure how many flows move to another socket when one socket joins or
    leaves a SO_REUSEPORT group, for the kernel's default selection and the
    hash policies, beside the fraction each policy's mapping predicts.

    A fixed set of flows is sent to a live group, the group changes by one
    socket, the same flows are sent again; a flow moved if another socket
    received it. Runs in a private network namespace."""
    check_output_path(plot)
    from ..experiments import remap as rx
    lo, hi = rx.parse_sizes(sizes)
    change_list = [c.strip() for c in changes.split(",") if c.strip()]
    bad = [c for c in change_list if c not in ("join", "leave")]
    if bad or not change_list:
        raise UserError(f"--change takes join, leave or join,leave, not {changes!r}.")
    rx.parse_remove(remove, smallest=lo + 1)
    pols = [p.strip() for p in policies.split(",") if p.strip()]
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    rows = with_progress(lambda progress: rx.run_remap(
        pols, lo, hi, flows, proto, change_list, remove, progress=progress),
        rx.steps(pols, lo, hi, change_list), "remap")
    if plot:
        from ..ui.remap_plot import plot_remap
        plot_remap(rows, plot, machine_label())
    print_report(rows, as_json, lambda r: render_remap(r, f"{machine_label()} · {proto} · "),
                 width=120, plot=plot)


COMMANDS = [remap]
