"""A private network namespace for the experiments: nothing they bind or
send touches the host's ports or interfaces."""
from __future__ import annotations

import ctypes
import os

from ..errors import UserError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_private_netns() -> None:
    """Move this process (and every child it starts from now on) into a new
    network namespace with the loopback up."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise UserError(f"cannot create a private network namespace "
                        f"({os.strerror(err)}): run as root, or pass --host-netns.")
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")


# --- which network namespace, and which ones still exist -------------------------

SO_NETNS_COOKIE = 71          # asm-generic/socket.h, Linux 5.14


def current_inode() -> int:
    """The inode of this thread's network namespace (what `ip netns identify`,
    `ls -l /proc/self/ns/net` and nsfs bind mounts show)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def current_cookie() -> int:
    """The network namespace's cookie: unlike its inode, never reused while
    the machine is up. 0 where the kernel has no SO_NETNS_COOKIE (< 5.14)."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        except OSError:
            return 0


def cookie_of(path: str) -> int:
    """The cookie of the network namespace behind an nsfs path
    (/proc/PID/ns/net, /run/netns/NAME). 0 if unreadable."""
    return call_in(path, current_cookie) or 0


def call_in(path: str, fn):
    """fn() run in the network namespace behind an nsfs path, from a thread
    that enters it (sockets it opens are that namespace's); its result, or
    None when the namespace cannot be entered. fn's exceptions propagate."""
    import threading
    out: list = [None, None]

    def probe():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                return
            try:
                out[0] = fn()
            except BaseException as e:       # handed to the caller
                out[1] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join()
    if out[1] is not None:
        raise out[1]
    return out[0]


_NET = "net:["


def _ino_of_link(target: str) -> int | None:
    if target.startswith(_NET) and target.endswith("]"):
        return int(target[len(_NET):-1])
    return None


def live_namespaces() -> dict[int, str]:
    """inode -> an nsfs path that reaches it, for every network namespace a
    process can still reach: some task's namespace (/proc/*/task/*/ns/net),
    an open fd on an nsfs file, or an nsfs bind mount (/run/netns/NAME) in
    this mount namespace or init's. A namespace absent here is gone, unless
    a socket created in it is still open somewhere (that keeps it alive
    without naming it)."""
    found: dict[int, str] = {}
    for mountinfo in ("/proc/self/mountinfo", "/proc/1/mountinfo"):
        for ino, path in _nsfs_mounts(mountinfo):   # first: they carry `ip netns` names
            found.setdefault(ino, path)
    for pid in (n for n in os.listdir("/proc") if n.isdigit()):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            p = f"/proc/{pid}/task/{tid}/ns/net"
            try:
                ino = _ino_of_link(os.readlink(p))
            except OSError:
                continue
            if ino is not None:
                found.setdefault(ino, p)
        try:
            fds = os.scandir(f"/proc/{pid}/fd")
        except OSError:
            continue
        with fds:
            for e in fds:
                try:
                    ino = _ino_of_link(os.readlink(e.path))
                except OSError:
                    continue
                if ino is not None:
                    found.setdefault(ino, e.path)
    return found


def _nsfs_mounts(mountinfo: str) -> list[tuple[int, str]]:
    """(inode, mount point) of every network namespace bind-mounted in the
    mount namespace `mountinfo` describes (root field `net:[N]`, type nsfs)."""
    out = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right.startswith("nsfs "):
            continue
        ino = _ino_of_link(fields[3])
        if ino is not None:
            point = fields[4].replace("\\040", " ")
            if mountinfo != "/proc/self/mountinfo":
                point = mountinfo.rsplit("/", 1)[0] + "/root" + point
            out.append((ino, point))
    return out
