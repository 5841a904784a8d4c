"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

HAS_MLX = importlib.util.find_spec("mlx") is not None
# MLX is part of the dev setup on every platform it has wheels for; where it has none, the
# MLX tests cannot run and say so.
needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="MLX has no wheel for this platform")



def structured_obs(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    """Sensor-like observations: sinusoids of many frequencies, a slow AR(1) wander, noise."""
    t = np.arange(steps)[:, None]
    phase = rng.uniform(0, 2 * np.pi, dim)
    freq = rng.uniform(0.005, 0.2, dim)
    wander = np.zeros((steps, dim))
    for i in range(1, steps):
        wander[i] = 0.98 * wander[i - 1] + 0.1 * rng.standard_normal(dim)
    return (np.sin(freq * t + phase) + wander + 0.1 * rng.standard_normal((steps, dim))).astype(np.float32)
