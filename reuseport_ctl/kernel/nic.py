"""What the kernel says about a network interface's queues: ethtool over
generic netlink (channels, link speed, RSS; pyroute2's NlEthtool lacks the
first and the last, so their messages are declared here), the ioctl
SIOCETHTOOL where netlink has nothing (driver name, per-queue stats, RSS on
kernels without ETHTOOL_MSG_RSS_GET), IRQs from /proc/interrupts and the
device's msi_irqs, and the CPU masks in /proc/irq and /sys/class/net.

Also the only writer of those masks (nic --apply / --restore).

sysfs shows the network devices of the namespace that mounted it, not of
the reader: inside another network namespace (a test's, or one entered with
nsenter) /sys/class/net is the host's. private_sysfs() does what `ip netns
exec` does: a private mount namespace with a fresh sysfs, for this process.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
from pathlib import Path
from typing import Optional

from .. import cpulist
from ..errors import UserError
from .nicinfo import Channels, Irq, Nic, Rss, RxQueue, Topology, TxQueue

SYS_NET = Path("/sys/class/net")
SYS_NODE = Path("/sys/devices/system/node")
PROC_IRQ = Path("/proc/irq")

# --- CPU lists and masks ------------------------------------------------------


parse_cpulist = cpulist.parse
format_cpulist = cpulist.format


def parse_mask(text: str) -> list[int]:
    """A sysfs CPU mask ('00000000,00000003') -> [0, 1]."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return [b for b in range(value.bit_length()) if value >> b & 1]


def format_mask(cpus) -> str:
    """[0, 1] -> '3' (what rps_cpus / xps_cpus accept)."""
    return format(sum(1 << c for c in set(cpus)), "x")


# --- topology -----------------------------------------------------------------


def online_cpus() -> list[int]:
    try:
        return parse_cpulist(Path("/sys/devices/system/cpu/online").read_text())
    except OSError:
        return list(range(os.cpu_count() or 1))


def cpu_nodes() -> dict[int, int]:
    """CPU -> NUMA node, from /sys/devices/system/node/nodeN/cpulist; every
    CPU on node 0 when the kernel has no NUMA."""
    out: dict[int, int] = {}
    for d in sorted(SYS_NODE.glob("node[0-9]*")):
        try:
            for cpu in parse_cpulist((d / "cpulist").read_text()):
                out[cpu] = int(d.name[4:])
        except (OSError, ValueError):
            continue
    for cpu in online_cpus():
        out.setdefault(cpu, 0)
    return out


def topology() -> Topology:
    return Topology(cpus=online_cpus(), node_of=cpu_nodes())


# --- sysfs of this network namespace -----------------------------------------

CLONE_NEWNS = 0x00020000
MS_REC, MS_SLAVE, MNT_DETACH = 0x4000, 1 << 19, 2
_libc = ctypes.CDLL(None, use_errno=True)


def netns_links() -> list[str]:
    """Interface names of this process's network namespace (/proc/self/net
    follows the namespace; /sys/class/net may not)."""
    names = []
    with open("/proc/self/net/dev") as f:
        for line in f.readlines()[2:]:
            names.append(line.split(":", 1)[0].strip())
    return names


def private_sysfs() -> None:
    """Make /sys/class/net show this network namespace, as `ip netns exec`
    does: a private mount namespace for this process, a fresh sysfs on /sys.
    Nothing to do when it already does."""
    if set(netns_links()) <= set(os.listdir(SYS_NET)):
        return
    if _libc.unshare(CLONE_NEWNS) != 0 \
            or _libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        err = ctypes.get_errno()
        raise UserError(f"/sys shows another network namespace's devices and this process "
                        f"cannot mount its own sysfs ({os.strerror(err)}): run it as root, "
                        f"or through `ip netns exec`.")
    _libc.umount2(b"/sys", MNT_DETACH)
    if _libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None) != 0:
        err = ctypes.get_errno()
        raise UserError(f"cannot mount a sysfs for this network namespace ({os.strerror(err)}).")


# --- generic netlink: ethtool channels, link modes and RSS --------------------

ETHTOOL_MSG_LINKMODES_GET = 4
ETHTOOL_MSG_CHANNELS_GET = 17
ETHTOOL_MSG_RSS_GET = 38
HFUNCS = {1: "toeplitz", 2: "xor", 4: "crc32"}      # ETH_RSS_HASH_* bits
RXH = [(1 << 1, "l2da"), (1 << 2, "vlan"), (1 << 3, "l3proto"), (1 << 4, "ip-src"),
       (1 << 5, "ip-dst"), (1 << 6, "l4-0-1 (src port)"), (1 << 7, "l4-2-3 (dst port)"),
       (1 << 8, "gtp-teid"), (1 << 9, "ip6-flowlabel")]
FLOWS = {"tcp4": (4, 0x01), "udp4": (6, 0x02), "tcp6": (5, 0x05), "udp6": (7, 0x06)}


def _genl_classes():
    from pyroute2.netlink import genlmsg, nla
    from pyroute2.netlink.generic.ethtool import ethtool_linkmode_msg
    from pyroute2.netlink.generic.ethtool import ethtoolheader as _header

    class channels_msg(genlmsg):
        nla_map = (("ETHTOOL_A_CHANNELS_UNSPEC", "none"),
                   ("ETHTOOL_A_CHANNELS_HEADER", "ethtoolheader"),
                   ("ETHTOOL_A_CHANNELS_RX_MAX", "uint32"),
                   ("ETHTOOL_A_CHANNELS_TX_MAX", "uint32"),
                   ("ETHTOOL_A_CHANNELS_OTHER_MAX", "uint32"),
                   ("ETHTOOL_A_CHANNELS_COMBINED_MAX", "uint32"),
                   ("ETHTOOL_A_CHANNELS_RX_COUNT", "uint32"),
                   ("ETHTOOL_A_CHANNELS_TX_COUNT", "uint32"),
                   ("ETHTOOL_A_CHANNELS_OTHER_COUNT", "uint32"),
                   ("ETHTOOL_A_CHANNELS_COMBINED_COUNT", "uint32"))
        ethtoolheader = _header

    class rss_msg(genlmsg):
        nla_map = (("ETHTOOL_A_RSS_UNSPEC", "none"),
                   ("ETHTOOL_A_RSS_HEADER", "ethtoolheader"),
                   ("ETHTOOL_A_RSS_CONTEXT", "uint32"),
                   ("ETHTOOL_A_RSS_HFUNC", "uint32"),
                   ("ETHTOOL_A_RSS_INDIR", "array(uint32)"),
                   ("ETHTOOL_A_RSS_HKEY", "array(uint8)"),
                   ("ETHTOOL_A_RSS_INPUT_XFRM", "uint32"),
                   ("ETHTOOL_A_RSS_START_CONTEXT", "uint32"),
                   ("ETHTOOL_A_RSS_FLOW_HASH", "flow_hash"))   # 6.17+
        ethtoolheader = _header

        class flow_hash(nla):
            # ETHTOOL_A_FLOW_*: NLA_UINT, u32 for these small masks
            nla_map = (("ETHTOOL_A_FLOW_UNSPEC", "none"), ("ether", "uint32"),
                       ("ip4", "uint32"), ("ip6", "uint32"), ("tcp4", "uint32"),
                       ("tcp6", "uint32"), ("udp4", "uint32"), ("udp6", "uint32"))

    return {ETHTOOL_MSG_CHANNELS_GET: (channels_msg, "ETHTOOL_A_CHANNELS_HEADER"),
            ETHTOOL_MSG_RSS_GET: (rss_msg, "ETHTOOL_A_RSS_HEADER"),
            ETHTOOL_MSG_LINKMODES_GET: (ethtool_linkmode_msg, "ETHTOOL_A_LINKMODES_HEADER")}


def ethtool_get(cmd: int, ifname: str) -> dict:
    """One ethtool netlink GET for `ifname`: its attributes as a dict.
    OSError (errno) when the driver or kernel does not offer it."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    cls, header = _genl_classes()[cmd]
    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind("ethtool", cls)      # the reply is parsed as the bound class
        except NetlinkError as e:
            raise OSError(errno.EOPNOTSUPP, "no ethtool netlink family") from e
        msg = cls()
        msg["cmd"] = cmd
        msg["version"] = 1
        msg["attrs"].append((header, {"attrs": [["ETHTOOL_A_HEADER_DEV_NAME", ifname]]}))
        try:
            reply = list(sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST))
        except NetlinkError as e:
            raise OSError(e.code, os.strerror(e.code)) from None
    finally:
        sock.close()
    return {name: value for name, value, *_ in reply[0]["attrs"]} if reply else {}


def channels(ifname: str) -> Optional[Channels]:
    try:
        a = ethtool_get(ETHTOOL_MSG_CHANNELS_GET, ifname)
    except OSError:
        return None
    g = lambda k: a.get(f"ETHTOOL_A_CHANNELS_{k}", 0)        # noqa: E731
    return Channels(rx=g("RX_COUNT"), tx=g("TX_COUNT"), other=g("OTHER_COUNT"),
                    combined=g("COMBINED_COUNT"), rx_max=g("RX_MAX"), tx_max=g("TX_MAX"),
                    other_max=g("OTHER_MAX"), combined_max=g("COMBINED_MAX"))


def speed(ifname: str) -> Optional[int]:
    try:
        v = ethtool_get(ETHTOOL_MSG_LINKMODES_GET, ifname).get("ETHTOOL_A_LINKMODES_SPEED")
    except OSError:
        return None
    return None if v in (None, 0, 0xFFFFFFFF) else v


def rss(ifname: str) -> Rss:
    out = Rss()
    try:
        a = ethtool_get(ETHTOOL_MSG_RSS_GET, ifname)
    except OSError as e:
        a = None
        if e.errno != errno.EOPNOTSUPP:
            out.missing = f"ethtool RSS query failed ({e.strerror})"
            return out
    if a is None:                     # older kernel, or the driver has no get_rxfh
        a = _rss_ioctl(ifname)
        if a is None:
            out.missing = "the driver exposes no RSS (no ethtool get_rxfh)"
            return out
    indir = a.get("ETHTOOL_A_RSS_INDIR")
    key = a.get("ETHTOOL_A_RSS_HKEY")
    out.indirection = list(indir) if indir else None
    out.key = bytes(key).hex() if key else None
    hf = a.get("ETHTOOL_A_RSS_HFUNC")
    out.hfunc = next((n for b, n in HFUNCS.items() if hf and hf & b), None)
    fh = a.get("ETHTOOL_A_RSS_FLOW_HASH")
    if fh is not None:
        for name, value, *_ in fh["attrs"]:
            if name in FLOWS and value:
                out.fields[name] = _rxh(value)
    else:
        out.fields = _rxfh_ioctl(ifname)
    if not out.indirection:
        out.missing = ("the driver reports no RSS indirection table (a single receive "
                       "queue, or the device lacks RSS)")
    return out


def _rxh(bits: int) -> list[str]:
    return [n for b, n in RXH if bits & b]


# --- the SIOCETHTOOL ioctl ------------------------------------------------------

SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO, ETHTOOL_GRXFH, ETHTOOL_GRSSH, ETHTOOL_SRSSH = 0x03, 0x29, 0x46, 0x47


def _ethtool_ioctl(ifname: str, buf: ctypes.Array) -> None:
    ifr = struct.pack("16sP", ifname.encode()[:15], ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)


def drvinfo(ifname: str) -> tuple[Optional[str], Optional[str]]:
    """(driver, bus_info) from ETHTOOL_GDRVINFO."""
    buf = ctypes.create_string_buffer(struct.pack("=I", ETHTOOL_GDRVINFO), 196)
    try:
        _ethtool_ioctl(ifname, buf)
    except OSError:
        return None, None
    raw = buf.raw
    text = lambda off: raw[off:off + 32].split(b"\0")[0].decode(errors="replace") or None  # noqa
    return text(4), text(100)


def _rss_ioctl(ifname: str) -> Optional[dict]:
    """ETHTOOL_GRSSH (struct ethtool_rxfh): first the sizes, then the table
    and key; None when the driver has no RSS."""
    head = struct.Struct("=IIIIBB2xI")
    buf = ctypes.create_string_buffer(head.pack(ETHTOOL_GRSSH, 0, 0, 0, 0, 0, 0), head.size)
    try:
        _ethtool_ioctl(ifname, buf)
    except OSError:
        return None
    _, _, indir_size, key_size, hfunc, _, _ = head.unpack(buf.raw)
    buf = ctypes.create_string_buffer(
        head.pack(ETHTOOL_GRSSH, 0, indir_size, key_size, 0, 0, 0)
        + bytes(4 * indir_size + key_size))
    try:
        _ethtool_ioctl(ifname, buf)
    except OSError:
        return None
    _, _, indir_size, key_size, hfunc, _, _ = head.unpack(buf.raw[:head.size])
    body = buf.raw[head.size:]
    return {"ETHTOOL_A_RSS_HFUNC": hfunc,
            "ETHTOOL_A_RSS_INDIR": list(struct.unpack(f"={indir_size}I", body[:4 * indir_size])),
            "ETHTOOL_A_RSS_HKEY": body[4 * indir_size:4 * indir_size + key_size]}


def set_indirection(ifname: str, table: list[int]) -> None:
    """Write the RSS indirection table (ETHTOOL_SRSSH, what `ethtool -X`
    does), keeping the key and hash function. OSError if the driver refuses."""
    head = struct.Struct("=IIIIBB2xI")
    buf = ctypes.create_string_buffer(
        head.pack(ETHTOOL_SRSSH, 0, len(table), 0, 0, 0, 0)
        + struct.pack(f"={len(table)}I", *table))
    _ethtool_ioctl(ifname, buf)


def indirection(ifname: str) -> Optional[list[int]]:
    """The RSS indirection table as the driver reports it (ETHTOOL_GRSSH)."""
    a = _rss_ioctl(ifname)
    return list(a["ETHTOOL_A_RSS_INDIR"]) if a and a["ETHTOOL_A_RSS_INDIR"] else None


def weights_table(size: int, weights: list[int]) -> list[int]:
    """The table `ethtool -X IF weight W0 W1 ...` writes (ethtool's own loop:
    entry i goes to queue j while i < size * (W0 + ... + Wj) / sum)."""
    total = sum(weights)
    out, j, partial = [], -1, 0
    for i in range(size):
        while i >= size * partial // total:
            j += 1
            partial += weights[j]
        out.append(j)
    return out


def _rxfh_ioctl(ifname: str) -> dict[str, list[str]]:
    """ETHTOOL_GRXFH per flow type: which header fields RSS hashes."""
    out = {}
    for name, (_, flow_type) in FLOWS.items():
        buf = ctypes.create_string_buffer(struct.pack("=IIQ", ETHTOOL_GRXFH, flow_type, 0), 256)
        try:
            _ethtool_ioctl(ifname, buf)
        except OSError:
            continue
        bits = struct.unpack_from("=IIQ", buf.raw)[2]
        if bits:
            out[name] = _rxh(bits)
    return out


_QSTAT = [re.compile(p) for p in (
    r"^(rx|tx)_queue_(\d+)_packets$",           # virtio_net, many others
    r"^(rx|tx)_queue_(\d+)_xdp_packets$",       # veth (counts its NAPI path only)
    r"^(rx|tx)(\d+)_packets$",                  # mlx5
    r"^queue_(\d+)_(rx|tx)_packets$",           # ena
    r"^(rx|tx)-(\d+)\.packets$",                # ixgbe, i40e
)]


def queue_packets(ifname: str) -> dict[tuple[str, int], int]:
    """Per-queue packet counters from the driver's ethtool statistics."""
    try:
        from pyroute2.ethtool.ioctl import IoctlEthtool
        io = IoctlEthtool(ifname)
        try:
            stats = io.get_statistics()
        finally:
            io.close()
    except Exception:
        return {}
    out: dict[tuple[str, int], int] = {}
    for name, value in stats:
        for pat in _QSTAT:
            m = pat.match(name)
            if m:
                a, b = m.groups()
                direction, q = (a, int(b)) if a in ("rx", "tx") else (b, int(a))
                out.setdefault((direction, q), value)
                break
    return out


# --- netdev netlink: the driver's per-queue counters (qstats, Linux 6.9+) ---------

NETDEV_CMD_QUEUE_GET, NETDEV_CMD_QSTATS_GET = 10, 12
NETDEV_QSTATS_SCOPE_QUEUE = 1


def _netdev_classes():
    from pyroute2.netlink import genlmsg

    class qstats_msg(genlmsg):
        # NLA_UINT counters (4 or 8 bytes): kept raw, read as little endian
        nla_map = ((0, "NETDEV_A_QSTATS_UNSPEC", "none"),
                   (1, "NETDEV_A_QSTATS_IFINDEX", "uint32"),
                   (2, "NETDEV_A_QSTATS_QUEUE_TYPE", "uint32"),
                   (3, "NETDEV_A_QSTATS_QUEUE_ID", "uint32"),
                   (4, "NETDEV_A_QSTATS_SCOPE", "cdata"),
                   (8, "NETDEV_A_QSTATS_RX_PACKETS", "cdata"),
                   (9, "NETDEV_A_QSTATS_RX_BYTES", "cdata"),
                   (10, "NETDEV_A_QSTATS_TX_PACKETS", "cdata"),
                   (11, "NETDEV_A_QSTATS_TX_BYTES", "cdata"))

    class queue_msg(genlmsg):
        nla_map = ((0, "NETDEV_A_QUEUE_UNSPEC", "none"),
                   (1, "NETDEV_A_QUEUE_ID", "uint32"),
                   (2, "NETDEV_A_QUEUE_IFINDEX", "uint32"),
                   (3, "NETDEV_A_QUEUE_TYPE", "uint32"),
                   (4, "NETDEV_A_QUEUE_NAPI_ID", "uint32"))

    return qstats_msg, queue_msg


def _netdev_dump(cmd: int, attrs: list) -> list[dict]:
    from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.generic import GenericNetlinkSocket

    qstats_msg, queue_msg = _netdev_classes()
    cls = qstats_msg if cmd == NETDEV_CMD_QSTATS_GET else queue_msg
    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind("netdev", cls)
        except NetlinkError as e:
            raise OSError(errno.EOPNOTSUPP, "no netdev netlink family") from e
        msg = cls()
        msg["cmd"] = cmd
        msg["version"] = 1
        msg["attrs"] = attrs
        try:
            reply = list(sock.nlm_request(msg, msg_type=sock.prid,
                                          msg_flags=NLM_F_REQUEST | NLM_F_DUMP))
        except NetlinkError as e:
            raise OSError(e.code, os.strerror(e.code)) from None
    finally:
        sock.close()
    return [{name: value for name, value, *_ in r["attrs"]} for r in reply]


def _uint(v) -> int:
    return int.from_bytes(v, "little") if isinstance(v, (bytes, bytearray)) else int(v)


def qstats(ifindex: int) -> dict[tuple[str, int], int]:
    """(direction, queue) -> packets, from the driver's per-queue counters in
    netdev netlink (NETDEV_CMD_QSTATS_GET, scope queue; Linux 6.9+): where
    virtio_net keeps its per-queue packet counts since 6.10 (no longer in
    ethtool -S). {} where the kernel or driver has none."""
    try:
        rows = _netdev_dump(NETDEV_CMD_QSTATS_GET,
                            [("NETDEV_A_QSTATS_IFINDEX", ifindex),
                             ("NETDEV_A_QSTATS_SCOPE", struct.pack("=I", NETDEV_QSTATS_SCOPE_QUEUE))])
    except OSError:
        return {}
    out = {}
    for r in rows:
        if r.get("NETDEV_A_QSTATS_IFINDEX") != ifindex:
            continue
        kind = "rx" if r.get("NETDEV_A_QSTATS_QUEUE_TYPE") == 0 else "tx"
        v = r.get(f"NETDEV_A_QSTATS_{kind.upper()}_PACKETS")
        if v is not None:
            out[(kind, r["NETDEV_A_QSTATS_QUEUE_ID"])] = _uint(v)
    return out


def queue_napi_ids(ifindex: int) -> dict[int, int]:
    """rx queue -> NAPI id, where the driver publishes it (NETDEV_CMD_QUEUE_GET;
    virtio_net only from 6.15). {} otherwise."""
    try:
        rows = _netdev_dump(NETDEV_CMD_QUEUE_GET, [("NETDEV_A_QUEUE_IFINDEX", ifindex)])
    except OSError:
        return {}
    return {r["NETDEV_A_QUEUE_ID"]: r["NETDEV_A_QUEUE_NAPI_ID"] for r in rows
            if r.get("NETDEV_A_QUEUE_TYPE") == 0 and r.get("NETDEV_A_QUEUE_NAPI_ID")
            and r.get("NETDEV_A_QUEUE_IFINDEX", ifindex) == ifindex}


# --- IRQs -------------------------------------------------------------------------

_ROLE = [("combined", re.compile(r"(txrx|tx-rx|comp|ntfy-blk|combined|queue)[-_.]?(\d+)")),
         ("rx", re.compile(r"(rx|input)[-_.]?(\d+)")),
         ("tx", re.compile(r"(tx|output)[-_.]?(\d+)"))]


def irq_role(name: str) -> tuple[str, Optional[int]]:
    """'virtio2-input.0' -> ('rx', 0); 'eth0-TxRx-3' -> ('combined', 3);
    'mlx5_comp5@pci:...' -> ('combined', 5); 'virtio2-config' -> ('other', None)."""
    low = name.lower().split("@")[0]
    for role, pat in _ROLE:
        found = list(pat.finditer(low))
        if found:
            return role, int(found[-1].group(2))
    return "other", None


def interrupts() -> dict[int, tuple[str, list[int]]]:
    """/proc/interrupts: IRQ number -> (name, count per CPU)."""
    with open("/proc/interrupts") as f:
        ncpu = len(f.readline().split())
        out = {}
        for line in f:
            head, _, rest = line.partition(":")
            if not head.strip().isdigit():
                continue
            fields = rest.split()
            counts = [int(x) for x in fields[:ncpu] if x.isdigit()]
            out[int(head)] = (fields[-1] if len(fields) > ncpu else "", counts)
    return out


def device_irqs(ifname: str, table: dict[int, tuple[str, list[int]]]) -> list[int]:
    """The device's IRQs: its (or its bus parent's, for virtio) msi_irqs, the
    legacy `irq`, and any IRQ named after the interface."""
    found: set[int] = set()
    dev = SYS_NET / ifname / "device"
    if dev.exists():
        d = dev.resolve()
        for _ in range(3):                       # virtioN -> its PCI function
            msi = d / "msi_irqs"
            if msi.is_dir():
                found.update(int(x) for x in os.listdir(msi) if x.isdigit())
                break
            d = d.parent
        try:
            legacy = int((dev / "irq").read_text())
            if legacy > 0 and not found:
                found.add(legacy)
        except (OSError, ValueError):
            pass
        # virtio: only this function's IRQs (the PCI function may hold several devices)
        vname = dev.resolve().name
        if vname.startswith("virtio"):
            found = {n for n in found if table.get(n, ("",))[0].startswith(vname + "-")} or found
    pat = re.compile(rf"(^|[^a-z0-9]){re.escape(ifname)}([^a-z0-9]|$)")
    found.update(n for n, (name, _) in table.items() if pat.search(name))
    return sorted(n for n in found if n in table)


def read_cpus(path: Path) -> Optional[list[int]]:
    try:
        return parse_cpulist(path.read_text())
    except (OSError, ValueError):
        return None


def irq(number: int, table) -> Irq:
    name, counts = table.get(number, ("", []))
    role, queue = irq_role(name)
    return Irq(number=number, name=name, counts=counts, role=role, queue=queue,
               affinity=read_cpus(PROC_IRQ / str(number) / "smp_affinity_list") or [],
               effective=read_cpus(PROC_IRQ / str(number) / "effective_affinity_list"))


# --- the whole interface -----------------------------------------------------------


def read_nic(ifname: str) -> Nic:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname) if ifname in netns_links() else []
    if not links:
        have = ", ".join(sorted(netns_links()))
        raise UserError(f"no interface {ifname!r} in this network namespace (there are: {have}).")
    link = links[0]
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind is None:
        kind = "loopback" if link["flags"] & 0x8 else "device"     # IFF_LOOPBACK
    base = SYS_NET / ifname
    notes: list[str] = []
    driver, bus = drvinfo(ifname)
    drv_link = base / "device" / "driver"
    if drv_link.exists():
        driver = driver or drv_link.resolve().name
    table = interrupts()
    irqs = [irq(n, table) for n in device_irqs(ifname, table)]
    irqs.sort(key=lambda i: (i.role == "other", i.queue if i.queue is not None else 1 << 30,
                             i.number))
    stats = queue_packets(ifname)
    for k, v in qstats(link["index"]).items():       # virtio_net 6.10+: only there
        stats.setdefault(k, v)

    def by_queue(direction: str, q: int) -> Optional[int]:
        for want in (direction, "combined"):
            for i in irqs:
                if i.role == want and i.queue == q:
                    return i.number
        return None

    rx, tx = [], []
    qdir = base / "queues"
    for d in sorted(qdir.glob("rx-*"), key=lambda p: int(p.name[3:])):
        q = int(d.name[3:])
        rps = d / "rps_cpus"
        rx.append(RxQueue(q, parse_mask(rps.read_text()) if rps.exists() else None,
                          irq=by_queue("rx", q), packets=stats.get(("rx", q))))
    for d in sorted(qdir.glob("tx-*"), key=lambda p: int(p.name[3:])):
        q = int(d.name[3:])
        xps = d / "xps_cpus"
        try:
            mask = parse_mask(xps.read_text()) if xps.exists() else None
        except OSError:
            mask = None
        tx.append(TxQueue(q, mask, irq=by_queue("tx", q), packets=stats.get(("tx", q))))
    if not qdir.is_dir():
        notes.append(f"{qdir} is missing: no queue masks to read.")
    if not irqs:
        notes.append("no IRQs: a virtual device; packets are processed on the CPU that "
                     "sent them (or the RPS CPUs)." if kind != "device" else
                     "no IRQs found for the device in /proc/interrupts.")
    r = rss(ifname)
    if rx and all(q.packets is None for q in rx):
        notes.append("no per-queue packet counters in the driver's ethtool statistics "
                     "or netdev qstats.")
    return Nic(name=ifname, ifindex=link["index"], kind=kind, driver=driver, bus_info=bus,
               speed_mbps=speed(ifname),
               operstate=link.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
               num_rx_queues=link.get_attr("IFLA_NUM_RX_QUEUES") or len(rx),
               num_tx_queues=link.get_attr("IFLA_NUM_TX_QUEUES") or len(tx),
               real_rx_queues=len(rx), real_tx_queues=len(tx),
               channels=channels(ifname), rss=r, rx=rx, tx=tx, irqs=irqs, notes=notes)


# --- writing masks (--apply / --restore) -------------------------------------------


# A change to the RSS indirection table is kept, like a mask, as a path and a
# value: "ethtool:IFACE:indir" and the table as comma-separated queues.
INDIR_PATH = "ethtool:{}:indir"


def _indir_iface(path: str) -> Optional[str]:
    if path.startswith("ethtool:") and path.endswith(":indir"):
        return path[len("ethtool:"):-len(":indir")]
    return None


def read_value(path: str) -> str:
    iface = _indir_iface(path)
    if iface is not None:
        table = indirection(iface)
        if table is None:
            raise OSError(errno.EOPNOTSUPP, "the driver reports no RSS indirection table")
        return ",".join(map(str, table))
    return Path(path).read_text().strip()


def write_value(path: str, value: str) -> None:
    """Write a mask (or the RSS indirection table); OSError with the kernel's
    reason if it refuses."""
    iface = _indir_iface(path)
    if iface is not None:
        set_indirection(iface, [int(x) for x in value.split(",")])
        return
    with open(path, "w") as f:
        f.write(value + "\n")


def ifaces_for(addr: str | None) -> list[str]:
    """The interfaces carrying traffic to addr (its owner; loopback for
    127/8 and ::1; every non-loopback one for a wildcard), or all
    non-loopback interfaces."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        links = {lk["index"]: (lk.get_attr("IFLA_IFNAME"), bool(lk["flags"] & 0x8))
                 for lk in ipr.get_links()}
        if addr and addr not in ("0.0.0.0", "::"):
            for a in ipr.get_addr():
                if a.get_attr("IFA_ADDRESS") == addr or a.get_attr("IFA_LOCAL") == addr:
                    return [links[a["index"]][0]]
    names = [n for n, lo in links.values() if not lo]
    return names or [n for n, _ in links.values()]
