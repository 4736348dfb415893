"""The select-or-migrate policy (bpf/migrate.c): churn's steering program.

Loaded with expected_attach_type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE it also
decides where a request orphaned by a closing listener goes (the live
listener with the shortest accept queue), or refuses it (the kernel resets
it). Its table says which slots new connections may go to, so a draining
worker can be left out without reloading the program.
"""
from __future__ import annotations

import os
import socket
import struct
from typing import Optional

from ..errors import UserError
from ..kernel import bpf
from .sockarray import SockArray

MAX_SLOTS = 16          # bpf/migrate.c unrolls its scans over the slots: keep it small


class MigrateProgram:
    """bpf/migrate.c, loaded, with its socket array: the one owner of every
    BPF object churn makes. migrate=False loads it as a plain SELECT program
    (steering only; the kernel never runs it for migration)."""

    MODE_MIGRATE, MODE_REFUSE = 0, 1

    def __init__(self, migrate: bool = True, refuse: bool = False,
                 max_slots: int = MAX_SLOTS):
        from ..kernel import btf
        from ..kernel.bcc import compile_program, program_source

        self.migrate, self.refuse, self.max_slots = migrate, refuse, max_slots
        self.attach_type = (bpf.ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE if migrate
                            else bpf.ATTACH_SK_REUSEPORT_SELECT)
        self.table: list[int] = []
        self.target = "shortest accept queue"
        self._bpf = None
        self._fds: list[int] = []             # a program loaded without bcc
        self.socks: Optional[SockArray] = None
        self.prog_fd = -1
        self._member: Optional[socket.socket] = None
        try:
            self.socks = SockArray(max_slots, "rp_mig_socks")
            cflags = [f"-DSOCKS_FD={self.socks.fd}", f"-DMAX_SLOTS={max_slots}"]
            try:
                cflags += ["-DLEAST=1"] + btf.offset_macros({
                    "SELECTED_SK_OFF": ("sk_reuseport_kern", "selected_sk"),
                    "LOAD_OFF": ("sock", "sk_ack_backlog")})
            except btf.BTFError:    # no BTF: migrate to the next live slot instead
                cflags.append("-DLEAST=0")
                self.target = "next live slot"
            self._bpf = compile_program(program_source("migrate.c"), cflags)
            self.prog_fd = self._load()
            self.maps = {name: self._bpf[f"rp_mig_{name}".encode()].map_fd
                         for name in ("table", "config", "stats", "to")}
            bpf.map_update(self.maps["config"], bpf.u32(0),
                           bpf.u32(self.MODE_REFUSE if refuse else self.MODE_MIGRATE))
            self._write_table()
        except BaseException:
            self.close()
            raise

    def _load(self) -> int:
        try:
            return self._bpf.load_func(b"rp_migrate", bpf.PROG_TYPE_SK_REUSEPORT,
                                       attach_type=self.attach_type).fd
        except TypeError:
            pass            # an older bcc without attach_type: load its bytecode ourselves
        except Exception as e:
            raise UserError(f"the kernel refused the select-or-migrate program ({e}).") from None
        try:
            fd = bpf.prog_load(bpf.PROG_TYPE_SK_REUSEPORT, self._bpf.dump_func(b"rp_migrate"),
                               expected_attach_type=self.attach_type, name="rp_migrate")
        except OSError as e:
            raise UserError(f"the kernel refused the select-or-migrate program "
                            f"({e.strerror}).") from None
        self._fds.append(fd)
        return fd

    @property
    def kind(self) -> str:
        return "select_or_migrate" if self.migrate else "select"

    def attach(self, sock: socket.socket) -> None:
        from ..kernel.reuseport import attach_ebpf
        try:
            attach_ebpf(sock, self.prog_fd)
        except OSError as e:
            raise UserError(f"cannot attach the select-or-migrate program to the group "
                            f"({e.strerror}).") from None
        self._member = sock

    def put(self, slot: int, sock: socket.socket) -> None:
        """Put a listening member in the socket array (not yet steered to)."""
        self.socks.put(slot, sock)

    def enable(self, slot: int) -> None:
        if slot not in self.table:
            self.table.append(slot)
            self._write_table()

    def disable(self, slot: int) -> None:
        """New connections stop going to `slot` (its queue can drain)."""
        if slot in self.table:
            self.table.remove(slot)
            self._write_table()

    def _write_table(self) -> None:
        # Entries first, then the count: the program never reads a stale slot
        # past n (a removed slot read before the count shrinks just fails to
        # select, and the scan moves on).
        for i, slot in enumerate(self.table):
            bpf.map_update(self.maps["table"], bpf.u32(i), bpf.u32(slot))
        bpf.map_update(self.maps["config"], bpf.u32(1), bpf.u32(len(self.table)))

    def stats(self) -> dict:
        vals = [struct.unpack("=Q", bpf.map_lookup(self.maps["stats"], bpf.u32(i), 8) or
                              bytes(8))[0] for i in range(4)]
        to = {}
        for slot in range(self.max_slots):
            raw = bpf.map_lookup(self.maps["to"], bpf.u32(slot), 8)
            n = struct.unpack("=Q", raw)[0] if raw else 0
            if n:
                to[str(slot)] = n
        return {"attach_type": self.kind, "refuse": self.refuse, "target": self.target,
                "selected": vals[0], "migrated": vals[1], "refused": vals[2],
                "no_slot": vals[3], "migrated_to": to}

    def close(self, member: Optional[socket.socket] = None) -> None:
        """Detach (through a live member, if any is left), empty the socket
        array so its sockets are free again, release every fd. Idempotent."""
        from ..kernel.reuseport import detach_if_any
        for s in (member, self._member):
            if s is not None and s.fileno() >= 0:
                try:
                    detach_if_any(s)
                    break
                except OSError:
                    continue
        self._member = None
        if self.socks is not None:
            self.socks.empty()
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.socks is not None:
            self.socks.close()
            self.socks = None
        self.prog_fd = -1
