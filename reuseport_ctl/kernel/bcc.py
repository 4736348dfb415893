"""bcc, imported lazily with a header tree chosen for it.

Nothing else imports bcc: callers use compile_program(), and get one clear
sentence (not a traceback) when bcc or headers are missing.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..errors import UserError
from .headers import FIX, HeaderTree, find_header_tree

DIST = "/usr/lib/python3/dist-packages"


@lru_cache(maxsize=1)
def source_dir() -> Path:
    """Where the BPF C lives: bpf/ of a source checkout, else the copy
    shipped inside the wheel (the package reuseport_ctl.bpf)."""
    here = Path(__file__).resolve().parents[2] / "bpf"
    if (here / "common.h").is_file():
        return here
    return Path(str(resources.files("reuseport_ctl.bpf")))


@lru_cache(maxsize=None)
def program_source(name: str) -> str:
    """The text of bpf/<name>."""
    return (source_dir() / name).read_text()


@lru_cache(maxsize=1)
def header_tree() -> HeaderTree:
    return find_header_tree()


@lru_cache(maxsize=1)
def bcc_module():
    """Import bcc (Debian's python3-bpfcc) with BCC_KERNEL_SOURCE set."""
    tree = header_tree()
    # bcc reads this from the environment (children inherit it); for the
    # kernel's own tree bcc needs none, and a stale one would mislead it.
    if tree.stand_in:
        os.environ["BCC_KERNEL_SOURCE"] = str(tree.path)
    else:
        os.environ.pop("BCC_KERNEL_SOURCE", None)
    try:
        import bcc  # noqa: F401
    except ImportError:
        if os.path.isdir(os.path.join(DIST, "bcc")) and DIST not in sys.path:
            sys.path.append(DIST)
        try:
            import bcc  # noqa: F401,F811
        except ImportError:
            raise UserError(f"bcc (python3-bpfcc) is not importable: {FIX}.") from None
    except OSError as e:  # libbcc.so missing
        raise UserError(f"bcc's library cannot be loaded ({e}): {FIX}.") from None
    import bcc
    return bcc


@contextmanager
def stderr_captured():
    """Hold what libbcc and libbpf write straight to fd 2 ("bpf: Failed to
    load program: ...") while a probe runs; yields a list that holds the
    text afterwards, for the caller to report (or not) in its own words."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


# `reuseport-ctl --ebpf VERB`: where every program is shown as it is
# compiled (a dup of the real stderr, so doctor's captured probes show too).
SHOW = None


def show_programs() -> None:
    global SHOW
    SHOW = os.fdopen(os.dup(2), "w")


def compile_program(text: str, cflags: list[str] | None = None, inline: tuple[str, ...] = ()):
    """Compile bcc-dialect C; returns a bcc.BPF object (caller owns cleanup).
    inline: headers of bpf/ pasted in place of their #include line, for
    headers with maps or programs (bcc rewrites those in the main file only)."""
    bcc = bcc_module()
    for name in inline:
        text = text.replace(f'#include "{name}"', program_source(name))
    # -w: the stand-in headers warn about attributes clang ignores; -I: the
    # sources' own #include "common.h".
    flags = ["-w", f"-I{source_dir()}"] + list(cflags or [])
    if SHOW is not None:
        SHOW.write(f"/* reuseport-ctl --ebpf: cflags {' '.join(flags)} */\n{text}\n")
        SHOW.flush()
    try:
        return bcc.BPF(text=text.encode(), cflags=flags)
    except Exception as e:  # bcc raises plain Exception on compile failure
        raise UserError(f"bcc could not compile the BPF program ({e}); "
                        f"check the header tree with 'reuseport-ctl doctor'.") from None
