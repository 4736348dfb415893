"""The per-interval aggregation behind `watch` (stats/live.py), and the
exporters' views of a frame: pure functions, no kernel."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reuseport_ctl.errors import UserError
from reuseport_ctl.export.ndjson import frame_dict
from reuseport_ctl.export.prometheus import FrameCollector, parse_listen
from reuseport_ctl.stats.live import (GroupInfo, LiveState, Moved, Observation, RowRef,
                                      WorkerObs, degraded_note, per_event, rate, sparkline, step)

GROUP = GroupInfo(port=8080, proto="tcp", policy="kernel", lookup_strategy="sk_lookup",
                  data_ready_strategy="tracepoint", wakeups_strategy="tracepoint",
                  kernel="6.18", addr="127.0.0.1:8080")


def workers(*pids, inode_base=100, **kw):
    return tuple(WorkerObs(pid=p, slot=i, inodes=(inode_base + i,), **kw)
                 for i, p in enumerate(pids))


def by_thread(wakeups, ws):
    """{pid: n} -> {(its row's inode, pid, tid=pid): n}: one thread per process."""
    inode = {w.pid: w.inodes[0] for w in ws}
    return {(inode[p], p, p): n for p, n in (wakeups or {}).items()}


def obs(ts, ws, ready=None, wakeups=None, eagain=None, lookups=None, listening=True):
    return Observation(ts=ts, wall=1000.0 + ts, workers=ws, lookups=lookups,
                       data_ready=ready or {}, wakeups=by_thread(wakeups, ws),
                       accept_eagain=eagain or {}, listening=listening)


# --- helpers ---------------------------------------------------------------------------

def test_rate_and_per_event():
    assert rate(150, 50, 2.0) == 50.0
    assert rate(None, 50, 2.0) is None and rate(5, None, 1.0) is None
    assert rate(5, 1, 0.0) is None
    assert per_event(8, 4) == 2.0
    assert per_event(3, 0) is None and per_event(None, 4) is None


def test_sparkline():
    assert sparkline([0, 1, 2, 4, 8], 5) == " ▂▃▅█"      # scaled to the maximum
    assert sparkline([], 4) == "    "
    assert sparkline([0, 0], 3) == "   "
    assert sparkline(range(100), 10) == sparkline(range(90, 100), 10)   # only the last ones
    line = sparkline([5, 5, 5], 3)
    assert line == "███"


def test_degraded_note_says_what_is_still_shown():
    assert degraded_note("tracepoint", "sk_lookup", own=False) is None
    note = degraded_note("none", "sk_lookup", own=False)
    assert "neither a kprobe" in note and "listener lookups (sk_lookup)" in note
    assert "accept-queue depth" in note and note.endswith(".") and "\n" not in note
    assert "own counters" in degraded_note("none", "none", own=True)


# --- step ---------------------------------------------------------------------------------

def test_rates_shares_and_fairness_from_data_ready():
    st = LiveState(interval=1.0)
    ws = workers(11, 22)
    f0 = step(st, obs(0.0, ws, lookups=0))
    assert [r.accepts for r in f0.rows] == [0, 0] and f0.jain is None   # nothing taken yet
    f1 = step(st, obs(2.0, ws, ready={100: 30, 101: 10}, lookups=40,
                      wakeups={11: 30, 22: 20}, eagain={22: 10}))
    a, b = f1.rows
    assert (a.pid, a.slot, a.accepts, a.accepts_per_s) == (11, 0, 30, 15.0)
    assert (b.accepts, b.accepts_per_s, b.data_ready_per_s) == (10, 5.0, 5.0)
    assert a.share == 0.75 and b.share == 0.25
    assert a.wakeups_per_event == 1.0 and b.wakeups_per_event == 2.0
    assert b.spurious_wakeups == 10 and a.spurious_wakeups == 0
    assert f1.lookups == 40 and f1.lookups_per_s == 20.0
    assert f1.accepts == 40 and f1.accepts_per_s == 20.0
    assert f1.data_ready == 40 and f1.wakeups == 50 and f1.wakeups_per_event == 1.25
    assert f1.jain == pytest.approx(40 ** 2 / (2 * (30 ** 2 + 10 ** 2)))
    assert f1.max_min_ratio == 3.0
    assert a.history == (15.0,) and f1.interval == 2.0 and f1.elapsed == 2.0


def test_own_counters_count_from_the_watch_baseline():
    st = LiveState(interval=1.0)
    step(st, obs(0.0, workers(11, 22, accepts=100, eagain=7)))
    f = step(st, obs(1.0, (WorkerObs(11, 0, (100,), accepts=130, eagain=9),
                           WorkerObs(22, 1, (101,), accepts=100, eagain=7)),
                     ready={100: 1}))
    assert [r.accepts for r in f.rows] == [30, 0]
    assert [r.spurious_wakeups for r in f.rows] == [2, 0]
    assert f.rows[0].data_ready == 1            # the probes still count data-ready
    assert math.isinf(f.max_min_ratio)


def test_workers_join_and_leave():
    st = LiveState(interval=1.0)
    step(st, obs(0.0, workers(11, 22)))
    f = step(st, obs(1.0, (WorkerObs(11, 0, (100,)), WorkerObs(33, 1, (102,))),
                     ready={100: 5, 101: 4, 102: 2}))
    assert [r.pid for r in f.rows] == [11, 33]
    assert f.joined == (RowRef(1, 33, 102),) and f.left == (RowRef(1, 22, 101),)
    assert [str(r) for r in f.joined] == ["slot 1 (pid 33)"]
    new = f.rows[1]
    assert new.accepts == 2 and new.accepts_per_s is None    # no rate at first sight
    assert f.data_ready == 11                                 # the gone socket still counts
    f2 = step(st, obs(2.0, (WorkerObs(11, 0, (100,)), WorkerObs(33, 1, (102,))),
                      ready={100: 5, 102: 6}))
    assert f2.rows[1].accepts_per_s == 4.0 and f2.joined == () and f2.left == ()


def test_history_keeps_a_minute():
    st = LiveState(interval=0.5)
    assert st.history_len == 120
    ws = workers(11)
    step(st, obs(0.0, ws))
    for i in range(1, 200):
        f = step(st, obs(i * 0.5, ws, ready={100: i}))
    assert len(f.rows[0].history) == 120 and f.rows[0].history[-1] == 2.0


def test_probes_off_give_none_not_zero():
    st = LiveState(interval=1.0, counted=(False, False, False))
    step(st, obs(0.0, workers(11)))
    f = step(st, obs(1.0, workers(11)))
    r = f.rows[0]
    assert r.accepts is None and r.data_ready is None and r.wakeups is None
    assert r.spurious_wakeups is None and r.wakeups_per_event is None
    assert f.data_ready is None and f.accepts is None
    d = frame_dict(f, GROUP)
    assert d["workers"][0]["accepts"] is None


# --- exporters' views -------------------------------------------------------------------

NDJSON_FIELDS = {"ts", "port", "proto", "policy", "lookup_strategy", "data_ready_strategy",
                 "lookups", "workers", "jain", "max_min_ratio"}
WORKER_FIELDS = {"pid", "slot", "accepts", "data_ready", "wakeups", "spurious_wakeups",
                 "queue_len"}


def test_frame_dict_is_json_with_the_documented_fields():
    st = LiveState(interval=1.0)
    step(st, obs(0.0, workers(11, 22)))
    f = step(st, obs(1.0, workers(11, 22), ready={100: 3}))     # max:min is inf
    d = json.loads(json.dumps(frame_dict(f, GROUP), allow_nan=False))
    assert NDJSON_FIELDS <= set(d)
    assert all(WORKER_FIELDS <= set(w) for w in d["workers"])
    assert d["max_min_ratio"] is None and d["ts"] == 1001.0
    assert (d["port"], d["proto"], d["count_of"]) == (8080, "tcp", "connections")


def test_prometheus_collector_renders_the_frame():
    from prometheus_client import CollectorRegistry, generate_latest
    st = LiveState(interval=1.0)
    step(st, obs(0.0, workers(11, 22)))
    f = step(st, obs(1.0, workers(11, 22, cpu_seconds=1.5), ready={100: 3, 101: 1},
                     lookups=4, wakeups={11: 3}))
    c = FrameCollector()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    assert generate_latest(reg) == b""                  # nothing before the first frame
    c.update(f, GROUP)
    fams = {m.name: m for m in text_string_to_metric_families(generate_latest(reg).decode())}
    acc = fams["reuseport_ctl_worker_accepts"]
    assert acc.type == "counter"
    # a member socket's series: its slot and inode, no pid (the socket's counts)
    got = {(s.labels["worker"], s.labels["inode"], s.labels.get("pid", "")): s.value
           for s in acc.samples if s.name.endswith("_total")}
    assert got == {("0", "100", ""): 3, ("1", "101", ""): 1}
    served = {(s.labels["worker"], s.labels["inode"]): s.labels["pid"]
              for s in fams["reuseport_ctl_worker_process"].samples}
    assert served == {("0", "100"): "11", ("1", "101"): "22"}
    assert all(s.labels["port"] == "8080" for s in acc.samples)
    assert fams["reuseport_ctl_lookups"].samples[0].value == 4
    assert fams["reuseport_ctl_jain_index"].samples[0].value == pytest.approx(0.8)
    assert fams["reuseport_ctl_max_min_ratio"].samples[0].value == 3.0
    assert fams["reuseport_ctl_group_info"].samples[0].labels["lookup_strategy"] == "sk_lookup"


@pytest.mark.parametrize("spec,want", [
    ("9101", ("127.0.0.1", 9101)), ("0.0.0.0:9101", ("0.0.0.0", 9101)),
    ("[::1]:9101", ("::1", 9101)), (":9101", ("127.0.0.1", 9101)), ("0", ("127.0.0.1", 0))])
def test_parse_listen(spec, want):
    assert parse_listen(spec) == want


@pytest.mark.parametrize("spec", ["", "x", "host:9101", "1.2.3.4:70000", "[::1]9101"])
def test_parse_listen_refuses(spec):
    with pytest.raises(UserError, match="--prometheus takes"):
        parse_listen(spec)


# --- a listener shared without SO_REUSEPORT -----------------------------------------------

def shared(*pids):
    return tuple(WorkerObs(pid=p, slot=0, inodes=(100,), shared=True) for p in pids)


def test_shared_listener_accepts_are_unknown_without_accept_counts():
    st = LiveState(interval=1.0, counted=(True, True, False))
    step(st, Observation(ts=0.0, wall=1000.0, workers=shared(11, 22)))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=shared(11, 22),
                             data_ready={100: 30},
                             wakeups={(100, 11, 11): 20, (100, 22, 22): 15}))
    # each sharer sees the listener's every event; who took them is unknown
    assert [r.data_ready for r in f.rows] == [30, 30]
    assert [r.wakeups_per_event for r in f.rows] == [20 / 30, 15 / 30]
    assert [r.accepts for r in f.rows] == [None, None]
    assert [r.share for r in f.rows] == [None, None]
    assert f.jain is None and f.max_min_ratio is None and f.accepts is None
    assert frame_dict(f, GROUP)["jain"] is None


def test_shared_listener_accepts_from_accept_counts():
    st = LiveState(interval=1.0, counted=(True, True, True))
    step(st, Observation(ts=0.0, wall=1000.0, workers=shared(11, 22)))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=shared(11, 22),
                             data_ready={100: 30}, accepted={11: 20, 22: 10}))
    assert [r.accepts for r in f.rows] == [20, 10]
    assert [r.share for r in f.rows] == pytest.approx([2 / 3, 1 / 3])
    assert f.accepts == 30 and f.max_min_ratio == 2.0


# --- one row per member socket: threaded servers --------------------------------------------

def threaded(pid=50, tids=(50, 51), inodes=(200, 201), nthreads=2):
    """One process, one SO_REUSEPORT socket per thread (HAProxy shards by-thread)."""
    return tuple(WorkerObs(pid=pid, slot=i, inodes=(ino,), tids=(t,), nthreads=nthreads)
                 for i, (t, ino) in enumerate(zip(tids, inodes)))


def test_a_threaded_server_has_a_row_per_socket_with_its_threads():
    st = LiveState(interval=1.0)
    step(st, Observation(ts=0.0, wall=1000.0, workers=threaded()))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=threaded(),
                             data_ready={200: 30, 201: 10},
                             wakeups={(200, 50, 50): 30, (201, 50, 51): 9, (201, 50, 52): 1}))
    a, b = f.rows
    assert (a.pid, a.slot, a.inode, a.accepts, a.wakeups) == (50, 0, 200, 30, 30)
    assert (b.pid, b.slot, b.inode, b.accepts, b.wakeups) == (50, 1, 201, 10, 10)
    # the threads its data-ready woke serve it too (a thread pool: 51 and 52)
    assert a.tids == (50,) and b.tids == (51, 52)
    assert f.jain == pytest.approx(40 ** 2 / (2 * (30 ** 2 + 10 ** 2)))
    assert f.wakeups == 40
    d = frame_dict(f, GROUP)
    assert d["group_size"] == 2
    assert [(w["slot"], w["pid"], w["inode"], w["tids"]) for w in d["workers"]] == \
        [(0, 50, 200, [50]), (1, 50, 201, [51, 52])]


def test_a_single_threaded_process_has_no_thread_label():
    st = LiveState(interval=1.0)
    ws = workers(11)
    step(st, obs(0.0, ws))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=ws, data_ready={100: 3},
                             wakeups={(100, 11, 11): 3}))
    assert f.rows[0].tids == () and f.rows[0].wakeups == 3


def test_a_socket_of_the_same_process_leaving_is_named_by_its_slot():
    """Row identity is the socket with its process, not the pid: one of a
    threaded server's two sockets closing is one row leaving."""
    st = LiveState(interval=1.0)
    step(st, Observation(ts=0.0, wall=1000.0, workers=threaded()))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=threaded()[:1]))
    assert f.left == (RowRef(1, 50, 201),) and f.joined == ()
    assert [str(r) for r in f.left] == ["slot 1 (pid 50)"]
    # the same socket served by a new process (a worker respawned on the socket
    # it inherited): the same row, its counts go on, and it 'moved'
    f2 = step(st, Observation(ts=2.0, wall=1002.0, data_ready={200: 5},
                              workers=(WorkerObs(pid=60, slot=0, inodes=(200,)),)))
    assert f2.joined == () and f2.left == ()
    assert f2.moved == (Moved(0, 200, 60, 50),)
    assert str(f2.moved[0]) == "slot 0: socket inode 200 now served by pid 60 (was 50)"
    assert (f2.rows[0].pid, f2.rows[0].accepts, f2.rows[0].accepts_per_s) == (60, 5, 5.0)
    d = frame_dict(f2, GROUP)
    assert d["moved"] == [{"slot": 0, "inode": 200, "pid": 60, "was": 50}]
    assert d["joined"] == [] and d["left"] == []


def test_a_moved_members_own_counters_and_wakeups_go_on():
    """run --watch: a worker restarted on its socket counts from 0; the
    row's totals go on from the old worker's (no counter goes backwards)."""
    st = LiveState(interval=1.0)
    old = WorkerObs(pid=50, slot=0, inodes=(200,), accepts=100, eagain=10)
    step(st, Observation(ts=0.0, wall=1000.0, workers=(old,)))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=(replace(old, accepts=130, eagain=12),),
                             data_ready={200: 30}, wakeups={(200, 50, 50): 30}))
    assert (f.rows[0].accepts, f.rows[0].spurious_wakeups, f.rows[0].wakeups) == (30, 2, 30)
    new = WorkerObs(pid=60, slot=0, inodes=(200,), accepts=7, eagain=1)
    f = step(st, Observation(ts=2.0, wall=1002.0, workers=(new,), data_ready={200: 37},
                             wakeups={(200, 50, 50): 30, (200, 60, 60): 7}))
    assert f.moved == (Moved(0, 200, 60, 50),)
    assert (f.rows[0].accepts, f.rows[0].spurious_wakeups, f.rows[0].wakeups) == (37, 3, 37)


def test_a_moved_members_wakeups_keep_what_its_last_frame_did_not_see():
    """A foreign server's worker killed and respawned on its socket: the old
    process's wakeups after the last frame belong to the row too (they were
    lost: nginx, 336 + 296 accepts, 294 wakeups in no row)."""
    st = LiveState(interval=1.0)
    old = WorkerObs(pid=50, slot=0, inodes=(200,))
    step(st, Observation(ts=0.0, wall=1000.0, workers=(old,)))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=(old,), data_ready={200: 10},
                             wakeups={(200, 50, 50): 10}))
    assert f.rows[0].wakeups == 10
    new = WorkerObs(pid=60, slot=0, inodes=(200,))
    f = step(st, Observation(ts=2.0, wall=1002.0, workers=(new,), data_ready={200: 45},
                             wakeups={(200, 50, 50): 25, (200, 60, 60): 20}))
    assert f.moved == (Moved(0, 200, 60, 50),)
    assert (f.rows[0].accepts, f.rows[0].wakeups) == (45, 45)
    assert f.wakeups == sum(r.wakeups for r in f.rows)


def test_a_member_that_left_keeps_its_connections_in_the_group_total():
    """gunicorn --reuse-port, a worker killed: its socket closes and the new
    worker binds another. The group total was the rows' sum, 1489 of 1800
    lookups; the closed socket's 311 (counted by the kernel per socket, after
    the last frame too) belong to it."""
    st = LiveState(interval=1.0)
    a, b = WorkerObs(pid=50, slot=0, inodes=(200,)), WorkerObs(pid=51, slot=1, inodes=(201,))
    step(st, Observation(ts=0.0, wall=1000.0, workers=(a, b)))
    c = WorkerObs(pid=60, slot=0, inodes=(300,))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=(c, b), lookups=900,
                             data_ready={200: 311, 201: 589, 300: 0}))
    assert [(r.pid, r.inode) for r in f.left] == [(50, 200)]
    assert [r.accepts for r in f.rows] == [0, 589]
    assert f.accepts == 900 == f.lookups
    f = step(st, Observation(ts=2.0, wall=1002.0, workers=(c, b), lookups=1000,
                             data_ready={200: 311, 201: 639, 300: 50}))
    assert f.accepts == 1000
    assert [r.share for r in f.rows] == [50 / 689, 639 / 689]   # the split: live members


def test_wakeups_of_another_socket_or_process_are_not_a_rows():
    st = LiveState(interval=1.0)
    ws = threaded()
    step(st, Observation(ts=0.0, wall=1000.0, workers=ws))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=ws, data_ready={200: 2},
                             wakeups={(200, 50, 50): 2, (200, 77, 77): 5, (-9, 50, 51): 4}))
    assert [r.wakeups for r in f.rows] == [2, 0]
    assert f.wakeups == 11                      # the group total keeps every wakeup


# --- dispatchers ----------------------------------------------------------------------------

def test_a_dispatcher_has_no_fairness_and_null_child_accepts():
    st = LiveState(interval=1.0)
    ws = (WorkerObs(pid=10, slot=0, inodes=(300,), conns=0),
          WorkerObs(pid=11, slot=-1, inodes=(), child=True, conns=3),
          WorkerObs(pid=12, slot=-1, inodes=(), child=True, conns=1))
    step(st, Observation(ts=0.0, wall=1000.0, workers=ws, dispatcher=True))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=ws, data_ready={300: 4},
                             wakeups={(300, 10, 10): 4}, dispatcher=True))
    acceptor, *kids = f.rows
    assert (acceptor.accepts, acceptor.wakeups, acceptor.child) == (4, 4, False)
    assert [(k.pid, k.child, k.conns, k.accepts, k.share, k.wakeups) for k in kids] == \
        [(11, True, 3, None, None, None), (12, True, 1, None, None, None)]
    assert f.accepts == 4 and f.dispatcher
    assert f.jain is None and f.max_min_ratio is None     # the split is the server's own
    d = frame_dict(f, GROUP)
    assert d["dispatcher"] is True and d["group_size"] == 1
    assert [(w["slot"], w["child"], w["conns"], w["accepts"]) for w in d["workers"]] == \
        [(0, False, 0, 4), (None, True, 3, None), (None, True, 1, None)]


def test_prometheus_labels_threads_and_children():
    from prometheus_client import CollectorRegistry, generate_latest
    st = LiveState(interval=1.0)
    ws = threaded() + (WorkerObs(pid=70, slot=-1, inodes=(), child=True, conns=2),)
    step(st, Observation(ts=0.0, wall=1000.0, workers=ws, dispatcher=True))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=ws, data_ready={200: 3, 201: 1},
                             dispatcher=True))
    c = FrameCollector()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    c.update(f, GROUP)
    fams = {m.name: m for m in text_string_to_metric_families(generate_latest(reg).decode())}
    got = {(s.labels["worker"], s.labels["inode"]): s.value
           for s in fams["reuseport_ctl_worker_accepts"].samples if s.name.endswith("_total")}
    assert got == {("0", "200"): 3, ("1", "201"): 1}
    served = {s.labels["worker"]: (s.labels.get("pid"), s.labels.get("tids"))
              for s in fams["reuseport_ctl_worker_process"].samples}
    assert served == {"0": ("50", "50"), "1": ("50", "51"), "child": ("70", "")}
    conns = {(s.labels["worker"], s.labels["pid"]): s.value
             for s in fams["reuseport_ctl_worker_connections"].samples}
    assert conns == {("child", "70"): 2}
    assert fams["reuseport_ctl_group_workers"].samples[0].value == 2
    assert fams["reuseport_ctl_group_info"].samples[0].labels["dispatcher"] == "true"


def test_dashboard_names_threads_and_the_dispatcher():
    from rich.console import Console

    from reuseport_ctl.ui.dashboard import render
    st = LiveState(interval=1.0)
    ws = threaded()
    step(st, Observation(ts=0.0, wall=1000.0, workers=ws))
    f = step(st, Observation(ts=1.0, wall=1001.0, workers=ws, data_ready={200: 3}))
    con = Console(width=140, record=True)
    con.print(render(f, GROUP))
    text = con.export_text()
    assert "2 workers (2 sockets in 1 process)" in text
    assert "50 [50]" in text and "50 [51]" in text
    kid = WorkerObs(pid=70, slot=-1, inodes=(), child=True, conns=2)
    ws2 = (WorkerObs(pid=10, slot=0, inodes=(300,)), kid)
    st2 = LiveState(interval=1.0)
    step(st2, Observation(ts=0.0, wall=1000.0, workers=ws2, dispatcher=True))
    f2 = step(st2, Observation(ts=1.0, wall=1001.0, workers=ws2, dispatcher=True))
    con = Console(width=140, record=True)
    con.print(render(f2, GROUP))
    text = con.export_text()
    assert "dispatcher: the kernel sees one listener; its split across children is the " \
           "server's own" in text
    assert "1 worker, 1 child" in text and "child" in text


# --- the probes' common start ---------------------------------------------------------------

def test_probe_totals_minus_a_baseline():
    from reuseport_ctl.probes.session import ProbeTotals
    base = ProbeTotals(1.0, 100, {"tcp4": 100}, None, {7: 50}, {11: 40}, {11: 2}, {11: 48},
                       {(7, 11, 11): 30, (7, 11, 12): 10})
    now = ProbeTotals(2.0, 130, {"tcp4": 130}, None, {7: 80, 8: 1}, {11: 70}, {11: 2},
                      {11: 78}, {(7, 11, 11): 50, (7, 11, 12): 20})
    d = now.minus(base)
    assert (d.ts, d.lookups, d.lookups_by_class) == (2.0, 30, {"tcp4": 30})
    assert d.data_ready == {7: 30, 8: 1} and d.wakeups == {11: 30}
    assert d.accept_eagain == {} and d.accepted == {11: 30}
    assert d.thread_wakeups == {(7, 11, 11): 20, (7, 11, 12): 10}
    none = ProbeTotals(2.0, None, {}, None, {}, {}, {}, {})
    assert none.minus(none).lookups is None


def test_rx_by_says_unknown_rather_than_zero():
    from reuseport_ctl.stats.live import rx_by
    rx = {(0, 283, None): 3, (1, None, None): 2}
    assert rx_by(rx, "cpu") == {0: 3, 1: 2}
    assert rx_by(rx, "napi_id") == {283: 3}                 # the ones that had one
    assert rx_by({(0, None, None): 5}, "napi_id") is None   # none had one: unknown, not {0: 5}
    assert rx_by(rx, "rx_queue") is None
    assert rx_by({}, "napi_id") == {}                       # nothing arrived yet
    assert rx_by({}, "rx_queue", frozenset({"rx_queue"})) is None   # the kernel cannot tell
    assert rx_by(None, "cpu") is None                       # not counted


def test_rx_note_names_the_kernel_and_the_device():
    from reuseport_ctl.stats.live import WorkerRow, rx_note
    row = WorkerRow(pid=1, slot=0, inode=1, tids=(), cpu_percent=None, cpu_seconds=None,
                    accepts=3, accepts_per_s=None, share=None, history=(), data_ready=3,
                    data_ready_per_s=None, wakeups=None, wakeups_per_event=None,
                    spurious_wakeups=None, queue_len=0, rx={(0, None, 0): 3})
    note = rx_note("tcp", {}, [row])
    assert note.startswith("napi_id: 3 connections arrived through a device without NAPI ids")
    note = rx_note("tcp", {"rx_queue": "no sk_rx_queue_mapping"}, [row])
    assert "rx_queue: no sk_rx_queue_mapping" in note
    assert "not counted" in rx_note("udp", None, [])


def test_slots_stay_with_their_socket_over_the_watch():
    """Without a pinned policy, find_group numbers by (serving pid, inode);
    the watch keeps each socket's first slot: a worker respawned with a
    higher pid does not reshuffle the slots, a new socket takes the lowest
    free one."""
    import socket as so

    from reuseport_ctl.groups import Member, ReuseportGroup
    from reuseport_ctl.watching.sources import stable_slots

    def group(*pid_inode):
        ms = [Member(slot=n, inode=i, pid=p, fd=3, family=so.AF_INET, addr="127.0.0.1:80",
                     queue_len=0) for n, (p, i) in enumerate(sorted(pid_inode))]
        return ReuseportGroup(port=80, proto="tcp", members=tuple(ms))

    def slots(g):
        return {m.inode: (m.slot, m.pid) for m in g.members}
    kept: dict[int, int] = {}
    assert slots(stable_slots(group((10, 100), (11, 101), (12, 102)), kept)) == \
        {100: (0, 10), 101: (1, 11), 102: (2, 12)}
    # pid 10 killed, its socket (100) inherited by pid 13: still slot 0
    g = stable_slots(group((13, 100), (11, 101), (12, 102)), kept)
    assert slots(g) == {100: (0, 13), 101: (1, 11), 102: (2, 12)}
    assert [m.slot for m in g.members] == [0, 1, 2]              # in slot order
    # socket 101 closed, a new one (103) opened: it takes the free slot 1
    assert slots(stable_slots(group((13, 100), (14, 103), (12, 102)), kept)) == \
        {100: (0, 13), 103: (1, 14), 102: (2, 12)}


def test_dashboard_shows_arrivals_only_once_something_arrived():
    """Nothing arrived yet: no 'rx cpu' column, no NAPI table (never a '0'
    that reads as CPU 0); then the counts."""
    from rich.console import Console

    from reuseport_ctl.ui.dashboard import render

    def text_of(rx):
        st = LiveState(interval=1.0)
        ws = (WorkerObs(pid=10, slot=0, inodes=(300,), rx=rx),
              WorkerObs(pid=11, slot=1, inodes=(301,), rx={}))
        step(st, Observation(ts=0.0, wall=1000.0, workers=ws))
        f = step(st, Observation(ts=1.0, wall=1001.0, workers=ws))
        con = Console(width=160, record=True)
        con.print(render(f, GROUP))
        return con.export_text()
    idle = text_of({})
    assert "rx cpu" not in idle and "napi id" not in idle
    busy = text_of({(1, None, None): 3})
    assert "rx cpu" in busy and "1:3" in busy and "napi id" not in busy
