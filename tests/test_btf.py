"""The BTF reader: a hand-built blob pins down the format rules, and the
running kernel's /sys/kernel/btf/vmlinux (cross-checked with pahole when it
is installed) shows it reads real kernel-internal types."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from reuseport_ctl.kernel import btf
from reuseport_ctl.kernel.btf import BTF, BTFError


def _blob(types: list[bytes], names: list[str]) -> bytes:
    strs = b"\0" + b"".join(n.encode() + b"\0" for n in names)
    tsec = b"".join(types)
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(tsec), len(tsec), len(strs))
    return hdr + tsec + strs


def _t(name_off, kind, vlen, size_or_type, kflag=False):
    return struct.pack("<III", name_off, (kflag << 31) | (kind << 24) | vlen, size_or_type)


def _m(name_off, type_id, off):
    return struct.pack("<III", name_off, type_id, off)


NAMES = ["int", "inner", "y", "x", "foo", "a", "b", "in", "inner_t", "bits", "flag", "word",
         "my_func", "color", "RED", "GREEN", "arg"]
S = {}
_pos = 1
for _n in NAMES:
    S[_n] = _pos
    _pos += len(_n) + 1

TYPES = [
    _t(S["int"], btf.INT, 0, 4) + struct.pack("<I", 32),                      # 1 int
    _t(S["inner"], btf.STRUCT, 1, 4) + _m(S["x"], 1, 0),                      # 2 struct inner
    _t(0, btf.UNION, 1, 4) + _m(S["y"], 1, 0),                                # 3 anon union
    _t(S["color"], btf.ENUM, 2, 4) + struct.pack("<IiIi", S["RED"], 0, S["GREEN"], 1),  # 4
    _t(S["inner_t"], btf.TYPEDEF, 0, 2),                                      # 5 typedef
    _t(S["foo"], btf.STRUCT, 4, 16) + _m(S["a"], 1, 0) + _m(S["b"], 1, 32)
    + _m(0, 3, 64) + _m(S["in"], 5, 96),                                      # 6 struct foo
    _t(S["bits"], btf.STRUCT, 2, 8, kflag=True) + _m(S["flag"], 1, (1 << 24) | 3)
    + _m(S["word"], 1, 32),                                                   # 7 bitfields
    _t(0, btf.FUNC_PROTO, 1, 1) + struct.pack("<II", S["arg"], 1),            # 8 proto
    _t(S["my_func"], btf.FUNC, 1, 8),                                         # 9 func
]


@pytest.fixture
def tiny():
    return BTF(_blob(TYPES, NAMES))


def test_finds_types_by_kind_and_name(tiny):
    assert len(tiny) == 9
    assert tiny.find("foo", btf.STRUCT) == 6
    assert tiny.find("foo", "struct") == 6
    assert tiny.find("foo", btf.UNION) is None
    assert tiny.find("color", btf.ENUM) == 4
    assert tiny.type(9).name == "my_func" and tiny.type(9).kind == btf.FUNC


def test_functions(tiny):
    assert tiny.has_func("my_func")
    assert not tiny.has_func("foo")          # a struct, not a FUNC


def test_member_offsets_in_bytes(tiny):
    assert tiny.member_offset("foo", "a") == 0
    assert tiny.member_offset("foo", "b") == 4
    assert tiny.member_offset("foo", "y") == 8          # through the anonymous union
    assert tiny.member_offset("foo", "in.x") == 12      # dotted, through a typedef
    assert tiny.member_offset("bits", "word") == 4      # kind_flag offset encoding
    assert tiny.sizeof("foo") == 16


def test_member_errors_are_one_sentence(tiny):
    with pytest.raises(BTFError, match="no member nope"):
        tiny.member_offset("foo", "nope")
    with pytest.raises(BTFError, match="no struct missing"):
        tiny.member_offset("missing", "a")
    with pytest.raises(BTFError, match="bitfield"):
        tiny.member_offset("bits", "flag")
    with pytest.raises(BTFError, match="not a struct"):
        tiny.member_offset("foo", "a.x")


def test_rejects_bad_blobs():
    good = _blob(TYPES, NAMES)
    with pytest.raises(BTFError, match="not BTF"):
        BTF(b"\0\0" + good[2:])
    # claim one more type byte than there is: the walk must notice
    bad = bytearray(good)
    struct.pack_into("<I", bad, 12, struct.unpack_from("<I", good, 12)[0] - 4)
    with pytest.raises(BTFError, match="truncated"):
        BTF(bytes(bad))


# --- the running kernel -------------------------------------------------------

needs_vmlinux = pytest.mark.skipif(not btf.VMLINUX.exists(), reason="kernel has no BTF")


def _pahole(struct_name: str) -> dict[str, int]:
    out = subprocess.run(["pahole", "-C", struct_name, str(btf.VMLINUX)],
                         capture_output=True, text=True, check=True).stdout
    # "	u32   sk_ack_backlog;   /*   600     4 */"
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"(\w+)(?:\[\d*\])?;\s+/\*\s+(\d+)\s+\d+\s+\*/", out)}


@needs_vmlinux
def test_vmlinux_is_parsed_once():
    assert btf.vmlinux() is btf.vmlinux()
    assert len(btf.vmlinux()) > 10000


@needs_vmlinux
def test_vmlinux_kernel_internal_offsets():
    b = btf.vmlinux()
    backlog = b.member_offset("sock", "sk_ack_backlog")
    assert 0 < backlog < b.sizeof("sock")
    assert btf.member_offset("sock", "sk_ack_backlog") == backlog
    assert b.member_offset("sock", "__sk_common.skc_num") == \
        b.member_offset("sock_common", "skc_num")
    assert b.member_offset("sock_reuseport", "num_socks") > 0
    assert btf.offset_macros({"SK_ACK_BACKLOG_OFF": ("sock", "sk_ack_backlog")}) == \
        [f"-DSK_ACK_BACKLOG_OFF={backlog}"]
    assert b.has_func("tcp_v4_rcv")
    assert not b.has_func("no_such_kernel_function_rpctl")


@needs_vmlinux
@pytest.mark.skipif(not shutil.which("pahole"), reason="pahole not installed")
def test_vmlinux_offsets_agree_with_pahole():
    b = btf.vmlinux()
    for struct_name, members in (("sock", ("sk_ack_backlog", "sk_max_ack_backlog",
                                           "sk_reuseport_cb")),
                                 ("sock_reuseport", ("num_socks", "max_socks", "socks")),
                                 ("inet_sock", ("inet_saddr",))):
        want = _pahole(struct_name)
        for m in members:
            assert b.member_offset(struct_name, m) == want[m], (struct_name, m)
