"""The remap experiment: how many flows change socket when a reuseport group
gains or loses a member, per selection policy, measured on real sockets and
set beside the fraction the policy's mapping predicts.

A fixed set of flows (UDP datagrams from fixed source ports, or TCP
connections from fixed source ports; the 4-tuple, hence the kernel's hash,
is the same every round) is sent to a live group; the group then changes by
one member and the same flows are sent again. A flow "moved" when another
socket received it. The group is walked as a chain: 2, 3, ..., N_max (joins),
then N_max, ..., 2 again (leaves), one round per size.

Membership follows the kernel's own bookkeeping (sock_reuseport.c): a new
socket is appended, a closed socket's slot is filled with the last socket
(`socks[i] = socks[num_socks - 1]`). The eBPF policies' socket array is
kept in that same slot order, so every policy sees the same group.

Theory: each policy is a mapping from a 32-bit hash to a slot
(policies/tables.py); the program sees the kernel's 4-tuple hash (md->hash),
which user space cannot compute (it has a per-boot secret), so the
theoretical fraction is taken over a uniform hash instead:
  kernel     reciprocal_scale(hash, n) == threshold_index: exact, region overlap
  threshold  threshold_index: exact, region overlap
  mod, hash  mod_index: exact, over one period lcm(n_before, n_after)
  consistent jump_index: a fixed uniform sample of hashes (no closed regions)
"""
from __future__ import annotations

import math
import random
import socket
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Iterable

from ..errors import UserError
from ..kernel import bpf
from ..kernel.sockets import open_listener
from ..policies import Policy, parse_policy
from ..policies.tables import jump_index, mod_index, threshold_index

HOST = "127.0.0.1"
DEFAULT_POLICIES = ("kernel", "mod", "hash", "threshold", "consistent")
HASH_POLICIES = DEFAULT_POLICIES
# which pure mapping each policy uses (the kernel default: reciprocal_scale,
# ((u64)hash * n) >> 32, is exactly the hash-threshold mapping)
FAMILY = {"kernel": "threshold", "threshold": "threshold", "mod": "mod", "hash": "mod",
          "consistent": "jump"}
INDEX = {"threshold": threshold_index, "mod": mod_index, "jump": jump_index}
SPACE = 1 << 32
JUMP_SAMPLES = 20000
CLIENT_PORT_BASE = 10000        # below the ephemeral range: the group's port never collides
MAX_FLOWS = 20000

ROW_SCHEMA = {
    "type": "object",
    "required": ["policy", "n_before", "n_after", "flows", "moved_fraction",
                 "theoretical_fraction"],
    "properties": {
        "policy": {"type": "string", "enum": list(HASH_POLICIES)},
        "n_before": {"type": "integer", "minimum": 1},
        "n_after": {"type": "integer", "minimum": 1},
        "flows": {"type": "integer", "minimum": 1},
        "moved_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "theoretical_fraction": {"type": "number", "minimum": 0, "maximum": 1},
        "change": {"type": "string", "enum": ["join", "leave"]},
        "removed_slot": {"type": ["integer", "null"], "minimum": 0},
        "proto": {"type": "string", "enum": ["udp", "tcp"]},
        "lost": {"type": "integer", "minimum": 0},
    },
}
SCHEMA = {"type": "array", "items": ROW_SCHEMA}


# --- theory -----------------------------------------------------------------

def _threshold_breaks(n: int) -> set[int]:
    # threshold_index(h, n) >= k  <=>  h >= k * 2^32 / n
    return {-(-k * SPACE // n) for k in range(n)}


def _exact_threshold(before: list, after: list) -> Fraction:
    nb, na = len(before), len(after)
    points = sorted(_threshold_breaks(nb) | _threshold_breaks(na) | {0}) + [SPACE]
    moved = 0
    for lo, hi in zip(points, points[1:]):
        if hi > lo and before[threshold_index(lo, nb)] != after[threshold_index(lo, na)]:
            moved += hi - lo
    return Fraction(moved, SPACE)


def _exact_mod(before: list, after: list) -> Fraction:
    nb, na = len(before), len(after)
    period = nb * na // math.gcd(nb, na)
    moved = 0
    for r in range(period):
        if before[mod_index(r, nb)] != after[mod_index(r, na)]:
            moved += (SPACE - 1 - r) // period + 1      # hashes h < 2^32 with h % period == r
    return Fraction(moved, SPACE)


@lru_cache(maxsize=1)
def _jump_sample(samples: int) -> tuple[int, ...]:
    rng = random.Random(0x5EED)
    return tuple(rng.getrandbits(32) for _ in range(samples))


@lru_cache(maxsize=64)
def _jump_slots(n: int, samples: int) -> tuple[int, ...]:
    return tuple(jump_index(h, n) for h in _jump_sample(samples))


def _sampled_jump(before: list, after: list, samples: int) -> Fraction:
    sb, sa = _jump_slots(len(before), samples), _jump_slots(len(after), samples)
    moved = sum(before[x] != after[y] for x, y in zip(sb, sa))
    return Fraction(moved, samples)


def theoretical_fraction(policy: str, before: list, after: list,
                         samples: int = JUMP_SAMPLES) -> float:
    """Fraction of a uniform 32-bit hash whose member changes between two
    groups, each given as member identities in slot order."""
    fam = FAMILY[policy]
    if fam == "threshold":
        return float(_exact_threshold(before, after))
    if fam == "mod":
        return float(_exact_mod(before, after))
    return float(_sampled_jump(before, after, samples))


def joined(members: list) -> list:
    """The group after one socket joins (appended: reuseport_add_sock)."""
    return list(members) + [max(members, default=-1) + 1]


def left(members: list, slot: int) -> list:
    """The group after the socket in `slot` leaves: the last socket moves into
    the hole (__reuseport_detach_sock)."""
    out = list(members)
    out[slot] = out[-1]
    out.pop()
    return out


# --- measurement ------------------------------------------------------------

@dataclass
class _Group:
    """A live reuseport group on HOST: member sockets in the kernel's slot
    order, plus the policy's Selector (updated in place as members change)."""
    proto: str
    policy: Policy
    socks: list[socket.socket] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    port: int = 0
    sel: object = None
    _next_id: int = 0
    _in_array: list = field(default_factory=list)   # socket array content (eBPF)

    def _new_socket(self) -> socket.socket:
        s = open_listener(HOST, self.port, self.proto, reuseport=True, backlog=4096,
                          group=tuple(self.socks))
        s.setblocking(False)
        self.port = s.getsockname()[1]
        return s

    def start(self, n: int) -> None:
        for _ in range(n):
            self._append()
        from ..policies.selector import attach_policy
        self.sel = attach_policy(self.policy, self.socks)
        self._in_array = list(self.socks) if self.policy.kind == "ebpf" else []

    def _append(self) -> None:
        self.socks.append(self._new_socket())
        self.ids.append(self._next_id)
        self._next_id += 1

    def join(self) -> None:
        self._append()
        self._resteer()

    def leave(self, slot: int) -> None:
        gone = self.socks[slot]
        self.socks[slot], self.ids[slot] = self.socks[-1], self.ids[-1]
        self.socks.pop()
        self.ids.pop()
        if self.policy.kind == "ebpf":
            self._sync_array(self.socks)     # `gone` leaves the array before it closes
        gone.close()
        if self.policy.kind == "cbpf":
            self._resteer()

    def _resteer(self) -> None:
        kind = self.policy.kind
        if kind == "none":
            return
        if kind == "cbpf":
            from ..policies.selector import attach_policy
            # a cBPF program belongs to the group and its n is part of the
            # code: attaching the new one replaces it (nothing else to free)
            self.sel = attach_policy(self.policy, self.socks)
            return
        self._sync_array(self.socks)

    def _sync_array(self, want: list) -> None:
        """Make the eBPF program's socket array hold `want` in slot order,
        then tell the program the new size (config[0]). A socket sits in one
        slot at a time: every slot that changes is emptied first."""
        fd_socks, fd_table, fd_cfg = (self.sel.maps["socks"], self.sel.maps["table"],
                                      self.sel.maps["config"])
        size = max(len(want), len(self._in_array))
        cur = self._in_array + [None] * (size - len(self._in_array))
        new = list(want) + [None] * (size - len(want))
        for i in range(size):
            if cur[i] is not None and cur[i] is not new[i]:
                try:
                    bpf.map_delete(fd_socks, bpf.u32(i))
                except OSError:
                    pass
        for i in range(size):
            if new[i] is not None and cur[i] is not new[i]:
                bpf.map_update(fd_socks, bpf.u32(i), bpf.u64(new[i].fileno()))
                bpf.map_update(fd_table, bpf.u32(i), bpf.u32(i))
        self._in_array = list(want)
        bpf.map_update(fd_cfg, bpf.u32(0), bpf.u64(len(want)))
        self.sel.n = max(self.sel.n, len(want))

    def close(self) -> None:
        if self.sel is not None:
            if self.policy.kind == "ebpf":
                self.sel.n = max(self.sel.n, len(self._in_array), len(self.socks))
            if self.socks:
                self.sel.member = self.socks[0]
            self.sel.close()
            self.sel = None
        for s in self.socks:
            s.close()
        self.socks.clear()


class _UdpFlows:
    """Fixed UDP flows: one client socket per flow, bound to a fixed source
    port and kept open, so each round repeats the same 4-tuples."""

    def __init__(self, count: int):
        self.clients: list[socket.socket] = []
        try:
            for i in range(count):
                c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.clients.append(c)
                c.bind((HOST, CLIENT_PORT_BASE + i))
        except OSError as e:
            self.close()
            raise UserError(f"cannot bind the flows' source ports ({e.strerror}).") from None

    def round(self, group: _Group) -> dict[int, int]:
        """flow index -> member id that received it."""
        got: dict[int, int] = {}
        dest = (HOST, group.port)
        for i, c in enumerate(self.clients):
            c.sendto(b"f", dest)
            if i % 64 == 63:
                _drain_udp(group, got)
        _drain_udp(group, got)
        return got

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()


def _drain_udp(group: _Group, got: dict[int, int]) -> None:
    for s, mid in zip(group.socks, group.ids):
        while True:
            try:
                _, (_, sport) = s.recvfrom(16)
            except BlockingIOError:
                break
            got[sport - CLIENT_PORT_BASE] = mid


class _TcpFlows:
    """Fixed TCP flows: each round connects from the same source ports;
    both ends close with SO_LINGER 0 (a reset, no TIME_WAIT), so the next
    round can reuse every 4-tuple at once."""
    LINGER0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"

    def __init__(self, count: int):
        self.count = count

    def round(self, group: _Group) -> dict[int, int]:
        got: dict[int, int] = {}
        dest = (HOST, group.port)
        pending: list[socket.socket] = []
        try:
            for i in range(self.count):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                pending.append(c)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self.LINGER0)
                c.bind((HOST, CLIENT_PORT_BASE + i))
                c.connect(dest)
                if i % 64 == 63:
                    self._settle(group, got, pending)
            self._settle(group, got, pending)
        finally:
            for c in pending:
                c.close()
        return got

    def _settle(self, group, got, pending) -> None:
        for s, mid in zip(group.socks, group.ids):
            while True:
                try:
                    a, (_, sport) = s.accept()
                except BlockingIOError:
                    break
                a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self.LINGER0)
                a.close()
                got[sport - CLIENT_PORT_BASE] = mid
        for c in pending:
            c.close()
        pending.clear()

    def close(self) -> None:
        pass


def _row(policy: str, change: str, before_ids: list, after_ids: list, got_before: dict,
         got_after: dict, flows: int, proto: str, removed_slot, samples: int) -> dict:
    common = set(got_before) & set(got_after)
    moved = sum(got_before[f] != got_after[f] for f in common)
    return {
        "policy": policy, "n_before": len(before_ids), "n_after": len(after_ids),
        "flows": len(common),
        "moved_fraction": round(moved / len(common), 6) if common else 0.0,
        "theoretical_fraction": round(theoretical_fraction(policy, before_ids, after_ids,
                                                           samples), 6),
        "change": change, "removed_slot": removed_slot, "proto": proto,
        "lost": flows - len(common),
    }


def parse_remove(spec: str, smallest: int | None = None) -> Callable[[int], int]:
    """'last' | 'first' | K: which slot leaves a group of n. smallest: the
    smallest group a socket leaves, so K must be a slot of it."""
    s = spec.strip().lower()
    if s == "last":
        return lambda n: n - 1
    if s == "first":
        return lambda n: 0
    try:
        k = int(s)
    except ValueError:
        raise UserError(f"--remove takes last, first or a slot number, not {spec!r}.") from None
    if k < 0:
        raise UserError(f"--remove slot must be 0 or more, not {k}.")
    if smallest is not None and k >= smallest:
        raise UserError(f"--remove {k}: the smallest group a socket leaves has {smallest} "
                        f"sockets (slots 0-{smallest - 1}); give a slot in that range, or "
                        f"larger --sizes.")
    return lambda n: min(k, n - 1)


def parse_sizes(spec: str) -> tuple[int, int]:
    """'2-16' or '8-9' -> (smallest, largest) group size of the chain."""
    lo, sep, hi = spec.partition("-")
    try:
        a, b = int(lo), int(hi if sep else lo)
    except ValueError:
        raise UserError(f"--sizes takes LO-HI (e.g. 2-16), not {spec!r}.") from None
    if a < 1 or b <= a:
        raise UserError(f"--sizes needs 1 <= LO < HI, not {spec!r}.")
    if b > 200:
        raise UserError("--sizes goes up to 200 sockets.")
    return a, b


def run_remap(policies: Iterable[str] = DEFAULT_POLICIES, lo: int = 2, hi: int = 16,
              flows: int = 2000, proto: str = "udp", changes: Iterable[str] = ("join", "leave"),
              remove: str = "last", samples: int = JUMP_SAMPLES,
              progress: Callable[[str], None] | None = None) -> list[dict]:
    """Walk each policy's group from lo up to hi sockets (one join per step)
    and back down to lo (one leave per step), a round of flows per size."""
    policies = [parse_policy(p) for p in policies]
    for p in policies:
        if p.name not in HASH_POLICIES:
            raise UserError(f"remap compares hash policies ({', '.join(HASH_POLICIES)}); "
                            f"{p} does not map a flow by its hash.")
    changes = tuple(changes)
    if not 1 <= flows <= MAX_FLOWS:
        raise UserError(f"--flows must be between 1 and {MAX_FLOWS}, not {flows}.")
    pick = parse_remove(remove)
    _raise_nofile(flows + 2 * hi + 64)
    rows: list[dict] = []
    flow_set = _UdpFlows(flows) if proto == "udp" else _TcpFlows(flows)
    port = 0        # every policy's group on one port: a flow has one hash throughout
    try:
        for p in policies:
            g = _Group(proto, p, port=port)
            try:
                g.start(lo)
                port = g.port
                prev_ids, prev = list(g.ids), flow_set.round(g)
                if progress:
                    progress(f"{p} n={lo}")
                if "join" in changes or "leave" in changes:
                    for _ in range(lo, hi):
                        g.join()
                        got = flow_set.round(g)
                        if "join" in changes:
                            rows.append(_row(p.name, "join", prev_ids, g.ids, prev, got, flows,
                                             proto, None, samples))
                        prev_ids, prev = list(g.ids), got
                        if progress:
                            progress(f"{p} join → {len(g.ids)}")
                if "leave" in changes:
                    for _ in range(hi, lo, -1):
                        slot = pick(len(g.ids))
                        g.leave(slot)
                        got = flow_set.round(g)
                        rows.append(_row(p.name, "leave", prev_ids, g.ids, prev, got, flows,
                                         proto, slot, samples))
                        prev_ids, prev = list(g.ids), got
                        if progress:
                            progress(f"{p} leave → {len(g.ids)}")
            finally:
                g.close()
    finally:
        flow_set.close()
    return rows


def steps(policies: Iterable, lo: int, hi: int, changes: Iterable[str]) -> int:
    """How many progress() calls run_remap makes."""
    changes = tuple(changes)
    per = 1 + (hi - lo) + ((hi - lo) if "leave" in changes else 0)
    return len(list(policies)) * per


def _raise_nofile(need: int) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(need, soft), max(need, hard)))
    except (ValueError, OSError):
        raise UserError(f"need {need} open files but RLIMIT_NOFILE is {soft} (hard {hard}): "
                        f"raise it (ulimit -n) or use fewer --flows.") from None


def validate(value, schema: dict = SCHEMA, where: str = "$") -> None:
    """A small JSON Schema subset check (type, required, enum, minimum,
    maximum, items, properties); raises ValueError naming the first fault."""
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "null": lambda v: v is None,
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not any(ok[t](value) for t in names):
            raise ValueError(f"{where}: {value!r} is not of type {types}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        for k in schema.get("required", ()):
            if k not in value:
                raise ValueError(f"{where}: missing {k!r}")
        for k, sub in schema.get("properties", {}).items():
            if k in value:
                validate(value[k], sub, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate(v, schema["items"], f"{where}[{i}]")
