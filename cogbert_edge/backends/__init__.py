"""Inference backends behind one interface, and the rule ``backend="auto"`` follows.

A backend is built from a validated :class:`~cogbert_edge.bundle.Bundle` and has one method,
``step(obs [B, obs_dim], h [B, hidden], c [B, hidden]) -> (head, value, h, c)`` on float32
numpy arrays; it returns new arrays and never keeps per-call state, so one backend serves
any number of sessions and threads.

``auto`` picks the first available of ``AUTO_ORDER``. The order is the measured speed on
CPUs for single decisions (``cogbert-bench edge``): numpy beats MLX at batch 1 on every CPU
we measured because MLX hands each evaluation to another thread (see docs/architecture.md).
"""

from __future__ import annotations

import os
from typing import Callable

from ..bundle import Bundle
from ..errors import BackendUnavailableError, ConfigError

__all__ = ["BACKENDS", "AUTO_ORDER", "available_backends", "create_backend", "resolve_backend"]


def _numpy(bundle: Bundle):
    from .numpy_backend import NumpyBackend
    return NumpyBackend(bundle)


def _mlx(bundle: Bundle):
    from .mlx_backend import MLXBackend
    return MLXBackend(bundle)


def _mlx_available() -> bool:
    from .._mlx import import_mlx
    return import_mlx() is not None


BACKENDS: dict[str, tuple[Callable[[Bundle], object], Callable[[], bool]]] = {
    "numpy": (_numpy, lambda: True),
    "mlx": (_mlx, _mlx_available),
}
AUTO_ORDER = ("numpy", "mlx")


def available_backends() -> list[str]:
    return [name for name, (_, ok) in BACKENDS.items() if ok()]


def resolve_backend(name: str | None = None) -> str:
    """``name``, or ``$COGBERT_BACKEND``, or ``auto``, resolved to an available backend name."""
    name = name or os.environ.get("COGBERT_BACKEND", "auto")
    if name == "auto":
        for candidate in AUTO_ORDER:
            if BACKENDS[candidate][1]():
                return candidate
        raise BackendUnavailableError("no inference backend is available")  # numpy always is
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    if not BACKENDS[name][1]():
        raise BackendUnavailableError(f"backend {name!r} is not available here; available: {available_backends()}")
    return name


def create_backend(bundle: Bundle, name: str | None = None):
    return BACKENDS[resolve_backend(name)][0](bundle)
