"""Policies that outlive the command: pinned under /sys/fs/bpf/reuseport-ctl/.

`attach` loads a policy onto a running server's reuseport group and pins the
program and its maps in /sys/fs/bpf/reuseport-ctl/net-<inode>/<proto>-<port>/
(mode 0600) so they stay alive after reuseport-ctl exits; `detach` gives the
group back to the kernel's own hash (SO_DETACH_REUSEPORT_BPF) and removes the
pins; `status` reads them back.

Ports belong to a network namespace, so pins are keyed by its inode as well
(two containers can each steer their port 80). Pins of the earlier flat
layout (<proto>-<port>/, no namespace) are still read, and replaced on the
next attach. A namespace's inode is reused once it is freed, so the record
also keeps the namespace's cookie (never reused): a pin whose namespace is
gone is stale, and attach, detach and status remove it.

What was attached is recorded beside the pins as `meta`: bpffs holds only BPF
objects (no regular files), so the small JSON document lives in a pinned
one-element BPF array (`bpftool map dump pinned .../meta` shows it). It has the
policy, the slot -> (pid, inode, addr) table, the slots whose socket closed
and that the policy skips (`vacant`), the follower (`attach --follow`) and
the time. A cBPF policy has no program or maps to pin, only `meta`, so detach
and status still know it is there (the kernel holds the cBPF program for the
group).

`run --policy P` (not kernel) pins its group's policy the same way, so
`status` and `watch` from any other process see it: the record's `owner`
names the run ({"verb": "run", "pid", "start", "pidns"}). The run keeps the
record current as workers restart (same sockets, new pids) and removes every
pin when it stops (its end, Ctrl-C, SIGTERM, SIGHUP); a run killed outright
leaves them, and they are stale once its process is gone (removed by the
next attach, detach, status or run, as a gone namespace's are). attach and
detach refuse a group a run owns: the run detaches its policy when it ends
and reports its program's counts, so another policy under it would be
silently undone, or reported as the run's.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import UserError
from .groups import ReuseportGroup, find_group, other_proto
from .kernel import bpf, bpffs, diag, lockfile, netns, owners, process, reuseport
from .signals import committing, pause_for_test

BPFFS = bpffs.DEFAULT
ROOT = BPFFS / "reuseport-ctl"       # as the host sees it
NAME = "reuseport-ctl"
META = "meta"
PROG = "prog"
META_SIZE = 16384         # bytes of JSON a meta map can hold
_ENTRY = re.compile(r"(tcp|udp)-(\d+)")
_NETDIR = re.compile(r"net-(\d+)")


# --- the pin directory ----------------------------------------------------------

def root(mount: bool = False) -> Path:
    """The tool's directory in the bpffs this process reaches (see
    kernel/bpffs.py: under `ip netns exec`, an ancestor's); the host's
    default path when there is none (it then does not exist)."""
    fs = bpffs.find(mount=mount)
    return (fs.path if fs else BPFFS) / NAME


def pin_dir(proto: str, port: int, netns_inode: int | None = None,
            base: Path | None = None) -> Path:
    """Where this network namespace's (or `netns_inode`'s) policy on
    proto/port is pinned."""
    ino = netns.current_inode() if netns_inode is None else netns_inode
    return (base or root()) / f"net-{ino}" / f"{proto}-{port}"


def legacy_dir(proto: str, port: int, base: Path | None = None) -> Path:
    """The flat layout of earlier versions (no network namespace in the name)."""
    return (base or root()) / f"{proto}-{port}"


def hint(verb: str, port: int, proto: str = "tcp", *extra: str) -> str:
    """A reuseport-ctl command line that works as printed."""
    words = ["reuseport-ctl", verb, "--port", str(port)]
    if proto != "tcp":
        words += ["--proto", proto]
    return " ".join(words + list(extra))


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
    netns_cookie: int = 0            # its cookie (0: recorded by an older version)
    vacant: list[int] = field(default_factory=list)   # slots the table skips (socket closed)
    follower: dict | None = None     # {"pid", "start", "pidns"} of `attach --follow`
    fallbacks_seen: int = 0          # config[2] when the follower last repaired the table
    owner: dict | None = None        # {"verb": "run", "pid", "start", "pidns"}: a run's group
    private_mnt: int = 0             # pinned in a bpffs private to this mount namespace
                                     # (attach --private-bpffs): its inode; 0: the host's

    @property
    def inodes(self) -> set[int]:
        return {s["inode"] for s in self.slots if s["slot"] not in self.vacant}

    @property
    def table(self) -> dict[int, int]:
        """inode -> slot of every slot's (last) socket: a closed one's inode
        matches nothing live, and keeps the slot number taken."""
        return {s["inode"]: s["slot"] for s in self.slots}

    @property
    def host(self) -> str:
        return self.addr.rsplit(":", 1)[0].strip("[]")

    @classmethod
    def from_json(cls, raw: bytes) -> "Meta":
        d = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def write_pins(path: Path, meta: Meta, prog_fd: int | None, maps: dict[str, int],
               links: dict[str, int] | None = None) -> None:
    """Pin prog, maps and links (least-conns' raw tracepoints: pinned, they
    stay attached after we exit; unpinned, they detach) into a new directory
    `path` (mode 0700, files 0600) together with the meta record."""
    for d in (path.parent.parent, path.parent):
        d.mkdir(mode=0o700, exist_ok=True)
    path.mkdir(mode=0o700)
    try:
        if prog_fd is not None:
            _pin(prog_fd, path / PROG)
        for name, fd in maps.items():
            _pin(fd, path / f"map_{name}")
        for name, fd in (links or {}).items():
            _pin(fd, path / f"link_{name}")
        mfd = bpf.map_create(bpf.MAP_TYPE_ARRAY, 4, META_SIZE, 1, "rpctl_meta")
        try:
            bpf.map_update(mfd, bpf.u32(0), _encode(meta))
            _pin(mfd, path / META)
        finally:
            os.close(mfd)
    except BaseException:
        remove_pins(path)
        raise


def _encode(meta: Meta) -> bytes:
    raw = json.dumps(asdict(meta), sort_keys=True).encode()
    if len(raw) >= META_SIZE:
        raise UserError(f"the group is too large to record ({len(raw)} bytes of metadata).")
    return raw.ljust(META_SIZE, b"\0")


def update_meta(path: Path, meta: Meta) -> None:
    """Rewrite the pinned record in place (the follower's slot changes)."""
    fd = bpf.obj_get(str(path / META))
    try:
        bpf.map_update(fd, bpf.u32(0), _encode(meta))
    finally:
        os.close(fd)


def _pin(fd: int, path: Path) -> None:
    bpf.obj_pin(fd, str(path))
    os.chmod(path, 0o600)


def read_meta(path: Path) -> Meta | None:
    """The meta record pinned in `path`, or None if nothing is pinned there."""
    if not (path / META).exists():
        return None
    try:
        fd = bpf.obj_get(str(path / META))
    except FileNotFoundError:
        return None                               # removed meanwhile
    try:
        # The follower rewrites the record in place and an array lookup is
        # not atomic against that: a torn read is retried.
        for attempt in range(5):
            raw = bpf.map_lookup(fd, bpf.u32(0), META_SIZE) or b""
            try:
                return Meta.from_json(raw.rstrip(b"\0"))
            except (ValueError, TypeError):
                time.sleep(0.01)
    finally:
        os.close(fd)
    raise UserError(f"{path / META} is not a reuseport-ctl record: remove {path} by hand.")


def open_pinned(path: Path, name: str) -> int:
    """An fd for a pinned object ("prog" or "map_<name>"); the caller closes it."""
    return bpf.obj_get(str(path / name))


def remove_pins(path: Path) -> None:
    """Unpin everything in `path` and remove it (the kernel frees each object
    once nothing else -- an attached group, an open fd -- holds it), and the
    namespace's and the tool's directories once they are empty."""
    if path.exists():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    for d in (path.parent, path.parent.parent):
        if d.name.startswith("net-") or d.name == NAME:
            try:
                d.rmdir()                            # only if empty
            except OSError:
                pass


# --- every pin on the machine, and whose namespace is gone ---------------------------

@dataclass
class Pin:
    path: Path
    proto: str
    port: int
    netns: int                   # the namespace's inode (0: unknown, flat layout)
    meta: Meta | None
    layout: str = "netns"        # "netns" | "flat" (earlier versions)
    state: str = ""              # here | live | stale | orphaned
    open_sockets: int | None = None
    name: str = ""               # its `ip netns` name, if it has one
    in_force: bool | None = None     # as `status --port` says (None: not judged)
    divergence: str | None = None    # its line when not in force

    def as_dict(self) -> dict:
        m = self.meta
        return {"in_force": self.in_force, "divergence": self.divergence,
                "netns": self.netns, "proto": self.proto, "port": self.port,
                "policy": m.policy if m else None, "kind": m.kind if m else None,
                "addr": m.addr if m else None, "state": self.state,
                "stale": self.state == "stale", "layout": self.layout,
                "open_sockets": self.open_sockets, "follower": _follower_pid(m),
                "owner": owner_of(m), "name": self.name,
                "pinned": bpffs.shown(self.path)}


def judge(pin_netns: int, pin_cookie: int, here: tuple[int, int], live_cookie: int | None,
          open_sockets: int | None) -> str:
    """Whose pin this is. here: (inode, cookie) of our namespace; live_cookie:
    the cookie of the live namespace with the pin's inode (0: unknown), None
    when no process or mount reaches a namespace with that inode;
    open_sockets: sockets still in its socket array (None: a cBPF record).
    here/live: the pin's namespace exists; stale: it is gone (a namespace
    with the same inode and another cookie is a new one: inodes are
    reused); orphaned: nothing names it, yet sockets in it are still open."""
    ns_cookie = here[1] if pin_netns == here[0] else live_cookie
    reused = bool(pin_cookie and ns_cookie and pin_cookie != ns_cookie)
    if ns_cookie is not None and not reused:
        return "here" if pin_netns == here[0] else "live"
    return "orphaned" if open_sockets else "stale"


def _open_sockets(path: Path, meta: Meta | None) -> int | None:
    if meta is None or "socks" not in meta.maps or not (path / "map_socks").exists():
        return None
    from .policies.selector import MAX_SLOTS
    from .policies.sockarray import sockarray_cookies
    fd = open_pinned(path, "map_socks")
    try:
        return sum(c is not None for c in sockarray_cookies(fd, min(MAX_SLOTS, len(meta.slots))))
    finally:
        os.close(fd)


def _scan(base: Path) -> list[Pin]:
    """Every pin directory under base, both layouts, unjudged."""
    out: list[Pin] = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        if m := _NETDIR.fullmatch(d.name):
            for e in sorted(d.iterdir()):
                if k := _ENTRY.fullmatch(e.name):
                    out.append(Pin(e, k[1], int(k[2]), int(m[1]), read_meta(e)))
        elif k := _ENTRY.fullmatch(d.name):
            meta = read_meta(d)
            out.append(Pin(d, k[1], int(k[2]), meta.netns if meta else 0, meta, layout="flat"))
    return out


def _here() -> tuple[int, int]:
    return netns.current_inode(), netns.current_cookie()


def pins_everywhere(base: Path | None = None, proto: str | None = None,
                    port: int | None = None) -> list[Pin]:
    """Every pin on the machine (or of one proto/port), each judged
    (here/live/stale/orphaned). Costs a walk of /proc (every task's
    namespace and open nsfs fds) when a pin is another namespace's."""
    base = base or root()
    found = [p for p in _scan(base) if port is None or (p.proto, p.port) == (proto, port)]
    here = _here()
    live = netns.live_namespaces() if any(p.netns != here[0] for p in found) else {}
    cookies: dict[int, int] = {}
    for p in found:
        cookie = p.meta.netns_cookie if p.meta else 0
        live_cookie = None
        if p.netns != here[0] and p.netns in live:
            if cookie and p.netns not in cookies:
                cookies[p.netns] = netns.cookie_of(live[p.netns])
            live_cookie = cookies.get(p.netns, 0)
        p.open_sockets = _open_sockets(p.path, p.meta)
        p.state = judge(p.netns, cookie, here, live_cookie, p.open_sockets)
        if p.state in ("here", "live") and owner_gone(p.meta, p.open_sockets):
            p.state = "stale"
        where = live.get(p.netns, "")
        if p.state in ("here", "live") and "/run/netns/" in where:
            p.name = where.rsplit("/", 1)[1]
        if p.state in ("here", "live") and p.meta is not None:
            _judge_force(p, None if p.state == "here" else where)
    return found


def _judge_force(p: Pin, where: str | None) -> None:
    """Is p's policy in force, as `status --port` would say (its group's
    sockets, dumped in p's network namespace: `where` names it; None: ours)?"""
    try:
        listening = (diag.listeners(p.port, p.proto) if where is None else
                     netns.call_in(where, lambda: diag.listeners(p.port, p.proto)))
        if listening is None:
            return                       # its namespace could not be entered
        st = _state(p, listening)
    except (OSError, UserError):
        return
    p.in_force, p.divergence = st.in_force, st.divergence


@lockfile.serialised("removing stale pins")
def clean_stale(proto: str | None = None, port: int | None = None,
                base: Path | None = None) -> list[Pin]:
    """Remove the pins whose namespace is gone (of one proto/port, or all);
    returns them. Their sockets are closed, so nothing else is lost."""
    gone = [p for p in pins_everywhere(base, proto, port) if p.state == "stale"]
    for p in gone:
        remove_pins(p.path)
    return gone


def current_pin(proto: str, port: int, base: Path | None = None) -> Pin | None:
    """This namespace's pin for proto/port (the flat layout's if its record
    names this namespace), or a stale one left at our path by a namespace
    that had our inode before us (state "stale"). Cheap: no /proc walk."""
    base = base or root()
    here = _here()
    path = pin_dir(proto, port, here[0], base)
    meta = read_meta(path) if path.exists() else None
    if meta is not None:
        state = judge(here[0], meta.netns_cookie, here, None, None)
        if state == "here" and meta.owner and owner_gone(meta, _open_sockets(path, meta)):
            state = "stale"
        return Pin(path, proto, port, here[0], meta, state=state)
    flat = legacy_dir(proto, port, base)
    meta = read_meta(flat) if flat.exists() else None
    if meta is not None and meta.netns in (0, here[0]):
        return Pin(flat, proto, port, here[0], meta, layout="flat", state="here")
    return None


def _readable(verb: str) -> tuple[bpffs.BpfFs | None, Path]:
    """The bpffs `verb` reads the pins from (None: none is mounted here, so
    nothing is pinned) and the pins' root in it; refused where the host's
    bpffs cannot be reached (the pins would look absent)."""
    fs = bpffs.find()
    if fs is None and (why := bpffs.unseen(verb)):
        raise UserError(why + ".")
    return fs, (fs.path if fs else BPFFS) / NAME


def _mine(proto: str, port: int, base: Path | None = None) -> tuple[Pin | None, list[Pin]]:
    """This namespace's live pin for proto/port, after removing the stale
    pins of that proto/port anywhere (returned second)."""
    cleaned = clean_stale(proto, port, base)
    pin = current_pin(proto, port, base)
    if pin is not None and pin.state == "stale":   # only if the walk above missed it
        remove_pins(pin.path)
        cleaned.append(pin)
        pin = None
    return pin, cleaned


def _stale_note(cleaned: list[Pin]) -> str:
    if not cleaned:
        return ""
    runs = [p for p in cleaned if p.meta and p.meta.owner]
    gone = [p for p in cleaned if p not in runs]
    notes = []
    if gone:
        what = ", ".join(f"{p.meta.policy if p.meta else '?'} of net:[{p.netns}]" for p in gone)
        n = len(gone)
        notes.append(f"removed {n} stale pin{'s' if n > 1 else ''} ({what}): "
                     f"{'their network namespaces are' if n > 1 else 'its network namespace is'}"
                     f" gone")
    if runs:
        what = ", ".join(f"{p.meta.policy} of reuseport-ctl run pid {p.meta.owner['pid']}"
                         for p in runs)
        n = len(runs)
        notes.append(f"removed {n} stale pin{'s' if n > 1 else ''} ({what}): "
                     f"{'those runs were' if n > 1 else 'that run was'} killed without "
                     f"removing {'them' if n > 1 else 'it'}")
    return "; ".join(notes)


def _pin_here(port: int, proto: str) -> "Pin | None":
    """The pin of port in this network namespace; None when there is none
    (or when this process cannot read the pins)."""
    try:
        pin = current_pin(proto, port)
    except (UserError, OSError):
        return None
    return pin if pin is not None and pin.state == "here" else None


def pinned_slots(port: int, proto: str = "tcp") -> dict[int, int] | None:
    """inode -> slot of the policy pinned for port in this network namespace
    (None: none is): pass it to groups.find_group(slots=...) so every verb
    numbers the members as the policy does."""
    pin = _pin_here(port, proto)
    return pin.meta.table if pin is not None else None


def _this_process(**extra) -> dict:
    """A record that names this process for good (pid and start time) in
    its pid namespace: a follower's, a run's."""
    me = os.getpid()
    return {**extra, "pid": me, "start": process.start_time(me), "pidns": process.pid_ns()}


def _running(rec: dict) -> bool | None:
    """Whether the recorded process still runs (a zombie, killed but not yet
    reaped, does not); None when its pid namespace is not ours."""
    if rec.get("pidns") != process.pid_ns():
        return None
    pid = rec["pid"]
    return process.alive(pid, rec["start"]) and process.state(pid) not in ("Z", "X", "")


def _follower_pid(meta: Meta | None) -> int | None:
    """The follower's pid if it is still running (in our pid namespace)."""
    f = meta.follower if meta else None
    return f["pid"] if f and _running(f) else None


def owner_of(meta: Meta | None) -> dict | None:
    """Who owns a run's pin: {"verb", "pid", "alive"} (alive: True, False,
    or None when its pid namespace is not ours); None for attach's pins."""
    o = meta.owner if meta else None
    if not o:
        return None
    return {"verb": o.get("verb", "run"), "pid": o["pid"], "alive": _running(o)}


def owner_gone(meta: Meta | None, open_sockets: int | None = None) -> bool:
    """A run's pin whose run is gone: killed outright (SIGKILL), so it did not
    remove its pins; its workers died with it and its sockets are closed.
    From another pid namespace the pid cannot be checked: there, a socket
    array left with no open socket says it (a cBPF record: unknown, kept)."""
    o = meta.owner if meta else None
    if not o:
        return False
    alive = _running(o)
    return open_sockets == 0 if alive is None else not alive


def _owned_refusal(verb: str, meta: Meta, proto: str, port: int) -> UserError:
    """attach/detach on a run's group: one sentence. The run detaches its
    policy when it stops (a policy attached over it would go too) and
    reports its program's counts (detached under it, they would be wrong)."""
    pid = (meta.owner or {}).get("pid")
    why = {"attach": "and the run detaches whatever program the group has when it stops: "
                     "stop that run, or start it again with the --policy you want",
           "detach": "which the run reports on and removes when it stops: stop that run "
                     f"(Ctrl-C, or kill {pid}) to give the group back to the kernel's hash",
           "run": "and that run is still going: stop it first"}[verb]
    return UserError(f"{proto} port {port} is steered by `reuseport-ctl run` (pid {pid}) with "
                     f"policy {meta.policy}, {why}.")


FOLLOW_DONE = signal.SIGUSR1      # to a follower: your policy is detached or replaced


def stop_follower(meta: Meta | None) -> int | None:
    """Tell the `attach --follow` recorded in meta that its policy is being
    detached or replaced (SIGUSR1: it ends with status 0, unlike a stop from
    outside) and wait for it to exit; its pid, or None if none was running
    here. (A follower in another pid namespace cannot be signalled from
    here: it sees within a tick that the record is no longer its own, and
    exits.)"""
    pid = _follower_pid(meta)
    if pid is None:
        return None
    process.terminate(pid, meta.follower["start"], sig=FOLLOW_DONE)
    return pid


# --- attach / detach / status -------------------------------------------------------

def require_caps(verb: str) -> None:
    missing = owners.missing_caps()
    if missing:
        who = "root" if os.geteuid() != 0 else "a process with " + " and ".join(missing)
        raise UserError(f"{verb} needs CAP_BPF and CAP_NET_ADMIN (this process lacks "
                        f"{' and '.join(missing)}): run it as {who}, for example with sudo.")


def _slot_record(m) -> dict:
    return {"slot": m.slot, "pid": m.pid, "inode": m.inode, "addr": m.addr,
            "tids": list(m.threads)}


@dataclass
class Attachment:
    group: ReuseportGroup
    policy: str
    pinned: str
    replaced: str | None = None       # the policy this one replaced
    note: str = ""
    netns: int = 0
    follow: bool = False
    stopped_follower: int | None = None
    state: "PolicyState | None" = None
    pinned_host: str | None = ""      # the same path in the host's mount namespace
                                      # (None: a private bpffs the host does not see)

    @property
    def hints(self) -> dict[str, str]:
        port, proto = self.group.port, self.group.proto
        return {"status": hint("status", port, proto), "detach": hint("detach", port, proto)}

    def as_dict(self) -> dict:
        return {"port": self.group.port, "proto": self.group.proto, "policy": self.policy,
                "slots": [_slot_record(m) for m in self.group.members],
                "pinned": self.pinned,
                "pinned_host": self.pinned if self.pinned_host == "" else self.pinned_host,
                "netns": self.netns, "follow": self.follow,
                "replaced": self.replaced, "note": self.note,
                "stopped_follower": self.stopped_follower, "hints": self.hints,
                "state": self.state.as_dict() if self.state else None}


@lockfile.serialised("attach", first=lambda: require_caps("attach"))
def attach(port: int, policy_spec: str, proto: str = "tcp", pid: int | None = None,
           host: str | None = None, follow: bool = False,
           private_bpffs: bool = False) -> Attachment:
    """Steer the reuseport group on `port` with a policy that stays attached
    (pinned) until detach. Attaching over an attachment replaces it (and
    stops its follower). follow: record this process as the policy's
    follower (follow.Follower keeps the table current). private_bpffs: pin
    in a bpffs private to this mount namespace when none shared with the
    host is reachable (kernel/bpffs.py; refused otherwise)."""
    from .policies import parse_policy

    require_caps("attach")
    policy = parse_policy(policy_spec)
    if policy.kind == "none":
        raise UserError(f"the kernel's own hash is what a group uses without a program: "
                        f"run `{hint('detach', port, proto)}` to go back to it.")
    if follow and policy.name == "numa":
        raise UserError("--follow cannot keep numa's per-node table current; attach numa "
                        "without --follow.")
    fs = bpffs.find(mount=True, private_ok=private_bpffs)
    base = fs.path / NAME
    cur, cleaned = _mine(proto, port, base)
    old = cur.meta if cur else None
    if old is not None and old.owner:
        raise _owned_refusal("attach", old, proto, port)
    group = find_group(port, proto, pid=pid, host=host, slots=old.table if old else None)
    if old is not None and not (old.inodes & set(group.inodes)) and old.addr != group.addr:
        raise UserError(f"{proto} port {port} already has a reuseport-ctl policy on another "
                        f"group ({old.addr}): `{hint('detach', port, proto)}` it first.")
    # The pinned table's order, renumbered 0..n-1 (no vacant slots in a new table).
    group = replace(group, members=tuple(replace(m, slot=n, in_policy=True)
                                         for n, m in enumerate(group.members)))
    policy.check_group_size(len(group.members))
    stopped = stop_follower(old)

    from .policies.selector import attach_policy

    here = _here()
    meta = Meta(port=port, proto=proto, policy=str(policy), kind=policy.kind, addr=group.addr,
                slots=[_slot_record(m) for m in group.members],
                created=time.time(), netns=here[0], netns_cookie=here[1],
                private_mnt=fs.mnt_ns if fs.private else 0)
    if follow:
        meta.follower = _this_process()
    path = pin_dir(proto, port, here[0], base)
    old_path = cur.path if cur else None
    staging = path.with_name(path.name + "-new")   # bpffs forbids dots in names
    if staging.exists():             # left by an interrupted attach
        remove_pins(staging)
    with group.taken() as socks:
        # A socket sits in one REUSEPORT_SOCKARRAY at a time: take the group's
        # sockets out of the old policy's array (its program falls back to the
        # kernel's hash meanwhile) so the new one can hold them.
        old_socks = _empty_sockarray(old_path, old)
        try:
            try:
                # numa: each slot's node from its worker's affinity (not
                # from where this tool's own CPUs are)
                nodes = _member_nodes(group) if policy.name == "numa" else None
                sel = attach_policy(policy, socks, nodes=nodes)   # swapped atomically
            except BaseException:
                _refill_sockarray(old_socks, old, socks)
                raise
            try:
                meta.prog = sel.prog_fd is not None
                meta.maps = sorted(sel.maps)
                write_pins(staging, meta, sel.prog_fd, sel.maps, sel.links)
                pause_for_test("staged")
            except BaseException as e:
                # Not committed yet (a signal, a failure): undo all of it.
                if staging.exists():
                    remove_pins(staging)
                sel.close()                          # detach ours: back to the default...
                _restore(old, old_path, old_socks, socks)  # ...or to what was there before
                if isinstance(e, OSError):
                    raise UserError(f"cannot pin the policy in {bpffs.shown(staging)} "
                                    f"({e.strerror}), so it was detached again.") from None
                raise
            # The point of no return: from here a stopping signal cannot undo
            # the attach (the old pins go), so it is noted, not raised, and
            # attach ends as it succeeded (signals.committing()).
            with committing():
                if old_path is not None:
                    remove_pins(old_path)            # (the flat layout's, on upgrade)
                if path.exists():
                    remove_pins(path)
                staging.rename(path)
                sel.release()                        # the pins (and the group) keep it alive
                pause_for_test("committed")
        finally:
            if old_socks is not None:
                os.close(old_socks)
    notes = [n for n in (fs.note, _stale_note(cleaned)) if n]
    if policy.kind == "cbpf":
        notes.append("a cBPF program indexes the group in the order its sockets joined, which "
                     "the kernel does not report; the slots above are the stable order, not "
                     "that one.")
    host_path = fs.host_path(path)
    return Attachment(group=group, policy=str(policy), pinned=bpffs.shown(path),
                      replaced=old.policy if old else None, note="; ".join(notes),
                      netns=here[0], follow=follow, stopped_follower=stopped,
                      state=policy_state(port, proto),
                      pinned_host=str(host_path) if host_path is not None else None)


def _member_nodes(group: ReuseportGroup) -> list[int]:
    from .kernel.nic import cpu_nodes
    node = cpu_nodes()
    return [process.node_of(m.pid, node) for m in group.members]


def _empty_sockarray(path: Path | None, old: Meta | None) -> int | None:
    """Delete every slot of the pinned policy's socket array; returns its fd."""
    if path is None or old is None or "socks" not in old.maps \
            or not (path / "map_socks").exists():
        return None
    from .policies.sockarray import empty_slots
    fd = open_pinned(path, "map_socks")
    empty_slots(fd, len(old.slots))
    return fd


def _refill_sockarray(fd: int | None, old: Meta | None, socks) -> None:
    """Undo _empty_sockarray: put each still-open socket back in its old slot."""
    if fd is None or old is None:
        return
    from .policies.sockarray import put_in_slot
    by_inode = {os.fstat(s.fileno()).st_ino: s for s in socks}
    for s in old.slots:
        sock = by_inode.get(s["inode"])
        if sock is not None and s["slot"] not in old.vacant:
            try:
                put_in_slot(fd, s["slot"], sock)
            except OSError:
                pass


def _restore(old: Meta | None, path: Path | None, old_socks: int | None, socks) -> None:
    """Best effort after a failed re-attach: put the previously pinned program
    (and its socket array) back on the group."""
    if old is None or path is None or not old.prog or not (path / PROG).exists():
        return
    _refill_sockarray(old_socks, old, socks)
    try:
        fd = open_pinned(path, PROG)
    except OSError:
        return
    try:
        reuseport.attach_ebpf(socks[0], fd)
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
    stopped_follower: int | None = None
    stale: list[dict] = field(default_factory=list)   # stale pins removed on the way

    def as_dict(self) -> dict:
        return asdict(self)


@lockfile.serialised("detach", first=lambda: require_caps("detach"))
def detach(port: int, proto: str = "tcp", pid: int | None = None, host: str | None = None,
           force: bool = False) -> Detached:
    """Give the group back to the kernel's default selection and unpin (the
    follower first, if one runs). --force also removes a program that
    reuseport-ctl did not attach. Stale pins of proto/port are removed too."""
    require_caps("detach")
    _, base = _readable("detach")
    shown = bpffs.shown
    cur, cleaned = _mine(proto, port, base)
    stale = [p.as_dict() for p in cleaned]
    meta = cur.meta if cur else None
    path = cur.path if cur else None
    if meta is not None and meta.owner:
        raise _owned_refusal("detach", meta, proto, port)
    if meta is None and not force:
        if cleaned:
            return Detached(port, proto, None, removed=False, pinned=None,
                            note=_stale_note(cleaned), stale=stale)
        raise UserError(f"no reuseport-ctl policy is attached to {proto} port {port} in this "
                        f"network namespace{_no_policy_why(base, proto, port, force=True)}.")
    stopped = stop_follower(meta)
    if meta is not None and pid is None and host is None:
        host = meta.host
    notes = [n for n in (_stale_note(cleaned),) if n]
    if meta is not None and not any(s.endpoint == meta.addr
                                    for s in diag.listeners(port, proto)):
        # Every socket we steered is closed: the group (and its program) is gone.
        remove_pins(path)
        notes.insert(0, "the group it was attached to is gone; removed its pins")
        return Detached(port, proto, meta.policy, removed=False, pinned=str(shown(path)),
                        note="; ".join(notes), stopped_follower=stopped, stale=stale)
    group = find_group(port, proto, pid=pid, host=host)
    # From the program's detach to the pins' removal a stopping signal is
    # noted, not raised: it must not leave the group given back but pinned.
    with committing():
        with group.taken() as socks:
            removed = reuseport.detach_if_any(socks[0])
        # Take the sockets out of the socket array now: the kernel frees an
        # unpinned map later, and until then no other array could hold them.
        fd = _empty_sockarray(path, meta)
        if fd is not None:
            os.close(fd)
        pause_for_test("given back")
        if meta is not None:
            remove_pins(path)
    if meta is None and not removed:
        raise UserError(f"no BPF program is attached to the reuseport group on "
                        f"{proto} port {port}.")
    return Detached(port, proto, meta.policy if meta else None, removed=removed,
                    pinned=str(shown(path)) if meta else None, note="; ".join(notes),
                    stopped_follower=stopped, stale=stale)


# --- a run's group: pinned while the run lasts ----------------------------------------

@lockfile.serialised("run (pinning its policy)")
def pin_run(sel, socks: list, pids: list[int], port: int, proto: str) -> tuple[Path, str]:
    """Pin the policy `run` attached to its own group (the Selector `sel`
    over `socks`, slot i served by pids[i]) where attach would, with this
    process as the record's owner; returns the pin directory and a note
    (what was removed on the way). The port was free when run bound it, so
    a pin already there is of a group that is gone: it is replaced."""
    fs = bpffs.find(mount=True, private_ok=True)
    base = fs.path / NAME
    cur, cleaned = _mine(proto, port, base)
    notes = [_stale_note(cleaned)] if cleaned else []
    if fs.private:
        notes.append(fs.note)
    if cur is not None:
        if cur.meta.owner and owner_of(cur.meta)["alive"]:
            raise _owned_refusal("run", cur.meta, proto, port)
        remove_pins(cur.path)
        notes.append(f"removed the pins of {cur.meta.policy}, attached to a group on "
                     f"{proto} port {port} that is gone")
    inodes = [os.fstat(s.fileno()).st_ino for s in socks]
    addr = {s.inode: s.endpoint for s in diag.listeners(port, proto)}
    here = _here()
    policy = sel.policy
    meta = Meta(port=port, proto=proto, policy=str(policy), kind=policy.kind,
                addr=addr.get(inodes[0], ""),
                slots=[{"slot": i, "pid": pid, "inode": ino, "addr": addr.get(ino, ""),
                        "tids": []} for i, (ino, pid) in enumerate(zip(inodes, pids))],
                maps=sorted(sel.maps), prog=sel.prog_fd is not None, created=time.time(),
                netns=here[0], netns_cookie=here[1],
                owner=_this_process(verb="run"),
                private_mnt=fs.mnt_ns if fs.private else 0)
    path = pin_dir(proto, port, here[0], base)
    try:
        # Not its links (least-conns' tracepoints): pinned, they would stay
        # attached after a run killed outright, until the stale pin goes.
        write_pins(path, meta, sel.prog_fd, sel.maps)
    except OSError as e:
        raise UserError(f"cannot pin the {policy} policy in {path} ({e.strerror}), so "
                        f"status and watch could not see it; run did not start.") from None
    return path, "; ".join(notes)


def repin_run(path: Path, slot: int, pid: int) -> None:
    """A run's worker in `slot` restarted as `pid` (same socket): record it."""
    meta = read_meta(path)
    if meta is None or not _is_mine(meta):
        return
    for s in meta.slots:
        if s["slot"] == slot:
            s["pid"] = pid
    update_meta(path, meta)


def _is_mine(meta: Meta) -> bool:
    o = meta.owner or {}
    return o.get("pid") == os.getpid() and o.get("pidns") == process.pid_ns()


@lockfile.serialised("run (removing its pins)")
def unpin_run(path: Path) -> None:
    """Remove the pins pin_run made (only if the record there is still ours)."""
    try:
        meta = read_meta(path)
    except UserError:
        return
    if meta is not None and _is_mine(meta):
        remove_pins(path)


# --- is the policy in force? ------------------------------------------------------

def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def divergence(gone: list[int], new: int, fallbacks: int | None, proto: str = "tcp") -> str | None:
    """The one line that says how the live group differs from the pinned
    table, or None when it does not. gone: slots whose socket closed and
    that the table still has; new: sockets on the group's address the
    policy does not have; fallbacks: the selector's count of choices that
    found an empty slot (the kernel's hash decided those)."""
    if not gone and not new:
        return None
    parts = []
    if gone:
        names = _and([str(k) for k in gone])
        parts.append(f"slot {names}'s socket is gone" if len(gone) == 1
                     else f"the sockets of slots {names} are gone")
    if new:
        parts.append(f"{new} new socket{'s' if new > 1 else ''} not in the policy")
    line = "; ".join(parts)
    unit = "connections" if proto == "tcp" else "datagrams"
    if fallbacks:
        return f"{line}: {fallbacks:,} {unit} went by the kernel's hash"
    if gone:
        return f"{line}: its share goes by the kernel's hash"
    return f"{line}: {'it gets' if new == 1 else 'they get'} no new {unit}"


@dataclass
class PolicyState:
    """How the pinned policy and the live group compare, now. Cheap enough
    for every watch interval: the pinned record and socket array, the
    selector's fallback counter, and one sock_diag dump of the port."""
    port: int
    proto: str
    policy: str
    kind: str
    in_force: bool
    divergence: str | None       # the one line (None when in force)
    slots: dict[int, int]        # inode -> slot, for every slot that has a live socket
    gone: list[int]              # slots whose socket closed, still in the table
    skipped: list[int]           # slots whose socket closed, left out of the table (follow)
    new: list[int]               # inodes on the group's address not in the policy
    fallbacks: int | None        # choices that found an empty slot (eBPF only)
    follower: int | None         # pid of a running `attach --follow`
    pinned: str
    owner: dict | None = None    # a run's group: {"verb": "run", "pid", "alive"}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["slots"] = {str(k): v for k, v in self.slots.items()}
        return d


def policy_state(port: int, proto: str = "tcp", listening: list | None = None) -> PolicyState | None:
    """The state of the policy pinned for port in this network namespace,
    None when none is (or when this process cannot read the pins).
    listening: the port's sockets, when the caller has just dumped them."""
    pin = _pin_here(port, proto)
    if pin is None:
        return None
    return _state(pin, diag.listeners(port, proto) if listening is None else listening)


def _state(pin: Pin, listening) -> PolicyState:
    meta, path = pin.meta, pin.path
    live = {s.inode: s for s in listening if s.endpoint == meta.addr}
    fallbacks = None
    if meta.kind == "ebpf" and (path / "map_socks").exists():
        from .policies.selector import read_fallbacks
        from .policies.sockarray import sockarray_cookies
        fd = open_pinned(path, "map_socks")
        try:
            cookies = sockarray_cookies(fd, len(meta.slots))
        finally:
            os.close(fd)
        if (path / "map_config").exists():
            fd = open_pinned(path, "map_config")
            try:
                fallbacks = read_fallbacks(fd)
            finally:
                os.close(fd)
        by_cookie = {s.cookie: i for i, s in live.items()}
        slots = {by_cookie[c]: k for k, c in enumerate(cookies) if c in by_cookie}
        empty = [k for k, c in enumerate(cookies) if c is None or c not in by_cookie]
    else:
        # cBPF: no array; the record's sockets are the policy's
        slots = {s["inode"]: s["slot"] for s in meta.slots if s["inode"] in live}
        empty = [s["slot"] for s in meta.slots if s["inode"] not in live]
    gone = [k for k in empty if k not in meta.vacant]
    skipped = [k for k in empty if k in meta.vacant]
    new = sorted(i for i in live if i not in slots)
    line = divergence(gone, len(new), fallbacks, meta.proto)
    if not live:
        line = (f"nothing listens on {meta.addr} any more: the policy steers nothing "
                f"(`{hint('detach', meta.port, meta.proto)}` removes it)")
    elif not slots and new:
        # The program hangs on the reuseport group, which died with its last
        # old socket: the new sockets form a group without it.
        line = (f"every socket on {meta.addr} is new (the server restarted): the pinned "
                f"program is not attached to them, so the kernel's hash decides; attach "
                f"again, or keep the policy in force with --follow")
    return PolicyState(port=meta.port, proto=meta.proto, policy=meta.policy, kind=meta.kind,
                       in_force=not gone and not new and bool(live),
                       divergence=line,
                       slots=slots, gone=gone, skipped=skipped, new=new, fallbacks=fallbacks,
                       follower=_follower_pid(meta), pinned=bpffs.shown(path),
                       owner=owner_of(meta))


@dataclass
class SlotStatus:
    slot: int
    pid: int
    inode: int
    addr: str
    selections: int | None      # how often the program chose this slot (eBPF only)
    alive: bool                 # the socket is still bound to the port
    in_policy: bool = True      # False: a socket on the port the policy does not have
    skipped: bool = False       # its socket closed and the table leaves it out
    tids: list[int] = field(default_factory=list)   # a threaded server: the threads
                                                     # waiting on it now


@dataclass
class Status:
    port: int
    proto: str
    policy: str
    kind: str
    created: float
    pinned: str
    slots: list[SlotStatus]
    netns: int = 0
    in_force: bool = True
    divergence: str | None = None
    fallbacks: int | None = None
    no_napi: int | None = None   # napi: packets without a NAPI id (the kernel's hash decided)
    follower: int | None = None
    note: str = ""
    hints: dict = field(default_factory=dict)
    pinned_host: str | None = ""    # None: a private bpffs the host does not see
    owner: dict | None = None    # a run's group: {"verb": "run", "pid", "alive"}

    @property
    def total(self) -> int | None:
        counts = [s.selections for s in self.slots if s.selections is not None]
        return sum(counts) if counts else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def _attached_elsewhere(base: Path, proto: str, port: int) -> str:
    """' (... attached in network namespace NAME: `ip netns exec NAME ...`)'
    when proto/port has a live pin in another network namespace; else ''."""
    others = [p for p in pins_everywhere(base, proto, port) if p.state == "live"]
    if not others:
        return ""
    p = others[0]
    if p.name:
        return (f" (it has one in network namespace {p.name}: "
                f"`ip netns exec {p.name} {hint('status', port, proto)}`)")
    return f" (it has one in another network namespace, net:[{p.netns}])"


def _no_policy_why(base: Path, proto: str, port: int, force: bool) -> str:
    """What to try when proto/port has no policy here. Where a group listens:
    --force (detach), for a program something else attached. Where none
    does: the other protocol, if it has sockets on the port (the usual slip),
    else another network namespace that has a policy on it."""
    if diag.listeners(port, proto):
        return (f" (`{hint('detach', port, proto, '--force')}` removes a program something "
                f"else attached)") if force else ""
    if other := other_proto(port, proto):
        return f"; nothing listens on it either{other}"
    if elsewhere := _attached_elsewhere(base, proto, port):
        return elsewhere
    return "; nothing listens on it either"


def status(port: int, proto: str = "tcp") -> Status:
    """The policy pinned for `port` in this network namespace, the program's
    per-slot selection counts, and whether it is in force."""
    require_caps("status")
    fs, base = _readable("status")
    pin, cleaned = _mine(proto, port, base)
    notes = [n for n in (fs.note if fs else "", _stale_note(cleaned)) if n]
    if pin is None:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise UserError(f"no reuseport-ctl policy is attached to {proto} port {port} in this "
                        f"network namespace{why}{_no_policy_why(base, proto, port, force=False)}.")
    meta, path = pin.meta, pin.path
    if meta.private_mnt:
        notes.insert(0, _private_note(meta))
    counts: list[int] | None = None
    if "selections" in meta.maps:
        from .policies.selector import read_selections

        fd = open_pinned(path, "map_selections")
        try:
            counts = read_selections(fd, len(meta.slots))
        finally:
            os.close(fd)
    listening = diag.listeners(port, proto)
    st = _state(pin, listening)
    # Who serves each socket now (a /proc walk): the record has the pids of
    # attach time, and a server's workers come and go (nginx -s reload keeps
    # the sockets and replaces every worker).
    try:
        group = find_group(port, proto, host=meta.host, slots=meta.table) if listening else None
    except UserError:
        group = None
    now = {m.inode: m for m in group.members} if group else {}

    def who(inode: int, pid: int) -> tuple[int, list[int]]:
        m = now.get(inode)
        return (m.pid, list(m.threads)) if m else (pid, [])

    slots = []
    for s in meta.slots:
        pid, tids = who(s["inode"], s["pid"])
        slots.append(SlotStatus(slot=s["slot"], pid=pid, inode=s["inode"], addr=s["addr"],
                                selections=counts[s["slot"]] if counts else None,
                                alive=st.slots.get(s["inode"]) == s["slot"],
                                skipped=s["slot"] in st.skipped, tids=tids))
    if st.new:
        nxt = len(meta.slots)
        extra = {i: m for i, m in now.items() if not m.in_policy}
        for inode in sorted(st.new, key=lambda i: (i not in extra,
                                                   extra[i].slot if i in extra else i)):
            m = extra.get(inode)
            slots.append(SlotStatus(slot=m.slot if m else nxt, pid=m.pid if m else 0,
                                    inode=inode, addr=meta.addr,
                                    selections=0 if counts else None, alive=True,
                                    in_policy=False, tids=list(m.threads) if m else []))
            nxt = max(nxt, slots[-1].slot) + 1
    return Status(port=port, proto=proto, policy=meta.policy, kind=meta.kind,
                  created=meta.created, pinned=bpffs.shown(path), slots=slots,
                  netns=pin.netns,
                  in_force=st.in_force, divergence=st.divergence, fallbacks=st.fallbacks,
                  no_napi=_no_napi(path) if meta.policy == "napi" else None,
                  follower=st.follower, note="; ".join(notes),
                  pinned_host=None if meta.private_mnt else
                  str(fs.host_path(path) if fs else path),
                  owner=owner_of(meta),
                  hints={} if meta.owner else
                  {"detach": hint("detach", port, proto),
                   "follow": hint("attach", port, proto, "--policy", meta.policy, "--follow")})


def _private_note(meta: Meta) -> str:
    return (f"pinned by `attach --private-bpffs` in a BPF filesystem private to mount "
            f"namespace mnt:[{meta.private_mnt}]: visible only inside it; status, detach and "
            f"watch from the host or another mount namespace do not see the policy")


def _no_napi(path: Path) -> int | None:
    """The napi policy's count of packets that had no NAPI id to steer by."""
    if not (path / "map_config").exists():
        return None
    from .policies.selector import read_no_napi
    fd = open_pinned(path, "map_config")
    try:
        return read_no_napi(fd)
    finally:
        os.close(fd)


def status_all() -> tuple[list[Pin], list[Pin], str]:
    """Every pin on the machine, judged: (kept, removed as stale, note)."""
    require_caps("status")
    fs, base = _readable("status")
    found = pins_everywhere(base)
    stale = [p for p in found if p.state == "stale"]
    for p in stale:
        remove_pins(p.path)
    return [p for p in found if p.state != "stale"], stale, fs.note if fs else ""
