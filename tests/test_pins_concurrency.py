"""attach and detach from several reuseport-ctl processes at once: they take
turns (kernel/lockfile.py) instead of failing with EBUSY on the socket array
or removing the shared pin directory under each other."""
from __future__ import annotations

import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor


from reuseport_ctl import pins


def group(port: int, n: int = 2) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(8)
        socks.append(s)
    return socks


def test_two_attaches_on_one_port_take_turns(netns, cli):
    socks = group(9101)
    try:
        with ThreadPoolExecutor(2) as ex:
            runs = list(ex.map(lambda pol: cli("attach", "--port", 9101, "--policy", pol),
                               ["round-robin", "drain:0"] * 3))
        assert [r.returncode for r in runs] == [0] * 6, [r.stderr for r in runs]
        assert pins.status(9101).policy in ("round-robin", "drain:0")
        cli("detach", "--port", 9101, check=True)
    finally:
        for s in socks:
            s.close()


def test_detach_of_one_port_never_removes_the_directory_under_another(netns, cli):
    a, b = group(9102), group(9103)
    script = ("for i in $(seq 8); do {exe} attach --port {p} --policy round-robin >/dev/null"
              " || exit 1; {exe} detach --port {p} >/dev/null || exit 1; done")
    import os
    import shutil
    import sys
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable))
    try:
        procs = [subprocess.Popen(["sh", "-c", script.format(exe=exe, p=p)],
                                  stderr=subprocess.PIPE, text=True) for p in (9102, 9103)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs
        assert "Traceback" not in "".join(errs)
    finally:
        for s in a + b:
            s.close()
