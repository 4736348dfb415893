"""`reuseport-ctl bench --long-lived`, small, through the real CLI, on real
processes in a netns: least-conns holds 17 connections over 3 workers
within one of 6/6/5, after the bursts and after a reconnect storm; the
kernel's count equals what the workers' answers say; the JSON matches its
schema; bad input gets one sentence."""
from __future__ import annotations

import json

import pytest

from reuseport_ctl.experiments import long_lived as L

PNG = b"\x89PNG\r\n\x1a\n"


def runs(p) -> list[dict]:
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert L.check_schema(doc) == [], L.check_schema(doc)
    return doc


def test_least_conns_17_over_3_bursts_and_storm(netns, cli, tmp_path):
    png = tmp_path / "live.png"
    p = cli("bench", "--long-lived", 17, "--workers", 3, "--policies", "least-conns",
            "--repeat", 1, "--hold", 0.5, "--json", "--plot", png, timeout=90)
    doc = {d["policy"]: d for d in runs(p)}
    assert set(doc) == {"kernel", "least-conns"}
    for d in doc.values():
        assert d["case"] == "17 over 3" and d["ideal"] == [6, 6, 5] and d["errors"] == 0
        assert sum(d["live_opened"]) == sum(d["live_stormed"]) == 17
        # the kernel's count is what the workers' own answers say, worker by worker
        assert d["live_opened"] == d["client_opened"] and d["live_stormed"] == d["client_stormed"]
        assert d["source"] == "kernel"
        assert len(d["cpu_opened"]) == 3 and sum(d["requests_opened"]) >= 17
        assert 0 < d["phases"]["opened"] < d["phases"]["storm"] <= d["phases"]["reopened"]
    lc = doc["least-conns"]
    assert L.within_one(lc["live_opened"], 17), lc["live_opened"]
    assert L.within_one(lc["live_stormed"], 17), lc["live_stormed"]
    assert lc["off_opened"] <= 1 and lc["off_stormed"] <= 1
    assert png.read_bytes()[:8] == PNG


def test_two_over_three_counted_from_the_fd_tables(netns, cli):
    """--no-probes: the sockets each worker holds (sock_diag, fd tables)."""
    p = cli("bench", "--long-lived", 2, "--policies", "none", "--repeat", 1, "--hold", 0.5,
            "--no-probes", "--json", timeout=60)
    (d,) = runs(p)
    assert d["source"] == "fd tables" and d["workers"] == 3 and d["ideal"] == [1, 1, 0]
    assert d["live_opened"] == d["client_opened"] and sum(d["live_opened"]) == 2
    assert d["live_stormed"] == d["client_stormed"] and sum(d["live_stormed"]) == 2


def test_table_names_the_columns(netns, cli):
    p = cli("bench", "--long-lived", 2, "--workers", 2, "--policies", "round-robin",
            "--repeat", 1, "--hold", 0.5, "--no-probes", timeout=60)
    assert p.returncode == 0, p.stderr
    for word in ("2 over 2", "reuseport/round-robin", "after the bursts", "after the storm",
                 "even split", "1/1", "requests", "CPU %", "fd tables"):
        assert word in p.stdout, word


@pytest.mark.parametrize("args, words", [
    (["--long-lived", 0], "from 1 to 5000, not 0"),
    (["--long-lived", "x"], "comma-separated list of integers"),
    (["--long-lived", 17, "--stall"], "drop --stall"),
    (["--long-lived", 17, "--concurrency", 4], "drop --concurrency"),
    (["--long-lived", "--models", "shared-epoll"], "--models reuseport"),
    (["--long-lived", 17, "--hold", 0.1], "--hold must be between 0.5 and 3600"),
    (["--long-lived", 17, "--work-us", "1,2"], "one --work-us value"),
    (["--hold", 3], "--hold is an option of --long-lived"),
])
def test_bad_input_one_sentence(cli, args, words):
    p = cli("bench", *args, timeout=30)
    assert p.returncode == 1, p.stderr
    assert words in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_sigterm_mid_hold_leaves_no_child_and_no_bpf(netns):
    """Stopped while it holds its connections: the runs done are printed,
    every process and the live-connection probe are gone."""
    import signal
    import subprocess
    import time

    from conftest import bpf_objects
    from test_bench import EXE, _descendants, _leaked_bpf
    before = bpf_objects()
    p = subprocess.Popen([EXE, "bench", "--long-lived", "17", "--hold", "30", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict = {}
    deadline = time.monotonic() + 30
    while len(seen) < 4 and time.monotonic() < deadline:    # 3 workers and the client
        seen.update({k.pid: k for k in _descendants(p.pid)})
        time.sleep(0.05)
    assert len(seen) >= 4, p.communicate(timeout=10)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert json.loads(out) == [] and "interrupted" in err.decode()
    assert not [k for k in seen.values() if k.is_running() and k.status() != "zombie"]
    assert _leaked_bpf(before) == (set(), set(), set())


# --- pure parts -------------------------------------------------------------------------

def test_ideal_and_distance():
    assert L.ideal(17, 3) == [6, 6, 5] and L.ideal(2, 3) == [1, 1, 0] and L.ideal(3, 3) == [1] * 3
    assert L.off_ideal([6, 5, 6]) == 0 and L.off_ideal([2, 0, 0]) == 1
    assert L.off_ideal([2, 6, 9]) == 3 and L.off_ideal([0, 0, 17]) == 11
    assert L.within_one([7, 5, 5]) and L.within_one([7, 6, 4])
    assert not L.within_one([8, 5, 4]) and L.within_one([2, 0, 0], 2)   # off_ideal tells 2/0/0


def test_sample_at_a_phase():
    tl = [[0.0, [0]], [0.1, [1]], [0.2, [2]], [0.3, [3]]]
    assert L.at(tl, 0.05, 0.25) == [0.2, [2]] and L.at(tl, 0.31, 0.4) is None


def test_summary_counts_ideal_repeats():
    def run(rep, opened, stormed):
        return L.Run(case="17 over 3", conns=17, workers=3, policy="kernel", label="reuseport",
                     repeat=rep, ideal=[6, 6, 5], live_opened=opened, live_stormed=stormed,
                     client_opened=opened, client_stormed=stormed,
                     off_opened=L.off_ideal(opened), off_stormed=L.off_ideal(stormed),
                     requests_opened=[1, 2, 3], requests_stormed=[3, 2, 1],
                     cpu_opened=[1.0, 2.0, 3.0], cpu_stormed=[3.0, 2.0, 1.0], errors=0,
                     source="kernel", phases={"opened": 1, "storm": 2, "reopened": 3, "end": 4})
    (row,) = L.summarize([run(0, [6, 6, 5], [9, 5, 3]), run(1, [6, 5, 6], [6, 6, 5])])
    assert (row.ideal_opened, row.ideal_stormed, row.repeats, row.worst) == (2, 1, 2, 0)
    assert row.opened == [[6, 6, 5], [6, 5, 6]] and row.cpu_opened == (3.0, 1.0)
    assert row.requests_opened == (3, 1) and row.requests_stormed == (3, 1)
    from dataclasses import asdict
    assert L.check_schema([asdict(run(0, [6, 6, 5], [6, 6, 5]))]) == []
    bad = asdict(run(0, [6, 6, 5], [6, 6, 5]))
    bad["source"], bad["off_opened"] = "guess", -1
    del bad["live_stormed"]
    errs = L.check_schema([bad])
    assert any("guess" in e for e in errs) and any("off_opened" in e for e in errs)
    assert any("missing 'live_stormed'" in e for e in errs)


def test_help_says_what_long_lived_runs_at(cli):
    """--help names the requests column and --long-lived's own work per request."""
    p = cli("bench", "--help", timeout=30)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())
    assert f"with --long-lived: one value, {L.DEFAULT_WORK_US}" in text
    assert "requests (answers counted by the client)" in text
