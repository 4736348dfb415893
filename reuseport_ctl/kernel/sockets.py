"""Listening sockets for a worker group, and who owns a port when bind fails.

The parent (the supervisor) makes every socket itself, in slot order, so that
slot i is the i-th socket to join the reuseport group: the index a cBPF
program returns and the key of a REUSEPORT_SOCKARRAY.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from ..errors import UserError

# /proc/net/tcp states that hold a port: LISTEN (0A) and bound-only CLOSE (07).


def resolve(host: str, port: int, proto: str) -> tuple[int, tuple]:
    """(family, sockaddr) to bind; IPv6 when the host is an IPv6 address."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    try:
        info = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"cannot resolve host {host!r}: {e}.") from None
    family, _, _, _, addr = info[0]
    return family, addr


@contextmanager
def _created_as(uid: Optional[int]) -> Iterator[None]:
    """socket() stamps the socket with the caller's fsuid, and that uid is the
    one the reuseport anti-hijack rule compares; bind/listen/BPF attach still
    run with the caller's full privileges (ports < 1024, CAP_BPF)."""
    if uid is None or uid == os.geteuid():
        yield
        return
    saved = os.geteuid()
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(saved)


def open_listener(host: str, port: int, proto: str, *, reuseport: bool, backlog: int,
                  uid: Optional[int] = None,
                  group: tuple[socket.socket, ...] = ()) -> socket.socket:
    """One bound (UDP) or listening (TCP) socket. `group` holds the sockets
    already made for this run, so a failing bind does not blame them."""
    family, addr = resolve(host, port, proto)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with _created_as(uid):
        s = socket.socket(family, kind)
    try:
        # SO_REUSEADDR only lets us bind over TIME_WAIT leftovers of a past run.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise _bind_error(e, host, addr[1], proto, reuseport,
                              os.geteuid() if uid is None else uid, group) from None
        if proto == "tcp":
            s.listen(backlog)
        return s
    except BaseException:
        s.close()
        raise


def open_group(host: str, port: int, proto: str, n: int, *, backlog: int,
               uid: Optional[int] = None) -> list[socket.socket]:
    """n SO_REUSEPORT sockets on one address, slot order = join order. With
    port 0 the first picks a free port and the rest follow it."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = open_listener(host, port, proto, reuseport=True, backlog=backlog,
                              uid=uid, group=tuple(socks))
            port = s.getsockname()[1]
            socks.append(s)
        return socks
    except BaseException:
        for s in socks:
            s.close()
        raise


def accept_queue_len(listener: socket.socket) -> int:
    """A listener's accept-queue length: TCP_INFO's tcpi_unacked is
    sk_ack_backlog for a socket in LISTEN."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("=I", info, 24)[0]


# --- who holds a port ---------------------------------------------------------

@dataclass(frozen=True)
class PortHolder:
    uid: int
    inode: int
    pid: Optional[int]          # a process holding it, if one is found
    fd: Optional[int]
    reuseport: Optional[bool]   # SO_REUSEPORT on that socket; None if unreadable


def port_holders(proto: str, port: int, exclude: set[int] = frozenset()) -> list[PortHolder]:
    """Sockets of this network namespace listening (TCP) or bound (UDP) on
    `port`, any address, from sock_diag; each with a process holding it."""
    from .diag import listeners
    from .owners import holders

    found = {s.inode: s.uid for s in listeners(port, proto) if s.inode not in exclude}
    if not found:
        return []
    held = holders(set(found))
    out = []
    for inode, uid in found.items():
        h = held[inode][0] if held[inode] else None
        out.append(PortHolder(uid, inode, h and h.pid, h and h.fd, _reuseport_of(h)))
    return out


def _reuseport_of(holder) -> Optional[bool]:
    """SO_REUSEPORT on another process's socket, read through pidfd_getfd."""
    from .owners import take_socket, uses_reuseport

    if holder is None:
        return None
    try:
        s = take_socket(holder.pid, holder.fd, holder.inode)
    except (UserError, OSError):
        return None
    with s:
        return uses_reuseport(s)


def check_port_free(host: str, port: int, proto: str, *, reuseport: bool, uid: int) -> None:
    """Refuse a port somebody else serves, before we bind: with the same uid
    and SO_REUSEPORT the kernel would let us join a stranger's group and
    take part of its traffic, silently."""
    if port == 0:
        return
    holders = port_holders(proto, port)
    if holders:
        raise UserError(_explain(holders, host, port, proto, reuseport, uid))


def _bind_error(e: OSError, host: str, port: int, proto: str, reuseport: bool, uid: int,
                group: tuple[socket.socket, ...]) -> UserError:
    if e.errno == errno.EACCES:
        return UserError(f"port {port} is below 1024: binding it needs root "
                         f"(CAP_NET_BIND_SERVICE).")
    if e.errno == errno.EADDRNOTAVAIL:
        return UserError(f"address {host} is not on any interface of this network namespace.")
    if e.errno == errno.EADDRINUSE:
        mine = {os.fstat(s.fileno()).st_ino for s in group}
        return UserError(_explain(port_holders(proto, port, mine), host, port, proto,
                                  reuseport, uid))
    return UserError(f"cannot bind {proto} {host} port {port}: {e.strerror}.")


def _explain(holders: list[PortHolder], host: str, port: int, proto: str,
             reuseport: bool, uid: int) -> str:
    h = min(holders, key=lambda x: (x.pid is None, x.pid or 0)) if holders else None
    pid = f"pid {h.pid}" if h and h.pid else "no process found"
    if h is None:
        return f"{proto} port {port} on {host} is already in use."
    if h.reuseport is False:
        return f"port {port} is in use by a socket without SO_REUSEPORT ({pid})."
    if reuseport and h.uid != uid:
        return (f"port {port} is owned by uid {h.uid}; the kernel's SO_REUSEPORT anti-hijack "
                f"rule forbids another user from joining its group.")
    if reuseport:
        return (f"port {port} is already served by a SO_REUSEPORT group ({pid}, uid {h.uid}); "
                f"joining it would take part of its traffic: choose another port.")
    return f"port {port} is in use by a SO_REUSEPORT group ({pid}, uid {h.uid})."


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A unix datagram pair: the dispatcher's end and a worker's end. A
    socketpair has no max_dgram_qlen limit, only the send buffer."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    return a, b


# --- handing a socket over ----------------------------------------------------

def pass_socket(chan: socket.socket, sock: socket.socket) -> None:
    """Send `sock` over a unix socket (SCM_RIGHTS): the receiver gets the
    same kernel socket -- its queue, its place in the reuseport group."""
    socket.send_fds(chan, [b"P"], [sock.fileno()])


def receive_socket(chan: socket.socket, at_fd: Optional[int] = None) -> socket.socket:
    """The socket pass_socket() sent (blocking); at_fd: moved to that fd
    number (where the sender's process has it, so it can be found again)."""
    msg, fds, _, _ = socket.recv_fds(chan, 1, 1)
    if msg != b"P" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EPROTO, "expected one passed socket")
    fd = fds[0]
    if at_fd is not None and at_fd != fd:
        os.dup2(fd, at_fd)
        os.close(fd)
        fd = at_fd
    return socket.socket(fileno=fd)


def queued(sock: socket.socket) -> int:
    """What waits on a member: a TCP listener's accept-queue length; for a
    UDP socket, the bytes of the next datagram (FIONREAD: 0 when empty)."""
    if sock.type == socket.SOCK_STREAM:
        return accept_queue_len(sock)
    import fcntl
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


def discard_queued(sock: socket.socket, limit: int = 1 << 20) -> int:
    """Read off and count the datagrams still queued on a UDP socket about to
    close: what the kernel would free unread with it (lost to the client)."""
    n = 0
    while n < limit:
        try:
            sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        n += 1
    return n


SO_INCOMING_CPU = 49
SO_INCOMING_NAPI_ID = 56
KERNEL_MAX = "/sys/devices/system/cpu/kernel_max"       # NR_CPUS - 1


def min_napi_id() -> int:
    """The smallest NAPI id (the kernel's MIN_NAPI_ID, NR_CPUS + 1): an skb's
    napi_id shares a union with the sender's CPU, and sk_napi_id is copied
    from it, so a smaller value is no NAPI id (getsockopt reports it as 0)."""
    with open(KERNEL_MAX) as f:
        return int(f.read()) + 2


def incoming(sock: socket.socket) -> tuple[int, int]:
    """(NAPI id, CPU) the socket's last packet came in on: SO_INCOMING_NAPI_ID
    (0 where the device has no NAPI, e.g. loopback) and SO_INCOMING_CPU. An
    accepted TCP socket records them from the handshake's last ACK."""
    return (sock.getsockopt(socket.SOL_SOCKET, SO_INCOMING_NAPI_ID),
            sock.getsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU))
