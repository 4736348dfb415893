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
        out[f"p{q:g}"] = float(s[max(1, math.ceil(q / 100 * n)) - 1])
    out["max"] = float(s[-1])
    return out
