"""Member health: stuck, stopped and outside members, drops since the start
(pure logic; the live checks are in test_watch)."""
from reuseport_ctl.stats.health import HealthState, MemberSample, assess, outsiders


def tcp(key, queue, arrivals, drops=0, state="S"):
    return MemberSample(key=key, label=f"slot {key}", proto="tcp", queue_len=queue,
                        drops=drops, arrivals=arrivals, state=state)


def test_a_member_that_takes_nothing_while_connections_queue_is_stuck_after_two_intervals():
    h = HealthState()
    assess(h, [tcp(0, 0, 0), tcp(1, 0, 0)])
    v = assess(h, [tcp(0, 0, 50), tcp(1, 40, 40)])       # 1 took none of 40
    assert [x.stuck for x in v] == [False, False]        # one interval is not enough
    v = assess(h, [tcp(0, 0, 50), tcp(1, 80, 40)])
    assert [x.stuck for x in v] == [False, True]
    assert "slot 1 takes no connections" in v[1].warning and "80 connections" in v[1].warning
    v = assess(h, [tcp(0, 0, 50), tcp(1, 79, 40)])       # it took 41: well again
    assert not v[1].stuck and v[1].warning is None


def test_a_busy_member_with_a_queue_that_still_accepts_is_not_stuck():
    h = HealthState()
    assess(h, [tcp(0, 10, 0)])
    for _ in range(5):
        (v,) = assess(h, [tcp(0, 10, 100)])             # 100 arrived, 100 taken, 10 wait
        assert not v.stuck


def test_a_stopped_process_is_named_at_once_with_its_drops_since_the_start():
    h = HealthState()
    assess(h, [tcp(0, 0, 0, drops=7)])
    (v,) = assess(h, [tcp(0, 129, 129, drops=19, state="T")])
    assert v.stopped and v.stuck and v.drops == 12
    assert "is stopped" in v.warning and "12 dropped" in v.warning


def test_udp_member_stuck_when_its_queue_never_shrinks():
    h = HealthState()
    u = lambda q, d: MemberSample(key=0, label="slot 0", proto="udp", queue_len=q,  # noqa: E731
                                  drops=d, arrivals=None)
    assess(h, [u(0, 0)])
    assess(h, [u(4096, 0)])
    (v,) = assess(h, [u(4096, 3)])
    assert v.stuck and v.drops == 3 and "bytes waiting" in v.warning


def test_drops_warn_while_they_grow_and_the_total_stays():
    h = HealthState()
    assess(h, [tcp(0, 0, 0, drops=5)])
    (v,) = assess(h, [tcp(0, 0, 10, drops=9)])
    assert v.drops == 4 and "is dropping connections: 4 since the last update" in v.warning
    (v,) = assess(h, [tcp(0, 0, 10, drops=9)])
    assert v.drops == 4 and v.warning is None


def test_a_member_that_left_is_forgotten():
    h = HealthState()
    assess(h, [tcp(0, 0, 0), tcp(1, 0, 0)])
    assess(h, [tcp(0, 0, 0)])
    assert set(h.seen) == {0}


def test_outsiders_are_members_of_another_session():
    # nginx: master 10 and workers 11..13 in session 10; `nginx -t` (pid 50)
    # from a shell, session 40; gunicorn's workers share their master's
    # session though the master holds none of their sockets
    tree = {11: 10, 12: 10, 13: 10, 50: 40}
    out = outsiders(tree, [11, 12, 13, 50])
    assert set(out) == {50} and "session 40" in out[50] and "is session 10" in out[50]
    assert outsiders(tree, [11, 12, 13]) == {}
    # two unrelated single-process servers: --pid says which is the server
    assert set(outsiders({7: 7, 9: 9}, [7, 9], prefer=9)) == {7}
    assert set(outsiders({7: 7, 9: 9}, [7, 9])) == {9}   # a tie: the older (lower) session


def test_the_server_of_a_pid_that_exited_is_still_the_server():
    # watch --pid 11 (a worker): its session (10) is resolved once; 11 killed,
    # respawned as 14: the workers are still the server's, and a gone pid
    # (absent from tree_of) is never judged nor counted as a session
    tree = {12: 10, 13: 10, 14: 10}
    assert outsiders(tree, [11, 12, 13], server=10) == {}
    assert outsiders(tree, [14, 12, 13], server=10) == {}
    assert outsiders(tree, [11, 12, 13], prefer=11) == {}
    out = outsiders({**tree, 50: 40}, [12, 13, 14, 50], server=10)
    assert set(out) == {50} and "is session 10" in out[50]
    # the server named by session wins over the majority
    assert set(outsiders({7: 7, 8: 7, 9: 9}, [7, 8, 9], server=9)) == {7, 8}


def test_process_state_and_ancestors_from_proc():
    import os
    import signal
    import subprocess
    import time

    from reuseport_ctl.kernel import process
    child = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        assert process.state(child.pid) == "S"
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 2
        while process.state(child.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.state(child.pid) == "T"
        assert process.session(child.pid) == os.getsid(0) == process.session(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert process.state(child.pid) == ""


def test_capabilities_count_sys_admin_for_bpf_perfmon_and_net_admin():
    from reuseport_ctl.kernel import caps
    bit = lambda *names: sum(1 << caps.BITS[n] for n in names)  # noqa: E731
    need = ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN")
    assert caps.missing(need, bit("CAP_SYS_ADMIN")) == []
    assert caps.missing(need, bit("CAP_BPF")) == ["CAP_PERFMON", "CAP_NET_ADMIN"]
    assert caps.missing(("CAP_SYS_PTRACE",), bit("CAP_SYS_ADMIN")) == ["CAP_SYS_PTRACE"]
    assert caps.missing(need, bit(*need)) == []


def test_an_outsider_that_never_accepts_is_named_as_both():
    h = HealthState()
    o = lambda q, a, d: MemberSample(key=3, label="slot 3 (pid 9)", proto="tcp",  # noqa: E731
                                     queue_len=q, drops=d, arrivals=a,
                                     outside="a process outside the server (session 9)")
    (v,) = assess(h, [o(0, 0, 0)])
    assert "outside the server" in v.warning and "a share" in v.warning
    assess(h, [o(10, 10, 0)])
    (v,) = assess(h, [o(17, 7, 41)])
    assert v.stuck and "outside the server" in v.warning and "it never accepts" in v.warning


def test_session_0_is_a_session_not_an_unknown():
    # Under a container's or CI runner's pid namespace every process started
    # inside has session 0 (its leader is outside): they are one server.
    assert outsiders({11: 0, 12: 0, 13: 0}, [11, 12, 13]) == {}
    out = outsiders({11: 0, 12: 0, 50: 50}, [11, 12, 50])
    assert set(out) == {50} and "outside this pid namespace" in out[50]
