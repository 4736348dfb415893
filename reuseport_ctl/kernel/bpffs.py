"""Where the BPF filesystem is, as seen from this process.

Pins live in a bpffs instance; another instance (a fresh `mount -t bpf`)
does not show them. `ip netns exec` unshares the mount namespace and mounts
a fresh /sys, so /sys/fs/bpf is empty there; the host's bpffs is still
reachable through an ancestor's root (/proc/PID/root/sys/fs/bpf): the
shell that ran `ip netns exec` lives in the host's mount namespace. The
nearest ancestor in another mount namespace is the one asked (pid 1 last):
if it has no bpffs either, nothing above it is ours to pin in.

That ancestor (a shell) usually exits long before a follower does, and its
/proc/PID/root with it: the directory is opened once and kept open (an open
directory keeps its mount reachable), and every pin path is resolved
through that fd (/proc/self/fd/N/...). Paths printed for people are the
host's (/sys/fs/bpf/...), which stay valid.

A bpffs this process would mount itself is only shared with the host when
this mount namespace is the host's: the initial one (its inode is fixed on
kernels >= 6.18), or pid 1's in the initial pid namespace. In a
container-like pid namespace (`unshare --pid --fork --mount-proc`, a
container without the host's /sys/fs/bpf) no ancestor outside is visible,
and a bpffs mounted there is seen only inside that mount namespace: find()
refuses, unless the caller accepts a private one (private_ok), which it
then reports as such.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DEFAULT = Path("/sys/fs/bpf")
MNT_NS_INIT_INO = 0xEFFFFFF8      # the initial mount namespace (fixed since 6.18)
PID_NS_INIT_INO = 0xEFFFFFFC      # the initial pid namespace (fixed since 3.8)
PRIVATE_MARK = "reuseport-ctl-private"   # a directory in a private bpffs we mounted


@dataclass(frozen=True)
class BpfFs:
    path: Path               # the directory this process uses (exists)
    via: int | None = None   # the pid whose mount namespace it was reached through
    private: bool = False    # a bpffs only this mount namespace (and its children) sees
    mnt_ns: int = 0          # (private) that mount namespace's inode

    @property
    def note(self) -> str:
        if self.private:
            return (f"no BPF filesystem shared with the host is reachable from here: the pins "
                    f"are in one private to this mount namespace (mnt:[{self.mnt_ns}]), "
                    f"visible only inside it; status, detach and watch from the host or "
                    f"another mount namespace do not see the policy")
        if self.via is None:
            return ""
        return ("this mount namespace has no BPF filesystem (`ip netns exec` mounts a fresh "
                f"/sys): the pins are in the host's, at {DEFAULT} in the mount namespace "
                "the command was run from")

    def host_path(self, path: Path) -> Path | None:
        """`path` (under self.path) as the host sees it (/sys/fs/bpf/...);
        None for a private bpffs (the host does not see it)."""
        if self.private:
            return None
        return DEFAULT / path.relative_to(self.path) if self.via is not None else path


def _mounted_bpf(mountinfo: str, point: str = str(DEFAULT)) -> bool:
    """Is the mount on top at `point` a bpffs? (Later lines cover earlier
    ones mounted at the same point.)"""
    top = None
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and fields[4] == point:
                    top = right.split(" ", 1)[0]
    except OSError:
        pass
    return top == "bpf"


def _ns(pid: int | str, kind: str = "mnt") -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _mnt_ns(pid: int | str) -> int | None:
    return _ns(pid, "mnt")


def _ancestors() -> list[int]:
    """Our parent, its parent, ..., pid 1 (the order to look in)."""
    out, pid = [], os.getppid()
    while pid > 1 and pid not in out:
        out.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out + [1]


def host_mounts() -> bool | None:
    """Is this process's mount namespace the host's? None: cannot tell (a
    pid namespace of its own, or pid 1 unreadable, on a kernel < 6.18)."""
    ours = _mnt_ns("self")
    if ours == MNT_NS_INIT_INO:
        return True
    if _ns("self", "pid") == PID_NS_INIT_INO:
        first = _mnt_ns(1)
        if first is not None:
            return first == ours
    return None


def unseen(verb: str) -> str:
    """Why `verb` cannot see the pins when find() found no bpffs: '' if this
    is the host's mount namespace (none is mounted there: nothing is pinned)."""
    if host_mounts():
        return ""
    return (f"no BPF filesystem shared with the host is reachable from here (a mount "
            f"namespace of its own, as under `unshare --pid --mount-proc` or in a "
            f"container), so {verb} cannot see the policies pinned on this machine: run it "
            f"from the host's mount namespace (`ip netns exec NAME reuseport-ctl ...` or "
            f"`nsenter --net=/proc/SERVER_PID/ns/net reuseport-ctl ...` from a host shell)")


_held: dict[int, BpfFs] = {}       # our pid -> the bpffs reached through a kept fd


def _reach(pid: int) -> BpfFs | None:
    """pid's bpffs, opened once and kept (see the module's docstring)."""
    try:
        fd = os.open(f"/proc/{pid}/root{DEFAULT}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    path = Path(f"/proc/self/fd/{fd}")
    if not path.is_dir():
        os.close(fd)
        return None
    fs = BpfFs(path, via=pid)
    _held[os.getpid()] = fs
    return fs


def _host_process() -> int | None:
    """A process in the initial mount namespace with a bpffs at /sys/fs/bpf
    (when the ancestor that ran us has exited meanwhile: we were reparented)."""
    try:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        return None
    for pid in pids:
        if _mnt_ns(pid) == MNT_NS_INIT_INO and _mounted_bpf(f"/proc/{pid}/mountinfo"):
            return pid
    return None


def _refusal(why: str) -> UserError:
    return UserError(
        f"no BPF filesystem shared with the host is reachable from here ({why}), so a pin "
        f"made here would be seen only inside this mount namespace and the policy would be "
        f"invisible to status, detach and watch elsewhere: run reuseport-ctl from the host's "
        f"mount namespace (`nsenter --net=/proc/SERVER_PID/ns/net reuseport-ctl ...`, or "
        f"`ip netns exec NAME reuseport-ctl ...` from a host shell), mount one on the host "
        f"(`mount -t bpf bpf {DEFAULT}`), or pass --private-bpffs to pin here anyway.")


def find(mount: bool = False, private_ok: bool = False) -> BpfFs | None:
    """The bpffs to pin in: ours at /sys/fs/bpf; else, in a private mount
    namespace, an ancestor's (kept open); else (mount=True) a newly mounted
    one, if this mount namespace is the host's or private_ok. None when
    there is none to read."""
    if _mounted_bpf("/proc/self/mountinfo"):
        if not (DEFAULT / PRIVATE_MARK).is_dir():
            return BpfFs(DEFAULT)
        # one an earlier `attach --private-bpffs` mounted here
        if mount and not private_ok:
            raise _refusal(f"{DEFAULT} here is a private one an earlier `attach "
                           f"--private-bpffs` mounted in this mount namespace")
        return BpfFs(DEFAULT, private=True, mnt_ns=_mnt_ns("self") or 0)
    held = _held.get(os.getpid())
    if held is not None and held.path.is_dir():
        return held
    ours = _mnt_ns("self")
    private = False
    for pid in _ancestors():
        ns = _mnt_ns(pid)
        if ns is None or ns == ours:
            continue                 # unreadable (not ours to inspect), or the same mounts
        private = True
        if _mounted_bpf(f"/proc/{pid}/mountinfo") and (fs := _reach(pid)) is not None:
            return fs
        break                        # the namespace we came from has none
    host = host_mounts()
    if not private and not host and ours != MNT_NS_INIT_INO:
        # The ancestor that ran us may be gone (we were reparented): the
        # initial mount namespace's bpffs, through any of its processes.
        if (pid := _host_process()) is not None and (fs := _reach(pid)) is not None:
            return fs
    if not mount:
        return None
    if private or not host:
        if not private_ok:
            raise _refusal(
                "this mount namespace has no bpffs at /sys/fs/bpf and the one it was run "
                "from has none either" if private else
                "/sys/fs/bpf has none in this mount namespace, and it is not the host's: this "
                "process has a pid namespace of its own, as under `unshare --pid "
                "--mount-proc` or in a container")
    p = subprocess.run(["mount", "-t", "bpf", "bpf", str(DEFAULT)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise UserError(f"cannot mount the BPF filesystem at {DEFAULT} "
                        f"({p.stderr.strip() or 'mount failed'}), so the policy cannot "
                        f"outlive this command.")
    if private or not host:
        # marked, so later commands in this mount namespace know it for one
        (DEFAULT / PRIVATE_MARK).mkdir(mode=0o700, exist_ok=True)
        return BpfFs(DEFAULT, private=True, mnt_ns=ours or 0)
    return BpfFs(DEFAULT)


def shown(path: Path | str) -> str:
    """A pin path as a person (or a script on the host) can use it: a path
    reached through a kept fd becomes the host's /sys/fs/bpf/... ."""
    held = _held.get(os.getpid())
    p = Path(path)
    if held is not None:
        try:
            return str(DEFAULT / p.relative_to(held.path))
        except ValueError:
            pass
    return str(p)
