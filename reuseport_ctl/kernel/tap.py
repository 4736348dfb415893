"""A multi-queue tap in a private network namespace, for the VM's NIC.

The namespace has no name (no /run/netns bind mount): it lives exactly as
long as a process is in it (the VM runner's nethost and QEMU). When the last
one exits, for whatever reason, the kernel tears the namespace down and
deletes the tap with it (tun devices are virtual: they are deleted, not
moved back to the host). Nothing here touches the host's own interfaces.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import struct

from ..errors import UserError

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = 9) -> None:
    """The kernel sends `sig` to this process when its parent exits."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def unshare_net() -> None:
    """Move this process into a new, empty network namespace (loopback up)."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise UserError(f"cannot create a private network namespace for the VM's NIC "
                        f"({os.strerror(err)}): run as root.")
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def enter_net(path: str) -> None:
    """setns(2) this process into the network namespace at `path`
    (/proc/PID/ns/net)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def create_mq_tap(name: str, queues: int) -> None:
    """A persistent multi-queue tap (what QEMU's `-netdev tap,queues=N`
    attaches to: IFF_MULTI_QUEUE and IFF_VNET_HDR, as QEMU asks)."""
    if not os.path.exists("/dev/net/tun"):
        raise UserError("no /dev/net/tun: load the tun module (modprobe tun) to give the VM a NIC.")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
        except OSError as e:
            raise UserError(f"cannot create the tap {name} ({e.strerror}).") from None
    finally:
        os.close(fd)


def configure(name: str, address: str, prefix: int) -> None:
    """Address the interface and bring it up, with IPv6 off (no router
    solicitations or DAD packets to blur the guest's per-queue counters)."""
    from pyroute2 import IPRoute
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=idx, address=address, prefixlen=prefix)
        ipr.link("set", index=idx, state="up")
