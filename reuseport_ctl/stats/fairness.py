"""Fairness of a distribution of counts over workers (pure functions)."""
from __future__ import annotations

import math
from typing import Sequence


def shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def jain(counts: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when equal, 1/n when one takes all."""
    n = len(counts)
    sq = sum(c * c for c in counts)
    if n == 0 or sq == 0:
        return 1.0
    return sum(counts) ** 2 / (n * sq)


def max_min_ratio(counts: Sequence[float]) -> float:
    """Busiest over idlest; inf when a worker got nothing while another did."""
    if not counts or max(counts) == 0:
        return 1.0
    lo = min(counts)
    return math.inf if lo == 0 else max(counts) / lo


def chi_square(counts: Sequence[float], expected: Sequence[float]) -> float:
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected) if e > 0)


def chi_square_uniform_ok(counts: Sequence[int], alpha: float = 0.001) -> bool:
    """True when counts are consistent with a uniform distribution at level alpha.

    Uses the Wilson-Hilferty normal approximation of the chi-square quantile,
    good to a few percent for df >= 1, which is plenty for a test bound.
    """
    n, total = len(counts), sum(counts)
    if n < 2 or total == 0:
        return True
    df = n - 1
    z = _normal_quantile(1 - alpha)
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return chi_square(counts, [total / n] * n) <= crit


def _normal_quantile(p: float) -> float:
    # Acklam's rational approximation is overkill; bisection on erf is clear.
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def summarize(counts: Sequence[int]) -> dict:
    """The figures every report carries."""
    r = max_min_ratio(counts)
    return {"total": sum(counts), "shares": shares(counts),
            "max_min_ratio": None if math.isinf(r) else round(r, 4),
            "jain": round(jain(counts), 4)}
