"""Which processes hold a socket, which one serves it, and taking it.

A socket (by inode) may be held by several processes: nginx's master and all
its workers inherit every listening socket, but each worker adds only its own
reuseport socket to its epoll set. So the process that *serves* a socket is
the holder whose epoll set watches it (/proc/<pid>/fdinfo/<epfd> lists every
watched file with its inode). Holders that never epoll (blocking accept(),
recvfrom()) fall back to the holder with the fewest sockets of the group.

Taking a socket means duplicating the serving process's fd into ours with
pidfd_open + pidfd_getfd: the kernel object is then reachable from here (for
setsockopt, or to put into a REUSEPORT_SOCKARRAY) while the server keeps it.
"""
from __future__ import annotations

import errno
import os
import platform
import re
import socket
from dataclasses import dataclass

from ..errors import UserError
from . import process

_SOCKET = re.compile(r"socket:\[(\d+)\]")
_EPOLL_INO = re.compile(r"^tfd:\s*\d+\s.*\bino:([0-9a-f]+)", re.M)



# Where /proc is: tests point it at a tree of their own (as psutil's
# PROCFS_PATH) to check the serving rules below without root or processes.
PROC = "/proc"


@dataclass(frozen=True)
class Holder:
    """Process `pid` has socket `inode` open as its fd `fd`."""
    pid: int
    fd: int
    inode: int


def _pids() -> list[int]:
    return sorted(int(n) for n in os.listdir(PROC) if n.isdigit())


def pid_exists(pid: int) -> bool:
    return os.path.isdir(f"{PROC}/{pid}") and os.path.exists(f"{PROC}/{pid}/stat")


def process_name(pid: int) -> str:
    try:
        with open(f"{PROC}/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _fd_links(pid: int):
    """(fd, link target) for every fd of pid; quietly nothing if it is gone."""
    try:
        entries = os.scandir(f"{PROC}/{pid}/fd")
    except OSError:
        return
    with entries:
        for e in entries:
            try:
                yield int(e.name), os.readlink(e.path)
            except (OSError, ValueError):
                continue  # closed meanwhile


@dataclass
class ProcessTable:
    """One walk over the process table: the sockets every process holds and,
    if asked for, each one's parent. A watch interval reads it once for both
    the group's holders and a dispatcher's children."""
    sockets: dict[int, list[tuple[int, int]]]   # pid -> (fd, inode) of each socket it holds
    parents: dict[int, int]                     # pid -> parent pid ({} unless asked for)

    def holders(self, inodes: set[int]) -> dict[int, list[Holder]]:
        """inode -> the (pid, fd) pairs that hold it, ordered by pid, then fd."""
        out: dict[int, list[Holder]] = {i: [] for i in inodes}
        for pid in sorted(self.sockets):
            for fd, ino in self.sockets[pid]:
                if ino in out:
                    out[ino].append(Holder(pid, fd, ino))
        for hs in out.values():
            hs.sort(key=lambda h: (h.pid, h.fd))
        return out

    def descendants(self, pids) -> list[int]:
        """Every process below `pids` (children, theirs...), ascending."""
        kids: dict[int, list[int]] = {}
        for pid, ppid in self.parents.items():
            kids.setdefault(ppid, []).append(pid)
        out: set[int] = set()
        todo = list(pids)
        while todo:
            for k in kids.get(todo.pop(), ()):
                if k not in out:
                    out.add(k)
                    todo.append(k)
        return sorted(out - set(pids))


def process_table(pids: list[int] | None = None, parents: bool = False) -> ProcessTable:
    """The sockets of every process (or of `pids`), and with parents=True
    each one's parent, in one pass over /proc."""
    sockets: dict[int, list[tuple[int, int]]] = {}
    parent: dict[int, int] = {}
    for pid in (pids if pids is not None else _pids()):
        if parents:
            parent[pid] = parent_pid(pid)
        held = []
        for fd, target in _fd_links(pid):
            m = _SOCKET.fullmatch(target)
            if m:
                held.append((fd, int(m.group(1))))
        sockets[pid] = held
    return ProcessTable(sockets, parent)


def holders(inodes: set[int], pids: list[int] | None = None) -> dict[int, list[Holder]]:
    """inode -> the (pid, fd) pairs that hold it, over every process (or `pids`).
    Each list is ordered by pid, then fd."""
    return process_table(pids).holders(inodes)


def epoll_watched(pid: int) -> set[int]:
    """Inodes of every file that any epoll instance of `pid` watches."""
    watched: set[int] = set()
    for fd, target in _fd_links(pid):
        if target != "anon_inode:[eventpoll]":
            continue
        try:
            with open(f"{PROC}/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        watched.update(int(h, 16) for h in _EPOLL_INO.findall(text))
    return watched


def thread_ids(pid: int) -> list[int]:
    """Every thread (task) id of process pid, ascending; [] if it is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"{PROC}/{pid}/task"))
    except (OSError, ValueError):
        return []


# The blocking calls whose first argument is the fd a thread waits on, by
# architecture (poll/select take an array, not an fd: not read).
_WAIT_CALLS = {
    "x86_64": {"epoll": {232, 281, 441}, "socket": {43, 288, 45, 47, 299}},
    "aarch64": {"epoll": {22, 441}, "socket": {202, 242, 207, 212, 243}},
}


def _fd_inode(pid: int, fd: int) -> tuple[str, int] | None:
    """(what, inode) of pid's fd: what is "socket", "epoll" or "other"."""
    try:
        target = os.readlink(f"{PROC}/{pid}/fd/{fd}")
        ino = os.stat(f"{PROC}/{pid}/fd/{fd}").st_ino
    except OSError:
        return None
    if target == "anon_inode:[eventpoll]":
        return "epoll", ino
    m = _SOCKET.fullmatch(target)
    return ("socket", int(m.group(1))) if m else ("other", ino)


def _epoll_set(pid: int, epfd: int) -> set[int]:
    """Inodes of the files epoll instance epfd of pid watches."""
    try:
        with open(f"{PROC}/{pid}/fdinfo/{epfd}") as f:
            return {int(h, 16) for h in _EPOLL_INO.findall(f.read())}
    except OSError:
        return set()


def waiting_threads(pid: int) -> dict[int, set[int]]:
    """tid -> the inodes each thread of pid is blocked on now: the socket of a
    blocking accept/recvfrom/recvmsg, or every file in the epoll set of an
    epoll_wait (a socket a thread epolls is one it serves). Read from
    /proc/PID/task/TID/syscall (the call and its arguments while the thread
    sleeps in it); a running thread, or one in another call, maps to an
    empty set. Every thread of pid is a key; {} if pid is gone."""
    calls = _WAIT_CALLS.get(platform.machine())
    out: dict[int, set[int]] = {}
    sets: dict[int, set[int]] = {}          # epfd -> its set, read once per process
    for tid in thread_ids(pid):
        out[tid] = set()
        try:
            with open(f"{PROC}/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        if calls is None or len(fields) < 2 or not fields[0].isdigit():
            continue                        # "running", or a kernel without the file
        nr, fd = int(fields[0]), int(fields[1], 16)
        if nr not in calls["epoll"] and nr not in calls["socket"]:
            continue
        what = _fd_inode(pid, fd)
        if what is None:
            continue
        if what[0] == "epoll" and nr in calls["epoll"]:
            if fd not in sets:
                sets[fd] = _epoll_set(pid, fd)
            out[tid] = set(sets[fd])
        elif what[0] == "socket" and nr in calls["socket"]:
            out[tid] = {what[1]}
    return out


def parent_pid(pid: int) -> int:
    """The parent's pid (0 if pid is gone): field 4 of /proc/PID/stat, after
    the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"{PROC}/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def serving_pids(inode: int, hs: list[Holder], watched: dict[int, set[int]]) -> tuple[int, ...]:
    """Every process that serves one socket: those whose epoll set watches
    it; if none does (blocking accept() or recvfrom()), every holder but a
    parent of another holder (a pre-fork master hands its socket down and
    does not accept on it). A reuseport socket has one; a listener shared
    by pre-forked workers, all of them."""
    pids = sorted({h.pid for h in hs})
    epolling = [p for p in pids if inode in watched.get(p, ())]
    if epolling:
        return tuple(epolling)
    parents = {parent_pid(p) for p in pids}
    return tuple(p for p in pids if p not in parents) or tuple(pids)


def serving_holder(inode: int, hs: list[Holder], watched: dict[int, set[int]],
                   group_count: dict[int, int]) -> Holder:
    """Of the holders of one socket, the one that serves it: a holder whose
    epoll set watches it, else any holder; among those, the one holding the
    fewest sockets of the group (a worker rather than its master), then the
    lowest pid."""
    epolling = [h for h in hs if inode in watched.get(h.pid, ())]
    pool = epolling or hs
    return min(pool, key=lambda h: (group_count.get(h.pid, 0), h.pid, h.fd))


def take_socket(pid: int, fd: int, inode: int) -> socket.socket:
    """Duplicate pid's fd into this process and check it is still `inode`."""
    try:
        pidfd = process.pidfd_open(pid)
    except ProcessLookupError:
        if process.foreign_proc():
            raise UserError(process.FOREIGN_PROC + ".") from None
        raise UserError(f"process {pid} exited while reuseport-ctl was reading its sockets; "
                        f"run the command again.") from None
    try:
        try:
            ours = process.pidfd_getfd(pidfd, fd)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise UserError(f"not allowed to take socket fd {fd} of process {pid} "
                                f"(pidfd_getfd: {e.strerror}): run as root with "
                                f"CAP_SYS_PTRACE.") from None
            if e.errno in (errno.EBADF, errno.ESRCH):
                raise UserError(f"process {pid} closed its socket (fd {fd}) while "
                                f"reuseport-ctl was reading it; run the command again.") from None
            raise
    finally:
        os.close(pidfd)
    if os.fstat(ours).st_ino != inode:
        os.close(ours)
        raise UserError(f"process {pid} reused fd {fd} for another file while reuseport-ctl "
                        f"was reading it; run the command again.")
    return socket.socket(fileno=ours)


def uses_reuseport(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


# --- capabilities ---------------------------------------------------------------

def missing_caps(caps: int | None = None) -> list[str]:
    """Names of what steering a group needs and this process lacks: CAP_BPF
    to load and pin programs, CAP_NET_ADMIN for SK_REUSEPORT programs
    (CAP_SYS_ADMIN covers both). (Taking another user's sockets also needs
    CAP_SYS_PTRACE; take_socket() says so when the kernel refuses.)"""
    from . import caps as _caps
    return _caps.missing(("CAP_BPF", "CAP_NET_ADMIN"), caps)
