"""A minimal reader of the kernel's BTF (/sys/kernel/btf/vmlinux).

Why: our BPF C may include UAPI headers only (the header tree may be a
stand-in for another kernel), so kernel-internal struct offsets come from the
running kernel's BTF and reach the C as -D macros. Doctor also uses it to ask
whether a kernel function exists (fentry target, UDP 4-tuple hash).

Only what that needs: types by (kind, name), struct/union members with their
offsets (through anonymous unions, and dotted paths), sizes, and FUNC names.
Format: Documentation/bpf/btf.rst (header, then the type and string sections).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F

# BTF_KIND_*
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC = 9, 10, 11, 12, 13, 14, 15
FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = 16, 17, 18, 19

KIND_NAMES = {"int": INT, "ptr": PTR, "array": ARRAY, "struct": STRUCT, "union": UNION,
              "enum": ENUM, "fwd": FWD, "typedef": TYPEDEF, "func": FUNC,
              "func_proto": FUNC_PROTO, "var": VAR, "datasec": DATASEC, "float": FLOAT,
              "enum64": ENUM64}

# Bytes that follow the 12-byte struct btf_type, per kind: (fixed, per vlen item).
_TAIL = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8),
         FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0),
         ENUM64: (0, 12)}
# Kinds that only qualify or rename another type: skipped to reach a struct.
_ALIASES = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BTFError(UserError):
    """The BTF is missing, malformed, or lacks what we asked for."""


@dataclass(frozen=True)
class Type:
    id: int
    kind: int
    name: str
    size_or_type: int   # size for INT/STRUCT/UNION/ENUM, referenced type id otherwise
    vlen: int
    kflag: bool


@dataclass(frozen=True)
class Member:
    name: str           # "" for an anonymous struct/union member
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield


class BTF:
    """Parsed type table of one BTF blob (no split BTF: vmlinux only)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BTFError("BTF blob is too short")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError(f"not BTF (magic {magic:#x}; big-endian BTF is not supported)")
        if version != 1:
            raise BTFError(f"unsupported BTF version {version}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strs = hdr_len + str_off
        self._strs_end = self._strs + str_len
        # One pass records where each type starts (they are variable-length);
        # id 0 is void and has no entry.
        self._offs = [0]
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.Struct("<I").unpack_from
        while pos < end:
            self._offs.append(pos)
            info = unpack(data, pos + 4)[0]
            fixed, per = _TAIL.get((info >> 24) & 0x1F, (0, 0))
            pos += 12 + fixed + per * (info & 0xFFFF)
        if pos != end:
            raise BTFError("BTF type section is truncated")
        self._index: dict[tuple[int, str], int] | None = None

    @classmethod
    def load(cls, path: Path | str = VMLINUX) -> "BTF":
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise BTFError(f"cannot read {path} ({e.strerror}): this kernel has no BTF "
                           f"(CONFIG_DEBUG_INFO_BTF)") from None

    def __len__(self) -> int:
        return len(self._offs) - 1

    def _str(self, off: int) -> str:
        start = self._strs + off
        end = self._data.index(b"\0", start, self._strs_end)
        return self._data[start:end].decode()

    def type(self, type_id: int) -> Type:
        if not 0 < type_id < len(self._offs):
            raise BTFError(f"no BTF type id {type_id}")
        pos = self._offs[type_id]
        name_off, info, st = struct.unpack_from("<III", self._data, pos)
        return Type(type_id, (info >> 24) & 0x1F, self._str(name_off), st,
                    info & 0xFFFF, bool(info >> 31))

    def find(self, name: str, kind: int | str) -> int | None:
        """The id of the first type of this kind and name, or None."""
        if isinstance(kind, str):
            kind = KIND_NAMES[kind]
        if self._index is None:
            # Built once, on the first lookup: ~100k named types.
            idx: dict[tuple[int, str], int] = {}
            data, unpack = self._data, struct.Struct("<II").unpack_from
            for tid in range(len(self._offs) - 1, 0, -1):   # reverse: first id wins
                name_off, info = unpack(data, self._offs[tid])
                if name_off:
                    idx[((info >> 24) & 0x1F, self._str(name_off))] = tid
            self._index = idx
        return self._index.get((kind, name))

    def has_func(self, name: str) -> bool:
        return self.find(name, FUNC) is not None

    def func_params(self, name: str) -> list[str]:
        """Parameter names of a kernel function, from its FUNC_PROTO (a
        12-byte header, then a (name_off, type) pair per parameter)."""
        fid = self.find(name, FUNC)
        if fid is None:
            raise BTFError(f"this kernel's BTF has no function {name}")
        proto = self.type(self.type(fid).size_or_type)
        pos = self._offs[proto.id] + 12
        return [self._str(struct.unpack_from("<II", self._data, pos + 8 * i)[0])
                for i in range(proto.vlen)]

    def resolve(self, type_id: int) -> Type:
        """Skip typedefs and qualifiers (const, volatile, ...)."""
        t = self.type(type_id)
        while t.kind in _ALIASES:
            t = self.type(t.size_or_type)
        return t

    def members(self, type_id: int) -> list[Member]:
        t = self.type(type_id)
        if t.kind not in (STRUCT, UNION):
            raise BTFError(f"BTF type {t.name or type_id} is not a struct or union")
        out, pos = [], self._offs[type_id] + 12
        for _ in range(t.vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, pos)
            # With kind_flag set the offset word also carries the bitfield size.
            bits, size = (off & 0xFFFFFF, off >> 24) if t.kflag else (off, 0)
            out.append(Member(self._str(name_off), mtype, bits, size))
            pos += 12
        return out

    def _struct_id(self, name: str) -> int:
        for kind in (STRUCT, UNION):
            tid = self.find(name, kind)
            if tid is not None:
                return tid
        raise BTFError(f"this kernel's BTF has no struct {name}")

    def _member_bits(self, type_id: int, name: str) -> tuple[int, Member] | None:
        """Bit offset of a named member, looking through anonymous members."""
        for m in self.members(type_id):
            if m.name == name:
                return m.bit_offset, m
            if not m.name:
                inner = self.resolve(m.type_id)
                if inner.kind in (STRUCT, UNION):
                    found = self._member_bits(inner.id, name)
                    if found:
                        return m.bit_offset + found[0], found[1]
        return None

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of a member; path may be dotted ("__sk_common.skc_num")."""
        tid, total = self._struct_id(struct_name), 0
        for i, part in enumerate(path.split(".")):
            found = self._member_bits(tid, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path} in this "
                               f"kernel's BTF")
            bits, m = found
            total += bits
            if i < path.count("."):
                inner = self.resolve(m.type_id)
                if inner.kind not in (STRUCT, UNION):
                    raise BTFError(f"{struct_name}.{path}: {part} is not a struct")
                tid = inner.id
        if total % 8 or m.bitfield_size:
            raise BTFError(f"{struct_name}.{path} is a bitfield; it has no byte offset")
        return total // 8

    def sizeof(self, struct_name: str) -> int:
        return self.type(self._struct_id(struct_name)).size_or_type


@lru_cache(maxsize=1)
def vmlinux() -> BTF:
    """The running kernel's BTF, parsed once per process."""
    return BTF.load(VMLINUX)


def member_offset(struct_name: str, path: str) -> int:
    return vmlinux().member_offset(struct_name, path)


def has_func(name: str) -> bool:
    return vmlinux().has_func(name)


def func_params(name: str) -> list[str]:
    return vmlinux().func_params(name)


def offset_macros(fields: dict[str, tuple[str, str]]) -> list[str]:
    """cflags for BPF C: {"SK_ACK_BACKLOG_OFF": ("sock", "sk_ack_backlog")}
    -> ["-DSK_ACK_BACKLOG_OFF=<offset>"]."""
    return [f"-D{macro}={member_offset(s, m)}" for macro, (s, m) in fields.items()]
