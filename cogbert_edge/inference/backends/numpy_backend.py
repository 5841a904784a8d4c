"""The reference backend: the model in plain numpy, quantized weights dequantized once at load.

Always available. It runs the exact math of :mod:`cogbert_edge.inference.model`; for quantized bundles
the result equals fp32 inference with the dequantized weights, which is what every other
backend's quantized kernels approximate.
"""

from __future__ import annotations

import numpy as np

from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import NumpyMath, step


class NumpyBackend:
    name = "numpy"

    def __init__(self, bundle: Bundle) -> None:
        self.config = bundle.config
        self._math = NumpyMath(bundle.fp32_params())

    def step(self, obs: np.ndarray, h: np.ndarray, c: np.ndarray):
        """``obs [B, obs_dim]``, ``h, c [B, hidden]`` (float32) -> ``(head, value, h, c)``."""
        return step(self._math, self.config, obs, h, c)
