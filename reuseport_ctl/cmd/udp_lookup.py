"""reuseport-ctl udp-lookup: the cost of UDP socket lookup with many connected
UDP sockets on one local port, and whether this kernel has the 4-tuple hash."""
from __future__ import annotations

import click

from ..errors import UserError
from ._common import (check_output_path, host_netns_option, in_range, json_option, plot_option,
                      print_report, seconds, with_progress)
from ..ui.udp_lookup_view import render_udp_lookup

EPILOG = """\b
Examples:
  reuseport-ctl udp-lookup                          N = 1, 10, 100, 1000, 10000
  reuseport-ctl udp-lookup --n 1,10,100 --rounds 3  small and quick
  reuseport-ctl udp-lookup --path connected --json
  reuseport-ctl udp-lookup --early-demux            leave net.ipv4.udp_early_demux on
"""


def _ns(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        part = part.strip().lower().replace("_", "")
        if not part:
            continue
        mult = 1000 if part.endswith("k") else 1
        try:
            out.append(int(part[:-1] if mult > 1 else part) * mult)
        except ValueError:
            raise UserError(f"--n takes numbers like 1,10,100,1k,10k, not {spec!r}.") from None
    if not out:
        raise UserError("--n needs at least one N.")
    return out


@click.command("udp-lookup", epilog=EPILOG)
@click.option("--n", "n_spec", default="1,10,100,1k,10k", show_default=True,
              help="Numbers of connected UDP sockets on the port.")
@click.option("--path", "path", type=click.Choice(["both", "connected", "unconnected"]),
              default="both", show_default=True,
              help="connected: datagrams from a connected peer's 4-tuple; unconnected: from "
                   "a new 4-tuple (to the group's unconnected socket).")
@click.option("--seconds", type=float, default=0.2, show_default=True, callback=seconds(0, 60),
              help="Length of one measurement.")
@click.option("--rounds", type=int, default=5, show_default=True, callback=in_range(1, 1000),
              help="Interleaved rounds over all N; the best round counts.")
@click.option("--early-demux", is_flag=True,
              help="Leave net.ipv4.udp_early_demux as it is (by default it is off for the run).")
@click.option("--no-probe", is_flag=True, help="Do not attach the lookup latency probe.")
@json_option("Print the result as one JSON object.")
@plot_option("Write a PNG plot of µs per datagram against N.")
@host_netns_option
def udp_lookup(n_spec, path, seconds, rounds, early_demux, no_probe, as_json, plot, host_netns):
    """Measure what a received UDP datagram costs when one local port holds N
    connected UDP sockets (one reuseport group, each connected to its own
    client 4-tuple, plus one unconnected socket), for datagrams from a
    connected peer and from a new client, and say whether this kernel hashes
    connected UDP sockets by 4-tuple (Linux 6.13+)."""
    check_output_path(plot)
    from ..experiments import udp_lookup as ux
    ns = _ns(n_spec)
    paths = ux.PATHS if path == "both" else (path,)
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    out = with_progress(lambda progress: ux.run_udp_lookup(
        ns, seconds, rounds, paths, probe=not no_probe, early_demux=early_demux,
        progress=progress), ux.steps(ns, paths, rounds), "udp-lookup")
    if plot:
        from ..ui.udp_lookup_view import plot_udp_lookup
        plot_udp_lookup(out, plot)
    print_report(out, as_json, render_udp_lookup, width=120, plot=plot)


COMMANDS = [udp_lookup]
