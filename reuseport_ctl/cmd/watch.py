"""`reuseport-ctl watch`: the live per-member view of a reuseport group --
a rich dashboard, NDJSON lines (--json) and a Prometheus endpoint
(--prometheus) over the same numbers. The options are parsed here; the
engine is reuseport_ctl/watching/ (`run --watch` uses it too).
"""
from __future__ import annotations

import click

from ..groups import check_pid
from ..kernel import diag
from ..signals import Stopped
from ._common import json_option, proto_option
from ..watching import (ForeignSource, Stop, Watch, check_options, loop, nothing_listening,
                        require_probe_caps)

EPILOG = """\b
Examples:
  reuseport-ctl watch --port 8080                 any server: nginx, envoy, ours
  reuseport-ctl watch --port 8080 --json | jq -c '[.jain, .workers[].accepts]'
  reuseport-ctl watch --port 80 --prometheus 9101  then scrape 127.0.0.1:9101/metrics
  reuseport-ctl watch --proto udp --port 5353 --interval 5 --duration 60 --json
  reuseport-ctl watch --port 8080 --wait           start before the server does
  reuseport-ctl watch --port 8080 --spurious       also count accept()s that found nothing
  reuseport-ctl run --workers 4 --watch            our own group, with its own counters

\b
One row per member socket of the group (a threaded server such as HAProxy
with shards by-thread has several in one process). A row is the socket: its
counts are the socket's since the watch began, whichever process served it;
a worker respawned on the socket it inherited takes the row over ("slot 0:
socket inode I now served by pid B (was A)"), and a slot stays with its
socket for the whole watch. Columns: its slot, the pid (and, threaded, the
thread ids) serving it now, the process's CPU, its share of the group's
connections since the watch began, connections (UDP:
datagrams) per second and their last minute, accept-queue depth, data-ready
events per second on it, wakeups per data-ready event (summed over the
threads), and spurious wakeups (accept or recvfrom said EAGAIN: counted by
our own workers; for another server only with --spurious, else "-"). A
server without SO_REUSEPORT (one listener shared by pre-forked workers) has
one row per process; which one took each connection needs --spurious. A
dispatcher (one process accepts and hands connections to children, as
Node's cluster does) is named as such, with the connections each child
holds now. Every total counts from the same instant, once every probe is
attached. q, Ctrl-C or SIGTERM quits and detaches every probe.
"""

# --- the verb --------------------------------------------------------------------------

@click.command(epilog=EPILOG)
@click.option("--port", "-p", type=int, required=True, help="The group's local port.")
@proto_option()
@click.option("--host", default=None, help="The group's local address (when several match).")
@click.option("--pid", type=int, default=None,
              help="A process of the server (when several groups match): picks the group "
                   "whose sockets it holds and names the server (its session), once, at "
                   "the start; then the group is followed by its sockets as without --pid, "
                   "so that process may exit (a worker killed and respawned) and nothing "
                   "is lost.")
@click.option("--interval", "-i", type=float, default=1.0, show_default=True,
              help="Seconds between updates.")
@click.option("--duration", "-d", type=float, default=None,
              help="Stop after this many seconds [default: at q, Ctrl-C or SIGTERM].")
@json_option("One JSON object per interval, one per line (NDJSON), instead of the view.")
@click.option("--prometheus", metavar="[ADDR:]PORT", default=None,
              help="Serve the numbers as Prometheus metrics on ADDR:PORT/metrics "
                   "(ADDR defaults to 127.0.0.1).")
@click.option("--wait", is_flag=True,
              help="If nothing listens on the port (yet, or any more), keep waiting.")
@click.option("--spurious", is_flag=True,
              help="Also hook the return of accept/accept4 (UDP: recvfrom) with the "
                   "syscalls tracepoints: spurious wakeups (EAGAIN) and, where workers "
                   "share one listener without SO_REUSEPORT, which worker took each "
                   "connection. Off by default: while any syscall tracepoint is on, every "
                   "syscall of every process on the machine takes the kernel's slow path.")
def watch(port, proto, host, pid, interval, duration, as_json, prometheus, wait, spurious):
    """Show live, per member socket, how the kernel spreads a reuseport group's
    connections (TCP) or datagrams (UDP), and how its workers are woken."""
    check_options(port, interval, duration, prometheus)
    require_probe_caps()
    if pid is not None:
        check_pid(pid)
    if not wait and not diag.listeners(port, proto):
        raise nothing_listening(port, proto)
    stop = Stop()
    # A signal while the probes attach (seconds on a loaded machine) stops at
    # once, releasing what was attached so far; once watching, it ends the
    # watch with a last frame.
    with Watch(ForeignSource(port, proto, host, pid), interval, as_json, prometheus,
               spurious=spurious) as w, stop.signals():
        w.announce()
        loop(w, duration, stop, wait)
    if stop.signum:
        raise Stopped(stop.signum)



COMMANDS = [watch]
