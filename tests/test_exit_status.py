"""One exit convention for every verb (README, "Exit status"): a verb ended
by SIGINT, SIGTERM or SIGHUP cleans up, prints what it has, and exits with
the shell's 128 + N; nothing is left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

EXE = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) or "reuseport-ctl"


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([EXE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(p: subprocess.Popen, ok, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not ok():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "never got going"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_run_prints_its_summary_and_exits_128_plus_n(netns, sig):
    p = start("run", "--workers", 2, "--port", 8080, "--json")
    wait_for(p, lambda: len(psutil.Process(p.pid).children()) == 2)
    kids = psutil.Process(p.pid).children()
    time.sleep(0.3)
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, err
    assert json.loads(out)["workers"]                   # the summary came first
    assert "Traceback" not in err and "interrupted" in err
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


def test_load_stopped_by_sigterm_exits_143(netns):
    with subprocess.Popen([sys.executable, "-c", "import socket,time\n"
                           "s=socket.socket(); s.bind(('127.0.0.1', 8081)); s.listen(4096)\n"
                           "time.sleep(60)"]) as server:
        try:
            time.sleep(0.3)
            p = start("load", "--port", 8081, "--duration", 30, "--timeout", 5)
            time.sleep(1.5)
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=30)
            assert p.returncode == 143, err
            assert "Traceback" not in err
        finally:
            server.kill()


def test_a_signal_while_watch_attaches_its_probes_ends_it_promptly(netns):
    """The probes take seconds to compile and attach: a SIGTERM meanwhile
    stops the watch within a few seconds, with 143 and nothing loaded."""
    from conftest import bpf_objects, bpf_objects_settle
    import socket
    before = bpf_objects()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.bind(("127.0.0.1", 8082))
    ls.listen(8)
    try:
        for after in (0.3, 1.0):
            p = start("watch", "--port", 8082, "--json")
            time.sleep(after)
            t0 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            out, err = p.communicate(timeout=30)
            took = time.monotonic() - t0
            assert p.returncode == 143, err
            assert "Traceback" not in err
            assert took < 5.0, took                    # generous for a loaded CI machine
        assert bpf_objects_settle(before) == before
    finally:
        ls.close()
