"""One direction of imports: kernel/ at the bottom imports nothing of the
tool above it, and no verb module reaches into another verb's privates."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "reuseport_ctl"
BELOW_KERNEL = {"errors", "cpulist"}       # plain modules the kernel layer may use


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module as written relative to the package, names) of every
    `from ... import` in path, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            out.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
    return out


def test_kernel_imports_nothing_above_it():
    bad = []
    for f in sorted((PKG / "kernel").glob("*.py")):
        for mod, names in _imports(f):
            if mod.startswith(".."):
                top = mod[2:].split(".")[0] or names[0]
                if top not in BELOW_KERNEL:
                    bad.append(f"{f.name}: from {mod} import {', '.join(names)}")
    assert bad == []


def test_verbs_do_not_import_each_others_privates():
    bad = []
    for f in sorted((PKG / "cmd").glob("*.py")):
        for mod, names in _imports(f):
            if mod.startswith(".") and not mod.startswith("..") and mod != "._common":
                bad += [f"{f.name}: from {mod} import {n}" for n in names if n.startswith("_")]
    assert bad == []
