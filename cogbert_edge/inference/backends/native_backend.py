"""The native backend: the C runtime in ``native/`` (a CPython extension over ``libcogbert``).

The extension is found, in order, at ``$COGBERT_NATIVE_LIB`` (a path to the extension file),
next to this package in ``cogbert_edge/_native/`` (where ``make -C native`` installs it), and in
``native/build/`` of a source checkout. The C library re-validates the bundle with its own strict
reader (the same rules as :mod:`cogbert_edge.inference.bundle`), repacks the weights for its kernels once,
and then steps without allocating. Arrays go in and out without copies (buffer protocol).

Kernels: ``$COGBERT_NATIVE_KERNEL`` = ``auto`` (default), ``scalar``, ``avx2``, ``vnni``,
``avx512``, ``vnni512`` or ``neon``. ``vnni512`` and ``vnni`` (AVX512-VNNI, 512- and 256-bit)
quantize activations of int8/int4 layers to int8 and are the fastest; ``avx512``, ``avx2``,
``neon`` and ``scalar`` quantize them to int16, which is near-exact. The 512-bit kernels give
the same results as their 256-bit counterparts bit for bit. See ``native/README.md`` for the
measured speed and error of each.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cogbert_edge.errors import (
    BackendUnavailableError,
    BundleError,
    CogbertError,
    ConfigError,
    ObservationError,
)
from cogbert_edge.inference.bundle import Bundle

__all__ = ["NativeBackend", "native_available", "native_module", "KERNELS"]

KERNELS = {"auto": 0, "scalar": 1, "avx2": 2, "neon": 3, "vnni": 4, "avx512": 6, "vnni512": 7}
# The kernels that quantize activations to int8 (looser error bound, docs in native/README.md).
INT8_ACTIVATION_KERNELS = ("vnni", "vnni512")
_F32 = np.dtype(np.float32)
_cache: dict[str, Any] = {}


def _candidates() -> list[Path]:
    names = [f"_cogbert_native{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    env = os.environ.get("COGBERT_NATIVE_LIB")
    if env:
        return [Path(env)]  # an explicit choice: no silent fallback to another build
    here = Path(__file__).resolve().parents[2]  # the cogbert_edge package root
    dirs = [here / "_native", here.parent / "native" / "build"]
    return [d / n for d in dirs for n in names]


def native_module() -> ModuleType | None:
    """The loaded extension, or None (the reason is in ``native_error()``)."""
    if "module" not in _cache:
        _cache["module"], _cache["error"] = None, "not found in " + ", ".join(str(p) for p in _candidates())
        for path in _candidates():
            if not path.is_file():
                continue
            try:
                spec = importlib.util.spec_from_file_location("_cogbert_native", path)
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
            except (ImportError, OSError, AssertionError) as e:
                _cache["error"] = f"{path}: {e}"
                break
            sys.modules.setdefault("_cogbert_native", mod)
            _cache["module"], _cache["error"] = mod, ""
            break
    return _cache["module"]


def native_error() -> str:
    native_module()
    return _cache["error"]


def native_available() -> bool:
    return native_module() is not None


def native_simd() -> bool:
    """True when the native runtime has SIMD kernels for this CPU (AVX2, VNNI, AVX-512 or NEON)."""
    mod = native_module()
    return mod is not None and mod.best_kernel() not in (KERNELS["auto"], KERNELS["scalar"])


def _raise(err: Exception, what: str) -> None:
    status, message = err.args if len(err.args) == 2 else (-1, str(err))
    mod = native_module()
    if mod is None:  # only reachable from a call into the loaded module; kept for the type checker
        raise CogbertError(f"native runtime: {message} (status {status})") from None
    if status in (mod.ERR_FORMAT, mod.ERR_VERSION, mod.ERR_BUNDLE, mod.ERR_IO):
        raise BundleError(f"native runtime: {message}") from None
    if status == mod.ERR_NONFINITE:
        raise ObservationError("observation holds NaN or Inf; fix the sensor data, or load the policy "
                               "with invalid_obs='sanitize'") from None
    if status == mod.ERR_UNSUPPORTED:
        raise BackendUnavailableError(f"native runtime cannot {what}: {message}") from None
    if status == mod.ERR_NO_MEMORY:
        raise MemoryError(f"native runtime: {message}") from None
    if status == mod.ERR_ARGUMENT:
        raise ObservationError(f"native runtime: {message}") from None
    raise CogbertError(f"native runtime: {message} (status {status})") from None


def open_bytes(data: bytes, kernel: str = "auto") -> Any:
    """Open raw bundle bytes with the C reader alone (no Python validation first). Raises
    BundleError when the C reader refuses them; used to check both readers agree."""
    mod = native_module()
    if mod is None:
        raise BackendUnavailableError(f"the native runtime is not built ({native_error()})")
    try:
        return mod.NativePolicy(bytes(data), KERNELS[kernel])
    except mod.NativeError as e:
        _raise(e, "open this bundle")


class NativeBackend:
    name = "native"

    def __init__(self, bundle: Bundle, *, kernel: str | None = None) -> None:
        mod = native_module()
        if mod is None:
            raise BackendUnavailableError(f"the native runtime is not built ({native_error()}); "
                                          "run `make -C native` (or ./run setup)")
        kernel = kernel or os.environ.get("COGBERT_NATIVE_KERNEL", "auto")
        if kernel not in KERNELS:
            raise ConfigError(f"COGBERT_NATIVE_KERNEL must be one of {sorted(KERNELS)}, got {kernel!r}")
        self.config = bundle.config
        try:
            self._p = mod.NativePolicy(bundle.to_bytes(), KERNELS[kernel])
        except mod.NativeError as e:
            _raise(e, f"run with kernel {kernel!r} here")
        self.info: dict[str, Any] = self._p.info()
        self.kernel = {v: k for k, v in KERNELS.items()}[self.info["kernel"]]
        self._error = mod.NativeError
        self._obs_shape = (self.config.obs_dim,)
        self._state_shape = (self.config.hidden,)
        self._heads = self.config.action.size
        self._forward = self._p.forward
        self._decide_native = self._p.decide if self.config.action.discrete and self._heads <= 64 else None
        self.act = self._bind_act()
        # ``act_batch(obs, h, c, deterministic, rng) -> (action, log_prob, value, h, c) | None``:
        # the batch step and per-row sampling in one call (bound by _bind_act).
        self.act_batch = self._p.act_batch if self.config.action.discrete and self.act is not None else None

    def _bind_act(self):
        """The extension's ``act(obs, state, deterministic, rng) -> Decision | None``: ``decide``
        with the Decision built in C, as the frozen dataclasses' own ``__init__`` builds it
        (``object.__setattr__`` per field). Only bound while the classes are plain frozen
        dataclasses with exactly those fields; otherwise Policy uses ``decide``."""
        import dataclasses

        from cogbert_edge.inference.policy import Decision, State
        plain = all(dataclasses.is_dataclass(t) and t.__dataclass_params__.frozen  # type: ignore[union-attr]
                    and not hasattr(t, "__post_init__") and "__slots__" not in t.__dict__
                    for t in (State, Decision))
        if (self._decide_native is None or not plain
                or [f.name for f in dataclasses.fields(State)] != ["h", "c"]
                or [f.name for f in dataclasses.fields(Decision)] != ["action", "log_prob", "value", "state"]):
            return None
        self._p.bind(State, Decision, np.empty, _F32, np.dtype(np.int64), np.dtype(np.float64))
        return self._p.act

    def set_null_step(self, on: bool) -> None:
        """Benchmarks only: skip the C step in every call (zero head and value, state carried
        over), so that timing a call measures the binding's own cost."""
        self._p.set_null_step(on)

    def step(self, obs: np.ndarray, h: np.ndarray, c: np.ndarray):
        """``obs [B, obs_dim]``, ``h, c [B, hidden]`` (float32) -> new ``(head, value, h, c)``."""
        obs = np.ascontiguousarray(obs, _F32)  # no copy when already float32 and contiguous
        h = np.ascontiguousarray(h, _F32)
        c = np.ascontiguousarray(c, _F32)
        b = obs.shape[0]
        if obs.ndim != 2 or obs.shape[1] != self._obs_shape[0] or h.shape != (b,) + self._state_shape \
                or c.shape != h.shape:
            raise ObservationError(f"native step: obs {obs.shape}, h {h.shape}, c {c.shape} do not match "
                                   f"obs_dim {self._obs_shape[0]} and hidden {self._state_shape[0]}")
        head = np.empty((b, self._heads), _F32)
        value = np.empty(b, _F32)
        h2, c2 = np.empty_like(h), np.empty_like(c)
        try:
            self._forward(obs, h, c, head, value, h2, c2)
        except self._error as e:
            _raise(e, "step")
        return head, value, h2, c2

    def decide(self, obs: Any, h: np.ndarray, c: np.ndarray, deterministic: bool,
               rng: np.random.Generator):
        """One discrete decision in one native call: ``(action, log_prob, value, h, c)``, or None
        when the input needs the general path (other types, dtypes or shapes, strided views,
        NaN/Inf), which then converts, raises or sanitizes exactly as for every backend. The
        extension checks the arrays itself and draws from ``rng`` only on success, as the
        general path does."""
        if self._decide_native is None:
            return None
        h2 = np.empty(self._state_shape, _F32)
        c2 = np.empty(self._state_shape, _F32)
        try:
            out = self._decide_native(obs, h, c, h2, c2, deterministic, rng)
        except self._error as e:
            _raise(e, "decide")
        if out is None:
            return None
        return out[0], out[1], out[2], h2, c2
