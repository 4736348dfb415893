"""KVM or TCG: try KVM for real, once, and remember the answer.

/dev/kvm can open and still be useless for a guest (a PVM host: QEMU aborts
with "failed to set MSR 0x10a" for -cpu host). So we boot a 16-byte "BIOS"
under KVM with -cpu host (what vng uses with KVM): it writes to QEMU's
isa-debug-exit port, and QEMU exits with status 99. Anything else (an abort,
an emulation failure, a hang) means KVM is not usable here. ~0.1 s; the
answer is cached per host kernel and QEMU binary.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..kernel.headers import CACHE

QEMU = "qemu-system-x86_64"
CACHE_FILE = CACHE / "vm" / "kvm-probe.json"
_EXPECTED = 99                      # isa-debug-exit: (0x31 << 1) | 1
# Real-mode code at the reset vector (last 16 bytes of a 64 KiB BIOS):
#   mov al, 0x31 ; out 0xf4, al ; hlt ; jmp $-1
_RESET = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])


@dataclass(frozen=True)
class Accel:
    name: str        # "kvm" | "tcg"
    reason: str      # why, in a few words


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def _bios(path: Path) -> None:
    img = bytearray(64 * 1024)
    img[0xFFF0:0xFFF0 + len(_RESET)] = _RESET
    path.write_bytes(bytes(img))


def _probe(qemu: str, accel: str = "kvm", timeout: float = 15.0) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="rpctl-kvmprobe-") as d:
        bios = Path(d) / "bios.bin"
        _bios(bios)
        cpu = "host" if accel == "kvm" else "max"
        cmd = [qemu, "-machine", f"q35,accel={accel}", "-cpu", cpu, "-m", "32",
               "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
               "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"a test guest under {accel} did not finish in {timeout:.0f} s"
        except OSError as e:
            return False, f"cannot run {qemu}: {e.strerror}"
    if p.returncode == _EXPECTED:
        return True, f"a test guest ran under {accel}"
    lines = [ln.strip() for ln in (p.stderr or "").splitlines() if ln.strip()]
    why = lines[0] if lines else f"exit status {p.returncode}"
    return False, f"a test guest failed under {accel} ({why[:160]})"


def _key(qemu: str) -> dict:
    st = os.stat(qemu)
    return {"host": os.uname().release, "qemu": qemu, "qemu_mtime": int(st.st_mtime)}


def kvm_usable(qemu: str | None = None, *, use_cache: bool = True) -> tuple[bool, str]:
    qemu = qemu or qemu_binary()
    if qemu is None:
        return False, "QEMU is not installed"
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return False, f"/dev/kvm cannot be opened ({e.strerror})"
    key = _key(qemu)
    if use_cache:
        try:
            c = json.loads(CACHE_FILE.read_text())
            if c.get("key") == key:
                return bool(c["ok"]), c["reason"] + " (cached)"
        except (OSError, ValueError, KeyError):
            pass
    ok, reason = _probe(qemu, "kvm")
    remember(ok, reason, qemu)
    return ok, reason


def remember(ok: bool, reason: str, qemu: str | None = None) -> None:
    """Cache the answer for this host kernel and QEMU binary (the runner
    also calls it when KVM passed the probe but hung a real kernel)."""
    qemu = qemu or qemu_binary()
    if qemu is None:
        return
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_FILE.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": _key(qemu), "ok": ok, "reason": reason}))
        tmp.replace(CACHE_FILE)
    except OSError:
        pass


def choose(requested: str = "auto", qemu: str | None = None) -> Accel:
    """requested: "auto" (KVM when it works, else TCG), "kvm" or "tcg"."""
    if requested == "tcg":
        return Accel("tcg", "asked for TCG")
    ok, reason = kvm_usable(qemu)
    if ok:
        return Accel("kvm", reason)
    if requested == "kvm":
        from .errors import VMError
        raise VMError(f"KVM was asked for but is not usable here: {reason}.")
    return Accel("tcg", f"KVM unusable: {reason}")
