"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_calls(fn: Callable[[int], object], steps: int, warmup: int) -> np.ndarray:
    """Call ``fn(i)`` ``warmup`` times untimed, then ``steps`` times; per-call seconds."""
    for i in range(warmup):
        fn(i)
    out = np.empty(steps)
    clock = time.perf_counter
    for i in range(steps):
        t0 = clock()
        fn(i)
        out[i] = clock() - t0
    return out


def summary_us(seconds: np.ndarray) -> dict[str, float]:
    us = seconds * 1e6
    p50, p95, p99 = np.percentile(us, [50, 95, 99])
    return {"p50_us": round(float(p50), 2), "p95_us": round(float(p95), 2),
            "p99_us": round(float(p99), 2), "mean_us": round(float(us.mean()), 2)}
