"""The queue policy, proved end to end on a real multi-queue NIC: every
connection that arrived on receive queue q is accepted by worker q mod n.

Runs inside a `vm --nic-queues N` guest (the NIC is virtio-net with RSS;
the connections come from the built-in client on the host side, through
the tap, QEMU's RSS, the driver's per-queue interrupts and NAPI):

    python -m reuseport_ctl.experiments.queue_proof [--conns 16] [--per-queue 3] [--json]

Ground truth for "arrived on queue q" is not the policy's own reading of
skb->queue_mapping, but the driver and the device:

1. calibration, per queue q: the RSS indirection table is set to send
   everything to q (as `ethtool -X IF weight 0..1..0`); the driver's
   per-queue rx packet counter of q, and only q's, goes up; every connection
   carries one NAPI id (SO_INCOMING_NAPI_ID of the accepted socket): that
   id is queue q's NAPI;
2. the RSS table is put back, and `conns` connections are spread by RSS
   over the queues; each accepted connection's NAPI id names its queue, and
   the worker (listener slot) that accepted it must be that queue mod n.

The table is restored on exit, error and signals. The group is n
SO_REUSEPORT listeners (n = the number of queues), one accept loop; the
policy is the real eBPF program (bpf/select.c, POLICY=queue).
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..kernel import nic as knic
from ..kernel.sockets import incoming, open_group

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nX-Worker: %d\r\n\r\nok"


@dataclass
class Conn:
    slot: int                       # the listener (worker) that accepted it
    napi: int                       # SO_INCOMING_NAPI_ID
    cpu: int                        # SO_INCOMING_CPU
    peer: str


@dataclass
class Phase:
    name: str
    table: str                      # the indirection table, in words
    conns: list[Conn] = field(default_factory=list)
    rx_packets: dict[int, int] = field(default_factory=dict)   # queue -> delta
    load_ok: int = 0


class Group:
    """n listeners on one port, the queue policy attached, one accept thread
    that answers each connection and records where it came in."""

    def __init__(self, port: int, n: int):
        from ..policies import parse_policy
        from ..policies.selector import attach_policy
        self.socks = open_group("0.0.0.0", port, "tcp", n, backlog=128)
        self.sel = attach_policy(parse_policy("queue"), self.socks)
        self.port = self.socks[0].getsockname()[1]
        self.conns: list[Conn] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        ev = selectors.DefaultSelector()
        for slot, s in enumerate(self.socks):
            s.setblocking(False)
            ev.register(s, selectors.EVENT_READ, slot)
        while not self._stop.is_set():
            for key, _ in ev.select(0.2):
                try:
                    c, peer = key.fileobj.accept()
                except BlockingIOError:
                    continue
                with c:
                    c.setblocking(True)
                    c.settimeout(5)
                    napi, cpu = incoming(c)
                    try:
                        buf = b""
                        while b"\r\n\r\n" not in buf:
                            chunk = c.recv(4096)
                            if not chunk:
                                break
                            buf += chunk
                        c.sendall(RESPONSE % key.data)
                    except OSError:
                        pass
                    self.conns.append(Conn(key.data, napi, cpu, f"{peer[0]}:{peer[1]}"))

    def take(self) -> list[Conn]:
        out, self.conns = self.conns, []
        return out

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.sel.close()
        for s in self.socks:
            s.close()


def _rx(iface: str) -> dict[int, int]:
    """The driver's per-queue rx packet counters: netdev qstats (virtio_net
    6.10+), else its ethtool statistics."""
    import socket
    stats = knic.qstats(socket.if_nametoindex(iface)) or knic.queue_packets(iface)
    return {q: v for (d, q), v in stats.items() if d == "rx"}


def _phase(g: Group, iface: str, name: str, table: str, conns: int) -> Phase:
    from ..vm.hostload import host_load
    before = _rx(iface)
    res = host_load(g.port, conns, concurrency=1)
    deadline = time.monotonic() + 5
    while len(g.conns) < res["ok"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _rx(iface)
    p = Phase(name, table, g.take(), {q: after[q] - before.get(q, 0) for q in after},
              res["ok"])
    return p


def prove(iface: str, conns: int = 16, per_queue: int = 3, port: int = 8080) -> dict:
    nic = knic.read_nic(iface)
    nq = len(nic.rx)
    original = knic.indirection(iface)
    if nq < 2 or not original:
        raise UserError(f"{iface} has {nq} receive queue(s) and "
                        f"{'an' if original else 'no'} RSS indirection table: the proof "
                        f"needs a multi-queue NIC with RSS (vm --nic-queues 4).")
    if not _rx(iface):
        raise UserError(f"{iface}'s driver has no per-queue rx packet counters.")
    g = Group(port, nq)
    phases: list[Phase] = []
    napi_of: dict[int, int] = {}
    try:
        for q in range(nq):
            weights = [1 if i == q else 0 for i in range(nq)]
            knic.set_indirection(iface, knic.weights_table(len(original), weights))
            phases.append(_phase(g, iface, f"calibrate queue {q}",
                                 f"weight {' '.join(map(str, weights))}", per_queue))
            ids = {c.napi for c in phases[-1].conns}
            if len(ids) == 1:
                napi_of[ids.pop()] = q
        knic.set_indirection(iface, original)
        phases.append(_phase(g, iface, "spread", "as before (restored)", conns))
    finally:
        try:
            knic.set_indirection(iface, original)
        finally:
            g.close()
    return judge(phases, napi_of, nq, iface, nic.driver)


def judge(phases: list[Phase], napi_of: dict[int, int], nq: int, iface: str,
          driver) -> dict:
    """The verdict over the measured phases (pure: unit-testable)."""
    problems: list[str] = []
    cal = phases[:nq]
    for q, p in enumerate(cal):
        ids = sorted({c.napi for c in p.conns})
        others = {k: v for k, v in p.rx_packets.items() if k != q and v}
        if len(ids) != 1:
            problems.append(f"{p.name}: connections came with NAPI ids {ids}, not one.")
        if not p.rx_packets.get(q):
            problems.append(f"{p.name}: queue {q}'s rx counter did not move.")
        if others:
            problems.append(f"{p.name}: other queues' rx counters moved too: {others}.")
        wrong = [c for c in p.conns if c.slot != q % len(cal)]
        if wrong:
            problems.append(f"{p.name}: {len(wrong)} connections went to other workers "
                            f"({sorted({c.slot for c in wrong})}).")
        if len(p.conns) != p.load_ok or not p.conns:
            problems.append(f"{p.name}: {len(p.conns)} accepted, {p.load_ok} answered.")
    if len(set(napi_of.values())) != nq:
        problems.append(f"the calibration found NAPI ids for queues "
                        f"{sorted(napi_of.values())}, not all {nq}.")
    spread = phases[nq]
    matrix = [[0] * nq for _ in range(nq)]           # [queue][worker]
    unknown = 0
    for c in spread.conns:
        q = napi_of.get(c.napi)
        if q is None:
            unknown += 1
        else:
            matrix[q][c.slot] += 1
    exact = sum(matrix[q][q % nq] for q in range(nq))
    if unknown:
        problems.append(f"spread: {unknown} connections came with a NAPI id no queue has.")
    if exact != len(spread.conns):
        problems.append(f"spread: only {exact} of {len(spread.conns)} connections were "
                        f"accepted by the worker of their queue.")
    if len(spread.conns) != spread.load_ok:
        problems.append(f"spread: {len(spread.conns)} accepted, {spread.load_ok} answered.")
    return {"interface": iface, "driver": driver, "queues": nq, "workers": nq,
            "kernel": os.uname().release,
            "napi_of_queue": {str(q): n for n, q in sorted(napi_of.items(), key=lambda x: x[1])},
            "phases": [dict(asdict(p), conns=[asdict(c) for c in p.conns]) for p in phases],
            "spread": {"conns": len(spread.conns), "exact": exact, "unknown": unknown,
                       "queue_by_worker": matrix,
                       "rx_packets": spread.rx_packets},
            "exact": not problems, "problems": problems}


def render(r: dict) -> str:
    nq = r["queues"]
    lines = [f"queue policy on {r['interface']} ({r['driver']}, {nq} queues, kernel "
             f"{r['kernel']}): NAPI id of queue "
             + ", ".join(f"{q} = {n}" for q, n in r["napi_of_queue"].items())]
    for p in r["phases"]:
        slots = sorted({c["slot"] for c in p["conns"]})
        rx = " ".join(f"q{q}+{v}" for q, v in sorted(p["rx_packets"].items()))
        lines.append(f"  {p['name']:<18} table {p['table']:<20} {len(p['conns']):>3} conns "
                     f"-> worker {','.join(map(str, slots)) or '-'}; rx packets {rx}")
    s = r["spread"]
    lines.append("  spread: connections by receive queue (rows) and worker (columns)")
    lines.append("           " + "".join(f"  w{w:<3}" for w in range(nq)))
    for q, row in enumerate(s["queue_by_worker"]):
        lines.append(f"    queue {q}" + "".join(f"{v:>6}" for v in row))
    lines.append(f"  exact: {s['exact']}/{s['conns']} on the worker of their queue"
                 + ("" if r["exact"] else "; " + " ".join(r["problems"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..signals import as_interrupts
    ap = argparse.ArgumentParser(prog="queue_proof", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iface", default=os.environ.get("REUSEPORT_CTL_VM_NIC"))
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--per-queue", type=int, default=3)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        if not a.iface:
            raise UserError("no --iface and no REUSEPORT_CTL_VM_NIC: name the interface.")
        with as_interrupts():
            r = prove(a.iface, a.conns, a.per_queue, a.port)
    except UserError as e:
        print(f"queue_proof: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        from ..signals import exit_code, signum_of
        return exit_code(signum_of(e))
    print(json.dumps(r, indent=2) if a.json else render(r))
    return 0 if r["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
