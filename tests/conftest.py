"""Shared test helpers: a fresh network namespace per networking test, so
ports never collide and nothing touches the host's network."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
ROOT = Path(__file__).resolve().parent.parent


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@pytest.fixture
def netns():
    """Run the test (and every process it starts) in a new network namespace
    with loopback up; yields the namespace name."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    name = f"rpctl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    orig = os.open("/proc/self/ns/net", os.O_RDONLY)
    new = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(new)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        _setns(orig)
        os.close(new)
        os.close(orig)
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def cli():
    """Run reuseport-ctl as a real process (in the caller's netns)."""
    exe = shutil.which("reuseport-ctl", path=os.path.dirname(sys.executable)) \
        or "reuseport-ctl"

    def run(*args, timeout=120, check=False, **kw):
        p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"reuseport-ctl {' '.join(map(str, args))} failed "
                                 f"({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p
    return run


def bpf_objects() -> tuple[set, set, set]:
    """reuseport-ctl's BPF programs and maps (names start with rp_), and all
    links: what a leak check compares before and after."""
    from reuseport_ctl.kernel import bpf
    progs = {i for i, n in bpf.prog_names().items() if n.startswith("rp_")}
    maps = {i for i, n in bpf.map_names().items() if n.startswith("rp_")}
    return progs, maps, set(bpf.link_ids())


def bpf_objects_settle(expected, seconds: float = 10.0, objects=bpf_objects):
    """The kernel frees a program's maps after an RCU grace period, in a work
    item: wait (bounded) until objects() matches, return what was last seen."""
    import time
    deadline = time.monotonic() + seconds
    while True:
        now = objects()
        if now == expected or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.fixture(scope="module")
def strategies():
    """The probe strategies this kernel offers, asked once per module (each
    test attaches its own probes); skips when there is no data-ready probe."""
    from reuseport_ctl.probes.session import default_strategies
    chosen = default_strategies()
    if chosen["data_ready"].name == "none":
        pytest.skip(f"no data-ready probe on this kernel: {chosen['data_ready'].reason}")
    return chosen
