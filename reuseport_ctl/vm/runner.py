"""Boot another kernel under QEMU with virtme-ng, run one command in it,
and bring back its output and exit status.

The guest shares the host's root filesystem read-only (virtio-fs, with
writable overlays on /tmp, /var, /etc ... that vanish with the VM), so it runs
the host's venv and the project's files as they are. The guest command runs
as root with the caller's environment (PATH first gets the venv's bin/).

Life cycle: vng (and so QEMU and the virtio-fs daemon) runs in a process
group of its own; on exit, time-out, error, Ctrl-C or SIGTERM the whole group
is killed and waited for, and the private work directory (sockets, console
log, guest script) is removed. Nothing outlives run().

Exit status: the guest command's own; 124 on time-out, 125 when the VM could
not be set up or did not boot, 130 on Ctrl-C (see errors.py).
"""
from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..signals import Interrupted
from . import accel as _accel
from . import kernels
from .errors import EXIT_OUTPUT_LOST, EXIT_TIMEOUT, VMError
from .guest_relay import STATUS_PORT

C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
MARK = "@@reuseport-ctl-vm:"
# Drivers udev would load for QEMU's q35 devices that the guest command never
# needs; each module load is slow under TCG (~10 s of boot saved in all).
SKIP_MODULES = ("kvm", "kvm_amd", "kvm_intel", "ahci", "libahci", "sr_mod", "cdrom",
                "powernow_k8", "acpi_cpufreq", "i6300esb", "pcspkr", "serio_raw",
                "evdev", "joydev", "button", "sg")
CONSOLE_TAIL = 15
# Under KVM a kernel prints its first console line within a second or two
# (earlyprintk); nothing after this long means KVM hangs it.
KVM_BOOT_S = 20.0
# Host variables that mean nothing (or something wrong) inside the guest.
ENV_DROP = {"_", "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "TMPDIR", "XDG_RUNTIME_DIR",
            "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
            "DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS", "MAIL", "LS_COLORS",
            "PYTEST_CURRENT_TEST", "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET",
            # the host's header tree for bcc is not the guest kernel's
            "BCC_KERNEL_SOURCE", "BCC_LINUX_VERSION_CODE"}
RELAY = Path(__file__).resolve().with_name("guest_relay.py")
STATUS_RE = re.compile(r"exit (\d+) out (\d+) err (\d+)")
PIPE_SIZE = 1 << 20        # vng's stdout/stderr pipes: QEMU stalls a port only past this
PKG_FIX = ("apt-get install qemu-system-x86 busybox-static, and pip install virtme-ng "
           "into the venv (scripts/bootstrap does both)")


@dataclass
class RunResult:
    exit_code: int
    kernel: kernels.Kernel
    accel: _accel.Accel
    booted: bool
    boot_seconds: float | None        # from start to the guest command starting
    seconds: float                    # from start to the VM gone
    console_tail: list[str] = field(default_factory=list)
    stdout: bytes = b""               # the guest's output, when run(capture=True)
    stderr: bytes = b""


# --- what the runner needs -----------------------------------------------------------

def vng_binary() -> str | None:
    here = os.path.dirname(sys.executable)
    return shutil.which("vng", path=here) or shutil.which("vng")


def _busybox() -> str | None:
    for p in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"):
        if os.path.exists(p):
            return p
    return None


def missing_tools() -> list[str]:
    """What is missing on this host to boot a VM, each as a few words."""
    out = []
    if _accel.qemu_binary() is None:
        out.append("QEMU (qemu-system-x86)")
    if not os.access(C_VIRTIOFSD, os.X_OK):
        out.append(f"virtiofsd ({C_VIRTIOFSD}, from qemu-system-common)")
    if _busybox() is None:
        out.append("a static busybox (busybox-static)")
    if vng_binary() is None:
        out.append("virtme-ng (pip install virtme-ng)")
    return out


def vm_available(kernel: str = "6.12") -> tuple[bool, str]:
    """Can this host boot `kernel` in a VM? (ok, reason). Installs nothing:
    a Debian kernel the distribution offers counts as available when we may
    install it (root)."""
    miss = missing_tools()
    if miss:
        return False, f"no {', no '.join(miss)}: {PKG_FIX}"
    if os.geteuid() != 0:
        return False, "the VM runner needs root (kernel images and packages are root's)"
    try:
        k = kernels.resolve(kernel, install_missing=False)
        return True, f"{k.describe()} under {_accel.choose('auto').name.upper()}"
    except VMError as e:
        if kernels.looks_like_path(kernel):
            return False, str(e)
        cands = [r for r in kernels.available_releases() if kernels.matches(kernel, r)]
        if cands:
            return True, f"kernel {cands[-1]} will be installed on first use"
        return False, str(e)


# --- the guest side ------------------------------------------------------------------

def guest_env(base: dict | None = None) -> dict:
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ENV_DROP and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)}
    venv_bin = os.path.dirname(sys.executable)
    path = [p for p in env.get("PATH", "").split(":") if p]
    std = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    env["PATH"] = ":".join(dict.fromkeys([venv_bin, *path, *std]))
    env["HOME"] = "/root"
    env.setdefault("LANG", "C.UTF-8")
    return env


def guest_nic_lines(mac: str, addr: str, prefix: int, peer: str, agent_port: int) -> list[str]:
    """Shell lines that find the NIC by its MAC, address it (IPv6 off: no
    solicitations on its queues), and export where the host side is."""
    return [
        "REUSEPORT_CTL_VM_NIC=",
        "for d in /sys/class/net/*; do",
        f"  [ \"$(cat $d/address 2>/dev/null)\" = {mac} ] && REUSEPORT_CTL_VM_NIC=${{d##*/}}",
        "done",
        "if [ -z \"$REUSEPORT_CTL_VM_NIC\" ]; then",
        f"  echo 'reuseport-ctl vm: the guest has no NIC with MAC {mac}' >&2",
        "else",
        "  echo 1 > /proc/sys/net/ipv6/conf/$REUSEPORT_CTL_VM_NIC/disable_ipv6 2>/dev/null",
        f"  ip addr add {addr}/{prefix} dev $REUSEPORT_CTL_VM_NIC",
        "  ip link set $REUSEPORT_CTL_VM_NIC up",
        "fi",
        "export REUSEPORT_CTL_VM_NIC",
        f"export REUSEPORT_CTL_VM_ADDR={addr} REUSEPORT_CTL_VM_PEER={peer} "
        f"REUSEPORT_CTL_VM_AGENT={peer}:{agent_port}",
    ]


def guest_command(command: list[str]) -> str:
    """The command as the shell script the relay runs (the guest script's
    path + ".cmd"; a file, as argv could not hold a command line over 128 KiB)."""
    if len(command) == 1:
        return command[0] + "\n"                # one string: a shell command line
    return shlex.join(command) + "\n"


def guest_script(command: list[str], env: dict, cwd: str, headers: Path | None,
                 nic: list[str] | None = None) -> str:
    """The shell script the guest runs: marks its start on the console (so
    the host can tell "did not boot" from "command failed"), mounts
    bpffs/tracefs if absent, sets the environment (and the NIC, with `nic`
    lines), and runs the command under guest_relay.py, which relays its
    output whole and reports its exit status and byte counts on our port.
    The command itself is in "$0.cmd" (guest_command())."""
    lines = ["#!/bin/sh", "# written by reuseport-ctl vm; runs inside the guest",
             f"echo '{MARK} up' >/dev/console 2>/dev/null"]
    for k, v in sorted(env.items()):
        lines.append(f"export {k}={shlex.quote(v)}")
    if headers is not None and headers.is_dir():
        # a build tree (or an image whose release has no /lib/modules/<v>/build)
        lines.append(f"[ -e /lib/modules/$(uname -r)/build ] || "
                     f"export BCC_KERNEL_SOURCE={shlex.quote(str(headers))}")
    lines += [
        "grep -q ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf 2>/dev/null",
        "grep -q ' /sys/kernel/tracing tracefs ' /proc/mounts || "
        "mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null",
        "mkdir -p /var/cache/reuseport-ctl 2>/dev/null",
        *(nic or []),
        # vng points these at ports of their own; make them the process's
        # fd 1 and 2 as on any Linux, so they go through the relay as well
        "ln -sf /proc/self/fd/1 /dev/stdout 2>/dev/null",
        "ln -sf /proc/self/fd/2 /dev/stderr 2>/dev/null",
        f"cd {shlex.quote(cwd)} 2>/dev/null || cd /",
        f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(RELAY))} {STATUS_PORT} "
        "/bin/sh \"$0.cmd\"",
    ]
    return "\n".join(lines) + "\n"


# --- the host side -------------------------------------------------------------------

def vng_command(vng: str, k: kernels.Kernel, acc: _accel.Accel, *, cpus: int, memory: str,
                exec_line: str, numa: list[str] | None = None) -> list[str]:
    cmd = [vng, "--run", str(k.image), "--user", "root", "--name", "reuseport-ctl-vm",
           "--cpus", str(cpus), "--memory", memory,
           # kernel messages up to info level on the console we keep (the
           # wrapper sends ttyS0 to a file): boot log, panics, our marks
           "--append", f"loglevel=7 module_blacklist={','.join(SKIP_MODULES)}",
           "--exec", exec_line]
    for n in numa or []:
        cmd += ["--numa", n]
    if acc.name == "tcg":
        cmd += ["--disable-kvm", "--qemu-opts=-accel tcg,thread=multi"]
    return cmd


def _wrappers(bindir: Path) -> None:
    """bin/virtiofsd (the shim) and bin/qemu-system-x86_64 (the console
    wrapper), both running modules of this package with our Python."""
    pkg_parent = Path(__file__).resolve().parents[2]
    for name, module in (("virtiofsd", "virtiofsd_shim"), ("qemu-system-x86_64", "qemu_wrap")):
        w = bindir / name
        w.write_text("#!/bin/sh\n"
                     f"PYTHONPATH={shlex.quote(str(pkg_parent))}${{PYTHONPATH:+:$PYTHONPATH}} "
                     f"exec {shlex.quote(sys.executable)} -m reuseport_ctl.vm.{module} \"$@\"\n")
        w.chmod(0o755)


def group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the whole group (QEMU exits cleanly on it), then SIGKILL
    whatever is left; reap vng; wait until no member is alive."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_members(pgid):
                return
            time.sleep(0.05)
    proc.poll()


def _console_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln.rstrip("\r") for ln in text.splitlines()]


def _tail(lines: list[str]) -> list[str]:
    keep = [ln for ln in lines if ln.strip() and MARK not in ln]
    return keep[-CONSOLE_TAIL:]


def _format_tail(lines: list[str]) -> str:
    if not lines:
        return " The console stayed empty."
    return " Last console lines:\n" + "\n".join(f"  | {ln}" for ln in lines)


class _Stop(Exception):
    pass


class _Relay:
    """Copy a pipe to `dest` as it comes (and into `keep`; count[0] adds up
    the bytes read). One thread reads the pipe as fast as it fills, another
    writes to `dest`: a slow reader of our output (a pager, a full pipe)
    then never backs up into QEMU, which would hold the guest's data in its
    queues, and lose it when the guest powers off. QEMU opens
    /proc/self/fd/1 and 2 anew: on a pipe that is the same pipe, whereas on
    a regular file it would get its own offset and overwrite ours."""

    def __init__(self, src, dest, keep: list | None, mute: threading.Event,
                 count: list | None = None):
        import queue
        self.src, self.keep, self.mute, self.count = src, keep, mute, count
        self.out = getattr(dest, "buffer", dest) if dest is not None else None
        self.q: "queue.SimpleQueue[bytes | None]" = queue.SimpleQueue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer = threading.Thread(target=self._write, daemon=True)
        self.reader.start()
        self.writer.start()

    def _read(self):
        fd = self.src.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                if self.keep is not None:
                    self.keep.append(chunk)
                if self.count is not None:
                    self.count[0] += len(chunk)
                self.q.put(chunk)
        finally:
            self.q.put(None)
            self.src.close()

    def _write(self):
        while True:
            chunk = self.q.get()
            if chunk is None:
                break
            if self.out is not None and not self.mute.is_set():
                try:
                    self.out.write(chunk)
                    self.out.flush()
                except (OSError, ValueError):
                    pass

    def join(self, read_timeout: float = 5.0) -> None:
        """Wait for the pipe's end (at most read_timeout once the VM is gone),
        then until all of it is written out: it is the guest's output."""
        self.reader.join(read_timeout)
        if self.reader.is_alive() or self.mute.is_set():
            self.writer.join(read_timeout)
        else:
            self.writer.join()


_SIZE = re.compile(r"(0|[1-9][0-9]*)([MG]?)", re.ASCII)


def _mib(size: str) -> int | None:
    m = _SIZE.fullmatch(size)
    return None if m is None else int(m.group(1)) * (1024 if m.group(2) == "G" else 1)


def numa_problem(numa: list[str], memory: str, cpus: int) -> str | None:
    """What QEMU would refuse in vng --numa specs (SIZE[,cpus=A-B]...), in one
    sentence, before booting: vng makes each node a memory backend of SIZE,
    and QEMU wants the nodes to hold exactly -m and name only CPUs it has."""
    total = 0
    for spec in numa:
        size, *opts = spec.split(",")
        mib = _mib(size) if size == "0" or size[-1:] in ("M", "G") else None
        if mib is None:
            return f"--numa {spec!r}: the node's memory must be 0 or a size in M or G (512M, 1G)."
        total += mib
        for o in opts:
            key, _, val = o.partition("=")
            if key != "cpus":
                continue
            try:
                ids = [int(x) for x in val.split("-")]
            except ValueError:
                return f"--numa {spec!r}: cpus={val} is not a CPU or a range A-B."
            if max(ids) >= cpus:
                return f"--numa {spec!r} names CPU {max(ids)}, and the guest has --cpus {cpus} " \
                       f"(0-{cpus - 1})."
    if total != _mib(memory if memory[-1:] in ("M", "G") else memory + "M"):
        return f"the --numa nodes hold {total}M in all and --memory is {memory}: QEMU needs " \
               f"them equal."
    return None


def run(command: list[str], kernel: str = "6.12", *, cpus: int = 2, memory: str = "2G",
        timeout: float = 300, accel: str = "auto", cwd: str | None = None,
        env: dict | None = None, stdout=None, stderr=None, log=sys.stderr,
        install: bool = True, capture: bool = False, nic_queues: int = 0,
        numa: list[str] | None = None) -> RunResult:
    """Boot `kernel`, run `command` (a list of words, or one shell command
    line) as root in the guest, and return its exit status. Guest stdout and
    stderr go to `stdout`/`stderr` (default: ours; a file object, or False to
    drop them) as they come; with capture=True they are also returned.
    nic_queues=N gives the guest an N-queue virtio-net NIC with RSS over a tap
    in a private host network namespace (see nethost.py); numa: vng --numa
    specs, passed on."""
    if not command:
        raise VMError("no command given: put it after --, e.g. scripts/vm -- reuseport-ctl doctor.")
    bad = numa_problem(numa, memory, cpus) if numa else None
    if bad:
        raise VMError(bad)
    miss = missing_tools()
    if miss:
        raise VMError(f"cannot boot a VM: no {', no '.join(miss)}; {PKG_FIX}.")
    k = kernels.resolve(kernel, install_missing=install, log=log)
    acc = _accel.choose(accel)
    started = time.monotonic()
    try:
        # A host can run the KVM probe's tiny guest and still hang a real
        # kernel (seen on a PVM host: not one byte on the console). Under
        # "auto", a kernel that prints nothing in KVM_BOOT_S is retried under
        # TCG, and KVM is remembered as unusable.
        watchdog = KVM_BOOT_S if acc.name == "kvm" and accel == "auto" else None
        return _boot(command, k, acc, cpus=cpus, memory=memory, timeout=timeout, cwd=cwd,
                     env=env, stdout=stdout, stderr=stderr, log=log, capture=capture,
                     silent_after=watchdog, nic_queues=nic_queues, numa=numa)
    except _Silent:
        why = f"a {k.describe()} guest printed nothing under kvm in {KVM_BOOT_S:g} s"
        _accel.remember(ok=False, reason=why)
        print(f"reuseport-ctl vm: {why}; booting again under TCG", file=log, flush=True)
        left = timeout - (time.monotonic() - started)
        return _boot(command, k, _accel.Accel("tcg", f"KVM unusable: {why}"), cpus=cpus,
                     memory=memory, timeout=max(round(left), 1), cwd=cwd, env=env, stdout=stdout,
                     stderr=stderr, log=log, capture=capture, silent_after=None,
                     nic_queues=nic_queues, numa=numa)


class _Silent(Exception):
    """The guest printed nothing on its console in time (see run())."""


NETHOST_READY_S = 30.0


def start_nethost(queues: int) -> tuple[subprocess.Popen, str]:
    """The process owning the NIC's private network namespace and tap (see
    nethost.py); (process, its /proc/PID/ns/net) once the tap is up."""
    import select
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_parent + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.Popen([sys.executable, "-m", "reuseport_ctl.vm.nethost", "--queues",
                          str(queues)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         env=env, cwd="/", start_new_session=True)
    line = b""
    if select.select([p.stdout], [], [], NETHOST_READY_S)[0]:
        line = p.stdout.readline()
    words = line.decode(errors="replace").strip().split(" ", 1)
    if words[0] != "ready":
        stop_nethost(p)
        why = words[1] if len(words) > 1 else f"no answer in {NETHOST_READY_S:g} s"
        raise VMError(f"cannot set up the VM's NIC: {why}")
    return p, words[1]


def stop_nethost(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # its load client's children (if a request was running) are in its group
    deadline = time.monotonic() + 5
    while group_members(p.pid) and time.monotonic() < deadline:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    if p.stdout:
        p.stdout.close()


def guest_status(path: Path) -> tuple[int, int, int] | None:
    """(exit status, stdout bytes, stderr bytes) the guest relay reported."""
    try:
        found = STATUS_RE.findall(path.read_text(errors="replace"))
    except OSError:
        return None
    return tuple(int(x) for x in found[-1]) if found else None


def output_lost(status: tuple[int, int, int] | None, got_out: int, got_err: int) -> str | None:
    """One sentence when the guest's output did not all arrive (or the guest
    never said how much there was), else None. Host stderr also carries
    QEMU's and vng's own lines, so for it only "fewer" is a proof of loss."""
    if status is None:
        return ("the guest did not report how much its command wrote (no status line), "
                "so its output may be incomplete")
    _, n_out, n_err = status
    lost = []
    if got_out < n_out:
        lost.append(f"stdout: {got_out} of {n_out} bytes arrived")
    if got_err < n_err:
        lost.append(f"stderr: at most {got_err} of {n_err} bytes arrived")
    if not lost:
        return None
    return f"the guest's output was cut short ({'; '.join(lost)})"


def _boot(command, k, acc, *, cpus, memory, timeout, cwd, env, stdout, stderr, log,
          capture, silent_after: float | None, nic_queues: int = 0,
          numa: list[str] | None = None) -> RunResult:
    stdout = sys.stdout if stdout is None else (None if stdout is False else stdout)
    stderr = sys.stderr if stderr is None else (None if stderr is False else stderr)
    kept_out: list | None = [] if capture else None
    kept_err: list | None = [] if capture else None
    relays: list = []
    got_out, got_err = [0], [0]
    status = None
    mute = threading.Event()      # set when we stop the VM: its dying words are noise
    vng = vng_binary()
    cwd = cwd or os.getcwd()

    work = Path(tempfile.mkdtemp(prefix="reuseport-ctl-vm-", dir="/tmp"))
    proc = None
    nethost = None
    old = {}
    started = time.monotonic()
    boot_s = None
    timed_out = silent = False
    pending: list[int] = []       # a signal that came during the teardown

    def _raise(signum, frame):
        raise _Stop(signum)

    def _defer(signum, frame):
        pending.append(signum)

    try:
        for s in (signal.SIGTERM, signal.SIGHUP):
            try:
                old[s] = signal.signal(s, _raise)
            except ValueError:          # not the main thread
                pass
        (work / "bin").mkdir()
        _wrappers(work / "bin")
        script = work / "guest.sh"
        nic_lines = None
        if nic_queues:
            from . import nethost as _nh
            nic_lines = guest_nic_lines(_nh.GUEST_MAC, _nh.GUEST, 24, _nh.PEER, _nh.AGENT_PORT)
        script.write_text(guest_script(command, guest_env(env), cwd, k.headers, nic_lines))
        script.with_name(script.name + ".cmd").write_text(guest_command(command))
        console = work / "console.log"
        console.touch()
        vcmd = vng_command(vng, k, acc, cpus=cpus, memory=memory, exec_line=f"sh {script}",
                           numa=numa)
        venv = dict(os.environ, TMPDIR=str(work), REUSEPORT_CTL_VM_CONSOLE=str(console),
                    REUSEPORT_CTL_VM_BIN=str(work / "bin"),
                    REUSEPORT_CTL_VM_STATUS=str(work / "status"),
                    REUSEPORT_CTL_VM_QEMU=_accel.qemu_binary(),
                    PATH=f"{work / 'bin'}:{os.path.dirname(vng)}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        nic_note = ""
        if nic_queues:
            import json as _json
            nethost, netns_path = start_nethost(nic_queues)
            venv["REUSEPORT_CTL_VM_NETNS"] = netns_path
            venv["REUSEPORT_CTL_VM_QEMU_ARGS"] = _json.dumps(_nh.qemu_args(nic_queues))
            nic_note = (f"; NIC: virtio-net-pci, {nic_queues} queues, RSS, over tap "
                        f"{_nh.TAP} ({_nh.PEER}) in a private network namespace, guest "
                        f"{_nh.GUEST}")
        print(f"reuseport-ctl vm: booting {k.describe()} under {acc.name.upper()} "
              f"({acc.reason}); {cpus} CPUs, {memory}, time-out {timeout:g} s{nic_note}",
              file=log, flush=True)
        proc = subprocess.Popen(vcmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=venv, cwd="/",
                                start_new_session=True)
        for pipe in (proc.stdout, proc.stderr):
            try:
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
        relays = [_Relay(proc.stdout, stdout, kept_out, mute, got_out),
                  _Relay(proc.stderr, stderr, kept_err, mute, got_err)]
        while True:
            rc = proc.poll()
            if boot_s is None:
                text = console.read_text(errors="replace")
                if f"{MARK} up" in text:
                    boot_s = time.monotonic() - started
                elif (silent_after is not None and not text.strip()
                      and time.monotonic() - started > silent_after):
                    silent = True
                    break
            if rc is not None:
                break
            if time.monotonic() - started > timeout:
                timed_out = True
                break
            time.sleep(0.1)
    except _Stop as e:
        raise Interrupted(e.args[0]) from None
    finally:
        # The teardown must finish whatever arrives meanwhile (a second
        # SIGTERM, a SIGHUP): signals wait until it is done.
        for s in old:
            signal.signal(s, _defer)
        if proc is not None:
            if proc.poll() is None:
                mute.set()
            kill_group(proc)
        if nethost is not None:
            stop_nethost(nethost)
        for t in relays:
            t.join()
        lines = _console_lines(work / "console.log")
        status = guest_status(work / "status")
        keep = os.environ.get("REUSEPORT_CTL_VM_CONSOLE_LOG")
        if keep:                        # for debugging a boot: keep the whole console
            try:
                shutil.copyfile(work / "console.log", keep)
            except OSError:
                pass
        shutil.rmtree(work, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
        if pending:
            raise Interrupted(pending[0])
    if silent:
        raise _Silent()
    seconds = time.monotonic() - started
    text = "\n".join(lines)
    booted = boot_s is not None or f"{MARK} up" in text
    exits = re.findall(re.escape(MARK) + r" exit (\d+)", text)
    if status is None:              # the relay had no port: its line is on the console
        found = STATUS_RE.findall(" ".join(ln for ln in lines if MARK in ln))
        status = tuple(int(x) for x in found[-1]) if found else None
    tail = _tail(lines)
    if timed_out:
        where = ("the command was still running" if booted
                 else "the kernel never reached the command")
        raise VMError(f"The VM ({k.describe()}) did not finish within the {timeout:g} s "
                      f"time-out ({where}); it was stopped.{_format_tail(tail)}",
                      EXIT_TIMEOUT)
    if not booted:
        raise VMError(f"{k.describe()} did not boot to the command: QEMU/vng exited "
                      f"with status {rc} after {seconds:.1f} s.{_format_tail(tail)}")
    # The exit mark can be lost when the guest powers off before the UART
    # drains; vng's status is the command's status then.
    code = status[0] if status else int(exits[-1]) if exits else rc
    if re.search(r"Kernel panic|BUG:|Oops", text):
        print(f"reuseport-ctl vm: the guest kernel reported a crash.{_format_tail(tail)}",
              file=log, flush=True)
    print(f"reuseport-ctl vm: booted in {boot_s or 0:.1f} s; the command exited {code} "
          f"after {seconds:.1f} s in all ({acc.name.upper()})", file=log, flush=True)
    lost = output_lost(status, got_out[0], got_err[0])
    if lost:
        raise VMError(f"{lost[0].upper()}{lost[1:]}; the command exited {code}.",
                      code if code and status is None else EXIT_OUTPUT_LOST)
    return RunResult(code, k, acc, booted, boot_s, seconds, tail,
                     b"".join(kept_out or []), b"".join(kept_err or []))
