"""reuseport-ctl reload: a server is replaced under load; which way of handing
its sockets over loses what."""
from __future__ import annotations

import os

import click

from ..errors import UserError
from ..signals import Stopped
from ._common import (check_output_path, host_netns_option, in_range, json_option, plot_option,
                      print_report, with_step_progress)
from ..experiments import reload as ex
from ..ui.reload_view import render

EPILOG = """\b
Examples:
  reuseport-ctl reload                              every mode, every load
  reuseport-ctl reload --modes inherit,rebind-off --loads short --reloads 5
  reuseport-ctl reload --queued 64 --loads udp --json
  reuseport-ctl reload --duration 10 --reloads 10 --plot reload.png
  reuseport-ctl reload --port 8080 --exec 'nginx -s reload'      a real server
  reuseport-ctl reload -p 8000 --exec 'kill -HUP $(cat g.pid)' --migrate-req 1

\b
Modes (how the new server gets its sockets):
  inherit       fork/exec: the new process inherits the old sockets
  pass          the old sockets are passed (pidfd_getfd, then SCM_RIGHTS)
  rebind-off    new sockets bound, old ones closed; tcp_migrate_req=0
  rebind-on     the same with tcp_migrate_req=1 (the kernel migrates)
  rebind-bpf    the same with a SELECT_OR_MIGRATE program
  rebind-drain  new sockets bound, old ones drained (drain:K), then closed
Loads: short (one request per TCP connection), keepalive (--keepalive-requests
per connection), udp (a datagram and its echo; UDP runs inherit, pass,
rebind-off and rebind-drain: UDP has no migration).

\b
First an exact case per mode (--queued K connections or datagrams waiting on
the old socket, nobody accepting), then each load under every mode. Failures
are counted by the client: resets, refusals, timeouts per 10k connections,
UDP datagrams lost per 10k. The sysctl is restored afterwards, also on
Ctrl-C, SIGTERM and SIGHUP (the steps done so far are printed). By default
everything runs in a private network namespace.

\b
A real server (--exec CMD --port P): the load goes to the server on port P
in this network namespace while CMD (run by /bin/sh) reloads it --reloads
times; the client counts every failure, sock_diag shows whether the server
kept its sockets or bound new ones (and the queues it closed). --migrate-req
0|1 sets net.ipv4.tcp_migrate_req for the run (restored after): what a
rebinding server (HAProxy -sf without expose-fd listeners, gunicorn
--reuse-port) needs so its closing sockets' queues are not reset.
"""


@click.command("reload", epilog=EPILOG)
@click.option("--modes", default=",".join(ex.MODES), show_default=True,
              help="Handover modes, comma-separated.")
@click.option("--loads", default=None,
              help="Loads, comma-separated: short, keepalive, udp "
                   "[default: all; with --exec: short,keepalive].")
@click.option("--workers", "-w", type=int, default=2, show_default=True,
              callback=in_range(1, ex.churn.MAX_SLOTS // 2),
              help="Sockets of the server (one worker process each).")
@click.option("--reloads", "-n", type=int, default=3, show_default=True,
              callback=in_range(1, 1000), help="Replacements of the whole server per run.")
@click.option("--duration", "-d", type=float, default=3.0, show_default=True,
              help="Seconds of steady load per run (mode and load).")
@click.option("--queued", type=int, default=16, show_default=True, metavar="K",
              callback=in_range(0, 1024),
              help="Exact case: K connections (datagrams) queued on the old socket (0: skip).")
@click.option("--linger", type=float, default=0.05, show_default=True,
              help="rebind: an old worker stops this long before its socket closes.")
@click.option("--keepalive-requests", type=int, default=20, show_default=True,
              callback=in_range(1, 10000), help="Requests per keep-alive connection.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", type=int, default=0, show_default=True,
              callback=in_range(0, 65535), help="Port; 0 lets the kernel pick one.")
@click.option("--backlog", type=int, default=1024, show_default=True,
              callback=in_range(1, 65535), help="listen() backlog.")
@click.option("--concurrency", type=int, default=32, show_default=True,
              callback=in_range(1, 4096), help="Client connections (datagrams) in flight.")
@click.option("--timeout", type=float, default=1.0, show_default=True,
              help="TCP: the client's timeout per connection, seconds.")
@click.option("--udp-timeout", type=float, default=0.5, show_default=True,
              help="UDP: a datagram not echoed within this many seconds is lost.")
@click.option("--exec", "command", default=None, metavar="CMD",
              help="Measure a real server on --port instead: CMD reloads it.")
@click.option("--migrate-req", type=click.IntRange(0, 1), default=None,
              help="With --exec: net.ipv4.tcp_migrate_req for the run (restored after).")
@json_option()
@plot_option("Write a PNG plot (failures per 10k per mode and load) here.")
@host_netns_option
def reload(modes, loads, workers, reloads, duration, queued, linger, keepalive_requests,
           host, port, backlog, concurrency, timeout, udp_timeout, command, migrate_req,
           as_json, plot, host_netns):
    """Replace a server under steady load, N times in each way of handing its
    sockets over (inherit, pass, rebind with migration off/on/BPF, drain),
    and count what the clients lose: TCP resets, refusals and timeouts per
    10k connections, UDP datagrams lost per 10k, the handover time, and the
    old sockets' queues when they were let go."""
    check_output_path(plot)
    if loads is None:
        loads = "short,keepalive" if command is not None else ",".join(ex.LOADS)
    if command is not None:
        ext = ex.ExternalConfig(port=port, command=command, host=host, reloads=reloads,
                                duration=duration, loads=ex.parse_list(loads, ex.LOADS, "load"),
                                migrate_req=migrate_req, keepalive_requests=keepalive_requests,
                                concurrency=concurrency, timeout=timeout)
        ext.validate()
        if migrate_req is not None and os.geteuid() != 0:
            raise UserError("--migrate-req needs root (CAP_NET_ADMIN).")
        return _report(_run(lambda **kw: ex.run_external(ext, **kw),
                            ext.duration * len(ext.loads), ext.duration, as_json),
                       as_json, plot)
    if migrate_req is not None:
        raise UserError("--migrate-req goes with --exec: the modes set the sysctl themselves.")
    cfg = ex.ReloadConfig(
        workers=workers, reloads=reloads, duration=duration,
        modes=ex.parse_list(modes, ex.MODES, "mode"),
        loads=ex.parse_list(loads, ex.LOADS, "load"), queued=queued, linger=linger,
        keepalive_requests=keepalive_requests, host=host, port=port, backlog=backlog,
        concurrency=concurrency, timeout=timeout, udp_timeout=udp_timeout)
    cfg.validate()
    if os.geteuid() != 0:
        raise UserError("reload needs root: it changes net.ipv4.tcp_migrate_req, loads BPF "
                        "and takes sockets with pidfd_getfd.")
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    elif port:
        from ..kernel.sockets import check_port_free
        for proto in {"udp" if ld == "udp" else "tcp" for ld in cfg.loads}:
            check_port_free(host, port, proto, reuseport=True, uid=os.geteuid())
    netns = "host" if host_netns else "private"
    steps = ex.plan(cfg)
    rep = _run(lambda **kw: ex.run_experiment(cfg, netns, **kw),
               sum(cfg.duration if kind == "load" else 1 for kind, _, _ in steps),
               cfg.duration, as_json)
    _report(rep, as_json, plot)


def _report(rep: dict, as_json: bool, plot) -> None:
    plot = plot if rep["runs"] else None
    if plot:
        from ..ui.reload_plot import write_plot
        write_plot(rep, plot)
    print_report(rep, as_json, render, width=200, plot=plot)
    if rep["interrupted"]:
        raise Stopped(rep["interrupted"])      # after printing the steps done


def _run(experiment, total: float, duration: float, quiet: bool) -> dict:
    return with_step_progress(experiment, total,
                              lambda step: duration if step.startswith("load") else 1,
                              "reload", quiet)


COMMANDS = [reload]
