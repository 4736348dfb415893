"""Policies that outlive the command: pinned under /sys/fs/bpf/reuseport-ctl/.

`attach` loads a policy onto a running server's reuseport group and pins the
program and its maps in /sys/fs/bpf/reuseport-ctl/<proto>-<port>/ (mode 0600)
so they stay alive after reuseport-ctl exits; `detach` gives the group back
to the kernel's own hash (SO_DETACH_REUSEPORT_BPF) and removes the pins;
`status` reads them back.

What was attached is recorded beside the pins as `meta`: bpffs holds only BPF
objects (no regular files), so the small JSON document lives in a pinned
one-element BPF array (`bpftool map dump pinned .../meta` shows it). It has the
policy, the slot -> (pid, inode, addr) table printed by attach, and the time.
A cBPF policy has no program or maps to pin, only `meta`, so detach and status
still know it is there (the kernel holds the cBPF program for the group).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .groups import ReuseportGroup, find_group
from .kernel import bpf, diag, owners

BPFFS = Path("/sys/fs/bpf")
ROOT = BPFFS / "reuseport-ctl"
META = "meta"
PROG = "prog"
META_SIZE = 16384         # bytes of JSON a meta map can hold


# --- the pin directory ----------------------------------------------------------

def pin_dir(proto: str, port: int) -> Path:
    return ROOT / f"{proto}-{port}"


def _bpffs_mounted() -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f)


def _private_mount_ns() -> bool:
    """True if this process provably sees other mounts than init (pid 1)."""
    try:
        return os.stat("/proc/self/ns/mnt").st_ino != os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return False          # pid 1 is not ours to inspect: cannot tell


def ensure_bpffs() -> None:
    """Mount the BPF filesystem at /sys/fs/bpf if nothing is mounted there."""
    if _bpffs_mounted():
        return
    if _private_mount_ns():
        raise UserError(f"{BPFFS} has no BPF filesystem in this private mount namespace (`ip "
                        f"netns exec` remounts /sys), so pins would vanish with the command: "
                        f"enter the network namespace with `nsenter --net=/run/netns/NAME`.")
    p = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True)
    if p.returncode != 0:
        raise UserError(f"cannot mount the BPF filesystem at {BPFFS} "
                        f"({p.stderr.strip() or 'mount failed'}), so the policy cannot outlive "
                        f"this command.")


@dataclass
class Meta:
    port: int
    proto: str
    policy: str
    kind: str                        # "cbpf" | "ebpf"
    addr: str                        # the group's local endpoint
    slots: list[dict]                # [{"slot","pid","inode","addr"}]
    maps: list[str] = field(default_factory=list)
    prog: bool = False
    created: float = 0.0
    netns: int = 0                   # inode of the network namespace

    @property
    def inodes(self) -> set[int]:
        return {s["inode"] for s in self.slots}


def write_pins(path: Path, meta: Meta, prog_fd: int | None, maps: dict[str, int]) -> None:
    """Pin prog and maps into a new directory `path` (mode 0700, files 0600)
    together with the meta record."""
    ensure_bpffs()
    ROOT.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700)
    try:
        if prog_fd is not None:
            _pin(prog_fd, path / PROG)
        for name, fd in maps.items():
            _pin(fd, path / f"map_{name}")
        raw = json.dumps(asdict(meta), sort_keys=True).encode()
        if len(raw) >= META_SIZE:
            raise UserError(f"the group is too large to record ({len(raw)} bytes of metadata).")
        mfd = bpf.map_create(bpf.MAP_TYPE_ARRAY, 4, META_SIZE, 1, "rpctl_meta")
        try:
            bpf.map_update(mfd, bpf.u32(0), raw.ljust(META_SIZE, b"\0"))
            _pin(mfd, path / META)
        finally:
            os.close(mfd)
    except BaseException:
        remove_pins(path)
        raise


def _pin(fd: int, path: Path) -> None:
    bpf.obj_pin(fd, str(path))
    os.chmod(path, 0o600)


def read_meta(path: Path) -> Meta | None:
    """The meta record pinned in `path`, or None if nothing is pinned there."""
    if not (path / META).exists():
        return None
    fd = bpf.obj_get(str(path / META))
    try:
        raw = bpf.map_lookup(fd, bpf.u32(0), META_SIZE) or b""
    finally:
        os.close(fd)
    try:
        return Meta(**json.loads(raw.rstrip(b"\0")))
    except (ValueError, TypeError):
        raise UserError(f"{path / META} is not a reuseport-ctl record: remove {path} by hand.") \
            from None


def open_pinned(path: Path, name: str) -> int:
    """An fd for a pinned object ("prog" or "map_<name>"); the caller closes it."""
    return bpf.obj_get(str(path / name))


def remove_pins(path: Path) -> None:
    """Unpin everything in `path` and remove it (the kernel frees each object
    once nothing else -- an attached group, an open fd -- holds it)."""
    if path.exists():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    if ROOT.exists() and not any(ROOT.iterdir()):
        ROOT.rmdir()


# --- attach / detach / status -------------------------------------------------------

def require_caps(verb: str) -> None:
    missing = owners.missing_caps()
    if missing:
        who = "root" if os.geteuid() != 0 else "a process with " + " and ".join(missing)
        raise UserError(f"{verb} needs CAP_BPF and CAP_NET_ADMIN (this process lacks "
                        f"{' and '.join(missing)}): run it as {who}, for example with sudo.")


def _netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _same_netns(meta: Meta | None, verb: str) -> None:
    """Pins are global, ports are per network namespace: never act on another
    namespace's attachment."""
    if meta is not None and meta.netns and meta.netns != _netns():
        raise UserError(f"the reuseport-ctl policy on {meta.proto} port {meta.port} was attached "
                        f"in another network namespace (net:[{meta.netns}]): run {verb} there.")


@dataclass
class Attachment:
    group: ReuseportGroup
    policy: str
    pinned: str
    replaced: str | None = None       # the policy this one replaced
    note: str = ""

    def as_dict(self) -> dict:
        return {"port": self.group.port, "proto": self.group.proto, "policy": self.policy,
                "slots": [{"slot": m.slot, "pid": m.pid, "inode": m.inode, "addr": m.addr}
                          for m in self.group.members],
                "pinned": self.pinned}


def attach(port: int, policy_spec: str, proto: str = "tcp", pid: int | None = None,
           host: str | None = None) -> Attachment:
    """Steer the reuseport group on `port` with a policy that stays attached
    (pinned) until detach. Attaching over an attachment replaces it."""
    from .policies import parse_policy

    require_caps("attach")
    policy = parse_policy(policy_spec)
    if policy.kind == "none":
        raise UserError(f"the kernel's own hash is what a group uses without a program: "
                        f"run `reuseport-ctl detach --port {port}` to go back to it.")
    path = pin_dir(proto, port)
    old = read_meta(path) if path.exists() else None
    _same_netns(old, "attach")
    group = find_group(port, proto, pid=pid, host=host)
    policy.check_group_size(len(group.members))
    if old is not None and not (old.inodes & set(group.inodes)) and old.addr != group.addr:
        raise UserError(f"{proto} port {port} already has a reuseport-ctl policy on another "
                        f"group ({old.addr}): detach it first.")

    from .policies.selector import attach_policy

    meta = Meta(port=port, proto=proto, policy=str(policy), kind=policy.kind, addr=group.addr,
                slots=[{"slot": m.slot, "pid": m.pid, "inode": m.inode, "addr": m.addr}
                       for m in group.members],
                created=time.time(), netns=_netns())
    staging = path.with_name(path.name + "-new")   # bpffs forbids dots in names
    if staging.exists():             # left by an interrupted attach
        remove_pins(staging)
    with group.taken() as socks:
        # A socket sits in one REUSEPORT_SOCKARRAY at a time: take the group's
        # sockets out of the old policy's array (its program falls back to the
        # kernel's hash meanwhile) so the new one can hold them.
        old_socks = _empty_sockarray(path, old)
        try:
            try:
                sel = attach_policy(policy, socks)   # the kernel swaps programs atomically
            except BaseException:
                _refill_sockarray(old_socks, old, socks)
                raise
            try:
                meta.prog = sel.prog_fd is not None
                meta.maps = sorted(sel.maps)
                write_pins(staging, meta, sel.prog_fd, sel.maps)
            except BaseException as e:
                sel.close()                          # detach ours: back to the default...
                _restore(old, path, old_socks, socks)  # ...or to what was there before
                if isinstance(e, OSError):
                    raise UserError(f"cannot pin the policy in {staging} ({e.strerror}), so "
                                    f"it was detached again.") from None
                raise
            if path.exists():
                remove_pins(path)
            staging.rename(path)
            sel.release()                            # the pins (and the group) keep it alive
        finally:
            if old_socks is not None:
                os.close(old_socks)
    note = ("" if policy.kind != "cbpf" else
            "a cBPF program indexes the group in the order its sockets joined, which the "
            "kernel does not report; the slots above are the stable order, not that one.")
    return Attachment(group=group, policy=str(policy), pinned=str(path),
                      replaced=old.policy if old else None, note=note)


def _empty_sockarray(path: Path, old: Meta | None) -> int | None:
    """Delete every slot of the pinned policy's socket array; returns its fd."""
    if old is None or "socks" not in old.maps or not (path / "map_socks").exists():
        return None
    fd = open_pinned(path, "map_socks")
    for slot in range(len(old.slots)):
        try:
            bpf.map_delete(fd, bpf.u32(slot))
        except OSError:
            pass                                     # already empty (socket closed)
    return fd


def _refill_sockarray(fd: int | None, old: Meta | None, socks) -> None:
    """Undo _empty_sockarray: put each still-open socket back in its old slot."""
    if fd is None or old is None:
        return
    by_inode = {os.fstat(s.fileno()).st_ino: s for s in socks}
    for s in old.slots:
        sock = by_inode.get(s["inode"])
        if sock is not None:
            try:
                bpf.map_update(fd, bpf.u32(s["slot"]), bpf.u64(sock.fileno()))
            except OSError:
                pass


def _restore(old: Meta | None, path: Path, old_socks: int | None, socks) -> None:
    """Best effort after a failed re-attach: put the previously pinned program
    (and its socket array) back on the group."""
    if old is None or not old.prog or not (path / PROG).exists():
        return
    _refill_sockarray(old_socks, old, socks)
    try:
        fd = open_pinned(path, PROG)
    except OSError:
        return
    try:
        owners.attach_reuseport_ebpf(socks[0], fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class Detached:
    port: int
    proto: str
    policy: str | None          # what was attached (None: not attached by reuseport-ctl)
    removed: bool               # a program was taken off the group
    pinned: str | None          # the pin directory that was removed
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def detach(port: int, proto: str = "tcp", pid: int | None = None,
           force: bool = False) -> Detached:
    """Give the group back to the kernel's default selection and unpin.
    --force also removes a program that reuseport-ctl did not attach."""
    require_caps("detach")
    path = pin_dir(proto, port)
    meta = read_meta(path) if path.exists() else None
    _same_netns(meta, "detach")
    if meta is None and not force:
        raise UserError(f"no reuseport-ctl policy is attached to {proto} port {port} "
                        f"(use --force to remove a program something else attached).")
    host = meta.addr.rsplit(":", 1)[0] if meta and pid is None else None
    present = {s.inode for s in diag.listeners(port, proto)}
    if meta is not None and not (meta.inodes & present):
        # Every socket we steered is closed: the group (and its program) is gone.
        remove_pins(path)
        return Detached(port, proto, meta.policy, removed=False, pinned=str(path),
                        note="the group it was attached to is gone; removed its pins")
    group = find_group(port, proto, pid=pid, host=host)
    with group.taken() as socks:
        removed = owners.detach_reuseport_prog(socks[0])
    # Take the sockets out of the socket array now: the kernel frees an
    # unpinned map later, and until then no other array could hold them.
    fd = _empty_sockarray(path, meta)
    if fd is not None:
        os.close(fd)
    if meta is None and not removed:
        raise UserError(f"no BPF program is attached to the reuseport group on "
                        f"{proto} port {port}.")
    if meta is not None:
        remove_pins(path)
    return Detached(port, proto, meta.policy if meta else None, removed=removed,
                    pinned=str(path) if meta else None)


@dataclass
class SlotStatus:
    slot: int
    pid: int
    inode: int
    addr: str
    selections: int | None      # how often the program chose this slot (eBPF only)
    alive: bool                 # the socket is still bound to the port


@dataclass
class Status:
    port: int
    proto: str
    policy: str
    kind: str
    created: float
    pinned: str
    slots: list[SlotStatus]

    @property
    def total(self) -> int | None:
        counts = [s.selections for s in self.slots if s.selections is not None]
        return sum(counts) if counts else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def status(port: int, proto: str = "tcp") -> Status:
    """The policy pinned for `port` and the program's per-slot selection counts."""
    require_caps("status")
    path = pin_dir(proto, port)
    meta = read_meta(path) if path.exists() else None
    if meta is None:
        raise UserError(f"no reuseport-ctl policy is attached to {proto} port {port}.")
    counts: list[int] | None = None
    if "selections" in meta.maps:
        from .policies.selector import read_selections

        fd = open_pinned(path, "map_selections")
        try:
            counts = read_selections(fd, len(meta.slots))
        finally:
            os.close(fd)
    present = {s.inode for s in diag.listeners(port, proto)}
    slots = [SlotStatus(slot=s["slot"], pid=s["pid"], inode=s["inode"], addr=s["addr"],
                        selections=counts[s["slot"]] if counts else None,
                        alive=s["inode"] in present)
             for s in meta.slots]
    return Status(port=port, proto=proto, policy=meta.policy, kind=meta.kind,
                  created=meta.created, pinned=str(path), slots=slots)
