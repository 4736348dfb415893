"""scripts/kernel-matrix (reuseport_ctl/experiments/kernel_matrix.py): the
merge and render logic over small fake verify/doctor JSON, the VM retry, and
one real run on the running kernel only (a few checks, seconds)."""
from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
from rich.console import Console

import reuseport_ctl.vm as vm
from reuseport_ctl.experiments import kernel_matrix as KM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(name, status, detail="", selftest=None):
    return {"name": name, "selftest": selftest, "status": status, "detail": detail,
            "seconds": 0.1}


def _doctor(kernel, lookup, kprobes_ok, uhash4_ok=True):
    return {"kernel": kernel, "core_ok": True,
            "facilities": [
                {"name": "kprobes", "ok": kprobes_ok,
                 "detail": "kprobe PMU present" if kprobes_ok else "CONFIG_KPROBES is off"},
                {"name": "UDP 4-tuple hash", "ok": uhash4_ok,
                 "detail": "udp_lib_hash4 in BTF" if uhash4_ok else "kernel < 6.13"}],
            "probes": {"lookup": {"strategy": lookup, "target": "t-" + lookup,
                                  "reason": f"why {lookup}"},
                       "data_ready": {"strategy": "tracepoint", "target": "sock:sk_data_ready",
                                      "reason": "tp | reason"},
                       "wakeups": {"strategy": "none", "reason": "this probe is off"}}}


def _runs():
    host = {"label": "6.18.1 (running)", "spec": "running", "where": "host", "ok": True,
            "release": "6.18.1", "cpus": 2, "seconds": 21.0, "boot_seconds": None,
            "verify": [_check("tcp-ipv4-distribution", "pass", "64 flows"),
                       _check("udp-hash4-effective", "pass", "×1.0"),
                       _check("probes-kprobe", "skip", "no kprobes")],
            "verify_run": {"seconds": 20.0},
            "doctor": _doctor("6.18.1", "sk_lookup", False)}
    old = {"label": "6.1.0-56-cloud-amd64", "spec": "6.1", "where": "vm", "ok": True,
           "release": "6.1.0-56-cloud-amd64", "cpus": 2, "accel": "tcg", "attempts": 2,
           "seconds": 400.0, "boot_seconds": 20.0,
           "verify": [_check("tcp-ipv4-distribution", "pass", "64 flows"),
                      _check("udp-hash4-effective", "fail", "connected 70 µs | scan 70 µs"),
                      _check("probes-kprobe", "pass", "5 lookups"),
                      _check("new-check", "pass", "", "net/x.c")],
           "verify_run": {"seconds": 350.0},
           "doctor": _doctor("6.1.0", "kprobe", True, uhash4_ok=False)}
    dead = {"label": "6.12", "spec": "6.12", "where": "vm", "ok": False, "cpus": 2,
            "error": "did not boot to the command", "verify": None, "doctor": None,
            "attempts": 2}
    return [host, old, dead]


def _record(runs=None):
    runs = runs or _runs()
    return {"generated": "2026-11-22T05:00:00+00:00", "host": {"kernel": "6.18.1", "cpus": 2},
            "kernels": runs, "matrix": KM.merge(runs), "probes": KM.probe_rows(runs),
            "facilities": KM.facility_rows(runs)}


# --- merge -----------------------------------------------------------------------------

def test_merge_rows_in_first_seen_order_with_a_cell_per_kernel():
    rows = KM.merge(_runs())
    assert [r["name"] for r in rows] == ["tcp-ipv4-distribution", "udp-hash4-effective",
                                         "probes-kprobe", "new-check"]
    by = {r["name"]: r for r in rows}
    assert by["udp-hash4-effective"]["cells"]["6.1.0-56-cloud-amd64"]["status"] == "fail"
    assert by["udp-hash4-effective"]["cells"]["6.18.1 (running)"]["status"] == "pass"
    # a kernel that did not run has None everywhere; a check one kernel lacks is None
    assert all(r["cells"]["6.12"] is None for r in rows)
    assert by["new-check"]["cells"]["6.18.1 (running)"] is None
    assert by["new-check"]["selftest"] == "net/x.c"


def test_merge_marks_rows_whose_results_differ():
    by = {r["name"]: r for r in KM.merge(_runs())}
    assert not by["tcp-ipv4-distribution"]["differs"]      # pass, pass, (not run)
    assert by["udp-hash4-effective"]["differs"]
    assert by["probes-kprobe"]["differs"]
    assert by["new-check"]["differs"]                      # present on one kernel only


def test_merge_of_nothing_and_of_identical_kernels():
    assert KM.merge([]) == []
    a = {"label": "a", "verify": [_check("x", "pass")]}
    b = {"label": "b", "verify": [_check("x", "pass")]}
    (row,) = KM.merge([a, b])
    assert not row["differs"] and set(row["cells"]) == {"a", "b"}


def test_probe_and_facility_rows():
    runs = _runs()
    probes = {r["name"]: r for r in KM.probe_rows(runs)}
    assert list(probes) == ["lookup", "data_ready", "wakeups"]
    assert probes["lookup"]["cells"]["6.1.0-56-cloud-amd64"]["strategy"] == "kprobe"
    assert probes["lookup"]["cells"]["6.18.1 (running)"]["strategy"] == "sk_lookup"
    assert probes["lookup"]["cells"]["6.12"] is None
    facs = {r["name"]: r for r in KM.facility_rows(runs)}
    assert facs["UDP 4-tuple hash"]["cells"]["6.1.0-56-cloud-amd64"] == {
        "ok": False, "detail": "kernel < 6.13"}
    assert facs["kprobes"]["cells"]["6.18.1 (running)"]["ok"] is False


def test_column_labels_and_run_notes():
    assert KM.column_label({"spec": "running", "release": "6.18.1"}) == "6.18.1 (running)"
    assert KM.column_label({"spec": "6.1", "release": "6.1.0-56-cloud-amd64"}) == \
        "6.1.0-56-cloud-amd64"
    assert KM.column_label({"spec": "6.12", "release": None}) == "6.12"
    host, old, dead = _runs()
    assert "1 failed" in KM.run_note(old) and "2 boots" in KM.run_note(old)
    assert "TCG" in KM.run_note(old)
    assert "not run" in KM.run_note(dead) and "did not boot" in KM.run_note(dead)
    assert KM.tally(host) == {"pass": 2, "fail": 0, "skip": 1}


# --- render ----------------------------------------------------------------------------

def _text(renderable) -> str:
    c = Console(record=True, width=250, color_system=None)
    c.print(renderable)
    return c.export_text()


def test_render_shows_every_kernel_status_and_why():
    out = _text(KM.render(_record()))
    for s in ("6.18.1 (running)", "6.1.0-56-cloud-amd64", "6.12", "tcp-ipv4-distribution",
              "fail: connected 70 µs | scan 70 µs", "skip: no kprobes",
              "doctor: probe strategies", "kprobe (t-kprobe)", "why sk_lookup",
              "no: kernel < 6.13", "not run", "udp-hash4-effective ≠"):
        assert s in out, s
    # a pass is just "pass", without its detail
    assert "64 flows" not in out


def test_markdown_tables():
    md = KM.markdown(_record())
    lines = md.splitlines()
    head = lines[0]
    assert head == ("| check | selftest | `6.18.1 (running)` | `6.1.0-56-cloud-amd64` | `6.12` |")
    assert lines[1] == "|---|---|---|---|---|"
    row = next(l for l in lines if "udp-hash4-effective" in l)
    assert "**FAIL**: connected 70 µs \\| scan 70 µs" in row
    assert row.count(" | ") == 4          # the escaped pipe did not add a column
    assert "| lookup | **sk_lookup** (t-sk_lookup): why sk_lookup | **kprobe**" in md
    assert "tp \\| reason" in md
    assert "| UDP 4-tuple hash | yes | no: kernel < 6.13 | — |" in md


def test_main_renders_a_saved_record(tmp_path, capsys):
    f = tmp_path / "m.json"
    f.write_text(json.dumps(_record()))
    rc = KM.main(["--from", str(f), "--markdown"])
    out = capsys.readouterr().out
    assert rc == 1                        # a failed check and a kernel not run
    assert out.startswith("| check | selftest |")
    ok = _record([_runs()[0]])
    f.write_text(json.dumps(ok))
    assert KM.main(["--from", str(f)]) == 0
    assert "6.18.1 (running)" in capsys.readouterr().out


def test_main_bad_input(tmp_path, capsys):
    assert KM.main(["--from", str(tmp_path / "absent.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


# --- the guest side and the VM retry ---------------------------------------------------

def test_parse_guest_output_takes_the_last_marked_line():
    out = ("noise\n" + KM.MARK + '{"a": 1}\n' + "[  3.1] virtme: more noise "
           + KM.MARK + '{"a": 2}\n' + KM.MARK + "{broken\n").encode()
    assert KM.parse_guest_output(out) == {"a": 2}
    assert KM.parse_guest_output(b"nothing here") is None


def test_never_reached_command():
    assert KM.never_reached_command("Debian kernel 6.1 did not boot to the command: QEMU")
    assert KM.never_reached_command("did not finish ... (the kernel never reached the command)")
    assert not KM.never_reached_command("did not finish (the command was still running)")


def _fake_vm(monkeypatch, outcomes):
    """vm.run returns/raises the outcomes in turn; returns the list of calls."""
    calls = []
    kern = SimpleNamespace(release="6.1.0-56-cloud-amd64", describe=lambda: "Debian kernel 6.1")
    monkeypatch.setattr(vm, "vm_available", lambda spec: (True, "ok"))
    monkeypatch.setattr(vm, "resolve", lambda spec, **kw: kern)

    def run(cmd, spec, **kw):
        calls.append(cmd)
        o = outcomes.pop(0)
        if isinstance(o, Exception):
            raise o
        return o
    monkeypatch.setattr(vm, "run", run)
    return calls


def _result(stdout: bytes, code=0):
    return SimpleNamespace(exit_code=code, boot_seconds=20.0, accel=SimpleNamespace(name="tcg"),
                           stdout=stdout, console_tail=["[ 1.0] last line"])


def test_run_vm_retries_a_boot_that_never_reached_the_command(monkeypatch):
    data = {"release": "6.1.0-56-cloud-amd64", "cpus": 2, "doctor": {"probes": {}},
            "verify": [_check("x", "pass")], "verify_summary": "1 passed, 0 failed, 0 skipped"}
    calls = _fake_vm(monkeypatch, [
        vm.VMError("Debian kernel 6.1 did not boot to the command: Kernel panic"),
        _result(("guest noise\n" + KM.MARK + json.dumps(data) + "\n").encode())])
    e = KM.run_vm("6.1", cpus=2, memory="2G", check_timeout=100, vm_timeout=600, log=None)
    assert e["ok"] and e["attempts"] == 2 and e["verify"] == data["verify"]
    assert e["accel"] == "tcg" and e["boot_seconds"] == 20.0
    assert calls[0][:4] == ["python", "-m", "reuseport_ctl.experiments.kernel_matrix",
                            "--collect"]
    assert "--check-timeout" in calls[0] and "100" in calls[0]


def test_run_vm_gives_up_after_one_retry_and_never_retries_a_command_failure(monkeypatch):
    _fake_vm(monkeypatch, [vm.VMError("did not boot to the command"),
                           vm.VMError("did not boot to the command: again")])
    e = KM.run_vm("6.1", cpus=2, memory="2G", check_timeout=100, vm_timeout=600, log=None)
    assert not e["ok"] and e["attempts"] == 2 and "again" in e["error"]

    _fake_vm(monkeypatch, [vm.VMError("did not finish (the command was still running)", 124)])
    e = KM.run_vm("6.1", cpus=2, memory="2G", check_timeout=100, vm_timeout=600, log=None)
    assert not e["ok"] and e["attempts"] == 1 and "still running" in e["error"]

    _fake_vm(monkeypatch, [_result(b"no marked line", code=1)])
    e = KM.run_vm("6.1", cpus=2, memory="2G", check_timeout=100, vm_timeout=600, log=None)
    assert not e["ok"] and "without a result" in e["error"] and "last line" in e["error"]


def test_run_vm_when_no_vm_can_be_had(monkeypatch):
    monkeypatch.setattr(vm, "vm_available", lambda spec: (False, "no QEMU"))
    e = KM.run_vm("6.1", cpus=2, memory="2G", check_timeout=100, vm_timeout=600, log=None)
    assert not e["ok"] and e["attempts"] == 0 and "no QEMU" in e["error"]


# --- for real, on the running kernel only ------------------------------------------------

def test_matrix_on_the_running_kernel(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("verify needs root")
    out = tmp_path / "m.json"
    p = subprocess.run([os.path.join(ROOT, "scripts", "kernel-matrix"), "--kernels", "running",
                        "--only", "tcp-ipv4-distribution", "--only", "udp-flow-affinity",
                        "--json", str(out), "--markdown"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    rec = json.loads(out.read_text())
    (run,) = rec["kernels"]
    assert run["ok"] and run["release"] == os.uname().release
    assert run["label"] == f"{os.uname().release} (running)"
    assert [r["name"] for r in rec["matrix"]] == ["tcp-ipv4-distribution", "udp-flow-affinity"]
    assert all(r["cells"][run["label"]]["status"] == "pass" for r in rec["matrix"])
    assert {r["name"] for r in rec["probes"]} >= {"lookup", "data_ready", "wakeups"}
    assert run["doctor"]["kernel"] == os.uname().release
    assert "| tcp-ipv4-distribution | — | pass |" in p.stdout
    assert "2 passed, 0 failed, 0 skipped" in p.stdout


def test_main_rejects_a_file_that_is_not_a_record(tmp_path, capsys):
    f = tmp_path / "x.json"
    f.write_text("[1, 2]")
    assert KM.main(["--from", str(f)]) == 2
    assert "not a kernel-matrix" in capsys.readouterr().err
