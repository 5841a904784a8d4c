"""Inference backends behind one interface, and the rule ``backend="auto"`` follows.

A backend is built from a validated :class:`~cogbert_edge.inference.bundle.Bundle` and has one method,
``step(obs [B, obs_dim], h [B, hidden], c [B, hidden]) -> (head, value, h, c)`` on float32
numpy arrays; it returns new arrays and never keeps per-call state, so one backend serves
any number of sessions and threads.

``auto`` picks the first available of ``AUTO_ORDER``. The order is the measured speed on
CPUs for single decisions (``cogbert-bench edge``):

- ``native`` (the C runtime, ``native/``) comes first where it has SIMD kernels for the CPU:
  x86-64 with AVX2+FMA (or AVX512-VNNI) and arm64 (NEON). There it is several times faster
  than numpy at batch 1 and at batch 64. Elsewhere (other CPUs, or x86-64 without AVX2, where it
  falls back to scalar C) it comes last, and is used only when asked for by name.
- numpy beats MLX at batch 1 on every CPU we measured because MLX hands each evaluation to
  another thread (see docs/architecture.md).

``native`` is available when its extension is built and loads (``make -C native``, which
``./run`` does); the rule is evaluated once, when this module is imported.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cogbert_edge.errors import BackendUnavailableError, ConfigError
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import ModelConfig

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "available_backends", "create_backend", "resolve_backend"]


class Backend(Protocol):
    """What every backend offers the :class:`~cogbert_edge.inference.policy.Policy`. A backend
    module imports nothing above this package: the policy depends on backends, never the
    reverse."""

    name: str
    config: ModelConfig

    def step(self, obs: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        """``obs [B, obs_dim]``, ``h, c [B, hidden]`` (float32) -> ``(head, value, h, c)``: new arrays,
        no state kept between calls."""
        ...


def _numpy(bundle: Bundle) -> Backend:
    from cogbert_edge.inference.backends.numpy_backend import NumpyBackend
    return NumpyBackend(bundle)


def _mlx(bundle: Bundle) -> Backend:
    from cogbert_edge.inference.backends.mlx_backend import MLXBackend
    return MLXBackend(bundle)


def _mlx_available() -> bool:
    from cogbert_edge._internal.mlx import import_mlx
    return import_mlx() is not None


def _native(bundle: Bundle) -> Backend:
    from cogbert_edge.inference.backends.native_backend import NativeBackend
    return NativeBackend(bundle)


def _native_available() -> bool:
    from cogbert_edge.inference.backends.native_backend import native_available
    return native_available()


def _native_first() -> bool:
    """Native first where it is measured fastest: a SIMD build on x86-64 or arm64."""
    if platform.machine().lower() not in ("x86_64", "amd64", "arm64", "aarch64"):
        return False
    from cogbert_edge.inference.backends.native_backend import native_simd
    return native_simd()


BACKENDS: dict[str, tuple[Callable[[Bundle], Backend], Callable[[], bool]]] = {
    "numpy": (_numpy, lambda: True),
    "mlx": (_mlx, _mlx_available),
    "native": (_native, _native_available),
}
AUTO_ORDER = ("native", "numpy", "mlx") if _native_first() else ("numpy", "mlx", "native")


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


def create_backend(bundle: Bundle, name: str | None = None) -> Backend:
    return BACKENDS[resolve_backend(name)][0](bundle)
