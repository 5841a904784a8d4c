"""The MLX backend: the model's math on ``mlx.core``, compiled with ``mx.compile``.

Quantized layers run one of two ways (``quant_path``):

- ``"kernel"``: ``mx.quantized_matmul`` on the bundle's packed tensors as they are. This is
  MLX's fast path on Apple-silicon GPUs (Metal), where it reads 4x/8x fewer weight bytes.
- ``"dequantize"``: the weights are dequantized once, at load, with ``mx.dequantize`` (the
  same ``scale * q + bias`` numbers), and every step is an fp32 matmul. On MLX's CPU device
  ``quantized_matmul`` is a plain loop, not a BLAS call: measured on our Linux x86 machine it
  was 9x slower than the fp32 matmul at batch 1 and 50x at batch 64 (docs/performance.md), while
  the fp32 matmul goes to OpenBLAS (see ``_internal.mlx``). Dequantized, int8 and int4 bundles
  step as fast as fp32 ones, and compute exactly the dequantized math that the numpy reference
  computes; the price is fp32 weight memory.

``"auto"`` (the default, or ``$COGBERT_MLX_QUANT``) takes ``kernel`` when MLX computes on a GPU
and ``dequantize`` on the CPU.

:class:`MLXMath` is also what the cloud trainer differentiates through (fp32 parameters).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.errors import BackendUnavailableError, ConfigError
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import step
from cogbert_edge.inference.quant import QuantSpec

__all__ = ["MLXMath", "MLXBackend", "QUANT_PATHS", "quant_path"]

QUANT_PATHS = ("auto", "kernel", "dequantize")


def quant_path(mx: Any, requested: str | None = None) -> str:
    """``kernel`` or ``dequantize`` for ``requested`` (None: ``$COGBERT_MLX_QUANT``, else auto)."""
    choice = requested or os.environ.get("COGBERT_MLX_QUANT", "auto")
    if choice not in QUANT_PATHS:
        raise ConfigError(f"the MLX quantized path must be one of {QUANT_PATHS}, got {choice!r}")
    if choice != "auto":
        return choice
    return "kernel" if mx.default_device() == mx.gpu else "dequantize"


class MLXMath:
    """``model.Math`` over MLX arrays. ``params`` maps bundle tensor names to ``mx.array``."""

    def __init__(self, params: Mapping[str, Any], quant: Mapping[str, QuantSpec] | None = None) -> None:
        self.mx = import_mlx()
        self.params = params
        self.quant = quant or {}

    def linear(self, name: str, x: Any) -> Any:
        mx, p = self.mx, self.params
        spec = self.quant.get(name)
        if spec is None:
            y = x @ p[name + ".weight"].T
        else:
            y = mx.quantized_matmul(x, p[name + ".weight"], p[name + ".scales"], p[name + ".biases"],
                                    transpose=True, group_size=spec.group_size, bits=spec.bits)
        b = p.get(name + ".bias")
        return y if b is None else y + b

    def linear2(self, name_a: str, a: Any, name_b: str, b: Any) -> Any:
        return self.linear(name_a, a) + self.linear(name_b, b)

    def param(self, name: str) -> Any:
        return self.params[name]

    def relu(self, x: Any) -> Any:
        return self.mx.maximum(x, 0.0)

    def sigmoid(self, x: Any) -> Any:
        return self.mx.sigmoid(x)

    def tanh(self, x: Any) -> Any:
        return self.mx.tanh(x)

    def clip(self, x: Any, lo: float, hi: float) -> Any:
        return self.mx.clip(x, lo, hi)

    def exp(self, x: Any) -> Any:
        return self.mx.exp(x)

    def logsumexp(self, x: Any) -> Any:
        return self.mx.logsumexp(x, axis=-1, keepdims=True)


class MLXBackend:
    name = "mlx"

    def __init__(self, bundle: Bundle, *, compile: bool = True, quant: str | None = None) -> None:
        mx = import_mlx()
        if mx is None:
            raise BackendUnavailableError(
                "MLX is not installed; install it with `pip install 'cogbert[mlx]'` or use backend='numpy'")
        self._mx = mx
        self.config = bundle.config
        self.quant_path = quant_path(mx, quant)
        params = {k: mx.array(np.asarray(v)) for k, v in bundle.tensors.items()}
        layers = dict(bundle.quant)
        if self.quant_path == "dequantize":
            for name, spec in layers.items():
                w, scales, biases = (params.pop(f"{name}.{k}") for k in ("weight", "scales", "biases"))
                params[f"{name}.weight"] = mx.dequantize(w, scales, biases, group_size=spec.group_size,
                                                         bits=spec.bits)
            layers = {}
        mx.eval(params)
        math = MLXMath(params, layers)
        config = self.config

        def _step(obs, h, c):
            return step(math, config, obs, h, c)

        self._fn = mx.compile(_step) if compile else _step
        # MLX's evaluation is not documented as safe from several threads at once.
        self._lock = threading.Lock()

    def step(self, obs: np.ndarray, h: np.ndarray, c: np.ndarray):
        mx = self._mx
        with self._lock:
            out = self._fn(mx.array(obs), mx.array(h), mx.array(c))
            mx.eval(out)
            return tuple(np.array(o, copy=True) for o in out)
