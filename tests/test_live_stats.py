"""The per-interval aggregation behind `watch` (stats/live.py), and the
exporters' views of a frame: pure functions, no kernel."""
from __future__ import annotations

import json
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reuseport_ctl.errors import UserError
from reuseport_ctl.export.ndjson import frame_dict
from reuseport_ctl.export.prometheus import FrameCollector, parse_listen
from reuseport_ctl.stats.live import (GroupInfo, LiveState, Observation, WorkerObs,
                                      degraded_note, per_event, rate, sparkline, step)

GROUP = GroupInfo(port=8080, proto="tcp", policy="kernel", lookup_strategy="sk_lookup",
                  data_ready_strategy="tracepoint", wakeups_strategy="tracepoint",
                  kernel="6.18", addr="127.0.0.1:8080")


def workers(*pids, inode_base=100, **kw):
    return tuple(WorkerObs(pid=p, slot=i, inodes=(inode_base + i,), **kw)
                 for i, p in enumerate(pids))


def obs(ts, ws, ready=None, wakeups=None, eagain=None, lookups=None, listening=True):
    return Observation(ts=ts, wall=1000.0 + ts, workers=ws, lookups=lookups,
                       data_ready=ready or {}, wakeups=wakeups or {},
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
    assert [r.accepts for r in f0.rows] == [0, 0] and f0.jain == 1.0
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
    assert f.joined == (33,) and f.left == (22,)
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
    got = {(s.labels["worker"], s.labels["pid"]): s.value for s in acc.samples
           if s.name.endswith("_total")}
    assert got == {("0", "11"): 3, ("1", "22"): 1}
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
                             data_ready={100: 30}, wakeups={11: 20, 22: 15}))
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
