"""The verify registry: each check is a small function whose docstring states
the kernel property, tagged with the selftest it corresponds to and the
facilities (kernel/features.py names) it needs.

A check returns a one-line detail when the property holds, raises Fail with
what it saw against what it expected when it does not, or Skip with the
reason it cannot run. The runner (runner.py) decides skips from `needs`
before the check starts, and runs each check in its own process.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError

PASS, FAIL, SKIP = "pass", "fail", "skip"
SELFTESTS = "tools/testing/selftests"


class Fail(Exception):
    """The property does not hold: what was seen against what was expected."""

    def __init__(self, what: str, seen, expected):
        self.what, self.seen, self.expected = what, seen, expected
        super().__init__(f"{what}: saw {seen}, expected {expected}")


class Skip(Exception):
    """The check cannot run here; the message says why (the missing facility)."""


def expect(ok: bool, what: str, seen, expected) -> None:
    if not ok:
        raise Fail(what, seen, expected)


def expect_eq(seen, expected, what: str) -> None:
    expect(seen == expected, what, seen, expected)


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[["Context"], str | None]
    area: str
    selftest: str | None              # path under tools/testing/selftests, or None
    needs: tuple[str, ...] = ()
    timeout: float = 20.0

    @property
    def doc(self) -> str:
        return " ".join((self.fn.__doc__ or "").split())


@dataclass
class Context:
    """What a check may ask of the run."""
    private_netns: bool = True          # this check has a network namespace of its own
    facilities: dict = field(default_factory=dict)   # name -> features.Facility


@dataclass
class Result:
    name: str
    selftest: str | None
    status: str                 # pass, fail, skip
    detail: str
    seconds: float
    area: str = ""

    def as_json(self) -> dict:
        return {"name": self.name, "selftest": self.selftest, "status": self.status,
                "detail": self.detail, "seconds": round(self.seconds, 3)}


REGISTRY: dict[str, Check] = {}


def check(name: str, selftest: str | None = None, needs: tuple[str, ...] = (),
          timeout: float = 20.0):
    """Register fn as the check `name` (its module is its area)."""
    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"duplicate verify check {name}")
        area = fn.__module__.rsplit(".", 1)[-1]
        REGISTRY[name] = Check(name, fn, area, selftest, tuple(needs), timeout)
        return fn
    return wrap


def register(name: str, fn, selftest=None, needs=(), timeout: float = 20.0, doc: str = ""):
    """Register a check made by a factory (one property, several families)."""
    if doc:
        fn.__doc__ = doc
    fn.__name__ = name.replace("-", "_")
    return check(name, selftest, needs, timeout)(fn)


AREAS = ("distribution", "isolation", "steering", "migration", "udp", "probes")


def all_checks() -> list[Check]:
    """Every check, in area order then definition order."""
    from . import distribution, isolation, migration, probes, steering, udp  # noqa: F401
    order = {a: i for i, a in enumerate(AREAS)}
    return sorted(REGISTRY.values(), key=lambda c: order.get(c.area, len(order)))


def select(patterns: tuple[str, ...] | list[str] | None) -> list[Check]:
    """The checks matching any pattern (a glob or a substring of the name, or
    an area name); all checks when there is no pattern."""
    checks = all_checks()
    pats = [p.strip() for spec in (patterns or ()) for p in spec.split(",") if p.strip()]
    if not pats:
        return checks

    def hit(c: Check, p: str) -> bool:
        if any(ch in p for ch in "*?["):
            return fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.area, p)
        return p in c.name or p == c.area

    chosen = [c for c in checks if any(hit(c, p) for p in pats)]
    if not chosen:
        shown = ", ".join(repr(p) for p in pats)
        raise UserError(f"no verify check matches {shown}: "
                        f"'reuseport-ctl verify --list' shows the {len(checks)} names.")
    return chosen
