"""Where the BPF filesystem is, as seen from this process.

Pins live in a bpffs instance; another instance (a fresh `mount -t bpf`)
does not show them. `ip netns exec` unshares the mount namespace and mounts
a fresh /sys, so /sys/fs/bpf is empty there; the host's bpffs is still
reachable through an ancestor's root (/proc/PID/root/sys/fs/bpf): the
shell that ran `ip netns exec` lives in the host's mount namespace. The
nearest ancestor in another mount namespace is the one asked (pid 1 last):
if it has no bpffs either, nothing above it is ours to pin in.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

DEFAULT = Path("/sys/fs/bpf")


@dataclass(frozen=True)
class BpfFs:
    path: Path               # the directory this process uses (exists)
    via: int | None = None   # the pid whose mount namespace it was reached through

    @property
    def note(self) -> str:
        if self.via is None:
            return ""
        return (f"this mount namespace has no BPF filesystem (`ip netns exec` mounts a fresh "
                f"/sys): the pins are in the one of pid {self.via}'s mount namespace, where "
                f"it was run from")

    def host_path(self, path: Path) -> Path:
        """`path` (under self.path) as the mount namespace that has the
        bpffs sees it: /sys/fs/bpf/..."""
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


def _mnt_ns(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


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


def find(mount: bool = False) -> BpfFs | None:
    """The bpffs to pin in: ours at /sys/fs/bpf; else, in a private mount
    namespace, an ancestor's; else (mount=True, our mount namespace is the
    host's) a newly mounted one. None when there is none to read."""
    if _mounted_bpf("/proc/self/mountinfo"):
        return BpfFs(DEFAULT)
    ours = _mnt_ns("self")
    private = False
    for pid in _ancestors():
        ns = _mnt_ns(pid)
        if ns is None or ns == ours:
            continue                 # unreadable (not ours to inspect), or the same mounts
        private = True
        if _mounted_bpf(f"/proc/{pid}/mountinfo"):
            path = Path(f"/proc/{pid}/root") / DEFAULT.relative_to("/")
            if path.is_dir():
                return BpfFs(path, via=pid)
        break                        # the namespace we came from has none
    if not mount:
        return None
    if private:
        raise UserError(f"{DEFAULT} has no BPF filesystem in this private mount namespace "
                        f"(`ip netns exec` mounts a fresh /sys) and none of its ancestors' "
                        f"has one either, so a pin would vanish with the command: mount one "
                        f"on the host (`mount -t bpf bpf {DEFAULT}`) or enter the network "
                        f"namespace with `nsenter --net=/run/netns/NAME` instead.")
    p = subprocess.run(["mount", "-t", "bpf", "bpf", str(DEFAULT)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise UserError(f"cannot mount the BPF filesystem at {DEFAULT} "
                        f"({p.stderr.strip() or 'mount failed'}), so the policy cannot "
                        f"outlive this command.")
    return BpfFs(DEFAULT)
