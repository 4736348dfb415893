"""A REUSEPORT_SOCKARRAY keyed by slot: a group's sockets as an SK_REUSEPORT
program sees them. The selector (bpf/select.c) and churn's select-or-migrate
program (bpf/migrate.c) each own one; pins and `attach --follow` work on a
pinned one by its fd.
"""
from __future__ import annotations

import os
import socket
import struct

from ..errors import UserError
from ..kernel import bpf


class SockArray:
    """One REUSEPORT_SOCKARRAY this process made and closes."""

    def __init__(self, max_slots: int, name: str):
        self.max_slots = max_slots
        self.fd = bpf.create_map(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, max_slots, name)

    def put(self, slot: int, sock: socket.socket) -> None:
        put_in_slot(self.fd, slot, sock)

    def fill(self, socks: list[socket.socket]) -> None:
        """Slot i holds socks[i]."""
        for slot, s in enumerate(socks):
            try:
                self.put(slot, s)
            except OSError as e:
                raise UserError(f"cannot put slot {slot} in the socket array ({e.strerror}): "
                                f"every member must be a bound/listening SO_REUSEPORT "
                                f"socket of one group.") from None

    def empty(self, n: int | None = None) -> None:
        """Empty the first n slots (default: all). A socket sits in one
        REUSEPORT_SOCKARRAY at a time, and the kernel frees a dropped array
        only later: emptied now, the group can be steered again at once."""
        empty_slots(self.fd, self.max_slots if n is None else n)

    def close(self) -> None:
        """Close our fd (idempotent); a pinned array stays as it is."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def put_in_slot(socks_fd: int, slot: int, sock: socket.socket) -> None:
    bpf.map_update(socks_fd, bpf.u32(slot), bpf.u64(sock.fileno()))


def empty_slots(socks_fd: int, n: int) -> None:
    """Delete slots 0..n-1; an empty one (its socket closed) is no error."""
    for slot in range(n):
        try:
            bpf.map_delete(socks_fd, bpf.u32(slot))
        except OSError:
            pass


def sockarray_cookies(socks_fd: int, n: int) -> list[int | None]:
    """The socket cookie in each of the first n slots (what a user-space
    lookup returns), None where the slot is empty: the kernel removes a
    socket's entry when it closes."""
    out: list[int | None] = []
    for slot in range(n):
        raw = bpf.map_lookup(socks_fd, bpf.u32(slot), 8)
        out.append(struct.unpack("=Q", raw)[0] if raw else None)
    return out
