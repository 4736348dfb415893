"""Plain data about a network interface's receive path, as kernel/nic.py
reads it: queues, their IRQs and CPU masks, RSS, and the CPU -> NUMA map.

It lives beside its reader so the kernel layer imports nothing above it;
nic/model.py adds the tool's own view (workers) and re-exports these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Irq:
    number: int
    name: str                       # the last column of /proc/interrupts
    affinity: list[int]             # /proc/irq/N/smp_affinity_list
    effective: Optional[list[int]]  # effective_affinity_list (where it really fires), if exposed
    counts: list[int]               # interrupts per CPU (/proc/interrupts)
    role: str = "other"             # rx | tx | combined | other
    queue: Optional[int] = None     # the queue it serves, from its name


@dataclass
class RxQueue:
    index: int
    rps_cpus: Optional[list[int]]   # None: the file is not there (no CONFIG_RPS)
    irq: Optional[int] = None
    packets: Optional[int] = None   # per-queue counter from ethtool stats, if exposed


@dataclass
class TxQueue:
    index: int
    xps_cpus: Optional[list[int]]   # None: not exposed (single-queue devices hide it)
    irq: Optional[int] = None
    packets: Optional[int] = None


@dataclass
class Channels:
    rx: int = 0
    tx: int = 0
    other: int = 0
    combined: int = 0
    rx_max: int = 0
    tx_max: int = 0
    other_max: int = 0
    combined_max: int = 0


@dataclass
class Rss:
    indirection: Optional[list[int]] = None   # entry -> rx queue
    key: Optional[str] = None                 # hex
    hfunc: Optional[str] = None               # toeplitz, xor, crc32
    fields: dict[str, list[str]] = field(default_factory=dict)   # flow type -> hashed fields
    missing: Optional[str] = None             # why there is no table, in words


@dataclass
class Nic:
    name: str
    ifindex: int
    kind: str                       # "veth", "loopback", "device" ...
    driver: Optional[str]
    bus_info: Optional[str]
    speed_mbps: Optional[int]
    operstate: str
    num_rx_queues: int              # IFLA_NUM_RX_QUEUES
    num_tx_queues: int
    real_rx_queues: int             # what is in use (/sys/class/net/IF/queues)
    real_tx_queues: int
    channels: Optional[Channels]
    rss: Rss
    rx: list[RxQueue]
    tx: list[TxQueue]
    irqs: list[Irq]                 # every IRQ of the device, queue IRQs first
    notes: list[str] = field(default_factory=list)   # what could not be read, and why

    def irq(self, number: Optional[int]) -> Optional[Irq]:
        return next((i for i in self.irqs if i.number == number), None)


@dataclass
class Topology:
    cpus: list[int]                 # online CPUs
    node_of: dict[int, int]         # CPU -> NUMA node

    @property
    def nodes(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for cpu in self.cpus:
            out.setdefault(self.node_of.get(cpu, 0), []).append(cpu)
        return out
