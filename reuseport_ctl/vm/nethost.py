"""The host side of the VM's NIC (`vm --nic-queues N`): a process that owns a
private network namespace holding an N-queue tap with the peer address, and
runs the built-in load client there when the guest asks for it.

    python -m reuseport_ctl.vm.nethost --queues 4 --tap rctl0 --peer 192.0.2.1/24

It prints `ready <netns path>` once the tap is up; QEMU (through qemu_wrap)
enters that namespace and attaches the tap's queues. The namespace has no
name and dies with its last process: this one (it dies with the runner,
PR_SET_PDEATHSIG) and QEMU (killed with the VM's process group). The tap
goes with the namespace. The host's own network is never touched.

The load agent listens on the peer address, port AGENT_PORT, reachable only
through the tap (so only from the guest). One request per connection, one
JSON line each way:

    -> {"host": "192.0.2.2", "port": 8080, "conns": 40, "concurrency": 1}
    <- LoadResult.to_dict()          or  {"error": "one sentence"}
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys

AGENT_PORT = 7070
TAP = "rctl0"
SUBNET = "192.0.2.0/24"             # TEST-NET-1: never routed anywhere
PEER = "192.0.2.1"                  # the host side (the tap)
GUEST = "192.0.2.2"                 # the guest's NIC
GUEST_MAC = "52:54:00:72:63:02"


def qemu_args(queues: int, tap: str = TAP) -> list[str]:
    """The QEMU arguments for an N-queue virtio-net-pci NIC with RSS and hash
    reporting over the tap (vhost off: TCG; 2N+2 MSI-X vectors: one per rx
    and tx queue, config and control)."""
    return ["-netdev", f"tap,id=rctlnet,ifname={tap},script=no,downscript=no,"
                       f"queues={queues},vhost=off",
            "-device", f"virtio-net-pci,netdev=rctlnet,mac={GUEST_MAC},mq=on,rss=on,"
                       f"hash=on,vectors={2 * queues + 2}"]


def _serve(addr: str, port: int, guest: str) -> None:
    from ..errors import UserError
    from ..load.client import run_load

    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        with conn:
            try:
                line = conn.makefile("rb").readline()
                req = json.loads(line)
                host = str(req.get("host", guest))
                if ipaddress.ip_address(host) not in ipaddress.ip_network(SUBNET):
                    raise UserError(f"the load agent sends only to {SUBNET}, not {host}.")
                res = run_load(host, int(req["port"]), str(req.get("proto", "tcp")),
                               conns=int(req.get("conns", 10)),
                               concurrency=int(req.get("concurrency", 1)),
                               processes=1, timeout=float(req.get("timeout", 5.0)))
                out = res.to_dict()
            except (UserError, ValueError, KeyError, TypeError, OSError) as e:
                out = {"error": str(e)}
            try:
                conn.sendall(json.dumps(out).encode() + b"\n")
            except OSError:
                pass


def main(argv: list[str] | None = None) -> None:
    from ..kernel import tap

    ap = argparse.ArgumentParser(prog="nethost")
    ap.add_argument("--queues", type=int, required=True)
    ap.add_argument("--tap", default=TAP)
    ap.add_argument("--peer", default=f"{PEER}/24")
    ap.add_argument("--guest", default=GUEST)
    ap.add_argument("--agent-port", type=int, default=AGENT_PORT)
    a = ap.parse_args(argv)
    tap.die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:                  # the runner is already gone
        sys.exit(1)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        tap.unshare_net()
        tap.create_mq_tap(a.tap, a.queues)
        addr, prefix = a.peer.split("/")
        tap.configure(a.tap, addr, int(prefix))
    except Exception as e:                 # one line for the runner, which says it
        print(f"error {e}", flush=True)
        sys.exit(1)
    print(f"ready /proc/{os.getpid()}/ns/net", flush=True)
    _serve(addr, a.agent_port, a.guest)


if __name__ == "__main__":
    main()
