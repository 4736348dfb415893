"""The NIC model the verdict works on: what kernel/nic.py reads (the plain
data of kernel/nicinfo.py, re-exported here) and the workers' CPUs.

Nothing here talks to the kernel; verdict.py turns these into advice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..kernel.nicinfo import Channels, Irq, Nic, Rss, RxQueue, Topology, TxQueue

__all__ = ["Channels", "Irq", "Nic", "Rss", "RxQueue", "Topology", "TxQueue", "Worker",
           "to_dict"]


@dataclass
class Worker:
    slot: int
    pid: int
    cpus: list[int]                 # its CPU affinity


def to_dict(obj) -> dict:
    d = asdict(obj)
    if isinstance(obj, Topology):
        d["node_of"] = {str(k): v for k, v in obj.node_of.items()}
        d["nodes"] = {str(k): v for k, v in obj.nodes.items()}
    return d
