"""compare-kernels (reuseport_ctl/experiments/kernel_ab.py): the comparison
over two recorded runs (verify, doctor, remap, run JSON), pure; its
rendering; and the command's bad input (one sentence, non-zero exit)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from reuseport_ctl.experiments import kernel_ab as AB
from reuseport_ctl.ui.kernel_ab_view import render_ab

# a real run (trimmed to what compare() reads): Debian 6.1 vs 6.12 under TCG, docs/kernel-ab.md
RECORDED = Path(__file__).parent / "data" / "compare-kernels-6.1-6.12.json"


def _check(name, status, detail=""):
    return {"name": name, "selftest": None, "status": status, "detail": detail, "seconds": 0.1}


def _remap(policy, change, nb, na, moved, theory, flows=1000):
    return {"policy": policy, "n_before": nb, "n_after": na, "flows": flows,
            "moved_fraction": moved, "theoretical_fraction": theory, "change": change,
            "removed_slot": None if change == "join" else na, "proto": "udp", "lost": 0}


def _doctor(lookup, sk_ready):
    return {"probes": {"lookup": {"strategy": lookup, "target": "t", "reason": "r"},
                       "data_ready": {"strategy": "kprobe", "target": "sock_def_readable",
                                      "reason": "r"}},
            "facilities": [{"name": "kprobes", "ok": True, "detail": ""},
                           {"name": "sk_data_ready tracepoint", "ok": sk_ready,
                            "detail": "" if sk_ready else "no sock:sk_data_ready"}]}


def _run(label, verify, remap, counts, lookup="kprobe", sk_ready=True, ok=True):
    return {"label": label, "spec": label, "where": "vm", "ok": ok, "cpus": 2, "accel": "tcg",
            "attempts": 1, "seconds": 100.0, "boot_seconds": 10.0, "release": label,
            "verify": verify, "verify_run": {"seconds": 60.0}, "doctor": _doctor(lookup, sk_ready),
            "remap": remap,
            "spread": {"proto": "tcp", "workers": [{"slot": i, "count": c}
                                                   for i, c in enumerate(counts)]}}


def _pair():
    """A: an older kernel; B: a patched one that breaks one check, fixes
    another, loses the 4-tuple hash check, and maps flows evenly by a counter."""
    a = _run("6.1.0-57-cloud-amd64",
             [_check("tcp-ipv4-distribution", "pass", "64 tcp ipv4 flows over 4 members: "
                                                      "[14, 17, 10, 23]"),
              _check("migrate-requests-bpf", "pass"),
              _check("steering-detach", "fail", "still steered"),
              _check("probes-fallback", "skip", "no sock:sk_data_ready"),
              _check("udp-hash4-effective", "skip", "kernel < 6.13"),
              _check("uid-anti-hijack", "pass")],
             [_remap("kernel", "join", 2, 3, 0.49, 0.5), _remap("hash", "join", 2, 3, 0.66, 0.667),
              _remap("kernel", "leave", 3, 2, 0.0, 0.0)],
             [103, 91, 94, 112], sk_ready=False)
    b = _run("6.12.118+deb12-cloud-amd64",
             [_check("tcp-ipv4-distribution", "pass", "64 tcp ipv4 flows over 4 members: "
                                                      "[16, 16, 16, 16]"),
              _check("migrate-requests-bpf", "fail", "3 requests reset"),
              _check("steering-detach", "pass"),
              _check("probes-fallback", "pass"),
              _check("uid-anti-hijack", "pass")],
             [_remap("kernel", "join", 2, 3, 0.52, 0.5), _remap("hash", "join", 2, 3, 0.90, 0.667),
              _remap("kernel", "leave", 3, 2, 0.01, 0.0)],
             [100, 100, 100, 100])
    return a, b


def _record():
    a, b = _pair()
    return {"generated": "2026-12-05T05:00:00+00:00", "host": {"kernel": "6.18", "cpus": 2},
            "kernels": [a, b], "ab": AB.compare(a, b)}


# --- checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("sa,sb,want", [
    ("pass", "pass", None), ("skip", "skip", None), ("fail", "fail", None),
    ("pass", "fail", "regressed"), ("skip", "fail", "regressed"),
    ("fail", "pass", "fixed"), ("fail", "skip", "fixed"),
    ("pass", "skip", "skip"), ("skip", "pass", "skip"),
    ("pass", None, "missing"), (None, "fail", "missing")])
def test_change_from_a_to_b(sa, sb, want):
    cell = (lambda s: None if s is None else {"status": s, "detail": ""})
    assert AB.change(cell(sa), cell(sb)) == want


def test_checks_that_differ_and_how():
    ab = _record()["ab"]
    by = {r["name"]: r["change"] for r in ab["checks"]}
    assert by == {"tcp-ipv4-distribution": None, "migrate-requests-bpf": "regressed",
                  "steering-detach": "fixed", "probes-fallback": "skip",
                  "udp-hash4-effective": "missing", "uid-anti-hijack": None}
    s = ab["summary"]
    assert (s["checks"], s["checks_differ"], s["regressed"], s["fixed"]) == (6, 4, 1, 1)


def test_doctor_differences():
    ab = _record()["ab"]
    assert [r["name"] for r in ab["probes"] if r["differs"]] == []
    assert [r["name"] for r in ab["facilities"] if r["differs"]] == ["sk_data_ready tracepoint"]
    a, b = _pair()
    b["doctor"]["probes"]["lookup"]["strategy"] = "sk_lookup"
    assert [r["name"] for r in AB.compare(a, b)["probes"] if r["differs"]] == ["lookup"]


# --- remap: a moved fraction beyond its binomial noise ----------------------------------------

def test_remap_rows_flag_only_what_is_beyond_noise():
    rows = AB.remap_rows(*(r["remap"] for r in _pair()))
    kj, hj, kl = rows
    # 0.49 vs 0.52 of 1000 flows at p=0.5: se 0.0158 each, 3σ combined 0.067
    assert not kj["differs"] and kj["noise"] == pytest.approx(0.0671, abs=1e-3)
    assert kj["delta"] == pytest.approx(0.03)
    # 0.66 vs 0.90 (theory 0.667): B moved far more flows, and is off its theory
    assert hj["differs"] and hj["b_off_theory"] and not hj["a_off_theory"]
    # theory 0: no binomial noise, so one flow is the floor: 10 flows moved is a difference
    assert kl["noise"] == pytest.approx(0.001) and kl["differs"] and kl["b_off_theory"]


def test_remap_rows_pair_by_policy_change_and_sizes():
    a = [_remap("kernel", "join", 2, 3, 0.5, 0.5), _remap("kernel", "join", 3, 4, 0.5, 0.5)]
    b = [_remap("kernel", "join", 3, 4, 0.5, 0.5), _remap("kernel", "leave", 4, 3, 0.5, 0.5)]
    rows = AB.remap_rows(a, b)
    assert [(r["n_before"], r["n_after"], r["change"]) for r in rows] == [(3, 4, "join")]
    assert AB.remap_rows(None, b) == [] and AB.remap_rows(a, None) == []


# --- spread over members -----------------------------------------------------------------

@pytest.mark.parametrize("x,k,p", [(3.841, 1, 0.05), (5.991, 2, 0.05), (7.815, 3, 0.05),
                                   (9.488, 4, 0.05), (11.345, 3, 0.01), (0.0, 3, 1.0)])
def test_chi2_survival_matches_the_tables(x, k, p):
    assert AB.chi2_sf(x, k) == pytest.approx(p, abs=2e-4)


def test_spread_verdicts():
    assert AB.spread([100, 100, 100, 100])["verdict"] == "even"          # a counter
    s = AB.spread([14, 17, 10, 23])                                        # a hash's draw
    assert s["verdict"] == "hash-like" and s["jain"] == pytest.approx(0.919, abs=1e-3)
    assert AB.spread([200, 100, 50, 50])["verdict"] == "uneven"
    assert AB.spread([0, 0])["verdict"] == "none" and AB.spread([5])["verdict"] == "none"


def test_member_counts_come_from_verify_details_and_the_run():
    a, _ = _pair()
    assert AB.member_counts(a) == {"tcp-ipv4-distribution": [14, 17, 10, 23],
                                   "run --load: tcp, 4 workers": [103, 91, 94, 112]}


def test_spread_rows_flag_a_changed_verdict():
    rows = {r["name"]: r for r in _record()["ab"]["spread"]}
    assert rows["tcp-ipv4-distribution"]["differs"]          # hash-like → even (16 each)
    assert rows["run --load: tcp, 4 workers"]["differs"]
    a, _ = _pair()
    same = AB.compare(a, {**a, "label": "other"})
    assert not any(r["differs"] for r in same["spread"] + same["remap"] + same["checks"])


# --- the whole record: exit status, rendering ---------------------------------------------

def test_exit_status():
    rec = _record()
    assert AB.exit_status(rec) == 1                      # migrate-requests-bpf fails on B only
    a, b = _pair()
    b["verify"] = a["verify"]
    assert AB.exit_status({"kernels": [a, b], "ab": AB.compare(a, b)}) == 0
    b.update(ok=False, verify=None, error="did not boot to the command")
    rec = {"kernels": [a, b], "ab": AB.compare(a, b)}
    assert AB.exit_status(rec) == 1 and rec["ab"]["summary"]["checks_differ"] is None


def test_render_names_every_difference():
    c = Console(record=True, width=160)
    c.print(render_ab(_record()))
    out = c.export_text()
    assert "A 6.1.0-57-cloud-amd64" in out and "B 6.12.118+deb12-cloud-amd64" in out
    assert "verify: 4 of 6 checks differ (1 fail on B only, 1 on A only)" in out
    for words in ("migrate-requests-bpf", "fails on B only", "fails on A only",
                  "skipped on one", "absent from one", "3 requests reset"):
        assert words in out
    assert "the other 2 checks: the same result on both (2 pass)" in out
    assert "remap: fraction of flows that moved (2 of 3 differ beyond noise)" in out
    assert "0.900 !" in out and "+0.240" in out
    assert "spread over members (2 of 2 verdicts differ)" in out
    assert "doctor: facilities that differ" in out and "no sock:sk_data_ready" in out
    assert "B: 6.12.118+deb12-cloud-amd64: VM (TCG, 2 vCPUs)" in out


def test_a_distribution_step_without_a_result_says_why():
    a, b = _pair()
    b.update(remap=None, remap_run={"error": "reuseport-ctl remap --json exited 1 without "
                                             "JSON: no bcc"})
    ab = AB.compare(a, b)
    assert ab["remap"] == [] and ab["distribution_missing"] == {
        "6.12.118+deb12-cloud-amd64: remap": "reuseport-ctl remap --json exited 1 without "
                                              "JSON: no bcc"}
    c = Console(record=True, width=200)
    c.print(render_ab({"kernels": [a, b], "ab": ab}))
    assert "6.12.118+deb12-cloud-amd64: remap: no result — reuseport-ctl remap" in c.export_text()


def test_render_when_a_kernel_did_not_run():
    a, b = _pair()
    b.update(ok=False, verify=None, doctor=None, remap=None, spread=None,
             error="did not boot to the command")
    c = Console(record=True, width=160)
    c.print(render_ab({"kernels": [a, b], "ab": AB.compare(a, b)}))
    out = c.export_text()
    assert "not run — did not boot to the command" in out and "remap:" not in out


# --- a recorded real run ---------------------------------------------------------------

def test_recorded_debian_6_1_against_6_12():
    rec = json.loads(RECORDED.read_text())
    a, b = rec["kernels"]
    assert a["release"].startswith("6.1.") and b["release"].startswith("6.12.")
    ab = AB.compare(a, b)
    # 6.1 has no sock:sk_data_ready tracepoint (it came in 6.3): the fallback probe check
    # skips there; nothing else differs, and no check fails on either
    assert {r["name"]: r["change"] for r in ab["checks"] if r["differs"]} == {
        "probes-fallback": "skip"}
    assert ab["summary"]["regressed"] == ab["summary"]["fixed"] == 0
    assert AB.exit_status({**rec, "ab": ab}) == 0
    assert [r["name"] for r in ab["facilities"] if r["differs"]] == [
        "sk_data_ready tracepoint", "tp_btf"]
    assert not any(r["differs"] for r in ab["probes"])        # kprobes on both
    # the distribution: 8 moved fractions and 7 spreads compared; on both kernels every
    # moved fraction is within noise of its policy's theory
    assert len(ab["remap"]) == 8 and len(ab["spread"]) == 7
    assert not any(r["a_off_theory"] or r["b_off_theory"] for r in ab["remap"])


# --- the command's bad input ---------------------------------------------------------------

def _one_sentence(p):
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.startswith("reuseport-ctl: ") and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel check comes after the root check")
def test_cli_a_kernel_that_does_not_exist(cli, tmp_path):
    p = cli("compare-kernels", "6.12", "5.10")
    _one_sentence(p)
    assert "'5.10'" in p.stderr and "it has:" in p.stderr
    p = cli("compare-kernels", str(tmp_path / "linux"), "6.12")
    _one_sentence(p)
    assert "no such file" in p.stderr
    (tmp_path / "tree").mkdir()
    p = cli("compare-kernels", "6.12", str(tmp_path / "tree"))
    _one_sentence(p)
    assert "not a built kernel tree" in p.stderr


def test_cli_other_bad_input(cli, tmp_path):
    _one_sentence(cli("compare-kernels", "6.12"))
    bad = tmp_path / "x.json"
    bad.write_text("[1]")
    p = cli("compare-kernels", "--from", bad)
    _one_sentence(p)
    assert "not a compare-kernels --json record" in p.stderr
    _one_sentence(cli("compare-kernels", "--from", tmp_path / "none.json"))
    _one_sentence(cli("compare-kernels", "6.1", "6.12", "--from", bad))


def test_cli_shows_a_saved_record(cli, tmp_path):
    f = tmp_path / "ab.json"
    rec = _record()
    del rec["ab"]                           # recomputed from the runs
    f.write_text(json.dumps(rec))
    p = cli("compare-kernels", "--from", f)
    assert p.returncode == 1, p.stderr          # a check fails on B only
    assert "fails on B only" in p.stdout
    p = cli("compare-kernels", "--from", f, "--json")
    assert json.loads(p.stdout)["ab"]["summary"]["regressed"] == 1


# --- for real, on the running kernel twice (no VM: seconds) ---------------------------------

def test_compare_the_running_kernel_with_itself(cli):
    if os.geteuid() != 0:
        pytest.skip("verify needs root")
    p = cli("compare-kernels", "running", "running", "--only", "udp-ipv4-distribution",
            "--json", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(p.stdout)
    a, b = rec["kernels"]
    assert a["ok"] and b["ok"] and b["label"].endswith("#2")
    ab = rec["ab"]
    assert [r["name"] for r in ab["checks"]] == ["udp-ipv4-distribution"]
    assert ab["summary"]["checks_differ"] == 0 and ab["summary"]["regressed"] == 0
    # remap: 2→3, 3→4 and back, two policies; the run's 400 connections over 4 workers
    assert ab["summary"]["remap_compared"] == 8
    assert {r["name"] for r in ab["spread"]} == {"udp-ipv4-distribution",
                                                 "run --load: tcp, 4 workers"}
    assert sum(b["spread"]["workers"][i]["count"] for i in range(4)) == 400
    assert "remap done in" in p.stderr and "run --load done in" in p.stderr    # progress
