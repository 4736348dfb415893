"""The NIC-facing policies, proved end to end on a real multi-queue NIC.

Runs inside a `vm --nic-queues N` guest (the NIC is virtio-net with RSS;
the connections come from the built-in client on the host side, through
the tap, QEMU's RSS, the driver's per-queue interrupts and NAPI):

    python -m reuseport_ctl.experiments.queue_proof [--conns 16] [--per-queue 3] [--json]
    python -m reuseport_ctl.experiments.queue_proof --on-queue 0     # after nic --rss-weights
    python -m reuseport_ctl.experiments.queue_proof --policy cpu|numa [--calibrate]

queue: every connection that arrived on receive queue q is accepted by
worker q mod n. Ground truth for "arrived on queue q" is not the policy's
own reading of skb->queue_mapping, but the driver and the device:

1. calibration, per queue q: the RSS indirection table is set to send
   everything to q (as `ethtool -X IF weight 0..1..0`); the driver's
   per-queue rx packet counter of q, and only q's, goes up; every connection
   carries one NAPI id (SO_INCOMING_NAPI_ID of the accepted socket): that
   id is queue q's NAPI;
2. the RSS table is put back, and `conns` connections are spread by RSS
   over the queues; each accepted connection's NAPI id names its queue, and
   the worker (listener slot) that accepted it must be that queue mod n.

--on-queue Q: the table as `nic --apply --rss-weights` left it (all on Q):
Q's rx counter alone moves, and every connection goes to worker Q.

cpu / numa: one worker per CPU, worker k pinned to CPU k, IRQ affinity as
`nic --apply` left it. Each worker reads SO_INCOMING_CPU of the sockets it
accepts: it must be the worker's own CPU (cpu) or on its NUMA node (numa);
with the calibration's NAPI ids, it must also be the CPU its queue's IRQ is
pinned to.

The RSS table is restored on exit, error and signals. Each group is n
SO_REUSEPORT listeners with one worker thread each; the policy is the real
program (bpf/select.c for queue and numa, the cBPF cpu program for cpu).
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
    cpu: int                        # SO_INCOMING_CPU: where its packets were received
    peer: str
    worker_cpus: list[int] = field(default_factory=list)   # the worker's CPU affinity


@dataclass
class Phase:
    name: str
    table: str                      # the indirection table, in words
    conns: list[Conn] = field(default_factory=list)
    rx_packets: dict[int, int] = field(default_factory=dict)   # queue -> delta
    load_ok: int = 0
    irqs: dict[int, list[int]] = field(default_factory=dict)   # rx queue -> its IRQ's delta per CPU


class Group:
    """n listeners on one port with a policy attached, and one worker
    (thread) per listener that accepts, answers and records where each
    connection came in. cpus: worker k pins itself to cpus[k] (the thread
    alone: sched_setaffinity(0) acts on the calling thread), as `run --cpus`
    pins worker processes; None leaves the workers unpinned."""

    def __init__(self, port: int, n: int, policy: str = "queue",
                 cpus: list[int] | None = None):
        from ..policies import parse_policy
        from ..policies.selector import attach_policy
        self.policy, self.cpus = policy, cpus
        self.socks = open_group("0.0.0.0", port, "tcp", n, backlog=128)
        try:
            self.sel = attach_policy(parse_policy(policy), self.socks,
                                     cpus=tuple(cpus) if cpus else None)
        except BaseException:
            for s in self.socks:
                s.close()
            raise
        self.port = self.socks[0].getsockname()[1]
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._worker, args=(slot,), daemon=True)
                         for slot in range(n)]
        for t in self._workers:
            t.start()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _worker(self, slot: int) -> None:
        if self.cpus:
            os.sched_setaffinity(0, {self.cpus[slot]})
        ls = self.socks[slot]
        ev = selectors.DefaultSelector()
        ls.setblocking(False)
        ev.register(ls, selectors.EVENT_READ)
        while not self._stop.is_set():
            if not ev.select(0.2):
                continue
            try:
                c, peer = ls.accept()
            except BlockingIOError:
                continue
            with c:
                napi, cpu = incoming(c)
                mine = sorted(os.sched_getaffinity(0))    # where this worker runs
                c.setblocking(True)
                c.settimeout(5)
                try:
                    buf = b""
                    while b"\r\n\r\n" not in buf:
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    c.sendall(RESPONSE % slot)
                except OSError:
                    pass
                with self._lock:
                    self.conns.append(Conn(slot, napi, cpu, f"{peer[0]}:{peer[1]}", mine))

    def take(self) -> list[Conn]:
        with self._lock:
            out, self.conns = self.conns, []
        return out

    def close(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(2)
        self.sel.close()
        for s in self.socks:
            s.close()


def _rx(iface: str) -> dict[int, int]:
    """The driver's per-queue rx packet counters: netdev qstats (virtio_net
    6.10+), else its ethtool statistics."""
    import socket
    stats = knic.qstats(socket.if_nametoindex(iface)) or knic.queue_packets(iface)
    return {q: v for (d, q), v in stats.items() if d == "rx"}


def _rx_irqs(iface: str) -> dict[int, int]:
    """rx queue -> its IRQ number."""
    return {q.index: q.irq for q in knic.read_nic(iface).rx if q.irq is not None}


def _irq_counts(irqs: dict[int, int]) -> dict[int, list[int]]:
    table = knic.interrupts()
    return {q: list(table.get(n, ("", []))[1]) for q, n in irqs.items()}


def measure(g: Group, iface: str, name: str, table: str, conns: int) -> Phase:
    """Have the host side open `conns` connections; what the workers saw,
    and how far each rx queue's packet counter and IRQ count moved."""
    from ..vm.hostload import host_load
    irqs = _rx_irqs(iface)
    before, ibefore = _rx(iface), _irq_counts(irqs)
    res = host_load(g.port, conns, concurrency=1)
    deadline = time.monotonic() + 5
    while len(g.conns) < res["ok"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after, iafter = _rx(iface), _irq_counts(irqs)
    return Phase(name, table, g.take(), {q: after[q] - before.get(q, 0) for q in after},
                 res["ok"], {q: [a - b for a, b in zip(iafter[q], ibefore.get(q, []))]
                             for q in iafter})


def _multiqueue(iface: str) -> tuple[int, list[int]]:
    nq = len(knic.read_nic(iface).rx)
    table = knic.indirection(iface)
    if nq < 2 or not table:
        raise UserError(f"{iface} has {nq} receive queue(s) and "
                        f"{'an' if table else 'no'} RSS indirection table: the proof "
                        f"needs a multi-queue NIC with RSS (vm --nic-queues 4).")
    if not _rx(iface):
        raise UserError(f"{iface}'s driver has no per-queue rx packet counters.")
    return nq, table


def calibrate(g: Group, iface: str, per_queue: int) -> tuple[list[Phase], dict[int, int]]:
    """For each queue q, all RSS weight on q: the phase, and the NAPI id its
    connections carried (napi id -> queue). The table is put back."""
    nq, original = _multiqueue(iface)
    phases: list[Phase] = []
    napi_of: dict[int, int] = {}
    try:
        for q in range(nq):
            weights = [1 if i == q else 0 for i in range(nq)]
            knic.set_indirection(iface, knic.weights_table(len(original), weights))
            phases.append(measure(g, iface, f"calibrate queue {q}",
                                  f"weight {' '.join(map(str, weights))}", per_queue))
            ids = {c.napi for c in phases[-1].conns}
            if len(ids) == 1:
                napi_of[ids.pop()] = q
    finally:
        knic.set_indirection(iface, original)
    return phases, napi_of


def prove(iface: str, conns: int = 16, per_queue: int = 3, port: int = 8080,
          group: Group | None = None) -> dict:
    """The queue policy: calibration, then `conns` connections spread by RSS.
    group: a queue-policy Group to use (kept open), else one of our own."""
    nq, _ = _multiqueue(iface)
    g = group or Group(port, nq, "queue")
    try:
        phases, napi_of = calibrate(g, iface, per_queue)
        phases.append(measure(g, iface, "spread", "as before (restored)", conns))
    finally:
        if group is None:
            g.close()
    return judge(phases, napi_of, nq, iface, knic.read_nic(iface).driver)


def _one_queue_problems(p: Phase, q: int, nq: int) -> list[str]:
    """A phase whose RSS table sends everything to queue q: q's rx counter
    and no other moved, one NAPI id, every connection on worker q mod nq."""
    problems = []
    ids = sorted({c.napi for c in p.conns})
    others = {k: v for k, v in p.rx_packets.items() if k != q and v}
    if len(ids) != 1:
        problems.append(f"{p.name}: connections came with NAPI ids {ids}, not one.")
    if not p.rx_packets.get(q):
        problems.append(f"{p.name}: queue {q}'s rx counter did not move.")
    if others:
        problems.append(f"{p.name}: other queues' rx counters moved too: {others}.")
    wrong = [c for c in p.conns if c.slot != q % nq]
    if wrong:
        problems.append(f"{p.name}: {len(wrong)} connections went to other workers "
                        f"({sorted({c.slot for c in wrong})}).")
    if len(p.conns) != p.load_ok or not p.conns:
        problems.append(f"{p.name}: {len(p.conns)} accepted, {p.load_ok} answered.")
    return problems


def prove_on_queue(iface: str, queue: int, conns: int = 8, port: int = 8083,
                   napi_of: dict[int, int] | None = None, group: Group | None = None) -> dict:
    """After `nic IFACE --apply --rss-weights` put all weight on `queue`
    (the table is read, not written, here): every connection arrives on that
    queue (its rx counter alone moves; its NAPI id, when napi_of knows the
    queues') and the queue policy hands it to worker `queue`."""
    nq, table = _multiqueue(iface)
    g = group or Group(port, nq, "queue")
    try:
        p = measure(g, iface, f"rss on queue {queue}",
                    "queues " + ",".join(map(str, sorted(set(table)))), conns)
    finally:
        if group is None:
            g.close()
    problems = []
    if set(table) != {queue}:
        problems.append(f"the RSS table sends to queues {sorted(set(table))}, not "
                        f"{queue} alone: run `reuseport-ctl nic {iface} --apply "
                        f"--rss-weights ...` first.")
    problems += _one_queue_problems(p, queue, nq)
    if napi_of:
        queues = sorted({napi_of.get(c.napi, -1) for c in p.conns})
        if queues != [queue]:
            problems.append(f"{p.name}: the connections' NAPI ids name queues {queues}.")
    by_worker = [sum(c.slot == w for c in p.conns) for w in range(nq)]
    return {"policy": "queue", "interface": iface, "queue": queue, "queues": nq,
            "kernel": os.uname().release, "table": sorted(set(table)),
            "phase": dict(asdict(p), conns=[asdict(c) for c in p.conns]),
            "conns": len(p.conns), "by_worker": by_worker,
            "exact_count": by_worker[queue % nq] if p.conns else 0,
            "exact": not problems, "problems": problems}


def prove_cpus(iface: str, policy: str, conns: int = 16, port: int = 8081,
               napi_of: dict[int, int] | None = None) -> dict:
    """The cpu or numa policy, one worker per online CPU (worker k pinned to
    CPU k, as `run --cpus auto`), IRQ affinity as it is now (`nic --apply`
    sets it). Every connection's SO_INCOMING_CPU, read by the worker that
    accepted it, must be that worker's CPU (cpu) or on its NUMA node (numa).
    napi_of (napi id -> queue, from the queue proof's calibration) adds: the
    CPU that received it is the one its queue's IRQ is pinned to."""
    from ..kernel.nic import cpu_nodes, online_cpus
    _multiqueue(iface)
    cpus = online_cpus()
    node_of = cpu_nodes()
    nic = knic.read_nic(iface)
    with Group(port, len(cpus), policy, cpus=cpus) as g:
        settle = _settle(g, iface)
        irq_cpus = {q: eff for q, (_, eff) in _rx_affinity(iface).items()}
        p = measure(g, iface, policy, "as it is", conns)
    r = judge_cpus(p, policy, cpus, node_of, irq_cpus, napi_of, iface, nic.driver)
    r["settle_conns"] = settle
    return r


def _rx_affinity(iface: str) -> dict[int, tuple[list[int], list[int]]]:
    """rx queue -> (smp_affinity_list, effective_affinity_list) of its IRQ."""
    table = knic.interrupts()
    out = {}
    for q, n in _rx_irqs(iface).items():
        i = knic.irq(n, table)
        out[q] = (i.affinity, i.effective if i.effective is not None else i.affinity)
    return out


def _settle(g: Group, iface: str, conns: int = 8, rounds: int = 6) -> int:
    """Warm-up connections until every rx queue's IRQ fires within its
    affinity; how many it took. On x86 a new smp_affinity_list is taken at
    the IRQ's next interrupt (the MSI is moved from the interrupt itself),
    which still fires on the old CPU, as may the NAPI poll it starts: until
    then effective_affinity_list shows the old CPU. The warm-up connections
    are not judged."""
    sent = 0
    for _ in range(rounds):
        if all(set(e) <= set(a) for a, e in _rx_affinity(iface).values()):
            time.sleep(0.2 if sent else 0)     # the last round's NAPI poll is over
            return sent
        measure(g, iface, "warm-up", "", conns)
        sent += conns
    pending = {q: e for q, (a, e) in _rx_affinity(iface).items() if not set(e) <= set(a)}
    raise UserError(f"after {sent} warm-up connections, rx queue IRQs still fire outside "
                    f"their affinity: {pending}.")


def judge_cpus(p: Phase, policy: str, cpus: list[int], node_of: dict[int, int],
               irq_cpus: dict[int, list[int]], napi_of: dict[int, int] | None,
               iface: str, driver) -> dict:
    """The verdict of prove_cpus (pure: unit-testable). The matrix: rows the
    receiving CPU (SO_INCOMING_CPU), columns the accepting worker's CPU."""
    problems: list[str] = []
    idx = {c: i for i, c in enumerate(cpus)}
    matrix = [[0] * len(cpus) for _ in cpus]
    exact = irq_exact = 0
    for c in p.conns:
        if len(c.worker_cpus) != 1 or c.cpu not in idx or c.worker_cpus[0] not in idx:
            problems.append(f"{c.peer}: received on CPU {c.cpu}, worker on CPUs "
                            f"{c.worker_cpus}: not one pinned CPU.")
            continue
        w = c.worker_cpus[0]
        matrix[idx[c.cpu]][idx[w]] += 1
        if (w == c.cpu) if policy == "cpu" else (node_of.get(w) == node_of.get(c.cpu)):
            exact += 1
        if napi_of:
            q = napi_of.get(c.napi)
            if q is not None and irq_cpus.get(q) == [c.cpu]:
                irq_exact += 1
    what = ("on the worker of the CPU that received it" if policy == "cpu" else
            "on a worker of the receiving CPU's NUMA node")
    if exact != len(p.conns):
        problems.append(f"only {exact} of {len(p.conns)} connections were {what}.")
    if napi_of and irq_exact != len(p.conns):
        problems.append(f"only {irq_exact} of {len(p.conns)} connections were received on "
                        f"the one CPU their queue's IRQ is pinned to.")
    if len(p.conns) != p.load_ok or not p.conns:
        problems.append(f"{len(p.conns)} accepted, {p.load_ok} answered.")
    # where each queue's interrupts fired while the connections came in
    fired = {q: [cpus[i] for i, v in enumerate(d) if v] for q, d in p.irqs.items()}
    strays = {q: f for q, f in fired.items() if irq_cpus.get(q) and
              not set(f) <= set(irq_cpus[q])}
    if strays:
        problems.append(f"queue IRQs fired outside their affinity: {strays}.")
    return {"policy": policy, "interface": iface, "driver": driver,
            "kernel": os.uname().release, "cpus": cpus,
            "nodes": {str(c): node_of.get(c, 0) for c in cpus},
            "irq_cpus": {str(q): v for q, v in irq_cpus.items()},
            "irq_fired": {str(q): v for q, v in p.irqs.items()},
            "phase": dict(asdict(p), conns=[asdict(c) for c in p.conns]),
            "conns": len(p.conns), "exact_count": exact,
            "irq_checked": irq_exact if napi_of else None,
            "cpu_by_worker": matrix, "exact": not problems, "problems": problems}


def judge(phases: list[Phase], napi_of: dict[int, int], nq: int, iface: str,
          driver) -> dict:
    """The verdict over the measured phases (pure: unit-testable)."""
    problems: list[str] = []
    cal = phases[:nq]
    for q, p in enumerate(cal):
        problems += _one_queue_problems(p, q, nq)
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


def render_on_queue(r: dict) -> str:
    p = r["phase"]
    rx = " ".join(f"q{q}+{v}" for q, v in sorted(p["rx_packets"].items()))
    napis = sorted({c["napi"] for c in p["conns"]})
    return "\n".join([
        f"queue policy on {r['interface']} ({r['queues']} queues, kernel {r['kernel']}), "
        f"RSS table on queue(s) {','.join(map(str, r['table']))}",
        f"  {r['conns']} conns; NAPI ids {','.join(map(str, napis))}; rx packets {rx}",
        "  by worker: " + " ".join(f"w{w} {v}" for w, v in enumerate(r["by_worker"])),
        f"  exact: {r['exact_count']}/{r['conns']} arrived on queue {r['queue']} and went "
        f"to worker {r['queue']}" + ("" if r["exact"] else "; " + " ".join(r["problems"]))])


def render_cpus(r: dict) -> str:
    cpus, nodes = r["cpus"], r["nodes"]
    numa = r["policy"] == "numa"
    where = ", ".join(f"q{q} CPU {','.join(map(str, c))}" for q, c in r["irq_cpus"].items())
    fired = ", ".join(f"q{q} " + (" ".join(f"CPU{cpus[i]}+{v}" for i, v in enumerate(d) if v)
                                  or "-") for q, d in r["irq_fired"].items())
    label = (lambda c: f"cpu{c}/n{nodes[str(c)]}") if numa else (lambda c: f"cpu{c}")
    lines = [f"{r['policy']} policy on {r['interface']} ({r['driver']}, kernel {r['kernel']}): "
             f"{len(cpus)} workers, worker k pinned to CPU k"
             + ("; NUMA node of CPU " + ", ".join(f"{c} = {n}" for c, n in nodes.items())
                if numa else ""),
             f"  rx queue IRQs pinned: {where}"
             + (f" (moved after {r['settle_conns']} warm-up conns, not judged)"
                if r.get("settle_conns") else ""),
             f"  IRQs fired during the {r['conns']} conns: {fired}",
             "  connections by receiving CPU (SO_INCOMING_CPU, rows) and the accepting "
             "worker's CPU (columns)",
             "            " + "".join(f"{label(c):>9}" for c in cpus)]
    for c, row in zip(cpus, r["cpu_by_worker"]):
        lines.append(f"    {label(c):<8}" + "".join(f"{v:>9}" for v in row))
    what = "on the worker of the CPU that received it" if not numa else \
        "on a worker of the receiving CPU's node"
    tail = f"  exact: {r['exact_count']}/{r['conns']} {what}"
    if r["irq_checked"] is not None:
        tail += f"; {r['irq_checked']}/{r['conns']} received on the CPU of their queue's IRQ"
    lines.append(tail + ("" if r["exact"] else "; " + " ".join(r["problems"])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..signals import as_interrupts
    ap = argparse.ArgumentParser(prog="queue_proof", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iface", default=os.environ.get("REUSEPORT_CTL_VM_NIC"))
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--per-queue", type=int, default=3)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--policy", choices=("queue", "cpu", "numa"), default="queue")
    ap.add_argument("--on-queue", type=int, default=None, metavar="Q",
                    help="queue policy: the RSS table sends everything to queue Q "
                         "(nic --apply --rss-weights); prove it, without calibrating")
    ap.add_argument("--calibrate", action="store_true",
                    help="cpu/numa: first find each queue's NAPI id (the queue proof's "
                         "calibration), to check every connection against its queue's IRQ")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.on_queue is not None and a.policy != "queue":
        ap.error("--on-queue proves the queue policy on a moved table: not with --policy "
                 f"{a.policy}.")
    try:
        if not a.iface:
            raise UserError("no --iface and no REUSEPORT_CTL_VM_NIC: name the interface.")
        with as_interrupts():
            if a.policy == "queue" and a.on_queue is not None:
                r, show = prove_on_queue(a.iface, a.on_queue, a.conns, a.port), render_on_queue
            elif a.policy == "queue":
                r, show = prove(a.iface, a.conns, a.per_queue, a.port), render
            else:
                napi_of = None
                if a.calibrate:
                    nq, _ = _multiqueue(a.iface)
                    with Group(a.port + 1, nq, "queue") as g:
                        napi_of = calibrate(g, a.iface, a.per_queue)[1]
                r, show = prove_cpus(a.iface, a.policy, a.conns, a.port, napi_of), render_cpus
    except UserError as e:
        print(f"queue_proof: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        from ..signals import exit_code, signum_of
        return exit_code(signum_of(e))
    print(json.dumps(r, indent=2) if a.json else show(r))
    return 0 if r["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
