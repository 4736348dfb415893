"""Steering a reuseport group: the three setsockopts, in one place.

SO_ATTACH_REUSEPORT_CBPF (a classic BPF program, passed as a struct
sock_fprog), SO_ATTACH_REUSEPORT_EBPF (a loaded program's fd: a socket
filter or an SK_REUSEPORT program) and SO_DETACH_REUSEPORT_BPF. Any member
socket serves: the program belongs to the group.
"""
from __future__ import annotations

import ctypes
import errno
import socket
import struct

from . import bpf


def attach_cbpf(sock: socket.socket, prog: bytes) -> None:
    """prog: sock_filter instructions (8 bytes each, policies/cbpf.py)."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, bpf.SO_ATTACH_REUSEPORT_CBPF, fprog)


def attach_ebpf(sock: socket.socket, prog_fd: int) -> None:
    """(Re)attach a loaded program to sock's group; the kernel swaps it in
    atomically for one already there."""
    sock.setsockopt(socket.SOL_SOCKET, bpf.SO_ATTACH_REUSEPORT_EBPF, prog_fd)


def detach(sock: socket.socket) -> None:
    """Give the group back to the kernel's own hash; ENOENT (an OSError)
    when it has no program (verify checks that the kernel says so)."""
    sock.setsockopt(socket.SOL_SOCKET, bpf.SO_DETACH_REUSEPORT_BPF, 0)


def detach_if_any(sock: socket.socket) -> bool:
    """detach(), False instead of ENOENT when the group had no program."""
    try:
        detach(sock)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True
