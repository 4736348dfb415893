"""Inside a `vm --nic-queues N` guest: ask the host side for load.

The runner exports REUSEPORT_CTL_VM_PEER (the host side's address),
REUSEPORT_CTL_VM_ADDR (the guest NIC's), REUSEPORT_CTL_VM_NIC (its name) and
REUSEPORT_CTL_VM_AGENT (peer:port of the load agent, see nethost.py). The
agent runs the built-in client on the host side, so the connections enter
the guest through the virtio-net driver, its queues and RSS.
"""
from __future__ import annotations

import json
import os
import socket

from ..errors import UserError


def agent_address() -> tuple[str, int]:
    v = os.environ.get("REUSEPORT_CTL_VM_AGENT")
    if not v:
        raise UserError("no REUSEPORT_CTL_VM_AGENT: this runs in a guest booted with "
                        "`reuseport-ctl vm --nic-queues N`.")
    host, _, port = v.rpartition(":")
    return host, int(port)


def host_load(port: int, conns: int, *, host: str | None = None, concurrency: int = 1,
              timeout: float = 5.0, wait: float = 300.0) -> dict:
    """Have the host side open `conns` connections to host:port (the guest
    NIC's address by default) with the built-in client; its result dict."""
    agent = agent_address()
    req = {"host": host or os.environ.get("REUSEPORT_CTL_VM_ADDR"), "port": port,
           "conns": conns, "concurrency": concurrency, "timeout": timeout}
    with socket.create_connection(agent, timeout=wait) as s:
        s.sendall(json.dumps(req).encode() + b"\n")
        line = s.makefile("rb").readline()
    if not line:
        raise UserError(f"the host's load agent at {agent[0]}:{agent[1]} closed without "
                        f"an answer.")
    out = json.loads(line)
    if "error" in out:
        raise UserError(f"the host's load agent refused: {out['error']}")
    return out
