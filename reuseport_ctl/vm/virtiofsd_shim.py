"""virtiofsd shim: take the Rust virtiofsd's command line (what virtme-ng
passes) and run Debian bookworm's C virtiofsd (/usr/lib/qemu/virtiofsd).

The runner puts a "virtiofsd" wrapper that execs this module first on vng's
PATH. Without it vng finds no daemon it can use and silently falls back to
9p, which Debian's cloud kernels do not have.

vng runs
    virtiofsd --syslog --no-announce-submounts [--readonly] [--posix-acl]
              --socket-path S --shared-dir D --sandbox none --cache C &
and waits (~3 s) for the file S.pid. We start the C daemon, wait until its
socket S exists (so QEMU can connect), then write the daemon's pid to S.pid.
vng sends SIGTERM to that pid when QEMU exits; the C daemon also exits when
QEMU disconnects. The daemon dies with this shim (PR_SET_PDEATHSIG), and the
shim is in the runner's process group, so killing that group leaves no
daemon behind.

--syslog is not passed on: with no /dev/log the C daemon's seccomp filter
kills it (SIGSYS) on its first log line. --readonly has no C equivalent; the
guest mounts the shared root read-only anyway (vng without --rw).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

REAL = os.environ.get("REUSEPORT_CTL_VIRTIOFSD", "/usr/lib/qemu/virtiofsd")
_WITH_VALUE = {"--socket-path", "--shared-dir", "--cache", "--sandbox", "--thread-pool-size",
               "--log-level", "--xattrmap", "--inode-file-handles",
               "--announce-submounts-mode", "--modcaps", "--rlimit-nofile", "--fd"}
PR_SET_PDEATHSIG = 1


def parse(argv: list[str]) -> dict:
    """Rust-style options → {"socket-path": ..., "shared-dir": ..., "cache": ...}."""
    opts: dict = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--version", "-V", "--help", "-h"):
            opts["action"] = a.lstrip("-")[0].upper() if a in ("-V", "-h") else a[2:]
        elif "=" in a and a.startswith("--"):
            k, v = a[2:].split("=", 1)
            opts[k] = v
        elif a in _WITH_VALUE:
            if i + 1 >= len(argv):
                raise SystemExit(f"virtiofsd-shim: {a} needs a value")
            opts[a[2:]] = argv[i + 1]
            i += 1
        elif a.startswith("-"):
            opts[a.lstrip("-")] = True          # flags we ignore
        else:
            raise SystemExit(f"virtiofsd-shim: unexpected argument {a!r}")
        i += 1
    return opts


def c_command(opts: dict, real: str = REAL) -> list[str]:
    cache = {"always": "always", "auto": "auto", "none": "none", "never": "none",
             "metadata": "auto"}.get(str(opts.get("cache", "auto")), "auto")
    return [real, f"--socket-path={opts['socket-path']}", "-o", f"source={opts['shared-dir']}",
            "-o", f"cache={cache}", "-o", "sandbox=chroot", "-o", "allow_root", "-o", "xattr"]


def _pdeathsig():
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    act = opts.get("action")
    if act in ("version", "V"):
        print(f"virtiofsd-shim (reuseport-ctl) over {REAL}")
        return subprocess.call([REAL, "--version"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    if act in ("help", "h"):
        # No --readonly here on purpose: vng then does not pass it.
        print("usage: virtiofsd --socket-path PATH --shared-dir DIR [--cache MODE]\n"
              f"  (reuseport-ctl's shim over the C virtiofsd {REAL})")
        return 0
    if "socket-path" not in opts or "shared-dir" not in opts:
        print("virtiofsd-shim: --socket-path and --shared-dir are required", file=sys.stderr)
        return 2
    if not os.access(REAL, os.X_OK):
        print(f"virtiofsd-shim: {REAL} not found (apt-get install qemu-system-common)",
              file=sys.stderr)
        return 1
    sock = opts["socket-path"]
    pidfile = sock + ".pid"
    log = os.environ.get("REUSEPORT_CTL_VIRTIOFSD_LOG")
    err = open(log, "ab") if log else subprocess.DEVNULL
    child = subprocess.Popen(c_command(opts), stdin=subprocess.DEVNULL,
                             stdout=err, stderr=err, preexec_fn=_pdeathsig)

    def stop(signum, frame):
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(2)
            except subprocess.TimeoutExpired:
                child.kill()
        _unlink(pidfile)
        os._exit(0)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    deadline = time.monotonic() + 5
    while not os.path.exists(sock):
        if child.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if child.poll() is None:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{child.pid}\n")
        os.replace(pidfile + ".tmp", pidfile)
    rc = child.wait()
    _unlink(pidfile)
    return rc


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
