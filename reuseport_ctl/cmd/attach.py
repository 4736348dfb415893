"""`reuseport-ctl attach / detach / status`: steer a running server's
SO_REUSEPORT group (nginx, Envoy, ours) with a policy that outlives the
command."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time

import click

from .. import pins
from ..signals import Stopped, hold_after_commit, late_signals, name, pause_for_test
from ._common import console, in_range, json_option, proto_option
from ..kernel.owners import process_name
from ..policies import help_text as policy_names
from ..ui.attach_view import (render_attach, render_detach, render_follow_event,
                              render_pins, render_status)

ATTACH_EPILOG = """\b
Examples:
  reuseport-ctl attach --port 8080 --policy drain:0
      new connections avoid slot 0 (its process finishes what it has)
  reuseport-ctl attach --port 80 --pid $(cat /run/nginx.pid) --policy weighted:1,3
      nginx: any of its processes names the server
  reuseport-ctl attach --proto udp --port 5353 --host ::1 --policy consistent --json
  reuseport-ctl attach --port 8000 --policy round-robin --follow
      gunicorn --reuse-port: a restarted worker's new socket takes the slot
      of the one it replaced within 0.2 s (runs until SIGINT/SIGTERM/SIGHUP;
      scripts/reuseport-ctl-follow@.service runs it under systemd)

\b
The group's sockets are numbered in a stable order (serving pid, then
inode) printed as slot -> pid, inode, address: that is what drain:K and
weighted mean; once a policy is pinned, its table numbers them in every
verb. The program stays attached (pinned under
/sys/fs/bpf/reuseport-ctl/net-<netns inode>/) until `detach`; attaching
again replaces it. Under `ip netns exec` the host's bpffs is reached
through the parent's mount namespace.
"""

DETACH_EPILOG = """\b
Examples:
  reuseport-ctl detach --port 8080
  reuseport-ctl detach --proto udp --port 5353
  reuseport-ctl detach --port 8080 --force    also remove a program reuseport-ctl
                                               did not attach
A follower (`attach --follow`) of the policy is stopped first. Pins whose
network namespace is gone are removed on the way.
"""

STATUS_EPILOG = """\b
Examples:
  reuseport-ctl status --port 8080
  reuseport-ctl status --proto udp --port 5353 --json
  reuseport-ctl status          every pin on the machine, by network namespace
\b
A line says when the policy is not in force: a slot's socket closed, or a
socket on the port is not in the policy (run attach --follow to keep it in
force). Pins whose network namespace is gone are reported and removed.
"""

port_opt = click.option("--port", type=int, required=True, callback=in_range(1, 65535),
                        help="The group's local port.")
json_opt = json_option("Print one JSON object.")


def which_group(fn):
    """--pid, --host and --proto: which group on the port."""
    fn = proto_option()(fn)
    fn = click.option("--host", help="The group's local address (when several groups match).")(fn)
    return click.option("--pid", type=int,
                        help="A process of the server (when several groups match).")(fn)


def _with_names(d: dict) -> dict:
    for s in d["slots"]:
        s["process"] = process_name(s["pid"]) if s["pid"] else "?"
    return d


@click.command("attach", epilog=ATTACH_EPILOG)
@port_opt
@which_group
@click.option("--policy", required=True,
              help="One of: " + policy_names(steering_only=True) + " (detach goes back to "
                   "the kernel's own hash).")
@click.option("--follow", is_flag=True,
              help="Stay in the foreground and keep the policy in force as sockets join "
                   "and leave the group (restarted workers); SIGINT/SIGTERM/SIGHUP stop "
                   "following and leave the policy pinned.")
@click.option("--private-bpffs", is_flag=True,
              help="Where no BPF filesystem shared with the host is reachable (a pid and "
                   "mount namespace of its own: `unshare --pid --mount-proc`, a container "
                   "without the host's /sys/fs/bpf), pin in one private to this mount "
                   "namespace anyway: only processes inside it see the policy (refused "
                   "without this flag).")
@json_opt
def attach(port, pid, host, proto, policy, follow, private_bpffs, as_json):
    """Attach a selection policy to the SO_REUSEPORT group on a port."""
    stop = threading.Event()
    if not follow:
        # Once the policy is pinned and in force, a stopping signal cannot
        # turn the attach into a failure: it is noted, and attach exits 0.
        hold_after_commit()
    if follow:
        # Installed before attaching: a signal from now on ends the follow
        # cleanly (the policy stays pinned) instead of interrupting it.
        def on_signal(signum, _frame):
            stop.signal = signal.Signals(signum).name
            stop.signum = signum
            stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, pins.FOLLOW_DONE):
            signal.signal(sig, on_signal)
    a = pins.attach(port, policy, proto=proto, pid=pid, host=host, follow=follow,
                    private_bpffs=private_bpffs)
    d = a.as_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        console().print(render_attach(_with_names(d)))
    sys.stdout.flush()
    pause_for_test("printed")
    late = late_signals()
    if follow:
        for sig in late:                # came while attach committed: stop following
            on_signal(sig, None)
        _follow(port, proto, stop, as_json)
    elif late:
        click.echo(f"reuseport-ctl: {name(late[0])} came after the policy was pinned and in "
                   f"force, so attach completed (`{pins.hint('detach', port, proto)}` "
                   f"undoes it).", err=True)


def _follow(port: int, proto: str, stop: threading.Event, as_json: bool) -> None:
    from ..follow import Follower

    def say(e):
        if as_json:
            click.echo(json.dumps(e.as_dict()))
        else:
            click.echo(render_follow_event(e.as_dict()))
        sys.stdout.flush()

    f = Follower.for_port(port, proto)
    if not as_json:
        click.echo(f"following {proto} port {port} (pid {f.pid}): a socket that joins takes "
                   f"the slot its predecessor left; SIGINT/SIGTERM/SIGHUP stop following "
                   f"and leave the policy pinned.")
        sys.stdout.flush()
    why = f.run(stop, say)
    done = getattr(stop, "signum", 0) == pins.FOLLOW_DONE
    if done:                            # detach, or an attach over it, stopped us
        why = "the policy was detached or replaced; nothing left to follow"
    elif stop.is_set():
        why = f"{getattr(stop, 'signal', 'signal')}: {why}"
    if as_json:
        click.echo(json.dumps({"event": "stopped", "ts": round(time.time(), 3),
                               "text": why}))
    else:
        click.echo(f"follow ended: {why}.")
    if stop.is_set() and not done:
        raise Stopped(stop.signum)          # the policy stays pinned; exit 128 + N


@click.command("detach", epilog=DETACH_EPILOG)
@port_opt
@which_group
@click.option("--force", is_flag=True,
              help="Also remove a program that reuseport-ctl did not attach.")
@json_opt
def detach(port, pid, host, proto, force, as_json):
    """Give the group back to the kernel's own hash and remove the pins."""
    hold_after_commit()         # as attach: a signal once it is done cannot undo it
    d = pins.detach(port, proto=proto, pid=pid, host=host, force=force).as_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        console().print(render_detach(d))
    sys.stdout.flush()
    late = late_signals()
    if late:
        click.echo(f"reuseport-ctl: {name(late[0])} came while the group was given back to "
                   f"the kernel, so detach completed.", err=True)


@click.command("status", epilog=STATUS_EPILOG)
@click.option("--port", type=int, callback=in_range(1, 65535),
              help="The group's local port (default: every pin).")
@proto_option()
@json_opt
def status(port, proto, as_json):
    """The attached policy, how often its program chose each slot, and
    whether it is in force; without --port, every pin on the machine."""
    if port is None:
        kept, stale, note = pins.status_all()
        d = {"pins": [p.as_dict() for p in kept],
             "removed_stale": [p.as_dict() for p in stale], "note": note}
        if as_json:
            click.echo(json.dumps(d))
        else:
            console().print(render_pins(d))
        return
    d = pins.status(port, proto=proto).as_dict()
    if as_json:
        click.echo(json.dumps(d))
    else:
        console().print(render_status(_with_names(d)))


COMMANDS = [attach, detach, status]
