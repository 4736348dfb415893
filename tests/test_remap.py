"""remap: flows that change socket when a reuseport group gains or loses a
member, measured on real sockets, beside the theory from policies/tables.py."""
from __future__ import annotations

import json
import os

import pytest

import time

from conftest import bpf_objects
from reuseport_ctl.errors import UserError
from reuseport_ctl.experiments import remap as rx


# --- theory (pure) ------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 8, 15])
def test_mod_join_theory_is_n_over_n_plus_1(n):
    before = list(range(n))
    frac = rx.theoretical_fraction("mod", before, rx.joined(before))
    assert frac == pytest.approx(n / (n + 1), abs=1e-6)


@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_threshold_join_at_the_end_moves_half(n):
    # region overlap of n and n+1 equal regions: exactly half the hash space moves
    before = list(range(n))
    assert rx.theoretical_fraction("threshold", before, rx.joined(before)) == pytest.approx(0.5, abs=1e-6)
    assert rx.theoretical_fraction("kernel", before, rx.joined(before)) == pytest.approx(0.5, abs=1e-6)


def test_threshold_is_exact_against_brute_force():
    # a coarse check of the interval arithmetic: sample the whole space evenly
    before = list(range(5))
    after = rx.left(before, 1)
    exact = rx.theoretical_fraction("threshold", before, after)
    step = 2 ** 32 // 100003
    hs = range(0, 2 ** 32, step)
    brute = sum(before[rx.threshold_index(h, 5)] != after[rx.threshold_index(h, 4)]
                for h in hs) / len(hs)
    assert exact == pytest.approx(brute, abs=2e-4)


@pytest.mark.parametrize("n", [4, 8, 12])
def test_jump_join_theory_is_about_one_over_n_plus_1(n):
    before = list(range(n))
    frac = rx.theoretical_fraction("consistent", before, rx.joined(before))
    assert frac == pytest.approx(1 / (n + 1), abs=0.01)


def test_leaving_a_middle_slot_costs_more_than_the_last():
    before = list(range(8))
    for p in ("kernel", "consistent"):
        last = rx.theoretical_fraction(p, before, rx.left(before, 7))
        first = rx.theoretical_fraction(p, before, rx.left(before, 0))
        assert first > last, p


def test_membership_model_follows_the_kernel():
    assert rx.joined([0, 1, 2]) == [0, 1, 2, 3]
    assert rx.left([0, 1, 2, 3], 1) == [0, 3, 2]       # the last fills the hole
    assert rx.left([0, 1, 2, 3], 3) == [0, 1, 2]


def test_bad_arguments():
    with pytest.raises(UserError, match="LO-HI"):
        rx.parse_sizes("x")
    with pytest.raises(UserError, match="LO < HI"):
        rx.parse_sizes("9-8")
    with pytest.raises(UserError, match="--remove"):
        rx.parse_remove("middle")
    with pytest.raises(UserError, match="hash policies"):
        rx.run_remap(["round-robin"], 2, 3, 10)


def test_schema_rejects_a_bad_row():
    row = {"policy": "mod", "n_before": 8, "n_after": 9, "flows": 10,
           "moved_fraction": 1.5, "theoretical_fraction": 0.9}
    with pytest.raises(ValueError, match="moved_fraction"):
        rx.validate([row])
    del row["moved_fraction"]
    with pytest.raises(ValueError, match="missing"):
        rx.validate([row])


# --- real sockets ---------------------------------------------------------------

def _others_loading_bpf() -> bool:
    import psutil
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != me and ("reuseport-ctl" in cmd or "pytest" in cmd):
            return True
    return False


def _new_bpf_objects(before, seconds=10.0):
    """Programs/maps/links that appeared since `before` and are still there
    (others may load and free their own meanwhile: the machine is shared).
    The kernel frees a map after an RCU grace period: wait, bounded."""
    deadline = time.monotonic() + seconds
    while True:
        new = tuple(now - old for now, old in zip(bpf_objects(), before))
        if not any(new) or time.monotonic() > deadline:
            return new
        time.sleep(0.05)


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_remap_8_to_9(netns, proto):
    before = bpf_objects()
    fds = len(os.listdir("/proc/self/fd"))
    flows = 2000 if proto == "udp" else 600
    rows = rx.run_remap(["kernel", "mod", "hash", "threshold", "consistent"], 8, 9, flows, proto)
    rx.validate(rows)
    by = {(r["policy"], r["change"]): r for r in rows}
    assert len(rows) == 10
    for r in rows:
        assert r["lost"] == 0 and r["flows"] == flows, r
    for change in ("join", "leave"):
        c = by[("consistent", change)]
        assert c["moved_fraction"] <= 1.5 * c["theoretical_fraction"], c
        assert by[("mod", change)]["moved_fraction"] >= 0.7
        assert by[("hash", change)]["moved_fraction"] >= 0.7
        # the kernel's default is reciprocal_scale(hash, n): hash-threshold,
        # flow for flow (one port, one hash per flow for every policy)
        assert by[("kernel", change)]["moved_fraction"] == by[("threshold", change)]["moved_fraction"]
    assert len(os.listdir("/proc/self/fd")) == fds
    new = _new_bpf_objects(before)
    if any(new) and _others_loading_bpf():
        pytest.skip(f"BPF objects {new} appeared, but other reuseport-ctl processes run "
                    f"on this machine: cannot tell whose")
    assert new == (set(), set(), set())


def test_remove_first_moves_more_than_remove_last(netns):
    last = rx.run_remap(["kernel"], 2, 6, 1000, changes=("leave",), remove="last")
    first = rx.run_remap(["kernel"], 2, 6, 1000, changes=("leave",), remove="first")
    assert all(r["removed_slot"] == 0 for r in first)
    f6 = next(r for r in first if r["n_before"] == 6)
    l6 = next(r for r in last if r["n_before"] == 6)
    assert f6["theoretical_fraction"] > l6["theoretical_fraction"]
    assert f6["moved_fraction"] > l6["moved_fraction"]


def test_cli_json_and_plot(netns, cli, tmp_path):
    png = tmp_path / "remap.png"
    p = cli("remap", "--sizes", "8-9", "--flows", "500", "--json", "--plot", png, check=True)
    rows = json.loads(p.stdout)
    rx.validate(rows)
    assert {r["policy"] for r in rows} == set(rx.DEFAULT_POLICIES)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table(netns, cli):
    p = cli("remap", "--sizes", "3-4", "--flows", "200", "--policies", "kernel,consistent",
            check=True)
    assert "3 → 4" in p.stdout and "consistent" in p.stdout and "kernel" in p.stdout
