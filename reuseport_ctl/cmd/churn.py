"""reuseport-ctl churn: workers join and leave under load; count the damage."""
from __future__ import annotations

import os

import click

from ..errors import UserError
from ._common import (check_output_path, host_netns_option, json_option, plot_option,
                      print_report, with_step_progress)
from ..experiments import churn as ex
from ..ui.churn_view import render

EPILOG = """\b
Examples:
  reuseport-ctl churn                               every mode, default schedule
  reuseport-ctl churn --modes off,on --duration 5 --remove-every 0.5
  reuseport-ctl churn --sequence remove@0.5,add@1,remove:2@1.5 --json
  reuseport-ctl churn --queued 64 --modes '' --plot churn.png     exact case only

\b
Modes: off (net.ipv4.tcp_migrate_req=0), on (=1, the kernel migrates by
hash), bpf (a BPF_SK_REUSEPORT_SELECT_OR_MIGRATE program migrates to the
shortest accept queue), bpf-refuse (the program refuses: reset), drain
(drain:K -- steer away, wait for the accept queue to empty, then close).
The sysctl is restored afterwards, also on Ctrl-C and SIGTERM. By default
everything runs in a private network namespace.
"""


@click.command("churn", epilog=EPILOG)
@click.option("--workers", "-w", type=int, default=3, show_default=True,
              help="Workers in the group when each run starts.")
@click.option("--duration", "-d", type=float, default=3.0, show_default=True,
              help="Seconds of steady load per mode.")
@click.option("--add-every", type=float, default=1.0, show_default=True,
              help="A worker joins every S seconds (0: never).")
@click.option("--remove-every", type=float, default=1.0, show_default=True,
              help="The oldest worker leaves every S seconds, first at S/2 (0: never).")
@click.option("--sequence", default=None, metavar="EVENTS",
              help="Scripted instead: add@T, remove@T, remove:SLOT@T, comma-separated.")
@click.option("--linger", type=float, default=0.05, show_default=True,
              help="A leaving worker stops accepting this long before its listener closes.")
@click.option("--modes", default=",".join(ex.CHURN_MODES), show_default=True,
              help="Modes for the churn runs ('' for none).")
@click.option("--queued", "queued", type=int, default=32, show_default=True, metavar="K",
              help="Exact case: K clients queued on the leaving listener (0: skip).")
@click.option("--queued-modes", default=",".join(ex.QUEUED_MODES), show_default=True,
              help="Modes for the exact case.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", type=int, default=0, show_default=True,
              help="Port; 0 lets the kernel pick one.")
@click.option("--backlog", type=int, default=1024, show_default=True, help="listen() backlog.")
@click.option("--concurrency", type=int, default=32, show_default=True,
              help="Client connections in flight.")
@click.option("--timeout", type=float, default=1.0, show_default=True,
              help="The client's timeout per connection, seconds.")
@json_option()
@plot_option("Write a PNG plot here.")
@host_netns_option
def churn(workers, duration, add_every, remove_every, sequence, linger, modes, queued,
          queued_modes, host, port, backlog, concurrency, timeout, as_json, plot, host_netns):
    """Workers join and leave a reuseport group under steady load; count every
    failed connection (reset after the handshake, refused, timeout) with
    orphaned-request migration off, on, by a BPF program, and with a
    graceful drain; and an exact case: K queued connections, one close."""
    check_output_path(plot)
    if os.geteuid() != 0:
        raise UserError("churn needs root: it changes net.ipv4.tcp_migrate_req and loads BPF.")
    cfg = ex.ChurnConfig(
        workers=workers, duration=duration,
        add_every=add_every or None, remove_every=remove_every or None,
        sequence=ex.parse_sequence(sequence) if sequence else (),
        linger=linger, modes=ex.parse_modes(modes), queued=queued,
        queued_modes=ex.parse_modes(queued_modes), host=host, port=port, backlog=backlog,
        concurrency=concurrency, timeout=timeout)
    cfg.validate()
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    elif port:
        from ..kernel.sockets import check_port_free
        check_port_free(host, port, "tcp", reuseport=True, uid=os.geteuid())
    # SIGTERM or SIGHUP: Interrupted, as Ctrl-C, so every finally (sysctl,
    # program, workers) runs (cli.py, signals.py)
    rep = _run(cfg, "host" if host_netns else "private", as_json)
    if plot:
        from ..ui.churn_plot import write_plot
        write_plot(rep, plot)
    print_report(rep, as_json, render, width=140, plot=plot)


def _run(cfg: ex.ChurnConfig, netns: str, quiet: bool) -> dict:
    steps = (len(cfg.queued_modes) if cfg.queued else 0) + len(cfg.modes) * cfg.duration
    return with_step_progress(lambda **kw: ex.run_experiment(cfg, netns, **kw), steps,
                              lambda step: cfg.duration if step.startswith("churn") else 1,
                              "churn", quiet)


COMMANDS = [churn]
