"""Which kernel to boot: a Debian kernel package by version, a bzImage, or a
kernel build tree.

A Debian kernel is used as installed: /boot/vmlinuz-<release>, modules in
/lib/modules/<release>, and bcc's headers through /lib/modules/<release>/build
(the linux-headers package makes that link). Both packages are installed on
first use (as root) when they are missing.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import VMError

FLAVOUR = "cloud-amd64"     # virtio drivers built in, small; has KPROBES and BTF
BOOT = Path("/boot")
MODULES = Path("/lib/modules")


@dataclass(frozen=True)
class Kernel:
    spec: str                 # what the user asked for
    kind: str                 # "debian" | "bzimage" | "tree"
    image: Path               # what vng boots (--run): a bzImage or a build tree
    release: str | None       # uname -r in the guest, when known
    modules: Path | None      # /lib/modules/<release> (or the tree's own)
    headers: Path | None      # a header tree bcc can use in the guest

    def describe(self) -> str:
        what = {"debian": "Debian kernel", "bzimage": "kernel image",
                "tree": "kernel build tree"}[self.kind]
        rel = f" {self.release}" if self.release else ""
        where = "" if self.kind == "debian" else f" ({self.image})"
        return f"{what}{rel}{where}"


def version_key(v: str):
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"[.\-+~]", v) if x]


def matches(spec: str, release: str) -> bool:
    """'6.12' matches 6.12.117+deb12-cloud-amd64 but not 6.1.0-56-cloud-amd64;
    a full version (with or without the flavour) matches exactly that one."""
    s = spec.strip()
    if release == s or release == f"{s}-{FLAVOUR}":
        return True
    return re.match(re.escape(s) + r"([.+\-]|$)", release) is not None


def _real_release(name: str) -> bool:
    # linux-image-6.12-cloud-amd64 is a meta package: want 6.12.<n>...
    return re.match(r"\d+\.\d+\.\d+", name) is not None and name.endswith(f"-{FLAVOUR}")


def installed_releases() -> list[str]:
    """Releases with both an image in /boot and a modules directory."""
    out = []
    for img in BOOT.glob("vmlinuz-*"):
        rel = img.name[len("vmlinuz-"):]
        if (MODULES / rel / "kernel").is_dir() or (MODULES / rel / "modules.order").exists():
            out.append(rel)
    return sorted(out, key=version_key)


def _apt_names(kind: str) -> set[str]:
    try:
        p = subprocess.run(["apt-cache", "search", "--names-only",
                            rf"^linux-{kind}-[0-9].*-{FLAVOUR}$"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    pre = f"linux-{kind}-"
    return {line.split()[0][len(pre):] for line in p.stdout.splitlines()
            if line.startswith(pre) and _real_release(line.split()[0][len(pre):])}


def available_releases() -> list[str]:
    """Releases the distribution offers with both an image and a headers package."""
    return sorted(_apt_names("image") & _apt_names("headers"), key=version_key)


def _series(rel: str) -> str:
    return ".".join(rel.split(".")[:2])


def describe_available(releases: list[str]) -> str:
    by: dict[str, list[str]] = {}
    for r in releases:
        by.setdefault(_series(r), []).append(r)
    return "; ".join(f"{s} (newest {max(rs, key=version_key)})"
                     for s, rs in sorted(by.items(), key=lambda kv: version_key(kv[0])))


_apt_updated = False


def _apt_update(log) -> None:
    global _apt_updated
    if not _apt_updated:
        print("reuseport-ctl vm: apt-get update", file=log)
        subprocess.run(["apt-get", "update", "-qq"], check=False,
                       stdout=subprocess.DEVNULL, stderr=log)
        _apt_updated = True


def install(packages: list[str], log=sys.stderr) -> None:
    if os.geteuid() != 0:
        raise VMError(f"{' and '.join(packages)} must be installed first: run as root, "
                      f"or apt-get install {' '.join(packages)}.")
    if shutil.which("apt-get") is None:
        raise VMError(f"cannot install {' '.join(packages)}: this is not a Debian system.")
    print(f"reuseport-ctl vm: installing {' '.join(packages)} (first use of this kernel)",
          file=log, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        _apt_update(log)
        p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no message"])[-1]
        raise VMError(f"apt-get could not install {' '.join(packages)}: {last}")


def resolve_debian(spec: str, *, install_missing: bool = True, log=sys.stderr) -> Kernel:
    """'6.12' → the newest installed 6.12 cloud kernel, else the newest the
    distribution offers (installed now); a full version → exactly that one."""
    inst = [r for r in installed_releases() if matches(spec, r)]
    # prefer the cloud flavour among installed kernels of the series
    inst.sort(key=lambda r: (r.endswith(FLAVOUR), version_key(r)))
    if inst:
        rel = inst[-1]
    else:
        avail = available_releases()
        if not avail and install_missing and os.geteuid() == 0:
            _apt_update(log)
            avail = available_releases()
        cands = [r for r in avail if matches(spec, r)]
        if not cands:
            offer = describe_available(avail) or "none (run apt-get update?)"
            raise VMError(f"Debian has no {FLAVOUR} kernel {spec!r} with headers; "
                          f"it has: {offer}.")
        rel = cands[-1]
    image = BOOT / f"vmlinuz-{rel}"
    need = []
    if not image.exists():
        need.append(f"linux-image-{rel}")
    if not (MODULES / rel / "build").exists():
        need.append(f"linux-headers-{rel}")
    if need:
        if not install_missing:
            raise VMError(f"kernel {rel} is not installed ({' '.join(need)} missing).")
        install(need, log=log)
    return Kernel(spec, "debian", image, rel, MODULES / rel, MODULES / rel / "build")


def bzimage_release(path: Path) -> str | None:
    """The release string inside a bzImage (its 'HdrS' setup header), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x10000)
            if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
                return None
            off = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
            f.seek(off)
            s = f.read(256).split(b"\0")[0].decode(errors="replace")
    except OSError:
        return None
    return s.split()[0] if s else None


def resolve_path(spec: str) -> Kernel:
    p = Path(spec).expanduser().resolve()
    if p.is_dir():
        img = p / "arch" / "x86" / "boot" / "bzImage"
        if not img.is_file():
            raise VMError(f"{p} is not a built kernel tree (no arch/x86/boot/bzImage): "
                          f"build it first (make -j$(nproc) bzImage modules).")
        if not (p / ".config").is_file():
            raise VMError(f"{p} has a bzImage but no .config: not a kernel build tree.")
        rel = bzimage_release(img)
        hdr = p if (p / "include" / "generated").is_dir() else None
        return Kernel(spec, "tree", p, rel, None, hdr)
    if not p.exists():
        raise VMError(f"{spec}: no such file, and not a kernel version "
                      f"(a version such as 6.12, a bzImage or a build tree; "
                      f"`reuseport-ctl vm --list-kernels` lists the versions).")
    rel = bzimage_release(p)
    if rel is None:
        raise VMError(f"{p} is not an x86 kernel image (no bzImage 'HdrS' header).")
    mods = MODULES / rel
    hdr = mods / "build"
    return Kernel(spec, "bzimage", p, rel, mods if mods.is_dir() else None,
                  hdr if hdr.exists() else None)


def looks_like_path(spec: str) -> bool:
    return "/" in spec or spec.startswith(".") or os.path.exists(spec)


def resolve(spec: str, *, install_missing: bool = True, log=sys.stderr) -> Kernel:
    if looks_like_path(spec):
        return resolve_path(spec)
    if not re.fullmatch(r"\d+\.\d+[\w.+\-~]*", spec):
        raise VMError(f"{spec!r} is neither a kernel version (like 6.12) nor a path "
                      f"to a bzImage or a kernel build tree.")
    return resolve_debian(spec, install_missing=install_missing, log=log)
