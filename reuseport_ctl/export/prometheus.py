"""`watch --prometheus [ADDR:]PORT`: the latest frame as Prometheus metrics,
served by prometheus_client's own HTTP server (a daemon thread) from a
registry of our own, with one custom collector: a scrape renders the frame
the watch last computed, so it never touches the kernel itself.

Names follow the Prometheus conventions: prefix reuseport_ctl_, counters end
in _total (totals since the watch began), base units (seconds), labels
port, proto and, per row, what the row is. A member socket's series are the
socket's: worker (its slot, which stays with the socket for the watch) and
inode, and no pid -- its counts are the socket's, so a worker respawned on
the socket it inherited continues the series instead of starting a new one
at the socket's total; reuseport_ctl_worker_process{worker, inode, pid,
tids} 1 says which process (and threads) serves it now. A process on a
listener shared without SO_REUSEPORT and a dispatcher's child are processes:
worker (the lowest slot it serves, or "child") and pid, inode empty. (An
empty label is no label to Prometheus.) The metric list, a sample scrape
and recording rules are in docs/watch.md.
"""
from __future__ import annotations

import ipaddress
import math
import threading
from typing import Iterator, Optional

from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    InfoMetricFamily, Metric)
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from ..closing import Closing
from ..errors import UserError
from ..stats.live import Frame, GroupInfo, rx_by

DEFAULT_ADDR = "127.0.0.1"
GROUP_LABELS = ["port", "proto"]
WORKER_LABELS = ["port", "proto", "worker", "inode", "pid", "tids"]

# name (without _total for counters), kind, help, the row attribute
WORKER_METRICS = (
    ("reuseport_ctl_worker_accepts", "counter",
     "Connections (TCP) or datagrams (UDP) queued to this worker's socket since the "
     "watch began (data-ready events on its listener; those not taken yet are in its "
     "queue_len), for reuseport-ctl run groups the worker's own accept count.",
     "accepts"),
    ("reuseport_ctl_worker_data_ready", "counter",
     "Data-ready events (sock_def_readable) on the listener sockets this worker serves.",
     "data_ready"),
    ("reuseport_ctl_worker_wakeups", "counter",
     "Wakeups of this worker's process caused by a data-ready on a listener of the port.",
     "wakeups"),
    ("reuseport_ctl_worker_spurious_wakeups", "counter",
     "Wakeups that found nothing to do: accept() (TCP) or recvfrom() (UDP) returned EAGAIN.",
     "spurious_wakeups"),
    ("reuseport_ctl_worker_cpu_seconds", "counter",
     "User plus system CPU time of the worker process since it started.", "cpu_seconds"),
    ("reuseport_ctl_worker_queue_length", "gauge",
     "TCP: connections waiting in the worker's accept queue; UDP: bytes in its receive queue.",
     "queue_len"),
    ("reuseport_ctl_worker_share_ratio", "gauge",
     "This worker's share (0-1) of the group's accepts since the watch began.", "share"),
    ("reuseport_ctl_worker_connections", "gauge",
     "Dispatcher groups: the port's connections this process holds now (its fd table).",
     "conns"),
    ("reuseport_ctl_worker_live_connections", "gauge",
     "TCP connections ESTABLISHED now whose listener is this member's socket, counted in "
     "the kernel (inet_sock_set_state) from the moment the watch attached.", "live"),
    ("reuseport_ctl_worker_drops", "counter",
     "Dropped on this worker's socket since the watch began (sk_drops): TCP handshakes "
     "lost to a full accept queue, UDP datagrams lost to a full receive buffer.", "drops"),
    ("reuseport_ctl_worker_stuck", "gauge",
     "1 while connections (datagrams) queue for this worker and it takes none, or its "
     "process is stopped.", "stuck"),
)

# where connections arrived, per member: name, field (stats/live.RX_FIELDS), label, help.
# A value the kernel did not record (no NAPI id on loopback/veth) has no series.
RX_METRICS = (
    ("reuseport_ctl_worker_rx_cpu", "cpu", "cpu",
     "Connections (TCP: SO_INCOMING_CPU of each) or datagrams (UDP) to this member by "
     "the CPU that received them, counted in the kernel since the watch began."),
    ("reuseport_ctl_worker_rx_napi", "napi_id", "napi_id",
     "TCP connections to this member by the NAPI id they arrived through "
     "(SO_INCOMING_NAPI_ID; one per receive queue of a NAPI driver)."),
    ("reuseport_ctl_worker_rx_queue", "rx_queue", "queue",
     "TCP connections to this member by the receive queue they arrived on "
     "(sk_rx_queue_mapping; only on kernels with CONFIG_SOCK_RX_QUEUE_MAPPING)."),
)


def parse_listen(spec: str) -> tuple[str, int]:
    """'9101', '127.0.0.1:9101', '[::1]:9101', '0.0.0.0:9101' -> (addr, port)."""
    s = spec.strip()
    addr, port_s = DEFAULT_ADDR, s
    if s.startswith("["):
        host, sep, port_s = s[1:].partition("]:")
        if not sep:
            raise UserError(f"--prometheus takes [ADDR:]PORT, e.g. 9101 or [::1]:9101, "
                            f"not {spec!r}.")
        addr = host
    elif ":" in s:
        addr, _, port_s = s.rpartition(":")
        addr = addr or DEFAULT_ADDR
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
        ipaddress.ip_address(addr)
    except ValueError:
        raise UserError(f"--prometheus takes [ADDR:]PORT with an IP address and a port "
                        f"0-65535, e.g. 9101 or 127.0.0.1:9101, not {spec!r}.") from None
    return addr, port


class FrameCollector(Collector):
    """Renders the latest frame; update() swaps it in (one reference, atomic)."""

    def __init__(self):
        self._latest: Optional[tuple[Frame, GroupInfo]] = None
        self._lock = threading.Lock()

    def update(self, frame: Frame, group: GroupInfo) -> None:
        with self._lock:
            self._latest = (frame, group)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            latest = self._latest
        if latest is None:
            return
        frame, group = latest
        g = [str(group.port), group.proto]
        info = InfoMetricFamily(
            "reuseport_ctl_group", "The watched group: its policy and the probes in use.",
            labels=GROUP_LABELS)
        info.add_metric(g, {"policy": group.policy, "lookup_strategy": group.lookup_strategy,
                            "data_ready_strategy": group.data_ready_strategy,
                            "wakeups_strategy": group.wakeups_strategy,
                            "kernel": group.kernel, "addr": group.addr,
                            "dispatcher": str(frame.dispatcher).lower()})
        yield info
        yield _gauge("reuseport_ctl_group_workers", "Rows the kernel chooses among now: member "
                     "sockets (processes on a listener shared without SO_REUSEPORT).",
                     g, sum(1 for r in frame.rows if not r.child))
        yield _gauge("reuseport_ctl_listening", "1 while something listens on the port.",
                     g, int(frame.listening))
        if group.policy != "kernel" and not group.own:
            yield _gauge("reuseport_ctl_policy_in_force", "1 while every member of the group "
                         "is in the pinned policy's table and every slot has its socket.",
                         g, int(frame.policy_note is None))
        for name, help_, value in (
                ("reuseport_ctl_lookups", "Listener lookups for the port (one per SYN or "
                 "unconnected datagram) since the watch began.", frame.lookups),
                ("reuseport_ctl_data_ready", "Data-ready events on every listener of the "
                 "port since the watch began.", frame.data_ready),
                ("reuseport_ctl_wakeups", "Worker wakeups caused by those data-ready events "
                 "since the watch began.", frame.wakeups)):
            if value is not None:
                c = CounterMetricFamily(name, help_, labels=GROUP_LABELS)
                c.add_metric(g, value)
                yield c
        if frame.jain is not None:          # None: the workers' accepts are not counted
            yield _gauge("reuseport_ctl_jain_index", "Jain's fairness index of the workers' "
                         "accepts since the watch began (1: equal, 1/n: one took all).",
                         g, frame.jain)
        if frame.max_min_ratio is not None:
            yield _gauge("reuseport_ctl_max_min_ratio", "Busiest worker's accepts over the "
                         "idlest's since the watch began (+Inf: one got none).", g,
                         frame.max_min_ratio)
        proc = GaugeMetricFamily(
            "reuseport_ctl_worker_process", "1 per row: the process (pid) and threads (tids) "
            "serving it now; for a member socket, the join from its series (worker, inode) "
            "to the pid, which changes when another process takes the socket over.",
            labels=WORKER_LABELS)
        for r in frame.rows:
            proc.add_metric([*g, *row_labels(r)[:2], str(r.pid), ",".join(map(str, r.tids))], 1)
        yield proc
        for name, kind, help_, attr in WORKER_METRICS:
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, help_, labels=WORKER_LABELS)
            for r in frame.rows:
                v = getattr(r, attr)
                if isinstance(v, bool):
                    v = int(v)
                if v is not None:
                    fam.add_metric([*g, *row_labels(r)], v)
            yield fam
        for name, field, label, help_ in RX_METRICS:
            fam = CounterMetricFamily(name, help_, labels=[*WORKER_LABELS, label])
            for r in frame.rows:
                for value, n in (rx_by(r.rx, field, frame.rx_unknown) or {}).items():
                    fam.add_metric([*g, *row_labels(r), str(value)], n)
            yield fam


def row_labels(r) -> list[str]:
    """worker, inode, pid, tids of a row's series: a member socket is its
    slot and inode (the socket's counts, whichever process serves it); a
    process row (shared listener, dispatcher child) its slot or "child" and pid."""
    if r.inode is not None:
        return [str(r.slot), str(r.inode), "", ""]
    return ["child" if r.child else str(r.slot), "", str(r.pid), ",".join(map(str, r.tids))]


def _gauge(name: str, help_: str, labels: list[str], value: float) -> GaugeMetricFamily:
    m = GaugeMetricFamily(name, help_, labels=GROUP_LABELS)
    m.add_metric(labels, math.inf if math.isinf(value) else value)
    return m


class Exporter(Closing):
    """The HTTP endpoint; close() stops the server thread and frees the port."""

    def __init__(self, addr: str, port: int):
        self.collector = FrameCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        try:
            self._httpd, self._thread = start_http_server(port, addr, registry=self.registry)
        except OSError as e:
            raise UserError(f"cannot serve Prometheus metrics on {_endpoint(addr, port)}: "
                            f"{e.strerror or e}.") from None
        self.addr, self.port = addr, self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{_endpoint(self.addr, self.port)}/metrics"

    def update(self, frame: Frame, group: GroupInfo) -> None:
        self.collector.update(frame, group)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
