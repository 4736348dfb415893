"""doctor probes the real kernel: these tests assert what this kernel really
is (checking the kernel themselves, so they stay honest elsewhere), that the
strategy choice follows the facilities, and that probing leaves nothing behind."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from reuseport_ctl.errors import UserError
from reuseport_ctl.kernel import bpf, features, tracefs
from reuseport_ctl.kernel.features import Facility
from reuseport_ctl.probes.strategy import CHAINS, choose
from reuseport_ctl.ui.doctor_view import doctor_report, render_doctor

EXPECTED = ["SO_REUSEPORT", "SO_ATTACH_REUSEPORT_CBPF", "SO_ATTACH_REUSEPORT_EBPF",
            "SK_REUSEPORT", "REUSEPORT_SOCKARRAY", "SELECT_OR_MIGRATE",
            "net.ipv4.tcp_migrate_req", "sk_lookup", "kprobes", "fentry", "tracepoints",
            "sk_data_ready tracepoint",
            "raw_tracepoints", "tp_btf", "BTF", "UDP 4-tuple hash", "EPOLLEXCLUSIVE",
            "pidfd_getfd", "capabilities", "bcc", "kernel headers", "nginx", "wrk"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="doctor's probes need root")


@pytest.fixture(scope="module")
def doctor_json():
    """One real run for the module: the installed CLI, as a user runs it."""
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable))
    return subprocess.run([exe, "doctor", "--json"], capture_output=True, text=True,
                          timeout=120)


def _facs(d: dict) -> dict[str, dict]:
    return {f["name"]: f for f in d["facilities"]}


def test_doctor_json_exits_0_with_every_facility(doctor_json):
    assert doctor_json.returncode == 0, doctor_json.stderr
    d = json.loads(doctor_json.stdout)
    assert d["kernel"] == os.uname().release
    assert d["core_ok"] is True
    facs = _facs(d)
    assert [n for n in EXPECTED if n not in facs] == []
    for f in d["facilities"]:
        assert set(f) == {"name", "ok", "detail", "without"}
        assert f["detail"] and f["without"], f
    for name in features.CORE:
        assert facs[name]["ok"], facs[name]
    assert set(d["probes"]) == set(CHAINS)
    assert d["header_tree"]["path"] is None or Path(d["header_tree"]["path"]).is_dir()


def test_kprobes_reported_as_the_kernel_really_is(doctor_json):
    kprobes = _facs(json.loads(doctor_json.stdout))["kprobes"]
    if not Path("/sys/bus/event_source/devices/kprobe").exists():
        assert kprobes["ok"] is False
        assert "CONFIG_KPROBES" in kprobes["detail"]
        assert "sk_lookup" in kprobes["without"]
    else:  # a kernel with the kprobe PMU: the probe must have tried an open
        assert "__inet_lookup_listener" in kprobes["detail"]


def test_strategies_follow_the_facilities(doctor_json):
    d = json.loads(doctor_json.stdout)
    facs, probes = _facs(d), d["probes"]
    kprobes = facs["kprobes"]["ok"] and facs["bcc"]["ok"]
    if kprobes:
        assert probes["lookup"]["strategy"] == "kprobe"
        assert probes["data_ready"]["strategy"] == "kprobe"
    else:
        if facs["sk_lookup"]["ok"] and facs["bcc"]["ok"]:
            assert probes["lookup"]["strategy"] == "sk_lookup"
            assert "not kprobe" in probes["lookup"]["reason"]
        if facs["raw_tracepoints"]["ok"] and facs["bcc"]["ok"]:
            assert probes["data_ready"]["strategy"] == "raw_tracepoint"
            assert probes["data_ready"]["target"] == "sk_data_ready (raw tracepoint)"
        elif facs["sk_data_ready tracepoint"]["ok"] and facs["bcc"]["ok"]:
            assert probes["data_ready"]["strategy"] == "tracepoint"
            assert probes["data_ready"]["target"] == "sock:sk_data_ready"
    if facs["raw_tracepoints"]["ok"] and facs["BTF"]["ok"] and facs["bcc"]["ok"]:
        assert probes["wakeups"]["strategy"] == "raw_tracepoint"
    elif facs["tracepoints"]["ok"] and facs["bcc"]["ok"]:
        assert probes["wakeups"]["strategy"] == "tracepoint"


def test_migrate_req_reports_the_sysctl_value(doctor_json):
    f = _facs(json.loads(doctor_json.stdout))["net.ipv4.tcp_migrate_req"]
    sysctl = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    assert f["ok"] == sysctl.exists()
    if sysctl.exists():
        assert f["detail"].startswith(f"= {int(sysctl.read_text())} ")


def test_help_ends_with_examples(cli):
    out = cli("doctor", "--help", check=True).stdout
    assert "Examples:" in out
    assert out.rstrip().splitlines()[-1].strip()   # text after the examples
    assert out.index("Examples:") > out.index("--json")


# --- nothing left behind --------------------------------------------------------

def _names(get_fd_cmd: int, ids: list[int], name_at: int) -> dict[int, str]:
    """id -> object name, for ids still alive (they may vanish meanwhile)."""
    out = {}
    for i in ids:
        try:
            fd = bpf.bpf(get_fd_cmd, struct.pack("=III", i, 0, 0))
        except OSError as e:
            if e.errno == errno.ENOENT:
                continue
            raise
        try:
            info = ctypes.create_string_buffer(256)
            bpf.bpf(bpf.OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, 256, ctypes.addressof(info)))
            out[i] = info.raw[name_at:name_at + 16].split(b"\0")[0].decode()
        finally:
            os.close(fd)
    return out


def _fds() -> set[str]:
    return {f"{n}->{os.readlink(f'/proc/self/fd/{n}')}" for n in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{n}")}


def test_probes_leave_no_fd_bpf_object_or_mount():
    progs, maps, links = set(bpf.prog_ids()), set(bpf.map_ids()), set(bpf.link_ids())
    fds, tracefs_at = _fds(), tracefs.mounted()
    facs = features.probe_all()
    assert len(facs) == len(features.PROBES)
    assert _fds() == fds                       # every fd a probe opened is closed
    assert tracefs.mounted() == tracefs_at     # a scratch tracefs mount is undone
    # Sockets holding programs are freed after an RCU grace period: poll briefly.
    # Other tests may load objects meanwhile, so only ours (named rpd_*) count.
    deadline = time.monotonic() + 5
    while True:
        left = {
            "progs": {n for n in _names(bpf.PROG_GET_FD_BY_ID, sorted(set(bpf.prog_ids()) - progs),
                                        64).values() if n.startswith("rpd_")},
            "maps": {n for n in _names(bpf.MAP_GET_FD_BY_ID, sorted(set(bpf.map_ids()) - maps),
                                       24).values() if n.startswith("rpd_")},
            "links": set(bpf.link_ids()) - links,
        }
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == {"progs": set(), "maps": set(), "links": set()}


# --- pure logic -------------------------------------------------------------------

def _all(ok: bool, **overrides) -> list[Facility]:
    return [Facility(n, overrides.get(n, ok), "because", "w") for n, _ in features.PROBES]


def test_choose_prefers_the_best_working_strategy():
    assert {p: s.name for p, s in choose(_all(True)).items()} == \
        {"lookup": "kprobe", "data_ready": "kprobe", "wakeups": "raw_tracepoint"}
    s = choose(_all(True, kprobes=False))
    assert (s["lookup"].name, s["data_ready"].name) == ("sk_lookup", "raw_tracepoint")
    assert "not kprobe: no kprobes" in s["lookup"].reason
    s = choose(_all(True, kprobes=False, raw_tracepoints=False))
    assert (s["data_ready"].name, s["wakeups"].name) == ("tracepoint", "tracepoint")
    assert "not raw_tracepoint: no raw_tracepoints" in s["wakeups"].reason
    s = choose(_all(True, kprobes=False, sk_lookup=False))
    assert s["lookup"].name == "selector"
    s = choose(_all(True, bcc=False))
    assert {x.name for x in s.values()} == {"none"}
    assert s["lookup"].reason.startswith("not kprobe: no bcc")


def test_core_ok_needs_every_core_facility():
    assert features.core_ok(_all(True, kprobes=False, bcc=False))
    for name in features.CORE:
        assert not features.core_ok(_all(True, **{name: False}))


def test_render_marks_missing_facilities():
    facs = _all(True, kprobes=False, SK_REUSEPORT=False)
    d = doctor_report("6.x", features.CORE, facs, choose(facs), {"path": None})
    assert d["core_ok"] is False
    console = Console(record=True, width=200)
    console.print(render_doctor(d))
    text = console.export_text()
    row = next(line for line in text.splitlines() if " kprobes " in line)
    assert "✗" in row and " w " in row            # failed rows show what still works
    assert "core missing: SK_REUSEPORT" in text


def test_render_fits_80_columns_one_line_a_facility():
    detail = "tried for real: the program loaded and attached to a listener"     # 62 chars
    facs = [Facility(n, n != "kprobes", detail, "lookups are counted by sk_lookup instead")
            for n, _ in features.PROBES]
    d = doctor_report("6.x", features.CORE, facs, choose(facs), {"path": None})
    console = Console(record=True, width=80)
    console.print(render_doctor(d, compact=True))
    lines = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    table = lines[1:lines.index(next(x for x in lines if x.startswith("probes")))]
    # detail wraps once at most; a missing facility adds what still works
    assert len(table) <= 2 * len(facs) + 2, "\n".join(table)
    row = [x for x in table if " kprobes " in x]
    assert row and "✗" in row[0]
    assert any("without it: lookups are counted by sk_lookup" in x for x in table)


def test_doctor_piped_is_never_cut(cli):
    # not a terminal (even one of 80 columns piped): the wide table, uncut
    out = cli("doctor", env={**os.environ, "COLUMNS": "80"}).stdout
    assert "…" not in out
    assert "without it" in out and "core works" in out


def test_tracefs_ensure_mounts_where_tracepoints_are():
    # What probe code calls before attaching a tracepoint (it may mount tracefs).
    root = tracefs.ensure()
    assert tracefs.mounted() == root
    assert tracefs.ensure() == root                       # idempotent
    assert tracefs.tracepoint_id("sched:sched_wakeup") > 0
    with pytest.raises(UserError, match="no tracepoint"):
        tracefs.tracepoint_id("sock:no_such_event_rpctl")
