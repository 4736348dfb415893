"""reuseport-ctl churn: orphaned requests when a listener leaves, measured.

Each networking test runs in its own network namespace, where
net.ipv4.tcp_migrate_req is that namespace's own: the host's is never touched.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from churn_schema import SCHEMA, validate
from conftest import bpf_objects_settle
from reuseport_ctl.errors import UserError
from reuseport_ctl.experiments import churn
from reuseport_ctl.kernel import sysctl

MIG = churn.MIGRATE_REQ
K = 24


def churn_objects() -> tuple[set, set]:
    """churn's own BPF programs and maps (rp_migrate, rp_mig_*). Other
    reuseport-ctl objects are left out: other runs on the machine may be
    loading and unloading theirs meanwhile."""
    from reuseport_ctl.kernel import bpf
    return ({i for i, n in bpf.prog_names().items() if n == "rp_migrate"},
            {i for i, n in bpf.map_names().items() if n.startswith("rp_mig_")})


def churn_objects_settle(expected):
    return bpf_objects_settle(expected, objects=churn_objects)


def churn_pids() -> set[int]:
    """Live processes named like churn's workers and load (rpctl-churn*)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/comm").read_text().startswith("rpctl-churn"):
                    out.add(int(d))
            except OSError:
                pass
    return out


def gone(pids: set[int], seconds: float = 5.0) -> set[int]:
    """Of `pids`, those still alive (not zombies) after waiting a little."""
    deadline = time.monotonic() + seconds
    while True:
        alive = set()
        for p in pids:
            try:
                if Path(f"/proc/{p}/stat").read_text().split(")")[-1].split()[0] != "Z":
                    alive.add(p)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# --- pure parts -------------------------------------------------------------------

def test_sequence_parses_and_rejects():
    ev = churn.parse_sequence("remove@0.5, add@1,remove:2@1.5,drain:1@2")
    assert [str(e) for e in ev] == ["remove@0.5", "add@1", "remove:2@1.5", "remove:1@2"]
    for bad in ("", "add:1@1", "remove@", "jump@1", "remove@-1"):
        with pytest.raises(UserError):
            churn.parse_sequence(bad)
    with pytest.raises(UserError):
        churn.parse_modes("off,sideways")


def test_schedule_interleaves_removes_and_adds():
    cfg = churn.ChurnConfig(duration=3, add_every=1, remove_every=1)
    assert [str(e) for e in cfg.schedule()] == ["remove@0.5", "add@1", "remove@1.5", "add@2",
                                                "remove@2.5"]
    scripted = churn.ChurnConfig(duration=1, sequence=churn.parse_sequence("add@0.7,remove@0.2,"
                                                                           "add@5"))
    assert [str(e) for e in scripted.schedule()] == ["remove@0.2", "add@0.7"]


@pytest.mark.parametrize("kw", [dict(workers=0), dict(duration=0), dict(linger=-1),
                                dict(queued=2000, backlog=100), dict(modes=("nope",)),
                                dict(workers=churn.MAX_SLOTS + 1)])
def test_config_refuses_nonsense(kw):
    with pytest.raises(UserError):
        churn.ChurnConfig(**kw).validate()


def test_schema_validator_catches_mistakes():
    assert validate({"experiment": "churn"})                       # missing keys
    assert validate([], SCHEMA)                              # not an object
    assert validate(-1, {"type": "integer", "minimum": 0})
    assert validate(True, {"type": "integer"})                     # bool is no int
    assert not validate(None, {"type": ["integer", "null"]})


def test_sysctl_setting_restores_on_error(netns):
    before = sysctl.read(MIG)
    other = "1" if before == "0" else "0"
    with pytest.raises(RuntimeError):
        with sysctl.setting(MIG, other) as old:
            assert old == before and sysctl.read(MIG) == other
            raise RuntimeError("boom")
    assert sysctl.read(MIG) == before
    with pytest.raises(UserError):
        sysctl.read("net.ipv4.no_such_sysctl")


# --- the exact case: K queued clients, one close ---------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", churn.QUEUED_MODES)
def test_queued_exact(netns, mode):
    """K clients complete their handshake into a listener nobody accepts on; a
    second worker joins; the first listener closes. Exact counts."""
    before_objs = churn_objects()
    sysctl.write(MIG, 0)
    r = churn.queued_case(mode, K)
    assert sysctl.read(MIG) == "0"          # the mode's setting was undone
    assert r["queued"] == K, r
    assert r["ok"] + r["reset"] + r["timeout"] + r["other"] == K
    assert r["timeout"] == 0 and r["other"] == 0, r
    second = str(r["second_slot"])
    if mode in ("off", "bpf-refuse"):       # orphaned: every one of them reset
        assert r["reset"] == K and r["ok"] == 0, r
        assert r["migrated"] == 0
    if mode == "bpf-refuse":
        assert r["program"]["refused"] == K and r["migrate_failed"] == K
    if mode in ("on", "bpf"):               # migrated to the worker that joined
        assert r["ok"] == K and r["reset"] == 0, r
        assert r["served_by"] == {second: K}
        assert r["migrated"] == K
    if mode == "bpf":
        p = r["program"]
        assert p["attach_type"] == "select_or_migrate"
        assert p["migrated"] == K and p["migrated_to"] == {second: K}
    if mode == "drain":                     # drained: served by its own worker, none left
        assert r["ok"] == K and r["reset"] == 0, r
        assert r["queued_at_close"] == 0
        assert r["served_by"] == {str(r["first_slot"]): K}
        assert r["migrated"] == 0
    assert churn_objects_settle(before_objs) == before_objs


# --- under steady load ------------------------------------------------------------------

SMALL = dict(workers=3, duration=1.5, add_every=0.6, remove_every=0.6, linger=0.05,
             concurrency=32, timeout=1.0)


@pytest.mark.timeout(60)
def test_churn_drain_has_no_resets_and_off_has_them(netns):
    cfg = churn.ChurnConfig(**SMALL)
    drain = churn.churn_case("drain", cfg)
    assert drain["leaves"] >= 2 and drain["joins"] >= 1, drain["events"]
    assert drain["conns"] > 100
    assert drain["errors"]["reset"] == 0, drain["events"]
    assert drain["queued_at_close"] == 0
    off = churn.churn_case("off", cfg)
    assert off["leaves"] >= 2
    if off["queued_at_close"] == 0:
        pytest.skip("no connection was queued on a leaving listener at its close "
                    "(load too light to provoke an orphan); nothing to reset")
    # Every child queued at a close is reset without migration (in-flight
    # handshakes may add more).
    assert off["errors"]["reset"] >= off["queued_at_close"] > 0, off["events"]
    assert off["resets_per_10k"] > 0


@pytest.mark.timeout(90)
def test_cli_json_schema_plot_restore_and_cleanup(netns, cli, tmp_path):
    sysctl.write(MIG, 1)            # not the mode's value: restoring is visible
    before_objs = churn_objects()
    before_pids = churn_pids()
    png = tmp_path / "churn.png"
    p = cli("churn", "--host-netns", "--duration", 1.2, "--add-every", 0.5,
            "--remove-every", 0.5, "--queued", 8, "--queued-modes", "off,bpf",
            "--modes", "off,on,bpf,drain", "--json", "--plot", png, check=True)
    rep = json.loads(p.stdout)
    assert validate(rep) == []
    assert rep["sysctl"] == {"name": MIG, "before": "1", "after": "1", "restored": True}
    assert sysctl.read(MIG) == "1"
    assert rep["netns"] == "host" and rep["kernel"] == os.uname().release
    assert [r["mode"] for r in rep["churn"]] == ["off", "on", "bpf", "drain"]
    q = {r["mode"]: r for r in rep["queued"]}
    assert q["off"]["reset"] == 8 and q["bpf"]["ok"] == 8
    by = {r["mode"]: r for r in rep["churn"]}
    assert by["drain"]["errors"]["reset"] == 0
    assert by["on"]["sysctl"] == 1 and by["bpf"]["program"] == "select_or_migrate"
    for r in rep["churn"]:
        assert r["conns"] == r["ok"] + sum(r["errors"].values())
        assert r["timeline"] and r["events"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert churn_objects_settle(before_objs) == before_objs
    assert not gone(churn_pids() - before_pids)


def sigterm_mid_run(args: list[str], before_objs, before_pids) -> tuple[int, str, str]:
    """Start reuseport-ctl ARGS, wait until it is mid-run (the mode has set
    the sysctl to 0, loaded its program, started at least 3 workers), send
    SIGTERM; (exit status, stdout, stderr)."""
    import shutil
    import sys
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) or "reuseport-ctl"
    proc = subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sysctl.read(MIG) == "0" and churn_objects()[0] - before_objs[0] \
                    and len(churn_pids() - before_pids) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail(f"{args[0]} never got going")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.timeout(60)
def test_sigterm_mid_run_restores_and_cleans_up(netns):
    sysctl.write(MIG, 1)
    before_objs = churn_objects()
    before_pids = churn_pids()
    rc, out, err = sigterm_mid_run(["churn", "--host-netns", "--modes", "bpf", "--queued", "0",
                                    "--duration", "30", "--json"], before_objs, before_pids)
    assert rc != 0
    assert "Traceback" not in err, err
    assert sysctl.read(MIG) == "1"
    assert churn_objects_settle(before_objs) == before_objs
    assert not gone(churn_pids() - before_pids)
