"""Per-process kernel settings for forked workers: parent-death signal, the
comm name ps/top show, inherited fds, CPU affinity, and dropping root."""
from __future__ import annotations

import ctypes
import os
import pwd
import signal
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import UserError

_libc = ctypes.CDLL(None, use_errno=True)
NR_PIDFD_GETFD = 438          # the same on every architecture (Linux 5.6)
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies, even by SIGKILL, so no worker
    outlives the supervisor. Exit at once if the parent is already gone."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def set_name(name: str) -> None:
    """The comm name (15 bytes) shown by ps -o comm, top and the tracepoints."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def close_fds_except(keep: set[int]) -> None:
    """Close every fd of this (freshly forked) process but `keep`: a child
    holds only what it needs, so no copy of a listener, a pipe or a BPF
    object keeps anything alive after its owner closed it."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def lookup_user(spec: str) -> Account:
    """A user by name or numeric uid."""
    try:
        pw = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError):
        raise UserError(f"unknown user {spec!r}: no such name or uid in the password database.") \
            from None
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


def drop_privileges(acct: Account) -> None:
    """Become acct for good: supplementary groups, gid, then uid (the order
    matters: after setuid we could no longer change groups)."""
    os.initgroups(acct.name, acct.gid)
    os.setgid(acct.gid)
    os.setuid(acct.uid)


class Stat(NamedTuple):
    state: str            # R, S, D, T (stopped), t (traced), Z...; "" if gone
    ppid: int
    session: int | None   # None if gone; 0 if its leader is outside this pid
                          # namespace (a container's, a CI runner's session)


def stat(pid: int) -> Stat:
    """The fields of /proc/<pid>/stat the tool reads, in one read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
        fields = raw[raw.rfind(")") + 2:].split()    # comm may hold spaces and ")"
        return Stat(fields[0], int(fields[1]), int(fields[3]))
    except (OSError, ValueError, IndexError):
        return Stat("", 0, None)


def state(pid: int) -> str:
    """The process's state letter (T: stopped); "" if it is gone."""
    return stat(pid).state


def session(pid: int) -> int | None:
    """The session id of pid (0: begun outside this pid namespace); None if
    it is gone."""
    return stat(pid).session


# --- another process, named so that a reused pid is not mistaken for it -----------

def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat
    field 22): with the pid, it names one process for good. None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_ns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


PROC_PID_INIT_INO = 0xEFFFFFFC      # the initial pid namespace's inode, fixed by the kernel


def in_initial_pid_ns() -> bool:
    """BPF programs see tasks by the kernel's (the initial namespace's) pids;
    in a container's own pid namespace /proc shows other numbers, and the
    two cannot be matched from inside."""
    return pid_ns() == PROC_PID_INIT_INO


def alive(pid: int, start: int) -> bool:
    return pid > 0 and start_time(pid) == start


def terminate(pid: int, start: int, timeout: float = 5.0, sig: int = signal.SIGTERM) -> bool:
    """Signal the process (pid, start) (SIGTERM) and wait for it to exit; SIGKILL it
    after `timeout`. The start time is checked after the pidfd is opened,
    so the signal cannot reach a process that reused the pid.
    False if it was not running."""
    import select
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if start_time(pid) != start:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        # a pidfd becomes readable when its process exits (zombie or reaped)
        if not select.select([pidfd], [], [], timeout)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], timeout)
        return True
    except ProcessLookupError:
        return True
    finally:
        os.close(pidfd)



def node_of(pid: int, cpu_node: dict[int, int]) -> int:
    """The NUMA node process pid may run on, from its CPU affinity
    (sched_getaffinity) and cpu -> node; -1 if its CPUs span several nodes
    (or it is gone)."""
    try:
        cpus = os.sched_getaffinity(pid)
    except OSError:
        return -1
    return single_node(cpus, cpu_node)


def single_node(cpus, cpu_node: dict[int, int]) -> int:
    """The one node all of `cpus` are on, else -1."""
    nodes = {cpu_node.get(c, 0) for c in cpus}
    return nodes.pop() if len(nodes) == 1 else -1


# --- another process's fds ----------------------------------------------------

def foreign_proc() -> bool:
    """Is /proc another pid namespace's than ours (`unshare --pid` without
    --mount-proc)? Then the pids it lists do not name processes here."""
    try:
        return int(os.readlink("/proc/self")) != os.getpid()
    except (OSError, ValueError):
        return False


FOREIGN_PROC = ("this process has a pid namespace of its own but /proc is another's (as "
                "under `unshare --pid` without --mount-proc), so the pids /proc lists do not "
                "name processes here: add --mount-proc, or run reuseport-ctl from the host's "
                "pid namespace")


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """Duplicate another process's fd into ours (needs PTRACE_MODE_ATTACH)."""
    ret = _libc.syscall(ctypes.c_long(NR_PIDFD_GETFD), ctypes.c_int(pidfd),
                        ctypes.c_int(target_fd), ctypes.c_uint(0))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret
