"""Which process serves a socket, from a /proc tree the test builds
(owners.PROC, as psutil's PROCFS_PATH): nginx's master and workers, a
pre-fork server, HAProxy's threads. No root, no processes: the rules only."""
from __future__ import annotations

import os

import pytest

from reuseport_ctl import groups
from reuseport_ctl.kernel import owners

EPOLL = "anon_inode:[eventpoll]"


class FakeProc:
    def __init__(self, root):
        self.root = root

    def process(self, pid: int, ppid: int, comm: str = "srv", fds: dict | None = None,
                epolls: dict | None = None):
        """fds: fd -> socket inode (or EPOLL); epolls: epfd -> watched inodes."""
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "fdinfo").mkdir()
        (d / "stat").write_text(f"{pid} ({comm} (x)) S {ppid} {pid} {pid} 0\n")
        (d / "comm").write_text(comm + "\n")
        for fd, what in (fds or {}).items():
            target = EPOLL if what == EPOLL else f"socket:[{what}]"
            os.symlink(target, d / "fd" / str(fd))
        for epfd, watched in (epolls or {}).items():
            os.symlink(EPOLL, d / "fd" / str(epfd))
            lines = "".join(f"tfd: {n:8d} events:       19 data: {n:x}  pos:0 ino:{ino:x} "
                            f"sdev:8\n" for n, ino in enumerate(watched, 3))
            (d / "fdinfo" / str(epfd)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t15\n{lines}")


@pytest.fixture
def proc(tmp_path, monkeypatch):
    monkeypatch.setattr(owners, "PROC", str(tmp_path))
    return FakeProc(tmp_path)


def serving(inodes, pids=None):
    held = owners.holders(set(inodes), pids)
    every = sorted({h.pid for hs in held.values() for h in hs})
    watched = {p: owners.epoll_watched(p) for p in every}
    count = {p: sum(1 for i in inodes if any(h.pid == p for h in held[i])) for p in every}
    return ({i: owners.serving_holder(i, held[i], watched, count).pid for i in inodes},
            {i: owners.serving_pids(i, held[i], watched) for i in inodes})


def test_nginx_each_worker_serves_the_socket_it_epolls_not_the_master(proc):
    # master 10 holds all three; each worker inherits all three, epolls one
    proc.process(10, 1, "nginx", fds={6: 501, 7: 502, 8: 503})
    for k, pid in enumerate((11, 12, 13)):
        proc.process(pid, 10, "nginx", fds={6: 501, 7: 502, 8: 503},
                     epolls={9: [501 + k]})
    one, every = serving([501, 502, 503])
    assert one == {501: 11, 502: 12, 503: 13}
    assert every == {501: (11,), 502: (12,), 503: (13,)}
    assert owners.parent_pid(12) == 10            # "(nginx (x))": parentheses in comm


def test_blocking_accept_pre_fork_workers_serve_and_the_master_does_not(proc):
    # one shared listener, no epoll: every holder but the parent of the others
    proc.process(20, 1, fds={3: 700})
    for pid in (21, 22):
        proc.process(pid, 20, fds={3: 700})
    one, every = serving([700])
    assert every == {700: (21, 22)}
    assert one[700] == 20 and owners.pid_exists(21) and not owners.pid_exists(99)


def test_a_process_holding_fewer_of_the_group_serves_when_nobody_epolls(proc):
    # a master holding both sockets, one child per socket, blocking accept
    proc.process(30, 1, fds={3: 801, 4: 802})
    proc.process(31, 30, fds={3: 801})
    proc.process(32, 30, fds={4: 802})
    one, _ = serving([801, 802])
    assert one == {801: 31, 802: 32}


def test_members_are_numbered_by_serving_pid_then_inode_or_by_the_pinned_table():
    keys = [(12, 502), (11, 501), (11, 505), (13, 503)]
    plain = groups.number_members(keys, None)
    assert [(n, i) for n, i, _ in plain] == [(0, 501), (1, 505), (2, 502), (3, 503)]
    pinned = groups.number_members(keys, {502: 0, 503: 1})
    assert [(n, i, ok) for n, i, ok in pinned][:2] == [(0, 502, True), (1, 503, True)]
    assert all(not ok for _, _, ok in pinned[2:])  # not in the policy: after, flagged


def test_one_walk_gives_the_holders_and_a_dispatchers_children(proc, monkeypatch):
    # a dispatcher 40 holds the listener; its children 41, 42 (and 42's child
    # 43) hold connections; 50 is another server
    proc.process(40, 1, "node", fds={3: 900})
    proc.process(41, 40, "node", fds={5: 901})
    proc.process(42, 40, "node", fds={5: 902})
    proc.process(43, 42, "node")
    proc.process(50, 1, "other", fds={3: 950})
    reads = []
    real = owners._fd_links
    monkeypatch.setattr(owners, "_fd_links", lambda pid: reads.append(pid) or real(pid))
    table = owners.process_table(parents=True)
    assert sorted(reads) == [40, 41, 42, 43, 50]            # each fd table read once
    assert table.holders({900, 902}) == {900: [owners.Holder(40, 3, 900)],
                                         902: [owners.Holder(42, 5, 902)]}
    assert table.descendants([40]) == [41, 42, 43]
    assert table.descendants([42]) == [43] and table.descendants([50]) == []
    assert owners.process_table().parents == {}             # parents only when asked for
    assert owners.holders({950}) == {950: [owners.Holder(50, 3, 950)]}
