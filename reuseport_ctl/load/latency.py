"""Latency percentiles (pure; unit-tested)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentiles(samples: Iterable[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles ("p50", "p90", "p99") plus "max".

    Nearest rank (not interpolation) so every figure is a latency that was
    actually observed; all zeros when there are no samples.
    """
    s = sorted(samples)
    out = {f"p{q:g}": 0.0 for q in qs}
    out["max"] = 0.0
    if not s:
        return out
    n = len(s)
    for q in qs:
        if not 0 < q <= 100:
            raise ValueError(f"percentile {q} is outside (0, 100]")
        out[f"p{q:g}"] = float(s[_rank(q, n)])
    out["max"] = float(s[-1])
    return out


# Where latency_cdf() samples the distribution: every percent, then finer in
# the tail (a stalled worker shows up in the last per mille, not the median).
CDF_QS = tuple(range(1, 100)) + (99.5, 99.9, 99.95, 99.99)


def latency_cdf(samples: Iterable[float], qs: Sequence[float] = CDF_QS) -> list[list[float]]:
    """[[q, ms], ...] at each q in qs (nearest rank) plus [100, max]: a
    compact CDF to plot, of observed latencies only; [] without samples."""
    s = sorted(samples)
    if not s:
        return []
    n = len(s)
    out = [[float(q), float(s[_rank(q, n)])] for q in qs]
    out.append([100.0, float(s[-1])])
    return out


def _rank(q: float, n: int) -> int:
    """Index of the nearest-rank q-th percentile of n sorted samples; rounded
    first so 99.9 / 100 * 1000 (999.0000000000001 in floats) is rank 999."""
    return max(1, math.ceil(round(q / 100 * n, 9))) - 1
