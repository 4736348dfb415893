"""The verdict on an interface: which CPUs receive its traffic, whether the
workers line up with them, and the masks to change (with the commands).

Pure functions over nic.model. The receive side of a packet runs where its
queue's IRQ fires, or on the RPS CPUs of that queue when RPS is set; a
device without IRQs (veth, loopback) processes a packet on the CPU that
sent it. The reuseport selection (and the cpu policy's "receiving CPU")
happens there. The plan spreads queue q over the target CPUs (the workers'
CPUs, or every online CPU):

  - queue IRQs: IRQ of queue q -> target q % T;
  - fewer queues than targets: RPS of queue q -> every target j with
    j % queues == q (the queue's own IRQ CPU included), so all workers'
    CPUs receive; otherwise RPS off;
  - no IRQs: RPS of queue q -> target q % T, so a queue is processed on one
    CPU (what the queue policy lines up with); fewer queues than targets:
    as above, the targets j with j % queues == q;
  - XPS (multi-queue only): tx queue q <- the targets j with j % txqs == q.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Optional

from .. import cpulist as _cpulist
from .model import Nic, Topology, Worker


def cpulist(cpus) -> str:
    return _cpulist.format(cpus) or "none (off)"


def mask(cpus) -> str:
    return format(sum(1 << c for c in set(cpus)), "x")


@dataclass
class Change:
    path: str
    old: str                        # the value as read (written back by --restore)
    new: str
    what: str                       # in words: "IRQ 38 (virtio2-input.0): CPU 0-1 -> 0"
    cmd: Optional[str] = None       # the shell command, when it is not an echo into a file

    @property
    def command(self) -> str:
        return self.cmd or f"echo {self.new} > {shlex.quote(self.path)}"


@dataclass
class QueueView:
    queue: int
    irq: Optional[int]
    irq_cpus: Optional[list[int]]   # where its IRQ may fire (effective affinity if known)
    rps: Optional[list[int]]
    receives_on: Optional[list[int]]   # None: the sending CPU (no IRQ, no RPS)
    worker_slots: list[int] = field(default_factory=list)   # workers pinned on those CPUs


@dataclass
class Verdict:
    interface: str
    queues: list[QueueView]
    receiving_cpus: Optional[list[int]]     # None: whichever CPU sends (virtual device)
    targets: list[int]                      # CPUs the plan spreads the queues over
    findings: list[str]
    changes: list[Change]
    run_command: Optional[str]              # how to start workers that line up
    aligned: bool

    def commands(self) -> list[str]:
        return [c.command for c in self.changes]


def receive_cpus(nic: Nic) -> list[QueueView]:
    out = []
    for q in nic.rx:
        irq = nic.irq(q.irq)
        irq_cpus = None
        if irq:
            eff = irq.effective
            # effective outside the affinity: a move still pending (x86 MSI
            # makes it at the IRQ's next interrupt); the affinity is where it
            # fires from then on
            pending = eff and irq.affinity and not set(eff) <= set(irq.affinity)
            irq_cpus = irq.affinity if pending or not eff else eff
        on = q.rps_cpus if q.rps_cpus else irq_cpus
        out.append(QueueView(q.index, q.irq, irq_cpus, q.rps_cpus, on))
    return out


def targets_for(topo: Topology, workers: Optional[list[Worker]]) -> list[int]:
    """The CPUs to receive on: the CPU of each pinned worker in slot order,
    else every online CPU."""
    if workers:
        cpus: list[int] = []
        for w in sorted(workers, key=lambda w: w.slot):
            if len(w.cpus) == 1 and w.cpus[0] not in cpus:
                cpus.append(w.cpus[0])
        if cpus:
            return cpus
    return list(topo.cpus)


def plan(nic: Nic, targets: list[int]) -> list[Change]:
    """The masks to write so that the queues spread over `targets`, each
    queue on fixed CPUs; only those that differ from now."""
    if nic.kind == "loopback" or not targets:
        return []
    changes: list[Change] = []
    t = len(targets)
    nq = max(len(nic.rx), 1)
    has_irqs = any(q.irq is not None for q in nic.rx)
    base = f"/sys/class/net/{nic.name}/queues"
    for q in nic.rx:
        if has_irqs:
            irq = nic.irq(q.irq)
            if irq is not None:
                want = [targets[q.index % t]]
                if sorted(irq.affinity) != want:
                    changes.append(Change(
                        f"/proc/irq/{irq.number}/smp_affinity_list", cpulist(irq.affinity),
                        cpulist(want), f"IRQ {irq.number} ({irq.name}) of rx queue {q.index}: "
                        f"CPU {cpulist(irq.affinity)} -> {cpulist(want)}"))
            rps = [c for j, c in enumerate(targets) if j % nq == q.index] if nq < t else []
        else:           # no IRQ: RPS alone decides where the queue is processed
            rps = [c for j, c in enumerate(targets) if j % nq == q.index] if nq < t \
                else [targets[q.index % t]]
        if q.rps_cpus is not None and sorted(q.rps_cpus) != sorted(rps):
            changes.append(Change(f"{base}/rx-{q.index}/rps_cpus", mask(q.rps_cpus), mask(rps),
                                  f"RPS of rx queue {q.index}: CPU {cpulist(q.rps_cpus)} -> "
                                  f"{cpulist(rps)}"))
    ntx = len(nic.tx)
    if ntx > 1:
        for q in nic.tx:
            xps = [c for j, c in enumerate(targets) if j % ntx == q.index]
            if q.xps_cpus is not None and sorted(q.xps_cpus) != sorted(xps):
                changes.append(Change(f"{base}/tx-{q.index}/xps_cpus", mask(q.xps_cpus),
                                      mask(xps), f"XPS of tx queue {q.index}: CPU "
                                      f"{cpulist(q.xps_cpus)} -> {cpulist(xps)}"))
    return changes


def rss_change(nic: Nic, weights: list[int]) -> Optional[Change]:
    """The indirection table `ethtool -X IF weight W0 W1 ...` would write,
    as a change (None when the table is already that)."""
    from ..kernel.nic import INDIR_PATH, weights_table
    old = nic.rss.indirection
    if not old:
        return None
    new = weights_table(len(old), weights)
    if new == old:
        return None
    shares = ", ".join(f"queue {q} {new.count(q)}/{len(new)}" for q in sorted(set(new)))
    return Change(INDIR_PATH.format(nic.name), ",".join(map(str, old)), ",".join(map(str, new)),
                  f"RSS indirection table of {nic.name}: {shares}",
                  cmd=f"ethtool -X {nic.name} weight {' '.join(map(str, weights))}")


def judge(nic: Nic, topo: Topology, workers: Optional[list[Worker]] = None,
          targets: Optional[list[int]] = None,
          rss_weights: Optional[list[int]] = None) -> Verdict:
    """targets: the CPUs to spread the queues over (default: the workers',
    else every online CPU); rss_weights: also set the RSS indirection table
    to these queue weights (as `ethtool -X IF weight ...`)."""
    queues = receive_cpus(nic)
    findings: list[str] = []
    virtual = all(q.receives_on is None for q in queues)
    receiving = None if virtual else sorted({c for q in queues for c in (q.receives_on or [])})

    by_cpu: dict[int, list[int]] = {}
    for w in workers or []:
        if len(w.cpus) == 1:
            by_cpu.setdefault(w.cpus[0], []).append(w.slot)
    for q in queues:
        q.worker_slots = sorted(s for c in (q.receives_on or []) for s in by_cpu.get(c, []))

    if nic.kind == "loopback":
        findings.append("loopback: every packet is received on the CPU that sent it; there "
                        "are no queues to pin.")
    elif virtual:
        findings.append(f"{nic.name} has no IRQs ({nic.kind}): a packet is received on the CPU "
                        f"that sent it unless RPS moves it: RPS hashes each flow of a queue "
                        f"to one CPU of that queue's mask, so the masks decide which CPUs "
                        f"(and so which workers, with policy cpu) receive.")
    else:
        fired = sorted({c for i in nic.irqs if i.role in ("rx", "combined")
                        for c, n in enumerate(i.counts) if n})
        findings.append(f"{nic.name} traffic is received on CPU {cpulist(receiving)}"
                        + (f" (its queue IRQs have fired on CPU {cpulist(fired)})" if fired
                           else "") + ".")
        idle = [c for c in topo.cpus if c not in receiving]
        if idle:
            findings.append(f"CPU {cpulist(idle)} receive{'s' if len(idle) == 1 else ''} "
                            f"nothing from {nic.name}: with policy cpu, workers pinned there "
                            f"get no traffic.")
    if len(nic.rx) == 1 and len(topo.cpus) > 1 and nic.kind != "loopback":
        findings.append(f"{nic.name} has one receive queue for {len(topo.cpus)} CPUs: only RPS "
                        f"can spread its receive processing.")
    if nic.rss.missing and nic.kind != "loopback":
        findings.append(f"RSS: {nic.rss.missing}.")

    aligned = True
    if workers:
        loose = [w for w in workers if len(w.cpus) != 1]
        if loose:
            aligned = False
            findings.append("worker" + ("s " if len(loose) > 1 else " ")
                            + ", ".join(f"{w.slot} (pid {w.pid}, CPU {cpulist(w.cpus)})"
                                        for w in loose)
                            + " may run on several CPUs: pin them (run --cpus).")
        pinned = sorted(by_cpu)
        if receiving is not None:
            off = [c for c in receiving if c not in by_cpu]
            if off:
                aligned = False
                findings.append(f"CPU {cpulist(off)} receives traffic but runs no worker: its "
                                f"connections wake a worker on another CPU.")
            dry = [c for c in pinned if c not in receiving]
            if dry:
                aligned = False
                slots = [s for c in dry for s in by_cpu[c]]
                findings.append(f"worker{'s' if len(slots) > 1 else ''} "
                                f"{', '.join(map(str, slots))} on CPU {cpulist(dry)} "
                                f"{'are' if len(slots) > 1 else 'is'} where no traffic is "
                                f"received: with policy cpu "
                                f"{'they get' if len(slots) > 1 else 'it gets'} none.")
        if aligned and pinned and receiving is not None:
            findings.append(f"the workers are pinned to CPU {cpulist(pinned)}, where "
                            f"{nic.name} traffic is received: they line up.")
        elif aligned and pinned:
            findings.append(f"the workers are pinned to CPU {cpulist(pinned)}; {nic.name} "
                            f"traffic is received on the sending CPU (or its RPS CPUs), so "
                            f"with policy cpu a sender on CPU c reaches the worker on CPU c.")

    targets = targets or targets_for(topo, workers)
    changes = plan(nic, targets)
    if rss_weights:
        c = rss_change(nic, rss_weights)
        if c is not None:
            changes.append(c)
    if changes:
        aligned = False
    run = None
    if not workers or not aligned:
        cpus = "auto" if targets == list(range(len(targets))) else ",".join(map(str, targets))
        run = (f"reuseport-ctl run --workers {len(targets)} --cpus {cpus} "
               f"--policy {'queue' if len(nic.rx) > 1 else 'cpu'}")
    return Verdict(nic.name, queues, receiving, targets, findings, changes, run, aligned)
