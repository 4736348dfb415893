"""Find a kernel header tree for bcc, so the user exports nothing.

bcc refuses to compile without headers. Preference order:
1. the running kernel's own tree, /lib/modules/$(uname -r)/build;
2. a stand-in: the newest installed Debian header package. Debian splits it in
   two trees (-<flavour> with generated/ and -common with the rest), and bcc
   needs one complete tree, so we merge them as a symlink farm in a cache
   directory the tool owns (never in the user's /lib/modules).
Our BPF C includes UAPI headers only, so any recent tree serves; struct
offsets come from BTF, never from these headers.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

CACHE = Path(os.environ.get("REUSEPORT_CTL_CACHE", "/var/cache/reuseport-ctl"))
SRC = Path("/usr/src")
FIX = "run scripts/bootstrap (as root) to install bcc and a kernel header tree"


@dataclass(frozen=True)
class HeaderTree:
    path: Path
    version: str       # the kernel version the headers are for
    stand_in: bool     # not the running kernel's own headers


def _version_key(v: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.\-+~]", v)]


def _standin_candidates() -> list[tuple[str, Path, Path]]:
    """(version, flavour tree, common tree) for each installed split package."""
    out = []
    for flav in SRC.glob("linux-headers-*"):
        m = re.fullmatch(r"linux-headers-(.+?)-([a-z0-9]+-amd64|amd64)", flav.name)
        if not m or not (flav / "include" / "generated").is_dir():
            continue
        common = SRC / f"linux-headers-{m.group(1)}-common"
        if (common / "include" / "linux" / "kconfig.h").is_file():
            out.append((f"{m.group(1)}-{m.group(2)}", flav, common))
    return sorted(out, key=lambda t: _version_key(t[0]))


def _merge(version: str, flav: Path, common: Path) -> Path:
    dest = CACHE / "kheaders" / version
    done = dest / ".complete"
    if done.exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # common first, then the flavour tree on top (its files win).
    for tree in (common, flav):
        for dirpath, dirnames, filenames in os.walk(tree):
            rel = Path(dirpath).relative_to(tree)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for d in [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                # symlinked dirs (Debian links scripts/ to kbuild) stay links
                dirnames.remove(d)
                t = tmp / rel / d
                if not os.path.lexists(t):
                    t.symlink_to((Path(dirpath) / d).resolve())
            for f in filenames:
                t = tmp / rel / f
                if os.path.lexists(t):
                    t.unlink()
                t.symlink_to(Path(dirpath) / f)
    (tmp / ".complete").write_text(f"{flav}\n{common}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def find_header_tree() -> HeaderTree:
    release = os.uname().release
    own = Path(f"/lib/modules/{release}/build")
    if own.is_dir():
        return HeaderTree(own, release, stand_in=False)
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and Path(env).is_dir():
        return HeaderTree(Path(env), Path(env).name, stand_in=True)
    cands = _standin_candidates()
    if not cands:
        raise UserError(f"No kernel header tree for bcc (none for {release} and no "
                        f"stand-in installed): {FIX}.")
    version, flav, common = cands[-1]
    try:
        path = _merge(version, flav, common)
    except OSError as e:
        raise UserError(f"Cannot prepare the stand-in header tree in {CACHE} ({e.strerror}): "
                        f"run as root or set REUSEPORT_CTL_CACHE.")
    return HeaderTree(path, version, stand_in=True)
