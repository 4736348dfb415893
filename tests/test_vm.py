"""The VM runner (reuseport_ctl.vm, scripts/vm) and the Vagrantfile.

Fast tests (no VM): kernel spec resolution, bad input, the virtiofsd shim's
argument translation, the QEMU wrapper, the guest script, the guest relay and
the short-output check, the KVM probe.
VM tests (4 boots in all, ~25-100 s each under TCG): 208 kB of output arrive
whole with the exit status; a 4-queue virtio-net NIC
on two NUMA nodes (nic against ethtool; the queue, cpu and numa policies
exact; nic --apply/--restore; watch's per-member rx queue, NAPI id and
CPU equal to the queue proof's accepted sockets); doctor in the guest shows kprobes and the
"kprobe" lookup strategy; the probes' kprobe test passes in the guest. They
skip, with the reason, only where QEMU or the kernel package
cannot be had.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest

from reuseport_ctl.vm import EXIT_VM, VMError, accel, kernels, runner, vm_available
from reuseport_ctl.vm import qemu_wrap, virtiofsd_shim

ROOT = Path(__file__).resolve().parent.parent
VM_KERNEL = os.environ.get("REUSEPORT_CTL_VM_KERNEL", "6.12")
SCRIPT = ROOT / "scripts" / "vm"


def vm_or_skip(kernel: str = VM_KERNEL) -> None:
    """Skip unless this host can boot `kernel` (for kprobe tests elsewhere too)."""
    ok, why = vm_available(kernel)
    if not ok:
        pytest.skip(f"no VM here: {why}")


def run_vm(*command: str, kernel: str = VM_KERNEL, timeout: int = 420):
    """command: scripts/vm options (--cpus ...) then "--" and the guest
    command, or the guest command alone."""
    """scripts/vm as a user runs it, then a check that nothing of that run
    (vng, QEMU, virtiofsd: all inherit a tag in their environment) is left."""
    tag = uuid.uuid4().hex
    env = dict(os.environ, REUSEPORT_CTL_VM_TEST_TAG=tag)
    for attempt in (1, 2):
        argv = list(command) if "--" in command else ["--", *command]
        p = subprocess.run([str(SCRIPT), "--kernel", kernel, "--timeout", str(timeout - 20),
                            *argv], capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT, env=env)
        # Under TCG the guest kernel has been seen to panic during boot (in
        # sched_clock_idle_wakeup_event), before our command runs: one retry
        # for a guest that never reached the command, never for a failed one.
        if not (p.returncode == EXIT_VM and "did not boot" in p.stderr):
            break
    for _ in range(50):
        left = _tagged(tag)
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"VM processes left behind: {left}"
    return p


def _tagged(tag: str) -> list:
    needle = f"REUSEPORT_CTL_VM_TEST_TAG={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if needle in Path(f"/proc/{d}/environ").read_bytes() and \
                        Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(d))
            except OSError:
                continue
    return out


# --- kernel specs --------------------------------------------------------------------

@pytest.mark.parametrize("spec,release,ok", [
    ("6.12", "6.12.117+deb12-cloud-amd64", True),
    ("6.1", "6.1.0-56-cloud-amd64", True),
    ("6.1", "6.12.117+deb12-cloud-amd64", False),
    ("6.12.117+deb12", "6.12.117+deb12-cloud-amd64", True),
    ("6.12.117+deb12-cloud-amd64", "6.12.117+deb12-cloud-amd64", True),
    ("6.12.11", "6.12.117+deb12-cloud-amd64", False),
    ("6.1.0-56", "6.1.0-56-cloud-amd64", True),
])
def test_version_spec_matching(spec, release, ok):
    assert kernels.matches(spec, release) is ok


def test_version_order_is_numeric():
    rs = ["6.12.99+deb12-cloud-amd64", "6.12.117+deb12-cloud-amd64", "6.12.100+deb12-cloud-amd64"]
    assert max(rs, key=kernels.version_key) == "6.12.117+deb12-cloud-amd64"


def test_unknown_version_lists_what_the_distribution_has(monkeypatch):
    monkeypatch.setattr(kernels, "installed_releases", lambda: [])
    monkeypatch.setattr(kernels, "available_releases",
                        lambda: ["6.1.0-56-cloud-amd64", "6.12.117+deb12-cloud-amd64"])
    with pytest.raises(VMError) as e:
        kernels.resolve("5.10", install_missing=False)
    msg = str(e.value)
    assert "5.10" in msg and "6.1 (newest 6.1.0-56-cloud-amd64)" in msg and "6.12" in msg
    assert e.value.exit_code == EXIT_VM


def test_newest_installed_of_a_series_wins(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "installed_releases",
                        lambda: ["6.12.100+deb12-cloud-amd64", "6.12.117+deb12-cloud-amd64"])
    monkeypatch.setattr(kernels, "MODULES", tmp_path)
    monkeypatch.setattr(kernels, "BOOT", tmp_path)
    (tmp_path / "vmlinuz-6.12.117+deb12-cloud-amd64").write_bytes(b"")
    (tmp_path / "6.12.117+deb12-cloud-amd64" / "build").mkdir(parents=True)
    k = kernels.resolve("6.12", install_missing=False)
    assert k.kind == "debian" and k.release == "6.12.117+deb12-cloud-amd64"
    assert k.headers == tmp_path / "6.12.117+deb12-cloud-amd64" / "build"


def test_a_file_that_is_not_a_kernel(tmp_path):
    f = tmp_path / "bzImage"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(VMError, match="not an x86 kernel image"):
        kernels.resolve(str(f))


def test_a_tree_without_a_build(tmp_path):
    with pytest.raises(VMError, match="not a built kernel tree"):
        kernels.resolve(str(tmp_path))


def test_bzimage_release_is_read_from_the_setup_header(tmp_path):
    img = bytearray(0x2000)
    img[0x202:0x206] = b"HdrS"
    img[0x20E:0x210] = (0x1000 - 0x200).to_bytes(2, "little")
    s = b"6.13.0-rc1-mine (me@box) #1 SMP\0"
    img[0x1000:0x1000 + len(s)] = s
    f = tmp_path / "bzImage"
    f.write_bytes(bytes(img))
    k = kernels.resolve(str(f))
    assert (k.kind, k.release) == ("bzimage", "6.13.0-rc1-mine")


def test_installed_debian_image_is_a_bzimage():
    imgs = sorted(Path("/boot").glob("vmlinuz-*"))
    if not imgs:
        pytest.skip("no kernel image in /boot")
    assert kernels.bzimage_release(imgs[-1]) == imgs[-1].name[len("vmlinuz-"):]


# --- the shim, the wrapper, the guest script ------------------------------------------

def test_shim_translates_vng_arguments():
    argv = ["--syslog", "--no-announce-submounts", "--readonly", "--socket-path", "/tmp/s",
            "--shared-dir", "/", "--sandbox", "none", "--cache", "always"]
    cmd = virtiofsd_shim.c_command(virtiofsd_shim.parse(argv), real="/usr/lib/qemu/virtiofsd")
    assert cmd == ["/usr/lib/qemu/virtiofsd", "--socket-path=/tmp/s", "-o", "source=/",
                   "-o", "cache=always", "-o", "sandbox=chroot", "-o", "allow_root",
                   "-o", "xattr"]
    assert "--syslog" not in cmd                 # seccomp kills the C daemon on syslog


@pytest.mark.skipif(not os.access(runner.C_VIRTIOFSD, os.X_OK), reason="no C virtiofsd")
def test_shim_publishes_the_pid_once_the_socket_exists(tmp_path):
    sock = tmp_path / "vfs.sock"
    p = subprocess.Popen([sys.executable, "-m", "reuseport_ctl.vm.virtiofsd_shim",
                          "--socket-path", str(sock), "--shared-dir", str(tmp_path),
                          "--sandbox", "none", "--cache", "always"], start_new_session=True)
    try:
        pidfile = Path(str(sock) + ".pid")
        for _ in range(100):
            if pidfile.exists():
                break
            time.sleep(0.05)
        assert pidfile.exists() and sock.is_socket()
        daemon = int(pidfile.read_text())
        assert Path(f"/proc/{daemon}/exe").resolve() == Path(runner.C_VIRTIOFSD).resolve()
        os.kill(daemon, 15)                      # what vng does when QEMU exits
        p.wait(5)                                # the shim follows its daemon out
        assert not Path(f"/proc/{daemon}").exists() or \
            Path(f"/proc/{daemon}/stat").read_text().split()[2] == "Z"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()


def test_shim_version_and_help():
    out = subprocess.run([sys.executable, "-m", "reuseport_ctl.vm.virtiofsd_shim", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--readonly" not in out.stdout


def test_qemu_wrapper_keeps_the_console():
    args = ["-chardev", "file,id=console,path=/dev/null", "-serial", "chardev:console",
            "-chardev", "file,id=stdout,path=/proc/self/fd/1"]
    out = qemu_wrap.rewrite(args, "/tmp/w/console.log")
    assert out[1] == "file,id=console,path=/tmp/w/console.log" and out[2:] == args[2:]
    assert qemu_wrap.rewrite(args, None) == args


def test_guest_script_runs_the_command_with_our_environment():
    env = runner.guest_env({"PATH": "/usr/bin", "FOO": "a b", "TMPDIR": "/x", "bad-name": "1"})
    assert env["PATH"].split(":")[0] == os.path.dirname(sys.executable)
    assert "TMPDIR" not in env and "bad-name" not in env
    s = runner.guest_script(["reuseport-ctl", "doctor", "--json"], env, "/work", None)
    assert "export FOO='a b'" in s and "cd /work" in s and f"{runner.MARK} up" in s
    last = s.splitlines()[-1]                   # the command runs under the relay
    assert last == (f"exec {sys.executable} -I -S {runner.RELAY} reuseport-ctl.status "
                    '/bin/sh "$0.cmd"')
    assert runner.guest_command(["reuseport-ctl", "doctor", "--json"]) == \
        "reuseport-ctl doctor --json\n"
    assert runner.guest_command(["a b"]) == "a b\n"
    assert runner.guest_command(["uname -r; exit 3"]) == "uname -r; exit 3\n"  # a command line


BIG = "import sys; sys.stdout.write(''.join('%06d %s\\n' % (i, 'x' * 57) for i in range(3200)))"


def _big_text() -> str:
    return "".join("%06d %s\n" % (i, "x" * 57) for i in range(3200))   # 208,000 bytes


def test_guest_relay_passes_everything_and_the_exit_status(tmp_path):
    """An unbuffered Python (whose print ignores short writes) writing
    208 kB: the relay gets it all through, counts it, returns the status,
    and does not wait for a background process that still holds the pipe."""
    from reuseport_ctl.vm import guest_relay
    out, err = (tmp_path / "out").open("wb"), (tmp_path / "err").open("wb")
    cmd = (f"PYTHONUNBUFFERED=1 {sys.executable} -c \"{BIG}\"; echo oops >&2; "
           "sleep 30 & exit 7")
    t0 = time.monotonic()
    rc, n_out, n_err = guest_relay.relay(["/bin/sh", "-c", cmd], out.fileno(), err.fileno())
    out.close(), err.close()
    assert time.monotonic() - t0 < 20
    assert (rc, n_out, n_err) == (7, 208000, 5)
    assert (tmp_path / "out").read_text() == _big_text()
    assert (tmp_path / "err").read_text() == "oops\n"


def test_guest_relay_write_all_survives_short_and_blocked_writes():
    import threading
    from reuseport_ctl.vm import guest_relay
    r, w = os.pipe()
    os.set_blocking(w, False)                   # EAGAIN and short writes on a full pipe
    data = os.urandom(300_000)
    got = []
    t = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 7000), b"")))
    t.start()
    assert guest_relay.write_all(w, data)
    os.close(w)
    t.join(10)
    os.close(r)
    assert b"".join(got) == data


def test_short_output_is_one_sentence_never_silent():
    assert runner.output_lost((0, 1000, 10), 1000, 50) is None     # stderr has QEMU's lines too
    msg = runner.output_lost((0, 100000, 0), 32768, 0)
    assert msg == "the guest's output was cut short (stdout: 32768 of 100000 bytes arrived)"
    assert "did not report" in runner.output_lost(None, 5, 5)
    assert runner.guest_status(Path("/nonexistent")) is None


def test_qemu_wrapper_adds_the_status_port():
    args = qemu_wrap.status_args("/tmp/w/status")
    assert "file,id=rctlstatus,path=/tmp/w/status" in args
    assert any("name=reuseport-ctl.status" in a for a in args)
    assert qemu_wrap.status_args(None) == []


def test_vng_command_says_tcg_and_keeps_the_console_quiet_elsewhere():
    k = kernels.Kernel("6.12", "debian", Path("/boot/vmlinuz-x"), "x", None, None)
    cmd = runner.vng_command("vng", k, accel.Accel("tcg", "test"), cpus=2, memory="2G",
                             exec_line="sh /tmp/g.sh")
    assert "--disable-kvm" in cmd and "--qemu-opts=-accel tcg,thread=multi" in cmd
    assert cmd[cmd.index("--exec") + 1] == "sh /tmp/g.sh"
    kvm = runner.vng_command("vng", k, accel.Accel("kvm", "test"), cpus=2, memory="2G",
                             exec_line="true")
    assert "--disable-kvm" not in kvm


def test_kvm_probe_boots_a_test_guest_under_tcg():
    qemu = accel.qemu_binary()
    if qemu is None:
        pytest.skip("QEMU is not installed")
    ok, why = accel._probe(qemu, "tcg")
    assert ok, why
    ok, why = accel.kvm_usable(qemu)
    assert isinstance(ok, bool) and why              # either answer, with a reason


def test_no_qemu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(accel, "qemu_binary", lambda: None)
    with pytest.raises(VMError) as e:
        runner.run(["true"], "6.12")
    assert "no QEMU (qemu-system-x86)" in str(e.value) and e.value.exit_code == EXIT_VM
    assert vm_available()[0] is False


def test_cli_bad_kernel_version(cli):
    p = cli("vm", "--kernel", "5.10", "--", "true")
    assert p.returncode == EXIT_VM
    assert "5.10" in p.stderr and "it has:" in p.stderr and "Traceback" not in p.stderr


def test_cli_no_command(cli):
    p = cli("vm", "--kernel", "6.12")
    assert p.returncode != 0 and "no command given" in p.stderr


# --- the NIC (vm --nic-queues) on the host side -----------------------------------------

def test_nic_qemu_args_ask_for_rss_and_enough_vectors():
    from reuseport_ctl.vm import nethost
    args = nethost.qemu_args(4)
    dev = args[args.index("-device") + 1]
    assert dev.startswith("virtio-net-pci,") and "mq=on" in dev and "rss=on" in dev
    assert "hash=on" in dev and "vectors=10" in dev and nethost.GUEST_MAC in dev
    net = args[args.index("-netdev") + 1]
    assert "queues=4" in net and "ifname=rctl0" in net and "vhost=off" in net


def test_guest_script_addresses_the_nic_by_its_mac():
    lines = runner.guest_nic_lines("52:54:00:72:63:02", "192.0.2.2", 24, "192.0.2.1", 7070)
    s = runner.guest_script(["true"], {}, "/", None, lines)
    assert "52:54:00:72:63:02" in s and "ip addr add 192.0.2.2/24" in s
    assert "REUSEPORT_CTL_VM_PEER=192.0.2.1" in s and "REUSEPORT_CTL_VM_AGENT=192.0.2.1:7070" in s
    assert s.index("REUSEPORT_CTL_VM_NIC=") < s.index(" reuseport-ctl.status ")


def test_vng_command_passes_numa_nodes():
    k = kernels.Kernel("6.12", "debian", Path("/boot/vmlinuz-x"), "x", None, None)
    cmd = runner.vng_command("vng", k, accel.Accel("tcg", "t"), cpus=4, memory="2G",
                             exec_line="true", numa=["1G,cpus=0-1", "1G,cpus=2-3"])
    assert cmd.count("--numa") == 2 and "1G,cpus=2-3" in cmd


def test_numa_nodes_must_hold_the_memory_and_name_guest_cpus():
    ok = ["512M,cpus=0-1", "512M,cpus=2-3"]
    assert runner.numa_problem(ok, "1G", 4) is None
    assert runner.numa_problem(["1G,cpus=0-1", "0,cpus=2-3"], "1024", 4) is None
    assert "hold 512M in all and --memory is 1G" in runner.numa_problem(
        ["256M,cpus=0-1", "256M,cpus=2-3"], "1G", 4)
    assert "names CPU 3, and the guest has --cpus 2" in runner.numa_problem(ok, "1G", 2)
    assert "in M or G" in runner.numa_problem(["512", "512M"], "1G", 4)
    assert "not a CPU" in runner.numa_problem(["1G,cpus=x"], "1G", 4)


def test_cli_numa_that_qemu_would_refuse_is_one_sentence(cli):
    p = cli("vm", "--memory", "1G", "--numa", "256M", "--numa", "256M", "--", "true")
    assert p.returncode == EXIT_VM and "Traceback" not in p.stderr
    assert "the --numa nodes hold 512M in all and --memory is 1G" in p.stderr


def test_queue_proof_verdict_catches_a_wrong_worker():
    from reuseport_ctl.experiments.queue_proof import Conn, Phase, judge
    cal = [Phase(f"calibrate queue {q}", "w", [Conn(q, 100 + q, q, "p")], {q: 5}, 1)
           for q in range(2)]
    good = Phase("spread", "t", [Conn(0, 100, 0, "a"), Conn(1, 101, 1, "b")], {0: 3, 1: 3}, 2)
    napi = {100: 0, 101: 1}
    r = judge(cal + [good], napi, 2, "eth9", "virtio_net")
    assert r["exact"] and r["spread"]["queue_by_worker"] == [[1, 0], [0, 1]]
    bad = Phase("spread", "t", [Conn(1, 100, 0, "a"), Conn(1, 101, 1, "b")], {0: 3, 1: 3}, 2)
    r = judge(cal + [bad], napi, 2, "eth9", "virtio_net")
    assert not r["exact"] and r["spread"]["exact"] == 1
    leak = [Phase("calibrate queue 0", "w", [Conn(0, 100, 0, "p")], {0: 5, 1: 2}, 1), cal[1]]
    assert any("other queues" in p for p in judge(leak + [good], napi, 2, "e", None)["problems"])


def test_cpu_and_numa_verdicts_check_every_connection():
    from reuseport_ctl.experiments.queue_proof import Conn, Phase, judge_cpus, render_cpus
    nodes = {0: 0, 1: 0, 2: 1, 3: 1}
    irq = {0: [3], 1: [2], 2: [1], 3: [0]}          # queue q's IRQ on CPU 3 - q
    napi = {100 + q: q for q in range(4)}
    fired = {q: [0] * 4 for q in range(4)}
    fired[0][3] = 5
    conns = [Conn(3, 100, 3, "a", [3]), Conn(1, 102, 1, "b", [1])]
    r = judge_cpus(Phase("cpu", "t", conns, {}, 2, fired), "cpu", [0, 1, 2, 3], nodes, irq,
                   napi, "eth9", "virtio_net")
    assert r["exact"] and r["exact_count"] == r["irq_checked"] == 2
    assert r["cpu_by_worker"][3][3] == 1 and "2/2" in render_cpus(r)
    # the worker on the other CPU of the same node: numa exact, cpu not
    moved = [Conn(2, 100, 3, "a", [2])]
    ph = Phase("x", "t", moved, {}, 1, fired)
    assert judge_cpus(ph, "numa", [0, 1, 2, 3], nodes, irq, napi, "e", None)["exact"]
    assert not judge_cpus(ph, "cpu", [0, 1, 2, 3], nodes, irq, napi, "e", None)["exact"]
    # received on a CPU its queue's IRQ is not pinned to; an IRQ that fired elsewhere
    stray = {**fired, 1: [4, 0, 0, 0]}
    r = judge_cpus(Phase("x", "t", [Conn(0, 101, 0, "a", [0])], {}, 1, stray), "cpu",
                   [0, 1, 2, 3], nodes, irq, napi, "e", None)
    assert not r["exact"] and r["irq_checked"] == 0
    assert any("outside their affinity" in p for p in r["problems"])


def test_settle_warms_up_until_no_irq_move_is_pending(monkeypatch):
    from reuseport_ctl.experiments import queue_proof as qp
    states = [{0: ([3], [0]), 1: ([0, 1], [1])},       # queue 0's move pending
              {0: ([3], [3]), 1: ([0, 1], [1])}]       # moved; 0-1 firing on 1 is settled
    monkeypatch.setattr(qp, "_rx_affinity", lambda iface: states[0])
    sent = []

    def warm(g, iface, name, table, conns):
        sent.append(conns)
        states.pop(0)
    monkeypatch.setattr(qp, "measure", warm)
    monkeypatch.setattr(qp.time, "sleep", lambda s: None)
    assert qp._settle(None, "eth9") == 8 and sent == [8]
    states[:] = [{0: ([3], [0])}] * 10
    with pytest.raises(qp.UserError, match="still fire outside"):
        qp._settle(None, "eth9", rounds=2)


def _netns_procs(ino: str) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/ns/net") == ino:
                out.append(d)
        except OSError:
            continue
    return out


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_nethost_tap_lives_in_a_private_namespace_and_dies_with_it():
    p, ns = runner.start_nethost(4)
    ino = os.readlink(ns)
    try:
        assert ino != os.readlink("/proc/self/ns/net")
        out = subprocess.run(["nsenter", f"--net={ns}", "ip", "-d", "addr", "show", "rctl0"],
                             capture_output=True, text=True, check=True).stdout
        assert "multi_queue" in out and "192.0.2.1/24" in out
        assert subprocess.run(["ip", "link", "show", "rctl0"],
                              capture_output=True).returncode != 0      # not on the host
    finally:
        runner.stop_nethost(p)
    for _ in range(50):
        if not _netns_procs(ino):
            break
        time.sleep(0.1)
    assert not _netns_procs(ino), "a process is left in the NIC's namespace"


# --- real boots -----------------------------------------------------------

def test_doctor_in_the_vm_has_kprobes():
    vm_or_skip()
    p = run_vm("reuseport-ctl", "doctor", "--json")
    assert "under TCG" in p.stderr or "under KVM" in p.stderr
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout)
    facs = {f["name"]: f["ok"] for f in d["facilities"]}
    assert facs["kprobes"] is True
    assert facs["kernel headers"] is True
    assert d["probes"]["lookup"]["strategy"] == "kprobe"
    assert d["kernel"] != os.uname().release


def test_big_output_arrives_whole_with_the_exit_status():
    """208 kB on stdout and 50 kB on stderr from an unbuffered Python in the
    guest (vng's ports take 32 KiB per write; this used to arrive as 32,768
    bytes, exit 0), then exit 7: all of it, byte for byte, and the 7."""
    vm_or_skip()
    cmd = (f"PYTHONUNBUFFERED=1 python3 -c \"{BIG}; sys.stderr.write('E' * 50000)\"; exit 7")
    p = run_vm(cmd)
    log = p.stderr.replace("E" * 50000, "<50,000 E>")
    assert p.returncode == 7, log[-3000:]
    assert len(p.stdout) == 208000 and p.stdout == _big_text(), \
        f"{len(p.stdout)} bytes arrived; {log[-2000:]}"
    assert "E" * 50000 in p.stderr


def test_probes_kprobe_test_passes_in_the_vm():
    vm_or_skip()
    if "def test_kprobe" not in (ROOT / "tests" / "test_probes.py").read_text():
        pytest.skip("tests/test_probes.py has no kprobe test yet")
    p = run_vm(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               "tests/test_probes.py", "-k", "kprobe")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    summary = [ln for ln in p.stdout.splitlines() if " passed" in ln]
    assert summary, out[-3000:]                      # at least one kprobe test ran
    # passed, not skipped for want of kprobes (the fallback test may skip: it
    # only runs where kprobes are missing)
    assert "no kprobes" not in out and "CONFIG_KPROBES" not in out, out[-3000:]


def _ethtool_l(text: str) -> dict[str, int]:
    """`ethtool -l`'s "Current hardware settings" as numbers (n/a -> 0)."""
    cur = text.split("Current hardware settings:")[1]
    out = {}
    for line in cur.splitlines():
        k, _, v = line.partition(":")
        if v.strip():
            out[k.strip().lower()] = int(v) if v.strip().isdigit() else 0
    return out


def _ethtool_x(text: str) -> tuple[list[int], str]:
    """`ethtool -x`: the indirection table and the key (hex, no colons)."""
    import re
    table, key, lines = [], "", text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"\s+\d+:((?:\s+\d+)+)\s*", line)    # "    8:   0  1  2 ..."
        if m:
            table += [int(x) for x in m.group(1).split()]
        if line.startswith("RSS hash key:"):
            key = lines[i + 1].strip().replace(":", "")
    return table, key


def test_ethtool_output_parsers():
    l = ("Channel parameters for eth0:\nPre-set maximums:\nRX:\t\tn/a\nCombined:\t4\n"
         "Current hardware settings:\nRX:\t\tn/a\nTX:\t\tn/a\nOther:\t\tn/a\nCombined:\t4\n")
    assert _ethtool_l(l) == {"rx": 0, "tx": 0, "other": 0, "combined": 4}
    x = ("RX flow hash indirection table for eth0 with 4 RX ring(s):\n"
         "    0:      0     1     2     3     0     1     2     3\n"
         "    8:      0     1     2     3     0     1     2     3\n"
         "RSS hash key:\n12:1c:46\nRSS hash function:\n    toeplitz: on\n")
    assert _ethtool_x(x) == ([0, 1, 2, 3] * 4, "121c46")


def guest_result(stdout: str) -> dict:
    """tests/vm_nic_guest.py's last line: its JSON, zlib-compressed and in
    base64 (from when the guest's stdout was cut at 32 KiB; it arrives whole
    now, see docs/vm.md, but the guest still compresses it)."""
    return json.loads(zlib.decompress(base64.b64decode(stdout.strip().splitlines()[-1])))


def test_nic_queues_in_the_vm_match_ethtool_and_the_policies_are_exact():
    """One boot (4 vCPUs on two NUMA nodes, a 4-queue virtio-net NIC with
    RSS, TCG): `nic --json` equals `ethtool -l/-x`; the queue policy sends
    every connection from the host side to the worker of the queue it arrived
    on (per the driver's counters and SO_INCOMING_NAPI_ID); with `nic
    --apply --cpus 3,2,1,0` the cpu policy sends every connection to the
    worker pinned on the CPU that received it (the CPU its queue's IRQ is
    pinned to) and numa to a worker on that CPU's node; with `--rss-weights
    1,0,0,0` every connection arrives on queue 0 and goes to worker 0; each
    `--restore` leaves the indirection table and IRQ affinity byte for byte
    as before. watch, attached through the queue proof, shows per member
    the rx queue, NAPI id and CPU its connections came through, equal to the
    proof's ground truth connection for connection. Nothing (QEMU,
    virtiofsd, the tap's namespace) is left."""
    vm_or_skip()
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun for the VM's NIC")
    started = time.monotonic()
    p = run_vm("--cpus", "4", "--memory", "1G", "--nic-queues", "4",
               "--numa", "512M,cpus=0-1", "--numa", "512M,cpus=2-3", "--",
               sys.executable, "tests/vm_nic_guest.py", timeout=420)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "NIC: virtio-net-pci, 4 queues" in p.stderr
    r = guest_result(p.stdout)
    assert r["nic_rc"] == 0, r["nic_err"]
    n = r["nic"]["interfaces"][0]
    assert n["driver"] == "virtio_net" and n["name"] == r["iface"]
    # queues: nic --json == ethtool -l
    chan = _ethtool_l(r["ethtool_l"])
    assert chan["combined"] == 4
    assert n["channels"]["combined"] == chan["combined"] == n["real_rx_queues"] == len(n["rx"])
    # RSS: nic --json == ethtool -x (table, key; toeplitz)
    table, key = _ethtool_x(r["ethtool_x"])
    assert len(table) == 128 and set(table) == {0, 1, 2, 3}
    assert n["rss"]["indirection"] == table and n["rss"]["key"] == key
    assert n["rss"]["hfunc"] == "toeplitz" and "toeplitz: on" in r["ethtool_x"]
    assert [q["irq"] is not None for q in n["rx"]] == [True] * 4
    # the queue policy: exact, every queue used, every connection accounted for
    pr = r["proof"]
    assert pr is not None and r["proof_rc"] == 0, (r["proof_err"], pr and pr["problems"])
    assert pr["exact"] and pr["spread"]["exact"] == pr["spread"]["conns"] == 16
    assert len(set(pr["napi_of_queue"].values())) == 4
    for q, row in enumerate(pr["spread"]["queue_by_worker"]):
        assert sum(row) == row[q]                     # queue q -> worker q only
    # watch, attached through the queue proof: per member, where its
    # connections arrived (rx queue, NAPI id, CPU, with counts) is the proof's
    # ground truth, from the connections the workers accepted
    arrivals_match_the_proof(r)
    # IRQ of queue q on CPU 3 - q: cpu and numa, every connection checked
    # against its worker's CPU and against its queue's IRQ
    a = r["apply_cpus"]
    assert a["rc"] == 0 and a["restore_rc"] == 0, a
    assert a["during"][0] == a["before"][0] and a["during"][1] != a["before"][1]
    assert a["after"] == a["before"]                              # byte for byte
    assert r["cpu_err"] == "" and r["numa_err"] == "", (r["cpu_err"], r["numa_err"])
    assert r["cpu"]["irq_cpus"] == {str(q): [3 - q] for q in range(4)}
    for name in ("cpu", "numa"):
        c = r[name]
        assert c["exact"], (name, c["problems"])
        assert c["exact_count"] == c["irq_checked"] == c["conns"] == 16
    assert r["numa"]["nodes"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    m = r["cpu"]["cpu_by_worker"]
    assert sum(m[i][i] for i in range(4)) == 16 and sum(1 for i in range(4) if m[i][i]) > 1
    m = r["numa"]["cpu_by_worker"]                    # both nodes received
    assert sum(map(sum, m[:2])) and sum(map(sum, m[2:]))
    # all RSS weight on queue 0 with `nic --apply`: every connection there, then back
    a = r["apply"]
    assert a["rc"] == 0 and a["restore_rc"] == 0, a
    assert _ethtool_x(a["during"][0])[0] == [0] * 128             # weight 1 0 0 0
    assert a["during"][1] != a["before"][1]                       # IRQs moved
    assert a["after"] == a["before"]                              # byte for byte
    oq = r["on_queue"]
    assert oq is not None and oq["exact"], (r["on_queue_err"], oq and oq["problems"])
    assert oq["by_worker"] == [8, 0, 0, 0] and oq["exact_count"] == oq["conns"] == 8
    took = time.monotonic() - started
    print(f"NIC VM test: {took:.1f} s in all; guest: nic {r['t_nic']:.1f} s (watch attached "
          f"in {r['t_watch_attach']:.1f} s meanwhile, waited for "
          f"{r['t_watch_ready'] - r['t_nic']:.1f} s), queue proof "
          f"{r['t_watch_proof'] - r['t_watch_ready']:.1f} s, watch read "
          f"{r['t_watch'] - r['t_watch_proof']:.1f} s, cpu {r['t_cpu'] - r['t_watch']:.1f} s, "
          f"numa {r['t_numa'] - r['t_cpu']:.1f} s, rss on queue 0 "
          f"{r['t_on_queue'] - r['t_numa']:.1f} s; all {r['t_all']:.1f} s")
    from reuseport_ctl.experiments.queue_proof import render
    print(render(pr))
    print(r["watch"]["dashboard"])
    print(json.dumps(r["watch"]["workers"]))


PROOF_CONNS = 4 * 2 + 16        # the queue proof's: calibration (2 per queue), spread


def proof_arrivals(proof: dict) -> list[Counter]:
    """The queue proof's ground truth, per worker (slot): (rx queue, NAPI id,
    CPU) -> connections, from each accepted socket's SO_INCOMING_NAPI_ID and
    SO_INCOMING_CPU; the queue is the one the calibration found for that NAPI
    id (the only queue whose rx counter moved while it was the only one)."""
    queue_of = {n: int(q) for q, n in proof["napi_of_queue"].items()}
    out = [Counter() for _ in range(proof["workers"])]
    for p in proof["phases"]:
        for c in p["conns"]:
            out[c["slot"]][(queue_of[c["napi"]], c["napi"], c["cpu"])] += 1
    return out


def arrivals_match_the_proof(r: dict) -> None:
    """watch's per-member rx_paths, rx_queues, napi_ids and rx_cpus (as
    `watch --json` writes them) against the proof, connection for connection.
    Debian's 6.12 keeps sk_rx_queue_mapping (CONFIG_SOCK_RX_QUEUE_MAPPING=y,
    selected by XPS): the queue is known, and must be the queue."""
    assert r["watch_err"] == "" and r["watch"] is not None, r["watch_err"]
    wt, pr = r["watch"], r["proof"]
    assert wt["live"] == "raw_tracepoint"
    assert isinstance(wt["btf_sk_rx_queue_mapping"], int), wt["btf_sk_rx_queue_mapping"]
    assert wt["rx_unknown"] == {} and wt["rx_note"] is None, wt["rx_note"]
    truth = proof_arrivals(pr)
    assert sum(sum(t.values()) for t in truth) == PROOF_CONNS
    by_inode = {m["inode"]: m for m in wt["workers"]}
    assert sorted(by_inode) == sorted(wt["inodes"])                # one row per member
    for slot, inode in enumerate(wt["inodes"]):
        m, want = by_inode[inode], truth[slot]
        assert m["slot"] == slot                   # watch numbers them as the policy does
        got: Counter = Counter()
        for p in m["rx_paths"]:
            got[(p["rx_queue"], p["napi_id"], p["cpu"])] += p["count"]
        assert got == want, (slot, m["rx_paths"], want)

        def by(i: int) -> dict:
            out: Counter = Counter()
            for k, n in want.items():
                out[str(k[i])] += n
            return dict(out)
        assert (m["rx_queues"], m["napi_ids"], m["rx_cpus"]) == (by(0), by(1), by(2)), slot
        assert list(m["rx_queues"]) == [str(slot)]          # the queue policy: queue q only


def _arrivals_case() -> dict:
    """A guest result as vm_nic_guest.py prints it, reduced to what
    arrivals_match_the_proof reads: 2 workers, 2 queues, PROOF_CONNS
    connections."""
    conns = [{"slot": 0, "napi": 11, "cpu": 0}, {"slot": 0, "napi": 11, "cpu": 0},
             {"slot": 1, "napi": 12, "cpu": 1}, {"slot": 1, "napi": 12, "cpu": 0}]
    proof = {"workers": 2, "napi_of_queue": {"0": 11, "1": 12},
             "phases": [{"conns": conns[:4] * 4}, {"conns": conns * 2}]}
    workers = [
        {"slot": 0, "inode": 70, "rx_cpus": {"0": 12}, "napi_ids": {"11": 12},
         "rx_queues": {"0": 12}, "rx_paths": [{"cpu": 0, "napi_id": 11, "rx_queue": 0,
                                               "count": 12}]},
        {"slot": 1, "inode": 71, "rx_cpus": {"0": 6, "1": 6}, "napi_ids": {"12": 12},
         "rx_queues": {"1": 12}, "rx_paths": [{"cpu": 1, "napi_id": 12, "rx_queue": 1,
                                               "count": 6},
                                              {"cpu": 0, "napi_id": 12, "rx_queue": 1,
                                               "count": 6}]}]
    return {"watch_err": "", "proof": proof,
            "watch": {"live": "raw_tracepoint", "btf_sk_rx_queue_mapping": 122,
                      "rx_unknown": {}, "rx_note": None, "inodes": [70, 71],
                      "workers": workers}}


def test_nic_guest_arrivals_are_checked_connection_for_connection():
    r = _arrivals_case()
    arrivals_match_the_proof(r)
    # one connection counted on the wrong CPU, a queue the kernel did not
    # give, members swapped, the queue field missing: each one is caught
    for spoil in (lambda w: w["workers"][1]["rx_paths"][0].update(count=5),
                  lambda w: w["workers"][0]["rx_paths"][0].update(rx_queue=None),
                  lambda w: w["inodes"].reverse(),
                  lambda w: w["workers"][1]["rx_cpus"].update({"1": 7}),
                  lambda w: w.update(btf_sk_rx_queue_mapping="no such member")):
        bad = _arrivals_case()
        spoil(bad["watch"])
        with pytest.raises(AssertionError):
            arrivals_match_the_proof(bad)


# --- Vagrantfile ---------------------------------------------------------------------

def test_vagrantfile_is_valid_ruby():
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is not installed (apt-get install ruby) to check the Vagrantfile")
    p = subprocess.run([ruby, "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True)
    assert p.returncode == 0 and "Syntax OK" in p.stdout, p.stderr


def test_vagrantfile_covers_both_providers_and_bootstrap():
    v = (ROOT / "Vagrantfile").read_text()
    for needle in ('"libvirt"', '"virtualbox"', "scripts/bootstrap", "debian/bookworm64",
                   "synced_folder"):
        assert needle in v
