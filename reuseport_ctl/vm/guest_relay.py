"""Runs the guest command and relays its stdout and stderr to the
virtio-serial ports vng gave us; a stand-alone script (stdlib only, run in
the guest as `python -I -S guest_relay.py PORT-NAME COMMAND [ARG...]`).

Why: vng hands the command the ports themselves as fd 1 and 2, and the
guest's virtio_console driver takes at most 32 KiB per write(). A short
write is legal, but a writer that does not retry loses the rest without a
word: Python with PYTHONUNBUFFERED=1 (sys.stdout is then a raw FileIO and
print() ignores the count), so `print` of 100 kB delivered 32,768 bytes and
exit status 0. Here the command writes into pipes (a blocking pipe write
takes everything), and we copy to the ports with a loop of write()s.

When the command has exited, whatever it left in the pipes is drained and
relayed; a background process it left holding them is not waited for (it
would die with the VM anyway). Then one line goes to our own port
(PORT-NAME, a file on the host): `exit RC out N err M`, N and M the bytes
the command wrote, so the host can tell whether all of it arrived. Without
that port the line goes to /dev/console with the runner's mark.
Exit status: the command's (128+N for a signal, like a shell).
"""
from __future__ import annotations

import errno
import os
import select
import subprocess
import sys

MARK = "@@reuseport-ctl-vm:"
STATUS_PORT = "reuseport-ctl.status"   # the port qemu_wrap adds


def write_all(fd: int, data: bytes) -> bool:
    """Every byte of data to fd, however short the writes; False if fd fails."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except OSError:
            return False
        view = view[n:]
    return True


def find_port(name: str) -> str | None:
    base = "/sys/class/virtio-ports"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return None
    for e in entries:
        try:
            with open(f"{base}/{e}/name") as f:
                if f.read().strip() == name:
                    return f"/dev/{e}"
        except OSError:
            continue
    return None


def relay(argv: list[str], out_fd: int = 1, err_fd: int = 2) -> tuple[int, int, int]:
    """Run argv with its stdout/stderr relayed to out_fd/err_fd; (exit status,
    bytes it wrote to stdout, to stderr)."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_r, err_r = child.stdout.fileno(), child.stderr.fileno()
    dest = {out_r: out_fd, err_r: err_fd}
    counts = {fd: 0 for fd in dest}
    ok = {fd: True for fd in dest}
    open_fds = set(dest)

    def pump(fd: int) -> bool:
        """One read from fd relayed; False at EOF or when nothing is there."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except InterruptedError:
            return True
        if not chunk:
            open_fds.discard(fd)
            return False
        counts[fd] += len(chunk)
        if ok[fd]:
            ok[fd] = write_all(dest[fd], chunk)
        return True

    while open_fds and child.poll() is None:
        try:
            ready = select.select(list(open_fds), [], [], 0.2)[0]
        except InterruptedError:
            continue
        for fd in ready:
            pump(fd)
    rc = child.wait()
    # The command is gone: what it wrote is in the pipes. Drain that, and do
    # not wait for EOF (a process it left in the background may hold them).
    for fd in list(open_fds):
        os.set_blocking(fd, False)
        while pump(fd):
            pass
    child.stdout.close()
    child.stderr.close()
    return (rc if rc >= 0 else 128 - rc), counts[out_r], counts[err_r]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: guest_relay.py STATUS-PORT-NAME COMMAND [ARG...]", file=sys.stderr)
        return 2
    try:
        rc, n_out, n_err = relay(argv[2:])
    except OSError as e:
        print(f"reuseport-ctl vm: cannot run {argv[2]}: {e.strerror}", file=sys.stderr)
        rc, n_out, n_err = 127, 0, 0
    line = f"exit {rc} out {n_out} err {n_err}\n"
    port = find_port(argv[1])
    try:
        if port is None:
            raise OSError(errno.ENOENT, "no status port")
        fd = os.open(port, os.O_WRONLY)
        write_all(fd, line.encode())
        os.close(fd)
    except OSError:
        try:
            with open("/dev/console", "w") as con:
                con.write(f"{MARK} {line}")
        except OSError:
            pass
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
