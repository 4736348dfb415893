"""The bpf(2) syscall, called through ctypes.

Only what reuseport-ctl needs: maps (create, update, lookup, delete), object
pinning, raw program loading (for doctor's probes and cBPF-free checks),
links, and id iteration (to prove nothing is left behind).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR_BPF = 321          # x86_64

# enum bpf_cmd
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, OBJ_PIN, OBJ_GET = 5, 6, 7
PROG_GET_NEXT_ID, MAP_GET_NEXT_ID = 11, 12
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD = 13, 14, 15
RAW_TRACEPOINT_OPEN = 17
LINK_CREATE = 28
LINK_GET_NEXT_ID = 31

# enum bpf_map_type
MAP_TYPE_ARRAY = 2
MAP_TYPE_SOCKMAP = 15
MAP_TYPE_REUSEPORT_SOCKARRAY = 20
MAP_TYPE_SOCKHASH = 18

# enum bpf_prog_type
PROG_TYPE_SOCKET_FILTER = 1
PROG_TYPE_KPROBE = 2
PROG_TYPE_TRACEPOINT = 5
PROG_TYPE_RAW_TRACEPOINT = 17
PROG_TYPE_SK_REUSEPORT = 21
PROG_TYPE_TRACING = 26
PROG_TYPE_SK_LOOKUP = 30

# enum bpf_attach_type
ATTACH_TRACE_FENTRY = 24
ATTACH_SK_LOOKUP = 36
ATTACH_SK_REUSEPORT_SELECT = 39
ATTACH_SK_REUSEPORT_SELECT_OR_MIGRATE = 40

BPF_ANY = 0
SK_PASS = 1

# Socket options (asm-generic/socket.h) for reuseport steering.
SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
SO_INCOMING_CPU = 49


class BPFError(OSError):
    pass


def _sys(nr: int, *args) -> int:
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, os.strerror(err))
    return ret


def bpf(cmd: int, attr: bytes | bytearray) -> int:
    """Call bpf(cmd, attr). attr is padded to the kernel's union size."""
    buf = ctypes.create_string_buffer(bytes(attr).ljust(160, b"\0"), 160)
    return _sys(NR_BPF, ctypes.c_int(cmd), buf, ctypes.c_uint(160))


def bpf_out(cmd: int, attr: bytes) -> bytes:
    """Like bpf() but returns the attr buffer as the kernel left it."""
    buf = ctypes.create_string_buffer(bytes(attr).ljust(160, b"\0"), 160)
    _sys(NR_BPF, ctypes.c_int(cmd), buf, ctypes.c_uint(160))
    return buf.raw


# --- maps -------------------------------------------------------------------

def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "") -> int:
    attr = struct.pack("=IIIIIII", map_type, key_size, value_size, max_entries, 0, 0, 0)
    attr += name.encode()[:15].ljust(16, b"\0")
    return bpf(MAP_CREATE, attr)


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int,
               name: str = "") -> int:
    """map_create, with a refusal turned into the sentence a user can act on."""
    from ..errors import UserError
    try:
        return map_create(map_type, key_size, value_size, max_entries, name)
    except OSError as e:
        raise UserError(f"cannot create a BPF map ({e.strerror}): run as root, or "
                        f"with CAP_BPF and CAP_NET_ADMIN.") from None


def _elem_attr(map_fd: int, key: bytes, value: ctypes.Array | None, flags: int = 0):
    kbuf = ctypes.create_string_buffer(key, len(key))
    vaddr = ctypes.addressof(value) if value is not None else 0
    attr = struct.pack("=IxxxxQQQ", map_fd, ctypes.addressof(kbuf), vaddr, flags)
    return attr, kbuf


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    vbuf = ctypes.create_string_buffer(value, len(value))
    attr, _k = _elem_attr(map_fd, key, vbuf, flags)
    bpf(MAP_UPDATE_ELEM, attr)


def _found(cmd: int, attr: bytes) -> bool:
    """bpf(cmd, attr); False where the kernel says ENOENT (no such key, no next key)."""
    try:
        bpf(cmd, attr)
    except BPFError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    vbuf = ctypes.create_string_buffer(value_size)
    attr, _k = _elem_attr(map_fd, key, vbuf)
    return vbuf.raw if _found(MAP_LOOKUP_ELEM, attr) else None


def map_delete(map_fd: int, key: bytes) -> None:
    attr, _k = _elem_attr(map_fd, key, None)
    bpf(MAP_DELETE_ELEM, attr)


def map_items(map_fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map: BPF_MAP_GET_NEXT_KEY from no key
    (the first), then each key's value (an entry deleted meanwhile is skipped)."""
    out: list[tuple[bytes, bytes]] = []
    key: bytes | None = None
    while True:
        nbuf = ctypes.create_string_buffer(key_size)
        kbuf = ctypes.create_string_buffer(key, key_size) if key is not None else None
        attr = struct.pack("=IxxxxQQQ", map_fd, ctypes.addressof(kbuf) if kbuf else 0,
                           ctypes.addressof(nbuf), 0)
        if not _found(MAP_GET_NEXT_KEY, attr):
            return out
        key = nbuf.raw
        value = map_lookup(map_fd, key, value_size)
        if value is not None:
            out.append((key, value))


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def u64(v: int) -> bytes:
    return struct.pack("=Q", v)


# --- pinning ----------------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    bpf(OBJ_PIN, struct.pack("=QI", ctypes.addressof(p), fd))


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    return bpf(OBJ_GET, struct.pack("=QI", ctypes.addressof(p), 0))


# --- programs ---------------------------------------------------------------

def prog_load(prog_type: int, insns: bytes, expected_attach_type: int = 0,
              attach_btf_id: int = 0, license: str = "GPL", name: str = "") -> int:
    """Load raw eBPF instructions; raises BPFError with the verifier's errno."""
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(4096)
    # union bpf_attr, BPF_PROG_LOAD layout
    attr = struct.pack("=IIQQIIQII", prog_type, len(insns) // 8, ctypes.addressof(ibuf),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0)
    attr += name.encode()[:15].ljust(16, b"\0")                 # prog_name
    attr += struct.pack("=II", 0, expected_attach_type)          # prog_ifindex, expected_attach_type
    attr += struct.pack("=IIQIIQI", 0, 0, 0, 0, 0, 0, 0)         # btf fields, func/line info, line_info_cnt
    attr += struct.pack("=II", attach_btf_id, 0)                 # attach_btf_id, attach_prog_fd
    return bpf(PROG_LOAD, attr)


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


# r0 = imm; exit: the smallest valid program.
def ret_imm(value: int) -> bytes:
    return insn(0xb7, 0, 0, 0, value) + insn(0x95)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return bpf(LINK_CREATE, struct.pack("=III", prog_fd, target_fd, attach_type))


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    n = ctypes.create_string_buffer(name.encode())
    return bpf(RAW_TRACEPOINT_OPEN, struct.pack("=QI", ctypes.addressof(n), prog_fd))


def _ids(cmd: int) -> list[int]:
    ids, cur = [], 0
    while True:
        try:
            out = bpf_out(cmd, struct.pack("=II", cur, 0))
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return ids
            raise
        cur = struct.unpack_from("=I", out, 4)[0]
        ids.append(cur)


def prog_ids() -> list[int]:
    return _ids(PROG_GET_NEXT_ID)


def map_ids() -> list[int]:
    return _ids(MAP_GET_NEXT_ID)


def link_ids() -> list[int]:
    return _ids(LINK_GET_NEXT_ID)


def _info_name(get_fd_cmd: int, obj_id: int, name_off: int) -> str | None:
    """The name of a program or map by id (None if it is gone meanwhile)."""
    try:
        fd = bpf(get_fd_cmd, struct.pack("=I", obj_id))
    except BPFError:
        return None
    try:
        info = ctypes.create_string_buffer(128)
        bpf(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 128, ctypes.addressof(info)))
        return info.raw[name_off:name_off + 16].split(b"\0", 1)[0].decode()
    except BPFError:
        return None
    finally:
        os.close(fd)


def prog_names() -> dict[int, str]:
    """id -> name of every loaded BPF program (name: first 15 characters)."""
    return {i: n for i in prog_ids() if (n := _info_name(PROG_GET_FD_BY_ID, i, 64)) is not None}


def map_names() -> dict[int, str]:
    return {i: n for i in map_ids() if (n := _info_name(MAP_GET_FD_BY_ID, i, 24)) is not None}


def obj_id(fd: int) -> int:
    """The kernel id of the program, map or link behind fd."""
    info = ctypes.create_string_buffer(128)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 128, ctypes.addressof(info)))
    return struct.unpack_from("=I", info.raw, 4)[0]   # .id follows .type in every info struct
